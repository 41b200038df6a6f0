"""AUC and logloss against brute-force definitions."""
import math

import numpy as np
import pytest

from mlfast.train.metrics import logloss, peer_metrics, roc_auc


def brute_auc(y, s):
    pos = [a for a, t in zip(s, y) if t]
    neg = [a for a, t in zip(s, y) if not t]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("n", [2, 7, 300])
def test_auc_matches_pairwise_definition_with_ties(np_rng, n):
    y = np_rng.integers(0, 2, n)
    y[0], y[-1] = 0, 1
    s = np_rng.integers(0, 5, n).astype(float)  # many ties
    assert roc_auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)


def test_auc_extremes_and_single_class():
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5
    assert math.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_logloss_and_clipping(np_rng):
    y = np_rng.integers(0, 2, 50).astype(float)
    p = np_rng.random(50)
    ref = -np.mean([math.log(q) if t else math.log(1 - q) for t, q in zip(y, p)])
    assert logloss(y, p) == pytest.approx(ref, rel=1e-12)
    assert np.isfinite(logloss(np.array([1.0, 0.0]), np.array([0.0, 1.0])))  # clipped, not inf


def test_peer_metrics_ensemble_is_mean_probability(np_rng):
    y = np_rng.integers(0, 2, 200)
    p = np_rng.random((200, 2))
    m = peer_metrics(y, p, ["a", "b"])
    assert m["a"]["auc"] == pytest.approx(brute_auc(y, p[:, 0]))
    assert m["ensemble"]["auc"] == pytest.approx(brute_auc(y, p.mean(1)))
    assert m["ensemble"]["logloss"] == pytest.approx(logloss(y, p.mean(1)))
