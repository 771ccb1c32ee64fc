"""DiT train-step efficiency: achieved model FLOP/s of the real train step / this machine's f32 matmul FLOP/s.

    python benchmarks/train_step.py                           # DiT-S (batch 8) and DiT-B (batch 4), 256 tokens
    python benchmarks/train_step.py --models=S --barrier=off,on --steps=3      # before/after the fusion cure
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

What limited the ratio on XLA:CPU (jax 0.10.2, 2 shared cores), and the cure: the backward was ~10x the
forward instead of ~2x and grew faster than linearly with depth. XLA:CPU's instruction fusion never
materialised the residual-stream gradient: to feed each weight-gradient dot a transposed (D, B*T) operand
(``copy_bitcast_fusion``) it duplicated the whole elementwise chain of that gradient (adaLN gates, the
layer-norm backward of every later block) into each copy, O(depth^2) elementwise work (DiT-S/2: fusions of
up to 895 instructions at depth 12; 3.0 G op-elements per step at depth 4). ``lax.optimization_barrier``
does not stop it (XLA:CPU expands barriers before fusion; with ``--xla_disable_hlo_passes=cse_barrier_expander``
it does), nor remat, nor ``--xla_cpu_use_multi_output_fusion``. The cure is ``layers.grad_fusion_barrier``
at each DiT block's input: an identity whose tangent (and so, transposed, the cotangent) passes through a
``lax.cond`` on XLA:CPU (a no-op on other backends); a conditional's operand is a real buffer, so the
residual gradient is computed once per block. ``--barrier=off,on`` runs the step without (the barrier
replaced by the identity) and with it side by side; the script also prints the process CPU seconds per
step, which a loaded machine distorts less than wall time. Measured on this machine at load ~18: DiT-S/2
batch 8, depth 12, whole train step 16.1 / 17.3 s of CPU without, 5.3 / 5.4 s with (two interleaved
pairs); largest fusion 895 -> 269 instructions; compile 130 s -> 43 s; ratio 0.17 -> 0.52. The numerics
are unchanged (every golden fixture passes; the barrier is exactly the identity in value, tangent and
cotangent).

``--torch on`` (default) times diffusers' ``DiTTransformer2DModel`` at the DiT-S/2 size (forward,
backward, grad clip, AdamW, EMA; same batch) and prints our step / its step. ``--torch_ref=PATH`` (a local
checkout of upstream OliverRensu/xAR, which has no package; never downloaded here) times its train step at
256 tokens, depth 8+8 and ``--xar_width`` beside ours; without it the script says that the upstream xAR
step was not timed. Upstream imports ``flash_attn`` (unused by its training forward) and calls
``.cuda()``: on a CPU-only machine the subprocess stands in an empty ``flash_attn`` module and makes
``.cuda()`` the identity. The PyTorch side runs in a subprocess outside the repository (``TorchStepper``),
warmed up, then stepped once per round right after our step, so both sides see the same load: timed one
after the other, a loaded machine made torch look several times slower than it is (its spinning OpenMP
threads suffer more from contention than XLA's), which earlier versions of this script reported as
ratios of 0.39 (DiT) and 0.13 (xAR). ``--xar=off`` skips xAR; ``--xar_barrier=off,on`` compiles it without
and with ``layers.grad_fusion_barrier`` at each block input (no change: largest fusion 423 instructions
either way, so xAR has no barrier); ``--xar_dropout=bernoulli,packed`` compiles it with one
``jax.random.bernoulli`` float per dropout element (as before) and with ``layers.dropout``'s two 16-bit
masks per threefry word, drawn by ``layers.random_bits`` (``jax.random.bits``' words bit for bit, unrolled:
jax lowers threefry on CPU as a rolled loop, a pass over the whole counter array per key-schedule group).
Measured interleaved on the quiet machine (``--models=S --torch_ref=PATH
--xar_dropout=bernoulli,packed --steps=5``): DiT-S/2 2.77 s / diffusers 2.37 s = 1.17 wall, 1.12 CPU;
model FLOP/s / matmul FLOP/s 0.57 (0.59 per CPU-second). xAR (width 128, batch 8): bernoulli 1.00 s /
upstream 0.99 s = 1.02; packed (with the per-entity rows broadcast, ``models.xar.rows_of_entities``)
0.94 s / 1.07 s = 0.89 wall, 0.81 CPU; 0.29 of the matmul FLOP/s. Dropout's 36.3M mask elements take
0.81 s of CPU on their own with bernoulli, 0.49 s packed through ``jax.random.bits``, 0.13-0.17 s packed
through ``layers.random_bits``. With that and ``layers.dense_group`` (SwiGLU's fc1_g and fc1_x as one
682-wide dot, 1.3x the rate of two 341-wide ones), in three runs: xAR 1027 / 1214 ms = 0.85 (0.77 CPU),
975 / 1179 ms = 0.83 (0.76 CPU; ``--steps=12``), 795 / 897 ms = 0.89 (0.82 CPU; same run: bernoulli 0.94,
DiT-S/2 3.35 / 2.93 s = 1.14, 0.52 of the matmul rate); 0.32-0.34 of the matmul FLOP/s. Then attention on
key-prefix runs (``layers.key_prefix_runs``: the entity-causal mask's masked score blocks, 37.5% of them at
4 entities, are skipped, and dropout draws 30.0M mask elements instead of 36.3M; same weights and dropout
masks; -11% in an interleaved A/B with identical loss):
xAR 769 / 1059 ms = 0.73 (0.68 CPU; ``--steps=8``, bernoulli in the same run 0.92) and 773 / 1089 ms =
0.71 (0.68 CPU; ``--steps=12``): the <= 0.8 target is met for xAR. 0.37-0.38 of the matmul FLOP/s in the
dense-score convention (52.1 GFLOP), 0.34 in executed FLOPs (47.2 GFLOP). Then closed-form derivatives in
the shared layers: ``layers.softmax`` (the backward keeps p and computes p (g - sum g p); jax's default
differentiates exp(x - max) / sum and keeps the exponentials and a broadcast 1 / sum of every score
array), ``layers.gelu`` (gelu'(x) recomputed from x in the backward; jax keeps the tanh and its
products, and XLA then computes the output in a second pass), ``layers.split_heads`` (q/k/v split by
``jnp.split``, whose gradient is one concatenate; unpacking the permuted array pads each gradient to the
whole (3, B, H, N, d) and XLA re-reads the three padded copies in each consumer). DiT-S/2's compiled step
then moves 12.49 GB instead of 14.76 GB (``cost_analysis()["bytes accessed"]``; softmax -0.76, split
-0.9, gelu -0.6) with 1,009 MB of temporaries instead of 1,463; interleaved A/B of the four compiled steps
(old, new, old, new; 8 rounds): 0.93 of the step before (0.92 CPU), xAR 0.98; same losses. The run after
(``--models=S --torch_ref=PATH --steps=8``): DiT-S/2 2928 / 2656 ms = 1.10 (1.06 CPU), 0.57 of the matmul
rate (0.59 per CPU-second; per round 0.44..0.61); xAR 897 / 1285 ms = 0.70 (0.67 CPU), 0.40 (0.36 of
executed FLOPs).

The reference line also prints the matmul floor: the model's FLOPs at the run's matmul rate with nothing
else (no softmax, norm, GELU, optimizer), over the reference's step, and the fraction of the matmul rate
that a ratio of 0.8 would need. DiT-S/2: 290.7 GFLOP at 168 GFLOP/s = 1.73 s = 0.59 of diffusers' step,
so 0.8 needs 0.74 of the matmul rate in the whole train step; diffusers itself reaches 0.59 of it (torch's
elementwise kernels are not free either). xAR: floor 0.26-0.31, needs 0.32-0.38 (ours 0.37-0.38). At
width 384 (``--xar_width=384 --xar_heads=6``, 43.6M params): 4.17 / 4.80 s = 0.87 (0.85 CPU), 0.54 of the
matmul rate. In a ``jax.profiler`` trace of the DiT-S/2 step
~2.1 of its 2.8 s are dots (YNNPACK, and Eigen for the transposed-operand weight and attention gradients)
near this machine's matmul rate; the rest are XLA:CPU loop fusions, the larger of which XLA splits in two
across the cores (``outer_dimension_partitions``; 1,030 of xAR's 2,583, nearly all of their time), the
small ones on one thread (the DiT-S/2 step on one core takes 4.8 s, on two 2.9 s; xAR 1.42 s and 1.04 s).
A trace of xAR on two cores puts 0.54 s of its ~1.0 s in the dots at 96 GFLOP/s (the same dots on one
core: 0.80 s at 65 GFLOP/s; isolated, 2048x128x682 runs at 162 GFLOP/s on two cores and 78 on one).
``--xla_flags`` tried without an effect beyond the noise: oneDNN, XNNPACK, YNNPACK fusion types (dot,
eltwise, reduce), fusion emitters off, vector width 512, fast math;
and, interleaved with diffusers (``--models=S --xar=off --steps=3``, ours / diffusers 1.11 without a flag):
``--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME`` 1.19, ``--xla_cpu_scheduler_type=
CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED`` 1.19, ``--xla_cpu_enable_concurrency_optimized_scheduler`` 1.08,
``--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY`` 1.07,
``--xla_cpu_experimental_enable_tiling_propagation`` 1.23: all within this machine's run-to-run spread.
Isolated dots of the DiT-S/2 shapes run at the same rate here and in torch (fc1 forward, its weight
gradient contracting the token axis, its input gradient: 131-168 vs 125-131 GFLOP/s in one run), except
attention's batched dots (B x H = 48 products of 256x64 by 64x256, 10% of the model FLOPs): 53-62 GFLOP/s
(median of 8 rounds) through YNNPACK, 86-87 through Eigen (compiled with an empty
``xla_cpu_experimental_ynn_fusion_type``), torch's ``bmm`` 70-102 (3 rounds, another run). The whole
DiT-S/2 step on Eigen: 0.92 and 0.98 of the YNNPACK step in two interleaved A/Bs, within the spread, and Eigen raises
the 2048^3 reference as well (180 vs 163 GFLOP/s median), so the ratio would not move.
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


def fusion_stats(compiled) -> tuple[int, int]:
    """(instructions in the largest fused computation, instructions in all fused computations) of the
    compiled step's HLO: the load-independent sign of the duplicated-gradient fusions (module docstring)."""
    sizes, current = [], None
    for line in compiled.as_text().splitlines():
        if line.startswith("%") and "fus" in line.split(" ")[0] and line.rstrip().endswith("{"):
            current = 0
        elif current is not None and line.startswith("}"):
            sizes.append(current)
            current = None
        elif current is not None and "=" in line:
            current += 1
    return (max(sizes) if sizes else 0), sum(sizes)


def build(size: str, batch_size: int, remat: bool = False, barrier: bool = True):
    """(compiled train step, state, batch, config, n_params, xla_flops) as the loop builds them.
    ``barrier=False``: the DiT blocks' ``layers.grad_fusion_barrier`` replaced by the identity (the step
    as it was before the cure, for the side-by-side)."""
    from models import layers

    real_barrier = layers.grad_fusion_barrier
    if not barrier:
        layers.grad_fusion_barrier = lambda x: x
    try:
        return _build(size, batch_size, remat)
    finally:
        layers.grad_fusion_barrier = real_barrier


def _build(size: str, batch_size: int, remat: bool):
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
        """Wall seconds of one call; its process CPU seconds are appended to ``run.cpu``."""
        start, cpu_start = time.perf_counter(), time.process_time()
        jax.block_until_ready(f(a, b))
        run.cpu.append(time.process_time() - cpu_start)
        return time.perf_counter() - start

    run.cpu = []
    return run, 2.0 * m * k * n


def cpu_ratio(model_flops: float, step_cpu: float, matmuls: dict) -> float:
    """Model FLOPs per process-CPU second of the step / the best matmul FLOPs per process-CPU second: the
    ratio with the shared machine's load taken out (a descheduled thread costs wall time, not CPU time)."""
    return model_flops / step_cpu / max(flops / float(np.median(run.cpu)) for run, flops in matmuls.values())


def bench(size: str, batch_size: int, steps: int, warmup: int, matmul_reps: int, remat: bool = False,
          barrier: bool = True, ref: TorchStepper | None = None) -> dict:
    compiled, state, batch, config, n_params, xla_flops, compile_s = build(size, batch_size, remat, barrier)
    m = config.model
    tokens = (m.input_size // m.patch_size) ** 2
    model_flops = 3.0 * dit_forward_flops(m) * batch_size
    d = m.hidden_size
    matmuls = {"2048^3": make_matmul(2048, 2048, 2048),
               f"{batch_size * tokens}x{d}x{int(4 * d)}": make_matmul(batch_size * tokens, d, int(m.mlp_ratio * d))}

    for _ in range(max(1, warmup)):  # at least one untimed step (the first call's buffers/donation)
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))

    step_times, cpu_times, mm_rates = [], [], {name: [] for name in matmuls}
    for _ in range(steps):
        for name, (run, flops) in matmuls.items():
            mm_rates[name].extend(flops / run() for _ in range(matmul_reps))
        start, cpu_start = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        step_times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        if ref is not None:
            ref.step()
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
    largest_fusion, fused_total = fusion_stats(compiled)
    ratio_cpu = cpu_ratio(model_flops, float(np.median(cpu_times)), matmuls)
    return dict(ratio_cpu=ratio_cpu, model=f"DiT-{size}/2" + (" remat" if remat else "") + ("" if barrier else " nobarrier"),
                largest_fusion=largest_fusion, fused_total=fused_total,
                cpu_step=float(np.median(cpu_times)), params=n_params, batch=batch_size, tokens=tokens, step=step,
                step_min=float(step_times.min()), step_max=float(step_times.max()),
                model_gflop=model_flops / 1e9, xla_gflop=xla_flops / 1e9, model_tflops=model_flops / step / 1e12,
                xla_tflops=xla_flops / step / 1e12, mm=mm_medians, mm_spread={
                    n: (float(np.min(r)), float(np.max(r))) for n, r in mm_rates.items()},
                mm_best=best_mm, mm_tflops=peak / 1e12, config_model=m, ratio=model_flops / step / peak,
                ratio_rounds=(float(np.min(per_round)), float(np.max(per_round))), compile_s=compile_s, loss=loss,
                ref=ref.take() if ref is not None else None)


# ----------------------------------------------------------------------------- the PyTorch side
# Run in a subprocess whose cwd and sys.path exclude the repository (its top-level ``tokenizers`` package
# would shadow Hugging Face's), with torch limited to this process's cores, on the same random batch shape.
TORCH_DIT = r"""
import json, sys, time
import torch
from diffusers import DiTTransformer2DModel
warmup, batch = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
# DiT-S/2 on 32x32x4 latents (upstream DiT-S: width 384 = 6 heads x 64, depth 12), learn_sigma -> 8 out channels
model = DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8,
                              num_layers=12, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
ema = [p.detach().clone() for p in model.parameters()]
x = torch.randn(batch, 4, 32, 32)
y = torch.randint(0, 1000, (batch,))
def step():
    t = torch.rand(batch) * 1000
    noise = torch.randn_like(x)
    out = model(x + noise, timestep=t, class_labels=y).sample[:, :4]
    loss = torch.mean((out - noise) ** 2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        for e, p in zip(ema, model.parameters()):
            e.mul_(0.9999).add_(p.detach(), alpha=1e-4)
    return float(loss)
for _ in range(warmup):
    step()
# Interleaved with the JAX side: one timed step per "step" line on stdin (TorchStepper).
print(json.dumps({"ready": True, "params": sum(p.numel() for p in model.parameters()),
                  "threads": torch.get_num_threads()}), flush=True)
for line in sys.stdin:
    if line.strip() != "step":
        break
    t0, c0 = time.perf_counter(), time.process_time(); step()
    print(json.dumps({"step": time.perf_counter() - t0, "cpu_step": time.process_time() - c0}), flush=True)
"""


class TorchStepper:
    """The PyTorch side in a subprocess (cwd and sys.path outside the repository, torch limited to this
    process's cores), warmed up, then stepped once per round between our steps: both sides see the same
    load (a shared machine's load swings 2x within minutes; timed one after the other, torch's spinning
    OpenMP threads suffered far more than XLA's under load and made it look several times slower)."""

    def __init__(self, script: str, args: list[str], what: str):
        import subprocess
        import tempfile

        self.what, self.times, self.cpu = what, [], []
        env = dict(os.environ, OMP_NUM_THREADS=str(len(os.sched_getaffinity(0))))
        env.pop("PYTHONPATH", None)
        self._cwd = tempfile.TemporaryDirectory()
        self.proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=self._cwd.name, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        import json

        line = self.proc.stdout.readline()
        while line and not line.startswith("{"):
            line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()[-1500:]
            self.close()
            raise RuntimeError(f"{self.what} failed:\n{err}")
        return json.loads(line)

    def step(self) -> None:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        row = self._read()
        self.times.append(row["step"])
        self.cpu.append(row["cpu_step"])

    def take(self) -> dict:
        """Median wall and process-CPU seconds of the steps since the last take (one row's rounds)."""
        out = {"step": float(np.median(self.times)), "cpu_step": float(np.median(self.cpu)),
               "params": self.info["params"], "threads": self.info["threads"], "steps": len(self.times)}
        self.times, self.cpu = [], []
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except OSError:
                pass
            self.proc.wait(timeout=60)
        self._cwd.cleanup()


def torch_dit_step(warmup: int, batch: int) -> TorchStepper | None:
    """diffusers' DiTTransformer2DModel (DiT-S/2) forward+backward+AdamW+EMA on this CPU, ready to step."""
    try:
        return TorchStepper(TORCH_DIT, [str(warmup), str(batch)], "diffusers DiT reference (is the test extra "
                            "installed?)")
    except RuntimeError as e:
        print(e, flush=True)
        return None


TORCH_XAR = r"""
import json, sys, time, types
sys.path.insert(0, sys.argv[1])  # the user's upstream checkout
import torch
# Upstream models/xar.py imports flash_attn (never called by the training forward, which uses
# F.scaled_dot_product_attention) and moves its label-drop tensors with .cuda(): on a CPU-only machine
# stand in an empty flash_attn module and make .cuda() the identity; nothing else of upstream changes.
if "flash_attn" not in sys.modules:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        empty = types.ModuleType("flash_attn")
        empty.flash_attn_func = None
        sys.modules["flash_attn"] = empty
if not torch.cuda.is_available():
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
from models.xar import xAR
width, heads, batch, warmup = map(int, sys.argv[2:6])
torch.manual_seed(0)
model = xAR(img_size=256, vae_stride=16, patch_size=1, encoder_embed_dim=width, encoder_depth=8,
            encoder_num_heads=heads, decoder_embed_dim=width, decoder_depth=8, decoder_num_heads=heads,
            mlp_ratio=4.0, vae_embed_dim=16, label_drop_prob=0.1, class_num=1000, attn_dropout=0.1,
            proj_dropout=0.1, diffusion_batch_mul=4, clusters=4)
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.96), weight_decay=0.02)
ema = [p.detach().clone() for p in model.parameters()]
x = torch.randn(batch, 16, 16, 16)
y = torch.randint(0, 1000, (batch,))
def step():
    loss = model(x, y)
    loss = loss[0] if isinstance(loss, (tuple, list)) else loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():  # upstream engine_xar.py update_ema
        for e, p in zip(ema, model.parameters()):
            e.mul_(0.9999).add_(p.detach(), alpha=1e-4)
    return float(loss)
for _ in range(warmup):
    step()
# Interleaved with the JAX side: one timed step per "step" line on stdin (TorchStepper).
print(json.dumps({"ready": True, "params": sum(p.numel() for p in model.parameters()),
                  "threads": torch.get_num_threads()}), flush=True)
for line in sys.stdin:
    if line.strip() != "step":
        break
    t0, c0 = time.perf_counter(), time.process_time(); step()
    print(json.dumps({"step": time.perf_counter() - t0, "cpu_step": time.process_time() - c0}), flush=True)
"""


def torch_xar_step(ref_dir: Path, width: int, heads: int, batch: int, warmup: int) -> TorchStepper | None:
    """Upstream xAR (the user's checkout) at 256 tokens, depth 8+8, reduced width, ready to step: its own
    forward (label drop, logit-normal times, 4 cells, Noisy Context Learning loss), backward, clip, AdamW
    (0.9, 0.96) and EMA, as engine_xar.py trains."""
    try:
        return TorchStepper(TORCH_XAR, [str(ref_dir), str(width), str(heads), str(batch), str(warmup)],
                            f"upstream xAR step at {ref_dir}")
    except RuntimeError as e:
        print(e, flush=True)
        return None


def xar_forward_flops(m, layout, executed: bool = False) -> float:
    """Analytic forward FLOPs of one image through XARNet (matmuls + attention; module docstring's convention).

    Per token: z_proj 2 C D, decoder_embed 2 D^2, pred 2 D C, and per block qkv 6 D^2 + proj 2 D^2 + the
    gated MLP (hidden h = int(8 D / 3)) 6 D h; attention 4 T^2 D per block (the dense masked scores, as
    upstream computes them); per entity: adaLN 12 D^2 per block and the time embedder 2*256 D + 2 D^2.
    ``executed``: attention counted over the scores our step computes (``layers.key_prefix_runs``: each
    entity's queries against the keys of its own and earlier entities; 0.625 of T^2 at 4 entities).
    """
    scores = xar_attention_scores(layout) if executed else layout.num_tokens ** 2
    d, c = m.hidden_size, m.in_channels * m.patch_size ** 2
    depth = m.encoder_depth + m.decoder_depth
    h = int(d * m.mlp_ratio * 2 / 3)
    t, e = layout.num_tokens, layout.num_entities
    per_token = 2 * c * d + 2 * d * d + 2 * d * c + depth * (8 * d * d + 6 * d * h)
    per_entity = depth * 12 * d * d + 2 * 256 * d + 2 * d * d
    return float(t * per_token + depth * 4 * scores * d + e * per_entity)


def xar_dropout_draws(width: int, heads: int, batch: int, depth: int = 16, tokens: int = 256,
                      scores: int | None = None) -> int:
    """Bernoulli draws of one xAR train step's dropout (upstream main_mar.py: attention and projection
    dropout 0.1): per block the attention weights (B, H, ``scores``; T^2 dense, fewer where the key-prefix
    runs skip the masked blocks), after the attention projection (B, T, D), after the MLP's gate product
    (B, T, h) and after its fc2 (B, T, D)."""
    h = int(width * 4.0 * 2 / 3)
    scores = tokens * tokens if scores is None else scores
    return depth * batch * (heads * scores + 2 * tokens * width + tokens * h)


def xar_attention_scores(layout=None) -> int:
    """Attention scores per head our xAR step computes at ``layout`` (default: the benchmark's, configs/xar_b.py,
    256 tokens in 4 entities): the key-prefix runs of its entity-causal mask (0.625 of T^2 at 4 entities)."""
    from configs import xar_b
    from models import layers

    mask = (layout or get_method(xar_b.get_config()).layout()).mask()
    runs = layers.key_prefix_runs(mask)
    return sum((b - a) * n for a, b, n in runs) if runs else mask.size


def bernoulli_dropout(x, rate, rng, *, within=None):
    """Dropout as it was before ``layers.dropout`` packed two 16-bit masks per threefry word: one
    ``jax.random.bernoulli`` float per element (the side-by-side of ``--xar_dropout=bernoulli,packed``).
    A window of a larger array (``within``) draws its own elements only, from a key folded with its offset."""
    if rng is None or rate == 0.0:
        return x
    if within is not None:
        rng = jax.random.fold_in(rng, int(np.ravel_multi_index(within[1], within[0])))
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def dropout_draw_cpu_seconds(draws: int, impl: str = "packed", reps: int = 3) -> float:
    """Median process CPU seconds of dropout 0.1 on ``draws`` values of a (draws/256, 256) array:
    ``layers.dropout`` ("packed") or ``bernoulli_dropout``."""
    from models import layers

    fn = {"packed": layers.dropout, "bernoulli": bernoulli_dropout}[impl]
    x = jnp.ones((max(1, draws // 256), 256), jnp.float32)
    f = jax.jit(lambda key: fn(x, 0.1, key))
    key = jax.random.PRNGKey(0)
    jax.block_until_ready(f(key))
    times = []
    for _ in range(reps):
        start = time.process_time()
        jax.block_until_ready(f(key))
        times.append(time.process_time() - start)
    return float(np.median(times))


def xar_bench(width: int, heads: int, batch: int, steps: int, warmup: int, matmul_reps: int,
              barrier: bool = True, dropout_impl: str = "packed", ref: TorchStepper | None = None) -> dict:
    """Our loop's xAR-B-shaped train step (configs/xar_b.py, float32, reduced width), built as ``_build``
    builds DiT's, timed in rounds interleaved with the f32 matmuls (module docstring)."""
    from configs import xar_b
    from models import layers

    config = xar_b.get_config()
    config.compute_dtype = "float32"
    config.model.update(hidden_size=width, num_heads=heads)
    config.batch_size = batch
    mesh = sharding.make_mesh(config.mesh)
    method = get_method(config)
    model_def = ModelDef(method)
    tx, schedule = make_optimizer(config)
    init = _init_fn(model_def, tx, None)
    key = jax.random.PRNGKey(0)
    shardings = state_shardings(jax.eval_shape(init, key), model_def, mesh)
    with sharding.use_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(key)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    train_step = make_train_step(method, model_def, tx, schedule, config.ema_rate)

    def step_fn(state, batch):
        with sharding.use_mesh(mesh):
            return train_step(state, batch)

    p_step = jax.jit(step_fn, in_shardings=(shardings, None), out_shardings=(shardings, sharding.replicated(mesh)),
                     donate_argnums=(0,))
    rng = np.random.default_rng(0)
    data = {"latent": rng.standard_normal((batch, 16, 16, 16), np.float32),
            "label": rng.integers(0, 1000, (batch,)).astype(np.int32)}
    data = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in data.items()}
    from models import xar as xar_model

    real_barrier, real_dropout = layers.grad_fusion_barrier, (layers.dropout, xar_model.dropout)
    if not barrier:
        layers.grad_fusion_barrier = lambda x: x
    if dropout_impl == "bernoulli":
        layers.dropout = xar_model.dropout = bernoulli_dropout
    try:
        t0 = time.perf_counter()
        compiled = p_step.lower(state, data).compile()
        compile_s = time.perf_counter() - t0
    finally:
        layers.grad_fusion_barrier = real_barrier
        layers.dropout, xar_model.dropout = real_dropout
    layout = method.layout()
    tokens = layout.num_tokens
    h = int(width * config.model.mlp_ratio * 2 / 3)
    matmuls = {"2048^3": make_matmul(2048, 2048, 2048),
               f"{batch * tokens}x{width}x{h}": make_matmul(batch * tokens, width, h)}
    for _ in range(max(1, warmup)):
        state, metrics = compiled(state, data)
    jax.block_until_ready((state, metrics))
    times, cpu, rates = [], [], {name: [] for name in matmuls}
    for _ in range(steps):
        for name, (run, flops) in matmuls.items():
            rates[name].extend(flops / run() for _ in range(matmul_reps))
        start, cpu_start = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, data)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        if ref is not None:
            ref.step()
    for name, (run, flops) in matmuls.items():
        rates[name].extend(flops / run() for _ in range(matmul_reps))
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise RuntimeError(f"xAR: non-finite loss {loss}")
    step = float(np.median(times))
    model_flops = 3.0 * xar_forward_flops(config.model, layout) * batch
    executed_flops = 3.0 * xar_forward_flops(config.model, layout, executed=True) * batch
    mm = {name: float(np.median(r)) for name, r in rates.items()}
    peak = max(mm.values())
    largest_fusion, fused_total = fusion_stats(compiled)
    return dict(ref=ref.take() if ref is not None else None,
                ratio_cpu=cpu_ratio(model_flops, float(np.median(cpu)), matmuls),
                model="xAR" + ("" if barrier else " nobarrier") + ("" if dropout_impl == "packed" else f" {dropout_impl}"),
                params=n_params, step=step,
                largest_fusion=largest_fusion, fused_total=fused_total,
                cpu_step=float(np.median(cpu)), model_gflop=model_flops / 1e9, xla_gflop=_xla_flops(compiled) / 1e9,
                mm=mm, mm_tflops=peak / 1e12, model_tflops=model_flops / step / 1e12,
                ratio=model_flops / step / peak, compile_s=compile_s, loss=loss, batch=batch, tokens=tokens,
                executed_gflop=executed_flops / 1e9, executed_ratio=executed_flops / step / peak)


def print_against_reference(ours: dict, name: str) -> None:
    """One line: our step / the PyTorch reference's step, from the steps interleaved with ``ours``' rounds."""
    ref = ours["ref"]
    print(f"\n{ours['model']} batch {ours['batch']}, {ref['steps']} steps interleaved: ours "
          f"{ours['step'] * 1e3:.0f} ms ({ours['params'] / 1e6:.2f}M params) / {name} {ref['step'] * 1e3:.0f} ms "
          f"({ref['params'] / 1e6:.2f}M params, torch {ref['threads']} threads) = {ours['step'] / ref['step']:.2f} "
          f"(target <= 0.8); process CPU time {ours['cpu_step']:.2f} s / {ref['cpu_step']:.2f} s = "
          f"{ours['cpu_step'] / ref['cpu_step']:.2f}; torch model FLOP/s {ours['model_gflop'] / ref['step']:.1f} GFLOP/s",
          flush=True)
    # The floor: every model FLOP at this run's matmul rate and nothing else (no softmax, norm, GELU, optimizer).
    floor_s = ours["model_gflop"] / (ours["mm_tflops"] * 1e3)
    floor = floor_s / ref["step"]
    print(f"  matmul floor: {ours['model_gflop']:.1f} GFLOP at {ours['mm_tflops'] * 1e3:.1f} GFLOP/s = "
          f"{floor_s * 1e3:.0f} ms = {floor:.2f} of {name}'s step; a ratio <= 0.8 needs model FLOP/s >= "
          f"{floor / 0.8:.2f} of the matmul rate ({name}: {ours['model_gflop'] / ref['step'] / (ours['mm_tflops'] * 1e3):.2f})",
          flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="S,B", help="comma-separated DiT sizes: S, B")
    parser.add_argument("--batch_s", type=int, default=8, help="DiT-S batch")
    parser.add_argument("--batch_b", type=int, default=4, help="DiT-B batch")
    parser.add_argument("--steps", type=int, default=4, help="timed train steps (after warmup)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed train steps after compilation")
    parser.add_argument("--matmul_reps", type=int, default=3, help="matmul timings per shape per round")
    parser.add_argument("--remat", default="off",
                        help="model.remat variants to run side by side: off, on or off,on (recompute each "
                             "block in the backward; model FLOPs are counted without the recompute)")
    parser.add_argument("--barrier", default="on",
                        help="layers.grad_fusion_barrier in the DiT blocks: on, off or off,on (side by side; "
                             "off = the step before the XLA:CPU fusion cure)")
    parser.add_argument("--xla_flags", default="",
                        help="extra XLA_FLAGS, applied before the backend starts (e.g. CPU threading flags)")
    parser.add_argument("--torch", default="on", choices=("on", "off"),
                        help="also time diffusers' DiTTransformer2DModel (DiT-S/2, same batch) side by side")
    parser.add_argument("--torch_ref", default="",
                        help="xAR: a local checkout of upstream OliverRensu/xAR (never downloaded by this script) "
                             "to time its train step beside ours at the real sequence length")
    parser.add_argument("--xar_width", type=int, default=128, help="xAR width for the side-by-side (reduced)")
    parser.add_argument("--xar_heads", type=int, default=2)
    parser.add_argument("--xar_batch", type=int, default=8)
    parser.add_argument("--xar", default="on", choices=("on", "off"), help="time our xAR step (and upstream's "
                        "with --torch_ref)")
    parser.add_argument("--xar_barrier", default="on",
                        help="layers.grad_fusion_barrier in the xAR blocks: on, off or off,on (side by side)")
    parser.add_argument("--xar_dropout", default="packed",
                        help="xAR's dropout masks: packed (layers.dropout), bernoulli (one float per element, "
                             "as before), or bernoulli,packed (side by side)")
    args = parser.parse_args()
    if args.torch_ref:
        ref_dir = Path(args.torch_ref).resolve()
        if not (ref_dir / "models" / "xar.py").exists():
            raise SystemExit(f"--torch_ref={ref_dir}: no models/xar.py there; pass a local checkout of upstream "
                             "OliverRensu/xAR")
    xar_dropouts = [v.strip() for v in args.xar_dropout.split(",") if v.strip()]
    if not set(xar_dropouts) <= {"packed", "bernoulli"}:
        parser.error(f"--xar_dropout={args.xar_dropout}: use packed, bernoulli or bernoulli,packed")
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
    barriers = [{"off": False, "on": True}[v.strip()] for v in args.barrier.split(",") if v.strip()]
    dit_ref = torch_dit_step(args.warmup, args.batch_s) if args.torch == "on" and "S" in sizes else None
    for size, remat, barrier in [(s, r, b) for s in sizes for r in variants for b in barriers]:
        r = bench(size, batches[size], args.steps, args.warmup, args.matmul_reps, remat, barrier,
                  dit_ref if size == "S" else None)
        rows.append(r)
        mm = ", ".join(f"{n}: {v / 1e9:.1f} GFLOP/s ({r['mm_spread'][n][0] / 1e9:.1f}..{r['mm_spread'][n][1] / 1e9:.1f})"
                       for n, v in r["mm"].items())
        print(f"{r['model']}: {r['params'] / 1e6:.1f}M params, {r['tokens']} tokens, batch {r['batch']}; "
              f"compile {r['compile_s']:.1f} s; loss {r['loss']:.3f}; largest fusion {r['largest_fusion']} "
              f"instructions ({r['fused_total']} in all fusions)\n"
              f"  step {r['step'] * 1e3:.0f} ms median ({r['step_min'] * 1e3:.0f}..{r['step_max'] * 1e3:.0f}), "
              f"{r['cpu_step']:.2f} s process CPU time; "
              f"model {r['model_gflop']:.1f} GFLOP/step (analytic), XLA cost_analysis {r['xla_gflop']:.1f} GFLOP/step "
              f"-> {r['xla_tflops'] * 1e3:.1f} GFLOP/s\n"
              f"  matmul f32 median (min..max): {mm}\n"
              f"  ratio per round (min..max): {r['ratio_rounds'][0]:.2f}..{r['ratio_rounds'][1]:.2f}; per process-CPU "
              f"second {r['ratio_cpu']:.2f}", flush=True)

    print()
    header = (f"{'model':<19} {'batch':>5} {'step ms':>9} {'CPU s':>6} {'model TFLOP/s':>14} {'matmul TFLOP/s':>15} "
              f"{'ratio':>6} {'CPU-s ratio':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<19} {r['batch']:>5} {r['step'] * 1e3:>9.0f} {r['cpu_step']:>6.2f} {r['model_tflops']:>14.4f} "
              f"{r['mm_tflops']:>15.4f} {r['ratio']:>6.2f} {r['ratio_cpu']:>11.2f}")

    if dit_ref is not None:
        dit_ref.close()
    for ours in (r for r in rows if r["ref"] is not None):
        print_against_reference(ours, "diffusers DiTTransformer2DModel")
    xar_barriers = [{"off": False, "on": True}[v.strip()] for v in args.xar_barrier.split(",") if v.strip()]
    xar_ref = (torch_xar_step(ref_dir, args.xar_width, args.xar_heads, args.xar_batch, args.warmup)
               if args.torch_ref and args.xar == "on" else None)
    xar_rows = [xar_bench(args.xar_width, args.xar_heads, args.xar_batch, args.steps, args.warmup,
                          args.matmul_reps, barrier, impl, xar_ref)
                for barrier in xar_barriers for impl in xar_dropouts] if args.xar == "on" else []
    if xar_ref is not None:
        xar_ref.close()
    if xar_rows:
        draws = xar_dropout_draws(args.xar_width, args.xar_heads, args.xar_batch, scores=xar_attention_scores())
        print(f"\nxAR dropout: {draws / 1e6:.1f}M mask elements per step (attention weights on the key-prefix "
              f"runs) take, on their own, "
              + ", ".join(f"{impl} {dropout_draw_cpu_seconds(draws, impl):.2f} s" for impl in ("bernoulli", "packed"))
              + " of process CPU time (bernoulli: one threefry float per element; packed: layers.dropout, two "
              "16-bit integers per threefry word)", flush=True)
    for r in xar_rows:
        mm = ", ".join(f"{n}: {v / 1e9:.1f} GFLOP/s" for n, v in r["mm"].items())
        print(f"\n{r['model']} (256 tokens, 4 cells of 8x8, depth 8+8, width {args.xar_width}, "
              f"{args.xar_heads} heads, batch {r['batch']}, f32): {r['params'] / 1e6:.1f}M params; "
              f"compile {r['compile_s']:.1f} s; loss {r['loss']:.3f}; largest fusion {r['largest_fusion']} "
              f"instructions ({r['fused_total']} in all fusions)\n"
              f"  step {r['step'] * 1e3:.0f} ms median, {r['cpu_step']:.2f} s process CPU time; model "
              f"{r['model_gflop']:.1f} GFLOP/step (analytic), XLA {r['xla_gflop']:.1f}; matmul f32 median: {mm}\n"
              f"  model FLOP/s / matmul FLOP/s = {r['model_tflops'] * 1e3:.1f} / {r['mm_tflops'] * 1e3:.1f} GFLOP/s "
              f"= {r['ratio']:.2f} (target >= 0.6); per process-CPU second {r['ratio_cpu']:.2f}\n"
              f"  (the model FLOPs count the dense masked attention scores, as upstream computes them; our step "
              f"skips the masked blocks and executes {r['executed_gflop']:.1f} GFLOP: {r['executed_ratio']:.2f} "
              f"of the matmul rate)", flush=True)
    if xar_rows and args.torch_ref:
        for ours in (r for r in xar_rows if r["ref"] is not None):
            print_against_reference(ours, "upstream xAR")
    elif xar_rows:
        print("\nxAR: no --torch_ref=PATH given (a local checkout of upstream OliverRensu/xAR, which has no "
              "package); the upstream xAR step is not timed")

if __name__ == "__main__":
    main()
