"""Resize conventions against torch-fidelity's TF1 interpolation, F.interpolate and PIL."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf1_reference = pytest.importorskip("torch_fidelity.interpolate_compat_tensorflow")

from eval import resize  # noqa: E402

SIZES = [((28, 28), (299, 299)), ((75, 61), (32, 40)), ((33, 47), (299, 299))]


def _images(hw, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (2, *hw, 3)).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


@pytest.mark.parametrize("in_hw,out_hw", SIZES)
def test_tf1_bilinear_matches_torch_fidelity(in_hw, out_hw):
    x = _images(in_hw)
    ref = tf1_reference.interpolate_bilinear_2d_like_tensorflow1x(_nchw(x), size=out_hw, align_corners=False)
    ours = np.asarray(resize.tf1_bilinear(x, out_hw))
    np.testing.assert_allclose(ours, ref.numpy().transpose(0, 2, 3, 1), atol=1e-3, rtol=0)


@pytest.mark.parametrize("in_hw,out_hw", SIZES)
def test_pytorch_fid_bilinear_matches_f_interpolate(in_hw, out_hw):
    x = _images(in_hw, 1)
    ref = torch.nn.functional.interpolate(_nchw(x), size=out_hw, mode="bilinear", align_corners=False)
    ours = np.asarray(resize.torch_bilinear(x, out_hw))
    np.testing.assert_allclose(ours, ref.numpy().transpose(0, 2, 3, 1), atol=1e-3, rtol=0)


@pytest.mark.parametrize("in_hw,out_hw", SIZES)
def test_clean_bicubic_matches_pil_float_resize(in_hw, out_hw):
    from PIL import Image

    x = _images(in_hw, 2)
    ref = np.stack([np.stack([np.asarray(Image.fromarray(img[..., c], mode="F").resize(out_hw[::-1], Image.BICUBIC))
                              for c in range(3)], -1) for img in x]).clip(0, 255)
    ours = np.asarray(resize.clean_bicubic(x, out_hw))
    np.testing.assert_allclose(ours, ref, atol=1e-2, rtol=0)
    aa = torch.nn.functional.interpolate(_nchw(x), size=out_hw, mode="bicubic", align_corners=False,
                                         antialias=True).clamp(0, 255)
    np.testing.assert_allclose(ours, aa.numpy().transpose(0, 2, 3, 1), atol=1e-2, rtol=0)


def test_modes_differ_and_normalise_to_the_nets_range():
    x = _images((32, 32), 3).astype(np.uint8)
    outs = {m: np.asarray(resize.to_inception_input(x, 299, m)) for m in resize.MODES}
    for m, v in outs.items():
        assert v.shape == (2, 299, 299, 3) and v.min() >= -1 and v.max() <= 1, m
    assert np.abs(outs["tf1_bilinear"] - outs["pytorch_fid"]).max() > 0.05
    assert np.abs(outs["tf1_bilinear"] - outs["clean_bicubic"]).max() > 0.05
    gray = np.asarray(resize.to_inception_input(x[..., :1], 299))
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    with pytest.raises(ValueError, match="resize mode"):
        resize.resize(x.astype(np.float32), (10, 10), "nearest")
