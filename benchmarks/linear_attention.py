"""Linear vs softmax attention time at N = 1k, 4k, 16k (d = 64), printed as ratios.

    python benchmarks/linear_attention.py            # default device, impl="auto"
    python benchmarks/linear_attention.py --gpu      # also: kernel vs XLA and HBM bandwidth (GPU)

The linear path must scale about linearly: time(N=16k) / time(N=1k) <= 20
(a quadratic path would give 256). ``--gpu`` times the non-causal Pallas kernel
against the jnp (XLA) path at N=4096, d=64/128, bf16, reports the fraction of
the device's HBM bandwidth it reaches, and checks the quantizer's golden
fixture with the compiled GPU kernel.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels.linear_attention import linear_attention  # noqa: E402

HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def _time(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def softmax_attention(q, k, v, query_block=1024):
    """Exact softmax attention, over query blocks so the N x N scores never sit in memory at once."""
    b, h, n, d = q.shape
    blocks = q.reshape(b, h, n // query_block, query_block, d).transpose(2, 0, 1, 3, 4)

    def one(qb):
        scores = jnp.einsum("bhnd,bhmd->bhnm", qb, k).astype(jnp.float32) / np.sqrt(d)
        return jnp.einsum("bhnm,bhme->bhne", jax.nn.softmax(scores, -1).astype(v.dtype), v)

    return jax.lax.map(one, blocks).transpose(1, 2, 0, 3, 4).reshape(b, h, n, -1)


def _inputs(b, h, n, d, dtype, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.nn.relu(jax.random.normal(keys[0], (b, h, n, d))).astype(dtype)
    k = jax.nn.relu(jax.random.normal(keys[1], (b, h, n, d))).astype(dtype)
    v = jax.random.normal(keys[2], (b, h, n, d)).astype(dtype)
    return q, k, v


def scaling(batch: int, heads: int, impl: str, dtype) -> float:
    d = 64
    sizes = (1024, 4096, 16384)
    linear = jax.jit(lambda q, k, v: linear_attention(q, k, v, impl=impl))
    softmax = jax.jit(softmax_attention)
    times = {}
    print(f"device {jax.devices()[0].device_kind}, batch {batch}, heads {heads}, d {d}, {jnp.dtype(dtype).name}, impl {impl}")
    for n in sizes:
        q, k, v = _inputs(batch, heads, n, d, dtype)
        t_lin = _time(linear, q, k, v)
        t_soft = _time(softmax, q, k, v)
        times[n] = t_lin
        print(f"N={n:6d}  linear {t_lin * 1e3:9.3f} ms  softmax {t_soft * 1e3:10.3f} ms  "
              f"softmax/linear {t_soft / t_lin:8.2f}")
    ratio = times[16384] / times[1024]
    print(f"linear N=16k / N=1k time ratio: {ratio:.2f} (must be <= 20; quadratic would be 256)")
    print(f"linear N=4k / N=1k time ratio: {times[4096] / times[1024]:.2f}")
    return ratio


def gpu_check(golden_dir):
    kind = jax.devices()[0].device_kind
    peak = next((bw for name, bw in HBM_BYTES_PER_S.items() if name in kind), None)
    b, h, n = 4, 16, 4096
    for d in (64, 128):
        q, k, v = _inputs(b, h, n, d, jnp.bfloat16)
        kernel = jax.jit(lambda q, k, v: linear_attention(q, k, v, impl="pallas"))
        xla = jax.jit(lambda q, k, v: linear_attention(q, k, v, impl="xla"))
        err = float(jnp.max(jnp.abs(kernel(q, k, v).astype(jnp.float32) - xla(q, k, v).astype(jnp.float32))))
        t_kernel, t_xla = _time(kernel, q, k, v, repeats=20), _time(xla, q, k, v, repeats=20)
        # Minimum HBM traffic of the two kernel passes: read k, v; read q; write o (+ f32 den).
        moved = 4 * b * h * n * d * 2 + b * h * n * 4
        line = (f"non-causal bf16 b{b} h{h} N{n} d{d}: kernel {t_kernel * 1e6:8.1f} us, xla {t_xla * 1e6:8.1f} us, "
                f"xla/kernel {t_xla / t_kernel:5.2f}, {moved / t_kernel / 1e9:7.1f} GB/s")
        if peak:
            line += f" = {moved / t_kernel / peak:5.1%} of {kind} HBM peak {peak / 1e12:.2f} TB/s"
        print(line + f", max|kernel-xla| {err:.3e}")
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(linear_attention(q, k, v, impl="pallas").astype(jnp.float32)),
                                argnums=(0, 1, 2)))
        grad_xla = jax.jit(jax.grad(lambda q, k, v: jnp.sum(linear_attention(q, k, v, impl="xla").astype(jnp.float32)),
                                    argnums=(0, 1, 2)))
        print(f"  fwd+bwd: kernel {_time(grad, q, k, v) * 1e6:8.1f} us, xla {_time(grad_xla, q, k, v) * 1e6:8.1f} us")
        causal = jax.jit(lambda q, k, v: linear_attention(q, k, v, causal=True, impl="pallas"))
        causal_xla = jax.jit(lambda q, k, v: linear_attention(q, k, v, causal=True, impl="xla"))
        err_c = float(jnp.max(jnp.abs(causal(q, k, v).astype(jnp.float32) - causal_xla(q, k, v).astype(jnp.float32))))
        print(f"  causal: kernel {_time(causal, q, k, v) * 1e6:8.1f} us, xla {_time(causal_xla, q, k, v) * 1e6:8.1f} us, "
              f"max|kernel-xla| {err_c:.3e}")
    golden = Path(golden_dir) / "tokenbridge_quant.npz"
    if golden.exists():
        from pallas_kernels import dimwise_quant

        data = np.load(golden)
        idx, deq = jax.jit(lambda x: dimwise_quant.dimwise_quantize(x, impl="pallas"))(jnp.asarray(data["in/x"]))
        print(f"dimwise_quantize GPU kernel on tokenbridge_quant: {int(np.sum(np.asarray(idx) != data['out/indices']))} "
              f"index mismatches, max|dequant err| {float(np.max(np.abs(np.asarray(deq) - data['out/dequant']))):.3e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gpu", action="store_true", help="kernel vs XLA and HBM bandwidth on a GPU")
    parser.add_argument("--impl", default="auto", choices=["auto", "pallas", "xla"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--golden", default=str(Path(__file__).resolve().parents[2] / "shared" / "golden"),
                        help="folder holding tokenbridge_quant.npz (checked with the GPU kernel)")
    args = parser.parse_args()
    dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    ratio = scaling(args.batch, args.heads, args.impl, dtype)
    if args.gpu:
        gpu_check(args.golden)
    return 0 if ratio <= 20 else 1


if __name__ == "__main__":
    sys.exit(main())
