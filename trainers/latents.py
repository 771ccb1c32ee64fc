"""Reading a latent cache (written by trainers/cache_latents.py): the generator's input pipeline.

``config.data.latents = DIR`` makes trainers.data call :func:`latent_dataset`, which yields
``{"latent": (B_local, ...), "label": int32 (B_local,)}`` batches; :func:`latent_shape` gives
the shape of one latent (for model init). Each record holds two views, the image and its
horizontal flip; one is drawn per record and step (``config.data.random_flip``), then by the
cache's ``latent_type`` (the tokenizer's, trainers/decode.py contract):

* ``"moments"``: Gaussian posterior moments (h, w, 2C) -> a fresh posterior sample (as MAR's
  cached training does), times ``config.tokenizer.scale``: float32 (h, w, C);
* ``"latents"``: stored latents times ``config.tokenizer.scale``: float32;
* ``"codes"``: int32 codes as stored (never scaled).

Layout of ``DIR``: ``latents-PPPPP-of-NNNNN.array_record`` (one per writing process; record =
int32 little-endian label, then the two views, float32 or int32, shape ``record_shape``) and
``metadata.json`` (format version, files, shapes, latent_type, count, tokenizer).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import grain
import numpy as np

METADATA = "metadata.json"
FORMAT_VERSION = 1
LABEL = struct.Struct("<i")
LATENT_TYPES = ("moments", "latents", "codes")


def read_metadata(path: str) -> dict[str, Any]:
    meta_path = os.path.join(path, METADATA)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"config.data.latents={path!r}: no {METADATA} there; build the cache with "
                                "`python -m trainers.cache_latents --out=DIR ...`")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: cache format {meta.get('format_version')} != {FORMAT_VERSION}; rebuild it")
    meta.setdefault("latent_type", "moments")
    return meta


def latent_shape(config) -> tuple[int, ...]:
    """Shape of one cached latent as the generator sees it, e.g. (h, w, C)."""
    return tuple(read_metadata(config.data.latents)["latent_shape"])


class LatentSource(grain.sources.RandomAccessDataSource):
    """Records of a latent cache: {"moments" | "latents" | "codes": (2, ...) [image, flip], "label": int32}."""

    def __init__(self, path: str):
        meta = read_metadata(path)
        self._path = path
        self.latent_type = meta["latent_type"]
        self._shape = tuple(meta.get("record_shape") or meta["moments_shape"])
        self._dtype = np.int32 if self.latent_type == "codes" else np.float32
        self._source = grain.sources.ArrayRecordDataSource([os.path.join(path, f) for f in meta["files"]])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        raw = self._source[int(index)]
        views = np.frombuffer(raw, self._dtype, offset=LABEL.size).reshape(self._shape)
        return {self.latent_type: views, "label": np.int32(LABEL.unpack_from(raw)[0])}

    def __repr__(self) -> str:
        return f"LatentSource({self._path!r}, {len(self)} records, {self.latent_type})"


class SampleLatent(grain.transforms.RandomMap):
    """Record -> {"latent": one view (a posterior sample for moments) * scale, "label"}; view and
    noise drawn per record and step."""

    def __init__(self, scale: float, random_flip: bool = True):
        self.scale = float(scale)
        self.random_flip = random_flip

    def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        view = int(rng.integers(2)) if self.random_flip else 0
        if "codes" in record:
            return {"latent": np.asarray(record["codes"][view], np.int32), "label": record["label"]}
        if "latents" in record:
            return {"latent": (record["latents"][view] * self.scale).astype(np.float32), "label": record["label"]}
        mean, logvar = np.split(record["moments"][view], 2, axis=-1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))  # LDM DiagonalGaussianDistribution
        sample = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
        return {"latent": (sample * self.scale).astype(np.float32), "label": record["label"]}


def latent_dataset(config, *, seed: int, global_batch_size: int,
                   shard_options: grain.sharding.ShardOptions) -> grain.DatasetIterator:
    """Endless, checkpointable iterator of this shard's {"latent": (B_local, ...), "label": (B_local,)}."""
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
