"""FID, IS, precision/recall: closed forms and agreement with pytorch-fid, torch-fidelity and ADM's rules."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from eval import metrics


def _random_cov(rng, d, n=None):
    a = rng.normal(size=(n or 2 * d, d))
    return np.cov(a, rowvar=False)


def test_fid_equal_covariances_is_squared_mean_distance():
    rng = np.random.RandomState(0)
    sigma = _random_cov(rng, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    assert metrics.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)


def test_fid_diagonal_covariances_closed_form():
    rng = np.random.RandomState(1)
    v1, v2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_fid_agrees_with_pytorch_fid_on_random_features():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.RandomState(2)
    f1 = rng.normal(size=(300, 64))
    f2 = rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 0.5
    s1, s2 = metrics.statistics(f1), metrics.statistics(f2)
    ref = fid_score.calculate_frechet_distance(s1[0], s1[1], s2[0], s2[1])
    assert metrics.frechet_distance(*s1, *s2) == pytest.approx(ref, rel=1e-6)
    assert metrics.fid_from_features(f1, f2) == pytest.approx(ref, rel=1e-6)


def test_trace_sqrt_matches_scipy_sqrtm_and_survives_singular_covariances():
    rng = np.random.RandomState(3)
    s1, s2 = _random_cov(rng, 20), _random_cov(rng, 20)
    assert metrics.trace_sqrt_product(s1, s2) == pytest.approx(np.trace(scipy.linalg.sqrtm(s1 @ s2)).real, rel=1e-8)
    # Fewer samples than dimensions: rank-deficient covariances, still a finite non-negative FID.
    f1, f2 = rng.normal(size=(10, 50)), rng.normal(size=(10, 50))
    fid = metrics.fid_from_features(f1, f2)
    assert np.isfinite(fid) and fid > 0
    assert abs(metrics.fid_from_features(f1, f1)) < 1e-6 * np.trace(np.cov(f1, rowvar=False))


def test_inception_score_uniform_logits_is_one_and_onehot_is_num_classes():
    assert metrics.inception_score(np.zeros((100, 1008)))[0] == pytest.approx(1.0, abs=1e-12)
    onehot = np.eye(10)[np.arange(100) % 10] * 100.0
    assert metrics.inception_score(onehot, splits=10)[0] == pytest.approx(10.0, rel=1e-6)


def test_inception_score_agrees_with_torch_fidelity_and_adm_split_rule():
    torch = pytest.importorskip("torch")
    isc = pytest.importorskip("torch_fidelity.metric_isc")
    rng = np.random.RandomState(4)
    logits = rng.normal(size=(230, 1008)) * 3
    mean, std = metrics.inception_score(logits, splits=10)
    ref = isc.isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=False)
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-8)
    # ADM: softmax, then consecutive chunks of split_size rows (5000 for its 50k samples).
    logits = logits[:200]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), 20):
        part = p[i:i + 20]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    assert metrics.inception_score(logits, splits=10)[0] == pytest.approx(np.mean(scores), rel=1e-10)


def test_manifold_radii_match_brute_force_kth_neighbour():
    rng = np.random.RandomState(5)
    f = rng.normal(size=(40, 8)).astype(np.float32)
    d = ((f[:, None] - f[None]) ** 2).sum(-1)
    expected = np.sort(d, axis=1)[:, 3]
    np.testing.assert_allclose(metrics.manifold_radii(f, k=3, block=16), expected, rtol=1e-4, atol=1e-4)


def test_precision_recall_identical_disjoint_and_mode_dropping():
    rng = np.random.RandomState(6)
    ref = rng.normal(size=(200, 8))
    assert metrics.precision_recall(ref, ref) == (1.0, 1.0)
    assert metrics.precision_recall(ref, ref + 100.0) == (0.0, 0.0)
    # Samples covering only half of the reference: precise but with low recall.
    half = ref[ref[:, 0] > 0]
    precision, recall = metrics.precision_recall(ref, half[:60] + 0.01, block=64)
    assert precision > 0.9 and recall < 0.75
