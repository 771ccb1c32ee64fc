"""SplitMeanFlow vs MeanFlow: train-step time and peak memory, and few-step MNIST-FID at one budget.

    python benchmarks/meanflow.py step [--size=B/4] [--batch=8] [--steps=4]
    python benchmarks/meanflow.py fid [--num_steps=400] [--num_samples=500] [--out=DIR]

``step``: the loop's own train step (``trainers.train.make_train_step``: the objective, Adam, EMA),
jitted with the state's shardings and donated, for ``configs/{meanflow,splitmeanflow}_<size>.py`` on
random 32x32x4 latents; the two methods' steps are interleaved (same machine load) and the medians
are printed with their ratio. Peak memory is XLA's buffer assignment of the compiled step
(``memory_analysis()``: temporaries + arguments + outputs - aliased), which on every backend is what
the step needs. The paper's claim: no JVP makes SplitMeanFlow cheaper (MeanFlow's jvp carries a
tangent through every layer and keeps its residuals for the backward; SplitMeanFlow adds two no-grad
forwards on the split rows only).

``fid``: the embedded-digit demos (``configs/splitmeanflow_b4.py:demo``, ``configs/meanflow_b4.py:demo``
and the flow-matching DiT ``configs/dit_s.py:sit,demo``, the same network size) trained for the same
number of steps through ``trainers.train``, then MNIST-feature FID (eval/domain.py) of
``--num_samples`` samples (raw params, or ``--ema``) at 1, 2 and 4 steps (flow matching: Euler at 1, 2, 4 and 50 steps, CFG
2.0 as its demo); prints one table and writes ``fid_<methods>.json`` in ``--out``.

Measured on this project's shared 2-core CPU box (load ~20; jax 0.10.2), to be redone on an accelerator:

* ``step --size=B/4 --batch=8 --depth=4 --steps=3``: MeanFlow 17.6 s, SplitMeanFlow 14.3 s per step
  (0.81x); peak memory of the compiled step 940 vs 916 MiB (0.97x; params, EMA and Adam state
  dominate), temporaries 236 vs 211 MiB (0.89x). Both B/4 configs fold CFG with kappa > 0 (two
  guidance forwards); SplitMeanFlow runs them on its boundary half only.
* ``fid --num_steps=300 --fid_batch=32 --fid_width=64 --fid_depth=3 --num_samples=300`` (raw params):
  MNIST-feature FID at 1 / 2 / 4 NFE: SplitMeanFlow 782.9 / 545.8 / 486.8, MeanFlow 709.6 / 512.3 /
  466.7, flow matching (Euler) 1065.7 / 719.8 / 586.2, and 505.1 at 50 NFE. At this (tiny) budget
  both one-step models beat one-step flow matching, more steps help both, and their 4-step samples
  beat 50-step flow matching; MeanFlow is ahead of SplitMeanFlow at every step count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers import sharding  # noqa: E402
from trainers.method import ModelDef, get_method  # noqa: E402
from trainers.optim import make_optimizer  # noqa: E402
from trainers.train import _init_fn, make_train_step, state_shardings  # noqa: E402

FILES = {"B/4": "b4", "B/2": "b2", "M/2": "m2", "L/2": "l2", "XL/2": "xl2"}


def load_config(name: str, size: str, arg=None):
    import importlib

    return importlib.import_module(f"configs.{name}_{FILES[size]}").get_config(arg)


def build_step(name: str, size: str, batch: int, depth: int | None):
    config = load_config(name, size)
    config.batch_size = batch
    if depth:
        config.model.depth = depth
    mesh = sharding.make_mesh(config.mesh)
    method = get_method(config)
    model_def = ModelDef(method)
    tx, schedule = make_optimizer(config)
    init = _init_fn(model_def, tx, None)
    key = jax.random.PRNGKey(0)
    shardings = state_shardings(jax.eval_shape(init, key), model_def, mesh)
    with sharding.use_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(key)
    train_step = make_train_step(method, model_def, tx, schedule, config.ema_rate)

    def step_fn(state, batch):
        with sharding.use_mesh(mesh):
            return train_step(state, batch)

    m = config.model
    rng = np.random.default_rng(0)
    host = {"latent": rng.standard_normal((batch, m.input_size, m.input_size, m.in_channels), np.float32),
            "label": rng.integers(0, m.num_classes, (batch,)).astype(np.int32)}
    data = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in host.items()}
    jitted = jax.jit(step_fn, in_shardings=(shardings, None), out_shardings=(shardings, sharding.replicated(mesh)),
                     donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = jitted.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes) if mem is not None else float("nan")
    temp = mem.temp_size_in_bytes if mem is not None else float("nan")
    return {"compiled": compiled, "state": state, "data": data, "peak": peak, "temp": temp, "compile_s": compile_s}


def bench_step(args) -> dict:
    runs = {name: build_step(name, args.size, args.batch, args.depth) for name in ("meanflow", "splitmeanflow")}
    for r in runs.values():
        for _ in range(args.warmup):
            r["state"], metrics = r["compiled"](r["state"], r["data"])
        jax.block_until_ready(r["state"])
    times = {name: [] for name in runs}
    for _ in range(args.steps):  # interleaved: both see the same load
        for name, r in runs.items():
            start = time.perf_counter()
            r["state"], metrics = r["compiled"](r["state"], r["data"])
            jax.block_until_ready((r["state"], metrics))
            times[name].append(time.perf_counter() - start)
            if not np.isfinite(float(metrics["loss"])):
                raise RuntimeError(f"{name}: non-finite loss")
    out = {"size": args.size, "batch": args.batch, "depth": args.depth, "backend": jax.default_backend()}
    for name, r in runs.items():
        t = np.asarray(times[name])
        out[name] = {"step_s": float(np.median(t)), "step_min": float(t.min()), "step_max": float(t.max()),
                     "peak_mib": r["peak"] / 2 ** 20, "temp_mib": r["temp"] / 2 ** 20, "compile_s": r["compile_s"]}
    out["time_ratio_split_over_meanflow"] = out["splitmeanflow"]["step_s"] / out["meanflow"]["step_s"]
    out["peak_ratio_split_over_meanflow"] = out["splitmeanflow"]["peak_mib"] / out["meanflow"]["peak_mib"]
    out["temp_ratio_split_over_meanflow"] = out["splitmeanflow"]["temp_mib"] / out["meanflow"]["temp_mib"]
    print(f"{args.size} batch {args.batch} on {out['backend']}" + (f" (depth {args.depth})" if args.depth else ""))
    for name in runs:
        o = out[name]
        print(f"  {name:14s} step {o['step_s']:.3f} s ({o['step_min']:.3f}..{o['step_max']:.3f})  "
              f"peak {o['peak_mib']:.0f} MiB (temporaries {o['temp_mib']:.0f} MiB)")
    print(f"  SplitMeanFlow / MeanFlow: time {out['time_ratio_split_over_meanflow']:.2f}x, peak memory "
          f"{out['peak_ratio_split_over_meanflow']:.2f}x, temporaries {out['temp_ratio_split_over_meanflow']:.2f}x")
    return out


def bench_fid(args) -> dict:
    import jax.numpy as jnp

    from eval import harness
    from trainers import train
    from trainers.sample import grid_labels, images_to_uint8

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = {"splitmeanflow": ("configs.splitmeanflow_b4", "demo", [1, 2, 4], {}),
            "meanflow": ("configs.meanflow_b4", "demo", [1, 2, 4], {}),
            "flow_matching": ("configs.dit_s", "sit,demo", [1, 2, 4, 50], {"method": "euler"})}
    runs = {k: v for k, v in runs.items() if k in args.methods.split(",")}
    reference = None
    results = {}
    for name, (module, variant, step_counts, extra) in runs.items():
        import importlib

        config = importlib.import_module(module).get_config(variant)
        config.num_steps = args.num_steps
        config.batch_size = args.fid_batch
        config.model.update(hidden_size=args.fid_width, depth=args.fid_depth)
        config.optim.warmup_steps = min(config.optim.warmup_steps, args.num_steps // 4)
        config.checkpoint_every = args.num_steps
        config.eval.num_samples = 0
        config.num_grid_samples = 0
        config.log_every = max(1, args.num_steps // 4)
        t0 = time.perf_counter()
        state = train.train_and_evaluate(config, str(out_dir / name))
        train_s = time.perf_counter() - t0
        if reference is None:
            reference = train.dataset_images(config, args.num_samples, seed=17)
        method = get_method(config)
        model_def = ModelDef(method)
        # The demos' EMA (0.995) still holds ~1/4 of the initial weights after 300 steps: short budgets
        # sample the raw params (--ema to use the EMA).
        params_key = "ema_params" if args.ema else "params"
        labels = jnp.asarray(grid_labels(args.num_samples, config.data.num_classes), jnp.int32)
        scores = {}
        for k in step_counts:
            # SiT's fixed-step ODE takes num_steps grid points (num_steps - 1 Euler steps): k NFE = k + 1.
            steps = k + 1 if name == "flow_matching" else k
            fn = jax.jit(lambda p, r, rng, y, n=steps: method.sample(model_def.merge(p, r), rng, y, num_steps=n,
                                                                     **extra))
            chunks = [fn(state[params_key], state["rest"], jax.random.PRNGKey(i), labels[i:i + 100])
                      for i in range(0, args.num_samples, 100)]
            images = images_to_uint8(np.concatenate([np.asarray(c) for c in chunks]))
            s = harness.evaluate(images, dataset_images=reference, domain=True)
            scores[k] = float(s["mnist_fid"])
        results[name] = {"train_s": train_s, "mnist_fid": scores}
        print(f"{name}: trained {args.num_steps} steps in {train_s:.0f} s; MNIST-FID by steps: {scores}", flush=True)
    (out_dir / f"fid_{'_'.join(results)}.json").write_text(json.dumps(results, indent=2))
    print(f"\nMNIST-feature FID ({args.num_samples} samples; {args.num_steps} train steps, batch {args.fid_batch}, "
          f"width {args.fid_width}, depth {args.fid_depth})")
    print("method          " + "".join(f"{k:>9}" for k in (1, 2, 4, 50)))
    for name, r in results.items():
        print(f"{name:16s}" + "".join(f"{r['mnist_fid'][k]:9.2f}" if k in r["mnist_fid"] else f"{'-':>9}"
                                      for k in (1, 2, 4, 50)))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["step", "fid"])
    parser.add_argument("--size", default="B/4", choices=list(FILES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--depth", type=int, default=0, help="override the depth (0 = the config's)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--num_steps", type=int, default=400, help="fid: train steps per method")
    parser.add_argument("--num_samples", type=int, default=500, help="fid: samples per score")
    parser.add_argument("--fid_batch", type=int, default=64, help="fid: batch (the demos' 64)")
    parser.add_argument("--fid_width", type=int, default=96, help="fid: width of all three (the demos' 96)")
    parser.add_argument("--fid_depth", type=int, default=4, help="fid: depth of all three (the demos' 4)")
    parser.add_argument("--methods", default="splitmeanflow,meanflow,flow_matching", help="fid: which to run")
    parser.add_argument("--ema", action="store_true", help="fid: sample the EMA params (default: raw params)")
    parser.add_argument("--out", default="/tmp/meanflow_bench", help="fid: workdirs and fid.json")
    args = parser.parse_args()
    bench_step(args) if args.mode == "step" else bench_fid(args)


if __name__ == "__main__":
    main()
