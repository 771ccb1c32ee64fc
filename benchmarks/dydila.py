"""DyDiLA vs LiT linear attention vs softmax attention: time and memory of one forward+backward of the
token mixer at 256, 1024, 4096 and 16384 tokens, XLA and Pallas paths, printed side by side as ratios.

    python benchmarks/dydila.py                 # default device; Pallas only where it compiles (GPU/TPU)
    python benchmarks/dydila.py --width 384 --heads 2 --batch 4
    python benchmarks/dydila.py --counts        # also print S/B/L/XL parameter counts of the configs

Memory is XLA's compiled temp+argument+output size of the jitted step (``memory_analysis``), so it
is the same number whatever else runs on the machine. Times are the best of a few runs after warm-up.
Softmax attention is the zoo's one ``layers.Attention`` (dense scores); at 16384 tokens it may not
fit, which is printed rather than failing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import layers, lit  # noqa: E402


def _module(kind: str, width: int, heads: int, grid: int, impl: str):
    rngs = nnx.Rngs(0)
    if kind == "softmax":
        return layers.Attention(width, heads, rngs=rngs)
    if kind == "lit":
        return lit.LiTAttention(width, heads, grid_size=grid, impl=impl, rngs=rngs)
    return lit.DyDiLA(width, heads, grid_size=grid, impl=impl, rngs=rngs)


def measure(kind: str, tokens: int, *, width: int, heads: int, batch: int, impl: str, repeats: int = 3):
    grid = int(round(tokens ** 0.5))
    module = _module(kind, width, heads, grid, impl)
    graphdef, params = nnx.split(module)
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, grid * grid, width))

    @jax.jit
    def step(params, x):
        def loss(params, x):
            return jnp.mean(jnp.square(nnx.merge(graphdef, params)(x)))
        return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

    try:
        compiled = step.lower(params, x).compile()
        mem = compiled.memory_analysis()
        mem_bytes = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
                     if mem is not None else float("nan"))
        jax.block_until_ready(compiled(params, x))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(params, x))
            best = min(best, time.perf_counter() - start)
        return best, mem_bytes
    except Exception as e:  # out of memory at long sequences (softmax), or no Pallas lowering here
        return float("nan"), f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"


def counts():
    import importlib

    from trainers.method import ModelDef, get_method

    for size in ("s", "b", "l", "xl"):
        row = []
        for name in ("dit", "lit", "dydi_lit"):
            config = importlib.import_module(f"configs.{name}_{size}").get_config("p2" if name == "dit" else "256")
            md = ModelDef(get_method(config))
            row.append(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(md.abstract_params)) / 1e6)
        print(f"{size.upper():>2}/2: DiT {row[0]:8.2f}M  LiT {row[1]:8.2f}M  DyDi-LiT {row[2]:8.2f}M")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--heads", type=int, default=2, help="linear-attention heads (softmax uses --softmax_heads)")
    ap.add_argument("--softmax_heads", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    ap.add_argument("--counts", action="store_true")
    args = ap.parse_args()
    platform = jax.devices()[0].platform
    impls = ["xla"] + (["pallas"] if platform in ("gpu", "cuda", "tpu") else [])
    print(f"device {jax.devices()[0].device_kind}; width {args.width}, batch {args.batch}; "
          f"linear heads {args.heads}, softmax heads {args.softmax_heads}; forward+backward of one mixer")
    for n in args.tokens:
        t_soft, m_soft = measure("softmax", n, width=args.width, heads=args.softmax_heads, batch=args.batch,
                                 impl="xla")
        line = [f"N={n:6d} softmax {t_soft * 1e3:9.2f} ms {_mib(m_soft)}"]
        for impl in impls:
            t_lit, m_lit = measure("lit", n, width=args.width, heads=args.heads, batch=args.batch, impl=impl)
            t_dy, m_dy = measure("dydila", n, width=args.width, heads=args.heads, batch=args.batch, impl=impl)
            line.append(f"[{impl}] LiT {t_lit * 1e3:8.2f} ms {_mib(m_lit)} DyDiLA {t_dy * 1e3:8.2f} ms {_mib(m_dy)} "
                        f"DyDiLA/LiT time {t_dy / t_lit:5.2f} softmax/DyDiLA time {t_soft / t_dy:6.2f}")
        print("  ".join(line), flush=True)
    if args.counts:
        counts()


def _mib(m):
    return f"({m / 2**20:8.1f} MiB)" if isinstance(m, (int, float)) else f"({m})"


if __name__ == "__main__":
    main()
