"""ConvNeXt (Liu et al. 2022) as torchvision builds it; ConvNeXt-S is TiTok/One-D-Piece's perceptual net.

torchvision ``models/convnext.py``: a 4x4 stride-4 stem conv + LayerNorm2d; four stages of
``CNBlock`` (depthwise 7x7 conv -> LayerNorm -> Linear 4x -> exact GELU -> Linear -> layer scale,
residual); between stages LayerNorm2d + 2x2 stride-2 conv; global average pool -> LayerNorm ->
Linear to 1000 logits. LayerNorm eps 1e-6 everywhere. Stochastic depth is a training-time op of
torchvision's and absent here (the network is used frozen, in eval mode).

Inputs are NHWC, ImageNet-normalised. :func:`perceptual_logits_loss` is One-D-Piece's
perceptual loss (``modeling/modules/perceptual_loss.py``): MSE between the 1000 classifier
logits of the two images, each bilinearly resized (antialiased) to 224 and then normalised.

Weights: torchvision ``ConvNeXt_Small_Weights.IMAGENET1K_V1`` (``convnext_small-0c510722.pth``);
:func:`load_params` reads the local file and fails naming where it is published.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import layers
from models.pretrained import merge_module, require_file
from tokenizers import vit

SIZES = {  # (depths, dims) of torchvision's convnext_{tiny,small,base,large}
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
}
WEIGHTS_FILE = {"small": "convnext_small-0c510722.pth", "tiny": "convnext_tiny-983f1562.pth",
                "base": "convnext_base-6075fbad.pth", "large": "convnext_large-ea097f82.pth"}
WEIGHTS_URL = "https://download.pytorch.org/models/{}"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CNBlock(nnx.Module):
    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.dwconv = nnx.Conv(dim, dim, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=dim, rngs=rngs,
                               kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                                 ("conv_kernel", "conv_kernel", None, "conv_out")),
                               bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)))
        self.norm = vit.layer_norm(dim, eps=1e-6, rngs=rngs)
        self.pwconv1 = layers.dense(dim, 4 * dim, ("embed", "mlp"), rngs=rngs)
        self.pwconv2 = layers.dense(4 * dim, dim, ("mlp", "embed"), rngs=rngs)
        self.layer_scale = nnx.Param(jnp.full((dim,), 1e-6, jnp.float32), out_sharding=("norm",))

    def __call__(self, x):
        h = self.pwconv2(vit.gelu_exact(self.pwconv1(self.norm(self.dwconv(x)))))
        return x + self.layer_scale[...] * h


class ConvNeXt(nnx.Module):
    """(B, H, W, 3) ImageNet-normalised -> (B, num_classes) logits."""

    def __init__(self, depths=SIZES["small"][0], dims=SIZES["small"][1], num_classes: int = 1000, *,
                 rngs: nnx.Rngs):
        self.stem_conv = layers.conv(3, dims[0], 4, strides=4, padding="VALID", rngs=rngs)
        self.stem_norm = vit.layer_norm(dims[0], eps=1e-6, rngs=rngs)
        self.stages = nnx.List([nnx.List([CNBlock(d, rngs=rngs) for _ in range(n)]) for n, d in zip(depths, dims)])
        self.down_norms = nnx.List([vit.layer_norm(dims[i], eps=1e-6, rngs=rngs) for i in range(len(dims) - 1)])
        self.down_convs = nnx.List([layers.conv(dims[i], dims[i + 1], 2, strides=2, padding="VALID", rngs=rngs)
                                    for i in range(len(dims) - 1)])
        self.head_norm = vit.layer_norm(dims[-1], eps=1e-6, rngs=rngs)
        self.head = layers.dense(dims[-1], num_classes, ("embed", "vocab"), rngs=rngs)

    def features(self, x):
        x = self.stem_norm(self.stem_conv(x))
        for i, stage in enumerate(self.stages):
            if i:
                x = self.down_convs[i - 1](self.down_norms[i - 1](x))
            for block in stage:
                x = block(x)
        return x

    def __call__(self, x):
        return self.head(self.head_norm(jnp.mean(self.features(x), axis=(1, 2))))


def params_from_torchvision(state_dict: dict[str, np.ndarray], depths=SIZES["small"][0]) -> dict:
    """Pure params of :class:`ConvNeXt` from torchvision's ``convnext_*`` state_dict."""
    sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    used = set()

    def take(key):
        if key not in sd:
            raise ValueError(f"ConvNeXt checkpoint lacks {key!r} (is it a torchvision convnext_* state_dict?)")
        used.add(key)
        return sd[key]

    conv = lambda p: {"kernel": take(p + ".weight").transpose(2, 3, 1, 0), "bias": take(p + ".bias")}  # noqa: E731
    dense = lambda p: {"kernel": take(p + ".weight").T, "bias": take(p + ".bias")}  # noqa: E731
    norm = lambda p: {"scale": take(p + ".weight"), "bias": take(p + ".bias")}  # noqa: E731
    params = {"stem_conv": conv("features.0.0"), "stem_norm": norm("features.0.1"), "stages": {},
              "down_norms": {}, "down_convs": {}, "head_norm": norm("classifier.0"), "head": dense("classifier.2")}
    for s, n in enumerate(depths):
        f = 1 + 2 * s  # features index of stage s; its downsample (before it) is f - 1
        if s:
            params["down_norms"][s - 1] = norm(f"features.{f - 1}.0")
            params["down_convs"][s - 1] = conv(f"features.{f - 1}.1")
        params["stages"][s] = {j: {"dwconv": conv(f"features.{f}.{j}.block.0"),
                                   "norm": norm(f"features.{f}.{j}.block.2"),
                                   "pwconv1": dense(f"features.{f}.{j}.block.3"),
                                   "pwconv2": dense(f"features.{f}.{j}.block.5"),
                                   "layer_scale": take(f"features.{f}.{j}.layer_scale").reshape(-1)}
                               for j in range(n)}
    extra = sorted(set(sd) - used)
    if extra:
        raise ValueError(f"ConvNeXt checkpoint has keys the model does not: {extra[:8]} ({len(extra)})")
    return params


def load_params(path, size: str = "small", *, config_field: str = "config.model.loss.convnext_path") -> dict:
    """ConvNeXt params from torchvision's published ``.pth`` (a missing file names where it is)."""
    from trainers import torchfile

    name = WEIGHTS_FILE[size]
    path = require_file(path, what=f"torchvision ConvNeXt-{size} weights {name}", config_field=config_field,
                        published=WEIGHTS_URL.format(name))
    return params_from_torchvision(torchfile.load_state_dict(path), SIZES[size][0])


def merge(params, size: str = "small") -> ConvNeXt:
    depths, dims = SIZES[size]
    abstract = layers.abstract_module(lambda rngs: ConvNeXt(depths, dims, rngs=rngs))
    return merge_module(abstract, params)


def imagenet_normalize(x01):
    """[0, 1] NHWC images (1 or 3 channels; grey is repeated) -> ImageNet-normalised RGB."""
    if x01.shape[-1] == 1:
        x01 = jnp.repeat(x01, 3, axis=-1)
    return (x01 - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def perceptual_logits_loss(model: ConvNeXt, inputs01, targets01, size: int = 224):
    """MSE between ConvNeXt logits of both [0, 1] images after an antialiased bilinear resize to
    ``size`` and ImageNet normalisation (One-D-Piece/TiTok ``PerceptualLoss``, mean over all)."""
    def logits(x):
        b = x.shape[0]
        x = jax.image.resize(x, (b, size, size, x.shape[-1]), method="linear", antialias=True)
        return model(imagenet_normalize(x))

    return jnp.mean(jnp.square(logits(inputs01) - logits(targets01)))
