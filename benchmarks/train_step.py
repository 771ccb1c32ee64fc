"""DiT train-step efficiency: achieved model FLOP/s of the real train step / this machine's f32 matmul FLOP/s.

    python benchmarks/train_step.py                           # DiT-S (batch 8) and DiT-B (batch 4), 256 tokens
    python benchmarks/train_step.py --models=S --batch_s=32 --steps=10
    python benchmarks/train_step.py --xla_flags=--xla_cpu_multi_thread_eigen=false   # try XLA CPU settings

The measured step is the loop's own: ``configs/dit_{s,b}.py:p2`` (32x32x4 latents, patch 2 -> T = 256
tokens), ``trainers.method.get_method``/``ModelDef``, ``trainers.optim.make_optimizer`` (AdamW), the
state built by a jitted ``trainers.train._init_fn`` with ``state_shardings`` as out_shardings, and
``trainers.train.make_train_step`` jitted with explicit in/out shardings and ``donate_argnums=(0,)``
inside ``sharding.use_mesh`` exactly as ``train_and_evaluate`` does (so AdamW, EMA, the flow-matching
noise/label-drop and the grad norm are all in the timed step). The batch is random:
{"latent": f32 (B, 32, 32, 4), "label": int32 (B,)}.

Model FLOPs (analytic, matmuls and attention only; train = 3 x forward, i.e. backward = 2 x forward).
Per image, with T tokens, width D, depth L, MLP width 4D, patch p, C in / C_out out channels:

    forward = T * [ 2 p^2 C D                      patch embedding (a p x p stride-p conv = a matmul)
                  + L * 24 D^2                     qkv 6D^2 + proj 2D^2 + fc1 8D^2 + fc2 8D^2
                  + 2 D p^2 C_out ]                final linear
            + L * 4 T^2 D                          attention: q k^T (2 T^2 D) and weights @ v (2 T^2 D)
            + L * 12 D^2 + 4 D^2 + 2*256 D + 2 D^2 adaLN modulation (per block, final) and t-embedder,
                                                   once per image (they act on the condition vector)
    train   = 3 * forward * B

i.e. the usual 6 * N_token_params * T + 12 * L * T^2 * D per image, plus the small per-image
conditioning terms. The XLA count of the compiled step (``compiled.cost_analysis()["flops"]``) is
printed beside it; it also counts elementwise work (softmax, layer norms, GELU, AdamW, EMA), so it is
higher, and the ratio is taken on the analytic model FLOPs (the MFU convention).

Machine matmul FLOP/s: a jitted f32 ``jnp.dot`` of 2048 x 2048 x 2048 and one with the model's largest
matmul shape (B*T, D) @ (D, 4D) (the MLP's fc1), each 2 M N K FLOPs per call; the denominator is the
larger of the two medians. The machine is shared (2 cores, other jobs), so matmul and train-step samples
are interleaved (each round: a few matmuls, then one train step) so both see the same load, and medians
are reported with the spread (min..max).

What limits the ratio on XLA:CPU (jax 0.10.2, 2 shared cores; measured with this script, a profile of
the gradient, and the optimized HLO): the forward pass runs near matmul speed (DiT-S/2, batch 8:
~1.4 s for 97 GFLOP, ~70 GFLOP/s), AdamW + EMA cost ~0.08 s, but the backward is ~10x the forward
instead of ~2x, and grows faster than linearly with depth (grad of 2/4/8/12 blocks: 0.65/2.6/7.6/15 s).
The profile is dominated by ``copy_bitcast_fusion`` loop fusions: to feed each weight-gradient dot a
transposed (D, B*T) operand, XLA's CPU instruction fusion duplicates the whole elementwise chain of the
residual-stream gradient (adaLN modulate/gate, layer-norm backward of every later block) into each such
copy and evaluates it in transposed (cache-hostile) order, so the elementwise work is O(depth^2). The
matmuls themselves (YNNPACK fusions) run at about the matmul rate. A bigger batch does not help (both
sides scale with B); this is a compiler/fusion effect of the model's backward, not of the benchmark, so
the fix belongs in the model (e.g. an optimization barrier / checkpoint around each block's residual
gradient) or in XLA, not here. ``--xla_flags`` lets one try XLA settings on the same step: with
``--xla_flags=--xla_disable_hlo_passes=fusion`` the DiT-S/2 gradient took 9.4 s instead of 18.6 s in
a side-by-side run (forward unchanged), i.e. the duplicated fusions cost at least half the step; the
whole DiT-S/2 benchmark with that flag gave a 5.5 s step and ratio 0.38 (0.35..0.49 per round), against
~23 s and 0.21 with the defaults (different load, so compare ratios, not times). Recomputing each
block in the backward (``--remat=off,on``, the model's ``remat`` option) does not break the duplicated
fusions: side by side, DiT-S/2 batch 8 gave ratio 0.21 without and 0.18 with remat.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import dit_b, dit_s  # noqa: E402
from trainers import sharding  # noqa: E402
from trainers.method import ModelDef, get_method  # noqa: E402
from trainers.optim import make_optimizer  # noqa: E402
from trainers.train import _init_fn, make_train_step, state_shardings  # noqa: E402

CONFIGS = {"S": dit_s, "B": dit_b}


def dit_forward_flops(m) -> float:
    """Analytic forward FLOPs of one image through DiT (matmuls + attention), per the module docstring."""
    d, depth, p = m.hidden_size, m.depth, m.patch_size
    t = (m.input_size // p) ** 2
    c_out = m.in_channels * (2 if m.learn_sigma else 1)
    per_token = 2 * p * p * m.in_channels * d + depth * 24 * d * d + 2 * d * p * p * c_out
    attention = depth * 4 * t * t * d
    per_image = depth * 12 * d * d + 4 * d * d + 2 * 256 * d + 2 * d * d
    return float(t * per_token + attention + per_image)


def _xla_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def build(size: str, batch_size: int, remat: bool = False):
    """(compiled train step, state, batch, config, n_params, xla_flops) as the loop builds them."""
    config = CONFIGS[size].get_config("p2")
    config.batch_size = batch_size
    config.model.remat = remat
    mesh = sharding.make_mesh(config.mesh)
    method = get_method(config)
    model_def = ModelDef(method)
    tx, schedule = make_optimizer(config)
    init = _init_fn(model_def, tx, None)
    seed_key = jax.random.PRNGKey(config.seed)
    abstract_state = jax.eval_shape(init, seed_key)
    shardings = state_shardings(abstract_state, model_def, mesh)
    with sharding.use_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(seed_key)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))

    train_step = make_train_step(method, model_def, tx, schedule, config.ema_rate)

    def step_fn(state, batch):
        with sharding.use_mesh(mesh):
            return train_step(state, batch)

    p_train_step = jax.jit(step_fn, in_shardings=(shardings, None),
                           out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))

    m = config.model
    rng = np.random.default_rng(0)
    host = {"latent": rng.standard_normal((batch_size, m.input_size, m.input_size, m.in_channels), np.float32),
            "label": rng.integers(0, m.num_classes, (batch_size,)).astype(np.int32)}
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in host.items()}
    t0 = time.perf_counter()
    compiled = p_train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    return compiled, state, batch, config, n_params, _xla_flops(compiled), compile_s


def make_matmul(m: int, k: int, n: int):
    a = jax.random.normal(jax.random.PRNGKey(1), (m, k), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(2), (k, n), jnp.float32)
    f = jax.jit(jnp.dot).lower(a, b).compile()
    jax.block_until_ready(f(a, b))
    jax.block_until_ready(f(a, b))

    def run() -> float:
        start = time.perf_counter()
        jax.block_until_ready(f(a, b))
        return time.perf_counter() - start

    return run, 2.0 * m * k * n


def bench(size: str, batch_size: int, steps: int, warmup: int, matmul_reps: int, remat: bool = False) -> dict:
    compiled, state, batch, config, n_params, xla_flops, compile_s = build(size, batch_size, remat)
    m = config.model
    tokens = (m.input_size // m.patch_size) ** 2
    model_flops = 3.0 * dit_forward_flops(m) * batch_size
    d = m.hidden_size
    matmuls = {"2048^3": make_matmul(2048, 2048, 2048),
               f"{batch_size * tokens}x{d}x{int(4 * d)}": make_matmul(batch_size * tokens, d, int(m.mlp_ratio * d))}

    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))

    step_times, mm_rates = [], {name: [] for name in matmuls}
    for _ in range(steps):
        for name, (run, flops) in matmuls.items():
            mm_rates[name].extend(flops / run() for _ in range(matmul_reps))
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        step_times.append(time.perf_counter() - start)
    for name, (run, flops) in matmuls.items():  # one more round after the last step: brackets every step
        mm_rates[name].extend(flops / run() for _ in range(matmul_reps))
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise RuntimeError(f"DiT-{size}: non-finite loss {loss}")

    step_times = np.asarray(step_times)
    step = float(np.median(step_times))
    mm_medians = {name: float(np.median(r)) for name, r in mm_rates.items()}
    best_mm = max(mm_medians, key=mm_medians.get)
    peak = mm_medians[best_mm]
    # Per-round ratio (step i against the matmuls just before it) shows how much the load noise moves it.
    first = next(iter(mm_rates))
    per_round = [model_flops / t / max(np.median(mm_rates[n][i * matmul_reps:(i + 1) * matmul_reps])
                                       for n in mm_rates) for i, t in enumerate(step_times)]
    return dict(model=f"DiT-{size}/2" + (" remat" if remat else ""), params=n_params, batch=batch_size, tokens=tokens, step=step,
                step_min=float(step_times.min()), step_max=float(step_times.max()),
                model_gflop=model_flops / 1e9, xla_gflop=xla_flops / 1e9, model_tflops=model_flops / step / 1e12,
                xla_tflops=xla_flops / step / 1e12, mm=mm_medians, mm_spread={
                    n: (float(np.min(r)), float(np.max(r))) for n, r in mm_rates.items()},
                mm_best=best_mm, mm_tflops=peak / 1e12, ratio=model_flops / step / peak,
                ratio_rounds=(float(np.min(per_round)), float(np.max(per_round))), compile_s=compile_s, loss=loss)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="S,B", help="comma-separated DiT sizes: S, B")
    parser.add_argument("--batch_s", type=int, default=8, help="DiT-S batch")
    parser.add_argument("--batch_b", type=int, default=4, help="DiT-B batch")
    parser.add_argument("--steps", type=int, default=4, help="timed train steps (after warmup)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed train steps after compilation")
    parser.add_argument("--matmul_reps", type=int, default=3, help="matmul timings per shape per round")
    parser.add_argument("--remat", default="off,on",
                        help="model.remat variants to run side by side: off, on or off,on (recompute each "
                             "block in the backward; model FLOPs are counted without the recompute)")
    parser.add_argument("--xla_flags", default="",
                        help="extra XLA_FLAGS, applied before the backend starts (e.g. CPU threading flags)")
    args = parser.parse_args()
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()

    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, {dev.platform} ({getattr(dev, 'device_kind', '')}), "
          f"{len(os.sched_getaffinity(0))} usable cores, load avg {os.getloadavg()[0]:.1f}; "
          f"f32 compute; {args.steps} timed steps after {args.warmup} warmup")
    batches = {"S": args.batch_s, "B": args.batch_b}
    rows = []
    variants = [{"off": False, "on": True}[v.strip()] for v in args.remat.split(",") if v.strip()]
    sizes = [s.strip().upper() for s in args.models.split(",") if s.strip()]
    for size, remat in [(size, remat) for size in sizes for remat in variants]:
        r = bench(size, batches[size], args.steps, args.warmup, args.matmul_reps, remat)
        rows.append(r)
        mm = ", ".join(f"{n}: {v / 1e9:.1f} GFLOP/s ({r['mm_spread'][n][0] / 1e9:.1f}..{r['mm_spread'][n][1] / 1e9:.1f})"
                       for n, v in r["mm"].items())
        print(f"{r['model']}: {r['params'] / 1e6:.1f}M params, {r['tokens']} tokens, batch {r['batch']}; "
              f"compile {r['compile_s']:.1f} s; loss {r['loss']:.3f}\n"
              f"  step {r['step'] * 1e3:.0f} ms median ({r['step_min'] * 1e3:.0f}..{r['step_max'] * 1e3:.0f}); "
              f"model {r['model_gflop']:.1f} GFLOP/step (analytic), XLA cost_analysis {r['xla_gflop']:.1f} GFLOP/step "
              f"-> {r['xla_tflops'] * 1e3:.1f} GFLOP/s\n"
              f"  matmul f32 median (min..max): {mm}\n"
              f"  ratio per round (min..max): {r['ratio_rounds'][0]:.2f}..{r['ratio_rounds'][1]:.2f}", flush=True)

    print()
    header = f"{'model':<9} {'batch':>5} {'step ms':>9} {'model TFLOP/s':>14} {'matmul TFLOP/s':>15} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<9} {r['batch']:>5} {r['step'] * 1e3:>9.0f} {r['model_tflops']:>14.4f} "
              f"{r['mm_tflops']:>15.4f} {r['ratio']:>6.2f}")


if __name__ == "__main__":
    main()
