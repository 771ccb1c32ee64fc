"""Sample a trained (or imported) checkpoint: ADM-style .npz plus a PNG grid.

    python -m trainers.sample --workdir=DIR --num_samples=N --out=FILE.npz [--seed=0]
        [--config=configs/x.py:arg] [--config.sample.cfg_scale=...]

Without --config the run's own DIR/config.json is used; --config.x=y flags
override either. The .npz holds ``arr_0`` (N, H, W, C) uint8 and ``arr_1`` (N,)
int32 labels (classes in turn), as ADM's evaluator reads. Sampling is sharded
over all devices and deterministic for a given seed and device count.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from trainers import checkpoint, sharding, train
from trainers.method import ModelDef, get_method

FLAGS = flags.FLAGS


def generate(config, sampler: "train.Sampler", state, mesh, num_samples: int, *, seed: int,
             progress: bool = False):
    """(uint8 images (N, H, W, C), labels (N,)) from the EMA (or raw) params, batch by batch."""
    from tqdm import tqdm

    batch = train.sample_batch_size(min(num_samples, int(config.get("sample_batch_size", 64))), mesh)
    labels = train.grid_labels(num_samples, config.data.num_classes)
    params = state["ema_params"] if config.sample.use_ema else state["params"]
    base = jax.random.PRNGKey(seed)
    out = []
    num_batches = -(-num_samples // batch)
    for i in tqdm(range(num_batches), desc="sampling", disable=not progress or jax.process_index() != 0):
        chunk = labels[i * batch:(i + 1) * batch]
        padded = np.concatenate([chunk, np.zeros(batch - len(chunk), np.int32)])
        x = sampler(params, state["rest"], jax.random.fold_in(base, i), padded)
        out.append(train.images_to_uint8(train.fetch_global(x))[: len(chunk)])
    return np.concatenate(out)[:num_samples], labels


def load_state(config, workdir: str, mesh):
    """Restore the newest readable checkpoint of ``workdir`` onto ``mesh``."""
    method = get_method(config)
    model_def = ModelDef(method)
    plan = train.TrainPlan(method, model_def, config)
    abstract = jax.eval_shape(plan.init, jax.random.PRNGKey(0))
    shardings = plan.shardings(abstract, mesh)
    abstract_sharded = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract, shardings)
    manager = checkpoint.make_manager(workdir)
    step, state = checkpoint.restore_latest(manager, abstract_sharded)
    if state is None:
        raise FileNotFoundError(f"no readable checkpoint in {checkpoint.checkpoint_dir(workdir)}")
    return method, model_def, step, state


def main(argv):
    del argv
    from trainers import config_validation

    config = FLAGS.config if FLAGS.config is not None else checkpoint.read_config(FLAGS.workdir)
    for override in FLAGS.set or []:
        key, _, value = override.partition("=")
        config_validation.set_override(config, key, value)
    config_validation.validate(config, check_data=False)
    mesh = sharding.make_mesh(config.mesh)
    method, model_def, step, state = load_state(config, FLAGS.workdir, mesh)
    print(f"sampling {FLAGS.num_samples} images from step {step} of {FLAGS.workdir}", flush=True)
    sampler = train.Sampler(method, model_def, mesh)
    images, labels = generate(config, sampler, state, mesh, FLAGS.num_samples, seed=FLAGS.seed, progress=True)
    if jax.process_index() == 0:
        out = Path(FLAGS.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, arr_0=images, arr_1=labels)
        print(f"wrote {out} ({images.shape}, uint8)", flush=True)
        if images.shape[-1] in (1, 3):
            grid_path = out.with_suffix(".png")
            train.save_png(grid_path, train.make_grid(images[: min(len(images), 100)]))
            print(f"wrote {grid_path}", flush=True)
        else:
            print(f"no PNG grid: samples have {images.shape[-1]} channels (tokenizer latents)", flush=True)


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "workdir of a training run or an imported checkpoint", required=True)
    flags.DEFINE_integer("num_samples", 64, "number of samples")
    flags.DEFINE_string("out", None, "output .npz path", required=True)
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.DEFINE_multi_string("set", None, "override a field of the workdir's config: --set sample.cfg_scale=4")
    config_flags.DEFINE_config_file("config", None, "config file (default: the workdir's config.json)")
    sys.exit(app.run(main))
