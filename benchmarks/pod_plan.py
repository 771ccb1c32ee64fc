"""Pod-scale memory plan: the loop's train step AOT-compiled on a simulated mesh of N CPU devices (nothing is
executed), per-device memory from ``compiled.memory_analysis()`` and the collectives in the compiled HLO,
printed as a table against 16, 32 and 95 GiB of HBM, with the fsdp x tensor layout that fits.

    python benchmarks/pod_plan.py                                   # every model, 64 and 256 devices
    python benchmarks/pod_plan.py --models=xar_b --devices=64 --layouts=64x1,32x2
    python benchmarks/pod_plan.py --models=dit_xl --batch=256      # another global batch

Each device count runs in its own subprocess (``--xla_force_host_platform_device_count`` must be set
before JAX starts). The step is the loop's own (``trainers.train.TrainPlan``: the method's loss, AdamW,
EMA, the shardings of ``trainers/sharding.py``'s logical-axis rules), compiled for the config's compute
dtype (bfloat16 on accelerator configs) at the config's global batch unless ``--batch`` is given.

Columns, per device: ``params``/``opt``/``ema`` are the bytes of that device's shards of the parameters,
the AdamW moments and the EMA (from the state shardings); ``args``/``temp`` are XLA's
``argument_size_in_bytes`` and ``temp_size_in_bytes`` (temp = activations and other live buffers of the
step; the CPU compiler's schedule, so an estimate of an accelerator's); ``total`` = args + temp
(outputs alias the donated state). ``fits`` lists the HBM sizes total stays under. Collectives are
counted by kind in the compiled HLO (all-gather, reduce-scatter, all-reduce, all-to-all,
collective-permute). Layout ``FxT`` = fsdp F x tensor T (data = N / (F T)).

Models: xar_b, xar_l, xar_h (configs/xar_*.py), dit_xl (configs/dit_xl.py:p2), tokenbridge_h
(configs/tokenbridge_h.py, when it exists).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {"xar_b": ("configs.xar_b", None), "xar_l": ("configs.xar_l", None), "xar_h": ("configs.xar_h", None),
          "dit_xl": ("configs.dit_xl", "p2"), "tokenbridge_h": ("configs.tokenbridge_h", None)}
HBM_GIB = (16, 32, 95)
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
GIB = 2 ** 30


def default_layouts(n: int) -> list[tuple[int, int]]:
    """fsdp x tensor candidates: pure FSDP over all devices, then tensor 2/4/8 with FSDP over the rest."""
    return [(n // t, t) for t in (1, 2, 4, 8) if n % t == 0]


def _shard_bytes(tree, shardings) -> int:
    import jax
    import numpy as np

    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
    return total


def plan_one(model: str, fsdp: int, tensor: int, batch: int | None) -> dict:
    """AOT-compile the train step of ``model`` on the current (simulated) devices; no execution."""
    import jax
    import numpy as np

    from trainers import sharding
    from trainers.method import ModelDef, get_method
    from trainers.train import TrainPlan

    module, arg = MODELS[model]
    config = importlib.import_module(module).get_config(arg)
    n = jax.device_count()
    config.mesh.update(data=n // (fsdp * tensor), fsdp=fsdp, tensor=tensor)
    if batch:
        config.batch_size = batch
    mesh = sharding.make_mesh(config.mesh)
    method = get_method(config)
    model_def = ModelDef(method)
    plan = TrainPlan(method, model_def, config)
    abstract = jax.eval_shape(plan.init, jax.random.PRNGKey(0))
    shardings = plan.shardings(abstract, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    m = config.model
    if config.data.latents:
        size, channels = m.input_size, m.in_channels
        key = "latent"
    else:
        size, channels = config.data.image_size, config.data.channels
        key = "image"
    b = config.batch_size
    batch_spec = {key: jax.ShapeDtypeStruct((b, size, size, channels), np.float32,
                                            sharding=sharding.batch_sharding(mesh, 4)),
                  "label": jax.ShapeDtypeStruct((b,), np.int32, sharding=sharding.batch_sharding(mesh, 1))}

    def step(state, batch):
        with sharding.use_mesh(mesh):
            return plan.step(state, batch)

    jitted = jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, sharding.replicated(mesh)),
                     donate_argnums=(0,))
    t0 = time.perf_counter()
    with sharding.use_mesh(mesh):
        compiled = jitted.lower(state, batch_spec).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    collectives = {c: hlo.count(f" {c}(") + hlo.count(f" {c}-start(") for c in COLLECTIVES}
    params = _shard_bytes(abstract["params"], shardings["params"])
    opt = _shard_bytes(abstract["opt_state"], shardings["opt_state"])
    ema = _shard_bytes(abstract["ema_params"], shardings["ema_params"]) if "ema_params" in abstract else 0
    args, temp = int(mem.argument_size_in_bytes), int(mem.temp_size_in_bytes)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
    return dict(model=model, devices=n, fsdp=fsdp, tensor=tensor, data=n // (fsdp * tensor), batch=b,
                dtype=config.compute_dtype, n_params=n_params, params=params, opt=opt, ema=ema, args=args, temp=temp,
                total=args + temp, collectives=collectives, compile_s=compile_s)


def _child(args) -> None:
    """One device count: every model x layout, one JSON line each (errors as lines too)."""
    for model in args.models.split(","):
        module = MODELS[model][0]
        if importlib.util.find_spec(module) is None:
            print(json.dumps({"model": model, "skipped": f"{module.replace('.', '/')}.py does not exist"}), flush=True)
            continue
        n = int(os.environ["POD_PLAN_DEVICES"])
        layouts = ([tuple(int(v) for v in s.split("x")) for s in args.layouts.split(",")] if args.layouts
                   else default_layouts(n))
        for fsdp, tensor in layouts:
            if n % (fsdp * tensor):
                print(json.dumps({"model": model, "devices": n, "fsdp": fsdp, "tensor": tensor,
                                  "error": f"fsdp x tensor = {fsdp * tensor} does not divide {n} devices"}), flush=True)
                continue
            try:
                print(json.dumps(plan_one(model, fsdp, tensor, args.batch)), flush=True)
            except Exception as e:  # a layout the model's shapes do not divide, etc.: report and go on
                print(json.dumps({"model": model, "devices": n, "fsdp": fsdp, "tensor": tensor,
                                  "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}), flush=True)


def _table(rows: list[dict]) -> None:
    header = (f"{'model':<14}{'dev':>5}{'fsdp x tp':>10}{'batch':>6}{'params':>9}{'opt':>9}{'ema':>9}{'args':>9}"
              f"{'temp':>9}{'total':>9}  {'fits (GiB)':<12}collectives (ag/rs/ar/a2a/cp)")
    print(header)
    print("-" * len(header))
    best: dict[tuple, dict] = {}
    for r in rows:
        if "skipped" in r:
            print(f"{r['model']:<14} skipped: {r['skipped']}")
            continue
        if "error" in r:
            print(f"{r['model']:<14}{r['devices']:>5}{r['fsdp']:>6} x {r['tensor']:<2} error: {r['error']}")
            continue
        fits = [g for g in HBM_GIB if r["total"] <= g * GIB]
        c = r["collectives"]
        print(f"{r['model']:<14}{r['devices']:>5}{r['fsdp']:>6} x {r['tensor']:<2}{r['batch']:>6}"
              + "".join(f"{r[k] / GIB:>9.2f}" for k in ("params", "opt", "ema", "args", "temp", "total"))
              + f"  {','.join(map(str, fits)) or 'none':<12}"
              + "/".join(str(c[k]) for k in COLLECTIVES))
        key = (r["model"], r["devices"])
        if key not in best or r["total"] < best[key]["total"]:
            best[key] = r
    print("\nsmallest per-device footprint per model and device count (GiB; sizes in GiB of HBM it fits):")
    for (model, n), r in best.items():
        fits = [g for g in HBM_GIB if r["total"] <= g * GIB]
        print(f"  {model} on {n}: fsdp {r['fsdp']} x tensor {r['tensor']} (data {r['data']}), "
              f"{r['total'] / GIB:.2f} GiB -> fits {fits or 'none of ' + str(HBM_GIB)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--devices", default="64,256", help="simulated device counts")
    parser.add_argument("--layouts", default="", help="FxT list (fsdp x tensor); default: tensor 1, 2, 4, 8")
    parser.add_argument("--batch", type=int, default=0, help="global batch (0 = the config's)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(REPO))
        _child(args)
        return
    rows = []
    for n in (int(v) for v in args.devices.split(",")):
        env = dict(os.environ, POD_PLAN_DEVICES=str(n), JAX_PLATFORMS="cpu",
                   XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip())
        cmd = [sys.executable, __file__, "--child", f"--models={args.models}", f"--layouts={args.layouts}",
               f"--batch={args.batch}"]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode and not lines:
            raise SystemExit(f"pod plan on {n} devices failed:\n{proc.stderr[-3000:]}")
        rows.extend(json.loads(line) for line in lines)
    _table(rows)


if __name__ == "__main__":
    main()
