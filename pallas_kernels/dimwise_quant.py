"""TokenBridge dimension-wise post-training quantization: jnp reference and Pallas kernel.

TokenBridge (YuqingWang1029/TokenBridge, ``reconstruction.py::post_training_quantize``
and ``models/tokenbridge.py::TokenBridge.quantize``) quantizes every channel of a
continuous latent on its own:

    x_n   = clamp((x - min_range) / (max_range - min_range) * (2 std) - std, -std, std)
    b_i   = clamp(Phi^-1(i / 2^bits), -std, std),             i = 0 .. 2^bits
    r_i   = E[X | b_i < X < b_{i+1}],  X ~ N(0, 1)             (truncated-normal mean)
    index = argmin_i |x_n - r_i|        (first index on ties, like torch.argmin)
    dequant = ((r + std) / (2 std) * (max_range - min_range) + min_range)[index]

Exactness. Upstream builds the tables in float32 torch, one scalar op at a time;
``gaussian_quantization_table`` replays that op order with every op correctly
rounded to float32 (each computed in float64 and rounded), which is
bit-identical to upstream's torch table for bits <= 7 (checked against torch for
std 2.5/3/4; at 8+ bits torch's float32 exp/erf are not correctly rounded and a
few entries differ in the last bit; pass upstream's ``reconstruction_values``
buffer from a checkpoint then). The input side keeps upstream's float32 order
(true division, then the multiply, then the subtraction), guarded against the
two compiler rewrites that change it: XLA turns ``x / scalar`` into ``x * (1 /
scalar)`` (blocked with an optimization barrier on the divisor) and LLVM/PTX
fuse ``t * c - std`` into one FMA (``t * (2 std)`` is computed as ``2 (t * std)``,
exact whatever is fused; on GPU the ops are explicit round-to-nearest PTX).

Layout: any shape; the quantizer is elementwise (one scalar per latent channel
value). Indices are int32 (upstream int64).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton
from scipy import special

Scheme = Literal["gaussian", "uniform"]
Impl = Literal["auto", "pallas", "xla"]
Variant = Literal["triton", "mosaic_tpu"]

_F32 = np.float32
_LANES = 128


# --------------------------------------------------------------------------- tables (float32, numpy)


def _r(value) -> np.float32:
    """Round a float64 result to float32: one correctly rounded float32 op."""
    return _F32(value)


def _torch_linspace01(steps: int) -> np.ndarray:
    """torch.linspace(0, 1, steps, float32): first half start + i*step, second half end - (steps-1-i)*step."""
    step = _r(1.0 / (steps - 1))
    halfway = steps // 2
    out = [_r(float(_r(i)) * float(step)) if i < halfway
           else _r(1.0 - float(_r(float(_r(steps - 1 - i)) * float(step)))) for i in range(steps)]
    return np.asarray(out, _F32)


def _truncated_normal_mean(a: np.float32, b: np.float32) -> np.float32:
    """E[X | a < X < b] for X ~ N(0,1) in upstream's float32 op order (reconstruction.py)."""
    sqrt_2 = float(_r(math.sqrt(2.0)))  # python float scalars enter torch float32 ops rounded
    sqrt_2pi = float(_r(math.sqrt(2.0 * math.pi)))

    def pdf(t):
        return _r(float(_r(math.exp(float(_r(-0.5 * float(_r(float(t) * float(t)))))))) / sqrt_2pi)

    def cdf(t):
        return _r(0.5 * float(_r(1.0 + float(_r(math.erf(float(_r(float(t) / sqrt_2))))))))

    denominator = _r(float(cdf(b)) - float(cdf(a)))
    if denominator == 0:
        denominator = _r(1e-10)
    return _r(float(_r(float(pdf(a)) - float(pdf(b)))) / float(denominator))


def gaussian_quantization_table(bits: int, std_range: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """TokenBridge's Gaussian-quantile table: (boundaries (2^bits+1,), reconstruction_values (2^bits,)).

    Both float32 in normalised N(0,1) space. The boundaries only define the
    reconstruction values; the quantizer picks the nearest reconstruction value.
    """
    n = 2 ** int(bits)
    probs = _torch_linspace01(n + 1)
    # norm.ppf runs in float64 on the float32 probabilities, then is stored as float32 (upstream).
    std = _r(std_range)
    boundaries = np.clip(special.ndtri(probs.astype(np.float64)).astype(_F32), -std, std)
    values = np.asarray([_truncated_normal_mean(boundaries[i], boundaries[i + 1]) for i in range(n)], _F32)
    return boundaries, values


def uniform_quantization_table(bits: int, std_range: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Uniform variant (the paper's baseline): 2^bits equal bins on [-std, std], midpoints as values."""
    n = 2 ** int(bits)
    boundaries = np.linspace(-std_range, std_range, n + 1).astype(_F32)
    values = ((boundaries[:-1].astype(np.float64) + boundaries[1:]) / 2).astype(_F32)
    return boundaries, values


def dequantization_values(reconstruction_values, min_range: float, max_range: float,
                          std_range: float) -> np.ndarray:
    """Input-space value of every level: ((r + std) / (2 std)) * (max - min) + min, float32 ops."""
    r = np.asarray(reconstruction_values, _F32)
    # Scalars are combined in python floats, then enter float32 ops (torch's scalar promotion).
    return (r + _r(std_range)) / _r(2 * std_range) * _r(max_range - min_range) + _r(min_range)


def _table(bits, std_range, scheme, reconstruction_values):
    if reconstruction_values is not None:
        return np.asarray(reconstruction_values, _F32)
    if scheme == "gaussian":
        return gaussian_quantization_table(bits, std_range)[1]
    if scheme == "uniform":
        return uniform_quantization_table(bits, std_range)[1]
    raise ValueError(f"scheme must be 'gaussian' or 'uniform', got {scheme!r}")


# --------------------------------------------------------------------------- normalisation


def _scalars(min_range, max_range, std_range) -> np.ndarray:
    """(min, max - min, std) as float32, the values upstream's float32 ops see."""
    return np.asarray([_r(min_range), _r(max_range - min_range), _r(std_range)], _F32)


def _normalize_xla(x, lo, span, std, barrier: bool):
    """x_n in upstream's op order; on XLA the divisor is fenced so x / span stays a division."""
    x = x.astype(jnp.float32)
    if barrier:  # constant scalars would let XLA fold (t * std) * 2 into t * (2 std) and fuse an FMA
        lo, span, std = lax.optimization_barrier((lo, span, std))
    divisor = jnp.broadcast_to(span, x.shape)
    if barrier:
        divisor = lax.optimization_barrier(divisor)
    t = (x - lo) / divisor
    # t * (2 std) == 2 * (t * std) exactly; the doubling is exact even if fused with "- std".
    xn = (t * std) * 2.0 - std
    return jnp.clip(xn, -std, std)


_PTX = {"sub": "sub.rn.f32 $0, $1, $2;", "div": "div.rn.f32 $0, $1, $2;",
        "mul": "mul.rn.f32 $0, $1, $2;"}


def _ptx(op, a, b):
    (out,) = pltriton.elementwise_inline_asm(
        _PTX[op], args=[a, b], constraints="=r,r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])
    return out


def _normalize_ptx(x, lo, span, std):
    """Same op order with explicit round-to-nearest PTX ops (never contracted, IEEE division)."""
    x = x.astype(jnp.float32)
    full = lambda s: jnp.full(x.shape, s, jnp.float32)
    t = _ptx("div", _ptx("sub", x, full(lo)), full(span))
    xn = _ptx("sub", _ptx("mul", t, full(std + std)), full(std))
    return jnp.clip(xn, -std, std)


def normalize(x, *, min_range: float = -5.0, max_range: float = 5.0, std_range: float = 3.0):
    """Upstream's x_normalized.clamp(-std, std): (any shape) -> float32, same shape."""
    lo, span, std = (jnp.asarray(s) for s in _scalars(min_range, max_range, std_range))
    return _normalize_xla(x, lo, span, std, barrier=True)


# --------------------------------------------------------------------------- reference


def dimwise_quantize_reference(x, reconstruction_values, *, min_range: float = -5.0,
                               max_range: float = 5.0, std_range: float = 3.0):
    """Defining jnp implementation: (indices int32, dequant float32), both x's shape.

    reconstruction_values: a concrete (levels,) float32 table (numpy or a non-traced array).
    """
    xn = normalize(x, min_range=min_range, max_range=max_range, std_range=std_range)
    indices = jnp.argmin(jnp.abs(xn[..., None] - jnp.asarray(reconstruction_values, jnp.float32)),
                         axis=-1).astype(jnp.int32)
    return indices, dequantize(indices, reconstruction_values, min_range=min_range,
                               max_range=max_range, std_range=std_range)


def dequantize(indices, reconstruction_values, *, min_range: float = -5.0, max_range: float = 5.0,
               std_range: float = 3.0):
    """Indices (any shape, int) -> input-space float32 values."""
    values = dequantization_values(reconstruction_values, min_range, max_range, std_range)
    return jnp.asarray(values)[indices]


# --------------------------------------------------------------------------- kernel


def _quant_kernel(params_ref, x_ref, idx_ref, deq_ref, *, table, values, variant, interpret):
    lo, span, std = params_ref[0], params_ref[1], params_ref[2]
    x = x_ref[...]
    if variant == "triton" and not interpret:
        xn = _normalize_ptx(x, lo, span, std)
    else:
        # XLA (interpret mode) rewrites scalar division; Mosaic has no such rewrite to fence.
        xn = _normalize_xla(x, lo, span, std, barrier=interpret)
    # Linear scan in level order with a strict "<": the first index wins ties, as torch.argmin.
    best_d = jnp.abs(xn - table[0])
    best_i = jnp.zeros(x.shape, jnp.int32)
    best_v = jnp.full(x.shape, values[0], jnp.float32)
    for i in range(1, len(table)):
        d = jnp.abs(xn - table[i])
        closer = d < best_d
        best_d = jnp.where(closer, d, best_d)
        best_i = jnp.where(closer, jnp.int32(i), best_i)
        best_v = jnp.where(closer, jnp.float32(values[i]), best_v)
    idx_ref[...] = best_i
    deq_ref[...] = best_v.astype(deq_ref.dtype)


def _quantize_pallas(variant: Variant, interpret: bool, x, *, table, min_range, max_range, std_range,
                     block_rows):
    shape, size = x.shape, x.size
    rows = -(-size // _LANES)
    block = min(block_rows, -(-rows // 8) * 8)
    if variant == "triton":
        block = pl.next_power_of_2(block)
    rows_p = -(-rows // block) * block
    flat = jnp.pad(x.reshape(-1), (0, rows_p * _LANES - size)).reshape(rows_p, _LANES)
    params = jnp.asarray(np.concatenate([_scalars(min_range, max_range, std_range), np.zeros(1, _F32)]))
    values = dequantization_values(table, min_range, max_range, std_range)
    kernel = functools.partial(_quant_kernel, table=[_F32(t) for t in table],
                               values=[_F32(v) for v in values], variant=variant, interpret=interpret)
    tile = pl.BlockSpec((block, _LANES), lambda i: (i, 0))
    if variant == "mosaic_tpu":
        params_spec = pl.BlockSpec(memory_space=pltpu.SMEM)
        compiler_params = pltpu.CompilerParams(dimension_semantics=("parallel",))
        interpret_arg = pltpu.InterpretParams() if interpret else False
    else:
        params_spec = pl.BlockSpec((4,), lambda i: (0,))
        compiler_params = None if interpret else pltriton.CompilerParams(num_warps=4, num_stages=1)
        interpret_arg = interpret
    indices, dequant = pl.pallas_call(
        kernel, grid=(rows_p // block,), in_specs=[params_spec, tile], out_specs=[tile, tile],
        out_shape=[jax.ShapeDtypeStruct((rows_p, _LANES), jnp.int32),
                   jax.ShapeDtypeStruct((rows_p, _LANES), x.dtype)],
        compiler_params=compiler_params, interpret=interpret_arg, name="dimwise_quantize",
    )(params, flat)
    unflat = lambda a: a.reshape(-1)[:size].reshape(shape)
    return unflat(indices), unflat(dequant)


# --------------------------------------------------------------------------- public functions


def dimwise_quantize(x, *, bits: int = 6, min_range: float = -5.0, max_range: float = 5.0,
                     std_range: float = 3.0, scheme: Scheme = "gaussian", reconstruction_values=None,
                     impl: Impl = "auto", pallas_variant: Variant | None = None, block_rows: int = 256):
    """TokenBridge dimension-wise quantization of x (any shape, e.g. (batch, tokens, channels)).

    Args:
      bits: 2^bits levels per dimension (upstream default 6).
      min_range, max_range: the input range mapped onto [-std, std] (upstream -5, 5).
      std_range: clamp of the normalised value (upstream 3.0).
      scheme: "gaussian" (TokenBridge) or "uniform" (equal bins, midpoints).
      reconstruction_values: a concrete (2^bits,) table overriding the scheme, e.g.
        upstream's ``reconstruction_values`` buffer from a checkpoint.
      impl: "auto" (kernel when lowered for GPU/TPU, jnp on CPU), "pallas" (kernel,
        interpret mode on CPU), "xla" (jnp reference).
      pallas_variant: force the "triton" or "mosaic_tpu" kernel whatever the platform.
    Returns:
      (indices int32, dequant in x's dtype), both x's shape.
    """
    table = _table(bits, std_range, scheme, reconstruction_values)
    kw = dict(min_range=float(min_range), max_range=float(max_range), std_range=float(std_range))
    if impl == "xla":
        idx, deq = dimwise_quantize_reference(x, table, **kw)
        return idx, deq.astype(x.dtype)
    if impl not in ("auto", "pallas"):
        raise ValueError(f"impl must be 'auto', 'pallas' or 'xla', got {impl!r}")
    kernel = functools.partial(_quantize_pallas, table=table, block_rows=block_rows, **kw)

    def xla(x):
        idx, deq = dimwise_quantize_reference(x, table, **kw)
        return idx, deq.astype(x.dtype)

    if pallas_variant is not None:
        return lax.platform_dependent(x, cpu=functools.partial(kernel, pallas_variant, True),
                                      default=functools.partial(kernel, pallas_variant, False))
    return lax.platform_dependent(
        x, cuda=functools.partial(kernel, "triton", False), rocm=functools.partial(kernel, "triton", False),
        tpu=functools.partial(kernel, "mosaic_tpu", False),
        default=functools.partial(kernel, "triton", True) if impl == "pallas" else xla)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _straight_through(x, settings):
    return dimwise_quantize(x, **dict(settings))[1]


def _straight_through_fwd(x, settings):
    return _straight_through(x, settings), None


def _straight_through_bwd(settings, _, g):
    return (g,)


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def quantize_ste(x, *, bits: int = 6, min_range: float = -5.0, max_range: float = 5.0,
                 std_range: float = 3.0, scheme: Scheme = "gaussian", impl: Impl = "auto"):
    """Dequantized x with a straight-through gradient (identity), for training through the quantizer."""
    settings = (("bits", int(bits)), ("impl", impl), ("max_range", float(max_range)),
                ("min_range", float(min_range)), ("scheme", scheme), ("std_range", float(std_range)))
    return _straight_through(x, settings)


# --------------------------------------------------------------------------- golden fixture


def _check_tokenbridge_quant(meta: dict, params: dict, buffers: dict, inputs: dict) -> dict[str, np.ndarray]:
    """``post_training_quantize(x, bits, min_range, max_range, std_range)`` on the fixture's inputs."""
    del meta, params, buffers  # a pure function: the configuration is in the in/ scalars
    bits = int(np.asarray(inputs["bits"]))
    kw = dict(min_range=float(np.asarray(inputs["min_range"])), max_range=float(np.asarray(inputs["max_range"])),
              std_range=float(np.asarray(inputs["std_range"])))
    x = jnp.asarray(inputs["x"], jnp.float32)
    boundaries, table = gaussian_quantization_table(bits, kw["std_range"])
    indices, dequant = dimwise_quantize(x, bits=bits, impl="pallas", **kw)
    return {
        "indices": np.asarray(indices),
        "dequant": np.asarray(dequant),
        "reconstruction_values": table,
        "boundaries": boundaries,
        "x_normalized_clamped": np.asarray(normalize(x, **kw)),
    }


FIXTURE_CHECKS = {"tokenbridge_quant": _check_tokenbridge_quant}
