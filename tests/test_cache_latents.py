"""Latent cache: cached moments equal on-the-fly encoding (from params or a zoo tokenizer workdir); the reader
(trainers/latents.py) samples the posterior per step; a generator trains on it and the loop decodes its grids
and evaluation samples through the paired tokenizer."""

from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from configs import kl_vae_f16  # noqa: E402
from tokenizers import kl_vae  # noqa: E402
from trainers import cache_latents, checkpoint, latents, train  # noqa: E402


def tiny_config():
    c = kl_vae_f16.get_config("demo")
    c.data.image_size = 16
    m = c.model
    m.ch, m.norm_groups, m.ch_mult, m.num_res_blocks, m.resolution, m.embed_dim = 16, 8, (1, 2), 1, 16, 4
    m.scale_factor = 0.5
    return c


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    config = tiny_config()
    method = kl_vae.KLVAEMethod(config)
    params, _ = method.model_def.init(jax.random.PRNGKey(3))
    rs = np.random.RandomState(0)
    images = rs.randint(0, 256, (6, 16, 16, 1)).astype(np.uint8)
    labels = np.arange(6, dtype=np.int32) + 3
    tmp = tmp_path_factory.mktemp("latents")
    np.savez(tmp / "images.npz", images=images, labels=labels)
    out = str(tmp / "cache")
    meta = cache_latents.write_cache(config, params, out, npz=str(tmp / "images.npz"), batch_size=4, progress=False)
    # The same tokenizer as a zoo workdir (what trainers.main or trainers.convert import leaves behind).
    tok_dir = tmp / "tokenizer"
    checkpoint.write_imported(tok_dir, config, train.state_from_params(config, params), source="test")
    return config, method, params, images, labels, out, meta, tok_dir


def test_cached_moments_equal_on_the_fly_encoding(cache):
    config, method, params, images, labels, out, meta, tok_dir = cache
    assert meta["latent_shape"] == [8, 8, 4] and meta["count"] == 6
    source = latents.LatentSource(out)
    assert len(source) == 6
    model = method.model_def.merge(params)
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    direct = np.asarray(method.encode(model, x))
    flipped = np.asarray(method.encode(model, x[:, :, ::-1]))
    for i in range(6):
        rec = source[i]
        assert rec["label"] == labels[i]
        np.testing.assert_allclose(rec["moments"][0], direct[i], atol=1e-5)
        np.testing.assert_allclose(rec["moments"][1], flipped[i], atol=1e-5)
    assert np.abs(direct - flipped).max() > 1e-3  # the flip is a different image, not a copy


def test_sample_latent_is_a_posterior_sample_of_the_chosen_view(cache):
    *_, out, _, _ = cache
    record = latents.LatentSource(out)[2]
    transform = latents.SampleLatent(scale=0.5)
    views = set()
    for seed in range(6):
        got = transform.random_map(record, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        view = int(rng.integers(2))
        views.add(view)
        mean, logvar = np.split(record["moments"][view], 2, axis=-1)
        eps = rng.standard_normal(mean.shape, dtype=np.float32)
        np.testing.assert_allclose(got["latent"], 0.5 * (mean + np.exp(0.5 * logvar) * eps), rtol=1e-6, atol=1e-6)
        assert got["latent"].shape == (8, 8, 4) and got["label"] == record["label"]
    assert views == {0, 1}


def test_latent_dataset_batches_and_resumes(cache):
    import grain

    config, *_, out, _, _ = cache
    config.data.latents = out
    config.tokenizer.scale = 0.5
    assert latents.latent_shape(config) == (8, 8, 4)
    it = latents.latent_dataset(config, seed=1, global_batch_size=4,
                                      shard_options=grain.sharding.ShardOptions(0, 1))
    first = next(it)
    assert first["latent"].shape == (4, 8, 8, 4) and first["latent"].dtype == np.float32
    assert first["label"].shape == (4,)
    state = it.get_state()
    second = next(it)
    it.set_state(state)
    np.testing.assert_array_equal(next(it)["latent"], second["latent"])


def test_bad_npz_is_a_clear_error(tmp_path):
    config = tiny_config()
    method = kl_vae.KLVAEMethod(config)
    params, _ = method.model_def.init(jax.random.PRNGKey(0))
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 16, 16, 1), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        cache_latents.write_cache(config, params, str(tmp_path / "c"), npz=str(tmp_path / "f.npz"), progress=False)
    np.savez(tmp_path / "g.npz", images=np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="channels"):
        cache_latents.write_cache(config, params, str(tmp_path / "c"), npz=str(tmp_path / "g.npz"), progress=False)


def test_cache_from_a_zoo_tokenizer_workdir_equals_the_cache_from_params(cache, tmp_path):
    from trainers import sharding

    config, method, params, images, labels, out, meta, tok_dir = cache
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    tok_config, tok_params, rest = cache_latents.load_workdir_tokenizer(str(tok_dir), mesh)
    assert tok_config.model.name == "kl_vae"
    again = cache_latents.write_cache(tok_config, tok_params, str(tmp_path / "c"),
                                      npz=str(Path(out).parent / "images.npz"), batch_size=4, progress=False,
                                      rest=rest)
    assert again["latent_type"] == "moments" and again["latent_shape"] == meta["latent_shape"]
    a, b = latents.LatentSource(out), latents.LatentSource(str(tmp_path / "c"))
    for i in range(len(a)):
        np.testing.assert_allclose(a[i]["moments"], b[i]["moments"], atol=1e-6)


def test_a_generator_trains_from_the_cache_through_the_loop(cache, tmp_path):
    """DiT in latent space: the one loop reads {"latent", "label"} batches from the cache and decodes its
    grid and evaluation samples with the paired tokenizer (a zoo workdir) into 16x16x1 images."""
    import json

    from PIL import Image

    from tests.conftest import TINY_DIT_OVERRIDES, run_python

    config, method, params, images, labels, out, meta, tok_dir = cache
    h, w, c = meta["latent_shape"]
    workdir = tmp_path / "dit_latent"
    overrides = [o for o in TINY_DIT_OVERRIDES if "input_size" not in o and "patch_size" not in o]
    run_python(["-m", "trainers.main", "--config=configs/dit_s.py:demo", f"--workdir={workdir}", *overrides,
                f"--config.data.latents={out}", "--config.tokenizer.kind=workdir",
                f"--config.tokenizer.workdir={tok_dir}", "--config.tokenizer.scale=0.5",
                f"--config.model.input_size={h}", "--config.model.patch_size=2", f"--config.model.in_channels={c}",
                "--config.batch_size=4", "--config.num_steps=3", "--config.num_grid_samples=4",
                "--config.eval.num_samples=8", "--config.checkpoint_every=3"])
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    grid = np.asarray(Image.open(workdir / "samples" / "step_00000003.png"))
    assert grid.shape == (2 + 18, 2 + 10 * 18, 3)  # 4 decoded 16x16 images in a 10-class row
    scores = json.loads((workdir / "scores.jsonl").read_text().splitlines()[-1])
    assert scores["step"] == 3 and np.isfinite(scores["mnist_fid"])
