"""Resizing images to the Inception input, in the three conventions FID numbers are published with.

FID is sensitive to how images reach 299x299, so the convention is a choice:

``tf1_bilinear`` (default)  TF1 ``resize_bilinear`` (align_corners=False, no half-pixel centres) on
                            [0, 255], then (x - 128) / 128: the graph ADM's evaluator, TTUR and
                            torch-fidelity (``interpolate_compat_tensorflow.py``) run; published numbers.
``pytorch_fid``             x / 255, ``F.interpolate(mode="bilinear", align_corners=False)``, 2x - 1
                            (pytorch-fid ``inception.py``).
``clean_bicubic``           PIL's antialiased bicubic on float images, clipped to [0, 255], then
                            (x - 128) / 128 (clean-fid's "clean" mode).

Layout: (batch, height, width, channels) everywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("tf1_bilinear", "pytorch_fid", "clean_bicubic")
DEFAULT = "tf1_bilinear"


def _tf1_bilinear_taps(in_size: int, out_size: int):
    # TF1 kernel: src = dst * in/out in float32; lo = floor(src); hi clamped to the last pixel.
    src = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
    lo = np.floor(src).astype(np.int32)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo).astype(np.float32)


def _torch_bilinear_taps(in_size: int, out_size: int):
    # ATen area_pixel_compute_source_index: src = (dst + 0.5) * in/out - 0.5, clamped at 0.
    scale = np.float32(in_size / out_size)
    src = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    lo = np.floor(src).astype(np.int32)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo).astype(np.float32)


def _lerp_resize(x, size, taps, lerp):
    h_lo, h_hi, h_w = taps(x.shape[1], size[0])
    w_lo, w_hi, w_w = taps(x.shape[2], size[1])
    w_w = jnp.asarray(w_w)[None, None, :, None]
    h_w = jnp.asarray(h_w)[None, :, None, None]
    top, bottom = x[:, h_lo], x[:, h_hi]
    top = lerp(top[:, :, w_lo], top[:, :, w_hi], w_w)
    bottom = lerp(bottom[:, :, w_lo], bottom[:, :, w_hi], w_w)
    return lerp(top, bottom, h_w)


def tf1_bilinear(x, size: tuple[int, int]):
    """TF1 ``resize_bilinear(align_corners=False)`` of (b, h, w, c) float images."""
    return _lerp_resize(x, size, _tf1_bilinear_taps, lambda a, b, t: a + (b - a) * t)


def torch_bilinear(x, size: tuple[int, int]):
    """``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` of (b, h, w, c) images."""
    return _lerp_resize(x, size, _torch_bilinear_taps, lambda a, b, t: (1 - t) * a + t * b)


def _cubic(x, a=-0.5):
    # Keys cubic with a = -0.5 (PIL's bicubic filter).
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def pil_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of PIL's antialiased bicubic resampling (Resample.c precompute_coeffs)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        w = _cubic((taps - center + 0.5) / filterscale)
        m[i, lo:hi] = w / w.sum()
    return m


def clean_bicubic(x, size: tuple[int, int]):
    """PIL ``Image.resize(BICUBIC)`` of float images (antialiased when shrinking), clipped to [0, 255]."""
    mh = jnp.asarray(pil_bicubic_matrix(x.shape[1], size[0]), jnp.float32)
    mw = jnp.asarray(pil_bicubic_matrix(x.shape[2], size[1]), jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    # PIL resamples horizontally first, then vertically.
    y = jnp.einsum("bhwc,ow->bhoc", x, mw, precision=hi)
    y = jnp.einsum("bhwc,oh->bowc", y, mh, precision=hi)
    return jnp.clip(y, 0.0, 255.0)


def resize(x, size: tuple[int, int], mode: str = DEFAULT):
    """Resize (b, h, w, c) float images in [0, 255] with one of ``MODES``; unchanged if already ``size``."""
    if mode not in MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose from {MODES}")
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    if mode == "tf1_bilinear":
        return tf1_bilinear(x, size)
    if mode == "pytorch_fid":
        return torch_bilinear(x, size)
    return clean_bicubic(x, size)


def to_inception_input(images, size: int, mode: str = DEFAULT):
    """(b, h, w, 1 or 3) uint8/float images in [0, 255] -> (b, size, size, 3) float32 in the net's range."""
    x = jnp.asarray(images).astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[-1] != 3:
        raise ValueError(f"expected 1 or 3 channels (NHWC), got shape {x.shape}")
    if mode == "pytorch_fid":
        # pytorch-fid resizes [0, 1] images and maps them to [-1, 1].
        return 2.0 * resize(x / 255.0, (size, size), mode) - 1.0
    return (resize(x, (size, size), mode) - 128.0) / 128.0


# ----------------------------------------------------------------------------
# PyTorch-exact ``F.interpolate`` modes for feature maps (TokenFlow's multi-scale quantizer)
# ----------------------------------------------------------------------------


def torch_area_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of ``F.interpolate(mode="area")`` = ``adaptive_avg_pool``: output i averages
    input floor(i*in/out) .. ceil((i+1)*in/out) - 1 (overlapping bins when in % out != 0)."""
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        lo = (i * in_size) // out_size
        hi = -((-(i + 1) * in_size) // out_size)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def _torch_cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    # ATen upsample_bicubic2d get_cubic_upsample_coefficients (cubic convolution, A = -0.75).
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def torch_bicubic_matrix(in_size: int, out_size: int, scale_factor: float | None = None) -> np.ndarray:
    """(out, in) weights of ``F.interpolate(mode="bicubic", align_corners=False, antialias=False)``:
    src = (dst + 0.5) * in/out - 0.5 (not clamped), taps floor(src) - 1 .. floor(src) + 2 clamped
    to the border, cubic-convolution weights with A = -0.75 (torch's, not Keys' -0.5). Called with
    ``scale_factor=`` torch maps coordinates with 1/scale_factor instead of in/out (DINO's +0.1)."""
    scale = np.float32(in_size / out_size if scale_factor is None else 1.0 / scale_factor)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    idx = np.floor(src).astype(np.int64)
    w = _torch_cubic_weights((src - idx).astype(np.float64))
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        for j in range(4):
            m[i, min(max(idx[i] - 1 + j, 0), in_size - 1)] += w[i, j]
    return m


def _separable(x, mh: np.ndarray, mw: np.ndarray):
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("bhwc,ow->bhoc", x, jnp.asarray(mw, jnp.float32), precision=hi)
    return jnp.einsum("bhwc,oh->bowc", y, jnp.asarray(mh, jnp.float32), precision=hi)


def torch_area(x, size: tuple[int, int]):
    """``F.interpolate(mode="area")`` of (b, h, w, c) feature maps (any range, no clipping)."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    return _separable(x, torch_area_matrix(x.shape[1], size[0]), torch_area_matrix(x.shape[2], size[1]))


def torch_bicubic(x, size: tuple[int, int], scale_factor: tuple[float, float] | None = None):
    """``F.interpolate(mode="bicubic", align_corners=False)`` of (b, h, w, c) maps (no clipping);
    ``scale_factor`` (h, w): torch's ``scale_factor=`` call, whose output size is floor(in * factor)."""
    if scale_factor is not None:
        size = tuple(int(np.floor(n * f)) for n, f in zip(x.shape[1:3], scale_factor))
    elif tuple(x.shape[1:3]) == tuple(size):
        return x
    sh, sw = scale_factor or (None, None)
    return _separable(x, torch_bicubic_matrix(x.shape[1], size[0], sh), torch_bicubic_matrix(x.shape[2], size[1], sw))
