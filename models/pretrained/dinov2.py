"""DINOv2 ViT (Oquab et al. 2023), frozen: the semantic teacher of ReTok's Hierarchical Semantic
Regularization (and REPA-style alignment losses).

As ``facebookresearch/dinov2`` ``dinov2_vit{s,b,l,g}14`` builds it (no register tokens): a 14x14
patch conv, ``[cls; patches] + pos_embed``, pre-LN blocks (``norm1`` -> attention with a fused
``qkv`` (bias) -> ``ls1`` layer scale, ``norm2`` -> MLP (exact GELU) -> ``ls2``), final ``norm``
(LayerNorm eps 1e-6 everywhere). ``__call__`` returns ``x_norm_patchtokens`` (B, (H/14)(W/14), D)
and, with ``with_cls=True``, also ``x_norm_clstoken``.

Position embeddings: the hub checkpoint's table is for 518x518 inputs (37x37 patches). ReTok
resamples it once at load to the 16x16 grid of 224 inputs with timm's ``resample_abs_pos_embed``
(bicubic, antialias); :func:`resample_pos_embed` does the same (``jax.image.resize`` bicubic with
antialias, the Keys a = -0.5 kernel torch's antialiased bicubic uses).

Weights: ``dinov2_vitb14_pretrain.pth`` from https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/
(torch.hub facebookresearch/dinov2); the Hugging Face ``facebook/dinov2-base`` ``Dinov2Model``
state_dict converts too (:func:`hub_keys_from_hf`).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import layers
from models.pretrained import merge_module, read_weights, require_file, torch_to_params
from tokenizers import vit

SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}  # width, depth, heads (MLP 4x)
PATCH = 14
PUBLISHED = ("https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth "
             "(torch.hub facebookresearch/dinov2 dinov2_vitb14) or huggingface.co/facebook/dinov2-base")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Block(nnx.Module):
    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.norm1 = vit.layer_norm(width, eps=1e-6, rngs=rngs)
        self.attn = layers.Attention(width, heads, rngs=rngs, dtype=dtype)
        self.ls1 = nnx.Param(jnp.full((width,), 1e-5, jnp.float32), out_sharding=("norm",))
        self.norm2 = vit.layer_norm(width, eps=1e-6, rngs=rngs)
        self.mlp = layers.Mlp(width, 4 * width, activation=vit.gelu_exact, rngs=rngs, dtype=dtype)
        self.ls2 = nnx.Param(jnp.full((width,), 1e-5, jnp.float32), out_sharding=("norm",))

    def __call__(self, x):
        x = x + self.ls1[...] * self.attn(self.norm1(x).astype(x.dtype))
        return x + self.ls2[...] * self.mlp(self.norm2(x).astype(x.dtype))


class DINOv2(nnx.Module):
    """(B, H, W, 3) ImageNet-normalised, H and W multiples of 14 -> patch tokens (B, N, D).

    ``grid``: the side of the position table (37 for the hub checkpoints, 16 after ReTok's resampling).
    """

    def __init__(self, *, width: int = 768, depth: int = 12, heads: int = 12, grid: int = 16, in_channels: int = 3,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        self.grid, self.width = grid, width
        self.patch_embed = vit.PatchEmbed(in_channels, width, PATCH, rngs=rngs, dtype=dtype)
        self.cls_token = vit.learned_embedding(rngs, (1, width), 1e-6)
        self.pos_embed = vit.learned_embedding(rngs, (1 + grid * grid, width), 0.02)
        self.blocks = nnx.List([Block(width, heads, rngs=rngs, dtype=dtype) for _ in range(depth)])
        self.norm = vit.layer_norm(width, eps=1e-6, rngs=rngs)

    def __call__(self, x, *, with_cls: bool = False):
        b, h, w, _ = x.shape
        if (h // PATCH, w // PATCH) != (self.grid, self.grid):
            raise ValueError(f"DINOv2 built for {self.grid * PATCH}x{self.grid * PATCH} inputs (a {self.grid}^2 "
                             f"position table) got {h}x{w}; resample the table (resample_pos_embed) or resize")
        t = self.patch_embed(x)
        t = jnp.concatenate([jnp.broadcast_to(self.cls_token[...], (b, 1, self.width)).astype(t.dtype), t], axis=1)
        t = t + self.pos_embed[...].astype(t.dtype)
        for block in self.blocks:
            t = block(t)
        t = self.norm(t)
        return (t[:, 1:], t[:, 0]) if with_cls else t[:, 1:]


def preprocess(images, size: int = 224):
    """Images in [-1, 1] (B, H, W, C) -> DINOv2 input: (x + 1) / 2, bicubic resize to ``size``, ImageNet
    normalisation (REPA's preprocessing, which ReTok's loss uses); one channel is repeated to three."""
    x = (images.astype(jnp.float32) + 1.0) / 2.0
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), method="bicubic", antialias=True)
    return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def resample_pos_embed(pos_embed: np.ndarray, grid: int) -> np.ndarray:
    """(1 + g0^2, D) -> (1 + grid^2, D): the patch part resized bicubically with antialias (timm
    ``resample_abs_pos_embed``), the class position kept."""
    pos_embed = np.asarray(pos_embed, np.float32)
    g0 = round((pos_embed.shape[0] - 1) ** 0.5)
    if g0 * g0 != pos_embed.shape[0] - 1:
        raise ValueError(f"position table of {pos_embed.shape[0]} rows is not 1 + a square")
    if g0 == grid:
        return pos_embed
    patches = jnp.asarray(pos_embed[1:].reshape(g0, g0, -1))
    out = jax.image.resize(patches, (grid, grid, patches.shape[-1]), method="bicubic", antialias=True)
    return np.concatenate([pos_embed[:1], np.asarray(out).reshape(grid * grid, -1)], axis=0)


HF_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),  # transformers 4
    (r"^encoder\.layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),  # transformers 5
    (r"^encoder\.layer\.(\d+)\.layer_scale1\.lambda1$", r"blocks.\1.ls1.gamma"),
    (r"^encoder\.layer\.(\d+)\.layer_scale2\.lambda1$", r"blocks.\1.ls2.gamma"),
    (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),
    (r"^layernorm\.", "norm."),
]


def hub_keys_from_hf(state_dict: dict) -> dict:
    """Hugging Face ``Dinov2Model`` keys -> the hub's (separate query/key/value fused into ``qkv``)."""
    out, qkv = {}, {}
    for key, value in state_dict.items():
        m = re.match(r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)"
                     r"\.(weight|bias)$", key)
        if m:
            part = m.group(2) or {"q": "query", "k": "key", "v": "value"}[m.group(3)]
            qkv.setdefault((m.group(1), m.group(4)), {})[part] = np.asarray(value)
            continue
        for pattern, repl in HF_RENAMES:
            if re.search(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        out[key] = np.asarray(value)
    for (i, kind), parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate([parts["query"], parts["key"], parts["value"]], axis=0)
    return out


def params_from_torch(state_dict: dict, *, width: int, depth: int, heads: int, grid: int = 16) -> dict:
    """Pure params of :class:`DINOv2` from a hub (or Hugging Face) state_dict, the position table
    resampled to ``grid``; the unused ``mask_token`` is dropped."""
    sd = {k.removeprefix("module."): np.asarray(v, np.float32) for k, v in state_dict.items()}
    if any(k.startswith("embeddings.") for k in sd):
        sd = hub_keys_from_hf(sd)
    sd.pop("mask_token", None)
    sd["cls_token"] = sd["cls_token"].reshape(1, -1)
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"].reshape(-1, sd["pos_embed"].shape[-1]), grid)
    for k in list(sd):
        if k.endswith((".ls1.gamma", ".ls2.gamma")):
            sd[k.removesuffix(".gamma")] = sd.pop(k)
    abstract = layers.abstract_module(lambda rngs: DINOv2(width=width, depth=depth, heads=heads, grid=grid, rngs=rngs))
    expected = nnx.to_pure_dict(nnx.split(abstract, nnx.Param, ...)[1])
    return torch_to_params(sd, expected, what="DINOv2 checkpoint")


def load_state_dict(path, config_field: str = "config.model.hsr.teacher_path") -> dict:
    """A local ``.pth`` (hub) / ``.bin`` / ``.safetensors`` (Hugging Face) DINOv2 state_dict."""
    path = require_file(path, what="DINOv2 weights", config_field=config_field, published=PUBLISHED)
    return read_weights(path)


def load_params(path, *, size: str = "b", grid: int = 16, config_field: str = "config.model.hsr.teacher_path"):
    """Frozen DINOv2 params (``size`` in SIZES) from a local checkpoint, position table at ``grid``."""
    sd = load_state_dict(path, config_field)
    width, depth, heads = SIZES[size]
    return params_from_torch(sd, width=width, depth=depth, heads=heads, grid=grid)


def merge(params, *, width: int, depth: int, heads: int, grid: int) -> DINOv2:
    abstract = layers.abstract_module(lambda rngs: DINOv2(width=width, depth=depth, heads=heads, grid=grid, rngs=rngs))
    return merge_module(abstract, params)
