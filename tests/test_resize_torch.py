"""eval/resize.py torch_area / torch_bicubic against torch.nn.functional.interpolate (area; bicubic,
align_corners=False, A = -0.75), up and down, non-divisible sizes included."""

import numpy as np
import pytest

from eval import resize

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (4, 4), (6, 5), (9, 7), (16, 16), (27, 20)])
def test_area_and_bicubic_match_torch(size):
    x = np.random.RandomState(0).randn(2, 3, 9, 7).astype(np.float32)
    for mode, fn, kw in (("area", resize.torch_area, {}), ("bicubic", resize.torch_bicubic, {"align_corners": False})):
        ref = torch.nn.functional.interpolate(torch.tensor(x), size=size, mode=mode, **kw).numpy()
        ours = np.asarray(fn(x.transpose(0, 2, 3, 1), size)).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(ours, ref, atol=1e-5, err_msg=f"{mode} {size}")


def test_bicubic_is_not_keys_half():
    # jax.image.resize("cubic") (Keys a = -0.5) differs from torch's A = -0.75 kernel.
    import jax

    x = np.random.RandomState(1).randn(1, 4, 4, 1).astype(np.float32)
    ours = np.asarray(resize.torch_bicubic(x, (8, 8)))
    keys = np.asarray(jax.image.resize(x, (1, 8, 8, 1), "cubic", antialias=False))
    assert np.abs(ours - keys).max() > 1e-3
