"""orbax checkpoints of the train state and the grain iterator, with fallback on a broken newest one.

Layout of a workdir::

    DIR/config.json               the run's config (written at start; read by trainers.sample)
    DIR/checkpoints/<step>/state  the train state (params, ema_params, opt_state, step, rng, rest)
    DIR/checkpoints/<step>/data_iter  the grain iterator state (per process)

Saves are asynchronous and atomic (orbax finalises a step directory only when
every item is written), so a run killed mid-save leaves the previous step as
the newest complete checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

STATE = "state"
DATA_ITER = "data_iter"


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir).absolute() / "checkpoints"


def make_manager(workdir: str | Path, *, keep_last: int = 3, keep_every: int = 0,
                 async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep_last or None, keep_period=keep_every or None,
        enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=(STATE, DATA_ITER))


def save(manager: ocp.CheckpointManager, step: int, state, data_iter=None) -> None:
    import grain

    items = {STATE: ocp.args.StandardSave(state)}
    if data_iter is not None:
        items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract_state, data_iter=None):
    """Restore the newest readable checkpoint: (step, state) or (None, None) when there is none.

    ``abstract_state`` holds ShapeDtypeStructs with shardings, so arrays land
    sharded. If the newest checkpoint cannot be read, the previous one is tried,
    and so on, and each fallback is logged.
    """
    import grain

    steps = sorted(manager.all_steps(), reverse=True)
    unreadable = []
    found = (None, None)
    for step in steps:
        try:
            items = {STATE: ocp.args.StandardRestore(abstract_state)}
            if data_iter is not None and _has_item(manager, step, DATA_ITER):
                items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
            restored = manager.restore(step, args=ocp.args.Composite(**items))
            found = (step, restored[STATE])
            break
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to an older one
            logging.warning("checkpoint at step %d is unreadable (%s: %s); falling back to the previous one",
                            step, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            print(f"WARNING: checkpoint at step {step} is unreadable ({type(e).__name__}); "
                  "falling back to the previous one", flush=True)
            unreadable.append(step)
    if unreadable:
        _set_aside(manager, unreadable)
    return found


def _set_aside(manager: ocp.CheckpointManager, steps) -> None:
    """Move unreadable step directories to checkpoints_unreadable/ (kept for inspection, never deleted),
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


def _has_item(manager: ocp.CheckpointManager, step: int, item: str) -> bool:
    return (Path(manager.directory) / str(step) / item).exists()


def write_config(workdir: str | Path, config: ml_collections.ConfigDict) -> None:
    if jax.process_index() == 0:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        (Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a workdir written by trainers.main or "
                                "trainers.convert import?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def write_imported(workdir: str | Path, config, params, *, source: str) -> Path:
    """A full train state at step 0 from converted params (EMA = params, fresh optimizer state),
    so that trainers.sample samples from it and trainers.main fine-tunes from it."""
    from trainers import train

    write_config(workdir, config)
    state = train.state_from_params(config, params)
    manager = make_manager(workdir, async_save=False)
    save(manager, 0, state)
    manager.wait_until_finished()
    (Path(workdir) / "IMPORTED_FROM").write_text(source + "\n")
    return checkpoint_dir(workdir) / "0"
