"""orbax checkpoints of the train state and the grain iterator: integrity manifests, mismatch vs damage.

Layout of a workdir::

    DIR/config.json                     the run's config (written once the restore succeeded)
    DIR/LOCK                            held by the one trainer of this workdir (trainers/workdir_lock.py)
    DIR/checkpoints/<step>/state        the train state (params, ema_params, opt_state, step, rng, rest)
    DIR/checkpoints/<step>/data_iter    the grain iterator state (one file per process)
    DIR/checkpoints/<step>/manifest.json  size and SHA-256 of every file of the step, written after
                                        the save completed

Saves are asynchronous and atomic (orbax finalises a step directory only when
every item is written), so a run killed mid-save leaves the previous step as
the newest complete checkpoint. A background save that fails raises
``SaveError`` with its real cause at the next step (``Checkpoints.poll``).

Restoring tells two things apart:

* mismatch: the checkpoint is intact but holds another model or optimizer
  (its array shapes or tree differ from the run's), or was written by a
  different number of processes. ``ConfigMismatchError`` names each config
  field that differs from the workdir's ``config.json`` with both values;
  nothing is moved or overwritten.
* damage: a file listed in the manifest is missing or its checksum differs,
  the data-iterator state is missing, or orbax cannot read it. The newest
  damaged step is set aside to ``checkpoints_unreadable/`` (never deleted)
  and the previous one is tried; the cause is printed.

A checkpoint without ``manifest.json`` (written before manifests existed, or
killed between orbax's commit and the manifest, which is written by a
background thread once the loop sees the save finished) is restored
unverified, with a warning. Imported checkpoints (``trainers.convert import``) have no
data-iterator state by construction; their manifest records that, and a run
fine-tuning from one starts its data at the first batch, logged.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from trainers.errors import ConfigError, RunError

STATE = "state"
DATA_ITER = "data_iter"
MANIFEST = "manifest.json"
_MANIFEST_VERSION = 1


class ConfigMismatchError(ConfigError):
    """The workdir's checkpoints hold a state of another shape than this run's config builds."""


class SaveError(RunError):
    """A checkpoint save failed (in the background or not); carries the real cause."""


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir).absolute() / "checkpoints"


# ============================================================================ manifests
def _file_digests(step_dir: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(step_dir.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            h = hashlib.sha256()
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[str(path.relative_to(step_dir))] = {"size": path.stat().st_size, "sha256": h.hexdigest()}
    return out


def write_manifest(step_dir: Path, *, data_iter: bool, imported: bool = False) -> None:
    """Checksums of every file of a completed step (process 0; the file system is shared)."""
    if jax.process_index() != 0:
        return
    manifest = {"version": _MANIFEST_VERSION, "data_iter": data_iter, "imported": imported,
                "process_count": jax.process_count(), "files": _file_digests(step_dir)}
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, step_dir / MANIFEST)


def read_manifest(step_dir: Path) -> dict | None:
    path = step_dir / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _Damage(f"{path} is unreadable ({type(e).__name__}: {e})") from None


def verify_manifest(step_dir: Path) -> dict | None:
    """The manifest of ``step_dir`` after checking every file it lists; raises _Damage naming the first
    missing or changed file. None when the step has no manifest."""
    manifest = read_manifest(step_dir)
    if manifest is None:
        return None
    expected = manifest.get("files", {})
    for rel in sorted(expected):
        if not (step_dir / rel).is_file():
            raise _Damage(f"{step_dir / rel} is missing (listed in {step_dir / MANIFEST})")
    found = _file_digests(step_dir)
    for rel in sorted(expected):
        if found[rel] != expected[rel]:
            what = "size" if found[rel]["size"] != expected[rel]["size"] else "SHA-256 checksum"
            raise _Damage(f"{step_dir / rel} differs from its {what} in {step_dir / MANIFEST}")
    return manifest


class _Damage(Exception):
    """A checkpoint step is damaged (message: the cause)."""


def _agree(ok: bool, reason: str) -> tuple[bool, str]:
    """Process 0's verdict on every process (only process 0 reads the checksums)."""
    if jax.process_count() == 1:
        return ok, reason
    from jax.experimental import multihost_utils

    ok = bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
    return ok, reason if ok or reason else "damaged (found by process 0; see its log)"


# ============================================================================ the manager
class Checkpoints:
    """An orbax CheckpointManager plus manifests written once each save has completed, and save errors
    raised with their cause. ``poll()`` once a step finishes manifests and surfaces failures."""

    def __init__(self, workdir: str | Path, *, keep_last: int = 3, keep_every: int = 0,
                 async_save: bool = True, read_only: bool = False):
        self.directory = checkpoint_dir(workdir)
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last or None, keep_period=keep_every or None,
            enable_async_checkpointing=async_save, create=not read_only, read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA_ITER))
        self._unfinished: list[tuple[int, bool]] = []  # (step, has data_iter) saved, manifest not written
        self._failed: SaveError | None = None
        self._hashing: threading.Thread | None = None  # manifests of finished saves, off the step's path

    # orbax passthroughs
    def all_steps(self):
        return self.manager.all_steps()

    def latest_step(self):
        return self.manager.latest_step()

    def reload(self):
        self.manager.reload()

    def save(self, step: int, items: dict, *, has_data_iter: bool) -> None:
        self._raise_if_failed()
        self._join_hashing()  # (orbax may delete an old step under keep_last while saving this one)
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001 - orbax surfaces an earlier background failure here too
            self._fail(step, e)
        self._unfinished.append((step, has_data_iter))

    def poll(self) -> None:
        """Called every step: when the background save has finished, write its manifest; if it failed,
        raise SaveError with the cause (instead of stalling until orbax's 300 s timeout)."""
        self._raise_if_failed()
        if self._unfinished and not self.manager.is_saving_in_progress():
            self._finish(background=True)

    def wait_until_finished(self) -> None:
        """Wait for the save in flight and write the manifests of every finished save."""
        self._finish(background=False)

    def _finish(self, *, background: bool) -> None:
        self._raise_if_failed()
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - the background thread's error, re-raised by orbax
            self._fail(self._unfinished[-1][0] if self._unfinished else -1, e)
        self._join_hashing()
        done, self._unfinished = self._unfinished, []
        if not done:
            return
        existing = set(self.manager.all_steps())
        done = [(step, d) for step, d in done if step in existing]  # (a step may be gone under keep_last)

        def write():
            for step, has_data_iter in done:
                try:
                    write_manifest(self.directory / str(step), data_iter=has_data_iter)
                except FileNotFoundError:  # deleted under keep_last meanwhile: nothing to verify later
                    pass

        if background:  # checksums of a large checkpoint take seconds: hashlib releases the GIL
            self._hashing = threading.Thread(target=write, name="checkpoint_manifest", daemon=True)
            self._hashing.start()
        else:
            write()

    def _join_hashing(self) -> None:
        if self._hashing is not None:
            self._hashing.join()
            self._hashing = None

    def _fail(self, step: int, e: Exception):
        cause = str(e).splitlines()[0] if str(e) else ""
        self._failed = SaveError(f"saving the checkpoint of step {step} in {self.directory} failed: "
                                 f"{type(e).__name__}: {cause}")
        raise self._failed from e

    def _raise_if_failed(self):
        if self._failed is not None:
            raise self._failed

    @property
    def failed(self) -> bool:
        return self._failed is not None


def make_manager(workdir: str | Path, *, keep_last: int = 3, keep_every: int = 0,
                 async_save: bool = True, read_only: bool = False) -> Checkpoints:
    return Checkpoints(workdir, keep_last=keep_last, keep_every=keep_every, async_save=async_save,
                       read_only=read_only)


def save(manager: Checkpoints, step: int, state, data_iter=None) -> None:
    import grain

    items = {STATE: ocp.args.StandardSave(state)}
    if data_iter is not None:
        items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
    manager.save(step, items, has_data_iter=data_iter is not None)


def check_writable(workdir: str | Path) -> None:
    """The workdir and its checkpoint directory accept new files (probed by writing one), before step 1."""
    for d in (Path(workdir).absolute(), checkpoint_dir(workdir)):
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".write-probe-{os.getpid()}-{jax.process_index()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise RunError(f"{d} is not writable ({type(e).__name__}: {e.strerror or e}); fix its permissions "
                           "or free space, or choose another --workdir") from None


# ============================================================================ restore
def _norm_path(path) -> tuple[str, ...]:
    out = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def _dtype_name(dtype) -> str | None:
    """A plain dtype's name; None for what orbax may store in another form (typed PRNG keys)."""
    try:
        if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
            return None
        return np.dtype(dtype).name
    except TypeError:
        return None


def _shapes(tree) -> dict[tuple[str, ...], tuple]:
    """{path: (shape, dtype name)} of the array leaves; leaves of extended dtypes map to None (not compared)."""
    out = {}
    for p, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if hasattr(leaf, "shape"):
            name = _dtype_name(leaf.dtype)
            out[_norm_path(p)] = None if name is None else (tuple(leaf.shape), name)
    return out


def _fits(saved: dict, wanted: dict) -> bool:
    """Same paths, and the same shape and dtype wherever both sides are plain arrays."""
    return set(saved) == set(wanted) and all(
        saved[p] == wanted[p] for p in wanted if saved[p] is not None and wanted[p] is not None)


def _state_metadata(step_dir: Path):
    try:
        from etils import epath

        md = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir / STATE))
    except Exception as e:  # noqa: BLE001 - unreadable metadata is damage
        raise _Damage(f"{step_dir / STATE} has unreadable metadata ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return getattr(md, "item_metadata", md)


def config_differences(old, new, prefixes=("",)) -> list[tuple[str, object, object]]:
    """(field, old value, new value) of every leaf that differs (missing = '<absent>')."""
    def flat(c, prefix=""):
        out = {}
        for k, v in (c.items() if hasattr(c, "items") else []):
            if hasattr(v, "items"):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
        return out

    a, b = flat(old), flat(new)
    keys = sorted(k for k in set(a) | set(b) if any(k.startswith(p) for p in prefixes))
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in keys if a.get(k, "<absent>") != b.get(k, "<absent>")]


STATE_SECTIONS = ("model.", "optim.", "data.", "ema_rate", "compute_dtype", "seed")


def _mismatch_message(step_dir: Path, workdir: Path, config, saved_shapes, wanted_shapes) -> str:
    lines = [f"the checkpoint {step_dir} holds another state than this config builds, so nothing was "
             "restored, moved or overwritten"]
    saved_config = None
    try:
        saved_config = read_config(workdir)
    except (FileNotFoundError, ValueError):
        pass
    if saved_config is not None and config is not None:
        diffs = config_differences(saved_config, config, STATE_SECTIONS)
        if diffs:
            lines.append("fields that differ from " + str(workdir / "config.json") + ": " + "; ".join(
                f"config.{k}: {a!r} in the workdir, {b!r} now" for k, a, b in diffs))
    arrays = []
    for p in sorted(set(saved_shapes) | set(wanted_shapes)):
        a, b = saved_shapes.get(p), wanted_shapes.get(p)
        if (p in saved_shapes) != (p in wanted_shapes) or (a is not None and b is not None and a != b):
            arrays.append(f"{'/'.join(p)}: {a[0] if a else 'absent'} saved, {b[0] if b else 'absent'} wanted")
    if arrays:
        lines.append(f"{len(arrays)} arrays differ, e.g. " + "; ".join(arrays[:3]))
    lines.append("use the workdir's own config (trainers.sample reads it when --config is not given), "
                 "or a new --workdir")
    return ". ".join(lines)


def _process_count_of(data_iter_dir: Path) -> int | None:
    for p in data_iter_dir.glob("process_*-of-*.json"):
        return int(p.stem.rsplit("-of-", 1)[1])
    return None


def restore_latest(manager: Checkpoints, abstract_state, data_iter=None, *, config=None,
                   read_only: bool = False):
    """Restore the newest intact checkpoint: (step, state) or (None, None) when there is none.

    ``abstract_state`` holds ShapeDtypeStructs with shardings, so arrays land sharded. Damaged steps
    (see the module doc) are skipped, newest first, each with its cause printed; unless ``read_only``
    (samplers, evaluators) they are then moved to checkpoints_unreadable/. A mismatch raises
    ConfigMismatchError before anything is moved.
    """
    import grain

    root = Path(manager.directory)
    workdir = root.parent
    wanted = _shapes(abstract_state)
    steps = sorted(manager.all_steps(), reverse=True)
    if steps and config is not None:  # another method on the same shapes (dit vs sit) is a mismatch too
        try:
            saved_name = read_config(workdir).model.name
        except (FileNotFoundError, ValueError, AttributeError, KeyError):
            saved_name = None
        if saved_name is not None and saved_name != config.model.name:
            raise ConfigMismatchError(
                f"the checkpoints in {root} are of config.model.name={saved_name!r} (its config.json) and this "
                f"config trains {config.model.name!r}; nothing was restored, moved or overwritten. Use a new "
                "--workdir (or trainers.convert import to start one from those weights)")
    damaged = []
    found = (None, None)
    for step in steps:
        step_dir = root / str(step)
        ok, reason, manifest = True, "", None
        try:
            if jax.process_index() == 0:
                manifest = verify_manifest(step_dir)
        except _Damage as e:
            ok, reason = False, str(e)
        ok, reason = _agree(ok, reason)
        try:
            if not ok:
                raise _Damage(reason)
            manifest = read_manifest(step_dir) if manifest is None else manifest
            saved = _shapes(_state_metadata(step_dir))
            if not _fits(saved, wanted):
                raise ConfigMismatchError(_mismatch_message(step_dir, workdir, config, saved, wanted))
            items = {STATE: ocp.args.StandardRestore(abstract_state)}
            if data_iter is not None:
                imported = manifest is not None and not manifest.get("data_iter", True)
                if imported:
                    how = "imported by trainers.convert" if manifest.get("imported") else "saved without one"
                    print(f"checkpoint at step {step} has no data-iterator state ({how}); the data starts at "
                          "the first batch", flush=True)
                elif not (step_dir / DATA_ITER).is_dir():
                    raise _Damage(f"{step_dir / DATA_ITER} is missing (the data-iterator state); resuming "
                                  "without it would replay the data from the first batch")
                else:
                    n = _process_count_of(step_dir / DATA_ITER)
                    if n is not None and n != jax.process_count():
                        raise ConfigMismatchError(
                            f"the checkpoint {step_dir} was written by {n} processes and this run has "
                            f"{jax.process_count()}; its data-iterator state is per process, so resume with "
                            f"{n} processes (nothing was restored, moved or overwritten)")
                    items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
            if manifest is None:
                print(f"WARNING: checkpoint at step {step} has no {MANIFEST}; restoring it unverified",
                      flush=True)
            restored = manager.manager.restore(step, args=ocp.args.Composite(**items))
            found = (step, restored[STATE])
            break
        except ConfigMismatchError:
            raise
        except Exception as e:  # noqa: BLE001 - damage of any kind falls back to the previous step
            cause = str(e) if isinstance(e, _Damage) else (
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            logging.warning("checkpoint at step %d is unreadable (%s); falling back to the previous one", step, cause)
            print(f"WARNING: checkpoint at step {step} is unreadable: {cause}; falling back to the previous one",
                  flush=True)
            damaged.append(step)
    if damaged and not read_only:
        _set_aside(manager, damaged)
    return found


def check_params_fit(workdir: str | Path, config) -> None:
    """For readers (trainers.sample): the newest checkpoint with readable metadata holds params of the
    shapes ``config``'s model builds; else ConfigMismatchError naming the differing config fields.
    Reads metadata only; nothing is moved."""
    from flax import nnx

    from trainers.method import ModelDef, get_method

    wanted = _shapes(nnx.to_pure_dict(ModelDef(get_method(config)).abstract_params))
    root = checkpoint_dir(workdir)
    steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True) if root.is_dir() else []
    for step in steps:
        try:
            shapes = _shapes(_state_metadata(root / str(step)))
        except _Damage:
            continue
        for key in ("ema_params", "params"):
            saved = {p[1:]: v for p, v in shapes.items() if p[0] == key}
            if saved and not _fits(saved, wanted):
                raise ConfigMismatchError(_mismatch_message(root / str(step), Path(workdir), config,
                                                            {(key, *p): v for p, v in saved.items()},
                                                            {(key, *p): v for p, v in wanted.items()}))
        return


def _set_aside(manager: Checkpoints, steps) -> None:
    """Move damaged step directories to checkpoints_unreadable/ (kept for inspection, never deleted),
    so that the resumed run can save those steps again."""
    root = Path(manager.directory)
    aside = root.parent / "checkpoints_unreadable"
    if jax.process_index() == 0:
        aside.mkdir(exist_ok=True)
        for step in steps:
            target = aside / f"{step}-{int(time.time())}"
            (root / str(step)).rename(target)
            print(f"moved unreadable checkpoint {root / str(step)} to {target}", flush=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("checkpoint_set_aside")
    manager.reload()


# ============================================================================ config.json, imports
def write_config(workdir: str | Path, config: ml_collections.ConfigDict) -> None:
    if jax.process_index() == 0:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        tmp = Path(workdir) / "config.json.tmp"
        tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
        os.replace(tmp, Path(workdir) / "config.json")


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a workdir written by trainers.main or "
                                "trainers.convert import?")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it or pass --config") from None


def log_config_changes(workdir: str | Path, config) -> None:
    """Print the fields that differ from the workdir's config.json (a resumed run with new settings)."""
    try:
        saved = read_config(workdir)
    except (FileNotFoundError, ValueError):
        return
    diffs = config_differences(saved, config)
    if diffs and jax.process_index() == 0:
        print("config changed since the workdir's config.json: " + "; ".join(
            f"config.{k}: {a!r} -> {b!r}" for k, a, b in diffs), flush=True)


def write_imported(workdir: str | Path, config, state, *, source: str) -> Path:
    """Save a step-0 train state built from converted params (``train.state_from_params``: EMA =
    params, fresh optimizer state), so that trainers.sample samples from it and trainers.main
    fine-tunes from it. The caller has checked that the workdir may be written (convert import
    refuses a non-empty one unless --replace)."""
    write_config(workdir, config)
    manager = make_manager(workdir, async_save=False)
    save(manager, 0, state)
    manager.wait_until_finished()
    write_manifest(checkpoint_dir(workdir) / "0", data_iter=False, imported=True)
    (Path(workdir) / "IMPORTED_FROM").write_text(source + "\n")
    return checkpoint_dir(workdir) / "0"
