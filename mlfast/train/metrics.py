"""Evaluation metrics: ROC AUC (exact, ties averaged) and logloss, per peer and for the ensemble."""
from __future__ import annotations

import numpy as np

LOGLOSS_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps], as FuxiCTR/sklearn do


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive outscores a random
    negative, ties counting one half (the Mann-Whitney U statistic). NaN when a class is absent.

    >>> roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
    """
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    # average ranks over ties: ranks are 1-based positions, tied groups share their mean position
    boundaries = np.flatnonzero(np.diff(s_sorted)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [s.size]])
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = LOGLOSS_EPS) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [eps, 1-eps])."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1 - eps)
    if y.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def _defined(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def peer_metrics(labels: np.ndarray, probs: np.ndarray, names: list[str]) -> dict[str, dict[str, float | None]]:
    """{peer: {auc, logloss}} for each column of ``probs`` [N, P], plus ``ensemble`` (mean
    probability). A metric that is undefined on these labels (AUC with one class present, anything
    on no rows) is None: JSON ``null``, a blank in tables.

    >>> peer_metrics(np.array([1, 1]), np.array([[0.2], [0.9]]), ["a"])["a"]["auc"] is None
    True
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(names):
        raise ValueError(f"probs must be [N, {len(names)}], got {probs.shape}")
    out = {}
    for i, name in enumerate(names):
        out[name] = {"auc": _defined(roc_auc(labels, probs[:, i])), "logloss": _defined(logloss(labels, probs[:, i]))}
    ens = probs.mean(1)
    out["ensemble"] = {"auc": _defined(roc_auc(labels, ens)), "logloss": _defined(logloss(labels, ens))}
    return out


def selection_score(m: dict[str, float | None], metric: str) -> float:
    """Higher is better: the AUC, or minus the logloss when selecting by logloss."""
    if metric == "auc":
        return m["auc"] if m["auc"] is not None else -np.inf
    return -m["logloss"] if m["logloss"] is not None else -np.inf
