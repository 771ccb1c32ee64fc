"""ReTok: a flexible 1D tokenizer with Redundant Token Padding and Hierarchical Semantic Regularization.

Paper: Fu, Guo, Wang, Song, Liu, Wen, "Improving Flexible Image Tokenizers for Autoregressive Image
Generation" (arXiv 2601.01535); code zfu006/ReTok (a GigaTok + LlamaGen fork:
``tokenizer/tokenizer_image/vq/vq_vit_model.py`` ``VQVitModelPlus``, ``vq/blocks.py``). Its training
code is not released; the training here follows the paper (notes: shared/methods/retok_*.md).

Network (released code, GigaTok's hybrid tokenizer):

* CNN encoder (LlamaGen VQGAN without attention) -> (B, g, g, z_channels) features S.
* Q-Former ViT encoder (``s2to1encoder``): memory = ``encoder_embed(ln_pre(S))`` (tokens row-major)
  with ``positional_embedding`` on its keys; the N = 256 queries are the *multi-level average pools*
  of that memory (groups of 1, 1, 2, 4, ..., N/2 tokens, the grid splitting in width first), ordered
  coarse to fine. **Redundant Token Padding**: the M = N - k_min = 224 queries ``queries[32:]`` are
  copied and appended (480 queries), all pass through ``global_proj``; query positions are
  ``[latent_token_positional_embedding (N); latent_token_positional_embedding_comp (M)]``.
  DETR pre-norm Q-Former layers (tokenizers/vit.py ``QFormerLayer``), ``ln_post``, 1x1 ``conv_out``.
* ``quant_conv`` (1x1) -> VQ over all 480 tokens (16384 x 8, l2-normalised codes, commitment 0.25,
  the rotation trick; tokenizers/quantizers.py) -> ``post_quant_conv``.
* Q-Former ViT decoder (``s1to2decoder``): memory = ``decoder_embed(ln_pre(tokens))`` truncated to
  the first k (default N = 256) with key positions ``[pe; pe_comp][:k]``; the g*g 2-D queries are
  the *first* token repeated, with ``positional_embedding`` as query_pos. After layer
  ``distill_depth`` the query states go through ``distill_mlp`` (the HSR features); ``ln_post``,
  reshape to (g, g), 3x3 ``conv_out`` to z_channels.
* CNN decoder: adaptive GroupNorm before every level (GroupNorm without affine, scale =
  Linear(sqrt(var_hw(z) + eps)) with torch's *unbiased* variance, bias = Linear(mean_hw(z)), z the
  decoder input), depth-to-space (DCR order) upsampling, no attention.

Layouts: images NHWC in [-1, 1]; tokens (B, n, C).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import layers
from models.pretrained import merge_module, regex_rename, torch_to_params
from tokenizers import losses, quantizers, vit, vq_cnn
from tokenizers.kl_vae import conv, group_norm
from trainers.method import Method, ModelDef

# Upstream's ViTEncoder/ViTDecoder size tables (blocks.py): width, layers, heads. GigaTok's "small" has
# 6 layers (not TiTok's 8).
VIT_SIZES = {"tiny": (256, 4, 4), "small": (512, 6, 8), "base": (768, 12, 12), "large": (1024, 24, 16),
             "xl": (1280, 36, 20), "xxl": (1536, 48, 24)}
GROUPS = vq_cnn.GROUPS  # upstream's Normalize(): GroupNorm(32, eps 1e-6), hard-coded (``norm_groups``)


# ----------------------------------------------------------------------------
# CNN encoder and decoder
# ----------------------------------------------------------------------------


class AdaptiveGroupNorm(nnx.Module):
    """GroupNorm(32, affine=False)(x) * gamma(std_hw(z)) + beta(mean_hw(z)) (MAGVIT-v2 style).

    ``unbiased``: the released code's ``torch.var`` divides by H*W - 1 (despite its "not unbias"
    comment); False divides by H*W.
    """

    def __init__(self, z_channels: int, channels: int, rngs: nnx.Rngs, *, eps: float = 1e-6,
                 unbiased: bool = True, groups: int = GROUPS):
        self.gn = nnx.GroupNorm(channels, num_groups=groups, epsilon=eps, use_scale=False, use_bias=False,
                                use_fast_variance=False, rngs=rngs)
        self.gamma = layers.dense(z_channels, channels, ("channels", "conv_out"), rngs=rngs)
        self.beta = layers.dense(z_channels, channels, ("channels", "conv_out"), rngs=rngs)
        self.eps, self.unbiased = eps, unbiased

    def __call__(self, x, style):
        s = style.reshape(style.shape[0], -1, style.shape[-1]).astype(jnp.float32)
        std = jnp.sqrt(jnp.var(s, axis=1, ddof=1 if self.unbiased else 0) + self.eps)
        scale = self.gamma(std)[:, None, None, :]
        bias = self.beta(jnp.mean(s, axis=1))[:, None, None, :]
        return self.gn(x) * scale + bias


class CNNDecoder(nnx.Module):
    """(B, g, g, z_channels) -> image (B, f*g, f*g, 3) (upstream ``Decoder``: ``num_res_blocks + 1``
    blocks per level, adaptive GroupNorm before each level, depth-to-space upsampling)."""

    def __init__(self, *, ch: int, ch_mult, num_res_blocks: int, z_channels: int, out_channels: int = 3,
                 adaptive_gn: bool = True, d2s_up: bool = True, unbiased_style_var: bool = True,
                 norm_groups: int = GROUPS, rngs: nnx.Rngs):
        g = norm_groups
        block_in = ch * ch_mult[-1]
        self.conv_in = conv(z_channels, block_in, 3, rngs)
        self.mid = vq_cnn.mid_blocks(block_in, attn=False, groups=g, rngs=rngs)
        levels, adaptive = [], []
        for i_level in reversed(range(len(ch_mult))):
            out = ch * ch_mult[i_level]
            if adaptive_gn:
                adaptive.append(AdaptiveGroupNorm(z_channels, block_in, rngs, unbiased=unbiased_style_var, groups=g))
            up = None if i_level == 0 else ("d2s" if d2s_up else "up")
            levels.append(vq_cnn.ConvLevel(block_in, out, num_res_blocks + 1, resample=up, groups=g, rngs=rngs))
            block_in = out
        self.conv_blocks = nnx.List(levels)
        self.adaptive = nnx.List(adaptive) if adaptive_gn else None
        self.norm_out = group_norm(block_in, g, rngs)
        self.conv_out = conv(block_in, out_channels, 3, rngs)

    def __call__(self, z):
        h = vq_cnn.run_mid(self.mid, self.conv_in(z))
        for i, level in enumerate(self.conv_blocks):
            if self.adaptive is not None:
                h = self.adaptive[i](h, z)
            h = level(h)
        return self.conv_out(nnx.swish(self.norm_out(h)))


# ----------------------------------------------------------------------------
# Q-Former ViT encoder and decoder
# ----------------------------------------------------------------------------


def multi_level_pool(x: jax.Array, n_level: int) -> jax.Array:
    """Upstream ``sample_multi_level_1d_tokens(first_grow="row")``: (B, H, W, C) -> (B, 2^n_level, C).

    Group 0 is the global mean; group i >= 1 (level l = i - 1) average-pools 2^ceil(l/2) (width) x
    2^floor(l/2) (height) blocks, flattened row-major; sizes 1, 1, 2, 4, ..., 2^(n_level - 1).
    """
    b, h, w, c = x.shape
    groups = []
    for i in range(n_level + 1):
        level = max(i - 1, 0)
        wb, hb = 2 ** ((level + 1) // 2), 2 ** (level // 2)
        if h % hb or w % wb:
            raise ValueError(f"a {h}x{w} grid cannot be split into {hb}x{wb} blocks (level {level}); the grid "
                             f"must allow 2^{n_level} multi-level tokens")
        pooled = x.reshape(b, hb, h // hb, wb, w // wb, c).mean(axis=(2, 4))
        groups.append(pooled.reshape(b, hb * wb, c))
    return jnp.concatenate(groups, axis=1)


def _pos(rngs, n, width, std=None):
    """A learned position table, N(0, std^2); std None = width^-0.5 (upstream's ``scale * randn``)."""
    return vit.learned_embedding(rngs, (n, width), width ** -0.5 if std is None else std)


def _memory_pos(module):
    """[latent_token_positional_embedding (N); latent_token_positional_embedding_comp (M)]."""
    if module.latent_token_positional_embedding_comp is None:
        return module.latent_token_positional_embedding[...]
    return jnp.concatenate([module.latent_token_positional_embedding[...],
                            module.latent_token_positional_embedding_comp[...]], axis=0)


class ViTEncoder(nnx.Module):
    """CNN features (B, g, g, z) -> (B, N + M, z) latents (upstream ``ViTEncoder``,
    ``multi_level_query_init=True``)."""

    def __init__(self, *, grid: int, width: int, depth: int, heads: int, num_latent_tokens: int,
                 num_padding: int, token_size: int, rngs: nnx.Rngs, pos_init_std: float | None = None,
                 dtype=jnp.float32):
        self.grid, self.width = grid, width
        self.num_latent_tokens, self.num_padding = num_latent_tokens, num_padding
        self.encoder_embed = layers.dense(token_size, width, ("channels", "embed"), rngs=rngs, dtype=dtype)
        self.ln_pre = vit.layer_norm(token_size, rngs=rngs)
        self.positional_embedding = _pos(rngs, grid * grid, width, pos_init_std)
        self.latent_token_positional_embedding = _pos(rngs, num_latent_tokens, width, pos_init_std)
        # (none without padding: orbax cannot save a zero-size array)
        self.latent_token_positional_embedding_comp = _pos(rngs, num_padding, width, pos_init_std) if num_padding else None
        self.global_proj = layers.dense(width, width, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.transformer = nnx.List([vit.QFormerLayer(width, heads, 4 * width, rngs=rngs, dtype=dtype)
                                     for _ in range(depth)])
        self.ln_post = vit.layer_norm(width, rngs=rngs)
        self.conv_out = layers.dense(width, token_size, ("embed", "channels"), rngs=rngs, dtype=dtype)

    def queries(self, memory):
        """Multi-level pooled queries with the Redundant Token Padding: (B, N + M, width)."""
        b = memory.shape[0]
        q = multi_level_pool(memory.reshape(b, self.grid, self.grid, self.width),
                             round(math.log2(self.num_latent_tokens)))
        start = self.num_latent_tokens - self.num_padding
        return self.global_proj(jnp.concatenate([q, q[:, start:]], axis=1))

    def __call__(self, s, *, return_feat: bool = False):
        b = s.shape[0]
        memory = self.encoder_embed(self.ln_pre(s.reshape(b, -1, s.shape[-1])))
        tgt = self.queries(memory)
        query_pos = _memory_pos(self)
        for layer in self.transformer:
            tgt = layer(tgt, memory, query_pos=query_pos, pos=self.positional_embedding[...])
        tgt = self.ln_post(tgt)
        if return_feat:
            return tgt[:, :self.num_latent_tokens]
        return self.conv_out(tgt)


class ViTDecoder(nnx.Module):
    """Tokens (B, n, z), n <= N + M -> (2-D features (B, g, g, z), HSR features (B, g*g, out_inner_dim)
    or None) from the first k tokens (upstream ``ViTDecoder``)."""

    def __init__(self, *, grid: int, width: int, depth: int, heads: int, num_latent_tokens: int,
                 num_padding: int, token_size: int, distill_depth: int | None, out_inner_dim: int,
                 rngs: nnx.Rngs, pos_init_std: float | None = None, dtype=jnp.float32):
        self.grid, self.width, self.num_latent_tokens = grid, width, num_latent_tokens
        self.distill_depth = distill_depth
        self.decoder_embed = layers.dense(token_size, width, ("channels", "embed"), rngs=rngs, dtype=dtype)
        self.ln_pre = vit.layer_norm(token_size, rngs=rngs)
        self.positional_embedding = _pos(rngs, grid * grid, width, pos_init_std)
        self.latent_token_positional_embedding = _pos(rngs, num_latent_tokens, width, pos_init_std)
        # (none without padding: orbax cannot save a zero-size array)
        self.latent_token_positional_embedding_comp = _pos(rngs, num_padding, width, pos_init_std) if num_padding else None
        self.transformer = nnx.List([vit.QFormerLayer(width, heads, 4 * width, rngs=rngs, dtype=dtype)
                                     for _ in range(depth)])
        self.ln_post = vit.layer_norm(width, rngs=rngs)
        self.conv_out = conv(width, token_size, 3, rngs)
        if distill_depth is not None:  # REPA's projector: width -> 4w -> SiLU -> 4w -> SiLU -> out
            self.distill_fc1 = layers.dense(width, 4 * width, ("embed", "mlp"), rngs=rngs, dtype=dtype)
            self.distill_fc2 = layers.dense(4 * width, 4 * width, ("mlp", "embed"), rngs=rngs, dtype=dtype)
            self.distill_fc3 = layers.dense(4 * width, out_inner_dim, ("embed", "channels"), rngs=rngs, dtype=dtype)

    def distill_mlp(self, h):
        return self.distill_fc3(nnx.silu(self.distill_fc2(nnx.silu(self.distill_fc1(h)))))

    def __call__(self, tokens, num_tokens=None, *, keep=None, inner_feat: bool = False):
        """``num_tokens``: a Python int k (upstream's slice; None = N, the released default), or an int
        array () / (B,) (a key mask: the same values, static shapes); ``keep``: bool (n,) / (B, n)."""
        b, n, _ = tokens.shape
        x = self.decoder_embed(self.ln_pre(tokens))
        tgt = jnp.broadcast_to(x[:, :1], (b, self.grid * self.grid, self.width))
        pos = _memory_pos(self)[:n]
        if num_tokens is None and keep is None:
            num_tokens = min(self.num_latent_tokens, n)
        if isinstance(num_tokens, (int, np.integer)):
            x, pos = x[:, :int(num_tokens)], pos[:int(num_tokens)]
        elif num_tokens is not None:
            keep = vit.prefix_mask(num_tokens, n)
        mask = None if keep is None else vit.key_mask(keep)
        feat = None
        for i, layer in enumerate(self.transformer):
            tgt = layer(tgt, x, query_pos=self.positional_embedding[...], pos=pos, memory_mask=mask)
            if inner_feat and i + 1 == self.distill_depth:
                feat = self.distill_mlp(tgt)
        out = self.ln_post(tgt).reshape(b, self.grid, self.grid, self.width)
        return self.conv_out(out), feat


# ----------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------


class ReTok(nnx.Module):
    """``VQVitModelPlus`` with Redundant Token Padding: ``encode`` gives N + M tokens (all quantised);
    ``decode`` uses the first k (default N).

    ``num_padding`` M: the copies of queries ``N - M .. N - 1`` appended to the encoder's queries (the
    released code: M = N - 32 = 224; 0 = the same tokenizer without padding).
    """

    def __init__(self, *, image_size: int, ch: int, ch_mult, num_res_blocks: int, z_channels: int,
                 encoder_size, decoder_size, num_latent_tokens: int, num_padding: int, codebook_size: int,
                 codebook_embed_dim: int, commitment_cost: float = 0.25, rot: bool = True,
                 adaptive_gn: bool = True, d2s_up: bool = True, unbiased_style_var: bool = True,
                 distill_depth: int | None = 3, out_inner_dim: int = 768, in_channels: int = 3,
                 norm_groups: int = GROUPS, pos_init_std: float | None = None, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        f = 2 ** (len(ch_mult) - 1)
        if image_size % f:
            raise ValueError(f"image_size={image_size} is not divisible by the CNN's downsampling factor {f}")
        if not 0 <= num_padding < num_latent_tokens:
            raise ValueError(f"num_padding={num_padding}: in [0, num_latent_tokens={num_latent_tokens})")
        self.grid = image_size // f
        self.num_latent_tokens, self.num_padding = num_latent_tokens, num_padding
        self.total_tokens = num_latent_tokens + num_padding
        ew, ed, eh = encoder_size
        dw, dd, dh = decoder_size
        self.encoder = vq_cnn.Encoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels,
                                      in_channels=in_channels, attn=False, norm_groups=norm_groups, rngs=rngs)  # use_attn=False
        common = dict(grid=self.grid, num_latent_tokens=num_latent_tokens, num_padding=num_padding,
                      token_size=z_channels, rngs=rngs, pos_init_std=pos_init_std, dtype=dtype)
        self.s2to1encoder = ViTEncoder(width=ew, depth=ed, heads=eh, **common)
        self.quant_conv = layers.dense(z_channels, codebook_embed_dim, ("channels", None), rngs=rngs)
        self.quantize = quantizers.VectorQuantizer(
            codebook_size, codebook_embed_dim, commitment_cost=commitment_cost, use_l2_norm=True,
            estimator="rotation_trick" if rot else "straight_through", rngs=rngs,
            codebook_init=lambda key, shape: quantizers.l2_normalize(quantizers.uniform_codebook_init(key, shape)))
        self.post_quant_conv = layers.dense(codebook_embed_dim, z_channels, (None, "channels"), rngs=rngs)
        self.s1to2decoder = ViTDecoder(width=dw, depth=dd, heads=dh, distill_depth=distill_depth,
                                       out_inner_dim=out_inner_dim, **common)
        self.decoder = CNNDecoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels,
                                  out_channels=in_channels, adaptive_gn=adaptive_gn, d2s_up=d2s_up,
                                  unbiased_style_var=unbiased_style_var, norm_groups=norm_groups, rngs=rngs)

    def encode_continuous(self, images):
        """images (B, H, W, C) in [-1, 1] -> (CNN features S (B, g, g, z), latents entering the
        quantizer (B, N + M, codebook_embed_dim))."""
        s = self.encoder(images)
        return s, self.quant_conv(self.s2to1encoder(s))

    def encode(self, images):
        """-> (z_q (B, N + M, e) with the estimator's gradient, info with ``indices`` (B, N + M), S)."""
        s, h = self.encode_continuous(images)
        z_q, info = self.quantize(h)
        return z_q, info, s

    def decode_features(self, z_q, num_tokens=None, *, keep=None, inner_feat: bool = False):
        """(ViT-decoder 2-D features Ŝ (B, g, g, z), HSR features or None) from the first k tokens."""
        return self.s1to2decoder(self.post_quant_conv(z_q), num_tokens, keep=keep, inner_feat=inner_feat)

    def decode(self, z_q, num_tokens=None, *, keep=None):
        """Images (B, H, W, C), nominally [-1, 1], from the first ``num_tokens`` tokens (None: N)."""
        rec, _ = self.decode_features(z_q, num_tokens, keep=keep)
        return self.decoder(rec)

    def decode_codes(self, indices, num_tokens=None):
        """Code indices (B, n) -> images (upstream ``decode_code``; n may be < N: the prefix)."""
        return self.decode(self.quantize.lookup(indices), num_tokens)


# ----------------------------------------------------------------------------
# Checkpoint conversion and the golden fixture
# ----------------------------------------------------------------------------

TORCH_RENAMES = [
    (r"^quantize\.codebook_used$", ""),  # training-only usage history
    (r"\.in_proj_weight$", ".in_proj.weight"),
    (r"\.in_proj_bias$", ".in_proj.bias"),
    (r"distill_mlp\.0\.", "distill_fc1."),
    (r"distill_mlp\.2\.", "distill_fc2."),
    (r"distill_mlp\.4\.", "distill_fc3."),
    (r"^quantize\.embedding\.weight$", "quantize.embedding"),
]
POSITION_KEYS = ("positional_embedding", "latent_token_positional_embedding",
                 "latent_token_positional_embedding_comp")
RELEASED = "https://github.com/zfu006/ReTok (README: VQ_SB256_e250.pt, GPT_XL256_e300_VQ_SB.pt)"


def _rename(key):
    path = regex_rename(TORCH_RENAMES)(key)
    if path is not None and path[-1] == "embedding" and path[0] == "quantize":
        return ("quantize", "embedding")
    return path


def abstract_params(kwargs) -> dict:
    abstract = layers.abstract_module(lambda rngs: ReTok(**kwargs, rngs=rngs))
    return nnx.to_pure_dict(nnx.split(abstract, nnx.Param, ...)[1])


def params_from_torch(state_dict, kwargs) -> dict:
    """Pure params of :class:`ReTok` from upstream's ``VQVitModelPlus`` state_dict (``(L, 1, W)``
    position tables squeezed; ``codebook_used`` dropped; an ``ema``/``model`` wrapper unwrapped)."""
    for wrapper in ("ema", "model", "state_dict"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
            break
    sd = {}
    for k, v in state_dict.items():
        k = k.removeprefix("module.")
        v = np.asarray(v)
        if k.split(".")[-1] in POSITION_KEYS and v.ndim == 3:
            v = v[:, 0]
        sd[k] = v
    if kwargs.get("distill_depth") is None:
        sd = {k: v for k, v in sd.items() if "distill_mlp" not in k}
    return torch_to_params(sd, abstract_params(kwargs), rename=_rename, what="ReTok checkpoint")


def merge(kwargs, params) -> ReTok:
    return merge_module(layers.abstract_module(lambda rngs: ReTok(**kwargs, rngs=rngs)), params)


def _size_tables(meta) -> dict:
    """VIT_SIZES plus the fixture's extra tables ("'pico' = (width 32, layers 2, heads 4)")."""
    tables = dict(VIT_SIZES)
    text = meta["constructor_args"].get("hard_coded_overrides", {}).get("model_size_tables", "")
    for name, w, d, h in re.findall(r"'(\w+)'\s*=\s*\(width (\d+), layers (\d+), heads (\d+)\)", text):
        tables[name] = (int(w), int(d), int(h))
    return tables


def fixture_kwargs(meta) -> dict:
    c = meta["constructor_args"]
    a, over = c["VQVitModelPlusArgs"], c.get("hard_coded_overrides", {})
    tables = _size_tables(meta)
    enc = a["encoder_size"] or a["model_size"]
    dec = a["decoder_size"] or a["model_size"]
    if list(a["encoder_ch_mult"]) != list(a["decoder_ch_mult"]):
        raise ValueError("retok fixture: encoder and decoder ch_mult differ (the port uses one ch_mult)")
    for flag, want in (("multi_level_query_init", True), ("use_attn", False), ("codebook_l2_norm", True)):
        if bool(a.get(flag)) != want:
            raise ValueError(f"retok fixture: {flag}={a.get(flag)} is not the released configuration ({want})")
    n = int(a["num_latent_tokens"])
    return dict(image_size=int(over.get("blocks.ViTEncoder/ViTDecoder image_size", 256)),
                ch=int(over.get("blocks.Encoder/Decoder ch", 128)), ch_mult=tuple(a["encoder_ch_mult"]),
                num_res_blocks=int(over.get("blocks.Encoder/Decoder num_res_blocks", 2)),
                z_channels=int(a["z_channels"]), encoder_size=tables[enc], decoder_size=tables[dec],
                num_latent_tokens=n, num_padding=n - 32, codebook_size=int(a["codebook_size"]),
                codebook_embed_dim=int(a["codebook_embed_dim"]), commitment_cost=float(a["commit_loss_beta"]),
                rot=bool(a["rot"]), adaptive_gn=bool(a["adaptive_gn"]), d2s_up=bool(a["d2s_up"]),
                distill_depth=a.get("distill_depth"), out_inner_dim=int(a.get("out_inner_dim", 768)))


def fixture_check(meta, params, buffers, inputs) -> dict[str, np.ndarray]:
    kwargs = fixture_kwargs(meta)
    model = merge(kwargs, params_from_torch({**params, **buffers}, kwargs))
    x = jnp.asarray(inputs["image"]).transpose(0, 2, 3, 1)
    nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731
    tok = lambda a: np.asarray(a).transpose(0, 2, 1)[:, :, None, :]  # (B, n, C) -> (B, C, 1, n)  # noqa: E731

    @jax.jit
    def enc(x):
        s = model.encoder(x)
        feat = model.s2to1encoder(s, return_feat=True)
        fix = model.s2to1encoder(s)
        cont = model.quant_conv(fix)
        z_q, info = model.quantize(cont)
        return s, feat, fix, cont, z_q, info["indices"]

    s, feat, fix, cont, z_q, idx = enc(x)
    entry = model.quantize.lookup(idx)
    dec = jax.jit(lambda z, k: model.decode_features(z, k), static_argnums=1)
    out = {"cnn_encoder_out": nchw(s), "vit_encoder_feat": tok(feat), "latent_fix_dim": tok(fix),
           "latent_cont": tok(cont), "quant_rot": tok(z_q), "indices": np.asarray(idx).reshape(-1),
           "codebook_entry": tok(entry)}
    for tag, k in (("k", int(inputs["num_tokens_k"])), ("default", None), ("all", int(inputs["num_tokens_all"]))):
        rec, _ = dec(entry, k)
        out[f"rec_spatial_{tag}"] = nchw(rec)
        out[f"dec_{tag}"] = nchw(jax.jit(model.decoder)(rec))
    out["forward_dec"] = nchw(jax.jit(lambda z: model.decode(z))(z_q))
    _, inner = jax.jit(lambda z: model.decode_features(z, inner_feat=True))(z_q)
    out["inner_feat"] = np.asarray(inner)
    return out


FIXTURE_CHECKS = {"retok_tokenizer": fixture_check}


# ----------------------------------------------------------------------------
# Released checkpoints
# ----------------------------------------------------------------------------


def model_kwargs(config) -> dict:
    """ReTok constructor arguments from a run config (``config.model``, ``config.data``)."""
    m = config.model
    size = lambda s: (int(s.width), int(s.depth), int(s.heads))  # noqa: E731
    return dict(image_size=int(config.data.image_size), ch=int(m.ch), ch_mult=tuple(int(v) for v in m.ch_mult),
                num_res_blocks=int(m.num_res_blocks), z_channels=int(m.z_channels), encoder_size=size(m.encoder),
                decoder_size=size(m.decoder), num_latent_tokens=int(m.num_latent_tokens),
                num_padding=int(m.num_padding), codebook_size=int(m.codebook_size),
                codebook_embed_dim=int(m.codebook_embed_dim), commitment_cost=float(m.commitment_cost),
                rot=bool(m.rot), adaptive_gn=bool(m.adaptive_gn), d2s_up=bool(m.d2s_up),
                unbiased_style_var=bool(m.unbiased_style_var),
                distill_depth=int(m.distill_depth) if int(m.distill_depth) > 0 else None,
                out_inner_dim=int(m.out_inner_dim), in_channels=int(config.data.channels),
                norm_groups=int(m.get("norm_groups", GROUPS)),
                pos_init_std=float(m.pos_init_std) if float(m.get("pos_init_std", 0.0)) > 0 else None)


def import_retok(state_dict, config) -> dict:
    """The released ``VQ_SB256_e250.pt`` / ``VQ_SS256_*.pt`` (``{"model": ..., "ema": ...}`` or a bare
    state_dict; the EMA weights when present) for ``configs/retok_{ss,sb}.py``."""
    if "ema" in state_dict and isinstance(state_dict["ema"], dict):
        state_dict = state_dict["ema"]
    elif "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    return params_from_torch(state_dict, model_kwargs(config))


def import_retok_gpt(state_dict, config) -> dict:
    """The released ``GPT_XL256_e300_VQ_SB.pt`` (LlamaGen ``gpt_1d`` GPT-XL on ReTok-S-B's first 256
    codes) for ``configs/llamagen_gpt.py:xl``: models/llamagen.py's importer."""
    from models import llamagen

    return llamagen.IMPORTERS["llamagen_gpt"](state_dict, config)


IMPORTERS = {"retok": import_retok, "retok_gpt": import_retok_gpt}


# ----------------------------------------------------------------------------
# Training (config.model.name == "retok"): nested dropout over the padded sequence, HSR, GAN,
# the decoder-only fine-tuning phase, all in one train_step
# ----------------------------------------------------------------------------

HSR_SCHEDULES = ("linear", "level_geometric", "const")
PREFIX_SAMPLING = ("example", "batch")


def hsr_weight(k, *, schedule: str, weight: float, total: int, min_tokens: int, gamma: float = 0.7):
    """The Hierarchical Semantic Regularization strength for a decode from the first k tokens.

    The paper: strongest for the earliest tokens, "progressively reduced toward the tail"; the exact
    w(k) is not released (implementation choice, notes section 3.2):

    * ``linear``: weight * (total - k) / (total - min_tokens): full at k = min_tokens, 0 at k = N + M;
    * ``level_geometric``: weight * gamma^ceil(log2 k) (one step per coarse-to-fine query group);
    * ``const``: weight for every k (GigaTok's uniform REPA loss, the no-HSR baseline).
    """
    k = jnp.asarray(k, jnp.float32)
    if schedule == "linear":
        return weight * jnp.clip((total - k) / max(total - min_tokens, 1), 0.0, 1.0)
    if schedule == "level_geometric":
        return weight * gamma ** jnp.ceil(jnp.log2(jnp.maximum(k, 1.0)))
    if schedule == "const":
        return jnp.full_like(k, weight)
    raise ValueError(f"config.model.hsr.schedule={schedule!r}: one of {HSR_SCHEDULES}")


def negative_cosine(feat, target):
    """Per-example mean over tokens of -cos(feat, target) (REPA / GigaTok ``proj_loss``): (B,)."""
    f = quantizers.l2_normalize(feat.astype(jnp.float32))
    t = quantizers.l2_normalize(target.astype(jnp.float32))
    return -jnp.mean(jnp.sum(f * t, axis=-1), axis=-1)


class ReTokMethod(Method):
    """ReTok training as the paper describes it (the released repo has no training loop).

    Per step: k ~ U{min_tokens .. N + M} (nested dropout over the *padded* sequence; per example or
    per batch), the decoder sees the first k quantised tokens (a key mask: static shapes). Generator
    loss (configs/vq/VQ_S*256.yaml + vq_loss.py): l2 + LPIPS + disc_weight x hinge G-loss (PatchGAN
    with BatchNorm, from ``disc_start``) + VQ (codebook + beta x commitment, plus ``entropy_loss_ratio`` x
    LlamaGen's codebook entropy loss, 0 in the released configs) + feature reconstruction
    MSE(sg(S), Ŝ) while step < ``aux_loss_end`` + HSR: w(k) x -cos(distill_mlp(decoder layer
    ``distill_depth``), DINOv2 patch tokens). From ``decoder_finetune_start`` only the CNN pixel
    decoder trains and HSR is off (upstream ``freeze_but_decoder_iter``).
    """

    kind = "tokenizer"
    latent_type = "codes"

    def __init__(self, config):
        super().__init__(config)
        self.kwargs = model_kwargs(config)
        self._model_def = None
        self._frozen = {}

    # -- config, network, tokenizer interface
    def validate_config(self, config) -> None:
        m, lc = config.model, config.model.loss
        f = 2 ** (len(m.ch_mult) - 1)
        size = int(config.data.image_size)
        if size % f:
            raise ValueError(f"config.data.image_size={size} is not divisible by 2^(len(config.model.ch_mult)-1)={f}")
        bad = sorted({int(m.ch) * int(v) for v in m.ch_mult} | {int(m.ch)})
        groups = int(m.get("norm_groups", GROUPS))
        if groups < 1 or any(w % groups for w in bad):
            raise ValueError(f"config.model.ch={m.ch} x ch_mult={tuple(m.ch_mult)} gives widths {bad}: "
                             f"GroupNorm(config.model.norm_groups={groups}) needs multiples of it")
        if float(m.get("pos_init_std", 0.0)) < 0:
            raise ValueError(f"config.model.pos_init_std={m.pos_init_std}: >= 0 (0 = upstream's width^-0.5)")
        for part in ("encoder", "decoder"):
            if int(m[part].width) % int(m[part].heads):
                raise ValueError(f"config.model.{part}.width={m[part].width} is not divisible by heads={m[part].heads}")
        n, pad, grid = int(m.num_latent_tokens), int(m.num_padding), size // f
        n_level = round(math.log2(n))
        if 2 ** n_level != n:
            raise ValueError(f"config.model.num_latent_tokens={n} must be a power of two (multi-level queries)")
        finest = max(n_level - 1, 0)  # the last query group splits the grid into 2^ceil(l/2) x 2^floor(l/2)
        if grid % 2 ** ((finest + 1) // 2) or grid % 2 ** (finest // 2):
            raise ValueError(f"config.model.num_latent_tokens={n}: its finest query level pools "
                             f"{2 ** (finest // 2)} x {2 ** ((finest + 1) // 2)} blocks, which a {grid}x{grid} "
                             f"ViT grid (config.data.image_size / 2^(len(ch_mult)-1)) does not divide into")
        if not 0 <= pad < n:
            raise ValueError(f"config.model.num_padding={pad}: in [0, num_latent_tokens={n}) (released: N - 32)")
        if not 1 <= int(m.min_tokens) <= n:
            raise ValueError(f"config.model.min_tokens={m.min_tokens}: in [1, num_latent_tokens={n}]")
        if m.prefix_sampling not in PREFIX_SAMPLING:
            raise ValueError(f"config.model.prefix_sampling={m.prefix_sampling!r}: one of {PREFIX_SAMPLING}")
        if m.hsr.schedule not in HSR_SCHEDULES:
            raise ValueError(f"config.model.hsr.schedule={m.hsr.schedule!r}: one of {HSR_SCHEDULES}")
        if float(m.get("entropy_loss_ratio", 0.0)) < 0:
            raise ValueError(f"config.model.entropy_loss_ratio={m.entropy_loss_ratio}: must be >= 0 (0 = off, released)")
        if float(m.hsr.weight) > 0:
            if not 1 <= int(m.distill_depth) <= int(m.decoder.depth):
                raise ValueError(f"config.model.distill_depth={m.distill_depth}: HSR needs a decoder layer in "
                                 f"[1, decoder.depth={m.decoder.depth}]")
            if int(m.out_inner_dim) != int(m.hsr.teacher_width):
                raise ValueError(f"config.model.out_inner_dim={m.out_inner_dim} must equal the teacher's width "
                                 f"config.model.hsr.teacher_width={m.hsr.teacher_width}")
            self.teacher_params()  # a missing DINOv2 file fails here, before compilation
        if float(lc.perceptual_weight) > 0:
            if int(config.data.channels) != 3:
                raise ValueError("config.model.loss.perceptual_weight > 0 needs RGB data (LPIPS-VGG16)")
            self.lpips_params()

    def create_model(self, rngs: nnx.Rngs) -> ReTok:
        return ReTok(**self.kwargs, rngs=rngs)

    @property
    def model_def(self) -> ModelDef:
        if self._model_def is None:
            self._model_def = ModelDef(self)
        return self._model_def

    def encode(self, model: ReTok, images, length: int | None = None):
        """images (B, H, W, C) in [-1, 1] -> the first N codes (B, N) int32 (what the GPT models; the
        M padding codes are dropped), or their first ``length``."""
        _, info, _ = model.encode(images)
        return info["indices"][:, :length or self.kwargs["num_latent_tokens"]]

    def decode(self, model: ReTok, codes):
        """codes (B, k), any k <= N + M -> images (B, H, W, C) in [-1, 1] (clamped)."""
        return jnp.clip(model.decode_codes(codes, codes.shape[1]), -1.0, 1.0)

    def reconstruct(self, model: ReTok, images, length: int | None = None):
        z_q, _, _ = model.encode(images)
        return jnp.clip(model.decode(z_q, length), -1.0, 1.0)

    def loss(self, model, batch, rng):
        raise TypeError("retok trains with its own train_step (init_train_state/train_step)")

    # -- frozen networks
    def teacher_params(self):
        """The frozen DINOv2 (config.model.hsr.teacher_*; DINOv2-B/14 in the released recipe), its
        position table resampled to the ViT decoder's grid (224 inputs for a 16x16 grid)."""
        if "teacher" not in self._frozen:
            from models.pretrained import dinov2

            with jax.ensure_compile_time_eval():
                sd = dinov2.load_state_dict(self.config.model.hsr.teacher_path, "config.model.hsr.teacher_path")
                params = dinov2.params_from_torch(sd, **self._teacher_dims())
            self._frozen["teacher"] = jax.tree.map(np.asarray, params)
        return self._frozen["teacher"]

    def lpips_params(self):
        if "lpips" not in self._frozen:

            lc = self.config.model.loss
            self._frozen["lpips"] = losses.load_lpips_params(lc.vgg_path, lc.get("lpips_lin_path", ""))
        return self._frozen["lpips"]

    @property
    def grid(self) -> int:
        return self.kwargs["image_size"] // 2 ** (len(self.kwargs["ch_mult"]) - 1)

    def _teacher_dims(self):
        h = self.config.model.hsr
        return dict(width=int(h.teacher_width), depth=int(h.teacher_depth), heads=int(h.teacher_heads),
                    grid=self.grid)

    def _discriminator(self, rngs):

        lc = self.config.model.loss
        return losses.NLayerDiscriminator(in_channels=self.kwargs["in_channels"], ndf=int(lc.disc_ndf),
                                          n_layers=int(lc.disc_layers), rngs=rngs)

    # -- the train state and step
    def init_train_state(self, rng):
        """Keys: step, params, ema_params, opt_state, rest; ``disc`` {params, batch_stats, opt_state};
        ``teacher`` (frozen DINOv2, {} without HSR) and ``lpips`` (frozen, {} when unused)."""
        from trainers.optim import make_optimizer

        k_gen, k_disc = jax.random.split(rng)
        params, rest = self.model_def.init(k_gen)
        tx, _ = make_optimizer(self.config)
        m = self.config.model
        teacher = self.teacher_params() if float(m.hsr.weight) > 0 else {}
        lp = self.lpips_params() if float(m.loss.perceptual_weight) > 0 else {}
        return {"step": jnp.zeros((), jnp.int32), "params": params, "ema_params": jax.tree.map(jnp.copy, params),
                "opt_state": tx.init(params), "rest": rest,
                "disc": losses.discriminator_state(self._discriminator(nnx.Rngs(k_disc)), tx),
                "teacher": jax.tree.map(jnp.asarray, teacher), "lpips": jax.tree.map(jnp.asarray, lp)}

    def train_state_shardings(self, abstract_state, mesh):
        from trainers import sharding as sh
        from trainers.train import opt_state_shardings

        repl = sh.replicated(mesh)
        gen = self.model_def.param_shardings(mesh)
        disc = losses.discriminator_shardings(layers.abstract_module(self._discriminator),
                                              abstract_state["disc"]["opt_state"], mesh)
        return {"step": repl, "params": gen, "ema_params": gen,
                "opt_state": opt_state_shardings(abstract_state["opt_state"], gen, repl),
                "rest": self.model_def.rest_shardings(mesh), "disc": disc,
                "teacher": jax.tree.map(lambda _: repl, abstract_state["teacher"]),
                "lpips": jax.tree.map(lambda _: repl, abstract_state["lpips"])}

    def prefix_lengths(self, rng, batch: int):
        """Nested dropout over the padded sequence: k ~ U{min_tokens .. N + M}, (B,) per example or one
        per batch (broadcast), int32; without nested dropout k = N (the released inference length)."""
        m = self.config.model
        total = self.kwargs["num_latent_tokens"] + self.kwargs["num_padding"]
        if not m.nested_dropout:
            return jnp.full((batch,), self.kwargs["num_latent_tokens"], jnp.int32)
        shape = (batch,) if m.prefix_sampling == "example" else ()
        k = vit.sample_prefix_length(rng, total, low=int(m.min_tokens), shape=shape)
        return jnp.broadcast_to(k, (batch,))

    def hsr_weights(self, k):
        m = self.config.model
        total = self.kwargs["num_latent_tokens"] + self.kwargs["num_padding"]
        return hsr_weight(k, schedule=m.hsr.schedule, weight=float(m.hsr.weight), total=total,
                          min_tokens=int(m.min_tokens), gamma=float(m.hsr.gamma))

    def train_step(self, state, batch, rng):
        from trainers.optim import make_optimizer

        m, lc = self.config.model, self.config.model.loss
        tx, schedule = make_optimizer(self.config)
        x = batch["image"]
        b = x.shape[0]
        step = state["step"]
        total = self.kwargs["num_latent_tokens"] + self.kwargs["num_padding"]
        k = self.prefix_lengths(rng, b)
        keep = vit.prefix_mask(k, total)
        finetune_start = int(m.decoder_finetune_start)
        finetune = (step >= finetune_start) if finetune_start >= 0 else jnp.asarray(False)
        use_hsr = float(m.hsr.weight) > 0
        w_sem = self.hsr_weights(k) * jnp.where(finetune, 0.0, 1.0)
        gan_factor = losses.adopt_weight(1.0, step, int(lc.disc_start))
        aux_on = jnp.where(step < int(lc.aux_loss_end), 1.0, 0.0)
        disc_abstract = layers.abstract_module(self._discriminator)

        target = None
        if use_hsr:
            from models.pretrained import dinov2

            teacher = dinov2.merge(state["teacher"], **self._teacher_dims())
            target = jax.lax.stop_gradient(teacher(dinov2.preprocess(x, self.grid * dinov2.PATCH)))

        def objective(params):
            model = self.model_def.merge(params, state["rest"])
            s, h = model.encode_continuous(x)
            z_q, info = model.quantize(h)
            rec_spatial, feat = model.decode_features(z_q, keep=keep, inner_feat=use_hsr)
            recon = model.decoder(rec_spatial)
            l2 = jnp.mean(jnp.square(x - recon))
            out = {"l2_loss": l2, "quantizer_loss": info["quantizer_loss"],
                   "commitment_loss": info["commitment_loss"], "codebook_loss": info["codebook_loss"]}
            loss = float(lc.l2_weight) * l2 + float(lc.vq_weight) * info["quantizer_loss"]
            if float(m.get("entropy_loss_ratio", 0.0)) > 0:  # LlamaGen/GigaTok VQ entropy_loss_ratio (0 in the released configs)
                d = model.quantize.distances(h)
                ent = quantizers.entropy_loss(-d.reshape(-1, d.shape[-1]))
                loss = loss + float(lc.vq_weight) * float(m.entropy_loss_ratio) * ent
                out["entropy_loss"] = ent
            if float(lc.perceptual_weight) > 0:
                p = jnp.mean(merge_module(losses.lpips_abstract(), state["lpips"])(x, recon))
                loss = loss + float(lc.perceptual_weight) * p
                out["perceptual_loss"] = p
            fea = jnp.mean(jnp.square(jax.lax.stop_gradient(s) - rec_spatial))
            loss = loss + float(lc.fea_rec_weight) * aux_on * fea
            out["fea_rec_loss"] = fea
            if use_hsr:
                sem = negative_cosine(feat, target)
                loss = loss + jnp.mean(w_sem * sem)
                out.update(semantic_loss=jnp.mean(sem), hsr_weight=jnp.mean(w_sem))
            disc = losses.merge_module(disc_abstract, state["disc"]["params"], state["disc"]["batch_stats"])
            g_loss = losses.generator_loss(disc(recon, train=True), "hinge")
            loss = loss + float(lc.disc_weight) * gan_factor * g_loss
            usage = quantizers.code_usage(info["indices"], model.quantize.codebook_size)
            out.update(g_loss=g_loss, code_usage=usage["usage"], code_perplexity=usage["perplexity"])
            return loss, (out, recon)

        (loss, (aux, recon)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
        frozen = losses.decoder_only_frozen(grads, finetune)
        params, opt_state, grads = losses.masked_update(tx, grads, state["opt_state"], state["params"], frozen)
        ema = losses.ema_update(state["ema_params"], params, float(self.config.ema_rate))
        disc, d_aux = losses.discriminator_update(tx, disc_abstract, state["disc"], x, recon, scale=gan_factor)
        aux.update(d_aux, loss=loss, kept_tokens=jnp.mean(k.astype(jnp.float32)), gan_factor=gan_factor,
                   decoder_finetune=finetune.astype(jnp.float32), grad_norm=optax.tree.norm(grads),
                   lr=schedule(step))
        return {**state, "step": step + 1, "params": params, "ema_params": ema, "opt_state": opt_state,
                "disc": disc}, aux


