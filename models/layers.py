"""Layers shared by every network in the zoo: one attention, one MLP, one adaLN, one embedder.

Every parameter carries logical axis names (trainers/sharding.py maps them to
the mesh). Layouts: tokens are (batch, tokens, channels); images NHWC.
Parameters are float32; ``dtype`` is the compute dtype (bfloat16 for mixed
precision). Norms, softmax and embeddings of time are computed in float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import trainers.sharding  # noqa: F401  (sets Flax's variable-sharding mode before any model is built)

xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def abstract_module(build: Callable[[nnx.Rngs], nnx.Module]) -> nnx.Module:
    """``build(rngs)`` as an abstract module (ShapeDtypeStruct values, no parameter computed).

    The key is an argument of the traced function, not a constant in it: a constant key would let
    ``jax.ensure_compile_time_eval`` (pretrained weights read while a train state is being traced)
    run every initialiser eagerly, one XLA compile per parameter shape (a MaskGIT-VQGAN teacher:
    6.6 s instead of 0.2 s; a DINOv2-B teacher's 86M random numbers).
    """
    return nnx.eval_shape(lambda key: build(nnx.Rngs(key)), jax.random.key(0))


def dense(in_features: int, out_features: int, names: tuple[str | None, str | None], *, rngs: nnx.Rngs,
          use_bias: bool = True, kernel_init=xavier_uniform, bias_init=zeros, dtype=jnp.float32) -> nnx.Linear:
    """nnx.Linear whose kernel (in, out) and bias (out,) carry logical axis names."""
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(kernel_init, names),
        bias_init=nnx.with_partitioning(bias_init, (names[1],)), rngs=rngs)


def dense_group(x: jax.Array, *denses: nnx.Linear) -> tuple[jax.Array, ...]:
    """``tuple(d(x) for d in denses)`` as one matmul: the kernels stacked to (in, k, out), one dot_general,
    then split (a SwiGLU's two input projections; the parameters stay the separate layers').

    The output axis keeps its logical sharding (the stack adds an unsharded axis). On this 2-core CPU
    xAR's fc1_g/fc1_x pair (2048x128 @ 128x341 each) is one 682-wide dot at 1.3x the rate of the two
    (``benchmarks/train_step.py``); elsewhere it only saves a launch.
    """
    first = denses[0]
    for d in denses[1:]:
        if ((d.in_features, d.out_features, d.use_bias, d.dtype, d.precision, d.dot_general)
                != (first.in_features, first.out_features, first.use_bias, first.dtype, first.precision,
                    first.dot_general)):
            raise ValueError("dense_group: the layers must agree in shape, bias, dtype, precision and dot_general")
    kernel = jnp.stack([d.kernel[...] for d in denses], axis=1)
    bias = jnp.stack([d.bias[...] for d in denses]) if first.use_bias else None
    x, kernel, bias = first.promote_dtype((x, kernel, bias), dtype=first.dtype)
    y = first.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=first.precision)
    if bias is not None:
        y = y + bias
    return tuple(y[..., i, :] for i in range(len(denses)))


def conv(in_features: int, out_features: int, kernel_size: int | Sequence[int], *, rngs: nnx.Rngs,
         strides: int | Sequence[int] = 1, padding="SAME", use_bias: bool = True,
         out_name: str = "conv_out", kernel_init=nnx.initializers.lecun_normal(), bias_init=zeros,
         dtype=jnp.float32) -> nnx.Conv:
    """nnx.Conv (NHWC, kernel (kh, kw, in, out)) with logical axis names."""
    ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    names = ("conv_kernel", "conv_kernel", "conv_in", out_name)
    return nnx.Conv(
        in_features, out_features, ks, strides=strides, padding=padding, use_bias=use_bias, dtype=dtype,
        param_dtype=jnp.float32, kernel_init=nnx.with_partitioning(kernel_init, names),
        bias_init=nnx.with_partitioning(bias_init, (out_name,)), rngs=rngs)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters, in float32 (DiT's norm1/norm2/norm_final)."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return ((x - mean) * jax.lax.rsqrt(var + eps)).astype(dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with a learned scale and bias (torch nn.LayerNorm / timm's norm_layer), in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = layer_norm(x.astype(jnp.float32), self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def random_bits(key: jax.Array, shape: tuple[int, ...], *, within=None) -> jax.Array:
    """``jax.random.bits(key, shape, jnp.uint32)``, bit for bit, as one fusible elementwise expression.

    ``within=(full_shape, offset)``: the window ``[offset, offset + shape)`` of
    ``jax.random.bits(key, full_shape)``, drawn without the rest (attention on key prefixes).

    jax lowers threefry on CPU as a rolled loop (``fori_loop`` over its five key-schedule groups, to keep
    compiles short): each iteration is a separate pass over the whole counter array, and nothing fuses
    into the consumer. This is the same Threefry-2x32 (20 rounds) on the same counters as jax's
    partitionable ``random_bits`` (the row-major index of each element, ``counts_hi = 0``; the two output
    words XORed), written out unrolled: XLA fuses it into one loop (16.8M words on this 2-core CPU:
    54 ms vs 213 ms) and the counters are ``broadcasted_iota``s, which the SPMD partitioner splits like
    jax's own. Typed threefry keys and raw ``uint32[2]`` keys (when threefry is the default implementation)
    take this path; any other key (another PRNG implementation, non-partitionable threefry, 2**32 elements
    or more) goes to ``jax.random.bits`` itself.
    """
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if typed:  # jax.random.key(...)
        threefry = key.shape == () and jax.random.key_impl(key) == "threefry2x32"
    else:  # a raw key, jax.random.PRNGKey(...): its meaning is the default implementation's
        threefry = (key.shape == (2,) and key.dtype == jnp.uint32
                    and jax.config.jax_default_prng_impl == "threefry2x32")
    shape = tuple(shape)
    full_shape, offset = (shape, (0,) * len(shape)) if within is None else (tuple(within[0]), tuple(within[1]))
    if len(full_shape) != len(shape) or any(o < 0 or o + n > f for o, n, f in zip(offset, shape, full_shape)):
        raise ValueError(f"random_bits: window {shape} at {offset} is not inside {full_shape}")
    if not threefry or not jax.config.jax_threefry_partitionable or not shape or math.prod(full_shape) >= 2**32:
        bits = jax.random.bits(key, full_shape, jnp.uint32)
        return bits if within is None else bits[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
    u32 = jnp.uint32
    k = jax.random.key_data(key) if typed else key
    ks = (k[0], k[1], k[0] ^ k[1] ^ u32(0x1BD11BDA))
    strides = np.cumprod((full_shape[1:] + (1,))[::-1])[::-1]
    count = sum((jax.lax.broadcasted_iota(u32, shape, d) + u32(o)) * u32(int(st))
                for d, (o, st) in enumerate(zip(offset, strides)))
    x0, x1 = jnp.broadcast_to(ks[0], shape), count + ks[1]
    for group in range(5):
        for r in _THREEFRY_ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = x0 ^ ((x1 << u32(r)) | (x1 >> u32(32 - r)))
        x0 = x0 + ks[(group + 1) % 3]
        x1 = x1 + ks[(group + 2) % 3] + u32(group + 1)
    return x0 ^ x1


def dropout(x: jax.Array, rate: float, rng: jax.Array | None, *, within=None) -> jax.Array:
    """Inverted dropout; the identity when rate is 0 or no rng is given (evaluation, sampling).

    ``within=(full_shape, offset)``: ``x`` is the window ``[offset, offset + x.shape)`` of a larger array
    (its last-axis offset even), and gets that window of the larger array's mask.

    An element is dropped when a 16-bit uniform integer is below ``round(rate * 2**16)`` (the drop rate
    within 2**-17 of ``rate``); kept elements are divided by that exact keep probability, so the
    expectation is ``x``. The integers are the two halves of the 32-bit words of ``random_bits``
    (``jax.random.bits``' numbers, fused): half the threefry work of ``jax.random.bernoulli``'s one float
    per element, and a quarter of its time on CPU again from the fusion (dropout's random bits were a
    quarter of an xAR train step; ``benchmarks/train_step.py``). Threefry is partitionable, so the mask
    does not depend on the sharding.
    """
    if rng is None or rate == 0.0:
        return x
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    threshold = round(rate * 2**16)
    keep_prob = 1.0 - threshold / 2**16
    shape = x.shape if x.ndim else (1,)
    n = shape[-1]
    word_window = None
    if within is not None:
        full_shape, offset = tuple(within[0]), tuple(within[1])
        if offset[-1] % 2:
            raise ValueError(f"dropout: a window's last-axis offset must be even, got {offset}")
        word_window = (full_shape[:-1] + ((full_shape[-1] + 1) // 2,), offset[:-1] + (offset[-1] // 2,))
    words = random_bits(rng, shape[:-1] + ((n + 1) // 2,), within=word_window)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(shape[:-1] + (2 * ((n + 1) // 2),))
    keep = (halves[..., :n] >= threshold).reshape(x.shape)
    return jnp.where(keep, x / keep_prob, 0.0).astype(x.dtype)


def rms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """RMSNorm without a weight, in float32."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    return (x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps)).astype(dtype)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned ``weight``: normalised in float32, cast back, then scaled (Llama, xAR)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.eps) * self.weight[...].astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation x * (1 + scale) + shift; shift/scale (batch, channels) or broadcastable."""
    if shift.ndim == x.ndim - 1:
        shift, scale = shift[:, None], scale[:, None]
    return x * (1 + scale) + shift


def _materialised_on_cpu(t: jax.Array, x: jax.Array) -> jax.Array:
    # A conditional's operand is a buffer: XLA cannot fuse (and so duplicate) the computation of ``t`` into
    # its consumers across it. Both branches return ``t`` (the first writes t's leading element back into
    # place) and are linear in ``t``, so reverse mode transposes the conditional (the cotangent then passes
    # through one too); they differ only so that XLA does not fold the conditional away. The predicate
    # reads the primal ``x``, which XLA cannot fold.
    def rewrite(t):
        flat = t.reshape(-1)
        return jax.lax.dynamic_update_slice(flat, flat[:1], (0,)).reshape(t.shape)

    return jax.lax.cond(jnp.isnan(x.reshape(-1)[0]), rewrite, lambda t: t, t)


@jax.custom_jvp
def grad_fusion_barrier(x: jax.Array) -> jax.Array:
    """The identity, whose tangent and cotangent XLA:CPU must materialise (a no-op on other backends).

    Put on a residual stream at each block's input: without it XLA:CPU's instruction fusion never
    materialises the residual-stream gradient and duplicates its whole elementwise chain (the
    layer-norm backward and adaLN gates of every later block) into each transposed weight-gradient
    operand, O(depth^2) work (``benchmarks/train_step.py``). ``lax.optimization_barrier`` does not help
    there (XLA:CPU expands it before fusion); a conditional's operand is a real buffer. A ``custom_jvp``
    (not ``custom_vjp``) so that forward mode (MeanFlow's ``jax.jvp`` of the network) still works.
    """
    return x


@grad_fusion_barrier.defjvp
def _grad_fusion_barrier_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return x, jax.lax.platform_dependent(t, x, cpu=_materialised_on_cpu, default=lambda t, x: t)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [cos, sin] of (batch,) float times (DiT's TimestepEmbedder)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class TimestepEmbedder(nnx.Module):
    """Scalar time -> vector: sinusoid then Linear-SiLU-Linear (DiT)."""

    def __init__(self, hidden_size: int, *, rngs: nnx.Rngs, frequency_embedding_size: int = 256,
                 dtype=jnp.float32):
        init = nnx.initializers.normal(0.02)
        self.frequency_embedding_size = frequency_embedding_size
        self.linear_1 = dense(frequency_embedding_size, hidden_size, (None, "embed"), kernel_init=init,
                              rngs=rngs, dtype=dtype)
        self.linear_2 = dense(hidden_size, hidden_size, ("embed", "embed"), kernel_init=init, rngs=rngs,
                              dtype=dtype)

    def __call__(self, t: jax.Array) -> jax.Array:
        h = timestep_embedding(t, self.frequency_embedding_size)
        return self.linear_2(nnx.silu(self.linear_1(h)))


class LabelEmbedder(nnx.Module):
    """Class label -> vector; row ``num_classes`` is the null class used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, *, rngs: nnx.Rngs):
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        rows = num_classes + int(dropout_prob > 0)
        self.embedding = nnx.Embed(
            rows, hidden_size, embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02),
                                                                    ("classes", "embed")), rngs=rngs)

    def drop_labels(self, labels: jax.Array, rng: jax.Array) -> jax.Array:
        """Replace labels by the null class with probability dropout_prob (classifier-free guidance)."""
        drop = jax.random.uniform(rng, labels.shape) < self.dropout_prob
        return jnp.where(drop, self.num_classes, labels)

    def __call__(self, labels: jax.Array) -> jax.Array:
        return self.embedding(labels)


def key_prefix_runs(mask, max_runs: int = 8) -> list[tuple[int, int, int]] | None:
    """Runs ``(first row, end row, L)`` of consecutive query rows that attend to exactly the keys [0, L),
    when a static (numpy) (Nq, Nk) mask is made of at most ``max_runs`` of them (xAR's entity-causal mask:
    one run per entity); otherwise None (a traced mask, any other structure, an empty row)."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.dtype != bool:
        return None
    lengths = mask.sum(axis=1)
    if lengths.min() == 0 or not np.array_equal(mask, np.arange(mask.shape[1])[None, :] < lengths[:, None]):
        return None
    starts = np.flatnonzero(np.diff(lengths, prepend=-1))
    if len(starts) > max_runs:
        return None
    ends = np.append(starts[1:], mask.shape[0])
    return [(int(a), int(b), int(lengths[a])) for a, b in zip(starts, ends)]


def attention_weights_and_values(q, k, v, mask=None, dropout_rate: float = 0.0, dropout_rng=None):
    """Softmax attention in float32. q (B, H, Nq, d), k/v (B, H, Nk, d); mask broadcastable to (B, H, Nq, Nk).

    ``dropout_rate``/``dropout_rng``: dropout on the attention weights (torch SDPA ``dropout_p``, training).
    A static mask made of key prefixes (``key_prefix_runs``) is computed run by run on the keys each run
    sees, skipping the masked blocks: the same weights (a masked key's weight is exactly 0) and the same
    dropout masks (each run draws its window of the full mask); xAR's 4-entity training mask skips 37.5%
    of the scores, 11% of its CPU train step (``benchmarks/train_step.py``).
    """
    runs = key_prefix_runs(mask)
    if runs is not None:
        full = q.shape[:3] + (k.shape[2],)
        outs = [_softmax_attention(q[:, :, a:b], k[:, :, :n], v[:, :, :n], None, dropout_rate, dropout_rng,
                                   (full, (0, 0, a, 0))) for a, b, n in runs]
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    return _softmax_attention(q, k, v, mask, dropout_rate, dropout_rng, None)


@jax.custom_jvp
def softmax(x):
    """``jax.nn.softmax(x, axis=-1)`` with the same values, differentiated through its output alone:
    d p = p * (d x - sum(p * d x)), so the backward pass keeps p and computes p * (g - sum(g * p)), what
    torch's softmax backward computes. jax's default (``jax_softmax_custom_jvp=False``) differentiates
    through ``exp(x - max) / sum``: it keeps the exponentials and the broadcast 1 / sum of every score array
    and reads them back in more passes (DiT-S/2's step: -0.76 GB of memory traffic, -300 MB of temporaries).
    A ``custom_jvp``, so forward-mode (MeanFlow's ``jax.jvp``) and higher orders work."""
    e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    p = softmax(x)
    return p, p * (dx - jnp.sum(p * dx, axis=-1, keepdims=True))


def _softmax_attention(q, k, v, mask, dropout_rate, dropout_rng, within):
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32) * scale, k.astype(jnp.float32))
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = dropout(softmax(logits), dropout_rate, dropout_rng, within=within)
    return jnp.einsum("bhqk,bhkd->bhqd", weights, v.astype(jnp.float32)).astype(v.dtype)


# ----------------------------------------------------------------------------- fused attention kernels
# config.model.attention_impl: "xla" is the reference above (float32 softmax, any mask, dropout);
# "cudnn" is jax.nn.dot_product_attention's cuDNN flash attention (GPU, bfloat16/float16 only; the
# boolean mask becomes a bias); "pallas" is the Pallas splash-attention kernel (TPU; a static numpy
# mask is compiled into the kernel's block-sparsity, a traced mask is read per block); "auto" picks
# cudnn on GPU for half-precision compute, pallas on TPU, xla otherwise. Off their backend, "pallas"
# runs in Pallas interpret mode (slow; for checking values) and "cudnn" fails at trace time.
# Attention-weight dropout (training) always takes the xla path: the kernels do not take it.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")


def resolve_attention_impl(impl: str, dtype, backend: str | None = None) -> str:
    """The concrete implementation ("xla" | "cudnn" | "pallas") of ``impl`` for a compute dtype."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r}: must be one of {ATTENTION_IMPLS}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    if backend in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    if backend == "tpu":
        return "pallas"
    return "xla"


def _nn_attention(q, k, v, mask, implementation: str):
    """jax.nn.dot_product_attention on our (B, H, N, d) layout (it takes (B, N, H, d))."""
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    out = jax.nn.dot_product_attention(*(jnp.swapaxes(a, 1, 2) for a in (q, k, v)), mask=mask,
                                       implementation=implementation)
    return jnp.swapaxes(out, 1, 2).astype(v.dtype)


SPLASH_LANES = 128  # splash attention's block lengths are multiples of the TPU lane width
# Run the Pallas kernel in interpret mode: None = unless the default backend is a TPU (set False to
# lower the real TPU kernel from another host, e.g. ``.lower(lowering_platforms=("tpu",))``).
PALLAS_INTERPRET: bool | None = None


def _splash_block(n: int) -> int:
    return next(block for block in (512, 256, 128) if n % block == 0)


def _splash_attention(q, k, v, mask, kv_valid=None):
    """Pallas splash attention (TPU; interpret mode elsewhere) on (B, H, N, d).

    ``mask``: a static numpy (Nq, Nk) or (1 or H, Nq, Nk) mask, compiled into the kernel's block
    sparsity; ``kv_valid`` (Nk,): traced per-key validity (the KV cache's filled slots), passed as
    segment ids (query segment 1, key segment 1 if valid else 0). Lengths that are not a multiple of
    128 are padded: padded keys are invalid, padded queries (sliced off) attend to every valid key.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    b, h, nq, d = q.shape
    nk = k.shape[2]
    pq, pk = -nq % SPLASH_LANES, -nk % SPLASH_LANES
    if mask is None:
        mask = np.ones((nq, nk), bool)
    if not isinstance(mask, np.ndarray):
        raise ValueError("attention_impl='pallas' needs a static (numpy) mask; pass the traced per-key "
                         "validity of a KV cache as kv_valid")
    m = mask.astype(bool)
    if m.ndim == 4:
        if m.shape[0] != 1:
            raise ValueError(f"pallas attention: the mask {m.shape} must not depend on the batch")
        m = m[0]
    m = np.pad(np.broadcast_to(m, (h, nq, nk)), ((0, 0), (0, pq), (0, 0)), constant_values=True)
    m = np.pad(m, ((0, 0), (0, 0), (0, pk)))
    valid = jnp.ones((nk,), bool) if kv_valid is None else jnp.asarray(kv_valid, bool)
    segments = splash.SegmentIds(q=jnp.ones((nq + pq,), jnp.int32),
                                 kv=jnp.pad(valid, (0, pk)).astype(jnp.int32))
    if pq or pk:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, pq), (0, 0)))
        k, v = (jnp.pad(a, ((0, 0), (0, 0), (0, pk), (0, 0))) for a in (k, v))
    kernel_mask = splash_mask.MultiHeadMask([splash_mask.NumpyMask(np.ascontiguousarray(m[i])) for i in range(h)])
    bq, bkv = _splash_block(nq + pq), _splash_block(nk + pk)
    blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                               block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    kernel = splash.make_splash_mha(kernel_mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                    interpret=(jax.default_backend() != "tpu" if PALLAS_INTERPRET is None
                                               else PALLAS_INTERPRET))
    dtype = v.dtype
    q = (q.astype(jnp.float32) * d ** -0.5).astype(dtype)  # splash does not scale the scores
    out = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(q, k.astype(dtype), v)
    return out[:, :, :nq].astype(dtype)


def dot_product_attention(q, k, v, mask=None, *, kv_valid=None, impl: str = "xla", dropout_rate: float = 0.0,
                          dropout_rng=None):
    """Softmax attention through ``impl`` (see ATTENTION_IMPLS). q (B, H, Nq, d), k/v (B, H, Nk, d);
    ``mask`` (Nq, Nk) or broadcastable to (B, H, Nq, Nk), True = attend (a numpy mask stays static);
    ``kv_valid`` (Nk,) bool: keys that exist (e.g. the filled slots of a KV cache), for every query."""
    impl = resolve_attention_impl(impl, q.dtype)
    if impl == "pallas" and not (dropout_rate > 0.0 and dropout_rng is not None):
        return _splash_attention(q, k, v, mask, kv_valid)
    if kv_valid is not None:
        valid = jnp.asarray(kv_valid, bool)[None, :]
        mask = valid if mask is None else jnp.asarray(mask) & valid
    if impl == "xla" or (dropout_rate > 0.0 and dropout_rng is not None):
        return attention_weights_and_values(q, k, v, mask, dropout_rate, dropout_rng)  # a numpy mask stays static
    return _nn_attention(q, k, v, mask, "cudnn")


def split_heads(x, parts: int, heads: int) -> tuple:
    """(B, N, parts * C) -> ``parts`` arrays (B, H, N, C / H): a fused projection's q/k/v (timm's
    ``reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)``). Split with ``jnp.split``, whose gradient is one
    concatenate; unpacking the permuted array slices it, whose gradient pads each part to the whole
    (3, B, H, N, d) and adds them, and XLA:CPU then re-reads the three padded copies in every fusion that
    consumes the gradient (the qkv weight, bias and input gradients)."""
    b, n, c = x.shape
    x = x.reshape(b, n, parts, heads, c // (parts * heads))
    return tuple(jnp.moveaxis(t[:, :, 0], 2, 1) for t in jnp.split(x, parts, axis=2))  # each (B, H, N, d)


class Attention(nnx.Module):
    """Multi-head self-attention (timm's Attention: fused qkv with bias, output projection).

    ``rope``: optional function (q, k) -> (q, k) on (B, H, N, d), applied before the scores.
    ``kv_cache``: optional (k, v) of earlier tokens (B, H, M, d), prepended; the new
    (k, v) of this call are returned through ``return_kv=True`` for caching.
    ``qk_norm``: timm's per-head LayerNorm (affine, eps 1e-6) on q and k before the scores.
    ``dropout_rate``/``dropout_rng``: dropout on the attention weights (training only).
    ``cache_index``: with ``kv_cache`` as fixed-size buffers (B, H, L, d), write this call's (k, v)
    at positions ``cache_index ..`` of the buffers (static shapes, for ``lax`` sampling loops) and
    attend over the whole buffer (the caller's ``mask`` hides unwritten slots); ``return_kv=True``
    then returns the updated buffers (gpt-fast's KVCache.update, as LlamaGen).
    ``proj_bias``: bias on the output projection (LlamaGen's ``wo`` has none).
    ``attention_impl``: the softmax-attention kernel (ATTENTION_IMPLS; "xla" = the float32 reference).
    ``kv_valid``: optional (keys,) bool over the attended keys (cache then new tokens): which exist.
    """

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, qkv_bias: bool = True,
                 qk_norm: bool = False, proj_bias: bool = True, dtype=jnp.float32, attention_impl: str = "xla"):
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        resolve_attention_impl(attention_impl, dtype)  # fail on an unknown name at build time
        self.attention_impl = attention_impl
        self.num_heads = num_heads
        self.qkv = dense(dim, 3 * dim, ("embed", "heads"), use_bias=qkv_bias, rngs=rngs, dtype=dtype)
        self.proj = dense(dim, dim, ("heads", "embed"), use_bias=proj_bias, rngs=rngs, dtype=dtype)
        self.q_norm = LayerNorm(dim // num_heads) if qk_norm else None
        self.k_norm = LayerNorm(dim // num_heads) if qk_norm else None

    def __call__(self, x: jax.Array, *, mask=None, rope: Callable | None = None, kv_cache=None,
                 return_kv: bool = False, dropout_rate: float = 0.0, dropout_rng=None, cache_index=None,
                 kv_valid=None):
        b, n, c = x.shape
        q, k, v = split_heads(self.qkv(x), 3, self.num_heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q, k)
        new_kv = (k, v)
        if kv_cache is not None and cache_index is not None:
            at = (0, 0, cache_index, 0)
            k = jax.lax.dynamic_update_slice(kv_cache[0], k.astype(kv_cache[0].dtype), at)
            v = jax.lax.dynamic_update_slice(kv_cache[1], v.astype(kv_cache[1].dtype), at)
            new_kv = (k, v)
        elif kv_cache is not None:
            k = jnp.concatenate([kv_cache[0], k], axis=2)
            v = jnp.concatenate([kv_cache[1], v], axis=2)
        out = dot_product_attention(q, k, v, mask, kv_valid=kv_valid, impl=self.attention_impl,
                                    dropout_rate=dropout_rate, dropout_rng=dropout_rng)
        out = self.proj(jnp.moveaxis(out, 1, 2).reshape(b, n, c))
        return (out, new_kv) if return_kv else out


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def gelu(x, approximate: bool = True):
    """``jax.nn.gelu(x, approximate)`` with the same values and a derivative in closed form (float32),
    recomputed from x in the backward pass as torch's ``gelu_backward`` does. jax's own derivative keeps
    the tanh / erfc and the intermediate products of every activation, and XLA:CPU then computes the output
    in a second pass over the layer's whole hidden activation (DiT-S/2's step: -0.6 GB of memory traffic,
    -150 MB of temporaries). A ``custom_jvp``: forward mode (MeanFlow's ``jax.jvp``) and higher orders
    work."""
    return jax.nn.gelu(x, approximate=approximate)


@gelu.defjvp
def _gelu_jvp(approximate, primals, tangents):
    (x,), (dx,) = primals, tangents
    # checkpointed: reverse mode keeps x (fc1's output, which exists anyway) and recomputes gelu'(x) in the
    # backward pass; without it, partial evaluation computes gelu'(x) in the forward pass and keeps it
    tangent = jax.checkpoint(_gelu_tangent, static_argnums=(2,),
                             policy=jax.checkpoint_policies.nothing_saveable)
    return jax.nn.gelu(x, approximate=approximate), tangent(x, dx, approximate)


def _gelu_tangent(x, dx, approximate: bool):
    """gelu'(x) * dx, in float32."""
    xf = x.astype(jnp.float32)
    if approximate:
        c = float(np.sqrt(2 / np.pi))
        t = jnp.tanh(c * (xf + 0.044715 * xf ** 3))
        d = 0.5 * (1 + t) + 0.5 * xf * (1 - t * t) * c * (1 + 3 * 0.044715 * xf * xf)
    else:
        cdf = 0.5 * jax.lax.erfc(-xf * float(np.sqrt(0.5)))
        d = cdf + xf * jnp.exp(-0.5 * xf * xf) * float(1 / np.sqrt(2 * np.pi))
    return (d * dx.astype(jnp.float32)).astype(x.dtype)


class Mlp(nnx.Module):
    """fc1 -> activation -> fc2 (timm's Mlp); the activation is a config choice."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, activation=None, dtype=jnp.float32):
        self.activation = activation or gelu
        self.fc1 = dense(dim, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = dense(hidden, dim, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.activation(self.fc1(x)))


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim) fixed 2-D sin-cos embedding, row-major tokens (MAE/DiT).

    The first half of the channels encodes the column (w) coordinate, the second
    the row, each as [sin, cos] with omega = 1 / 10000^(i / (D/4)).
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs embed_dim % 4 == 0, got {embed_dim}")

    def one_axis(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h, grid_w = np.meshgrid(np.arange(grid_size, dtype=np.float32),
                                 np.arange(grid_size, dtype=np.float32), indexing="ij")
    emb = np.concatenate([one_axis(embed_dim // 2, grid_w), one_axis(embed_dim // 2, grid_h)], axis=1)
    return emb.astype(np.float32)


def patchify(x: jax.Array, p: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/p * W/p, p*p*C), tokens row-major, each ordered (p_row, p_col, c)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: jax.Array, p: int, channels: int) -> jax.Array:
    """Inverse of :func:`patchify` for a square grid."""
    b, n, _ = x.shape
    g = int(round(math.sqrt(n)))
    x = x.reshape(b, g, g, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * p, g * p, channels)
