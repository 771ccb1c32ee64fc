"""Cache a dataset's tokenizer latents once, then train generators on them.

    python -m trainers.cache_latents --tokenizer_workdir=VAE_DIR --out=DIR        # a zoo tokenizer
    python -m trainers.cache_latents --config=configs/kl_vae_f16.py --weights=kl16.ckpt \
        --weights_kind=kl16 --out=DIR [--npz=images.npz] [--batch_size=64]      # a published file

Encodes every image of the tokenizer config's ``data`` (or of a uint8 NHWC ``.npz`` with
``images`` and optional ``labels``) with the frozen tokenizer and stores, for the image and its
horizontal flip, what the tokenizer's ``encode`` returns (trainers/decode.py contract): for a
KL-VAE the posterior *moments*, as MAR's ``main_cache.py`` does, so a generator draws a fresh
posterior sample and a random flip every step. The tokenizer is a zoo workdir
(``--tokenizer_workdir``: any method with ``kind == "tokenizer"``, trained with trainers.main or
imported with trainers.convert; its EMA or raw params as its ``config.sample.use_ema`` says unless
``--params=ema|raw``, and its config's data unless ``--set data.x=y`` or ``--npz``) or a published checkpoint (``--weights``, ``--weights_kind`` kl16 | sd_vae, and
``--config`` describing its network). The batch is sharded over all devices; each process
writes its own ArrayRecord file. Layout and reading: trainers/latents.py. A tokenizer whose
encoding needs more than the image writes the cache itself through its method's
``write_latent_cache(params, rest, out, npz=, batch_size=, mesh=, progress=)`` hook (TexTok: each
image with its cached caption embedding, tokenizers/textok.py), with the same layout and metadata.

A generator trains on the cache with ``config.data.latents = DIR`` and names the same tokenizer
in ``config.tokenizer`` (kind ``workdir`` and ``workdir = VAE_DIR``, or the published kind and
``weights``), whose ``scale`` multiplies the latents it reads and divides the ones it decodes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trainers import latents as latents_lib

# ----------------------------------------------------------------------------- encoding


def encode_with_flip(method, model, images: jax.Array) -> jax.Array:
    """images (B, H, W, C) -> (B, 2, ...) the tokenizer's encoding of [image, horizontally flipped image]."""
    both = jnp.concatenate([images, images[:, :, ::-1]], axis=0)
    encoded = method.encode(model, both)
    b = images.shape[0]
    return jnp.stack([encoded[:b], encoded[b:]], axis=1)


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

        source = data.image_source(config)
        n = len(source)

        def get(i):
            out = source[i]
            return None if out is None else (out["image"], out["label"])

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
                progress: bool = True, rest=None) -> dict[str, Any]:
    """Encode ``config.data`` (or ``npz``) with the tokenizer of ``config.model`` (a method with
    ``kind == "tokenizer"``) and its ``params`` (and non-trainable ``rest``); returns the metadata."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    from trainers import sharding
    from trainers.method import ModelDef, get_method

    method = get_method(config)
    if method.kind != "tokenizer" or not hasattr(method, "encode"):
        raise ValueError(f"config.model.name={config.model.name!r} is a {method.kind}, not a tokenizer with encode()")
    if hasattr(method, "write_latent_cache"):  # a tokenizer that encodes more than the image (TexTok: captions)
        return method.write_latent_cache(params, rest, out, npz=npz, batch_size=batch_size, mesh=mesh,
                                         progress=progress)
    latent_type = getattr(method, "latent_type", "latents")
    if latent_type not in latents_lib.LATENT_TYPES:
        raise ValueError(f"{type(method).__name__}.latent_type={latent_type!r}: one of {latents_lib.LATENT_TYPES}")
    model_def = ModelDef(method)
    mesh = mesh or sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    n_dev = mesh.size
    if batch_size % n_dev:
        raise ValueError(f"--batch_size={batch_size} must be divisible by the {n_dev} devices")
    params = jax.device_put(params, sharding.replicated(mesh))
    if rest is None:
        abstract_rest = jax.eval_shape(model_def.init, jax.random.PRNGKey(0))[1]
        rest = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract_rest)
    rest = jax.device_put(rest, sharding.replicated(mesh))
    batch_sh = sharding.batch_sharding(mesh, 4)

    @jax.jit
    def encode(params, rest, images):
        encoded = encode_with_flip(method, model_def.merge(params, rest), images)
        return jax.lax.with_sharding_constraint(encoded, sharding.batch_sharding(mesh, encoded.ndim))

    Path(out).mkdir(parents=True, exist_ok=True)
    pi, pc = jax.process_index(), jax.process_count()
    local_bs = batch_size // pc
    count, batches = _image_batches(config, npz, local_bs, pi, pc)
    name = f"latents-{pi:05d}-of-{pc:05d}.array_record"
    writer = ArrayRecordWriter(os.path.join(out, name), "group_size:1")
    dtype = np.int32 if latent_type == "codes" else np.float32
    written, shape, image_size = 0, None, None
    sums = np.zeros(3)  # over view 0: sum z, sum z^2, count (z = a posterior sample's entries, in expectation)
    bar = tqdm(total=count, desc=f"encoding -> {out}", disable=not progress or pi != 0, unit="img")
    try:
        for images, labels in batches:
            if hasattr(method, "check_images"):
                method.check_images(images)
            image_size = int(np.shape(images)[1])
            b = len(images)
            if b < local_bs:  # pad the last batch to a shape the mesh divides
                images = np.concatenate([images, np.repeat(images[-1:], local_bs - b, axis=0)])
            encoded = encode(params, rest, jax.make_array_from_process_local_data(batch_sh, images))
            local = _local_rows(encoded)[:b]
            shape = local.shape[1:]
            sums += _moments_of(local[:, 0], latent_type)
            for m, y in zip(local.astype(dtype), labels):
                writer.write(latents_lib.LABEL.pack(int(y)) + m.tobytes())
            written += b
            bar.update(b)
    finally:
        writer.close()
        bar.close()
    if shape is None:
        raise ValueError("no images to encode")
    view = list(shape[1:])
    meta = {
        "format_version": latents_lib.FORMAT_VERSION,
        "files": [f"latents-{p:05d}-of-{pc:05d}.array_record" for p in range(pc)],
        "latent_type": latent_type,
        "record_shape": list(shape),  # (2, ...): [image, flip]
        "latent_shape": view[:-1] + [view[-1] // 2] if latent_type == "moments" else view,
        "count": written if pc == 1 else None,  # per-process counts live in the files themselves
        "scale_factor": float(config.model.get("scale_factor", 1.0)),
        # std of the unscaled latents (posterior samples for moments), this process's images: 1 / latent_std
        # is LDM's scale_by_std choice of config.tokenizer.scale
        "latent_std": float(np.sqrt(max(sums[1] / sums[2] - (sums[0] / sums[2]) ** 2, 0.0))) if sums[2] else None,
        "image_size": image_size,
        "tokenizer": config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model),
    }
    if pi == 0:
        with open(os.path.join(out, latents_lib.METADATA), "w") as f:
            json.dump(meta, f, indent=1, default=list)
    return meta


def _moments_of(views: np.ndarray, latent_type: str) -> np.ndarray:
    """(sum, sum of squares, count) of the latents in ``views`` (B, ...); for Gaussian moments the expected
    sums over posterior samples (E[z^2] = mean^2 + var)."""
    if latent_type == "codes":
        return np.zeros(3)
    v = np.asarray(views, np.float64)
    if latent_type == "moments":
        mean, logvar = np.split(v, 2, axis=-1)
        return np.array([mean.sum(), (mean ** 2 + np.exp(np.clip(logvar, -30.0, 20.0))).sum(), mean.size])
    return np.array([v.sum(), (v ** 2).sum(), v.size])


def _local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order, each once."""
    rows = {}
    for shard in array.addressable_shards:
        rows[shard.index[0].start or 0] = np.asarray(shard.data)
    return np.concatenate([rows[k] for k in sorted(rows)], axis=0)


# ----------------------------------------------------------------------------- command line


def _load_published(config, weights: str, kind: str):
    from tokenizers import kl_vae

    if kind not in kl_vae.IMPORTERS:
        raise ValueError(f"--weights_kind={kind!r}: one of {sorted(kl_vae.IMPORTERS)}")
    return kl_vae.IMPORTERS[kind](kl_vae.load_state_dict(weights), config)


def load_workdir_tokenizer(workdir: str, mesh, *, use_ema: bool | None = None):
    """(config, params, rest) of a zoo tokenizer's workdir (newest checkpoint): its EMA or raw params
    (``use_ema``; None = the workdir config's ``sample.use_ema``, what its reconstruction grids use)."""
    from trainers import checkpoint, decode
    from trainers.method import ModelDef, get_method

    config = checkpoint.read_config(workdir)
    method = get_method(config)
    if method.kind != "tokenizer":
        raise ValueError(f"--tokenizer_workdir={workdir!r} holds a {config.model.name!r} run (a {method.kind}), "
                         "not a tokenizer")
    if use_ema is None:
        use_ema = bool(config.sample.get("use_ema", True))
    _, params, rest = decode.restore_params(workdir, ModelDef(method), mesh, use_ema=use_ema)
    return config, params, rest


def main(argv):
    from absl import flags
    from ml_collections import config_flags

    from trainers import config_validation, sharding

    flags.DEFINE_string("out", None, "directory to write the latent cache into", required=True)
    flags.DEFINE_string("tokenizer_workdir", "", "a zoo tokenizer's workdir (trainers.main / trainers.convert import)")
    flags.DEFINE_string("weights", "", "published tokenizer checkpoint (kl16.ckpt, SD-VAE .ckpt/.safetensors)")
    flags.DEFINE_string("weights_kind", "kl16", "published checkpoint layout: kl16 | sd_vae")
    flags.DEFINE_string("npz", "", "encode a uint8 NHWC .npz ('images', optional 'labels') instead of config.data")
    flags.DEFINE_integer("batch_size", 64, "global encoding batch size")
    flags.DEFINE_enum("params", "auto", ["auto", "ema", "raw"],
                      "--tokenizer_workdir params: auto = as its config.sample.use_ema says (what its grids show)")
    flags.DEFINE_multi_string("set", None, "override a field of the tokenizer config: --set data.name=folder")
    config_flags.DEFINE_config_file("config", None, "tokenizer config (configs/kl_vae_f16.py, configs/sd_vae.py)")
    flags.FLAGS(argv)
    F = flags.FLAGS
    if bool(F.tokenizer_workdir) == bool(F.weights):
        raise SystemExit("pass exactly one of --tokenizer_workdir (a zoo tokenizer) and --weights (a published file)")
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    if F.tokenizer_workdir:
        use_ema = {"ema": True, "raw": False}.get(F.params)
        config, params, rest = load_workdir_tokenizer(F.tokenizer_workdir, mesh, use_ema=use_ema)
    else:
        config = F.config
        if config is None:
            raise SystemExit("--weights needs --config=configs/<tokenizer>.py describing its network")
        params, rest = _load_published(config, F.weights, F.weights_kind), None
    for override in F.set or []:
        key, _, value = override.partition("=")
        config_validation.set_override(config, key, value)
    meta = write_cache(config, params, F.out, npz=F.npz, batch_size=F.batch_size, mesh=mesh, rest=rest)
    print(f"wrote {F.out}: {meta['latent_type']} -> latents {meta['latent_shape']}", flush=True)
    if meta["latent_std"]:
        print(f"latent std {meta['latent_std']:.4g}: a generator's config.tokenizer.scale = "
              f"{1.0 / meta['latent_std']:.4g} gives unit variance (LDM scale_by_std)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
