"""Test driver: runs trainers.train with injected faults (a real SIGKILL after a checkpoint, a NaN batch).

    python tests/run_training.py --config=configs/dit_s.py:demo --workdir=DIR [--config.x=y]
        [--kill_after_checkpoint=STEP] [--nan_at_step=STEP] [--report=FILE.npz]
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from trainers import checkpoint, config_validation, train  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config")
flags.DEFINE_string("workdir", None, "workdir")
flags.DEFINE_integer("kill_after_checkpoint", 0, "SIGKILL this process once the checkpoint of this step is on disk")
flags.DEFINE_integer("nan_at_step", 0, "feed a batch of NaNs at this step")
flags.DEFINE_string("report", "", "write final params / ema params to this .npz")
flags.DEFINE_string("coordinator", None, "jax.distributed coordinator")
flags.DEFINE_integer("num_processes", None, "processes")
flags.DEFINE_integer("process_id", None, "process id")


def main(argv):
    if FLAGS.coordinator:
        jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    config = FLAGS.config
    config_validation.validate(config)
    if FLAGS.kill_after_checkpoint:
        original_save = checkpoint.save

        def save_then_die(manager, step, state, data_iter=None):
            original_save(manager, step, state, data_iter)
            if step == FLAGS.kill_after_checkpoint:
                manager.wait_until_finished()
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.save = save_then_die
    if FLAGS.nan_at_step:
        original_to_global = train.to_global
        calls = {"n": 0}

        def poisoned(batch, mesh):
            calls["n"] += 1
            if calls["n"] == FLAGS.nan_at_step:  # counted from this process's start (fresh runs)
                batch = {k: (np.full_like(v, np.nan) if v.dtype.kind == "f" else v) for k, v in batch.items()}
            return original_to_global(batch, mesh)

        train.to_global = poisoned
    try:
        state = train.train_and_evaluate(config, FLAGS.workdir)
    except train.NonFiniteLossError as e:
        print(f"NonFiniteLossError: {e}", flush=True)
        return 3
    if FLAGS.report and jax.process_index() == 0:
        flat = {}
        for prefix in ("params", "ema_params"):
            for path, leaf in jax.tree_util.tree_leaves_with_path(state[prefix]):
                flat[prefix + jax.tree_util.keystr(path)] = np.asarray(jax.device_get(leaf))
        np.savez(FLAGS.report, **flat)
    return 0


if __name__ == "__main__":
    app.run(main)
