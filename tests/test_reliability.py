"""A run is never lost or misread (issue 18): one test per defect found by faults and bad inputs.

1. a config mismatch is an error, nothing moved; 2. one trainer per workdir; 3. integrity manifests,
and a missing data-iterator state is damage; 4. unwritable checkpoints fail before step 1, a failed
background save surfaces with its cause; 5. files and data checked before step 1, 16-bit images,
a finished run missing its evaluation evaluates; 6. one-line CLI errors.
"""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, tiny_dit_config

STEPS = 4


def run_config(**overrides):
    base = {"num_steps": STEPS, "checkpoint_every": 2, "num_grid_samples": 0, "log_every": 2}
    return tiny_dit_config(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The workdir a finished 4-step tiny-DiT run leaves (config.json; checkpoints at steps 2 and 4 with
    the data position, saved by the loop's own save path), built without compiling a train step
    (training itself is covered by tests/test_train_loop.py). Each test works on a copy."""
    import jax
    import jax.numpy as jnp

    from trainers import checkpoint, data, train
    from trainers.method import ModelDef, get_method

    config = run_config()
    workdir = tmp_path_factory.mktemp("trained") / "run"
    method = get_method(config)
    state = jax.jit(train.TrainPlan(method, ModelDef(method), config).init)(jax.random.PRNGKey(config.seed))
    data_iter = data.create_iterator(config, seed=config.seed, global_batch_size=config.batch_size)
    checkpoint.write_config(workdir, config)
    manager = checkpoint.make_manager(workdir)
    for step in range(1, STEPS + 1):
        next(data_iter)
        if step % config.checkpoint_every == 0:
            checkpoint.save(manager, step, {**state, "step": jnp.asarray(step, jnp.int32)}, data_iter)
            manager.wait_until_finished()
    return workdir


@pytest.fixture
def workdir(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def restore(config, workdir, **kwargs):
    """checkpoint.restore_latest as the loop calls it (no training step compiled)."""
    import jax

    from trainers import checkpoint, data, sharding, train
    from trainers.method import ModelDef, get_method

    method = get_method(config)
    plan = train.TrainPlan(method, ModelDef(method), config)
    abstract = jax.eval_shape(plan.init, jax.random.PRNGKey(0))
    shardings = plan.shardings(abstract, sharding.make_mesh(config.mesh))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    data_iter = data.create_iterator(config, seed=config.seed, global_batch_size=config.batch_size)
    manager = checkpoint.make_manager(workdir)
    return checkpoint.restore_latest(manager, abstract, data_iter, config=config, **kwargs), data_iter


def unwritable(path: Path):
    """Make a directory refuse new files (root ignores modes: use the immutable attribute); -> undo."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        return lambda: os.chmod(path, 0o755)
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("running as root on a file system without chattr: cannot make a directory unwritable")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


# ----------------------------------------------------------------------------- 1. mismatch vs damage
def test_1_changed_model_is_an_error_naming_the_field_and_nothing_moves(workdir, capsys):
    from trainers import checkpoint, convert, train
    from trainers.config_validation import RunError

    before = snapshot(workdir)
    config = run_config(**{"model.hidden_size": 64})
    with pytest.raises(checkpoint.ConfigMismatchError,
                       match=r"config\.model\.hidden_size: 32 in the workdir, 64 now") as e:
        train.train_and_evaluate(config, str(workdir))
    assert "nothing was restored, moved or overwritten" in str(e.value)
    assert snapshot(workdir) == before  # checkpoints, config.json, metrics: untouched
    assert not (workdir / "checkpoints_unreadable").exists() and not (workdir / "LOCK").exists()

    # A sampler with a mismatched --set model.hidden_size: the same error, read-only.
    with pytest.raises(checkpoint.ConfigMismatchError, match=r"config\.model\.hidden_size: 32 in the workdir"):
        checkpoint.check_params_fit(workdir, config)

    # Another method on the same shapes (as DiT and SiT would be) is a mismatch too.
    saved = (workdir / "config.json").read_text()
    other = json.loads(saved)
    other["model"]["name"] = "xar"
    (workdir / "config.json").write_text(json.dumps(other))
    with pytest.raises(checkpoint.ConfigMismatchError, match=r"config\.model\.name='xar' .* trains 'dit'"):
        checkpoint.restore_latest(checkpoint.make_manager(workdir), None, config=run_config())
    (workdir / "config.json").write_text(saved)

    # convert import into a trained workdir refuses; --replace moves everything aside, deleting nothing.
    with pytest.raises(RunError, match=r"is not empty .* --replace"):
        convert.prepare_workdir(str(workdir), replace=False)
    assert snapshot(workdir) == before
    convert.prepare_workdir(str(workdir), replace=True)
    (aside,) = [p for p in workdir.iterdir()]
    assert aside.name.startswith("replaced-") and snapshot(aside) == before


# ----------------------------------------------------------------------------- 2. one trainer per workdir
def test_2_second_trainer_is_refused_and_a_stale_lock_is_taken_over(workdir, capsys):
    from trainers import train, workdir_lock

    before = snapshot(workdir)
    with workdir_lock.WorkdirLock(workdir):
        holder = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, '.');"
                                 "from trainers import workdir_lock as w; w.WorkdirLock(sys.argv[1]).acquire()",
                                 str(workdir)], cwd=REPO, capture_output=True, text=True,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert holder.returncode != 0
        assert f"in use by another trainer (pid {os.getpid()} on host {socket.gethostname()!r}" in holder.stderr
    assert not (workdir / "LOCK").exists()  # released
    assert snapshot(workdir) == before

    # A lock left by a process that is gone (SIGKILL, crash) is stale on this host: taken over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (workdir / "LOCK").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0}))
    train.train_and_evaluate(run_config(), str(workdir))  # finished run: restores, trains nothing
    assert "taking over the stale lock" in capsys.readouterr().out
    assert not (workdir / "LOCK").exists()

    # Another host's lock cannot be checked from here: refused, saying which file to remove.
    (workdir / "LOCK").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    with pytest.raises(workdir_lock.WorkdirLockedError, match=r"host 'elsewhere'.*remove .*LOCK"):
        train.train_and_evaluate(run_config(), str(workdir))


# ----------------------------------------------------------------------------- 3. integrity
def test_3_flipped_bytes_and_a_missing_data_iterator_state_are_damage(workdir, capsys):
    from trainers import checkpoint

    manifest = json.loads((workdir / "checkpoints" / "4" / checkpoint.MANIFEST).read_text())
    assert manifest["data_iter"] and any(k.startswith("state/") for k in manifest["files"])
    # Step 4: flip bytes in the largest array file (same size: orbax alone would restore it).
    biggest = max((p for p in (workdir / "checkpoints" / "4" / "state").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    raw = bytearray(biggest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    biggest.write_bytes(bytes(raw))
    # Step 2: its data-iterator state is gone (and unlisted, as if never written).
    step2 = workdir / "checkpoints" / "2"
    shutil.rmtree(step2 / "data_iter")
    m2 = json.loads((step2 / checkpoint.MANIFEST).read_text())
    m2["files"] = {k: v for k, v in m2["files"].items() if not k.startswith("data_iter/")}
    (step2 / checkpoint.MANIFEST).write_text(json.dumps(m2))

    (step, state), _ = restore(run_config(), workdir)
    out = capsys.readouterr().out
    assert step is None and state is None
    assert f"checkpoint at step 4 is unreadable: {biggest} differs from its SHA-256 checksum" in out
    assert "checkpoint at step 2 is unreadable: " in out and "data-iterator state" in out
    assert sorted(p.name.split("-")[0] for p in (workdir / "checkpoints_unreadable").iterdir()) == ["2", "4"]


def test_3_intact_checkpoint_restores_the_data_position(workdir):
    from trainers import data

    config = run_config()
    (step, state), data_iter = restore(config, workdir, read_only=True)
    assert step == STEPS and int(state["step"]) == STEPS
    fresh = data.create_iterator(config, seed=config.seed, global_batch_size=config.batch_size)
    assert data_iter.get_state() != fresh.get_state()  # the data continues where the run stopped


# ----------------------------------------------------------------------------- 4. failed saves
def test_4_unwritable_checkpoint_dir_fails_before_step_1(workdir):
    from trainers import train
    from trainers.config_validation import RunError

    undo = unwritable(workdir / "checkpoints")
    try:
        with pytest.raises(RunError, match=r"checkpoints is not writable"):
            train.train_and_evaluate(run_config(num_steps=STEPS + 2), str(workdir))
    finally:
        undo()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


ASYNC_FAILURE = r"""
import os, sys, subprocess
sys.path.insert(0, ".")
import jax.numpy as jnp
from trainers import checkpoint
root = sys.argv[1]
manager = checkpoint.make_manager(root)
state = {"w": jnp.ones((8,)), "step": jnp.zeros((), jnp.int32)}
checkpoint.save(manager, 1, state)
manager.wait_until_finished()
subprocess.run(sys.argv[2:] + [str(checkpoint.checkpoint_dir(root))], check=True)
checkpoint.save(manager, 2, state)
for polls in range(10_000):  # the loop polls once a step
    try:
        manager.poll()
    except checkpoint.SaveError as e:
        print(f"after {polls} polls: {e}", flush=True)
        os._exit(0)
    import time; time.sleep(0.01)
print("no error", flush=True)
os._exit(1)
"""


def test_4_failed_background_save_surfaces_with_its_cause(tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    unwritable(probe)()  # skips where a directory cannot be made unwritable
    make = ["chmod", "555"] if os.geteuid() != 0 else ["chattr", "+i"]
    checkpoints = tmp_path / "w" / "checkpoints"
    try:
        proc = subprocess.run([sys.executable, "-c", ASYNC_FAILURE, str(tmp_path / "w"), *make], cwd=REPO,
                              capture_output=True, text=True, timeout=240,  # orbax's own stall is 300 s
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
    finally:
        if checkpoints.exists():
            subprocess.run(["chattr", "-i", str(checkpoints)], capture_output=True)
            os.chmod(checkpoints, 0o755)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "saving the checkpoint of step 2 in" in proc.stdout
    assert "PermissionError" in proc.stdout or "Operation not permitted" in proc.stdout, proc.stdout


# ----------------------------------------------------------------------------- 5. found before step 1
def test_5_missing_files_and_data_without_images_fail_before_model_setup(workdir, tmp_path, monkeypatch):
    from trainers import config_validation, data, train

    # Missing Inception weights / a truncated reference: before the workdir is touched.
    for field, value, message in (("eval.inception_weights", str(tmp_path / "nope.pth"), "FID-Inception weights"),
                                  ("eval.ref", str(tmp_path / "ref.npz"), "is not a complete .npz")):
        (tmp_path / "ref.npz").write_bytes(b"PK\x03\x04 truncated")
        with pytest.raises(config_validation.ConfigError, match=rf"config\.{field}=.*{message}"):
            train.train_and_evaluate(run_config(**{"eval.num_samples": 16, field: value}), str(tmp_path / "w"))
        assert not (tmp_path / "w" / "checkpoints").exists()

    def no_model(*args, **kwargs):
        raise AssertionError("the model was set up before the data was checked")

    monkeypatch.setattr(train, "ModelDef", no_model)
    folder = tmp_path / "imgs"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        (folder / name / "notes.txt").write_text("not an image")
    config = run_config(**{"data.name": "folder", "data.folder": str(folder), "data.num_classes": 2,
                           "model.num_classes": 2, "data.cache_dir": str(tmp_path / "cache")})
    with pytest.raises(ValueError, match="none of the 2 images is usable"):
        train.train_and_evaluate(config, str(tmp_path / "w2"))
    # An empty class folder would silently become a label: reported by the config check.
    (folder / "b" / "notes.txt").unlink()
    with pytest.raises(ValueError, match=r"class folder\(s\) \['b'\] hold no files"):
        data.validate(config, process_count=1)


def test_5_sixteen_bit_and_float_images_keep_their_values():
    from PIL import Image

    from trainers import data

    values = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    expected = np.round(values / 257.0)
    for arr, fmt in ((values, "PNG"), (values, "TIFF"), (values.astype(np.float32) / 65535, "TIFF")):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        image = Image.open(io.BytesIO(buf.getvalue()))
        out = np.asarray(data.to_channels(image, 1), np.float64)
        np.testing.assert_allclose(out, expected, atol=0.5 if arr.dtype == np.float32 else 0, err_msg=image.mode)
        rgb = np.asarray(data.to_channels(Image.open(io.BytesIO(buf.getvalue())), 3))
        assert rgb.shape == (32, 32, 3) and np.array_equal(rgb[..., 0], out.astype(np.uint8))


def test_5_finished_run_missing_its_final_evaluation_evaluates_on_rerun(workdir, monkeypatch):
    from trainers import train

    calls = []
    monkeypatch.setattr(train, "evaluate", lambda config, wd, method, model_def, mesh, state, *a, **k:
                        calls.append(int(state["step"])))
    config = run_config(**{"eval.num_samples": 16})
    train.train_and_evaluate(config, str(workdir))  # finished at step 4, scores.jsonl missing
    assert calls == [STEPS]
    (workdir / "scores.jsonl").write_text(json.dumps({"step": STEPS, "fid": 1.0}) + "\n")
    train.train_and_evaluate(config, str(workdir))
    assert calls == [STEPS]  # evaluated already: not again


# ----------------------------------------------------------------------------- 6. one-line CLI errors
def test_6_cli_errors_are_one_line_naming_the_field_or_file(tmp_path):
    import torch

    truncated = tmp_path / "fixture.npz"
    np.savez(truncated, **{"in/x": np.zeros(1000)})
    truncated.write_bytes(truncated.read_bytes()[:100])
    truncated.with_suffix(".json").write_text(json.dumps({"kind": "dit"}))
    other = tmp_path / "other_model.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, other)
    cases = {
        "unknown field": (["-m", "trainers.main", "--config=configs/dit_s.py:demo", f"--workdir={tmp_path / 'w'}",
                           "--config.model.widht=64"], "--config.model.widht: config.model has no field 'widht'"),
        "missing config": (["-m", "trainers.main", "--config=configs/nope.py", f"--workdir={tmp_path / 'w'}"],
                           "--config=configs/nope.py: cannot load the config file"),
        "truncated npz": (["-m", "trainers.convert", "check", str(truncated)], f"{truncated} is not a complete .npz"),
        "another model": (["-m", "trainers.convert", "import", "dit", str(other), f"--out={tmp_path / 'imp'}",
                           "--config=configs/dit_s.py:demo"], f"{other} does not fit kind 'dit'"),
        "no samples": (["-m", "trainers.sample", f"--workdir={tmp_path}", "--num_samples=0", "--out=x"],
                       "--num_samples=0: give at least 1 sample"),
    }
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = {k: subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, (args, _) in cases.items()}
    verbose = subprocess.run([sys.executable, *cases["no samples"][0], "--verbose"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    for kind, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (kind, out[-2000:], err[-3000:])
        assert "Traceback" not in err, (kind, err[-3000:])
        lines = [line for line in err.splitlines() if line.startswith(("error:", "config error:"))]
        assert len(lines) == 1 and cases[kind][1] in lines[0], (kind, err[-2000:])
    assert "Traceback" in verbose.stderr and "give at least 1 sample" in verbose.stderr
    assert not (tmp_path / "imp" / "checkpoints").exists()


def test_6_samples_report_the_path_they_were_written_to(tmp_path):
    from trainers import sample

    images = np.zeros((2, 8, 8, 1), np.uint8)
    out, grid = sample.write_samples(tmp_path / "x", images, np.zeros(2, np.int32))
    assert out == tmp_path / "x.npz" and out.exists() and grid.exists()
    with np.load(out) as f:
        assert f["arr_0"].shape == (2, 8, 8, 1)
