"""TokenBridge (Wang et al., "Bridging Continuous and Discrete Tokens for Autoregressive Visual Generation").

A continuous VAE latent is made discrete *after* the VAE is trained, one
dimension at a time (paper Sec. 3.1): every channel value x of MAR's KL-16
latent (posterior sample x 0.2325) is mapped from [qmin, qmax] = [-5, 5] onto
[-3, 3], clamped, and replaced by the nearest of 2^bits = 64 reconstruction
values, the means of a standard normal truncated to the bins between Gaussian
quantiles (``pallas_kernels/dimwise_quant.py``). Each spatial token thus becomes
16 indices in a 64-level vocabulary, and their dequantised values are what the
backbone sees.

Generation (Sec. 3.2), as upstream YuqingWang1029/TokenBridge ``models/tokenbridge.py``:

* a MAR masked autoencoder over the 256 spatial tokens (``forward_mae_encoder`` /
  ``forward_mae_decoder``): 64 buffer tokens carrying the class embedding (or the
  learned ``fake_latent`` for a dropped label), learned positions, timm ViT blocks;
  the encoder sees only the visible tokens, the decoder fills the masked ones with
  ``mask_token``;
* a per-dimension autoregressive head (``forward_channel_ar``): for every masked
  token a causal transformer over its 16 dimensions in the fixed order
  ``CHANNEL_ORDER``; the sequence is [condition_proj(feature), emb_0(t_0), ...,
  emb_14(t_14)] + channel embedding, each block adaLN-modulated by a per-position
  condition (feature + step embedding), qk-norm attention, then an affine
  LayerNorm, a final adaLN layer (chunk order scale, shift) and 16 separate
  output heads, head i predicting dimension i.

Objective: cross-entropy over the 64 levels of every dimension of every masked
token; one mask ratio per batch from MAR's truncated normal on [0.7, 1], a
random order per sample, label drop 0.1.

Sampler (``sample_tokens``): MAR's loop of ``num_iter`` steps with the cosine
mask schedule; classifier-free guidance on the *decoder features* with the
linear schedule on the next step's masked count; then the 16-step channel AR
with temperature (0 = argmax), with or without a KV cache (same samples).

Layouts: images/latents (batch, height, width, channels) NHWC; tokens (batch,
tokens, token_dim) row-major, each ordered (p_row, p_col, channel) (upstream's
(channel, p_row, p_col) order coincides for patch size 1, its only setting);
quantisation indices int32 in storage order unless named "in channel order".

Implementation choices (upstream is eager PyTorch; these keep static shapes):
the encoder gathers the visible tokens into a fixed-size buffer of
``buffer_size + seq_len - ceil(seq_len * mask_ratio_min)`` rows (padding rows
hidden by the attention mask; the sampler uses all rows); the training head
runs on every token and the loss is weighted by the mask; the sampler predicts
the tokens of a step in a fixed-size slab of the schedule's largest step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import layers
from pallas_kernels import dimwise_quant
from trainers.method import Method, check_data_shape

# Upstream's dimension order for MAR's KL-16 latent (derived by the paper's frequency analysis of its
# channels; specific to that VAE): position i of the channel AR predicts latent channel CHANNEL_ORDER[i].
CHANNEL_ORDER = (8, 1, 10, 9, 6, 12, 4, 0, 3, 11, 7, 14, 2, 15, 13, 5)
CFG_SCHEDULES = ("linear", "constant")


def _exact_gelu(x):
    return layers.gelu(x, approximate=False)


# ----------------------------------------------------------------------------- the quantizer
class Quantizer:
    """Post-training dimension-wise quantizer (a constant table, no parameters).

    ``reconstruction_values``: the (2^bits,) normalised table; default the Gaussian
    truncated-normal means (upstream's ``reconstruction_values`` buffer, bit-exact).
    """

    def __init__(self, *, bits: int = 6, min_range: float = -5.0, max_range: float = 5.0, std_range: float = 3.0,
                 scheme: str = "gaussian", reconstruction_values=None, impl: str = "auto"):
        if reconstruction_values is None:
            tables = {"gaussian": dimwise_quant.gaussian_quantization_table,
                      "uniform": dimwise_quant.uniform_quantization_table}
            if scheme not in tables:
                raise ValueError(f"quantizer scheme {scheme!r}: must be one of {sorted(tables)}")
            reconstruction_values = tables[scheme](bits, std_range)[1]
        self.table = np.asarray(reconstruction_values, np.float32)
        self.levels = len(self.table)
        self.kw = dict(min_range=float(min_range), max_range=float(max_range), std_range=float(std_range))
        self.impl = impl

    def quantize(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x (any shape) -> (indices int32, dequantised values float32), nearest reconstruction value."""
        return dimwise_quant.dimwise_quantize(x.astype(jnp.float32), reconstruction_values=self.table,
                                              impl=self.impl, **self.kw)

    def dequantize(self, indices: jax.Array) -> jax.Array:
        return dimwise_quant.dequantize(indices, self.table, **self.kw)


# ----------------------------------------------------------------------------- blocks
class Block(nnx.Module):
    """timm ViT Block (pre-LN, qkv bias, exact-GELU Mlp); dropout where timm puts it (training only)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs, dtype,
                 attention_impl: str = "xla"):
        self.norm1 = layers.LayerNorm(dim)
        self.attn = layers.Attention(dim, num_heads, rngs=rngs, dtype=dtype, attention_impl=attention_impl)
        self.norm2 = layers.LayerNorm(dim)
        self.mlp = layers.Mlp(dim, int(dim * mlp_ratio), activation=_exact_gelu, rngs=rngs, dtype=dtype)

    def __call__(self, x, *, mask=None, attn_dropout=0.0, proj_dropout=0.0, dropout_rng=None):
        r = [None] * 4 if dropout_rng is None else list(jax.random.split(dropout_rng, 4))
        attn = self.attn(self.norm1(x), mask=mask, dropout_rate=attn_dropout, dropout_rng=r[0])
        x = x + layers.dropout(attn, proj_dropout, r[1])
        return x + _mlp(self.mlp, self.norm2(x), proj_dropout, r[2], r[3])


def _mlp(mlp: layers.Mlp, x, rate, rng_hidden, rng_out):
    """timm Mlp with ``drop=rate``: dropout after the activation and after fc2."""
    return layers.dropout(mlp.fc2(layers.dropout(mlp.activation(mlp.fc1(x)), rate, rng_hidden)), rate, rng_out)


class CausalBlock(nnx.Module):
    """Channel-AR block: pre-LN, adaLN-modulated qk-norm causal attention and Mlp, gated residuals.

    The condition ``c`` is per position (M, L, C); adaLN chunks (shift, scale, gate) x (msa, mlp).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs, dtype,
                 attention_impl: str = "xla"):
        self.norm1 = layers.LayerNorm(dim)
        self.attn = layers.Attention(dim, num_heads, qk_norm=True, rngs=rngs, dtype=dtype,
                                     attention_impl=attention_impl)
        self.norm2 = layers.LayerNorm(dim)
        self.mlp = layers.Mlp(dim, int(dim * mlp_ratio), activation=_exact_gelu, rngs=rngs, dtype=dtype)
        # adaLN-Zero: upstream zero-initialises this output layer.
        self.adaLN_modulation = layers.dense(dim, 6 * dim, ("embed", "mlp"), kernel_init=layers.zeros,
                                             rngs=rngs, dtype=dtype)

    def __call__(self, x, c, *, mask, kv_valid=None, kv_cache=None, cache_index=None, attn_dropout=0.0,
                 proj_dropout=0.0, dropout_rng=None):
        r = [None] * 4 if dropout_rng is None else list(jax.random.split(dropout_rng, 4))
        ada = self.adaLN_modulation(nnx.silu(c)).astype(x.dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(ada, 6, axis=-1)
        h = layers.modulate(self.norm1(x), shift_msa, scale_msa)
        attn = self.attn(h, mask=mask, kv_valid=kv_valid, kv_cache=kv_cache, cache_index=cache_index,
                         return_kv=kv_cache is not None, dropout_rate=attn_dropout, dropout_rng=r[0])
        attn, new_kv = attn if kv_cache is not None else (attn, None)
        x = x + gate_msa * layers.dropout(attn, proj_dropout, r[1])
        x = x + gate_mlp * _mlp(self.mlp, layers.modulate(self.norm2(x), shift_mlp, scale_mlp), proj_dropout,
                                r[2], r[3])
        return x, new_kv


class FinalLayer(nnx.Module):
    """Non-affine LayerNorm then adaLN with chunk order (scale, shift) -- the reverse of the blocks'/DiT's."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype):
        self.adaLN_modulation = layers.dense(dim, 2 * dim, ("embed", "mlp"), kernel_init=layers.zeros,
                                             rngs=rngs, dtype=dtype)

    def __call__(self, x, c):
        scale, shift = jnp.split(self.adaLN_modulation(nnx.silu(c)).astype(x.dtype), 2, axis=-1)
        return layers.modulate(layers.layer_norm(x), shift, scale)


# ----------------------------------------------------------------------------- the network
class TokenBridgeNet(nnx.Module):
    """MAR masked encoder/decoder over the spatial tokens + the per-dimension AR head."""

    def __init__(self, *, seq_len: int, token_dim: int = 16, encoder_embed_dim: int, encoder_depth: int,
                 encoder_num_heads: int, decoder_embed_dim: int, decoder_depth: int, decoder_num_heads: int,
                 channel_embed_dim: int, channel_depth: int, channel_heads: int, mlp_ratio: float = 4.0,
                 num_classes: int = 1000, buffer_size: int = 64, attn_dropout: float = 0.0,
                 proj_dropout: float = 0.0, quantizer: Quantizer, channel_order=CHANNEL_ORDER,
                 attention_impl: str = "xla", remat: bool = False, rngs: nnx.Rngs, dtype=jnp.float32):
        order = np.asarray(channel_order, np.int32)
        if sorted(order.tolist()) != list(range(token_dim)):
            raise ValueError(f"channel_order {tuple(order.tolist())} is not a permutation of the {token_dim} "
                             "token dimensions")
        self.seq_len, self.token_dim, self.buffer_size = seq_len, token_dim, buffer_size
        self.num_classes = num_classes
        self.attn_dropout, self.proj_dropout = attn_dropout, proj_dropout
        self.remat = remat  # recompute each block's activations in the backward pass (memory: benchmarks/pod_plan.py)
        self.quantizer = quantizer
        self.channel_order = tuple(int(i) for i in order)  # tuples: static, not array state
        self.inv_channel_order = tuple(int(i) for i in np.argsort(order))
        self.channel_num_heads = channel_heads
        levels = quantizer.levels
        e, d, c = encoder_embed_dim, decoder_embed_dim, channel_embed_dim
        normal = nnx.initializers.normal(0.02)
        # attention_impl (layers.ATTENTION_IMPLS) for the encoder and decoder. The encoder's visibility mask is
        # per sample (traced) and splash attention takes only a static one, so on TPU the encoder keeps the xla
        # path; the channel AR's 16-long sequences always do (a fused kernel does not pay there).
        encoder_impl = "xla" if layers.resolve_attention_impl(attention_impl, dtype) == "pallas" else attention_impl

        # class embedding; a dropped label takes the learned fake_latent (the guidance null path)
        self.class_emb = nnx.Embed(num_classes, e, embedding_init=nnx.with_partitioning(normal, ("classes", "embed")),
                                   rngs=rngs)
        self.fake_latent = nnx.Param(normal(rngs.params(), (1, e)), out_sharding=(None, "embed"))
        # MAE encoder
        self.z_proj = layers.dense(token_dim, e, ("channels", "embed"), rngs=rngs, dtype=dtype)
        self.z_proj_ln = layers.LayerNorm(e)
        self.encoder_pos_embed_learned = nnx.Param(normal(rngs.params(), (buffer_size + seq_len, e)),
                                                   out_sharding=("position", "embed"))
        self.encoder_blocks = nnx.List([Block(e, encoder_num_heads, mlp_ratio, rngs=rngs, dtype=dtype,
                                              attention_impl=encoder_impl)
                                        for _ in range(encoder_depth)])
        self.encoder_norm = layers.LayerNorm(e)
        # MAE decoder
        self.decoder_embed = layers.dense(e, d, ("embed", "embed"), rngs=rngs, dtype=dtype)
        self.mask_token = nnx.Param(normal(rngs.params(), (1, d)), out_sharding=(None, "embed"))
        self.decoder_pos_embed_learned = nnx.Param(normal(rngs.params(), (buffer_size + seq_len, d)),
                                                   out_sharding=("position", "embed"))
        self.decoder_blocks = nnx.List([Block(d, decoder_num_heads, mlp_ratio, rngs=rngs, dtype=dtype,
                                              attention_impl=attention_impl)
                                        for _ in range(decoder_depth)])
        self.decoder_norm = layers.LayerNorm(d)
        self.output_pos_embed = nnx.Param(normal(rngs.params(), (seq_len, d)), out_sharding=("position", "embed"))
        # channel AR head
        self.condition_proj = layers.dense(d, c, ("embed", "embed"), rngs=rngs, dtype=dtype)
        self.channel_embed = nnx.Param(normal(rngs.params(), (token_dim, c)), out_sharding=(None, "embed"))
        self.timesteps_embeddings = nnx.Param(normal(rngs.params(), (token_dim, c)), out_sharding=(None, "embed"))
        # upstream keeps torch's default N(0, 1) for these tables (its _init_weights skips nn.Embedding)
        self.token_embeddings = nnx.List([
            nnx.Embed(levels, c, embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0),
                                                                      ("codebook", "embed")), rngs=rngs)
            for _ in range(token_dim - 1)])
        self.channel_blocks = nnx.List([CausalBlock(c, channel_heads, mlp_ratio, rngs=rngs, dtype=dtype)
                                        for _ in range(channel_depth)])
        self.channel_norm = layers.LayerNorm(c)
        self.channel_final = FinalLayer(c, rngs=rngs, dtype=dtype)
        self.channel_heads = nnx.List([layers.dense(c, levels, ("embed", "codebook"), rngs=rngs, dtype=dtype)
                                       for _ in range(token_dim)])

    # --------------------------------------------------------------- quantizer
    def quantize(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, N, T) continuous tokens -> (indices, dequantised values), storage order."""
        return self.quantizer.quantize(tokens)

    def class_embedding(self, labels: jax.Array, drop: jax.Array | None = None) -> jax.Array:
        """(B, E): class rows; ``fake_latent`` where ``drop`` or where the label is ``num_classes`` (null)."""
        null = labels >= self.num_classes
        if drop is not None:
            null = null | drop
        emb = self.class_emb(jnp.clip(labels, 0, self.num_classes - 1))
        return jnp.where(null[:, None], self.fake_latent[...].astype(emb.dtype), emb)

    # --------------------------------------------------------------- MAE encoder / decoder
    def forward_mae_encoder(self, values: jax.Array, mask: jax.Array, class_embedding: jax.Array, *,
                            num_visible: int | None = None, dropout_rng=None):
        """values (B, N, T) dequantised tokens; mask (B, N) bool, True = masked; class_embedding (B, E).

        Returns (features (B, V, E), ids (B, V) sequence rows incl. the buffer, valid (B, V)): the first
        rows are the buffer then the visible tokens in index order (upstream's boolean gather); the
        rest, up to ``num_visible`` (default all), are masked tokens hidden from attention.
        """
        from trainers.sharding import constrain

        b = values.shape[0]
        x = self.z_proj(values.astype(self.z_proj.dtype))
        buffer = jnp.broadcast_to(class_embedding[:, None].astype(x.dtype), (b, self.buffer_size, x.shape[-1]))
        x = jnp.concatenate([buffer, x], axis=1) + self.encoder_pos_embed_learned[...].astype(x.dtype)
        x = self.z_proj_ln(x)
        keep = jnp.concatenate([jnp.ones((b, self.buffer_size), bool), ~mask], axis=1)
        v = self.buffer_size + self.seq_len if num_visible is None else num_visible
        ids = jnp.argsort((~keep).astype(jnp.int32), axis=1, stable=True)[:, :v]
        valid = jnp.take_along_axis(keep, ids, axis=1)
        x = constrain(jnp.take_along_axis(x, ids[..., None], axis=1), ("act_batch", "act_len", "act_embed"))
        attn_mask = valid[:, None, None, :]
        apply = self._block_apply()
        for i, block in enumerate(self.encoder_blocks):
            x = apply(block, x, attn_mask, None if dropout_rng is None else jax.random.fold_in(dropout_rng, i))
            x = constrain(x, ("act_batch", "act_len", "act_embed"))
        return self.encoder_norm(x), ids, valid

    def forward_mae_decoder(self, x: jax.Array, ids: jax.Array, valid: jax.Array, *, dropout_rng=None):
        """Encoder output -> (B, N, D) features of every spatial token (buffer dropped, + output positions)."""
        from trainers.sharding import constrain

        b = x.shape[0]
        x = self.decoder_embed(x)
        mask_token = self.mask_token[...].astype(x.dtype)
        x = jnp.where(valid[..., None], x, mask_token)
        canvas = jnp.broadcast_to(mask_token, (b, self.buffer_size + self.seq_len, x.shape[-1]))
        x = canvas.at[jnp.arange(b)[:, None], ids].set(x)  # ids are distinct: a plain scatter
        x = x + self.decoder_pos_embed_learned[...].astype(x.dtype)
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        apply = self._block_apply()
        for i, block in enumerate(self.decoder_blocks):
            x = apply(block, x, None, None if dropout_rng is None else jax.random.fold_in(dropout_rng, 1000 + i))
            x = constrain(x, ("act_batch", "act_len", "act_embed"))
        x = self.decoder_norm(x)[:, self.buffer_size:]
        return x + self.output_pos_embed[...].astype(x.dtype)

    def _block_apply(self):
        """(block, x, mask, dropout_rng) -> block output; under ``nnx.remat`` when ``self.remat``."""
        def apply(block, x, mask, rng):
            return block(x, mask=mask, attn_dropout=self.attn_dropout, proj_dropout=self.proj_dropout,
                         dropout_rng=rng)

        return nnx.remat(apply) if self.remat else apply

    def backbone(self, values, mask, class_embedding, *, num_visible=None, dropout_rng=None):
        enc_rng = dec_rng = None
        if dropout_rng is not None:
            enc_rng, dec_rng = jax.random.split(dropout_rng)
        enc, ids, valid = self.forward_mae_encoder(values, mask, class_embedding, num_visible=num_visible,
                                                   dropout_rng=enc_rng)
        return self.forward_mae_decoder(enc, ids, valid, dropout_rng=dec_rng)

    # --------------------------------------------------------------- channel AR head
    def _channel_transformer(self, x, c, *, mask=None, kv_valid=None, caches=None, cache_index=None,
                             dropout_rng=None):
        """Blocks -> channel_norm -> final adaLN layer. x, c (M, L, C). Returns (h, new caches)."""
        new = []
        for i, block in enumerate(self.channel_blocks):
            rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
            if self.remat and caches is None:  # training (teacher forcing); the cached decode keeps no activations
                x, kv = nnx.remat(lambda blk, x, c, mask, rng: blk(
                    x, c, mask=mask, kv_valid=kv_valid, attn_dropout=self.attn_dropout,
                    proj_dropout=self.proj_dropout, dropout_rng=rng))(block, x, c, mask, rng)
            else:
                x, kv = block(x, c, mask=mask, kv_valid=kv_valid, kv_cache=None if caches is None else caches[i],
                              cache_index=cache_index, attn_dropout=self.attn_dropout, proj_dropout=self.proj_dropout,
                              dropout_rng=rng)
            new.append(kv)
        return self.channel_final(self.channel_norm(x), c), new

    def _head_weights(self):
        kernel = jnp.stack([h.kernel[...] for h in self.channel_heads])  # (T, C, levels)
        bias = jnp.stack([h.bias[...] for h in self.channel_heads])  # (T, levels)
        return kernel, bias

    def forward_channel_ar(self, features: jax.Array, tokens: jax.Array, *, dropout_rng=None) -> jax.Array:
        """Teacher-forced logits. features (..., D); tokens (..., T) in channel order -> (..., T, levels)."""
        lead = features.shape[:-1]
        features = features.reshape(-1, features.shape[-1])
        tokens = tokens.reshape(-1, self.token_dim)
        cond = self.condition_proj(features)  # (M, C)
        emb = [table(tokens[:, i]) for i, table in enumerate(self.token_embeddings)]
        x = jnp.stack([cond] + [e.astype(cond.dtype) for e in emb], axis=1)  # (M, T, C)
        x = x + self.channel_embed[...].astype(x.dtype)
        c = cond[:, None] + self.timesteps_embeddings[...].astype(cond.dtype)
        causal = np.tril(np.ones((self.token_dim, self.token_dim), bool))  # static: a kernel compiles it in
        h, _ = self._channel_transformer(x, c, mask=causal, dropout_rng=dropout_rng)
        kernel, bias = self._head_weights()
        logits = jnp.einsum("mtc,tcv->mtv", h, kernel.astype(h.dtype)) + bias.astype(h.dtype)
        return logits.astype(jnp.float32).reshape(*lead, self.token_dim, -1)

    def sample_channel_ar(self, features: jax.Array, rng: jax.Array, *, temperature: float,
                          use_cache: bool = True) -> jax.Array:
        """(M, D) features -> (M, T) indices in channel order, one dimension at a time.

        As upstream ``_sample_channel_ar``: the first input is condition + step embedding 0; step c reads
        head c; temperature 0 is argmax (first maximum). With ``use_cache`` each step runs only its new
        position against cached keys/values; without, each step reruns the whole (causally masked)
        sequence, which is upstream's recompute of the prefix.
        """
        m = features.shape[0]
        t_dim = self.token_dim
        cond = self.condition_proj(features)
        c_seq = cond[:, None] + self.timesteps_embeddings[...].astype(cond.dtype)  # (M, T, C)
        channel_embed = self.channel_embed[...].astype(cond.dtype)
        tables = jnp.stack([t.embedding[...] for t in self.token_embeddings]).astype(cond.dtype)  # (T-1, lv, C)
        kernel, bias = self._head_weights()

        def pick(h, step):
            logits = (h @ kernel[step].astype(h.dtype) + bias[step].astype(h.dtype)).astype(jnp.float32)
            if temperature == 0:
                return jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return jax.random.categorical(jax.random.fold_in(rng, step), logits / temperature).astype(jnp.int32)

        def embed(tok, step):  # embedding of the token just chosen at ``step`` (table ``step``)
            return tables[jnp.minimum(step, t_dim - 2)][tok]

        positions = jnp.arange(t_dim)
        causal = np.tril(np.ones((t_dim, t_dim), bool))
        tokens = jnp.zeros((m, t_dim), jnp.int32)
        if use_cache:
            heads = self.channel_num_heads
            hd = cond.shape[-1] // heads
            empty = jnp.zeros((m, heads, t_dim, hd), cond.dtype)
            caches = [(empty, empty) for _ in self.channel_blocks]

            def step_cached(carry, step):
                x_in, caches, tokens = carry
                x = (x_in + channel_embed[step])[:, None]
                c = jax.lax.dynamic_index_in_dim(c_seq, step, axis=1)  # (M, 1, C)
                h, caches = self._channel_transformer(x, c, kv_valid=positions <= step, caches=caches,
                                                      cache_index=step)
                tok = pick(h[:, 0], step)
                return (embed(tok, step), caches, tokens.at[:, step].set(tok)), None

            (_, _, tokens), _ = jax.lax.scan(step_cached, (c_seq[:, 0], caches, tokens), positions)
            return tokens

        seq = jnp.zeros((m, t_dim, cond.shape[-1]), cond.dtype).at[:, 0].set(c_seq[:, 0])

        def step_full(carry, step):
            seq, tokens = carry
            h, _ = self._channel_transformer(seq + channel_embed, c_seq, mask=causal)
            tok = pick(jax.lax.dynamic_index_in_dim(h, step, axis=1, keepdims=False), step)
            nxt = jnp.minimum(step + 1, t_dim - 1)  # the last step's write is never read
            seq = jax.lax.dynamic_update_index_in_dim(seq, embed(tok, step), nxt, axis=1)
            return (seq, tokens.at[:, step].set(tok)), None

        (_, tokens), _ = jax.lax.scan(step_full, (seq, tokens), positions)
        return tokens


# ----------------------------------------------------------------------------- the objective
def sample_mask_ratio(rng: jax.Array, mask_ratio_min: float) -> jax.Array:
    """MAR's stats.truncnorm((min - 1) / 0.25, 0, loc=1, scale=0.25): one ratio in [min, 1]."""
    z = jax.random.truncated_normal(rng, (mask_ratio_min - 1.0) / 0.25, 0.0)
    return 1.0 + 0.25 * z


def random_orders(rng: jax.Array, batch: int, seq_len: int) -> jax.Array:
    """(B, N) one uniformly random permutation of the token indices per sample (MAR's sample_orders)."""
    return jnp.argsort(jax.random.uniform(rng, (batch, seq_len)), axis=1).astype(jnp.int32)


def mask_from_orders(orders: jax.Array, num_masked) -> jax.Array:
    """(B, N) bool: True for the first ``num_masked`` tokens of each order (MAR's random_masking)."""
    rank = jnp.argsort(orders, axis=1)
    return rank < num_masked


def max_visible(seq_len: int, buffer_size: int, mask_ratio_min: float) -> int:
    return buffer_size + seq_len - int(math.ceil(seq_len * mask_ratio_min))


def training_terms(model: TokenBridgeNet, tokens: jax.Array, labels: jax.Array, mask: jax.Array,
                   drop: jax.Array, *, num_visible: int | None, dropout_rng=None):
    """The training forward on continuous tokens (B, N, T).

    Returns (decoder features (B, N, D), logits (B, N, T, lv), targets in channel order, loss).

    The loss is the cross-entropy over every dimension of every masked token, averaged over them.
    """
    indices, values = model.quantize(tokens)
    targets = indices[..., np.asarray(model.channel_order)]
    enc_rng = head_rng = None
    if dropout_rng is not None:
        enc_rng, head_rng = jax.random.split(dropout_rng)
    z = model.backbone(values, mask, model.class_embedding(labels, drop), num_visible=num_visible,
                       dropout_rng=enc_rng)
    logits = model.forward_channel_ar(z, targets, dropout_rng=head_rng)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # (B, N, T)
    weight = mask.astype(jnp.float32)[..., None]
    loss = jnp.sum(ce * weight) / (jnp.sum(weight) * model.token_dim)
    return z, logits, targets, loss


# ----------------------------------------------------------------------------- the sampler
def mask_schedule(seq_len: int, num_iter: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(masked before step s, masked after step s, upstream's mask_len of step s), each (num_iter,).

    mask_len = max(1, min(masked - 1, floor(seq_len cos(pi/2 (s+1)/num_iter)))); the last step predicts
    every remaining token (its mask_len, 1, still sets the guidance scale).
    """
    before, after, lens = [], [], []
    masked = seq_len
    for s in range(num_iter):
        ratio = np.cos(math.pi / 2.0 * (s + 1) / num_iter)
        mask_len = max(1, min(masked - 1, int(np.floor(seq_len * ratio))))
        nxt = 0 if s == num_iter - 1 else mask_len
        before.append(masked), after.append(nxt), lens.append(mask_len)
        masked = nxt
    return np.asarray(before), np.asarray(after), np.asarray(lens)


def cfg_schedule_scales(cfg: float, schedule: str, seq_len: int, mask_lens: np.ndarray) -> np.ndarray:
    """Guidance scale per step: linear 1 + (cfg - 1)(N - mask_len)/N on the next step's mask_len, or constant."""
    if schedule == "linear":
        return (1.0 + (cfg - 1.0) * (seq_len - mask_lens) / seq_len).astype(np.float32)
    if schedule == "constant":
        return np.full(mask_lens.shape, cfg, np.float32)
    raise ValueError(f"cfg schedule {schedule!r}: must be one of {CFG_SCHEDULES}")


def sample_tokens(model: TokenBridgeNet, rng: jax.Array, labels: jax.Array, *, num_iter: int, cfg: float = 1.0,
                  cfg_schedule: str = "linear", temperature: float = 1.0, use_cache: bool = True,
                  guided: bool | None = None) -> jax.Array:
    """(B, N, T) quantisation indices in storage order, by upstream's sample_tokens loop.

    ``guided`` runs the conditional and the unconditional (fake_latent) backbone (default: cfg != 1)
    and feeds the head z_u + w (z_c - z_u); labels equal to ``num_classes`` mean unconditional.
    """
    n, t_dim = model.seq_len, model.token_dim
    b = labels.shape[0]
    guided = (cfg != 1.0) if guided is None else guided
    before, after, lens = mask_schedule(n, num_iter)
    counts = before - after
    slab = max(int(counts.max()), 1)
    scales = jnp.asarray(cfg_schedule_scales(cfg, cfg_schedule, n, lens))
    before, after, counts = (jnp.asarray(a, jnp.int32) for a in (before, after, counts))
    rng_order, rng_steps = jax.random.split(rng)
    orders = random_orders(rng_order, b, n)
    rank = jnp.argsort(orders, axis=1)
    cond_emb = model.class_embedding(labels)
    uncond_emb = jnp.broadcast_to(model.fake_latent[...].astype(cond_emb.dtype), cond_emb.shape)
    inv = jnp.asarray(model.inv_channel_order)
    rows = jnp.arange(b)[:, None]

    def step(tokens, s):
        mask = rank < before[s]
        values = model.quantizer.dequantize(tokens)
        if guided:
            z = model.backbone(jnp.concatenate([values, values]), jnp.concatenate([mask, mask]),
                               jnp.concatenate([cond_emb, uncond_emb]))
            z_cond, z_uncond = jnp.split(z, 2)
            z = z_uncond + scales[s] * (z_cond - z_uncond)
        else:
            z = model.backbone(values, mask, cond_emb)
        # the tokens of this step: orders[:, after[s] : before[s]], in a fixed-size slab; rows past the
        # count point at other tokens (distinct, outside the step) and write back their current value.
        j = jnp.arange(slab)
        pos = jnp.take_along_axis(orders, ((after[s] + j) % n)[None].repeat(b, 0), axis=1)  # (B, slab)
        feats = jnp.take_along_axis(z, pos[..., None], axis=1)
        new = model.sample_channel_ar(feats.reshape(b * slab, -1), jax.random.fold_in(rng_steps, s),
                                      temperature=temperature, use_cache=use_cache)
        new = new.reshape(b, slab, t_dim)[..., inv]  # channel order -> storage order
        old = tokens[rows, pos]
        tokens = tokens.at[rows, pos].set(jnp.where((j < counts[s])[None, :, None], new, old))
        return tokens, None

    tokens, _ = jax.lax.scan(step, jnp.zeros((b, n, t_dim), jnp.int32), jnp.arange(num_iter))
    return tokens


# ----------------------------------------------------------------------------- the method
class TokenBridge(Method):
    """TokenBridge: dimension-wise quantised latents, MAR backbone, per-dimension AR head."""

    def quantizer(self) -> Quantizer:
        m = self.config.model
        return Quantizer(bits=m.quant_bits, min_range=m.quant_min, max_range=m.quant_max, std_range=m.std_range,
                         scheme=m.quant_scheme, impl=m.quant_impl)

    def grid(self) -> int:
        m = self.config.model
        return m.input_size // m.patch_size

    def validate_config(self, config) -> None:
        m, s = config.model, config.sample
        if m.input_size % m.patch_size:
            raise ValueError(f"config.model.input_size={m.input_size} is not divisible by "
                             f"config.model.patch_size={m.patch_size}")
        token_dim = m.in_channels * m.patch_size ** 2
        if sorted(m.channel_order) != list(range(token_dim)):
            raise ValueError(f"config.model.channel_order={tuple(m.channel_order)} must be a permutation of the "
                             f"{token_dim} token dimensions (in_channels x patch_size^2)")
        for prefix in ("encoder", "decoder"):
            dim, heads = m[f"{prefix}_embed_dim"], m[f"{prefix}_num_heads"]
            if dim % heads:
                raise ValueError(f"config.model.{prefix}_embed_dim={dim} is not divisible by "
                                 f"config.model.{prefix}_num_heads={heads}")
        if m.channel_embed_dim % m.channel_heads:
            raise ValueError(f"config.model.channel_embed_dim={m.channel_embed_dim} is not divisible by "
                             f"config.model.channel_heads={m.channel_heads}")
        for field in ("attn_dropout", "proj_dropout", "label_drop_prob"):
            if not 0.0 <= m[field] < 1.0:
                raise ValueError(f"config.model.{field}={m[field]}: must be in [0, 1)")
        if not 0.0 < m.mask_ratio_min <= 1.0:
            raise ValueError(f"config.model.mask_ratio_min={m.mask_ratio_min}: must be in (0, 1]")
        if not 1 <= m.quant_bits <= 12:
            raise ValueError(f"config.model.quant_bits={m.quant_bits}: must be in [1, 12]")
        if m.quant_scheme not in ("gaussian", "uniform"):
            raise ValueError(f"config.model.quant_scheme={m.quant_scheme!r}: must be 'gaussian' or 'uniform'")
        if not m.quant_min < m.quant_max:
            raise ValueError(f"config.model.quant_min={m.quant_min} must be below quant_max={m.quant_max}")
        if m.attention_impl not in layers.ATTENTION_IMPLS:
            raise ValueError(f"config.model.attention_impl={m.attention_impl!r}: must be one of "
                             f"{layers.ATTENTION_IMPLS}")
        if m.quant_impl not in ("auto", "pallas", "xla"):
            raise ValueError(f"config.model.quant_impl={m.quant_impl!r}: must be 'auto', 'pallas' or 'xla'")
        if s.num_steps < 1:
            raise ValueError(f"config.sample.num_steps={s.num_steps}: must be >= 1 (MAR iterations)")
        if s.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"config.sample.cfg_schedule={s.cfg_schedule!r}: must be one of {CFG_SCHEDULES}")
        if s.temperature < 0:
            raise ValueError(f"config.sample.temperature={s.temperature}: must be >= 0 (0 = argmax)")
        check_data_shape(config)

    def create_model(self, rngs: nnx.Rngs) -> TokenBridgeNet:
        m = self.config.model
        return TokenBridgeNet(
            seq_len=self.grid() ** 2, token_dim=m.in_channels * m.patch_size ** 2,
            encoder_embed_dim=m.encoder_embed_dim, encoder_depth=m.encoder_depth,
            encoder_num_heads=m.encoder_num_heads, decoder_embed_dim=m.decoder_embed_dim,
            decoder_depth=m.decoder_depth, decoder_num_heads=m.decoder_num_heads,
            channel_embed_dim=m.channel_embed_dim, channel_depth=m.channel_depth, channel_heads=m.channel_heads,
            mlp_ratio=m.mlp_ratio, num_classes=m.num_classes, buffer_size=m.buffer_size,
            attn_dropout=m.attn_dropout, proj_dropout=m.proj_dropout, quantizer=self.quantizer(),
            channel_order=tuple(m.channel_order), attention_impl=m.attention_impl, remat=m.get("remat", False), rngs=rngs,
            dtype=jnp.dtype(self.config.compute_dtype))

    def to_tokens(self, x: jax.Array) -> jax.Array:
        return layers.patchify(x.astype(jnp.float32), self.config.model.patch_size)

    def from_tokens(self, tokens: jax.Array) -> jax.Array:
        m = self.config.model
        return layers.unpatchify(tokens, m.patch_size, m.in_channels)

    def loss(self, model: TokenBridgeNet, batch, rng):
        m = self.config.model
        x = batch["latent"] if "latent" in batch else batch["image"]
        tokens = self.to_tokens(x)
        b, n = tokens.shape[:2]
        rng_ratio, rng_order, rng_drop, rng_dropout = jax.random.split(rng, 4)
        ratio = sample_mask_ratio(rng_ratio, m.mask_ratio_min)
        low = int(math.ceil(n * m.mask_ratio_min))
        num_masked = jnp.clip(jnp.ceil(n * ratio), low, n).astype(jnp.int32)
        mask = mask_from_orders(random_orders(rng_order, b, n), num_masked)
        drop = jax.random.uniform(rng_drop, (b,)) < m.label_drop_prob
        *_, loss = training_terms(model, tokens, batch["label"], mask, drop,
                                    num_visible=max_visible(n, m.buffer_size, m.mask_ratio_min),
                                    dropout_rng=rng_dropout)
        return loss, {"loss": loss, "mask_ratio": ratio}

    def sample(self, model: TokenBridgeNet, rng: jax.Array, labels: jax.Array, *, num_steps: int | None = None,
               cfg_scale: float | None = None, cfg_schedule: str | None = None, temperature: float | None = None,
               use_cache: bool | None = None) -> jax.Array:
        """Class-conditional samples (B, H, W, C) in the data's space: dequantised latents (or pixels)."""
        s = self.config.sample
        pick = lambda given, default: default if given is None else given  # noqa: E731
        indices = sample_tokens(
            model, rng, labels, num_iter=num_steps or s.num_steps, cfg=pick(cfg_scale, s.cfg_scale),
            cfg_schedule=cfg_schedule or s.cfg_schedule, temperature=pick(temperature, s.temperature),
            use_cache=pick(use_cache, s.use_cache))
        return self.from_tokens(model.quantizer.dequantize(indices))


# ----------------------------------------------------------------------------- conversion
# Upstream layout (checkpoint-last.pth: "model" / "model_ema" state_dicts): torch Linear (out, in);
# LayerNorm weight/bias; position tables (1, L, D); mask_token (1, 1, D); buffers channel_mask (causal
# -inf), reconstruction_values / boundaries (the quantizer tables) are constants checked against ours.

def _linear(sd, prefix):
    return {"kernel": np.asarray(sd[prefix + ".weight"]).T, "bias": np.asarray(sd[prefix + ".bias"])}


def _norm(sd, prefix):
    return {"scale": np.asarray(sd[prefix + ".weight"]), "bias": np.asarray(sd[prefix + ".bias"])}


def _vit_block(sd, p):
    return {"norm1": _norm(sd, p + ".norm1"), "norm2": _norm(sd, p + ".norm2"),
            "attn": {"qkv": _linear(sd, p + ".attn.qkv"), "proj": _linear(sd, p + ".attn.proj")},
            "mlp": {"fc1": _linear(sd, p + ".mlp.fc1"), "fc2": _linear(sd, p + ".mlp.fc2")}}


def _causal_block(sd, p):
    out = _vit_block(sd, p)
    out["attn"].update(q_norm=_norm(sd, p + ".attn.q_norm"), k_norm=_norm(sd, p + ".attn.k_norm"))
    out["adaLN_modulation"] = _linear(sd, p + ".adaLN_modulation.1")
    return out


def _depth_of(sd, prefix) -> int:
    ids = [int(k.split(".")[1]) for k in sd if k.startswith(prefix + ".")]
    return 1 + max(ids) if ids else 0


def params_from_torch(sd: dict[str, np.ndarray], model: TokenBridgeNet) -> dict:
    """Pure-dict params of :class:`TokenBridgeNet` from an upstream state_dict; checks the constant buffers."""
    for name, ours in (("encoder_blocks", model.encoder_blocks), ("decoder_blocks", model.decoder_blocks),
                       ("channel_blocks", model.channel_blocks), ("token_embeddings", model.token_embeddings),
                       ("channel_heads", model.channel_heads)):
        depth = _depth_of(sd, name)
        if depth != len(ours):
            raise ValueError(f"checkpoint has {depth} {name} but the model has {len(ours)} (check config.model)")
    if "reconstruction_values" in sd:
        theirs = np.asarray(sd["reconstruction_values"], np.float32)
        if theirs.shape != model.quantizer.table.shape or not np.array_equal(theirs, model.quantizer.table):
            raise ValueError(f"checkpoint reconstruction_values ({theirs.shape[0]} levels) differ from the "
                             f"quantizer's table ({model.quantizer.levels} levels): check config.model.quant_bits, "
                             "std_range and quant_scheme")
    if "channel_mask" in sd:
        t = model.token_dim
        if not np.array_equal(np.asarray(sd["channel_mask"]) == 0, np.tril(np.ones((t, t), bool))):
            raise ValueError("checkpoint channel_mask is not the causal mask over the token dimensions")
    n = model.buffer_size + model.seq_len
    pos = np.asarray(sd["encoder_pos_embed_learned"])
    if pos.shape[1] != n:
        raise ValueError(f"checkpoint has {pos.shape[1]} encoder positions; the model has buffer_size + seq_len = {n}")
    return {
        "class_emb": {"embedding": np.asarray(sd["class_emb.weight"])},
        "fake_latent": np.asarray(sd["fake_latent"]).reshape(1, -1),
        "z_proj": _linear(sd, "z_proj"),
        "z_proj_ln": _norm(sd, "z_proj_ln"),
        "encoder_pos_embed_learned": pos[0],
        "encoder_blocks": {i: _vit_block(sd, f"encoder_blocks.{i}") for i in range(len(model.encoder_blocks))},
        "encoder_norm": _norm(sd, "encoder_norm"),
        "decoder_embed": _linear(sd, "decoder_embed"),
        "mask_token": np.asarray(sd["mask_token"]).reshape(1, -1),
        "decoder_pos_embed_learned": np.asarray(sd["decoder_pos_embed_learned"])[0],
        "decoder_blocks": {i: _vit_block(sd, f"decoder_blocks.{i}") for i in range(len(model.decoder_blocks))},
        "decoder_norm": _norm(sd, "decoder_norm"),
        "output_pos_embed": np.asarray(sd["output_pos_embed"])[0],
        "condition_proj": _linear(sd, "condition_proj"),
        "channel_embed": np.asarray(sd["channel_embed"])[0],
        "timesteps_embeddings": np.asarray(sd["timesteps_embeddings"])[0],
        "token_embeddings": {i: {"embedding": np.asarray(sd[f"token_embeddings.{i}.weight"])}
                             for i in range(len(model.token_embeddings))},
        "channel_blocks": {i: _causal_block(sd, f"channel_blocks.{i}") for i in range(len(model.channel_blocks))},
        "channel_norm": _norm(sd, "channel_norm"),
        "channel_final": {"adaLN_modulation": _linear(sd, "channel_final.adaLN_modulation.1")},
        "channel_heads": {i: _linear(sd, f"channel_heads.{i}") for i in range(len(model.channel_heads))},
    }


def _checked_params(sd, abstract: TokenBridgeNet) -> dict:
    params = params_from_torch(sd, abstract)
    expected = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    if jax.tree.structure(params) != jax.tree.structure(expected):
        raise ValueError("checkpoint parameters do not match the model's parameter tree")
    for (path, ours), theirs in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(params)):
        if tuple(ours.shape) != tuple(np.shape(theirs)):
            raise ValueError(f"{jax.tree_util.keystr(path)}: checkpoint shape {np.shape(theirs)} != model shape "
                             f"{tuple(ours.shape)} (check config.model sizes)")
    return params


def load_into(model: TokenBridgeNet, sd: dict[str, np.ndarray]) -> TokenBridgeNet:
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, _checked_params(sd, model)))
    nnx.update(model, state)
    return model


def import_tokenbridge(state_dict: dict[str, np.ndarray], config) -> dict:
    """IMPORTERS entry: upstream checkpoint-last.pth (its "model_ema" entry, which upstream samples) -> params."""
    for wrapper in ("model_ema", "model"):
        if any(k.startswith(wrapper + ".") for k in state_dict):
            state_dict = {k[len(wrapper) + 1:]: v for k, v in state_dict.items() if k.startswith(wrapper + ".")}
            break
    method = TokenBridge(config)
    abstract = layers.abstract_module(method.create_model)  # shapes only: no init of 900M params
    return jax.tree.map(jnp.asarray, _checked_params(state_dict, abstract))


def _fixture_model(meta, buffers) -> TokenBridgeNet:
    """The network of a fixture, from its recorded upstream constructor arguments and quantizer buffer."""
    c = meta["constructor_args"]
    grid = c["img_size"] // c["vae_stride"] // c["patch_size"]
    quantizer = Quantizer(min_range=c["quant_min"], max_range=c["quant_max"], std_range=c["std_range"],
                          reconstruction_values=buffers["reconstruction_values"])
    if quantizer.levels != c["quant_levels"]:
        raise ValueError(f"fixture buffer has {quantizer.levels} levels; constructor says {c['quant_levels']}")
    return TokenBridgeNet(
        seq_len=grid ** 2, token_dim=c["vae_embed_dim"] * c["patch_size"] ** 2,
        encoder_embed_dim=c["encoder_embed_dim"], encoder_depth=c["encoder_depth"],
        encoder_num_heads=c["encoder_num_heads"], decoder_embed_dim=c["decoder_embed_dim"],
        decoder_depth=c["decoder_depth"], decoder_num_heads=c["decoder_num_heads"],
        channel_embed_dim=c["channel_embed_dim"], channel_depth=c["channel_depth"],
        channel_heads=c["channel_heads"], mlp_ratio=c["mlp_ratio"], num_classes=c["class_num"],
        buffer_size=c["buffer_size"], quantizer=quantizer, rngs=nnx.Rngs(0))


def _jitted(fn, model):
    graphdef, state = nnx.split(model)
    compiled = jax.jit(lambda state, *a: fn(nnx.merge(graphdef, state), *a))
    return lambda *a: compiled(state, *a)


def check_backbone_fixture(meta, params, buffers, inputs):
    """FIXTURE_CHECKS entry for kind ``tokenbridge_backbone``: upstream's forward step by step."""
    model = load_into(_fixture_model(meta, buffers), {**params, **buffers})
    p = meta["constructor_args"]["patch_size"]
    x = jnp.transpose(jnp.asarray(inputs["x"], jnp.float32), (0, 2, 3, 1))
    tokens = layers.patchify(x, p)
    mask = np.asarray(inputs["mask"]) > 0.5
    drop = jnp.asarray(np.asarray(inputs["label_drop"]) > 0.5)
    labels = jnp.asarray(inputs["labels"], jnp.int32)
    num_visible = model.buffer_size + model.seq_len - int(np.asarray(inputs["num_masked"]))

    def run(model, tokens, labels, mask, drop):
        indices, values = model.quantize(tokens)
        targets = indices[..., np.asarray(model.channel_order)]
        cls = model.class_embedding(labels, drop)
        enc, ids, valid = model.forward_mae_encoder(values, mask, cls, num_visible=num_visible)
        z = model.forward_mae_decoder(enc, ids, valid)
        _, logits, _, loss = training_terms(model, tokens, labels, mask, drop, num_visible=num_visible)
        return indices, values, targets, cls, enc, z, logits, loss

    indices, values, targets, cls, enc, z, logits, loss = _jitted(run, model)(tokens, labels, jnp.asarray(mask), drop)
    return {"tokens_patchified": np.asarray(tokens), "quant_indices": np.asarray(indices),
            "quant_values": np.asarray(values), "gt_tokens": np.asarray(targets), "class_embedding": np.asarray(cls),
            "encoder_out": np.asarray(enc), "decoder_out": np.asarray(z), "logits": np.asarray(logits)[mask],
            "loss": np.asarray(loss)}


def check_head_fixture(meta, params, buffers, inputs):
    """FIXTURE_CHECKS entry for kind ``tokenbridge_head``: teacher-forced logits and the greedy channel AR."""
    model = load_into(_fixture_model(meta, buffers), {**params, **buffers})
    tokens = jnp.asarray(inputs["tokens"], jnp.int32)

    def run(model, features, tokens, greedy_features):
        logits = model.forward_channel_ar(features, tokens)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()
        greedy = model.sample_channel_ar(greedy_features, jax.random.PRNGKey(0), temperature=0.0, use_cache=False)
        return logits, ce, greedy

    logits, ce, greedy = _jitted(run, model)(jnp.asarray(inputs["features"]), tokens,
                                             jnp.asarray(inputs["greedy_features"]))
    return {"logits": np.asarray(logits), "ce_loss": np.asarray(ce), "greedy_tokens": np.asarray(greedy)}


FIXTURE_CHECKS = {"tokenbridge_backbone": check_backbone_fixture, "tokenbridge_head": check_head_fixture}
IMPORTERS = {"tokenbridge": import_tokenbridge}
