"""Cache a dataset's tokenizer latents once, then train generators on them.

    python -m trainers.cache_latents --config=configs/kl_vae_f16.py --weights=kl16.ckpt \
        --weights_kind=kl16 --out=DIR [--npz=images.npz] [--batch_size=64]

Encodes every image of ``config.data`` (or of a uint8 NHWC ``.npz`` with
``images`` and optional ``labels``) with the frozen KL-VAE and stores, as MAR's
``main_cache.py`` does, the posterior *moments* of the image and of its
horizontal flip, so a generator can draw a fresh posterior sample and a random
flip every step. The batch is sharded over all devices; each process writes
its own ArrayRecord file.

Layout of ``DIR``: ``latents-PPPPP-of-NNNNN.array_record`` (one per process;
record = int32 little-endian label, then float32 moments (2, h, w, 2*C): [image,
flipped image]) and ``metadata.json`` (shapes, count, tokenizer config).

Reading: ``config.data.latents = DIR`` makes trainers.data call
:func:`latent_dataset`, which yields ``{"latent": float32 (B, h, w, C) =
posterior sample * config.tokenizer.scale, "label": int32 (B,)}``.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

_METADATA = "metadata.json"
_FORMAT_VERSION = 1
_LABEL = struct.Struct("<i")


# ----------------------------------------------------------------------------- encoding


def encode_with_flip(method, model, images: jax.Array) -> jax.Array:
    """images (B, H, W, C) -> moments (B, 2, h, w, 2*C') of [image, horizontally flipped image]."""
    both = jnp.concatenate([images, images[:, :, ::-1]], axis=0)
    moments = model.encode(both)
    b = images.shape[0]
    return jnp.stack([moments[:b], moments[b:]], axis=1)


def _image_batches(config, npz: str, batch_size: int, process_index: int, process_count: int):
    """(count, iterator of (uint8-or-float images (b, H, W, C) in [-1, 1], labels (b,))) for this process."""
    if npz:
        with np.load(npz) as f:
            if "images" not in f:
                raise ValueError(f"{npz}: expected an array 'images' (uint8, N x H x W x C) and optional 'labels'")
            images = f["images"]
            labels = f["labels"] if "labels" in f else np.zeros(len(images), np.int32)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"{npz}: 'images' must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
        n = len(images)
        get = lambda i: (images[i].astype(np.float32) / 127.5 - 1.0, np.int32(labels[i]))  # noqa: E731
    else:
        from trainers import data

        source, _ = data._source(config)
        prep = data.Preprocess(config.data.image_size, config.data.channels, False, data.min_image_side(config))
        n = len(source)

        def get(i):
            out = prep(source[i], np.random.default_rng(0))
            if out is None:
                return None
            return out["image"], out["label"]

    indices = np.array_split(np.arange(n), process_count)[process_index]

    def batches():
        xs, ys = [], []
        for i in indices:
            item = get(int(i))
            if item is None:  # unreadable image: skipped, as the pixel pipeline does
                continue
            xs.append(item[0])
            ys.append(item[1])
            if len(xs) == batch_size:
                yield np.stack(xs), np.asarray(ys, np.int32)
                xs, ys = [], []
        if xs:
            yield np.stack(xs), np.asarray(ys, np.int32)

    return len(indices), batches()


def write_cache(config, params, out: str, *, npz: str = "", batch_size: int = 64, mesh=None,
                progress: bool = True) -> dict[str, Any]:
    """Encode ``config.data`` (or ``npz``) with the KL-VAE of ``config.model`` and ``params``; returns the metadata."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    from tokenizers import kl_vae
    from trainers import sharding

    method = kl_vae.KLVAEMethod(config)
    model_def = method.model_def
    mesh = mesh or sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    n_dev = mesh.size
    if batch_size % n_dev:
        raise ValueError(f"--batch_size={batch_size} must be divisible by the {n_dev} devices")
    params = jax.device_put(params, sharding.replicated(mesh))
    batch_sh = sharding.batch_sharding(mesh, 4)

    @jax.jit(out_shardings=sharding.batch_sharding(mesh, 5))
    def encode(params, images):
        return encode_with_flip(method, model_def.merge(params), images)

    Path(out).mkdir(parents=True, exist_ok=True)
    pi, pc = jax.process_index(), jax.process_count()
    local_bs = batch_size // pc
    count, batches = _image_batches(config, npz, local_bs, pi, pc)
    name = f"latents-{pi:05d}-of-{pc:05d}.array_record"
    writer = ArrayRecordWriter(os.path.join(out, name), "group_size:1")
    written, shape = 0, None
    bar = tqdm(total=count, desc=f"encoding -> {out}", disable=not progress or pi != 0, unit="img")
    try:
        for images, labels in batches:
            method.check_images(images)
            b = len(images)
            if b < local_bs:  # pad the last batch to a shape the mesh divides
                images = np.concatenate([images, np.repeat(images[-1:], local_bs - b, axis=0)])
            moments = encode(params, jax.make_array_from_process_local_data(batch_sh, images))
            local = _local_rows(moments)[:b]
            shape = local.shape[1:]
            for m, y in zip(local.astype(np.float32), labels):
                writer.write(_LABEL.pack(int(y)) + m.tobytes())
            written += b
            bar.update(b)
    finally:
        writer.close()
        bar.close()
    if shape is None:
        raise ValueError("no images to encode")
    meta = {
        "format_version": _FORMAT_VERSION,
        "files": [f"latents-{p:05d}-of-{pc:05d}.array_record" for p in range(pc)],
        "moments_shape": list(shape),  # (2, h, w, 2C): [image, flip]
        "latent_shape": [shape[1], shape[2], shape[3] // 2],
        "count": written if pc == 1 else None,  # per-process counts live in the files themselves
        "scale_factor": method.scale_factor,
        "image_size": int(np.shape(images)[1]),
        "tokenizer": config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model),
    }
    if pi == 0:
        with open(os.path.join(out, _METADATA), "w") as f:
            json.dump(meta, f, indent=1, default=list)
    return meta


def _local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order, each once."""
    rows = {}
    for shard in array.addressable_shards:
        rows[shard.index[0].start or 0] = np.asarray(shard.data)
    return np.concatenate([rows[k] for k in sorted(rows)], axis=0)


# ----------------------------------------------------------------------------- reading


def read_metadata(path: str) -> dict[str, Any]:
    meta_path = os.path.join(path, _METADATA)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"config.data.latents={path!r}: no {_METADATA} there; build the cache with "
                                "`python -m trainers.cache_latents --out=DIR ...`")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"{meta_path}: cache format {meta.get('format_version')} != {_FORMAT_VERSION}; rebuild it")
    return meta


def latent_shape(config) -> tuple[int, int, int]:
    """(h, w, C) of one cached latent, as the generator sees it."""
    return tuple(read_metadata(config.data.latents)["latent_shape"])


class LatentSource(grain.sources.RandomAccessDataSource):
    """Records of a latent cache: {"moments": float32 (2, h, w, 2C), "label": int32}."""

    def __init__(self, path: str):
        meta = read_metadata(path)
        self._path = path
        self._shape = tuple(meta["moments_shape"])
        self._source = grain.sources.ArrayRecordDataSource([os.path.join(path, f) for f in meta["files"]])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        raw = self._source[int(index)]
        moments = np.frombuffer(raw, np.float32, offset=_LABEL.size).reshape(self._shape)
        return {"moments": moments, "label": np.int32(_LABEL.unpack_from(raw)[0])}

    def __repr__(self) -> str:
        return f"LatentSource({self._path!r}, {len(self)} records)"


class SampleLatent(grain.transforms.RandomMap):
    """Record -> {"latent": posterior sample * scale (h, w, C), "label"}; flip and noise drawn per step."""

    def __init__(self, scale: float, random_flip: bool = True):
        self.scale = float(scale)
        self.random_flip = random_flip

    def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        view = int(rng.integers(2)) if self.random_flip else 0
        mean, logvar = np.split(record["moments"][view], 2, axis=-1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))  # LDM DiagonalGaussianDistribution
        sample = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
        return {"latent": (sample * self.scale).astype(np.float32), "label": record["label"]}


def latent_dataset(config, *, seed: int, global_batch_size: int,
                   shard_options: grain.sharding.ShardOptions) -> grain.DatasetIterator:
    """Endless iterator of this shard's {"latent": (B_local, h, w, C), "label": (B_local,)} batches."""
    ds = grain.MapDataset.source(LatentSource(config.data.latents))
    per_shard = len(ds) // shard_options.shard_count
    if per_shard < 1:
        raise ValueError(f"config.data.latents={config.data.latents!r} has {len(ds)} records, fewer than "
                         f"the {shard_options.shard_count} processes reading it")
    ds = ds[shard_options.shard_index * per_shard:(shard_options.shard_index + 1) * per_shard]
    shuffle_seed, sample_seed = np.random.SeedSequence([seed, shard_options.shard_index, 7]).generate_state(2)
    ds = ds.shuffle(seed=int(shuffle_seed)).repeat()
    ds = ds.random_map(SampleLatent(config.tokenizer.scale, config.data.random_flip), seed=int(sample_seed))
    ds = ds.batch(global_batch_size // shard_options.shard_count, drop_remainder=True)
    return iter(ds.to_iter_dataset())


# ----------------------------------------------------------------------------- command line


def _load_params(config, weights: str, kind: str):
    from tokenizers import kl_vae

    if kind not in kl_vae.IMPORTERS:
        raise ValueError(f"--weights_kind={kind!r}: one of {sorted(kl_vae.IMPORTERS)}")
    return kl_vae.IMPORTERS[kind](kl_vae.load_state_dict(weights), config)


def main(argv):
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("out", None, "directory to write the latent cache into", required=True)
    flags.DEFINE_string("weights", None, "tokenizer checkpoint (kl16.ckpt, SD-VAE .ckpt/.safetensors)", required=True)
    flags.DEFINE_string("weights_kind", "kl16", "checkpoint layout: kl16 | sd_vae")
    flags.DEFINE_string("npz", "", "encode a uint8 NHWC .npz ('images', optional 'labels') instead of config.data")
    flags.DEFINE_integer("batch_size", 64, "global encoding batch size")
    config_flags.DEFINE_config_file("config", None, "tokenizer config (configs/kl_vae_f16.py, configs/sd_vae.py)")
    flags.FLAGS(argv)
    config = flags.FLAGS.config
    if config is None:
        raise SystemExit("--config=configs/<tokenizer>.py is required")
    params = _load_params(config, flags.FLAGS.weights, flags.FLAGS.weights_kind)
    meta = write_cache(config, params, flags.FLAGS.out, npz=flags.FLAGS.npz, batch_size=flags.FLAGS.batch_size)
    print(f"wrote {flags.FLAGS.out}: latents {meta['latent_shape']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
