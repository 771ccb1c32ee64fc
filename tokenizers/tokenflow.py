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

Teachers (``teacher``; the semantic encoder is the teacher's architecture, initialised from its
weights, and the frozen teacher gives the semantic-loss target): ``clipb_224`` (OpenAI CLIP ViT-B/16,
``models/pretrained/clip.py``; the student sees raw [-1, 1] pixels, the teacher CLIP-normalised ones,
target = patch tokens @ ``visual.proj``), ``vitamin_xlarge_256`` (``models/pretrained/vitamin.py``,
CLIP-normalised, target ``forward_features``), ``siglip_384`` (``models/pretrained/siglip.py``,
SigLIP-normalised, target ``hidden_states[-2]``; the pixel branch runs at 16 x 27 = 432 px, bicubically
resized from and back to 384), and ``student_init`` (the demo: a frozen copy of the student's own
initialisation, on raw pixels). ``position_grid`` (clipb's ``--infer_interpolate``, configs/tokenflow_clipb.py:256):
the position tables of ``encoder_vqkd`` and ``decoder_vqkd`` keep the trained 14 x 14 and are resized to the
16 x 16 grid in every forward (bicubic, DINO's scale factor (16 + 0.1) / 14, torch's kernel), as upstream.

Layout: images NHWC in [-1, 1]; feature maps NHWC; indices (B, sum s^2) coarse-to-fine, row-major.

Implementation choices (not fixed by the code): BEiT's separate ``q_bias``/``v_bias`` (k bias 0)
are one full ``qkv`` bias whose k part is converted as 0; a k bias adds a per-query constant to
every score, so the softmax and every gradient but its own are unchanged.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from eval.resize import torch_area, torch_bicubic
from models import layers
from models.pretrained import clip, merge_module, regex_rename, siglip, torch_to_params, vitamin
from tokenizers import losses, quantizers, vit, vq_cnn
from tokenizers.kl_vae import conv, group_norm
from tokenizers.vq_cnn import GROUPS, Encoder

# ----------------------------------------------------------------------------
# Pixel branch: LlamaGen VQ-16 CNN encoder (tokenizers/vq_cnn.py) / decoder
# ----------------------------------------------------------------------------


class Decoder(nnx.Module):
    """(B, h, w, z_channels) -> (B, h*f, w*f, 3). ``conv_blocks[0]`` is the lowest-resolution level
    (ch * ch_mult[-1], with attention); num_res_blocks + 1 blocks per level. The enhanced decoder is
    this class with ch 256 and 4 res blocks."""

    def __init__(self, *, ch: int, ch_mult, num_res_blocks: int, z_channels: int, out_channels: int = 3,
                 rngs: nnx.Rngs):
        block_in = ch * ch_mult[-1]
        self.conv_in = conv(z_channels, block_in, 3, rngs)
        self.mid = vq_cnn.mid_blocks(block_in, attn=True, rngs=rngs)
        levels, n = [], len(ch_mult)
        for k, i in enumerate(reversed(range(n))):
            out = ch * ch_mult[i]
            levels.append(vq_cnn.ConvLevel(block_in, out, num_res_blocks + 1, attn=k == 0,
                                           resample="up" if i != 0 else None, rngs=rngs))
            block_in = out
        self.conv_blocks = nnx.List(levels)
        self.norm_out = group_norm(block_in, GROUPS, rngs)
        self.conv_out = conv(block_in, out_channels, 3, rngs)

    def __call__(self, z):
        h = vq_cnn.run_mid(self.mid, self.conv_in(z))
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
        t = jnp.concatenate([cls, t], axis=1) + clip.interpolate_pos_embed(self.pos_embed[...], h).astype(t.dtype)
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
# Semantic encoder (student; the teacher's architecture) and the tokenizer
# ----------------------------------------------------------------------------


TEACHERS = ("clipb_224", "vitamin_xlarge_256", "siglip_384", "student_init")
TEACHER_WEIGHTS = {"clipb_224": clip.PUBLISHED, "vitamin_xlarge_256": vitamin.PUBLISHED, "siglip_384": siglip.PUBLISHED}


def semantic_encoder(teacher: str, *, in_channels: int, width: int, depth: int, heads: int, patch_size: int,
                     grid: int, extra: dict | None = None, output_dim: int | None = None, rngs: nnx.Rngs,
                     dtype=jnp.float32) -> nnx.Module:
    """``encoder_vqkd`` in ``teacher``'s architecture: (B, H, W, C) -> (B, grid^2, width) patch tokens.
    ``output_dim`` builds CLIP's ``visual.proj`` (the clipb teacher); ``extra``: SigLIP's ``mlp_dim``,
    ViTamin's ``stem_width``/``stage_widths``/``stage_depths``. SigLIP is built as its
    ``hidden_states[-2]`` tower (``depth - 1`` layers, no post-LN, no head), as upstream uses it."""
    extra = dict(extra or {})
    if teacher in ("clipb_224", "student_init"):
        return clip.VisionTransformer(width=width, depth=depth, heads=heads, patch_size=patch_size, grid=grid,
                                      in_channels=in_channels, output_dim=output_dim, rngs=rngs, dtype=dtype)
    if teacher == "vitamin_xlarge_256":
        return vitamin.ViTamin(width=width, depth=depth, heads=heads, in_channels=in_channels, **extra, rngs=rngs,
                               dtype=dtype)
    if teacher == "siglip_384":
        return siglip.SiglipVision(**siglip.tokenflow_kwargs(width=width, depth=depth, heads=heads,
                                                             patch_size=patch_size, grid=grid,
                                                             in_channels=in_channels, **extra),
                                   rngs=rngs, dtype=dtype)
    raise ValueError(f"teacher {teacher!r}: one of {TEACHERS}")


def semantic_input(teacher: str, x):
    """The semantic encoder's input from [-1, 1] images: raw pixels for clipb (upstream's
    ``scaling_layer`` is None there) and the demo, ``ScalingLayerForClip`` for ViTamin,
    ``ScalingLayerForSigLip`` for SigLIP; a grey image is repeated to the teachers' three channels."""
    if teacher == "student_init":
        return x
    if teacher == "clipb_224":
        return x if x.shape[-1] == 3 else jnp.repeat(x, 3, axis=-1)
    return clip.preprocess(x) if teacher == "vitamin_xlarge_256" else siglip.preprocess(x)


def teacher_target(teacher: str, model: nnx.Module, x):
    """The frozen teacher's regression target (``vq_loss.py`` ``get_regress_target``) from [-1, 1] images:
    CLIP ``encode_image(scaled, return_all_tokens=True) @ visual.proj``; ViTamin ``forward_features``;
    SigLIP ``hidden_states[-2]``; the demo's frozen student copy on the student's input."""
    if teacher == "student_init":
        return model(x)
    if teacher == "clipb_224":
        return model.project(model(clip.preprocess(x)))
    return model(clip.preprocess(x) if teacher == "vitamin_xlarge_256" else siglip.preprocess(x))


class TokenFlow(nnx.Module):
    """The dual-branch tokenizer. ``encode(x)`` -> dict with ``indices`` (B, sum s^2) int32, ``quant`` f
    (B, g, g, 40), ``semantic_codes`` f[..., :32], ``semantic_features`` (B, g*g, teacher_dim) (the
    decoded teacher-space features), and the scale-mean losses; ``decode(f)`` -> (semantic features,
    image); ``decode_code(indices)`` -> the same from indices."""

    def __init__(self, *, image_size: int, in_channels: int = 3, patch_size: int, sem_width: int, sem_depth: int,
                 sem_heads: int, ch: int, ch_mult, num_res_blocks: int, z_channels: int, dec_ch: int,
                 dec_num_res_blocks: int, codebook_size: int, semantic_code_dim: int = 32, pixel_code_dim: int = 8,
                 commitment_cost: float = 0.25, entropy_loss_ratio: float = 0.0, distance_weight: float = 1.0,
                 scales=(1, 2, 4), vqkd_width: int, vqkd_depth: int = 3, vqkd_heads: int, teacher_dim: int,
                 teacher: str = "student_init", semantic_extra: dict | None = None, position_grid: int | None = None,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        self.teacher, self.image_size = teacher, image_size
        self.grid = image_size // patch_size
        # the grid the position tables of encoder_vqkd / decoder_vqkd have (upstream's trained one: clipb's
        # 14 x 14 at 256 px with --infer_interpolate); resized to the grid in every forward
        self.position_grid = int(position_grid or self.grid)
        if self.position_grid != self.grid and teacher not in ("clipb_224", "student_init"):
            raise ValueError(f"position_grid={position_grid} != grid {self.grid}: only the CLIP semantic encoder "
                             f"interpolates its position table (teacher {teacher!r})")
        self.pixel_size = self.grid * 2 ** (len(ch_mult) - 1)  # siglip_384: 432, resized from/to 384
        if self.pixel_size != image_size and teacher != "siglip_384":
            raise ValueError(f"semantic grid image_size/patch_size={self.grid} != pixel grid "
                             f"image_size/2^(len(ch_mult)-1)={image_size // 2 ** (len(ch_mult) - 1)}")
        if max(scales) != self.grid:
            raise ValueError(f"scales {tuple(scales)} must end at the grid {self.grid}")
        self.scales = tuple(int(s) for s in scales)
        self.split = (semantic_code_dim, pixel_code_dim)
        self.encoder_vqkd = semantic_encoder(teacher, in_channels=in_channels if teacher == "student_init" else 3,
                                             width=sem_width, depth=sem_depth, heads=sem_heads, patch_size=patch_size,
                                             grid=self.position_grid, extra=semantic_extra, rngs=rngs, dtype=dtype)
        self.encode_task_layer = TaskLayer(sem_width, semantic_code_dim, rngs=rngs, dtype=dtype)
        self.encoder = Encoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels,
                               in_channels=in_channels, rngs=rngs)
        self.quant_conv = conv(z_channels, pixel_code_dim, 1, rngs)
        self.quantize = quantizers.SharedIndexQuantizer(codebook_size, self.split, commitment_cost=commitment_cost,
                                                        entropy_loss_ratio=entropy_loss_ratio,
                                                        distance_weight=distance_weight, rngs=rngs)
        self.post_quant_conv = conv(pixel_code_dim, z_channels, 1, rngs)
        self.decoder = Decoder(ch=dec_ch, ch_mult=ch_mult, num_res_blocks=dec_num_res_blocks, z_channels=z_channels,
                               out_channels=in_channels, rngs=rngs)
        self.decoder_vqkd = SemanticDecoder(in_chans=semantic_code_dim, width=vqkd_width, depth=vqkd_depth,
                                            heads=vqkd_heads, grid=self.position_grid, rngs=rngs, dtype=dtype)
        self.decode_task_layer = TaskLayer(vqkd_width, teacher_dim, rngs=rngs, dtype=dtype)

    def features(self, x):
        """h = concat(semantic 32-d, pixel 8-d) on the (B, g, g) grid, before quantization."""
        b = x.shape[0]
        sem = self.encode_task_layer(self.encoder_vqkd(semantic_input(self.teacher, x)))
        sem = sem.reshape(b, self.grid, self.grid, -1)
        if self.pixel_size != x.shape[1]:
            x = torch_bicubic(x, (self.pixel_size, self.pixel_size))
        return jnp.concatenate([sem.astype(jnp.float32), self.quant_conv(self.encoder(x)).astype(jnp.float32)], -1)

    def encode(self, x, *, keep=None):
        f, indices, losses, _ = quantizers.multiscale_residual_quantize(
            self.quantize, self.features(x), self.scales, down=torch_area, up=torch_bicubic, keep=keep)
        sem_feat = self.decode_task_layer(self.decoder_vqkd(f[..., :self.split[0]]))
        return {"indices": indices, "quant": f, "semantic_codes": f[..., :self.split[0]],
                "semantic_features": sem_feat, **losses}

    def decode(self, f):
        sem = self.decode_task_layer(self.decoder_vqkd(f[..., :self.split[0]]))
        image = self.decoder(self.post_quant_conv(f[..., self.split[0]:]))
        if self.pixel_size != self.image_size:
            image = torch_bicubic(image, (self.image_size, self.image_size))
        return sem, image

    def decode_code(self, indices):
        return self.decode(quantizers.multiscale_decode_indices(self.quantize, indices, self.scales, self.grid,
                                                                up=torch_bicubic))


def scale_keep(rng, n_scales: int, prob: float) -> jax.Array:
    """(n_scales,) keep mask: with probability ``prob`` one uniformly chosen non-first scale is 0
    (upstream ``drop_scale``, python ``random``)."""
    k_drop, k_which = jax.random.split(rng)
    if n_scales < 2 or prob <= 0:
        return jnp.ones((n_scales,), jnp.float32)
    drop = jax.random.uniform(k_drop) < prob
    which = jax.random.randint(k_which, (), 1, n_scales)
    return 1.0 - (drop & (jnp.arange(n_scales) == which)).astype(jnp.float32)


# ----------------------------------------------------------------------------
# Fixture checks
# ----------------------------------------------------------------------------


def _merge(build, params):
    """``build(rngs)``'s module (built abstractly) with the pure ``params``."""
    return merge_module(layers.abstract_module(build), params)


def _abstract(build) -> dict:
    return nnx.to_pure_dict(nnx.split(layers.abstract_module(build), nnx.Param, ...)[1])


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
    mk = lambda rngs: _Quantizer(int(qa["n_e"]), tuple(qa["split"]), float(qa["beta"]),  # noqa: E731
                                 float(qa["entropy_loss_ratio"]), 1.0, rngs)
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
                       ("use_mean_pooling", True), ("qkv_bias", True), ("qk_scale", None)):
        if v.get(flag) != want:
            raise ValueError(f"tokenflow_pixel fixture: vit_config.{flag}={v.get(flag)} is not TokenFlow's ({want})")
    cnn = {k: (tuple(c["cnn"][k]) if k == "ch_mult" else int(c["cnn"][k]))
           for k in ("ch", "ch_mult", "num_res_blocks", "z_channels")}
    sem, code = int(c["semantic_code_dim"]), int(c["codebook_embed_dim"])
    mk = lambda rngs: _PixelParts(cnn, code, sem, v, int(c["decoder_out_dim"]), int(v["img_size"]), rngs)  # noqa: E731
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


# ----------------------------------------------------------------------------
# Training (vq_train.py + vq_loss.py) in the one loop
# ----------------------------------------------------------------------------

STAGES = ("joint", "decoder")  # the whole tokenizer | only the pixel ``decoder.*`` (--finetune_decoder)


def model_kwargs(config) -> dict:
    """TokenFlow constructor arguments from ``config.model`` / ``config.data``."""
    m = config.model
    enhanced = bool(m.enhanced_decoder)
    return dict(image_size=int(config.data.image_size), in_channels=int(config.data.channels),
                patch_size=int(m.patch_size), sem_width=int(m.semantic.width), sem_depth=int(m.semantic.depth),
                sem_heads=int(m.semantic.heads), ch=int(m.ch), ch_mult=tuple(int(v) for v in m.ch_mult),
                num_res_blocks=int(m.num_res_blocks), z_channels=int(m.z_channels),
                dec_ch=int(m.enhanced_ch if enhanced else m.ch),
                dec_num_res_blocks=int(m.enhanced_num_res_blocks if enhanced else m.num_res_blocks),
                codebook_size=int(m.codebook_size), semantic_code_dim=int(m.semantic_code_dim),
                pixel_code_dim=int(m.pixel_code_dim), commitment_cost=float(m.commitment_cost),
                entropy_loss_ratio=float(m.entropy_loss_ratio), distance_weight=float(m.distance_weight),
                scales=tuple(int(s) for s in m.scales), vqkd_width=int(m.vqkd.width), vqkd_depth=int(m.vqkd.depth),
                vqkd_heads=int(m.vqkd.heads), teacher_dim=int(m.teacher_dim), teacher=str(m.teacher),
                semantic_extra=semantic_extra(m), position_grid=int(m.get("position_grid", 0)) or None)


SEMANTIC_EXTRA = {"siglip_384": ("mlp_dim",), "vitamin_xlarge_256": ("stem_width", "stage_widths", "stage_depths")}


def semantic_extra(m) -> dict:
    """The teacher architecture's own sizes from ``config.model.semantic`` (SigLIP's MLP width, ViTamin's
    conv stages)."""
    out = {}
    for key in SEMANTIC_EXTRA.get(str(m.teacher), ()):
        v = m.semantic[key]
        out[key] = tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else int(v)
    return out


def teacher_kwargs(kwargs) -> dict:
    """``semantic_encoder`` arguments of the frozen teacher (CLIP with its ``visual.proj`` to teacher_dim)."""
    teacher = kwargs.get("teacher", "student_init")
    return dict(in_channels=kwargs["in_channels"] if teacher == "student_init" else 3, width=kwargs["sem_width"],
                depth=kwargs["sem_depth"], heads=kwargs["sem_heads"], patch_size=kwargs["patch_size"],
                grid=kwargs.get("position_grid") or kwargs["image_size"] // kwargs["patch_size"],
                extra=kwargs.get("semantic_extra") or {},
                output_dim=kwargs["teacher_dim"] if teacher == "clipb_224" else None)


def semantic_params_from_torch(kwargs, state_dict, *, teacher: bool = False, prefix: str = "") -> dict:
    """Pure params of the semantic encoder (the student) or, with ``teacher=True``, of the frozen teacher
    from a state_dict in the teacher's published layout (``prefix``: TokenFlow's ``encoder_vqkd.``). The
    student has no CLIP ``proj``, no ViTamin head, and SigLIP's ``hidden_states[-2]`` layers only."""
    name, tk = kwargs.get("teacher", "student_init"), teacher_kwargs(kwargs)
    arch = {k: tk[k] for k in ("width", "depth", "heads", "in_channels")}
    if name in ("clipb_224", "student_init"):
        return clip.params_from_torch(state_dict, prefix=prefix, output_dim=tk["output_dim"] if teacher else None,
                                      patch_size=tk["patch_size"], grid=tk["grid"], **arch)
    if name == "vitamin_xlarge_256":
        return vitamin.params_from_torch(state_dict, prefix=prefix, **arch, **tk["extra"])
    return siglip.params_from_torch(state_dict, prefix=prefix, **siglip.tokenflow_kwargs(
        patch_size=tk["patch_size"], grid=tk["grid"], **arch, **tk["extra"]))


def load_teacher(kwargs, path, config_field: str = "config.model.teacher_path") -> tuple[dict, dict]:
    """(frozen teacher params, student initialisation params) from the teacher's published checkpoint: the
    same weights, as upstream (``clip.load`` / ``load_clip_vision``, timm ``create_model(pretrained=True)``,
    ``SiglipVisionModel.from_pretrained``)."""
    loaders = {"clipb_224": clip.load_state_dict, "vitamin_xlarge_256": vitamin.load_state_dict,
               "siglip_384": siglip.load_state_dict}
    if kwargs["teacher"] not in loaders:
        raise ValueError(f"config.model.teacher={kwargs['teacher']!r} has no published checkpoint")
    sd = loaders[kwargs["teacher"]](path, config_field)
    return semantic_params_from_torch(kwargs, sd, teacher=True), semantic_params_from_torch(kwargs, sd)


def semantic_loss(feat, target):
    """mean over tokens of 1 - cos(decoded semantic features, frozen teacher features) (vq_loss.py)."""
    a, b = quantizers.l2_normalize(feat.astype(jnp.float32)), quantizers.l2_normalize(target.astype(jnp.float32))
    return jnp.mean(1.0 - jnp.sum(a * b, axis=-1))


from trainers.method import Method, ModelDef  # noqa: E402


class TokenFlowMethod(Method):
    """TokenFlow tokenizer training (vq_train.py): Adam (0.9, 0.95), no weight decay, clip 1.0; generator
    loss = L2 + LPIPS + disc_weight x hinge G (PatchGAN, from ``disc_start``) + VQ (codebook +
    commitment + entropy) + semantic 1 - cos to the frozen teacher; the discriminator steps every
    iteration. Stages: ``stage = "joint"`` trains all, then from ``decoder_finetune_start`` (or from
    step 0 with ``stage = "decoder"``) only the pixel ``decoder`` trains (--finetune_decoder); with
    ``enhanced_decoder`` the decoder is the 256-channel, 4-res-block one (trained on the frozen rest
    when ``stage = "decoder"``). Random scale drop with ``scale_drop_prob`` in training.

    The teacher (``teacher``, checkpoint ``teacher_path``): CLIP ViT-B/16, ViTamin-XL-256 or SigLIP
    so400m, loaded frozen and as the student's initialisation; ``"student_init"`` (the demo) freezes a
    copy of the semantic encoder's random initial weights. With ``semantic_weight`` 0 no teacher is
    built. Stage chaining: ``init_from`` (a previous stage's workdir) starts this run from that stage's
    raw params (upstream ``--vq-ckpt``, ``model``); a fresh discriminator and optimizer state (a choice:
    upstream tries to load both).
    """

    kind = "tokenizer"
    latent_type = "codes"

    def __init__(self, config):
        super().__init__(config)
        self.kwargs = model_kwargs(config)
        self._model_def = None
        self._frozen = {}

    def validate_config(self, config) -> None:
        m = config.model
        try:
            kw = model_kwargs(config)
        except (AttributeError, KeyError) as e:
            raise ValueError(f"config.model is missing a TokenFlow field: {e}") from e
        f = 2 ** (len(kw["ch_mult"]) - 1)
        if kw["image_size"] % kw["patch_size"]:
            raise ValueError(f"config.data.image_size={kw['image_size']} is not a multiple of config.model.patch_size="
                             f"{kw['patch_size']}")
        # siglip_384: the pixel branch runs at grid * f (432 for 384), bicubically resized from and to the image
        if kw["teacher"] != "siglip_384" and (kw["image_size"] % f or
                                              kw["image_size"] // f != kw["image_size"] // kw["patch_size"]):
            raise ValueError(f"config.model.patch_size={kw['patch_size']} and ch_mult={kw['ch_mult']} must give the "
                             f"same grid for config.data.image_size={kw['image_size']}")
        grid = kw["image_size"] // kw["patch_size"]
        scales = kw["scales"]
        if list(scales) != sorted(set(scales)) or scales[-1] != grid or scales[0] < 1:
            raise ValueError(f"config.model.scales={scales}: strictly increasing, ending at the grid {grid}")
        for w in {kw["ch"], kw["dec_ch"], kw["z_channels"]} | {kw["ch"] * v for v in kw["ch_mult"]} | \
                {kw["dec_ch"] * v for v in kw["ch_mult"]}:
            if w % GROUPS:
                raise ValueError(f"config.model.ch/enhanced_ch/z_channels: width {w} is not a multiple of 32 (GroupNorm)")
        if m.teacher not in TEACHERS:
            raise ValueError(f"config.model.teacher={m.teacher!r}: one of {TEACHERS}")
        if kw["position_grid"] not in (None, grid) and m.teacher not in ("clipb_224", "student_init"):
            raise ValueError(f"config.model.position_grid={kw['position_grid']} != the grid {grid}: only the CLIP "
                             f"semantic encoder interpolates its position table (upstream --infer_interpolate), "
                             f"not {m.teacher}")
        if kw["position_grid"] is not None and kw["position_grid"] < 1:
            raise ValueError(f"config.model.position_grid={kw['position_grid']}: 0 (the grid) or a positive grid")
        if m.teacher != "clipb_224" and int(m.teacher_dim) != int(m.semantic.width):
            raise ValueError(f"config.model.teacher_dim={m.teacher_dim} must equal config.model.semantic.width="
                             f"{m.semantic.width} with the {m.teacher} teacher (its tokens are the target)")
        if m.teacher == "vitamin_xlarge_256" and kw["patch_size"] != 16:
            raise ValueError(f"config.model.patch_size={kw['patch_size']}: ViTamin's conv stages have stride 16")
        for key in SEMANTIC_EXTRA.get(m.teacher, ()):
            if key not in m.semantic:
                raise ValueError(f"config.model.semantic.{key} is missing (the {m.teacher} architecture)")
        if m.stage not in STAGES:
            raise ValueError(f"config.model.stage={m.stage!r}: one of {STAGES}")
        if m.stage == "decoder" and not m.get("init_from", ""):
            raise ValueError("config.model.init_from is empty: the decoder-only stage starts from the joint "
                             "stage's workdir (upstream --vq-ckpt)")
        path = m.get("teacher_path", "")
        if m.teacher != "student_init" and float(m.loss.semantic_weight) > 0 and not path:
            raise ValueError(f"config.model.teacher_path is empty: the {m.teacher} teacher (and the student's "
                             f"initialisation) needs its checkpoint, {TEACHER_WEIGHTS[m.teacher]}; or train with "
                             "semantic_weight=0 (the 'released' variant imports a trained tokenizer)")
        if path and m.teacher == "student_init":
            raise ValueError("config.model.teacher_path is set but config.model.teacher='student_init' loads none")
        for field in ("teacher_path", "init_from"):
            if m.get(field, "") and not Path(m[field]).exists():
                raise ValueError(f"config.model.{field}={m[field]!r} does not exist")
        if not 0.0 <= float(m.scale_drop_prob) <= 1.0:
            raise ValueError(f"config.model.scale_drop_prob={m.scale_drop_prob}: a probability")
        if float(m.loss.perceptual_weight) > 0:
            if int(config.data.channels) != 3:
                raise ValueError("config.model.loss.perceptual_weight > 0 needs RGB data (LPIPS-VGG16)")
            self.lpips_params()

    def create_model(self, rngs: nnx.Rngs) -> TokenFlow:
        return TokenFlow(**self.kwargs, rngs=rngs)

    def pretrained(self) -> dict:
        """Loaded once: ``teacher``/``student`` (config.model.teacher_path) and ``init_from`` (the previous
        stage's raw params, upstream's ``--vq-ckpt`` ``model``), as numpy."""
        if "pretrained" not in self._frozen:
            m, out = self.config.model, {}
            if m.get("teacher_path", ""):
                out["teacher"], out["student"] = load_teacher(self.kwargs, m.teacher_path)
            if m.get("init_from", ""):
                from trainers import cache_latents, sharding

                mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
                prev, params, _ = cache_latents.load_workdir_tokenizer(m.init_from, mesh, use_ema=False)
                if prev.model.name != "tokenflow":
                    raise ValueError(f"config.model.init_from={m.init_from!r} holds a {prev.model.name!r} run")
                out["init_from"] = jax.tree.map(np.asarray, params)
            self._frozen["pretrained"] = out
        return self._frozen["pretrained"]

    def initial_params(self, rng):
        """Fresh params with the student initialised from the teacher checkpoint and, with ``init_from``,
        every part of the previous stage (its pixel ``decoder`` only if it has this stage's shape: the
        enhanced decoder starts from scratch on a plain-decoder stage, as upstream drops those keys)."""
        params, rest = self.model_def.init(rng)
        loaded = self.pretrained()
        if "student" in loaded:
            params["encoder_vqkd"] = loaded["student"]
        if "init_from" in loaded:
            prev = loaded["init_from"]
            shapes = lambda t: jax.tree.map(np.shape, t)  # noqa: E731
            for key in params:
                if key == "decoder" and (key not in prev or shapes(prev[key]) != shapes(params[key])):
                    continue
                if key not in prev or shapes(prev[key]) != shapes(params[key]):
                    raise ValueError(f"config.model.init_from={self.config.model.init_from!r}: its {key!r} does not "
                                     "fit this config (only the pixel decoder may change between stages)")
                params[key] = prev[key]
        return jax.tree.map(jnp.asarray, params), rest

    def teacher_module(self):
        return layers.abstract_module(lambda rngs: semantic_encoder(self.kwargs["teacher"],
                                                                    **teacher_kwargs(self.kwargs), rngs=rngs))

    def uses_teacher(self) -> bool:
        return float(self.config.model.loss.semantic_weight) > 0

    @property
    def model_def(self) -> ModelDef:
        if self._model_def is None:
            self._model_def = ModelDef(self)
        return self._model_def

    def encode(self, model: TokenFlow, images):
        """images (B, H, W, C) in [-1, 1] -> multi-scale indices (B, sum s^2) int32."""
        return model.encode(images)["indices"]

    def decode(self, model: TokenFlow, codes):
        return jnp.clip(model.decode_code(codes)[1], -1.0, 1.0)

    def reconstruct(self, model: TokenFlow, images):
        return jnp.clip(model.decode(model.encode(images)["quant"])[1], -1.0, 1.0)

    def loss(self, model, batch, rng):
        raise TypeError("tokenflow trains with its own train_step (init_train_state/train_step)")

    def lpips_params(self):
        if "lpips" not in self._frozen:

            lc = self.config.model.loss
            self._frozen["lpips"] = losses.load_lpips_params(lc.vgg_path, lc.get("lpips_lin_path", ""))
        return self._frozen["lpips"]

    def _discriminator(self, rngs):

        lc = self.config.model.loss
        return losses.NLayerDiscriminator(in_channels=self.kwargs["in_channels"], ndf=int(lc.disc_ndf),
                                          n_layers=int(lc.disc_layers), rngs=rngs)

    def init_train_state(self, rng):
        from trainers.optim import make_optimizer

        k_gen, k_disc = jax.random.split(rng)
        params, rest = self.initial_params(k_gen)
        tx, _ = make_optimizer(self.config)
        lp = self.lpips_params() if float(self.config.model.loss.perceptual_weight) > 0 else {}
        return {"step": jnp.zeros((), jnp.int32), "params": params, "ema_params": jax.tree.map(jnp.copy, params),
                "opt_state": tx.init(params), "rest": rest,
                "disc": losses.discriminator_state(self._discriminator(nnx.Rngs(k_disc)), tx),
                "teacher": self._teacher_params(params),
                "lpips": jax.tree.map(jnp.asarray, lp)}

    def _teacher_params(self, params) -> dict:
        """The frozen teacher: the loaded checkpoint, or (``student_init``) a copy of the student's
        initialisation; empty when no semantic loss is trained (``semantic_weight`` 0)."""
        if not self.uses_teacher():
            return {}
        if self.kwargs["teacher"] == "student_init":
            return jax.tree.map(jnp.copy, params["encoder_vqkd"])
        return jax.tree.map(jnp.asarray, self.pretrained()["teacher"])

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
                "teacher": (nnx.to_pure_dict(sh.state_shardings(nnx.split(self.teacher_module(), nnx.Param, ...)[1],
                                                                mesh)) if self.uses_teacher() else {}),
                "lpips": jax.tree.map(lambda _: repl, abstract_state["lpips"])}

    def train_step(self, state, batch, rng):
        from trainers.optim import make_optimizer

        m, lc = self.config.model, self.config.model.loss
        tx, schedule = make_optimizer(self.config)
        x = batch["image"]
        step = state["step"]
        start = 0 if m.stage == "decoder" else int(m.decoder_finetune_start)
        finetune = (step >= start) if start >= 0 else jnp.asarray(False)
        gan_factor = losses.adopt_weight(1.0, step, int(lc.disc_start))
        keep = scale_keep(rng, len(self.kwargs["scales"]), float(m.scale_drop_prob))
        disc_abstract = layers.abstract_module(self._discriminator)

        target = None
        if self.uses_teacher():
            teacher = merge_module(self.teacher_module(), state["teacher"])
            target = jax.lax.stop_gradient(teacher_target(self.kwargs["teacher"], teacher, x))

        def objective(params):
            model = self.model_def.merge(params, state["rest"])
            enc = model.encode(x, keep=keep)
            sem_feat, recon = model.decode(enc["quant"])
            l2 = jnp.mean(jnp.square(x - recon))
            sem = semantic_loss(sem_feat, target) if target is not None else jnp.zeros((), jnp.float32)
            vq = enc["codebook_loss"] + enc["commitment_loss"] + enc["entropy_loss"]
            loss = float(lc.l2_weight) * l2 + vq + float(lc.semantic_weight) * sem
            out = {"l2_loss": l2, "semantic_loss": sem, "vq_loss": enc["codebook_loss"],
                   "commit_loss": enc["commitment_loss"], "entropy_loss": enc["entropy_loss"]}
            if float(lc.perceptual_weight) > 0:
                p = jnp.mean(merge_module(losses.lpips_abstract(), state["lpips"])(x, recon))
                loss = loss + float(lc.perceptual_weight) * p
                out["perceptual_loss"] = p
            disc = merge_module(disc_abstract, state["disc"]["params"], state["disc"]["batch_stats"])
            g_loss = losses.generator_loss(disc(recon, train=True), "hinge")
            loss = loss + float(lc.disc_weight) * gan_factor * g_loss
            usage = quantizers.code_usage(enc["indices"], model.quantize.codebook_size)
            out.update(g_loss=g_loss, code_usage=usage["usage"], code_perplexity=usage["perplexity"])
            return loss, (out, recon)

        (loss, (aux, recon)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
        frozen = losses.decoder_only_frozen(grads, finetune)
        params, opt_state, grads = losses.masked_update(tx, grads, state["opt_state"], state["params"], frozen)
        ema = losses.ema_update(state["ema_params"], params, float(self.config.ema_rate))
        disc, d_aux = losses.discriminator_update(tx, disc_abstract, state["disc"], x, recon,
                                                  scale=float(lc.disc_weight) * gan_factor)
        aux.update(d_aux, loss=loss, gan_factor=gan_factor, decoder_finetune=finetune.astype(jnp.float32),
                   kept_scales=jnp.sum(keep), grad_norm=optax.global_norm(grads), lr=schedule(step))
        return {**state, "step": step + 1, "params": params, "ema_params": ema, "opt_state": opt_state,
                "disc": disc}, aux


# ----------------------------------------------------------------------------
# Released checkpoints
# ----------------------------------------------------------------------------

RELEASED = ("https://huggingface.co/ByteFlow-AI/TokenFlow (tokenflow_clipb_32k_enhanced.pt, "
            "tokenflow_siglip_32k.pt)")


def params_from_torch(state_dict, kwargs) -> dict:
    """Pure params of :class:`TokenFlow` from upstream's state_dict (an ``ema``/``model`` wrapper unwrapped,
    the ``codebook_used`` buffer dropped): ``encoder_vqkd`` in its teacher's layout (the vendored CLIP
    visual tower without ``proj``; timm ViTamin without ``fc_norm``/``head``; transformers
    ``SiglipVisionModel``, whose unused last layer, ``post_layernorm`` and ``head`` are dropped), the rest
    in upstream's names."""
    sd = prepare_state_dict(state_dict)
    abstract = _abstract(lambda rngs: TokenFlow(**kwargs, rngs=rngs))
    rest = {k: v for k, v in sd.items() if not k.startswith("encoder_vqkd.")}
    out = torch_to_params(rest, {k: v for k, v in abstract.items() if k != "encoder_vqkd"}, rename=_rename,
                          what="TokenFlow checkpoint")
    out["encoder_vqkd"] = semantic_params_from_torch(kwargs, {k: v for k, v in sd.items() if k not in rest},
                                                     prefix="encoder_vqkd.")
    return out


def import_tokenflow(state_dict, config) -> dict:
    """The released ``tokenflow_clipb_32k_enhanced.pt`` (``configs/tokenflow_clipb.py:enhanced,released``)
    or ``tokenflow_siglip_32k.pt`` (``configs/tokenflow_siglip.py:released``): ``{"model", "ema"?, ...}``,
    the EMA preferred."""
    return params_from_torch(state_dict, model_kwargs(config))


IMPORTERS = {"tokenflow": import_tokenflow}


