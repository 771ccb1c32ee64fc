"""Captions as data: caption files, their T5 embeddings cached once beside the data, and the demo's
measured captions for the embedded digits.

    python -m trainers.captions measure --config=configs/textok_32.py:demo --out=captions.jsonl
    python -m trainers.captions embed --config=configs/textok_32.py:demo --captions=captions.jsonl --out=DIR

**Caption file** (one per split): JSONL, one line per image, ``{"id": IMAGE_ID, "captions": [str,
...]}`` (one or more captions). ``IMAGE_ID`` is the image's id in ``config.data``: for ``folder``
data its path relative to the folder (``cat/001.png``); for the embedded digits and TFDS datasets
its record index in the split, as a string (``"0"``, ``"1"``, ...). Images without a line have no
caption and fail loudly when a captioned run reads them.

**Embedding cache** (``embed``): the frozen T5 encoder (``config.text``) runs over every caption
once; ``DIR`` holds ``embeddings.npy`` (num_captions, max_length, d_model) (``config.text.dtype``),
``mask.npy`` (num_captions, max_length) uint8 (1 = token), ``index.npz`` (``ids``: image ids in
file order, ``offsets``: caption range of each image, ``labels``: each image's class or -1) and
``metadata.json``. ``config.data.captions = DIR`` makes the input pipeline (trainers/data.py) add
to every example ``caption_emb`` (K, L, D), ``caption_mask`` (K, L) and ``caption_valid`` (K,) with
all of the image's captions (K = most captions of any image; extra slots invalid), so the
method draws one per step with its own rng; nothing is recomputed per step.

**Text encoder** (``config.text``): ``t5_path``, a Hugging Face T5 checkpoint folder (config.json,
weights, ``spiece.model`` for the SentencePiece tokenizer), e.g. ``google/t5-v1_1-xl`` (TexTok at
256 px) or ``google/t5-v1_1-xxl`` (512 px); or, with ``t5_path = ""``, a randomly initialised T5
of ``config.text.random_t5`` sizes (seed ``config.text.seed``) over a word-level vocabulary
built from the caption file: the demo's choice, since no T5 weights ship offline (a frozen random
transformer still maps different captions to different embeddings; the tokenizer's learned text
projections read them). Every caption is tokenized, EOS-terminated (id 1), padded (id 0) and
truncated to ``config.text.max_length`` tokens.

**Measured captions** (``measure``, the embedded digits have none): each digit is described by
what can be measured in it, as the training pipeline sees it (``config.data.image_size``): class
name, stroke thickness (twice the mean distance-to-background of ink pixels), slant (the ink's
x-y shear, dx/dy), size (ink bounding-box area) and position (ink centre of mass). Each
continuous measure is cut at its dataset tertiles into three words, so every word carries about
1.6 bits the image tokens would otherwise have to store. Two phrasings per image.

``config.data.captions = "demo"``: measure and embed the embedded digits once into
``config.data.cache_dir`` (like the embedded images themselves), then read them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

DEMO = "demo"
_FORMAT_VERSION = 1
_PAD, _EOS = 0, 1
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


# ----------------------------------------------------------------------------- caption files


def read_caption_file(path: str | Path) -> dict[str, list[str]]:
    """{image id: [captions]} from a JSONL caption file; errors name the file and line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"caption file {path} not found (JSONL: one {{\"id\": ..., \"captions\": [...]}} "
                                "per image; `python -m trainers.captions measure` writes the demo's)")
    out: dict[str, list[str]] = {}
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(entry, dict) or "id" not in entry or "captions" not in entry:
                raise ValueError(f"{path}:{n}: expected {{\"id\": ..., \"captions\": [...]}}, got {line.strip()[:80]}")
            caps = entry["captions"]
            if isinstance(caps, str):
                caps = [caps]
            if not caps or not all(isinstance(c, str) and c.strip() for c in caps):
                raise ValueError(f"{path}:{n}: image {entry['id']!r} needs one or more non-empty captions")
            key = str(entry["id"])
            if key in out:
                raise ValueError(f"{path}:{n}: image id {key!r} appears twice")
            out[key] = list(caps)
    if not out:
        raise ValueError(f"caption file {path} has no captions")
    return out


def write_caption_file(path: str | Path, captions: dict[str, list[str]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for key, caps in captions.items():
            f.write(json.dumps({"id": key, "captions": caps}) + "\n")


# ----------------------------------------------------------------------------- measured digit captions


def digit_measures(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image measures of (N, H, W) or (N, H, W, 1) images in [0, 1] (ink bright): thickness (px),
    lean (dx/dy of the ink, > 0 leans right), area (ink bounding box, px^2), cx, cy (centre of mass
    relative to the image centre, px; y down)."""
    from scipy import ndimage

    x = np.asarray(images, np.float64)
    if x.ndim == 4:
        x = x[..., 0]
    n, h, w = x.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    mass = x.sum(axis=(1, 2)) + 1e-8
    cx = (x * xs).sum(axis=(1, 2)) / mass
    cy = (x * ys).sum(axis=(1, 2)) / mass
    dx, dy = xs[None] - cx[:, None, None], ys[None] - cy[:, None, None]
    shear = (x * dx * dy).sum(axis=(1, 2)) / ((x * dy * dy).sum(axis=(1, 2)) + 1e-8)
    ink = x > 0.5
    thickness = np.zeros(n)
    area = np.zeros(n)
    for i in range(n):
        if ink[i].any():
            thickness[i] = 2.0 * ndimage.distance_transform_edt(ink[i])[ink[i]].mean()
            rows, cols = np.flatnonzero(ink[i].any(axis=1)), np.flatnonzero(ink[i].any(axis=0))
            area[i] = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    # Image y grows downwards: a digit whose top lies to the right has dx/dy < 0.
    return {"thickness": thickness, "lean": -shear, "area": area, "cx": cx - (w - 1) / 2, "cy": cy - (h - 1) / 2}


_WORDS = {
    "thickness": ("thin", "medium", "thick"),
    "lean": ("slanted left", "upright", "slanted right"),
    "area": ("small", "medium-sized", "large"),
    "cx": ("left of centre", "centred", "right of centre"),
    "cy": ("high", "at mid height", "low"),
}


def tertile_words(measures: dict[str, np.ndarray]) -> tuple[dict[str, list[str]], dict[str, list[float]]]:
    """Each measure cut at its dataset tertiles into three words: ({measure: words per image}, thresholds)."""
    words, cuts = {}, {}
    for name, values in measures.items():
        lo, hi = np.quantile(values, [1 / 3, 2 / 3])
        cuts[name] = [float(lo), float(hi)]
        bins = np.digitize(values, [lo, hi])
        words[name] = [_WORDS[name][b] for b in bins]
    return words, cuts


def digit_captions(labels, words: dict[str, list[str]], class_names=DIGIT_NAMES) -> list[list[str]]:
    """Two phrasings per image of its class and measured words."""
    out = []
    for i, label in enumerate(labels):
        name = class_names[int(label)]
        t, s, a, x, y = (words[k][i] for k in ("thickness", "lean", "area", "cx", "cy"))
        out.append([f"a {t} {s} handwritten {name}, {a}, {x} and {y}",
                    f"the digit {name} in {t} strokes, {s}, {a} in the frame, placed {x}, {y}"])
    return out


def measure_embedded(config) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Measured captions of every usable image of ``config.data`` (as training sees it): ({id: captions}, info)."""
    from trainers import data

    source, _ = data.record_source(config)
    prep = data.Preprocess(config.data.image_size, config.data.channels, False, data.min_image_side(config))
    all_ids = image_ids(config, source)
    ids, images, labels = [], [], []
    for i in range(len(source)):
        out = prep(source[i], np.random.default_rng(0))
        if out is None:
            continue
        ids.append(all_ids[i])
        images.append((out["image"] + 1.0) / 2.0)
        labels.append(int(out["label"]))
    words, cuts = tertile_words(digit_measures(np.stack(images)))
    names = DIGIT_NAMES if config.data.name == data.EMBEDDED else _class_names(config)
    caps = digit_captions(labels, words, names)
    return dict(zip(ids, caps)), {"tertiles": cuts, "image_size": int(config.data.image_size)}


def _class_names(config) -> list[str]:
    from trainers import data

    _, meta = data.build_cache(config)
    return list(meta["class_names"])


def image_ids(config, source) -> list[str]:
    """The caption file's id of every ``source[i]`` (see the module docstring): folder data the file's
    path relative to the folder, other data the record index in the split."""
    records = [source.record_index(i) if hasattr(source, "record_index") else i for i in range(len(source))]
    if config.data.name == "folder":
        from trainers import data

        _, meta = data.build_cache(config)
        return [meta["files"][r] for r in records]
    return [str(r) for r in records]


# ----------------------------------------------------------------------------- text tokenization


class WordVocabulary:
    """The demo's word-level tokenizer: lower-cased words and punctuation, ids 2.. in sorted order
    (0 = pad, 1 = EOS as in T5); unknown words are an error naming them."""

    def __init__(self, words):
        self.words = sorted(set(words))
        self._ids = {w: i + 2 for i, w in enumerate(self.words)}

    @staticmethod
    def split(text: str) -> list[str]:
        return re.findall(r"[a-z0-9\-]+|[^\sa-z0-9]", text.lower())

    @classmethod
    def from_captions(cls, captions) -> "WordVocabulary":
        return cls(w for c in captions for w in cls.split(c))

    @property
    def size(self) -> int:
        return len(self.words) + 2

    def encode(self, text: str) -> list[int]:
        unknown = [w for w in self.split(text) if w not in self._ids]
        if unknown:
            raise ValueError(f"caption {text!r}: words {unknown} are not in the demo vocabulary")
        return [self._ids[w] for w in self.split(text)]


def tokenize(texts, encode, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n, max_length) int32, mask (n, max_length) uint8): EOS-terminated, truncated (keeping EOS), padded."""
    ids = np.full((len(texts), max_length), _PAD, np.int32)
    mask = np.zeros((len(texts), max_length), np.uint8)
    for i, text in enumerate(texts):
        toks = list(encode(text))[: max_length - 1] + [_EOS]
        ids[i, : len(toks)] = toks
        mask[i, : len(toks)] = 1
    return ids, mask


def sentencepiece_encoder(t5_path: str):
    path = Path(t5_path) / "spiece.model"
    if not path.exists():
        from models.pretrained import t5

        raise t5._missing(path, "the SentencePiece model spiece.model", None)
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    return lambda text: sp.encode(text)


def text_encoder(config, all_captions):
    """(encode_text, T5 encoder module, T5Config, description) for ``config.text``."""
    from models.pretrained import t5

    tc = config.text
    if tc.t5_path:
        encoder, cfg = t5.load_pretrained(tc.t5_path)
        return sentencepiece_encoder(tc.t5_path), encoder, cfg, {"t5_path": str(tc.t5_path)}
    vocab = WordVocabulary.from_captions(all_captions)
    cfg = t5.T5Config(vocab_size=vocab.size, **dict(tc.random_t5))
    from flax import nnx

    encoder = t5.T5Encoder(cfg, rngs=nnx.Rngs(int(tc.seed)))
    return vocab.encode, encoder, cfg, {"random_t5": dict(tc.random_t5), "seed": int(tc.seed),
                                        "vocabulary": vocab.words}


# ----------------------------------------------------------------------------- the embedding cache


def embed(config, captions: dict[str, list[str]], out: str | Path, *, labels: dict[str, int] | None = None,
          batch_size: int = 64, extra_metadata: dict | None = None) -> dict[str, Any]:
    """Run the frozen T5 of ``config.text`` over every caption once; write the cache to ``out`` atomically."""
    import jax

    tc = config.text
    ids = list(captions)
    flat = [c for key in ids for c in captions[key]]
    offsets = np.cumsum([0] + [len(captions[key]) for key in ids]).astype(np.int64)
    encode_text, encoder, cfg, described = text_encoder(config, flat)
    tokens, mask = tokenize(flat, encode_text, int(tc.max_length))
    apply = jax.jit(lambda i, m: encoder(i, m))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=out.parent))
    try:
        emb = np.lib.format.open_memmap(tmp / "embeddings.npy", mode="w+", dtype=np.dtype(tc.dtype),
                                        shape=(len(flat), int(tc.max_length), cfg.d_model))
        for start in range(0, len(flat), batch_size):
            i, m = tokens[start:start + batch_size], mask[start:start + batch_size]
            pad = batch_size - len(i)  # one compiled shape
            h = apply(np.pad(i, ((0, pad), (0, 0))), np.pad(m, ((0, pad), (0, 0))))
            emb[start:start + len(i)] = np.asarray(h)[: len(i)] * m[..., None]  # padded positions zero
        emb.flush()
        del emb
        np.save(tmp / "mask.npy", mask)
        lab = np.asarray([labels.get(k, -1) if labels else -1 for k in ids], np.int64)
        np.savez(tmp / "index.npz", ids=np.asarray(ids), offsets=offsets, labels=lab)
        meta = {"format": _FORMAT_VERSION, "num_images": len(ids), "num_captions": len(flat),
                "max_captions": int(np.max(np.diff(offsets))), "max_length": int(tc.max_length),
                "d_model": cfg.d_model, "dtype": str(tc.dtype), "text_encoder": described,
                **(extra_metadata or {})}
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def demo_cache_dir(config) -> Path:
    """Where ``config.data.captions = "demo"`` keeps its measured-caption embeddings (keyed by what they depend on)."""
    key = json.dumps([config.data.name, config.data.image_size, config.data.channels,
                      config.text.to_dict() if hasattr(config.text, "to_dict") else dict(config.text)],
                     sort_keys=True, default=str)
    return Path(config.data.cache_dir) / f"captions-demo-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def resolve(config) -> Path:
    """The embedding cache of ``config.data.captions``, built first for ``"demo"``."""
    value = config.data.captions
    if value != DEMO:
        path = Path(value)
        if not (path / "metadata.json").exists():
            raise ValueError(f"config.data.captions={value!r}: no caption embedding cache there (metadata.json); "
                                    "write one with `python -m trainers.captions embed --captions=FILE.jsonl --out=DIR`")
        return path
    path = demo_cache_dir(config)
    if not (path / "metadata.json").exists():
        caps, info = measure_embedded(config)
        embed(config, caps, path, labels=_labels(config), extra_metadata={"captions": "measured digits", **info})
    return path


def _labels(config) -> dict[str, int]:
    from trainers import data

    source, _ = data.record_source(config)
    return {key: int(source[i]["label"]) for i, key in enumerate(image_ids(config, source))}


class CaptionCache:
    """Read access to an embedding cache (memory-mapped): captions of an image id, per-class pools."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / "metadata.json").read_text())
        if self.meta.get("format") != _FORMAT_VERSION:
            raise ValueError(f"{self.path}: caption cache format {self.meta.get('format')} != {_FORMAT_VERSION}; rebuild it")
        self.embeddings = np.load(self.path / "embeddings.npy", mmap_mode="r")
        self.mask = np.load(self.path / "mask.npy")
        index = np.load(self.path / "index.npz")
        self.offsets, self.labels = index["offsets"], index["labels"]
        self._row = {str(k): i for i, k in enumerate(index["ids"])}
        self.max_captions = int(self.meta["max_captions"])

    @property
    def text_shape(self) -> tuple[int, int]:
        """(max_length, d_model) of one caption embedding."""
        return int(self.meta["max_length"]), int(self.meta["d_model"])

    def for_image(self, key: str) -> dict[str, np.ndarray]:
        """{"caption_emb": (K, L, D) float32, "caption_mask": (K, L) bool, "caption_valid": (K,) bool}."""
        if key not in self._row:
            raise KeyError(f"image {key!r} has no caption in {self.path} (caption files are keyed by image id)")
        r = self._row[key]
        lo, hi = int(self.offsets[r]), int(self.offsets[r + 1])
        k, (length, dim) = self.max_captions, self.text_shape
        emb = np.zeros((k, length, dim), np.float32)
        mask = np.zeros((k, length), bool)
        emb[: hi - lo] = self.embeddings[lo:hi]
        mask[: hi - lo] = self.mask[lo:hi].astype(bool)
        return {"caption_emb": emb, "caption_mask": mask, "caption_valid": np.arange(k) < hi - lo}

    def class_pool(self, num_classes: int, pool_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-class caption pools for class-conditional decoding (TexTok's protocol): ``pool_size``
        captions of each class drawn without replacement (seeded): (C, P, L, D) float32, (C, P, L) bool."""
        rng = np.random.default_rng(seed)
        length, dim = self.text_shape
        emb = np.zeros((num_classes, pool_size, length, dim), np.float32)
        mask = np.zeros((num_classes, pool_size, length), bool)
        caption_class = np.repeat(self.labels, np.diff(self.offsets))
        for c in range(num_classes):
            rows = np.flatnonzero(caption_class == c)
            if len(rows) == 0:
                raise ValueError(f"{self.path}: no caption of class {c} for the per-class caption pool "
                                 "(the cache records each image's label; was it embedded with labels?)")
            pick = np.sort(rng.choice(rows, size=pool_size, replace=len(rows) < pool_size))
            emb[c] = self.embeddings[pick]
            mask[c] = self.mask[pick].astype(bool)
        return emb, mask


class CaptionedSource:
    """A data source whose records carry their image's cached caption embeddings (trainers/data.py hook)."""

    def __init__(self, source, cache: CaptionCache, ids: list[str]):
        self._source, self._cache, self._ids = source, cache, ids

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self._source[index], **self._cache.for_image(self._ids[index])}

    def __repr__(self) -> str:
        return f"CaptionedSource({self._source!r}, {self._cache.path})"


def with_captions(source, config):
    """``source`` with caption embeddings when ``config.data.captions`` is set (else unchanged)."""
    if not config.data.get("captions", ""):
        return source
    return CaptionedSource(source, CaptionCache(resolve(config)), image_ids(config, source))


def text_shape(config) -> tuple[int, int, int]:
    """(K, L, D) of one example's caption embeddings (for model init), building the demo cache if needed."""
    cache = CaptionCache(resolve(config))
    return (cache.max_captions, *cache.text_shape)


# ----------------------------------------------------------------------------- command line


def main(argv):
    from absl import flags
    from ml_collections import config_flags

    if len(argv) < 2 or argv[1] not in ("measure", "embed"):
        print(__doc__)
        return 2
    command = argv[1]
    flags.DEFINE_string("out", None, "output: caption JSONL (measure) or embedding cache folder (embed)", required=True)
    flags.DEFINE_string("captions", "", "embed: the caption JSONL file (default: measure the digits first)")
    flags.DEFINE_integer("batch_size", 64, "embed: captions per T5 batch")
    config_flags.DEFINE_config_file("config", None, "a TexTok config (its data and text fields)")
    flags.FLAGS([argv[0]] + argv[2:])
    config = flags.FLAGS.config
    if config is None:
        raise SystemExit("--config=configs/textok_<N>.py[:variant] is required")
    if command == "measure":
        caps, info = measure_embedded(config)
        write_caption_file(flags.FLAGS.out, caps)
        print(f"wrote {flags.FLAGS.out}: {len(caps)} images, tertiles {info['tertiles']}", flush=True)
        return 0
    caps = read_caption_file(flags.FLAGS.captions) if flags.FLAGS.captions else measure_embedded(config)[0]
    try:
        labels = _labels(config)
    except Exception:  # noqa: BLE001 - captions of a dataset that is not on this machine: no class pools
        labels = None
    meta = embed(config, caps, flags.FLAGS.out, labels=labels, batch_size=flags.FLAGS.batch_size)
    print(f"wrote {flags.FLAGS.out}: {meta['num_captions']} captions of {meta['num_images']} images, "
          f"({meta['max_length']}, {meta['d_model']}) each", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
