"""FID, sFID, Inception Score, precision and recall from features, on the host in float64.

Definitions follow ADM's evaluator (openai/guided-diffusion ``evaluations/evaluator.py``):
FID is the Frechet distance of pool-3 Gaussians, sFID the same on the spatial
``mixed_6/conv`` features, IS uses 1008 bias-free logits over 10 consecutive
splits, precision/recall are Kynkaanniemi et al.'s k-NN manifolds with k = 3.
"""

from __future__ import annotations

import numpy as np


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of (n, d) features in float64; sigma is the unbiased covariance (np.cov)."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need (n >= 2, d) features, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrtm(sigma1 @ sigma2)) for covariance matrices, without a general (Schur) sqrtm.

    sigma1 @ sigma2 is similar to the symmetric PSD matrix S1^1/2 sigma2 S1^1/2, so its
    square root's trace is the sum of that matrix's eigenvalue square roots: the value
    scipy.linalg.sqrtm gives when it succeeds, and still finite and real for the
    singular covariances of fewer samples than dimensions.
    """
    s1 = _psd_sqrt(np.asarray(sigma1, np.float64))
    m = s1 @ np.asarray(sigma2, np.float64) @ s1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    return frechet_distance(*statistics(features1), *statistics(features2))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of exp(E_x KL(p(y|x) || p(y))) over ``splits`` consecutive chunks.

    Chunk i is rows [i n / splits, (i + 1) n / splits): ADM's 5000-row chunks for its
    50k samples, torch-fidelity's split rule (without its shuffle) for any n.
    """
    logits = np.asarray(logits, np.float64)
    n = len(logits)
    if n < splits:
        raise ValueError(f"{n} samples cannot be cut into {splits} splits")
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        log_q = np.log(p[lo:hi].mean(axis=0, keepdims=True))
        kl = (p[lo:hi] * (log_p[lo:hi] - log_q)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # As ADM's DistanceBlock: |a|^2 - 2 a.b + |b|^2, clamped at 0 (float32 here, ADM tries float16 first).
    a = a.astype(np.float32)
    b = b.astype(np.float32)
    d = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]
    return np.maximum(d, 0)


def manifold_radii(features: np.ndarray, k: int = 3, block: int = 10000) -> np.ndarray:
    """Squared distance of each feature to its k-th nearest neighbour (itself excluded), shape (n,)."""
    n = len(features)
    if n <= k:
        raise ValueError(f"need more than k={k} features for a k-NN manifold, got {n}")
    radii = np.empty(n, np.float32)
    for lo in range(0, n, block):
        d = _squared_distances(features[lo:lo + block], features)
        # Index k of the sorted row: index 0 is the point itself (distance 0).
        radii[lo:lo + block] = np.partition(d, k, axis=1)[:, k]
    return radii


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray, k: int = 3,
                     block: int = 10000) -> tuple[float, float]:
    """(precision, recall): the fraction of samples inside the reference manifold, and vice versa."""
    ref_radii = manifold_radii(ref_features, k, block)
    sample_radii = manifold_radii(sample_features, k, block)
    sample_in = np.zeros(len(sample_features), bool)
    ref_in = np.zeros(len(ref_features), bool)
    for lo in range(0, len(ref_features), block):
        for lo2 in range(0, len(sample_features), block):
            d = _squared_distances(ref_features[lo:lo + block], sample_features[lo2:lo2 + block])
            sample_in[lo2:lo2 + block] |= (d <= ref_radii[lo:lo + block, None]).any(axis=0)
            ref_in[lo:lo + block] |= (d <= sample_radii[None, lo2:lo2 + block]).any(axis=1)
    return float(sample_in.mean()), float(ref_in.mean())
