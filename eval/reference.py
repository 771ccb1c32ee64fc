"""Reference statistics: read the formats FID numbers are published against, write our own.

Read (``load_reference``), recognised by their keys:
  ADM reference batches (``VIRTUAL_imagenet256_labeled.npz``): ``arr_0`` images (n, h, w, 3) uint8,
      ``mu``/``sigma`` (pool-3) and ``mu_s``/``sigma_s`` (spatial, sFID);
  pytorch-fid stats (``--save-stats``): ``mu``/``sigma``;
  MeanFlow-style stats: ``ref_mu``/``ref_sigma``;
  a plain image batch: ``arr_0`` only (statistics are computed by the caller).
Written (``save_reference``): ADM's keys, so ADM's evaluator reads our files too, plus
``pool_features`` (for precision/recall), ``domain_mu``/``domain_sigma``/``domain_features``
(eval/domain.py) and ``meta`` (a JSON string: resize mode, weights, image count).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np


@dataclasses.dataclass
class Reference:
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    pool_features: np.ndarray | None = None
    images: np.ndarray | None = None
    domain_mu: np.ndarray | None = None
    domain_sigma: np.ndarray | None = None
    domain_features: np.ndarray | None = None
    meta: dict = dataclasses.field(default_factory=dict)
    source_format: str = "ours"


def load_reference(path: str | Path, *, load_images: bool = True) -> Reference:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    with np.load(path, allow_pickle=False) as f:
        keys = set(f.files)
        get = lambda k: np.asarray(f[k]) if k in keys else None  # noqa: E731
        ref = Reference()
        if "meta" in keys:
            ref.meta = json.loads(str(f["meta"]))
            ref.source_format = "ours"
        elif "ref_mu" in keys:
            ref.source_format = "meanflow"
        elif "mu_s" in keys or "arr_0" in keys:
            ref.source_format = "adm"
        elif "mu" in keys:
            ref.source_format = "pytorch_fid"
        else:
            raise ValueError(f"{path}: no known reference keys (mu/sigma, ref_mu/ref_sigma, arr_0); found "
                             f"{sorted(keys)}")
        ref.mu = get("mu") if "mu" in keys else get("ref_mu")
        ref.sigma = get("sigma") if "sigma" in keys else get("ref_sigma")
        ref.mu_s, ref.sigma_s = get("mu_s"), get("sigma_s")
        ref.pool_features = get("pool_features")
        ref.domain_mu, ref.domain_sigma = get("domain_mu"), get("domain_sigma")
        ref.domain_features = get("domain_features")
        if load_images and "arr_0" in keys:
            ref.images = get("arr_0")
    if ref.images is not None and (ref.images.ndim != 4 or ref.images.shape[-1] not in (1, 3)):
        raise ValueError(f"{path}: arr_0 has shape {ref.images.shape}, expected (n, h, w, 1 or 3) images")
    return ref


def save_reference(path: str | Path, ref: Reference) -> None:
    """Write ``ref`` (None fields are left out); images are not written."""
    arrays = {k: getattr(ref, k) for k in ("mu", "sigma", "mu_s", "sigma_s", "pool_features",
                                           "domain_mu", "domain_sigma", "domain_features")}
    arrays = {k: np.asarray(v) for k, v in arrays.items() if v is not None}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, meta=np.asarray(json.dumps(ref.meta)), **arrays)


def load_images(path: str | Path, key: str = "arr_0") -> np.ndarray:
    """(n, h, w, c) uint8 images from an ``.npz`` (ADM sample/reference batch layout)."""
    with np.load(path, allow_pickle=False) as f:
        if key not in f.files:
            raise ValueError(f"{path}: no array {key!r} (found {f.files})")
        images = np.asarray(f[key])
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}[{key}]: shape {images.shape}, expected (n, h, w, 1 or 3) images")
    if images.dtype != np.uint8:
        raise ValueError(f"{path}[{key}]: dtype {images.dtype}, expected uint8 images in [0, 255]")
    return images
