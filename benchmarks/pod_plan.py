"""Pod-scale memory plan: the loop's train step AOT-compiled on a simulated mesh of N CPU devices (nothing is
executed), per-device memory from ``compiled.memory_analysis()`` and the collectives in the compiled HLO,
printed as a table against 16, 32 and 95 GiB of HBM, with the fsdp x tensor layout that fits.

    python benchmarks/pod_plan.py                                   # every model, 64 and 256 devices
    python benchmarks/pod_plan.py --models=xar_b --devices=64 --layouts=64x1,32x2
    python benchmarks/pod_plan.py --models=dit_xl --batch=256      # another global batch
    python benchmarks/pod_plan.py --models=xar_b --full_depth      # compile every block (slow on CPU)
    python benchmarks/pod_plan.py --json=rows.jsonl                # rows also appended there as they come
    python benchmarks/pod_plan.py --from_json=rows.jsonl           # the table of saved rows

Each device count runs in its own subprocess (``--xla_force_host_platform_device_count`` must be set
before JAX starts). The step is the loop's own (``trainers.train.TrainPlan``: the method's loss, AdamW,
EMA, the shardings of ``trainers/sharding.py``'s logical-axis rules), compiled for the config's compute
dtype (bfloat16 on accelerator configs) at the config's global batch unless ``--batch`` is given.

Depth probe (the default): XLA:CPU takes minutes to partition and compile a 40-block step for 256
devices, so each model is compiled with every block stack at depth 1 and, per stack group, once more
with that group at depth 2; the per-block increments of temp memory and of each collective's count are
extrapolated linearly to the config's depths (``probe`` column: "d1/d2"). Parameters, AdamW moments
and EMA are exact in both modes: they are the full-depth state's shards (shapes only). ``--full_depth``
compiles the real step instead (``probe`` "full"). The children compile with XLA:CPU's LLVM optimisation
off (machine code is never run; memory and collectives are unchanged; ``--no_fast_compile`` keeps it on)
and without its ``cse_barrier_expander`` pass, so that a remat config (``--set model.remat=True``) keeps
its recomputation as an accelerator compiler does.
On xAR-B, 64 x 1, the probe and the full compile agree exactly (temp 19.74 GiB, collectives 141/0/140/5/0).

Columns, per device: ``params``/``opt``/``ema`` are the bytes of that device's shards of the parameters,
the AdamW moments and the EMA (from the state shardings); ``args``/``temp`` are XLA's
``argument_size_in_bytes`` and ``temp_size_in_bytes`` (temp = activations and other live buffers of the
step; the CPU compiler's schedule, so an estimate of an accelerator's); ``total`` = args + temp
(outputs alias the donated state). ``fits`` lists the HBM sizes total stays under. Collectives are
counted by kind in the compiled HLO (all-gather, reduce-scatter, all-reduce, all-to-all,
collective-permute). Layout ``FxT`` = fsdp F x tensor T (data = N / (F T)).

Models: xar_b, xar_l, xar_h (configs/xar_*.py), dit_xl (configs/dit_xl.py:p2), tokenbridge_h
(configs/tokenbridge_h.py, when it exists); ``--models=module[:arg]`` plans any other config
(``--set field=value`` overrides, e.g. the tiny model of tests/test_pod_plan.py).
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
# Block stacks per method (config.model fields): a group's fields hold equal blocks and are probed together.
DEPTH_GROUPS = {"xar": (("encoder_depth", "decoder_depth"),), "dit": (("depth",),),
                "tokenbridge": (("encoder_depth", "decoder_depth"), ("channel_depth",))}
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


def load_config(spec: str, overrides: list[str] | None = None):
    """A config from a MODELS name or ``module[:arg]`` (e.g. ``configs.xar_b:demo``), with ``field=value``
    overrides (trainers.config_validation.set_override)."""
    from trainers import config_validation

    module, arg = MODELS[spec] if spec in MODELS else (spec.partition(":")[0], spec.partition(":")[2] or None)
    config = importlib.import_module(module).get_config(arg)
    for override in overrides or []:
        key, _, value = override.partition("=")
        config_validation.set_override(config, key, value)
    return config


def depth_groups(config) -> list[tuple[str, ...]]:
    """The config's block-stack groups (DEPTH_GROUPS of its method) whose fields it has."""
    groups = DEPTH_GROUPS.get(config.model.name, ())
    return [g for g in groups if all(f in config.model for f in g)]


def compile_step(config, fsdp: int, tensor: int, batch: int | None) -> dict:
    """AOT-compile the loop's train step of ``config`` on the current (simulated) devices; no execution.
    Returns the per-device state shard bytes, XLA's argument/temp bytes and the collectives of the HLO."""
    import jax
    import numpy as np

    from trainers import sharding
    from trainers.method import ModelDef, get_method
    from trainers.train import TrainPlan

    config = config.copy_and_resolve_references()
    n = jax.device_count()
    config.mesh.update(data=n // (fsdp * tensor), fsdp=fsdp, tensor=tensor)
    if batch:
        config.batch_size = batch
    mesh = sharding.make_mesh(config.mesh)
    method = get_method(config)
    method.validate_config(config)
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
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
    return dict(devices=n, fsdp=fsdp, tensor=tensor, data=n // (fsdp * tensor), batch=b,
                dtype=config.compute_dtype, n_params=n_params, params=params, opt=opt, ema=ema,
                args=int(mem.argument_size_in_bytes), temp=int(mem.temp_size_in_bytes),
                collectives=collectives, compile_s=compile_s)


def state_bytes(config, fsdp: int, tensor: int) -> dict:
    """Exact per-device shard bytes of params / AdamW moments / EMA of ``config`` (shapes only, no compile)."""
    import jax
    import numpy as np

    from trainers import sharding
    from trainers.method import ModelDef, get_method
    from trainers.train import TrainPlan

    config = config.copy_and_resolve_references()
    n = jax.device_count()
    config.mesh.update(data=n // (fsdp * tensor), fsdp=fsdp, tensor=tensor)
    mesh = sharding.make_mesh(config.mesh)
    method = get_method(config)
    model_def = ModelDef(method)
    plan = TrainPlan(method, model_def, config)
    abstract = jax.eval_shape(plan.init, jax.random.PRNGKey(0))
    shardings = plan.shardings(abstract, mesh)
    return dict(params=_shard_bytes(abstract["params"], shardings["params"]),
                opt=_shard_bytes(abstract["opt_state"], shardings["opt_state"]),
                ema=_shard_bytes(abstract["ema_params"], shardings["ema_params"]) if "ema_params" in abstract else 0,
                n_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"])))


def plan_one(config, fsdp: int, tensor: int, batch: int | None, *, full_depth: bool = False) -> dict:
    """The per-device plan of ``config``'s train step on ``fsdp x tensor`` (data = the rest of the devices).

    With ``full_depth`` the real step is compiled. Otherwise (the depth probe) each block-stack group is
    compiled at depth 1 and, one group at a time, at depth 2; temp bytes and collective counts are
    extrapolated linearly per block to the config's depths, and the state bytes (params, AdamW, EMA, and
    so XLA's argument bytes) are replaced by the full-depth state's exact shard bytes.
    """
    groups = depth_groups(config)
    if full_depth or not groups:
        row = compile_step(config, fsdp, tensor, batch)
        row["probe"] = "full"
        row["total"] = row["args"] + row["temp"]
        return row

    def with_depths(depths: dict[str, int]):
        c = config.copy_and_resolve_references()
        c.model.update(depths)
        return c

    full = {f: int(config.model[f]) for g in groups for f in g}
    base_depths = {f: 1 for f in full}
    base = compile_step(with_depths(base_depths), fsdp, tensor, batch)
    temp = float(base["temp"])
    coll = {k: float(v) for k, v in base["collectives"].items()}
    compile_s = base["compile_s"]
    for g in groups:
        probe = compile_step(with_depths({**base_depths, **{f: 2 for f in g}}), fsdp, tensor, batch)
        compile_s += probe["compile_s"]
        blocks = full[g[0]] - 1  # fields of one group have equal depths in every config planned here
        if any(full[f] != full[g[0]] for f in g):
            raise ValueError(f"depth probe: the fields {g} of one block stack must have equal depths, got "
                             f"{[full[f] for f in g]} (use --full_depth)")
        temp += blocks * (probe["temp"] - base["temp"])
        for k in coll:
            coll[k] += blocks * (probe["collectives"][k] - base["collectives"][k])
    exact = state_bytes(config, fsdp, tensor)
    args = base["args"] + sum(exact[k] - base[k] for k in ("params", "opt", "ema"))
    row = {**base, **exact, "args": int(args), "temp": int(round(temp)),
           "collectives": {k: int(round(v)) for k, v in coll.items()}, "compile_s": compile_s, "probe": "d1/d2"}
    row["total"] = row["args"] + row["temp"]
    return row


def _child(args) -> None:
    """One device count: every model x layout, one JSON line each (errors as lines too)."""
    n = int(os.environ["POD_PLAN_DEVICES"])
    layouts = ([tuple(int(v) for v in s.split("x")) for s in args.layouts.split(",")] if args.layouts
               else default_layouts(n))
    for model in args.models.split(","):
        module = MODELS[model][0] if model in MODELS else model.partition(":")[0]
        if importlib.util.find_spec(module) is None:
            print(json.dumps({"model": model, "skipped": f"{module.replace('.', '/')}.py does not exist"}), flush=True)
            continue
        config = load_config(model, args.set)
        for fsdp, tensor in layouts:
            head = {"model": model, "devices": n, "fsdp": fsdp, "tensor": tensor}
            if n % (fsdp * tensor):
                print(json.dumps({**head, "error": f"fsdp x tensor = {fsdp * tensor} does not divide {n} devices"}),
                      flush=True)
                continue
            try:
                print(json.dumps({"model": model, **plan_one(config, fsdp, tensor, args.batch,
                                                              full_depth=args.full_depth)}), flush=True)
            except Exception as e:  # a layout the model's shapes do not divide, etc.: report and go on
                print(json.dumps({**head, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}),
                      flush=True)


def fits(row: dict) -> list[int]:
    return [g for g in HBM_GIB if row["total"] <= g * GIB]


def best_layouts(rows: list[dict]) -> dict[tuple, dict]:
    """Per (model, devices): the layout with the smallest per-device total."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if "total" not in r:
            continue
        key = (r["model"], r["devices"])
        if key not in best or r["total"] < best[key]["total"]:
            best[key] = r
    return best


def table(rows: list[dict]) -> str:
    header = (f"{'model':<14}{'dev':>5}{'fsdp x tp':>10}{'batch':>6}{'params':>9}{'opt':>9}{'ema':>9}{'args':>9}"
              f"{'temp':>9}{'total':>9}  {'fits (GiB)':<12}{'probe':<7}collectives (ag/rs/ar/a2a/cp)")
    lines = [header, "-" * len(header)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['model']:<14} skipped: {r['skipped']}")
            continue
        if "error" in r:
            lines.append(f"{r['model']:<14}{r['devices']:>5}{r['fsdp']:>6} x {r['tensor']:<2} error: {r['error']}")
            continue
        c = r["collectives"]
        lines.append(f"{r['model']:<14}{r['devices']:>5}{r['fsdp']:>6} x {r['tensor']:<2}{r['batch']:>6}"
                     + "".join(f"{r[k] / GIB:>9.2f}" for k in ("params", "opt", "ema", "args", "temp", "total"))
                     + f"  {','.join(map(str, fits(r))) or 'none':<12}{r['probe']:<7}"
                     + "/".join(str(c[k]) for k in COLLECTIVES))
    lines.append("\nsmallest per-device footprint per model and device count (GiB; sizes in GiB of HBM it fits):")
    for (model, n), r in best_layouts(rows).items():
        lines.append(f"  {model} ({r['n_params'] / 1e6:.1f}M params, {r['dtype']}) on {n}: fsdp {r['fsdp']} x "
                     f"tensor {r['tensor']} (data {r['data']}), {r['total'] / GIB:.2f} GiB -> fits "
                     f"{fits(r) or 'none of ' + str(HBM_GIB)}")
    if any(r.get("probe") == "d1/d2" for r in rows):
        lines.append("probe d1/d2: compiled with every block stack at depth 1 and each stack once at depth 2; temp "
                     "and collectives extrapolated linearly per block to the full depth; params/opt/ema/args exact. "
                     "Exact without remat (xAR-B 64x1: 12.36 GiB both ways); with --set model.remat=True it reads "
                     "low (xAR-B 1.74 vs 2.34, xAR-L 3.48 vs 6.18 GiB): --full_depth gives the exact number.")
    return "\n".join(lines)


def run(models: str, devices: str, *, layouts: str = "", batch: int = 0, full_depth: bool = False,
        overrides: list[str] | None = None, timeout: float | None = None, fast_compile: bool = True,
        stream: str = "") -> list[dict]:
    """Rows of every model x layout on each simulated device count (one subprocess per count).

    ``fast_compile``: XLA:CPU's LLVM optimisation off (``--xla_backend_optimization_level=0``,
    ``--xla_llvm_disable_expensive_passes``): machine-code quality only; the HLO passes, the buffer
    assignment (memory_analysis) and the collectives are the same. ``stream``: append each row to this
    JSON-lines file as it arrives (``--from_json`` prints a table from it)."""
    rows = []
    # remat (jax.checkpoint) keeps its recomputation apart with optimization barriers; XLA:CPU expands them
    # before CSE, which then merges the recomputation back into the forward and the plan would show no
    # saving (TokenBridge-H, channel depth 2, one device, batch 32: temp 58.8 GiB without remat, 29.0 GiB
    # with it and the expander off, unchanged with it on). Accelerator compilers keep the barriers.
    flags = " --xla_disable_hlo_passes=cse_barrier_expander"
    flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true" if fast_compile else ""
    for n in (int(v) for v in devices.split(",")):
        env = dict(os.environ, POD_PLAN_DEVICES=str(n), JAX_PLATFORMS="cpu",
                   XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
                              + flags).strip())
        cmd = [sys.executable, __file__, "--child", f"--models={models}", f"--layouts={layouts}", f"--batch={batch}"]
        cmd += ["--full_depth"] if full_depth else []
        cmd += [f"--set={o}" for o in overrides or []]
        with subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) as proc:
            found = []
            start = time.monotonic()
            for line in proc.stdout:
                if line.startswith("{"):
                    found.append(json.loads(line))
                    if stream:
                        with open(stream, "a") as f:
                            f.write(line)
                if timeout and time.monotonic() - start > timeout:
                    proc.kill()
                    raise SystemExit(f"pod plan on {n} devices: over {timeout} s")
            stderr = proc.stderr.read()
            proc.wait()
        if proc.returncode and not found:
            raise SystemExit(f"pod plan on {n} devices failed:\n{stderr[-3000:]}")
        rows.extend(found)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated: {', '.join(MODELS)} or config modules module[:arg]")
    parser.add_argument("--devices", default="64,256", help="simulated device counts")
    parser.add_argument("--layouts", default="", help="FxT list (fsdp x tensor); default: tensor 1, 2, 4, 8")
    parser.add_argument("--batch", type=int, default=0, help="global batch (0 = the config's)")
    parser.add_argument("--full_depth", action="store_true", help="compile every block (no depth probe)")
    parser.add_argument("--set", action="append", default=[], help="config override field=value (every model)")
    parser.add_argument("--json", default="", help="append each row to this JSON-lines file as it is planned")
    parser.add_argument("--from_json", default="", help="print the table of a --json file (plans nothing)")
    parser.add_argument("--no_fast_compile", action="store_true",
                        help="keep XLA:CPU's LLVM optimisation on (slower; same memory and collectives)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(REPO))
        _child(args)
        return
    if args.from_json:
        print(table([json.loads(line) for line in Path(args.from_json).read_text().splitlines() if line.strip()]))
        return
    start = time.perf_counter()
    rows = run(args.models, args.devices, layouts=args.layouts, batch=args.batch, full_depth=args.full_depth,
               overrides=args.set, fast_compile=not args.no_fast_compile, stream=args.json)
    print(table(rows))
    print(f"({time.perf_counter() - start:.0f} s, {sum(r.get('compile_s', 0) for r in rows):.0f} s of it compiling)")


if __name__ == "__main__":
    main()
