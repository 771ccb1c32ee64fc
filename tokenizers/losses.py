"""Losses shared by every tokenizer: reconstruction, LPIPS, PatchGAN, GAN objectives and regularisers.

References: LPIPS from richzhang/PerceptualSimilarity (PyPI ``lpips``; VGG16
``features`` in torchvision's layout, linear heads ``lin{0..4}``); the
PatchGAN ``NLayerDiscriminator`` and the GAN losses from CompVis/taming-transformers
(``taming/modules/discriminator/model.py``, ``taming/modules/losses/vqperceptual.py``);
the StyleGAN discriminator from MAGVIT (google-research videogvt);
the adaptive discriminator weight and ``adopt_weight`` (discriminator start
step) from LDM's ``LPIPSWithDiscriminator``; LeCAM from Tseng et al. 2021,
as used by MaskGIT/TiTok. Images and features are NHWC.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import pickle
import struct
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import layers
from models.pretrained import merge_module  # noqa: F401  (re-exported: the GAN-step pieces below)
from trainers import sharding  # noqa: F401  (sets flax_always_shard_variable=False before any Param exists)

CONV_AXES = ("conv_kernel", "conv_kernel", "conv_in", "conv_out")

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_LIN_FILE = "vgg.pth"
LPIPS_LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"

# ----------------------------------------------------------------------------
# Reconstruction
# ----------------------------------------------------------------------------


def l1(x, y):
    """Elementwise |x - y|."""
    return jnp.abs(x - y)


def l2(x, y):
    """Elementwise (x - y)^2."""
    return jnp.square(x - y)


RECONSTRUCTION = {"l1": l1, "l2": l2}

# ----------------------------------------------------------------------------
# Reading the published torch weights (zip or legacy pre-1.6 pickle) without torch
# ----------------------------------------------------------------------------


class _LazyStorage:
    def __init__(self, dtype):
        self.dtype = dtype
        self.array = None


class _LazyTensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def resolve(self):
        arr = self.storage.array
        if not self.size:
            return arr[self.offset].copy()
        view = np.lib.stride_tricks.as_strided(
            arr[self.offset:], shape=self.size, strides=tuple(s * arr.itemsize for s in self.stride))
        return np.array(view)


_LEGACY_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                  "LongStorage": np.int64, "IntStorage": np.int32, "ByteStorage": np.uint8}


class _LegacyUnpickler(pickle.Unpickler):
    def __init__(self, f, storages):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return lambda storage, offset, size, stride, *unused: _LazyTensor(storage, offset, size, stride)
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, *unused: data
        if module == "torch" and name in _LEGACY_DTYPES:
            return name
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module.startswith(("builtins", "collections", "_codecs")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"legacy checkpoint refers to {module}.{name}")

    def persistent_load(self, pid):
        if pid[0] != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {pid[0]!r}")
        storage_type, key, _location, _numel, view = pid[1:6] if len(pid) > 5 else (*pid[1:5], None)
        if view is not None:
            raise pickle.UnpicklingError("storage views are not supported in legacy checkpoints")
        if key not in self.storages:
            self.storages[key] = _LazyStorage(_LEGACY_DTYPES[storage_type])
        return self.storages[key]


def _load_legacy(path: Path):
    storages: dict[str, _LazyStorage] = {}
    with open(path, "rb") as f:
        for _ in range(3):  # magic number, protocol version, sys info
            pickle.load(f)
        obj = _LegacyUnpickler(f, storages).load()
        for key in pickle.load(f):
            (numel,) = struct.unpack("<q", f.read(8))
            st = storages[key]
            st.array = np.frombuffer(f.read(numel * np.dtype(st.dtype).itemsize), dtype=st.dtype)
    return {k: v.resolve() for k, v in obj.items() if isinstance(v, _LazyTensor)}


def load_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """{name: array} from a ``torch.save`` file: zip archives via trainers.torchfile, legacy pickles here."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        from trainers import torchfile

        return torchfile.load_state_dict(path)
    return _load_legacy(path)


# ----------------------------------------------------------------------------
# LPIPS (VGG16)
# ----------------------------------------------------------------------------

# torchvision vgg16().features: conv indices, channels; LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
VGG16_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
               (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512),
               (26, 512, 512), (28, 512, 512))
VGG16_STAGES = ((0, 2), (2, 4), (4, 7), (7, 10), (10, 13))  # conv ranges per LPIPS slice
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# lpips ScalingLayer: maps [-1, 1] inputs to ImageNet-normalised ones.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class LPIPS(nnx.Module):
    """LPIPS v0.1 with a VGG16 backbone: (B, H, W, 3) x2 in [-1, 1] -> (B,) distances."""

    def __init__(self, rngs: nnx.Rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), CONV_AXES)
        bias = nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",))
        self.features = nnx.List([
            nnx.Conv(cin, cout, (3, 3), padding=((1, 1), (1, 1)), kernel_init=init, bias_init=bias, rngs=rngs)
            for _, cin, cout in VGG16_CONVS])
        self.lin = nnx.List([
            nnx.Conv(c, 1, (1, 1), use_bias=False, kernel_init=init, rngs=rngs) for c in LPIPS_CHANNELS])

    def _taps(self, x):
        x = (x - jnp.asarray(LPIPS_SHIFT)) / jnp.asarray(LPIPS_SCALE)
        taps = []
        for s, (start, stop) in enumerate(VGG16_STAGES):
            if s > 0:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
            for i in range(start, stop):
                x = nnx.relu(self.features[i](x))
            taps.append(x)
        return taps

    def __call__(self, x, y):
        if x.shape[-1] == 1:  # grayscale: replicate to RGB, as is usual for VGG features
            x, y = jnp.repeat(x, 3, axis=-1), jnp.repeat(y, 3, axis=-1)
        taps = self._taps(jnp.concatenate([x, y], axis=0))
        b = x.shape[0]
        total = 0.0
        for tap, lin in zip(taps, self.lin):
            unit = tap / (jnp.sqrt(jnp.sum(tap**2, axis=-1, keepdims=True)) + 1e-10)
            diff = (unit[:b] - unit[b:]) ** 2
            total = total + jnp.mean(lin(diff), axis=(1, 2, 3))
        return total


@functools.cache
def lpips_abstract() -> LPIPS:
    """The abstract LPIPS module, built once per process (its weights live in a train state's ``lpips``)."""
    return layers.abstract_module(LPIPS)


def lpips_params_from_torch(vgg_state_dict: dict[str, np.ndarray], lin_state_dict: dict[str, np.ndarray]) -> dict:
    """Pure params of :class:`LPIPS` from torchvision's vgg16 state_dict and lpips' ``vgg.pth``."""
    features = {}
    for n, (idx, cin, cout) in enumerate(VGG16_CONVS):
        w = np.asarray(vgg_state_dict[f"features.{idx}.weight"], np.float32)
        if w.shape != (cout, cin, 3, 3):
            raise ValueError(f"features.{idx}.weight has shape {w.shape}, VGG16 expects {(cout, cin, 3, 3)}")
        features[n] = {"kernel": w.transpose(2, 3, 1, 0),
                       "bias": np.asarray(vgg_state_dict[f"features.{idx}.bias"], np.float32)}
    lin = {}
    for n, c in enumerate(LPIPS_CHANNELS):
        w = np.asarray(lin_state_dict[f"lin{n}.model.1.weight"], np.float32)
        if w.shape != (1, c, 1, 1):
            raise ValueError(f"lin{n}.model.1.weight has shape {w.shape}, LPIPS expects {(1, c, 1, 1)}")
        lin[n] = {"kernel": w.transpose(2, 3, 1, 0)}
    return {"features": features, "lin": lin}


def default_lpips_lin_path() -> Path | None:
    """The linear heads that ship inside the PyPI ``lpips`` wheel, if it is installed (not imported)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "weights" / "v0.1" / LPIPS_LIN_FILE
    return path if path.exists() else None


def load_lpips_params(vgg_path: str | Path, lin_path: str | Path = "") -> dict:
    """LPIPS params from local files; a missing file is a clear error naming where it is published."""
    vgg_path = Path(vgg_path) if vgg_path else None
    if vgg_path is None or not vgg_path.exists():
        raise FileNotFoundError(
            f"LPIPS needs the torchvision VGG16 weights {VGG16_FILE} (set config.model.loss.vgg_path; "
            f"got {str(vgg_path) if vgg_path else 'nothing'}). torchvision publishes it at {VGG16_URL}; "
            "download it on a machine with internet access and copy it here.")
    lin = Path(lin_path) if lin_path else default_lpips_lin_path()
    if lin is None or not lin.exists():
        raise FileNotFoundError(
            f"LPIPS needs its linear-layer weights {LPIPS_LIN_FILE} (set config.model.loss.lpips_lin_path, "
            f"got {lin_path or 'nothing'}); they ship in the PyPI wheel `lpips` (lpips/weights/v0.1/vgg.pth) "
            f"and at {LPIPS_LIN_URL}")
    return lpips_params_from_torch(load_torch_state_dict(vgg_path), load_torch_state_dict(lin))


# ----------------------------------------------------------------------------
# PatchGAN discriminator (taming NLayerDiscriminator)
# ----------------------------------------------------------------------------


class NLayerDiscriminator(nnx.Module):
    """PatchGAN: (B, H, W, C) -> (B, H', W', 1) logits; conv 4x4, BatchNorm, LeakyReLU(0.2).

    ``torch_index`` records each layer's index in taming's ``nn.Sequential`` (``main.{i}``)
    for the converter.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, rngs: nnx.Rngs = None):
        # taming weights_init: conv N(0, 0.02), BatchNorm scale N(1, 0.02), bias 0.
        w_init = nnx.with_partitioning(nnx.initializers.normal(0.02), CONV_AXES)
        b_init = nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",))
        scale_init = nnx.with_partitioning(lambda k, s, d=jnp.float32: 1.0 + 0.02 * jax.random.normal(k, s, d), ("norm",))
        norm_bias = nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",))
        mults = [min(2**n, 8) for n in range(n_layers + 1)]
        convs, norms, self.torch_index = [], [], []
        index = 0
        for n in range(n_layers + 2):
            cin = in_channels if n == 0 else ndf * mults[n - 1]
            cout = 1 if n == n_layers + 1 else ndf * mults[n]
            stride = 2 if n < n_layers else 1
            has_norm = 0 < n <= n_layers
            convs.append(nnx.Conv(cin, cout, (4, 4), strides=stride, padding=((1, 1), (1, 1)),
                                  use_bias=not has_norm, kernel_init=w_init, bias_init=b_init, rngs=rngs))
            if has_norm:
                # torch BatchNorm2d momentum 0.1 == flax momentum 0.9
                norms.append(nnx.BatchNorm(cout, momentum=0.9, epsilon=1e-5, scale_init=scale_init,
                                           bias_init=norm_bias, use_fast_variance=False, rngs=rngs))
            self.torch_index.append(index)
            index += 1 + int(has_norm) + int(n <= n_layers)  # conv [+ norm] [+ lrelu]
        self.torch_index = tuple(self.torch_index)
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)

    def __call__(self, x, train: bool = True):
        last = len(self.convs) - 1
        for n, layer in enumerate(self.convs):
            x = layer(x)
            if 0 < n < last:
                x = self.norms[n - 1](x, use_running_average=not train)
            if n < last:
                x = jax.nn.leaky_relu(x, 0.2)
        return x


def discriminator_from_torch(state_dict: dict[str, np.ndarray], disc: NLayerDiscriminator) -> tuple[dict, dict]:
    """(params, batch_stats) pure dicts of ``disc`` from taming's ``main.{i}`` state_dict."""
    params = {"convs": {}, "norms": {}}
    stats = {"norms": {}}
    for n, idx in enumerate(disc.torch_index):
        entry = {"kernel": np.asarray(state_dict[f"main.{idx}.weight"], np.float32).transpose(2, 3, 1, 0)}
        if f"main.{idx}.bias" in state_dict:
            entry["bias"] = np.asarray(state_dict[f"main.{idx}.bias"], np.float32)
        params["convs"][n] = entry
        if 0 < n < len(disc.torch_index) - 1:
            bn = f"main.{idx + 1}"
            params["norms"][n - 1] = {"scale": np.asarray(state_dict[f"{bn}.weight"], np.float32),
                                      "bias": np.asarray(state_dict[f"{bn}.bias"], np.float32)}
            stats["norms"][n - 1] = {"mean": np.asarray(state_dict[f"{bn}.running_mean"], np.float32),
                                     "var": np.asarray(state_dict[f"{bn}.running_var"], np.float32)}
    return params, stats


# ----------------------------------------------------------------------------
# StyleGAN discriminator (MAGVIT / MAGVIT-v2 / TexTok)
# ----------------------------------------------------------------------------


def blur_downsample(x: jax.Array) -> jax.Array:
    """Anti-aliased 2x downsampling: depthwise [1, 3, 3, 1] x [1, 3, 3, 1] / 64 blur, stride 2, zero pad 1
    (MAGVIT's BlurPool2D(filter_size=4), after StyleGAN2's blur before a strided conv). NHWC."""
    taps = np.array([1.0, 3.0, 3.0, 1.0], np.float32)
    kernel = np.outer(taps, taps) / np.sum(taps) ** 2
    c = x.shape[-1]
    kernel = jnp.asarray(np.tile(kernel[:, :, None, None], (1, 1, 1, c)), x.dtype)  # HWIO, groups = c
    return jax.lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)), feature_group_count=c,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def avg_downsample(x: jax.Array) -> jax.Array:
    """2x2 average pooling, stride 2 (MAGVIT's ``dsample_2d``, its non-blur choice). NHWC."""
    return nnx.avg_pool(x, (2, 2), strides=(2, 2))


STYLEGAN_DOWNSAMPLE = {"blur": blur_downsample, "avg": avg_downsample}


# ----------------------------------------------------------------------------
# MaskGIT-style discriminator (TiTok / One-D-Piece ``modeling/modules/discriminator.py``)
# ----------------------------------------------------------------------------


def adaptive_max_pool(x: jax.Array, out_size: tuple[int, int]) -> jax.Array:
    """torch ``AdaptiveMaxPool2d``: output cell i takes the max over input rows
    [floor(i * H / h), ceil((i + 1) * H / h)) (and likewise columns); NHWC; also upsamples."""
    for axis, out in ((1, out_size[0]), (2, out_size[1])):
        size = x.shape[axis]
        cells = [jnp.max(jax.lax.slice_in_dim(x, (i * size) // out, -(-((i + 1) * size) // out), axis=axis),
                         axis=axis, keepdims=True) for i in range(out)]
        x = jnp.concatenate(cells, axis=axis)
    return x


class MaskGITDiscriminator(nnx.Module):
    """(B, H, W, C) -> (B, 16, 16, 1) logits (MaskGIT's, as TiTok re-implements it; not the PatchGAN).

    ``block_in``: Conv5x5 SAME -> LeakyReLU(0.1); per stage: Conv3x3 SAME (width x 2^stage) ->
    [1, 3, 3, 1] blur stride 2 (or 2x2 average pool) -> GroupNorm(32) -> LeakyReLU(0.1); adaptive
    max pool to 16x16; Conv1x1 -> LeakyReLU(0.1) -> Conv5x5 to one logit. No adaptive weight
    and no R1 upstream. Even spatial sizes only (the blur's SAME padding is symmetric then).
    """

    def __init__(self, in_channels: int = 3, hidden_channels: int = 128, num_stages: int = 3,
                 blur_resample: bool = True, pool_size: int = 16, rngs: nnx.Rngs = None):
        w = nnx.with_partitioning(nnx.initializers.lecun_normal(), CONV_AXES)
        b = nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",))
        conv = lambda cin, cout, k: nnx.Conv(cin, cout, (k, k), padding="SAME", kernel_init=w,  # noqa: E731
                                             bias_init=b, rngs=rngs)
        mults = (1,) + tuple(2 ** t for t in range(num_stages))
        self.block_in = conv(in_channels, hidden_channels, 5)
        self.convs = nnx.List([conv(hidden_channels * mults[i], hidden_channels * mults[i + 1], 3)
                               for i in range(num_stages)])
        self.norms = nnx.List([nnx.GroupNorm(hidden_channels * mults[i + 1], num_groups=32, epsilon=1e-5,
                                             use_fast_variance=False, rngs=rngs,
                                             scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
                                             bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)))
                               for i in range(num_stages)])
        top = hidden_channels * mults[-1]
        self.to_logits_0 = conv(top, top, 1)
        self.to_logits_2 = conv(top, 1, 5)
        self.blur_resample = blur_resample
        self.pool_size = pool_size

    def __call__(self, x):
        h = jax.nn.leaky_relu(self.block_in(x), 0.1)
        for conv, norm in zip(self.convs, self.norms):
            h = conv(h)
            if h.shape[1] % 2 or h.shape[2] % 2:
                raise ValueError(f"MaskGITDiscriminator: feature map {h.shape[1]}x{h.shape[2]} is odd; "
                                 "use image sizes divisible by 2^num_stages")
            h = blur_downsample(h) if self.blur_resample else avg_downsample(h)
            h = jax.nn.leaky_relu(norm(h), 0.1)
        h = adaptive_max_pool(h, (self.pool_size, self.pool_size))
        return self.to_logits_2(jax.nn.leaky_relu(self.to_logits_0(h), 0.1))


class StyleGANResBlock(nnx.Module):
    """conv3x3 -> lrelu -> down -> conv3x3 -> lrelu, plus down -> 1x1 conv (no bias) shortcut; sum / sqrt(2)
    (StyleGAN2's discriminator ResBlock as MAGVIT writes it: no normalisation)."""

    def __init__(self, in_channels: int, out_channels: int, downsample: str, rngs: nnx.Rngs):
        w = nnx.with_partitioning(nnx.initializers.xavier_uniform(), CONV_AXES)
        b = nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",))
        self.conv1 = nnx.Conv(in_channels, in_channels, (3, 3), padding="SAME", kernel_init=w, bias_init=b, rngs=rngs)
        self.conv2 = nnx.Conv(in_channels, out_channels, (3, 3), padding="SAME", kernel_init=w, bias_init=b, rngs=rngs)
        self.shortcut = nnx.Conv(in_channels, out_channels, (1, 1), use_bias=False, kernel_init=w, rngs=rngs)
        self.down = STYLEGAN_DOWNSAMPLE[downsample]

    def __call__(self, x):
        h = self.down(jax.nn.leaky_relu(self.conv1(x), 0.2))
        h = jax.nn.leaky_relu(self.conv2(h), 0.2)
        return (self.shortcut(self.down(x)) + h) / np.sqrt(2.0)


class StyleGANDiscriminator(nnx.Module):
    """(B, H, W, C) images -> (B, 1) logits: conv3x3(filters) -> lrelu -> one downsampling ResBlock per
    channel multiplier -> conv3x3 -> lrelu -> flatten -> Dense(filters * last mult) -> lrelu -> Dense(1).

    As google-research's MAGVIT (videogvt ``models/stylegan_discriminator.py``, the 2-D variant) used by
    MAGVIT-v2 and TexTok; xavier-uniform init, LeakyReLU(0.2). The flatten fixes the input size:
    ``image_size`` must be divisible by 2 ** len(channel_multipliers). ``train`` is accepted (and unused:
    no BatchNorm) so it is a drop-in for :class:`NLayerDiscriminator`.
    """

    def __init__(self, image_size: int, in_channels: int = 3, filters: int = 128,
                 channel_multipliers=(2, 4, 4, 4, 4, 4), downsample: str = "blur", rngs: nnx.Rngs = None):
        if downsample not in STYLEGAN_DOWNSAMPLE:
            raise ValueError(f"StyleGAN discriminator downsample={downsample!r}: one of {sorted(STYLEGAN_DOWNSAMPLE)}")
        factor = 2 ** len(channel_multipliers)
        if image_size % factor:
            raise ValueError(f"StyleGAN discriminator: image_size={image_size} is not divisible by "
                             f"2**len(channel_multipliers)={factor}")
        w = nnx.with_partitioning(nnx.initializers.xavier_uniform(), CONV_AXES)
        b = nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",))
        self.conv_in = nnx.Conv(in_channels, filters, (3, 3), padding="SAME", kernel_init=w, bias_init=b, rngs=rngs)
        blocks, ch = [], filters
        for mult in channel_multipliers:
            blocks.append(StyleGANResBlock(ch, int(filters * mult), downsample, rngs))
            ch = int(filters * mult)
        self.blocks = nnx.List(blocks)
        self.conv_out = nnx.Conv(ch, ch, (3, 3), padding="SAME", kernel_init=w, bias_init=b, rngs=rngs)
        side = image_size // factor
        dw = nnx.with_partitioning(nnx.initializers.xavier_uniform(), ("embed", "mlp"))
        self.dense = nnx.Linear(side * side * ch, ch, kernel_init=dw,
                                bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",)), rngs=rngs)
        self.logit = nnx.Linear(ch, 1, kernel_init=nnx.with_partitioning(nnx.initializers.xavier_uniform(), ("mlp", None)),
                                bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)), rngs=rngs)

    def __call__(self, x, train: bool = True):
        del train
        x = jax.nn.leaky_relu(self.conv_in(x), 0.2)
        for block in self.blocks:
            x = block(x)
        x = jax.nn.leaky_relu(self.conv_out(x), 0.2)
        x = jax.nn.leaky_relu(self.dense(x.reshape(x.shape[0], -1)), 0.2)
        return self.logit(x)


# ----------------------------------------------------------------------------
# GAN objectives and regularisers
# ----------------------------------------------------------------------------


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real, logits_fake):
    """Non-saturating (logistic) discriminator loss."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


DISCRIMINATOR_LOSSES = {"hinge": hinge_d_loss, "non_saturating": vanilla_d_loss}


def generator_loss(logits_fake, kind: str = "hinge"):
    """hinge: -E[D(G(z))] (LDM/taming); non_saturating: E[softplus(-D(G(z)))]."""
    if kind == "hinge":
        return -jnp.mean(logits_fake)
    if kind == "non_saturating":
        return jnp.mean(jax.nn.softplus(-logits_fake))
    raise ValueError(f"unknown generator loss {kind!r}; known: hinge, non_saturating")


def adaptive_weight(nll_grad, g_grad, max_weight: float = 1e4):
    """LDM calculate_adaptive_weight: ||dL_nll/dw_last|| / (||dL_g/dw_last|| + 1e-4), clipped, no gradient."""
    weight = jnp.linalg.norm(nll_grad.ravel()) / (jnp.linalg.norm(g_grad.ravel()) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))


def adopt_weight(weight, step, threshold, value: float = 0.0):
    """The discriminator start step: ``value`` before ``threshold`` (taming adopt_weight)."""
    return jnp.where(step < threshold, value, weight)


def lecam_regularization(logits_real, logits_fake, ema_real, ema_fake):
    """LeCAM (Tseng et al. 2021, eq. 3): ||relu(D(x) - a_F)||^2 + ||relu(a_R - D(G(z)))||^2."""
    return (jnp.mean(jnp.square(jax.nn.relu(logits_real - ema_fake)))
            + jnp.mean(jnp.square(jax.nn.relu(ema_real - logits_fake))))


def lecam_update(ema, logits, decay: float):
    return decay * ema + (1.0 - decay) * jnp.mean(logits)


# ----------------------------------------------------------------------------
# The pieces of a tokenizer's adversarial train step (shared by every GAN-trained tokenizer)
# ----------------------------------------------------------------------------


def non_param_state(module: nnx.Module) -> dict:
    """The pure dict of a module's non-param state (BatchNorm statistics after a train call)."""
    return nnx.to_pure_dict(nnx.split(module, nnx.Param, ...)[2])


def decoder_only_frozen(params: dict, finetune, trainable: str = "decoder"):
    """The decoder-only fine-tuning stage as a mask: a tree of bools over ``params`` (a dict keyed
    by submodule), True (frozen) for every leaf outside ``params[trainable]`` while ``finetune``."""
    finetune = jnp.asarray(finetune)
    return {key: jax.tree.map(lambda _: finetune & (key != trainable), v) for key, v in params.items()}


def masked_update(tx, grads, opt_state, params, frozen):
    """One optimizer step that leaves ``frozen`` leaves untouched (no gradient, no weight decay,
    no update; the mask may be traced). Returns (params, opt_state, masked grads)."""
    grads = jax.tree.map(lambda g, f: jnp.where(f, 0.0, g), grads, frozen)
    updates, opt_state = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    new = jax.tree.map(lambda n, o, f: jnp.where(f, o, n), new, params, frozen)
    return new, opt_state, grads


def ema_update(ema, params, rate):
    return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema, params)


def discriminator_update(tx, abstract_disc: nnx.Module, disc: dict, real, fake, loss_fn=hinge_d_loss,
                         scale=1.0):
    """One discriminator step on real images and (gradient-stopped) reconstructions, each batch
    through its own call so BatchNorm sees them apart. ``disc``: {params, batch_stats, opt_state}.
    Minimises ``scale * loss_fn(D(real), D(fake))``; returns the new ``disc`` and
    {d_loss, logits_real, logits_fake} (mean logits)."""
    fake = jax.lax.stop_gradient(fake)

    def objective(dparams):
        model = merge_module(abstract_disc, dparams, disc["batch_stats"])
        logits_real, logits_fake = model(real, train=True), model(fake, train=True)
        d = loss_fn(logits_real, logits_fake)
        return scale * d, (d, non_param_state(model), logits_real, logits_fake)

    (_, (d_loss, stats, lr_, lf_)), grads = jax.value_and_grad(objective, has_aux=True)(disc["params"])
    updates, opt_state = tx.update(grads, disc["opt_state"], disc["params"])
    new = {"params": optax.apply_updates(disc["params"], updates), "batch_stats": stats, "opt_state": opt_state}
    return new, {"d_loss": d_loss, "logits_real": jnp.mean(lr_), "logits_fake": jnp.mean(lf_)}


def discriminator_state(disc: nnx.Module, tx) -> dict:
    """A discriminator's train state: {params, batch_stats, opt_state} (pure dicts)."""
    _, params, stats = nnx.split(disc, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    return {"params": params, "batch_stats": nnx.to_pure_dict(stats), "opt_state": tx.init(params)}


def discriminator_shardings(abstract_disc: nnx.Module, abstract_opt_state, mesh) -> dict:
    """The shardings of ``discriminator_state``: params and BatchNorm statistics by their logical
    axis names, the optimizer moments as their params."""
    from trainers.train import opt_state_shardings

    _, params, stats = nnx.split(abstract_disc, nnx.Param, ...)
    params = nnx.to_pure_dict(sharding.state_shardings(params, mesh))
    return {"params": params, "batch_stats": nnx.to_pure_dict(sharding.state_shardings(stats, mesh)),
            "opt_state": opt_state_shardings(abstract_opt_state, params, sharding.replicated(mesh))}
