"""The one training loop: sharding, exact resume, preemption, non-finite loss, multi-process,
bad configs, messy data, the demo end to end, sampling and checkpoint import."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, TEST_XLA_FLAGS, TINY_DIT_OVERRIDES, run_python, tiny_dit_config

DEMO = "configs/dit_s.py:demo"


def per_step_losses(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [loss for row in rows for loss in row["per_step_loss"]]


def digests(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "batch_digests.p0.jsonl").read_text().splitlines()]
    return {row["step"]: row["sha1"] for row in rows}


def train_args(workdir, *extra):
    return ["tests/run_training.py", f"--config={DEMO}", f"--workdir={workdir}", *TINY_DIT_OVERRIDES, *extra]


# ----------------------------------------------------------------------------- sharding
@pytest.mark.slow
@pytest.mark.parametrize("model", ["dit", "xar"])
def test_sharded_mesh_matches_one_device(tmp_path, model):
    """8 simulated devices, mesh (data=2, fsdp=2, tensor=2) vs one device: five train steps."""
    proc = run_python(["tests/sharded_equivalence.py", str(tmp_path), model],
                      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    report = json.loads(proc.stdout.split("REPORT ", 1)[1].splitlines()[0])
    np.testing.assert_allclose(report["losses_sharded"], report["losses_single"], rtol=1e-5)
    assert len(report["losses_sharded"]) == 5
    assert report["max_param_rel_diff"] <= 1e-5, report
    assert report["tree_rel_diff"] <= 1e-5, report
    assert report["wrong_specs"] == [], report
    assert report["axes_used"] == ["fsdp", "tensor"] and report["axes_used_by_adam_moments"] == ["fsdp", "tensor"]


# ----------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_is_bit_exact(tmp_path):
    common = ["--config.num_steps=8", "--config.checkpoint_every=4", "--config.log_batch_digest=true",
              "--config.num_grid_samples=0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_python(train_args(straight, *common, f"--report={tmp_path / 'straight.npz'}"))
    killed = run_python(train_args(resumed, *common, "--kill_after_checkpoint=4"), check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert sorted(os.listdir(resumed / "checkpoints")) == ["4"]
    again = run_python(train_args(resumed, *common, f"--report={tmp_path / 'resumed.npz'}"))
    assert "resumed from checkpoint at step 4" in again.stdout
    a, b = np.load(tmp_path / "straight.npz"), np.load(tmp_path / "resumed.npz")
    assert sorted(a.files) == sorted(b.files) and any(k.startswith("ema_params") for k in a.files)
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # The data seen: steps 1-8 of the straight run == steps 1-4 before the kill + 5-8 after it.
    assert digests(straight) == digests(resumed)
    assert sorted(digests(resumed)) == list(range(1, 9))


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_exits_zero(tmp_path):
    workdir = tmp_path / "run"
    cmd = [sys.executable, *train_args(workdir, "--config.num_steps=100000", "--config.checkpoint_every=100000",
                                       "--config.num_grid_samples=0")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = TEST_XLA_FLAGS
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = workdir / "metrics.jsonl"
    for _ in range(1500):  # poll (at most ~5 min) until three steps are logged
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the run logged fewer than 3 steps")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "preempted: saved checkpoint at step" in out
    saved = [int(s) for s in os.listdir(workdir / "checkpoints")]
    assert len(saved) == 1 and saved[0] >= 3
    again = run_python(train_args(workdir, f"--config.num_steps={saved[0] + 2}", "--config.checkpoint_every=100000",
                                  "--config.num_grid_samples=0"))
    assert f"resumed from checkpoint at step {saved[0]}" in again.stdout


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    proc = run_python(train_args(workdir, "--config.num_steps=10", "--config.checkpoint_every=4",
                                 "--config.log_every=100", "--config.num_grid_samples=0", "--nan_at_step=6"),
                      check=False)
    assert proc.returncode == 3, proc.stdout[-3000:]
    assert "non-finite loss at step 6" in proc.stdout
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4"]  # step 8 was never saved
    # The last good checkpoint restores: resuming without the poisoned batch trains to the end.
    again = run_python(train_args(workdir, "--config.num_steps=10", "--config.checkpoint_every=4",
                                  "--config.num_grid_samples=0"))
    assert "resumed from checkpoint at step 4" in again.stdout
    assert np.all(np.isfinite(per_step_losses(workdir)))


@pytest.mark.slow
def test_broken_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    workdir = tmp_path / "run"
    run_python(train_args(workdir, "--config.num_steps=4", "--config.checkpoint_every=2",
                          "--config.num_grid_samples=0"))
    newest = workdir / "checkpoints" / "4" / "state"
    for path in newest.rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    again = run_python(train_args(workdir, "--config.num_steps=6", "--config.checkpoint_every=2",
                                  "--config.num_grid_samples=0"))
    assert "checkpoint at step 4 is unreadable" in again.stdout
    assert "resumed from checkpoint at step 2" in again.stdout


# ----------------------------------------------------------------------------- multi-process
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # Grids and evaluation gather global arrays across processes: exercised here too.
    common = ["--config.num_steps=5", "--config.checkpoint_every=5", "--config.num_grid_samples=4",
              "--config.eval.num_samples=16"]
    single = tmp_path / "single"
    run_python(train_args(single, *common), env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    multi = tmp_path / "multi"
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2"}
    env["XLA_FLAGS"] = TEST_XLA_FLAGS
    procs = [subprocess.Popen([sys.executable, *train_args(multi, *common), f"--coordinator=127.0.0.1:{port}",
                               "--num_processes=2", f"--process_id={i}"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    np.testing.assert_allclose(per_step_losses(multi), per_step_losses(single), rtol=1e-5)
    assert len(per_step_losses(multi)) == 5
    assert (multi / "samples" / "step_00000005.png").exists() and (multi / "scores.jsonl").exists()


# ----------------------------------------------------------------------------- configs
BAD_OVERRIDES = {
    "unknown key": (["--config.optim.learning_rate=1e-3"], "learning_rate"),
    "wrong type": (["--config.batch_size=big"], "batch_size"),
    "batch not divisible": (["--config.batch_size=7", "--config.mesh.data=2"], "config.batch_size=7"),
    "mesh vs devices": (["--config.mesh.data=3"], "config.mesh"),
    "unknown dataset": (["--config.data.name=imagenet_does_not_exist"], "config.data.name"),
    "unknown method": (["--config.model.name=gan"], "config.model.name"),
    "bad schedule": (["--config.optim.schedule=linear"], "config.optim.schedule"),
    "bad dtype": (["--config.compute_dtype=float16"], "config.compute_dtype"),
    "ema out of range": (["--config.ema_rate=1.5"], "config.ema_rate"),
    "negative lr": (["--config.optim.lr=-1.0"], "config.optim.lr"),
    "patch does not divide": (["--config.model.patch_size=3"], "config.model.patch_size"),
    "heads do not divide": (["--config.model.num_heads=5"], "config.model.num_heads"),
    "bad sampler": (["--config.sample.method=rk4"], "config.sample.method"),
    "zero steps": (["--config.num_steps=0"], "config.num_steps"),
    "missing folder": (["--config.data.name=folder", "--config.data.folder=/nonexistent/dir"], "config.data.folder"),
}


@pytest.mark.parametrize("kind", sorted(BAD_OVERRIDES))
def test_bad_config_fails_before_compilation_naming_the_field(kind, tmp_path):
    overrides, field = BAD_OVERRIDES[kind]
    proc = run_python(["-m", "trainers.main", f"--config={DEMO}", f"--workdir={tmp_path / 'w'}", *overrides],
                      check=False, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert proc.returncode != 0
    assert field in proc.stdout, proc.stdout[-2000:]
    assert not (tmp_path / "w" / "checkpoints").exists()  # nothing ran


def test_validation_is_cheap_and_names_the_field():
    from trainers import config_validation

    config = tiny_dit_config(batch_size=6)
    with pytest.raises(config_validation.ConfigError, match=r"config.batch_size=6 .* data-parallel size 4"):
        config_validation.validate(config, num_devices=4, num_processes=1)
    config = tiny_dit_config(**{"mesh.data": 2, "mesh.tensor": 2})
    with pytest.raises(config_validation.ConfigError, match=r"needs 4 devices but 8"):
        config_validation.validate(config, num_devices=8, num_processes=1)


# ----------------------------------------------------------------------------- schedules, optimizer
def test_warmup_constant_cosine_schedule():
    from trainers import optim

    o = tiny_dit_config().optim
    o.update(schedule="warmup_constant_cosine", lr=1.0, warmup_steps=10, constant_steps=20, min_lr=0.1)
    s = optim.make_schedule(o, 60)
    np.testing.assert_allclose([s(0), s(5), s(10), s(29), s(30), s(45), s(60)],
                               [0.0, 0.5, 1.0, 1.0, 1.0, 0.1 + 0.9 * 0.5, 0.1], atol=1e-6)


def test_weight_decay_skips_biases_and_1d_params():
    import jax.numpy as jnp

    from trainers import optim

    mask = optim.decay_mask({"w": jnp.ones((3, 4)), "b": jnp.ones(4), "conv": jnp.ones((3, 3, 2, 2)),
                             "scale": jnp.ones(())})
    assert mask == {"w": True, "b": False, "conv": True, "scale": False}


# ----------------------------------------------------------------------------- data and the demo
@pytest.mark.slow
def test_messy_image_folder_trains_and_reports_the_skipped_count(tmp_path):
    from tests import messy_images

    messy_images.write_messy_folder(tmp_path / "imgs")
    proc = run_python(["-m", "trainers.main", f"--config={DEMO}", f"--workdir={tmp_path / 'w'}",
                       *TINY_DIT_OVERRIDES, "--config.data.name=folder", f"--config.data.folder={tmp_path / 'imgs'}",
                       f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.channels=3",
                       "--config.model.in_channels=3", "--config.data.num_classes=2", "--config.model.num_classes=2",
                       "--config.num_steps=3", "--config.batch_size=4", "--config.num_grid_samples=0"])
    skipped = messy_images.NUM_UNREADABLE + messy_images.NUM_TOO_SMALL
    assert f"skipped {skipped} corrupt or unusable images" in proc.stdout, proc.stdout[-3000:]
    assert len(per_step_losses(tmp_path / "w")) == 3


@pytest.mark.slow
def test_demo_config_end_to_end_then_sample_and_reimport(tmp_path):
    workdir = tmp_path / "demo"
    run_python(["-m", "trainers.main", f"--config={DEMO}", f"--workdir={workdir}", "--config.num_steps=20",
                "--config.optim.warmup_steps=5", "--config.checkpoint_every=10", "--config.num_grid_samples=8",
                "--config.sample.num_steps=4"])
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20"]
    assert (workdir / "samples" / "step_00000020.png").exists()
    assert list(workdir.glob("events.out.tfevents.*"))
    losses = per_step_losses(workdir)
    assert len(losses) == 20 and np.mean(losses[-5:]) < np.mean(losses[:5])

    out = tmp_path / "samples.npz"
    for _ in range(2):  # deterministic for a seed
        run_python(["-m", "trainers.sample", f"--workdir={workdir}", "--num_samples=10", f"--out={out}",
                    "--set=sample.num_steps=3"])
        with np.load(out) as f:
            images, labels = f["arr_0"], f["arr_1"]
        assert images.shape == (10, 32, 32, 1) and images.dtype == np.uint8
        np.testing.assert_array_equal(labels, np.arange(10) % 10)
        if _ == 0:
            first = images
    np.testing.assert_array_equal(first, images)
    assert out.with_suffix(".png").exists()


@pytest.mark.slow
def test_tokenizer_with_two_optimizers_trains_in_the_same_loop(tmp_path):
    """The KL-VAE's own GAN train step runs inside the one loop: checkpoints, reconstruction grid, resume."""
    workdir = tmp_path / "vae"
    args = ["-m", "trainers.main", "--config=configs/kl_vae_f16.py:demo", f"--workdir={workdir}",
            "--config.batch_size=4", "--config.log_every=1", "--config.checkpoint_every=2",
            "--config.num_grid_samples=4", "--config.optim.warmup_steps=0"]
    run_python([*args, "--config.num_steps=2"])
    assert (workdir / "samples" / "step_00000002.png").exists()
    again = run_python([*args, "--config.num_steps=3"])
    assert "resumed from checkpoint at step 2" in again.stdout
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all("d_loss" in r for r in rows)
