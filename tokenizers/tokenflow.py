"""TokenFlow (Qu et al., CVPR 2025, arXiv 2412.03069): a dual-codebook tokenizer with one shared index.

Upstream: ByteFlow-AI/TokenFlow ``tokenflow/tokenizer/vq_model.py`` (``TokenFlow``, LlamaGen-style
``Encoder``/``Decoder``, the dual-codebook ``VectorQuantizer``) and ``vqkd_model.py`` (the BEiT-v2
``VisionTransformer`` used as the semantic decoder). Porting notes: ``shared/methods/tokenflow_code.md``.

The image goes through two branches whose features are concatenated channel-wise on one grid S x S:

* semantic: a ViT student (initialised from the teacher) -> ``encode_task_layer``
  (Linear, Tanh, Linear) -> 32-d;
* pixel: the LlamaGen VQ-16 CNN ``encoder`` -> ``quant_conv`` -> 8-d.

``quantize`` (:class:`tokenizers.quantizers.SharedIndexQuantizer`) l2-normalises each half and each
codebook and picks ONE index ``argmin(d_sem + w * d_pix)``; the multi-scale residual loop
(:func:`tokenizers.quantizers.multiscale_residual_quantize`) runs it on the area-downsampled residual
at each scale, bicubic-upsamples the code map to S x S (PyTorch's kernels, ``eval.resize``), sums it,
and subtracts it (detached) from the residual. ``decode`` splits f into 32 + 8 channels:
``decoder_vqkd`` (patch-1 BEiT ViT) -> ``decode_task_layer`` gives teacher-space features (the
semantic loss), ``post_quant_conv`` -> pixel ``decoder`` gives the image in [-1, 1].

Layout: images NHWC in [-1, 1]; feature maps NHWC; indices (B, sum s^2) coarse-to-fine, row-major.

Implementation choices (not fixed by the code): BEiT's separate ``q_bias``/``v_bias`` (k bias 0)
are one full ``qkv`` bias whose k part is converted as 0; a k bias adds a per-query constant to
every score, so the softmax and every gradient but its own are unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eval.resize import torch_area, torch_bicubic
from models import layers
from models.pretrained import regex_rename, torch_to_params
from tokenizers import quantizers, vit
from tokenizers.kl_vae import AttnBlock, Downsample, ResnetBlock, Upsample, conv, group_norm

GROUPS = 32  # LlamaGen Normalize(): GroupNorm(32, eps 1e-6)


# ----------------------------------------------------------------------------
# Pixel branch: LlamaGen VQ-16 CNN encoder / decoder
# ----------------------------------------------------------------------------


class ConvLevel(nnx.Module):
    """``conv_blocks[i]`` of the LlamaGen Encoder/Decoder: res blocks (each followed by an AttnBlock
    when ``attn``), then an optional down/up-sample."""

    def __init__(self, in_ch, out_ch, num_blocks, attn: bool, resample: str | None, rngs):
        self.res = nnx.List([ResnetBlock(in_ch if j == 0 else out_ch, out_ch, GROUPS, rngs) for j in range(num_blocks)])
        self.attn = nnx.List([AttnBlock(out_ch, GROUPS, rngs) for _ in range(num_blocks)] if attn else [])
        self.downsample = Downsample(out_ch, rngs) if resample == "down" else None
        self.upsample = Upsample(out_ch, rngs) if resample == "up" else None

    def __call__(self, x):
        for j, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[j](x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


def _mid(ch, rngs):
    return nnx.List([ResnetBlock(ch, ch, GROUPS, rngs), AttnBlock(ch, GROUPS, rngs), ResnetBlock(ch, ch, GROUPS, rngs)])


class Encoder(nnx.Module):
    """(B, H, W, 3) -> (B, H/f, W/f, z_channels), f = 2^(len(ch_mult) - 1); attention only at the last
    (lowest-resolution) level and in the middle."""

    def __init__(self, *, ch: int, ch_mult, num_res_blocks: int, z_channels: int, in_channels: int = 3,
                 rngs: nnx.Rngs):
        self.conv_in = conv(in_channels, ch, 3, rngs)
        levels, prev, n = [], ch, len(ch_mult)
        for i, m in enumerate(ch_mult):
            levels.append(ConvLevel(prev, ch * m, num_res_blocks, i == n - 1, "down" if i != n - 1 else None, rngs))
            prev = ch * m
        self.conv_blocks = nnx.List(levels)
        self.mid = _mid(prev, rngs)
        self.norm_out = group_norm(prev, GROUPS, rngs)
        self.conv_out = conv(prev, z_channels, 3, rngs)

    def __call__(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(nnx.swish(self.norm_out(h)))


class Decoder(nnx.Module):
    """(B, h, w, z_channels) -> (B, h*f, w*f, 3). ``conv_blocks[0]`` is the lowest-resolution level
    (ch * ch_mult[-1], with attention); num_res_blocks + 1 blocks per level. The enhanced decoder is
    this class with ch 256 and 4 res blocks."""

    def __init__(self, *, ch: int, ch_mult, num_res_blocks: int, z_channels: int, out_channels: int = 3,
                 rngs: nnx.Rngs):
        block_in = ch * ch_mult[-1]
        self.conv_in = conv(z_channels, block_in, 3, rngs)
        self.mid = _mid(block_in, rngs)
        levels, n = [], len(ch_mult)
        for k, i in enumerate(reversed(range(n))):
            out = ch * ch_mult[i]
            levels.append(ConvLevel(block_in, out, num_res_blocks + 1, k == 0, "up" if i != 0 else None, rngs))
            block_in = out
        self.conv_blocks = nnx.List(levels)
        self.norm_out = group_norm(block_in, GROUPS, rngs)
        self.conv_out = conv(block_in, out_channels, 3, rngs)

    def __call__(self, z):
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(nnx.swish(self.norm_out(h)))


# ----------------------------------------------------------------------------
# Semantic decoder: BEiT-v2 VQKD VisionTransformer (patch 1) and the task layers
# ----------------------------------------------------------------------------


class BeitBlock(nnx.Module):
    """Pre-norm block, LayerNorm eps 1e-6, exact-GELU MLP, no layer scale (``init_values`` 0)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.norm1 = vit.layer_norm(width, eps=1e-6, rngs=rngs)
        self.attn = layers.Attention(width, heads, rngs=rngs, dtype=dtype)
        self.norm2 = vit.layer_norm(width, eps=1e-6, rngs=rngs)
        self.mlp = layers.Mlp(width, int(width * mlp_ratio), activation=vit.gelu_exact, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x).astype(x.dtype))
        return x + self.mlp(self.norm2(x).astype(x.dtype))


def interpolate_pos_embed(pos: jax.Array, grid: int) -> jax.Array:
    """(1, 1 + g*g, E) -> (1, 1 + grid*grid, E): the patch part resized bicubically (torch kernel),
    the cls row kept (BEiT/DINO ``interpolate_pos_encoding``)."""
    g = int(round((pos.shape[1] - 1) ** 0.5))
    if g == grid:
        return pos
    patch = pos[:, 1:].reshape(1, g, g, -1)
    patch = torch_bicubic(patch, (grid, grid)).reshape(1, grid * grid, -1)
    return jnp.concatenate([pos[:, :1], patch], axis=1)


class SemanticDecoder(nnx.Module):
    """``decoder_vqkd``: (B, h, w, in_chans) -> patch tokens (B, h*w, E) after the mean-pool ``fc_norm``."""

    def __init__(self, *, in_chans: int, width: int, depth: int, heads: int, grid: int, mlp_ratio: float = 4.0,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        self.patch_embed = vit.PatchEmbed(in_chans, width, 1, rngs=rngs, dtype=dtype)
        self.cls_token = vit.learned_embedding(rngs, (1, 1, width), 0.02, (None, None, "embed"))
        self.pos_embed = vit.learned_embedding(rngs, (1, grid * grid + 1, width), 0.02, (None, "position", "embed"))
        self.blocks = nnx.List([BeitBlock(width, heads, mlp_ratio, rngs=rngs, dtype=dtype) for _ in range(depth)])
        self.fc_norm = vit.layer_norm(width, eps=1e-6, rngs=rngs)

    def __call__(self, x):
        b, h, w, _ = x.shape
        t = self.patch_embed(x)
        cls = jnp.broadcast_to(self.cls_token[...].astype(t.dtype), (b, 1, t.shape[-1]))
        t = jnp.concatenate([cls, t], axis=1) + interpolate_pos_embed(self.pos_embed[...], h).astype(t.dtype)
        for block in self.blocks:
            t = block(t)
        return self.fc_norm(t[:, 1:])


class TaskLayer(nnx.Module):
    """``nn.Sequential(Linear(d, d), Tanh(), Linear(d, out))`` (keys ``.0``, ``.2``)."""

    def __init__(self, dim: int, out: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.fc1 = layers.dense(dim, dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = layers.dense(dim, out, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


# ----------------------------------------------------------------------------
# Fixture checks
# ----------------------------------------------------------------------------


def _merge(module_fn, params):
    abstract = nnx.eval_shape(module_fn)
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    state = jax.tree.map(lambda v: v, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state, rest)


def _abstract(module_fn) -> dict:
    return nnx.to_pure_dict(nnx.split(nnx.eval_shape(module_fn), nnx.Param, ...)[1])


TORCH_RENAMES = [
    (r"^quantize\.codebook_used$", ""),  # the usage ring buffer (a statistic, not a parameter)
    (r"^quantize\.embedding_vqkd\.weight$", "quantize.semantic.embedding"),
    (r"^quantize\.embedding_vqgan\.weight$", "quantize.pixel.embedding"),
    (r"task_layer\.0\.", "task_layer.fc1."),
    (r"task_layer\.2\.", "task_layer.fc2."),
]


_rename = regex_rename(TORCH_RENAMES)


def prepare_state_dict(state_dict) -> dict[str, np.ndarray]:
    """Unwrap ``ema``/``model``/``state_dict``, strip ``module.``, and fold BEiT's q_bias/v_bias into
    one qkv bias with a zero k part."""
    for wrapper in ("ema", "model", "state_dict"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
            break
    sd = {k.removeprefix("module."): np.asarray(v) for k, v in state_dict.items()}
    for k in [k for k in sd if k.endswith(".attn.q_bias")]:
        base = k[: -len("q_bias")]
        q, v = sd.pop(k), sd.pop(base + "v_bias")
        sd[base + "qkv.bias"] = np.concatenate([q, np.zeros_like(q), v])
    return sd


class _Quantizer(nnx.Module):
    def __init__(self, n_e, split, beta, entropy_loss_ratio, distance_weight, rngs):
        self.quantize = quantizers.SharedIndexQuantizer(n_e, split, commitment_cost=beta,
                                                        entropy_loss_ratio=entropy_loss_ratio,
                                                        distance_weight=distance_weight, rngs=rngs)


def push_usage(buffer: jax.Array, indices: jax.Array, codebook_size: int):
    """Upstream's ``codebook_used`` ring buffer: shift out len(indices) old entries, append the new
    ones; usage = |unique(buffer)| / K (the buffer starts filled with zeros: code 0 counts)."""
    n = indices.size
    buffer = jnp.concatenate([buffer[n:], indices.reshape(-1).astype(buffer.dtype)])
    seen = jnp.zeros((codebook_size,), bool).at[buffer.astype(jnp.int32)].set(True)
    return buffer, jnp.sum(seen) / codebook_size


def fixture_check_vq(meta, params, buffers, inputs) -> dict[str, np.ndarray]:
    c = meta["constructor"]
    qa = c["quantizer_args"]
    if not qa.get("l2_norm", True):
        raise ValueError("tokenflow_vq fixture: l2_norm=False does not run upstream either")
    scales, size = [int(s) for s in c["scales"]], int(c["H"])
    mk = lambda: _Quantizer(int(qa["n_e"]), tuple(qa["split"]), float(qa["beta"]),  # noqa: E731
                            float(qa["entropy_loss_ratio"]), 1.0, nnx.Rngs(0))
    model = _merge(mk, torch_to_params(prepare_state_dict(params), _abstract(mk), rename=_rename,
                                       what="tokenflow_vq fixture"))
    h = jnp.asarray(inputs["h"]).transpose(0, 2, 3, 1)
    f, idx, losses, per_scale = jax.jit(lambda h: quantizers.multiscale_residual_quantize(
        model.quantize, h, scales, down=torch_area, up=torch_bicubic))(h)
    nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731
    out = {"final_quantize": nchw(f), "all_inds": np.asarray(idx).astype(np.int64)}
    names = {"vq_loss": "codebook_loss", "commit_loss": "commitment_loss", "entropy_loss": "entropy_loss",
             "vqkd_d_norm": "vqkd_d_norm", "vqgan_d_norm": "vqgan_d_norm"}
    buffer, usages = jnp.asarray(buffers["quantize.codebook_used"]), []
    for _, _, info in per_scale:
        buffer, usage = push_usage(buffer, info["indices"], int(qa["n_e"]))
        usages.append(usage)
    for ours, theirs in names.items():
        per = np.array([float(info[theirs]) for _, _, info in per_scale], np.float32)
        out[f"per_scale_{ours}"] = per
        out[ours] = np.float32(per.sum() / len(per))
    out["per_scale_codebook_usage"] = np.array(usages, np.float32)
    out["codebook_usage"] = np.float32(np.sum(usages) / len(usages))
    out["codebook_used_after"] = np.asarray(buffer)
    for i, (r, q, _) in enumerate(per_scale):
        out[f"scale{i}_residual"], out[f"scale{i}_zq"] = nchw(r), nchw(q)
    out["quant_from_codes"] = nchw(quantizers.multiscale_decode_indices(model.quantize, idx, scales, size,
                                                                       up=torch_bicubic))
    return out


class _PixelParts(nnx.Module):
    def __init__(self, cnn, code_dim, sem_dim, vit_cfg, out_dim, grid, rngs):
        self.encoder = Encoder(**cnn, rngs=rngs)
        self.decoder = Decoder(**cnn, rngs=rngs)
        self.quant_conv = conv(cnn["z_channels"], code_dim, 1, rngs)
        self.post_quant_conv = conv(code_dim, cnn["z_channels"], 1, rngs)
        self.decoder_vqkd = SemanticDecoder(in_chans=sem_dim, width=vit_cfg["embed_dim"], depth=vit_cfg["depth"],
                                            heads=vit_cfg["num_heads"], grid=grid,
                                            mlp_ratio=vit_cfg["mlp_ratio"], rngs=rngs)
        self.decode_task_layer = TaskLayer(vit_cfg["embed_dim"], out_dim, rngs=rngs)


def fixture_check_pixel(meta, params, buffers, inputs) -> dict[str, np.ndarray]:
    c = meta["constructor"]
    v = c["vit_config"]
    for flag, want in (("patch_size", 1), ("init_values", 0.0), ("use_rel_pos_bias", False),
                       ("use_mean_pooling", True), ("qkv_bias", True)):
        if v.get(flag) != want:
            raise ValueError(f"tokenflow_pixel fixture: vit_config.{flag}={v.get(flag)} is not TokenFlow's ({want})")
    cnn = {k: (tuple(c["cnn"][k]) if k == "ch_mult" else int(c["cnn"][k]))
           for k in ("ch", "ch_mult", "num_res_blocks", "z_channels")}
    sem, code = int(c["semantic_code_dim"]), int(c["codebook_embed_dim"])
    mk = lambda: _PixelParts(cnn, code, sem, v, int(c["decoder_out_dim"]), int(v["img_size"]), nnx.Rngs(0))  # noqa: E731
    model = _merge(mk, torch_to_params(prepare_state_dict({**params, **buffers}), _abstract(mk), rename=_rename,
                                       what="tokenflow_pixel fixture"))
    nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731
    x = jnp.asarray(inputs["pixel_values"]).transpose(0, 2, 3, 1)
    quant = jnp.asarray(inputs["quant"]).transpose(0, 2, 3, 1)

    @jax.jit
    def run(x, quant):
        h = model.encoder(x)
        feats = model.quant_conv(h)
        tokens = model.decoder_vqkd(quant[..., :sem])
        post = model.post_quant_conv(quant[..., sem:])
        return h, feats, tokens, post, model.decode_task_layer(tokens), model.decoder(post)

    h, feats, tokens, post, sem_rec, img = run(x, quant)
    return {"encoder_h": nchw(h), "vqgan_features": nchw(feats), "vit_patch_tokens": np.asarray(tokens),
            "post_quant": nchw(post), "vqkd_recon": np.asarray(sem_rec), "vqgan_recon": nchw(img)}


FIXTURE_CHECKS = {"tokenflow_vq": fixture_check_vq, "tokenflow_pixel": fixture_check_pixel}
