"""tokenizers/retok_cli.py: quality against the number of kept tokens k for a tokenizer with Redundant
Token Padding and one without, on the same images (two tiny workdirs of untrained weights)."""

import json

import jax
import numpy as np
import pytest

from tokenizers import retok_cli


def _config(num_padding):
    from configs import retok_ss

    c = retok_ss.get_config("demo" if num_padding else "demo,baseline")
    m = c.model
    c.data.image_size = 16
    m.ch_mult = (1, 1)
    m.encoder.update(width=32, depth=1, heads=4)
    m.decoder.update(width=32, depth=1, heads=4)
    m.num_latent_tokens, m.num_padding, m.min_tokens = 16, num_padding, 4
    m.codebook_size, m.distill_depth = 64, 1
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from trainers import checkpoint, train
    from trainers.method import ModelDef, get_method

    tmp = tmp_path_factory.mktemp("retok_cli")
    workdirs = []
    for name, pad in (("padded", 12), ("plain", 0)):
        c = _config(pad)
        c.data.cache_dir = str(tmp / "data")
        method = get_method(c)
        state = train.TrainPlan(method, ModelDef(method), c).init(jax.random.PRNGKey(pad))  # untrained weights
        checkpoint.write_imported(tmp / name, c, state, source="test")
        workdirs.append(str(tmp / name))
    out = retok_cli.evaluate(workdirs, "1,4,all,20", str(tmp / "out"), num_images=12, batch_size=8)
    return tmp, workdirs, out


def test_quality_per_k_for_both_runs_on_the_same_images(runs):
    from trainers import checkpoint, decode, sharding
    from trainers.method import ModelDef, get_method
    from trainers.sample import images_to_uint8

    tmp, workdirs, out = runs
    saved = json.loads((tmp / "out" / "quality_vs_k.json").read_text())
    assert saved["num_images"] == 12 and [r["workdir"] for r in saved["runs"]] == workdirs
    padded, plain = saved["runs"]
    assert [r["k"] for r in padded["results"]] == [1, 4, 16, 20]  # 'all' = N; 20 reaches into the padding
    assert [r["k"] for r in plain["results"]] == [1, 4, 16]  # no padding: nothing beyond N
    for r in padded["results"] + plain["results"]:
        assert np.isfinite(r["psnr"]) and r["mse"] > 0 and np.isfinite(r["mnist_rfid"])
    assert (tmp / "out" / "reconstructions_0.png").exists() and (tmp / "out" / "reconstructions_1.png").exists()
    table = retok_cli.table(out)
    assert table.splitlines()[-1].split(" | ")[0] == "20" and table.splitlines()[-1].endswith("| -")

    # The MSE of k = 4 is that of decoding the first 4 tokens (the released slice) of the same images by hand.
    config = checkpoint.read_config(workdirs[0])
    method = get_method(config)
    model_def = ModelDef(method)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    _, params, rest = decode.restore_params(workdirs[0], model_def, mesh)
    from trainers import train

    images = train.dataset_images(config, 12, seed=config.seed + 17)
    rec = images_to_uint8(method.reconstruct(model_def.merge(params, rest), images / 127.5 - 1.0, length=4))
    mse = np.mean((images / 127.5 - 1.0 - (rec.astype(np.float64) / 127.5 - 1.0)) ** 2)
    assert padded["results"][1]["mse"] == pytest.approx(mse, rel=1e-3)  # key mask vs. slice: rounding


def test_bad_ks_name_the_flag(runs):
    _, workdirs, _ = runs
    with pytest.raises(SystemExit, match="--ks"):
        retok_cli.parse_ks("1,half", 16)
    with pytest.raises(SystemExit, match="--ks"):
        retok_cli.evaluate(workdirs[1:], "0,4", "/nonexistent-out", num_images=4, batch_size=4)
    assert retok_cli.parse_ks("", 16) == [1, 2, 4, 8, 16]


def test_probe_measures_the_fixed_batch(tmp_path):
    c = _config(12)
    c.data.cache_dir = str(tmp_path / "data")
    c.batch_size = 4
    rows = retok_cli.probe(c, 2, one_batch=True, every=1)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(np.isfinite(v) for v in r.values()) and r["recon_var"] >= 0
    from trainers import data

    x = np.asarray(next(data.create_iterator(c, seed=0, global_batch_size=4))["image"], np.float64)
    assert rows[0]["mean_image_mse"] == pytest.approx(np.mean((x - x.mean(0)) ** 2), rel=1e-4)
