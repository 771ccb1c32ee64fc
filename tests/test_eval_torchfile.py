"""trainers/torchfile.py reads TorchScript archives (attributes and tensors, no code) without torch."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from trainers import torchfile  # noqa: E402


class _Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, (1, 3), padding=(0, 1), bias=False)
        self.register_buffer("running", torch.arange(3, dtype=torch.float64))
        self.padding = [0, 1]

    def forward(self, x):
        return self.conv(x) + self.running.float()[:, None, None]


class _Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Inner()
        self.scale = torch.nn.Parameter(torch.randn(4, 5).t())  # non-contiguous storage view
        self.stride = 2

    def forward(self, x):
        return self.inner(x) * self.stride


def test_torchscript_tree_and_state_dict(tmp_path):
    torch.manual_seed(0)
    module = torch.jit.script(_Outer())
    path = tmp_path / "m.pt"
    module.save(str(path))
    tree = torchfile.load_torchscript(path)
    assert tree.type_name.endswith("_Outer") and tree.attributes["stride"] == 2
    assert tree.attributes["inner"].attributes["padding"] == [0, 1]
    flat = torchfile.torchscript_state_dict(path)
    expected = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    assert set(flat) == set(expected)
    for k, v in expected.items():
        assert flat[k].dtype == v.dtype and flat[k].shape == v.shape, k
        np.testing.assert_array_equal(flat[k], v)


def test_plain_reader_still_refuses_torchscript_and_torchscript_reader_refuses_checkpoints(tmp_path):
    module = torch.jit.script(_Outer())
    module.save(str(tmp_path / "m.pt"))
    with pytest.raises(pickle.UnpicklingError, match="__torch__"):
        torchfile.load(tmp_path / "m.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "sd.pt")
    np.testing.assert_array_equal(torchfile.load_state_dict(tmp_path / "sd.pt")["w"], np.ones(2, np.float32))
    with pytest.raises(ValueError, match="no code/"):
        torchfile.load_torchscript(tmp_path / "sd.pt")
