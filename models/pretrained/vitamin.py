"""ViTamin (Chen et al., CVPR 2024), ``vitamin_xlarge_256``: TokenFlow-L's frozen teacher and the
initialisation of its semantic encoder.

As ``timm`` 1.0.31 ``timm/models/vitamin.py`` builds it (a ``VisionTransformer`` whose patch embedding
is a ``HybridEmbed`` around ``MbConvStages``; key names are timm's and changed across timm versions,
so the converter follows this pinned version):

* ``patch_embed.backbone.stem``: conv 3x3 stride 2 -> LayerNorm2d + GELU -> conv 3x3;
* ``stages.0`` / ``stages.1``: ``MbConvLNBlock`` (pre-LayerNorm2d, 1x1 expand x4, GELU, depthwise 3x3
  (stride 2 in the first block of a stage), GELU, 1x1 project; shortcut = 3x3/2 average pool
  (count_include_pad False) + 1x1 conv, or a 1x1 conv, or identity);
* ``pool``: LayerNorm2d -> conv 3x3 stride 2 to the ViT width (overall stride 16);
* no class token and no position embedding; ``blocks``: timm pre-LN ``Block`` (fused-qkv attention
  with bias) whose MLP is ``GeGluMlp`` (after ``norm2``, its own second LayerNorm, then
  w2(GELU(w0 x) * w1 x), ratio 2);
* ``forward_features`` ends there (``norm`` is the identity under ``global_pool='avg'``); the optional
  head is the mean of the tokens -> ``fc_norm`` -> ``head`` Linear.

LayerNorm eps 1e-6 everywhere, exact GELU. TokenFlow's teacher target is ``forward_features`` and its
student deletes ``fc_norm``/``head`` (``num_classes=0`` here). Input: NHWC images CLIP-normalised
(:func:`models.pretrained.clip.preprocess`, ``ScalingLayerForClip``).

Weights: timm ``vitamin_xlarge_256.datacomp1b_clip``, Hugging Face ``jienengchen/ViTamin-XL-256px``
(timm loads it with ``pretrained=True``; an open_clip ``visual.trunk.`` prefix is stripped).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import layers
from models.pretrained import merge_module, read_weights, regex_rename, require_file, torch_to_params
from tokenizers import vit

# vitamin_xlarge_256: conv stage widths (stem, stage 1, stage 2), stage depths, ViT width/depth/heads.
XLARGE_256 = dict(stem_width=192, stage_widths=(192, 384), stage_depths=(2, 4), width=1152, depth=32, heads=16)
IMAGE_SIZE = 256
PUBLISHED = ("https://huggingface.co/jienengchen/ViTamin-XL-256px (timm vitamin_xlarge_256.datacomp1b_clip, "
             "timm==1.0.31 key names)")


def _conv(cin, cout, k, stride, rngs, groups=1):
    names = ("conv_kernel", "conv_kernel", "conv_in" if groups == 1 else None, "conv_out")
    pad = (k - 1) // 2
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                    param_dtype=jnp.float32, rngs=rngs,
                    kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)))


class Stem(nnx.Module):
    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.conv1 = _conv(cin, cout, 3, 2, rngs)
        self.norm1 = vit.layer_norm(cout, eps=1e-6, rngs=rngs)
        self.conv2 = _conv(cout, cout, 3, 1, rngs)

    def __call__(self, x):
        return self.conv2(vit.gelu_exact(self.norm1(self.conv1(x))))


class MbConvLNBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs, expand_ratio: float = 4.0):
        mid = int(cout * expand_ratio)
        if mid % 8:
            raise ValueError(f"ViTamin MbConv width {cout} x {expand_ratio} is not a multiple of 8 (make_divisible)")
        self.stride = stride
        # stride 2: AvgPool + optional 1x1 (``shortcut.expand``); else a 1x1 when widths differ
        self.shortcut = _conv(cin, cout, 1, 1, rngs) if cin != cout else None
        self.pre_norm = vit.layer_norm(cin, eps=1e-6, rngs=rngs)
        self.conv1_1x1 = _conv(cin, mid, 1, 1, rngs)
        self.conv2_kxk = _conv(mid, mid, 3, stride, rngs, groups=mid)
        self.conv3_1x1 = _conv(mid, cout, 1, 1, rngs)

    def __call__(self, x):
        short = x
        if self.stride == 2:
            short = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=False)
        if self.shortcut is not None:
            short = self.shortcut(short)
        h = vit.gelu_exact(self.conv1_1x1(self.pre_norm(x)))
        h = vit.gelu_exact(self.conv2_kxk(h))
        return self.conv3_1x1(h) + short


class StridedConv(nnx.Module):
    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.norm = vit.layer_norm(cin, eps=1e-6, rngs=rngs)
        self.proj = _conv(cin, cout, 3, 2, rngs)

    def __call__(self, x):
        return self.proj(self.norm(x))


class MbConvStages(nnx.Module):
    """(B, H, W, C) -> (B, H/16, W/16, width)."""

    def __init__(self, *, in_channels: int, stem_width: int, stage_widths, stage_depths, width: int, rngs: nnx.Rngs):
        self.stem = Stem(in_channels, stem_width, rngs=rngs)
        stages, prev = [], stem_width
        for dim, depth in zip(stage_widths, stage_depths):
            stages.append(nnx.List([MbConvLNBlock(prev if d == 0 else dim, dim, 2 if d == 0 else 1, rngs=rngs)
                                    for d in range(depth)]))
            prev = dim
        self.stages = nnx.List(stages)
        self.pool = StridedConv(prev, width, rngs=rngs)

    def __call__(self, x):
        x = self.stem(x)
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return self.pool(x)


class GeGluMlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.norm = vit.layer_norm(dim, eps=1e-6, rngs=rngs)
        self.w0 = layers.dense(dim, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.w1 = layers.dense(dim, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.w2 = layers.dense(hidden, dim, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x):
        x = self.norm(x).astype(x.dtype)
        gate, value = layers.dense_group(x, self.w0, self.w1)
        return self.w2(vit.gelu_exact(gate) * value)


class Block(nnx.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.norm1 = vit.layer_norm(width, eps=1e-6, rngs=rngs)
        self.attn = layers.Attention(width, heads, rngs=rngs, dtype=dtype)
        self.norm2 = vit.layer_norm(width, eps=1e-6, rngs=rngs)
        self.mlp = GeGluMlp(width, int(width * mlp_ratio), rngs=rngs, dtype=dtype)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x).astype(x.dtype))
        return x + self.mlp(self.norm2(x).astype(x.dtype))  # norm2, then GeGluMlp's own norm


class ViTamin(nnx.Module):
    """(B, H, W, C) CLIP-normalised, H and W multiples of 16 -> ``forward_features`` tokens
    (B, (H/16)(W/16), width); ``logits(x)`` -> (B, num_classes) when built with a head."""

    def __init__(self, *, stem_width: int, stage_widths, stage_depths, width: int, depth: int, heads: int,
                 mlp_ratio: float = 2.0, in_channels: int = 3, num_classes: int = 0, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        self.backbone = MbConvStages(in_channels=in_channels, stem_width=stem_width, stage_widths=stage_widths,
                                     stage_depths=stage_depths, width=width, rngs=rngs)
        self.blocks = nnx.List([Block(width, heads, mlp_ratio, rngs=rngs, dtype=dtype) for _ in range(depth)])
        self.fc_norm = vit.layer_norm(width, eps=1e-6, rngs=rngs) if num_classes else None
        self.head = layers.dense(width, num_classes, ("embed", None), rngs=rngs, dtype=dtype) if num_classes else None

    def __call__(self, x):
        f = self.backbone(x)
        t = f.reshape(f.shape[0], -1, f.shape[-1]).astype(x.dtype)
        for block in self.blocks:
            t = block(t)
        return t

    def logits(self, x):
        if self.head is None:
            raise ValueError("ViTamin built with num_classes=0 has no head")
        return self.head(self.fc_norm(jnp.mean(self(x), axis=1)))


TIMM_RENAMES = [
    (r"^patch_embed\.backbone\.stages\.(\d+)\.(\d+)\.shortcut\.expand\.", r"backbone.stages.\1.\2.shortcut."),
    (r"^patch_embed\.backbone\.", "backbone."),
]


def timm_state_dict(state_dict: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """timm keys of a ViTamin state_dict (``prefix`` first, e.g. TokenFlow's ``encoder_vqkd.``; an open_clip
    ``visual.trunk.`` wrapper and ``module.`` stripped)."""
    sd = {}
    for k, v in state_dict.items():
        k = k.removeprefix("module.")
        if not k.startswith(prefix):
            continue
        sd[k[len(prefix):].removeprefix("visual.trunk.")] = np.asarray(v, np.float32)
    return sd


def params_from_torch(state_dict: dict, *, prefix: str = "", **kwargs) -> dict:
    """Pure params of ``ViTamin(**kwargs)`` from a timm state_dict; ``fc_norm``/``head`` are dropped when
    the model is built without them (TokenFlow's student and teacher)."""
    sd = timm_state_dict(state_dict, prefix)
    if not kwargs.get("num_classes", 0):
        sd = {k: v for k, v in sd.items() if not k.startswith(("fc_norm.", "head."))}
    abstract = layers.abstract_module(lambda rngs: ViTamin(**kwargs, rngs=rngs))
    expected = nnx.to_pure_dict(nnx.split(abstract, nnx.Param, ...)[1])
    return torch_to_params(sd, expected, rename=regex_rename(TIMM_RENAMES), what="ViTamin state_dict")


def load_state_dict(path, config_field: str) -> dict:
    """A local ``model.safetensors`` / ``open_clip_pytorch_model.bin`` / ``.pth`` ViTamin checkpoint."""
    path = require_file(path, what="ViTamin-XL-256 weights", config_field=config_field, published=PUBLISHED)
    return read_weights(path)


def merge(params, **kwargs) -> ViTamin:
    abstract = layers.abstract_module(lambda rngs: ViTamin(**kwargs, rngs=rngs))
    return merge_module(abstract, params)
