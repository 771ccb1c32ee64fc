"""ViT blocks shared by the 1D tokenizers (One-D-Piece/TiTok, ReTok, TexTok, TokenFlow).

Layout: tokens are (batch, tokens, width); images NHWC. Parameters are float32
and carry logical axis names (trainers/sharding.py); ``dtype`` is the compute
dtype. LayerNorms and the attention softmax run in float32.

* :class:`PatchEmbed` -- Conv(kernel = stride = patch) -> (B, (H/p)(W/p), width), tokens row-major.
* :class:`MultiheadAttention` -- ``torch.nn.MultiheadAttention`` semantics (separate query, key
  and value inputs, packed ``in_proj`` (width, 3*width) in q, k, v order, ``out_proj``), on the
  zoo's one softmax-attention core ``models.layers.attention_weights_and_values``; for attention
  whose query, key and value differ (the Q-Former's pos-embedded and cross-attention).
* :class:`ResidualAttentionBlock` -- pre-LN block of TiTok/open_clip (``ln_1``, ``attn`` = the zoo's
  ``models.layers.Attention`` (torch ``in_proj`` -> ``qkv``, ``out_proj`` -> ``proj``),
  ``ln_2``, ``mlp`` = ``models.layers.Mlp``: ``fc1`` (upstream ``c_fc``) -> exact GELU -> ``fc2``
  (``c_proj``)).
* :class:`QFormerLayer` -- the DETR pre-norm decoder layer ReTok's Q-Former uses (``norm1`` ->
  self-attention with query_pos on q and k -> ``norm2`` -> cross-attention to a memory with pos
  on its keys, raw memory as values -> ``norm3`` -> ``linear1``/``linear2`` MLP).
* Latent tokens and prefix masks: :func:`learned_embedding`, :func:`sample_prefix_length`
  (Tail Token Drop: one k ~ U{low..N} per step; nested dropout: one k per example),
  :func:`prefix_mask` and :func:`key_mask`, which keep shapes static under jit: a dropped
  token stays in the sequence but no query attends to it, which equals removing it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models import layers
from trainers import sharding  # noqa: F401  (sets flax_always_shard_variable=False before any Param exists)


def gelu_exact(x):
    """GELU with erf (torch ``nn.GELU()`` default)."""
    return layers.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable] = {"gelu": gelu_exact, "gelu_tanh": layers.gelu,
                                    "relu": nnx.relu, "silu": nnx.silu,
                                    "quick_gelu": lambda x: x * nnx.sigmoid(1.702 * x)}  # OpenAI CLIP


def layer_norm(dim: int, *, rngs: nnx.Rngs, eps: float = 1e-5) -> nnx.LayerNorm:
    """Affine LayerNorm (torch default eps 1e-5), float32, logical axis ``norm``."""
    return nnx.LayerNorm(dim, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32,
                         use_fast_variance=False,
                         scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
                         bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)), rngs=rngs)


def learned_embedding(rngs: nnx.Rngs, shape: tuple[int, ...], scale: float,
                      names: tuple[str | None, ...] = ("position", "embed")) -> nnx.Param:
    """A free parameter initialised ``scale * N(0, 1)`` (TiTok's class/positional embeddings,
    latent tokens, mask token use scale = width**-0.5)."""
    return nnx.Param(scale * jax.random.normal(rngs.params(), shape, jnp.float32), out_sharding=names)


class PatchEmbed(nnx.Module):
    """(B, H, W, C) -> (B, (H/p)*(W/p), width): a Conv with kernel = stride = p and a bias."""

    def __init__(self, in_channels: int, width: int, patch_size: int, *, rngs: nnx.Rngs,
                 use_bias: bool = True, dtype=jnp.float32):
        self.patch_size = patch_size
        self.proj = layers.conv(in_channels, width, patch_size, strides=patch_size, padding="VALID",
                                use_bias=use_bias, out_name="embed", rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {self.patch_size}")
        y = self.proj(x)
        return y.reshape(b, -1, y.shape[-1])


class MultiheadAttention(nnx.Module):
    """``torch.nn.MultiheadAttention(width, num_heads)`` with batch-first tokens.

    ``in_proj``: kernel (width, 3*width), columns [q | k | v] (torch ``in_proj_weight.T``);
    ``out_proj``: (width, width). ``mask``: bool, broadcastable to (B, heads, Nq, Nk), True = attend.
    """

    def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs, use_bias: bool = True,
                 dtype=jnp.float32):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads={num_heads}")
        self.width, self.num_heads = width, num_heads
        self.in_proj = layers.dense(width, 3 * width, ("embed", "heads"), use_bias=use_bias, rngs=rngs, dtype=dtype)
        self.out_proj = layers.dense(width, width, ("heads", "embed"), use_bias=use_bias, rngs=rngs, dtype=dtype)

    def _project(self, x, part: int):
        w = self.width
        kernel = self.in_proj.kernel[...][:, part * w:(part + 1) * w]
        y = jnp.einsum("bnc,cd->bnd", x.astype(self.in_proj.dtype), kernel.astype(self.in_proj.dtype))
        if self.in_proj.bias is not None:
            y = y + self.in_proj.bias[...][part * w:(part + 1) * w].astype(y.dtype)
        b, n, _ = y.shape
        return y.reshape(b, n, self.num_heads, w // self.num_heads).transpose(0, 2, 1, 3)  # (B, H, N, d)

    def __call__(self, query: jax.Array, key: jax.Array | None = None, value: jax.Array | None = None,
                 *, mask: jax.Array | None = None) -> jax.Array:
        key = query if key is None else key
        value = key if value is None else value
        if key is query and value is query:  # self-attention: one fused projection
            q, k, v = layers.split_heads(self.in_proj(query), 3, self.num_heads)
        else:
            q, k, v = self._project(query, 0), self._project(key, 1), self._project(value, 2)
        out = layers.attention_weights_and_values(q, k, v, mask)
        b, _, n, _ = out.shape
        return self.out_proj(jnp.moveaxis(out, 1, 2).reshape(b, n, self.width))


class ResidualAttentionBlock(nnx.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)) (TiTok ``modeling/modules/blocks.py``, open_clip)."""

    def __init__(self, width: int, num_heads: int, *, mlp_ratio: float = 4.0, rngs: nnx.Rngs,
                 activation: str = "gelu", ln_eps: float = 1e-5, dtype=jnp.float32):
        self.ln_1 = layer_norm(width, eps=ln_eps, rngs=rngs)
        self.attn = layers.Attention(width, num_heads, rngs=rngs, dtype=dtype)  # in_proj -> qkv, out_proj -> proj
        self.ln_2 = layer_norm(width, eps=ln_eps, rngs=rngs)
        self.mlp = layers.Mlp(width, int(width * mlp_ratio), activation=ACTIVATIONS[activation], rngs=rngs,
                              dtype=dtype)

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        x = x + self.attn(self.ln_1(x).astype(x.dtype), mask=mask)
        return x + self.mlp(self.ln_2(x).astype(x.dtype))


class QFormerLayer(nnx.Module):
    """DETR's pre-norm ``TransformerDecoderLayer`` (ReTok ``blocks.py``): queries attend to themselves,
    then to a memory.

    ``__call__(tgt, memory, query_pos, pos)``: tgt (B, Nq, W), memory (B, Nm, W); optional position
    embeddings broadcastable to them. Self-attention: q = k = norm1(tgt) + query_pos, v = norm1(tgt);
    cross-attention: q = norm2(tgt) + query_pos, k = memory + pos, v = memory (the memory is not
    normalised here); then tgt + linear2(act(linear1(norm3(tgt)))).
    """

    def __init__(self, width: int, num_heads: int, mlp_hidden: int, *, rngs: nnx.Rngs,
                 activation: str = "gelu", ln_eps: float = 1e-5, dtype=jnp.float32):
        self.norm1 = layer_norm(width, eps=ln_eps, rngs=rngs)
        self.self_attn = MultiheadAttention(width, num_heads, rngs=rngs, dtype=dtype)
        self.norm2 = layer_norm(width, eps=ln_eps, rngs=rngs)
        self.multihead_attn = MultiheadAttention(width, num_heads, rngs=rngs, dtype=dtype)
        self.norm3 = layer_norm(width, eps=ln_eps, rngs=rngs)
        self.linear1 = layers.dense(width, mlp_hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.linear2 = layers.dense(mlp_hidden, width, ("mlp", "embed"), rngs=rngs, dtype=dtype)
        self.activation = ACTIVATIONS[activation]

    def __call__(self, tgt, memory, *, query_pos=None, pos=None, self_mask=None, memory_mask=None):
        with_pos = lambda t, p: t if p is None else t + p  # noqa: E731
        h = self.norm1(tgt).astype(tgt.dtype)
        qk = with_pos(h, query_pos)
        tgt = tgt + self.self_attn(qk, qk, h, mask=self_mask)
        h = self.norm2(tgt).astype(tgt.dtype)
        tgt = tgt + self.multihead_attn(with_pos(h, query_pos), with_pos(memory, pos), memory, mask=memory_mask)
        h = self.norm3(tgt).astype(tgt.dtype)
        return tgt + self.linear2(self.activation(self.linear1(h)))


# ----------------------------------------------------------------------------
# Prefix drop: Tail Token Drop (One-D-Piece) and nested dropout (ReTok, FlexTok)
# ----------------------------------------------------------------------------


def sample_prefix_length(rng: jax.Array, num_tokens: int, *, low: int = 1, high: int | None = None,
                         shape: tuple[int, ...] = ()) -> jax.Array:
    """Kept-prefix lengths k ~ U{low, ..., high} (high defaults to num_tokens), int32 of ``shape``.

    ``shape=()``: one k for the whole batch per step (One-D-Piece's Tail Token Drop,
    ``torch.randint(1, N + 1, (1,))``); ``shape=(B,)``: one k per example (nested dropout).
    """
    high = num_tokens if high is None else high
    if not 1 <= low <= high <= num_tokens:
        raise ValueError(f"prefix lengths need 1 <= low={low} <= high={high} <= num_tokens={num_tokens}")
    return jax.random.randint(rng, shape, low, high + 1, dtype=jnp.int32)


def prefix_mask(length, num_tokens: int) -> jax.Array:
    """(..., num_tokens) bool: True for the first ``length`` tokens; ``length`` int or int array (...)."""
    length = jnp.asarray(length, jnp.int32)
    return jnp.arange(num_tokens, dtype=jnp.int32) < length[..., None]


def key_mask(keep: jax.Array) -> jax.Array:
    """Attention mask (B or 1, 1, 1, N) from a per-key keep vector (N,) or (B, N): every query may
    attend to exactly the kept keys."""
    keep = jnp.asarray(keep, bool)
    if keep.ndim == 1:
        keep = keep[None]
    return keep[:, None, None, :]
