"""Sampling: a trained (or imported) checkpoint -> images, as an ADM-style .npz plus a PNG grid.

    python -m trainers.sample --workdir=DIR --num_samples=N --out=FILE.npz [--seed=0] [--latents]
        [--config=configs/x.py:arg] [--config.sample.cfg_scale=...] [--set tokenizer.weights=kl16.ckpt]

Without --config the run's own DIR/config.json is used; --config.x=y (or --set x=y on the workdir's
config) overrides either. Every generator writes images: a latent or discrete generator's samples
are decoded by its paired tokenizer (``config.tokenizer``, trainers/decode.py). The .npz holds
``arr_0`` (N, H, W, C) uint8 and ``arr_1`` (N,) int32 labels (classes in turn), as ADM's
evaluator reads; ``--latents`` adds ``latents`` (the generator's raw output, before decoding).
FILE.png shows the first 100 as a grid. Sampling is sharded over all devices and deterministic
for a given seed and device count.

This module is also the loop's sampler (trainers/train.py imports it; it never imports the loop):
:class:`Sampler`, :func:`generate`, and the image helpers (uint8 conversion, grids, PNG).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from trainers import decode, sharding
from trainers.method import ModelDef, get_method


# ============================================================================ image helpers
def fetch_global(x) -> np.ndarray:
    """A global (possibly multi-host) array as numpy on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def images_to_uint8(x) -> np.ndarray:
    """[-1, 1] floats (B, H, W, C) -> uint8."""
    return np.asarray(np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255), np.uint8)


def make_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """(B, H, W, C) uint8 -> one (rows*H, cols*W, 3) uint8 image with 2-px gaps."""
    b, h, w, c = images.shape
    if c == 1:
        images = np.repeat(images, 3, axis=-1)
    cols = columns or int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / cols))
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, np.uint8)
    for i in range(b):
        r, q = divmod(i, cols)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + q * (w + 2): 2 + q * (w + 2) + w] = images[i]
    return grid


def save_png(path: str | Path, image: np.ndarray) -> None:
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def grid_labels(num: int, num_classes: int) -> np.ndarray:
    return (np.arange(num) % num_classes).astype(np.int32)


def sample_batch_size(num: int, mesh) -> int:
    """The smallest multiple of the data-parallel size that holds ``num``."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    return int(np.ceil(num / dp) * dp)


# ============================================================================ sampling
class Sampler:
    """Jitted class-conditional sampling from given params, sharded over the batch.

    Returns what the method's ``sample`` returns: images for pixel configs, latents or codes
    (any rank, batch first) for latent and discrete generators; :func:`generate` decodes those.
    """

    def __init__(self, method, model_def: ModelDef, mesh, **sampler_kwargs):
        self.mesh = mesh

        def sample(params, rest, rng, labels):
            with sharding.use_mesh(mesh):
                x = method.sample(model_def.merge(params, rest), rng, labels, **sampler_kwargs)
                return jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh, x.ndim))

        self._sample = jax.jit(sample)

    def __call__(self, params, rest, rng, labels) -> jax.Array:
        labels = jax.device_put(jnp.asarray(labels, jnp.int32), sharding.batch_sharding(self.mesh, 1))
        return self._sample(params, rest, rng, labels)


def sample_images(sampler: Sampler, decoder: decode.Decoder | None, params, rest, rng, labels):
    """(images (B, H, W, C) in [-1, 1], the generator's raw output): one batch, decoded when paired."""
    x = sampler(params, rest, rng, labels)
    return (x if decoder is None else decoder(x, labels)), x


def generate(config, sampler: Sampler, params, rest, mesh, num_samples: int, *, seed: int,
             decoder: decode.Decoder | None = None, keep_latents: bool = False, progress: bool = False):
    """(uint8 images (N, H, W, C), labels (N,), raw outputs (N, ...) or None), batch by batch.

    Labels are the classes in turn; ``decoder`` (the paired tokenizer, trainers/decode.py) turns
    a latent generator's output into pixels; ``keep_latents`` also returns that raw output.
    """
    from tqdm import tqdm

    batch = sample_batch_size(min(num_samples, int(config.get("sample_batch_size", 64))), mesh)
    labels = grid_labels(num_samples, config.data.num_classes)
    base = jax.random.PRNGKey(seed)
    images, raw = [], []
    num_batches = -(-num_samples // batch)
    for i in tqdm(range(num_batches), desc="sampling", disable=not progress or jax.process_index() != 0):
        chunk = labels[i * batch:(i + 1) * batch]
        padded = np.concatenate([chunk, np.zeros(batch - len(chunk), np.int32)])
        x, latents = sample_images(sampler, decoder, params, rest, jax.random.fold_in(base, i), padded)
        images.append(images_to_uint8(fetch_global(x))[: len(chunk)])
        if keep_latents:
            raw.append(fetch_global(latents)[: len(chunk)])
    images = np.concatenate(images)[:num_samples]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"samples have shape {images.shape[1:]}, not images: a latent generator needs "
                         "config.tokenizer (trainers/decode.py) to decode them")
    return images, labels, (np.concatenate(raw)[:num_samples] if keep_latents else None)


def load_params(config, workdir: str, mesh):
    """(method, model_def, step, params, rest) of ``workdir``'s newest checkpoint: the EMA params
    (config.sample.use_ema) or the raw ones, nothing else of the train state."""
    method = get_method(config)
    model_def = ModelDef(method)
    step, params, rest = decode.restore_params(workdir, model_def, mesh, use_ema=bool(config.sample.use_ema))
    return method, model_def, step, params, rest


def write_samples(out: str | Path, images: np.ndarray, labels: np.ndarray, latents: np.ndarray | None = None,
                  *, grid_size: int = 100) -> tuple[Path, Path]:
    """The ADM-style .npz (arr_0 uint8 NHWC, arr_1 labels[, latents]) and its PNG grid; their paths.
    ``.npz`` is appended to ``out`` when missing (as np.savez does), and the path returned is the real one."""
    out = Path(out)
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"arr_0": images, "arr_1": labels}
    if latents is not None:
        arrays["latents"] = latents
    np.savez(out, **arrays)
    grid_path = out.with_suffix(".png")
    save_png(grid_path, make_grid(images[: min(len(images), grid_size)]))
    return out, grid_path


def main(argv):
    del argv
    from absl import flags

    from trainers import checkpoint, config_validation

    FLAGS = flags.FLAGS
    if FLAGS.num_samples < 1:
        raise config_validation.ConfigError(f"--num_samples={FLAGS.num_samples}: give at least 1 sample")
    config = FLAGS.config if FLAGS.config is not None else checkpoint.read_config(FLAGS.workdir)
    for override in FLAGS.set or []:
        key, _, value = override.partition("=")
        config_validation.set_override(config, key, value)
    config_validation.validate(config, check_data=False)
    try:
        decode.validate(config)  # the tokenizer is needed to write images: fail before compiling
    except ValueError as e:
        raise config_validation.ConfigError(str(e)) from None
    checkpoint.check_params_fit(FLAGS.workdir, config)  # another model's shapes: name the fields, read nothing
    mesh = sharding.make_mesh(config.mesh)
    method, model_def, step, params, rest = load_params(config, FLAGS.workdir, mesh)
    decoder = decode.build_decoder(config, mesh)
    paired = f", decoded by tokenizer {config.tokenizer.kind}" if decoder is not None else ""
    print(f"sampling {FLAGS.num_samples} images from step {step} of {FLAGS.workdir}{paired}", flush=True)
    sampler = Sampler(method, model_def, mesh)
    images, labels, latents = generate(config, sampler, params, rest, mesh, FLAGS.num_samples, seed=FLAGS.seed,
                                       decoder=decoder, keep_latents=FLAGS.latents, progress=True)
    if jax.process_index() == 0:
        out, grid_path = write_samples(FLAGS.out, images, labels, latents)
        extra = f" and latents {latents.shape}" if latents is not None else ""
        print(f"wrote {out} ({images.shape}, uint8{extra})", flush=True)
        print(f"wrote {grid_path}", flush=True)


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "workdir of a training run or an imported checkpoint", required=True)
    flags.DEFINE_integer("num_samples", 64, "number of samples")
    flags.DEFINE_string("out", None, "output .npz path", required=True)
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.DEFINE_bool("latents", False, "also store the generator's raw output (latents/codes) as 'latents'")
    flags.DEFINE_multi_string("set", None, "override a field of the workdir's config: --set sample.cfg_scale=4")
    config_flags.DEFINE_config_file("config", None, "config file (default: the workdir's config.json)")
    from trainers import config_validation

    config_validation.run_cli(main)
