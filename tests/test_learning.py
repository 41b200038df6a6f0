"""End-to-end learning check on generated data whose best achievable AUC is known.

`synth_criteo` draws labels from a hidden model and can return each row's true click
probability, so the Bayes-optimal AUC on the held-out test split is exact. Trained on 200k rows
(8:1:1 split, vocabulary mode with min_count=10 as in BARS' Criteo setting), every deep peer must
clearly beat logistic regression and come close to that ceiling. Mutual training of two peers is
checked the same way, and the ensemble must be at least as good as the weaker peer.

Measured on the 2-core CI machine (3 epochs, batch 4096): LR 0.755, DeepFM 0.782, DCN 0.784 against
a test-split Bayes AUC of 0.803 — gaps of about 0.02. (At 1M rows DeepFM comes within 0.01.)
"""
from __future__ import annotations

import numpy as np
import pytest

import mlfast
from mlfast.io.batches import split_indices
from mlfast.train.metrics import roc_auc
from mlfast.io.synth import synth_criteo

ROWS = 200_000
SEED = 5
MAX_GAP = 0.03       # deep peer vs Bayes-optimal test AUC
MIN_OVER_LR = 0.015  # deep peer vs logistic regression


@pytest.fixture(scope="module")
def learn_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("learn") / "synth200k.tsv"
    rep = synth_criteo(path, ROWS, seed=SEED, return_probs=True)
    _, _, test_idx = split_indices(ROWS, (8, 1, 1), 0)
    bayes = roc_auc(rep.labels[test_idx], rep.probs[test_idx])
    return path, bayes


def _fit(path, peers, **kw):
    return mlfast.fit(path, peers=peers, epochs=3, seed=0, progress=False, log=lambda *a: None,
                      reader=dict(min_count=10), device="cpu", **kw)


@pytest.fixture(scope="module")
def deep_pair(learn_data):
    """DeepFM + DCN trained mutually in fp32 (shared by the learning and the bf16 tests)."""
    return _fit(learn_data[0], ["deepfm", "dcn"]).metrics["test"]


def test_deep_peers_learn_the_hidden_model(learn_data, deep_pair):
    path, bayes = learn_data
    assert 0.79 < bayes < 0.82
    lr = _fit(path, ["lr"]).metrics["test"]["lr"]["auc"]
    assert lr > 0.70, lr
    test = deep_pair
    for peer in ("deepfm", "dcn"):
        auc = test[peer]["auc"]
        assert auc > lr + MIN_OVER_LR, (peer, auc, lr)
        assert bayes - auc < MAX_GAP, (peer, auc, bayes)
        assert np.isfinite(test[peer]["logloss"]) and test[peer]["logloss"] < 0.55
    ens = test["ensemble"]["auc"]
    assert ens >= min(test["deepfm"]["auc"], test["dcn"]["auc"]) - 1e-3


def test_bf16_on_the_cpu_learns_as_well_as_fp32(learn_data, deep_pair):
    """--bf16 on a CPU with AVX512-BF16 / AMX: bf16 autocast of the models, fp32 weights, loss and
    optimizer state; each peer's test AUC within 0.002 of the fp32 run's (same data, seed, schedule)."""
    from mlfast.ops.cpu_features import bf16_supported

    if not bf16_supported():
        pytest.skip("this CPU has neither AVX512-BF16 nor AMX-BF16")
    bf16 = _fit(learn_data[0], ["deepfm", "dcn"], bf16=True).metrics["test"]
    print("test AUC fp32 / bf16:", {p: (deep_pair[p]["auc"], bf16[p]["auc"]) for p in ("deepfm", "dcn")})
    for peer in ("deepfm", "dcn", "ensemble"):
        assert abs(bf16[peer]["auc"] - deep_pair[peer]["auc"]) <= 0.002, (peer, bf16[peer], deep_pair[peer])
