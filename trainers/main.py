"""Train any method of the zoo.

    python -m trainers.main --config=configs/xar_b.py[:variant] --workdir=DIR [--config.a.b=value ...]

Restarting on the same workdir resumes from its newest complete checkpoint.
Multi-host (TPU pods, multi-node GPU): pass --distributed (jax.distributed
discovers the cluster on Cloud TPU and SLURM) or give --coordinator,
--num_processes and --process_id explicitly.

One trainer per workdir (DIR/LOCK). A user error (config, files, workdir, a
checkpoint of another model) is one line on stderr and exit status 2; a failed
checkpoint save exits 4 and a non-finite loss 3. --verbose shows tracebacks.
"""

from __future__ import annotations

import sys

import jax
from absl import flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/dit_s.py:demo", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and samples", required=True)
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
flags.DEFINE_string("coordinator", None, "coordinator address host:port for jax.distributed")
flags.DEFINE_integer("num_processes", None, "number of processes for jax.distributed")
flags.DEFINE_integer("process_id", None, "this process's index for jax.distributed")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    if FLAGS.distributed or FLAGS.coordinator:
        jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    from trainers import config_validation, train

    config = FLAGS.config
    config_validation.validate(config)
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    try:
        train.train_and_evaluate(config, FLAGS.workdir)
    except train.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    from trainers import config_validation

    config_validation.run_cli(main)
