"""The mutual trainer: plumbing identities, exact resume, and learning on generated data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mlfast.api import fit
from mlfast.io.batches import BatchLoader, split_indices
from mlfast.train.config import TrainConfig
from mlfast.models import FeatureSchema, parse_peers
from mlfast.io.reader import read_criteo
from mlfast.io.synth import synth_criteo
from mlfast.train.trainer import MutualTrainer, peer_seed

BUCKETS = 2000  # small tables keep these CPU tests quick


@pytest.fixture(scope="module")
def synth_small(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "small.tsv"
    synth_criteo(path, rows=12_000, seed=7)
    return read_criteo(path, hash_buckets=BUCKETS, cache=False)


def loaders(data, bs=256, seed=0):
    tr, va, te = split_indices(len(data), (8, 1, 1), seed)
    return (BatchLoader(data, bs, indices=tr, shuffle=True, seed=seed, prefetch=0),
            BatchLoader(data, 4096, indices=va, prefetch=0),
            BatchLoader(data, 4096, indices=te, prefetch=0))


def weights(trainer: MutualTrainer, i: int) -> dict:
    return trainer.engine.peer_state_dict(i)


@pytest.mark.parametrize("engine", ["plain", "fused"])
def test_alpha_zero_group_equals_each_peer_alone(synth_small, engine):
    """With alpha = 0 the peer term vanishes: each peer of a group must train exactly as it would
    alone (same seed, same batches). Dropout off, so the RNG streams cannot differ."""
    schema = FeatureSchema.from_data(synth_small)
    tr, va, _ = loaders(synth_small)
    specs = parse_peers("deepfm:dropout=0,dcn:dropout=0")
    cfg = TrainConfig(peers=[str(s) for s in specs], epochs=1, max_steps=6, alpha=0.0, engine=engine,
                      deterministic=True, progress=False)
    group = MutualTrainer(specs, schema, cfg)
    group.fit(tr)
    for i, spec in enumerate(specs):
        solo = MutualTrainer([spec], schema, cfg, seeds=[peer_seed(cfg.seed, spec.label)])
        init = weights(solo, 0)["embedding.weight"]
        solo.fit(tr)
        a, b = weights(group, i), weights(solo, 0)
        assert a.keys() == b.keys()
        for k in a:
            # rounding differs ([B, 2] vs [B, 1] reductions) and Adam magnifies it on tiny gradients;
            # any leak of the peer term would be orders of magnitude larger than this
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{spec.label}.{k}")
        assert not torch.equal(a["embedding.weight"], init)  # and training did move the weights


@pytest.mark.parametrize("engine", ["plain", "fused"])
def test_resume_after_interruption_is_exact(synth_small, engine, tmp_path):
    schema = FeatureSchema.from_data(synth_small)
    tr, va, _ = loaders(synth_small)
    specs = parse_peers("deepfm,dcn")
    cfg = TrainConfig(peers=[str(s) for s in specs], epochs=2, engine=engine, deterministic=True,
                      progress=False, eval_every=11, patience=100, lr_decay=0.5)
    full = MutualTrainer(specs, schema, cfg)
    full_summary = full.fit(tr, va, tmp_path / "full")
    # interrupted mid-epoch (step 17 of 38), then resumed by a fresh trainer
    MutualTrainer(specs, schema, cfg.replace(max_steps=17)).fit(tr, va, tmp_path / "cut")
    resumed = MutualTrainer(specs, schema, cfg)
    summary = resumed.fit(tr, va, tmp_path / "cut", resume=True)
    assert summary["steps"] == full_summary["steps"] == 2 * len(tr)
    assert full.progress.history == resumed.progress.history  # every logged loss and metric
    for i in range(2):
        for k, v in weights(full, i).items():
            assert torch.equal(v, weights(resumed, i)[k]), k
    assert full.evaluate(va) == resumed.evaluate(va)


def test_early_stopping_and_lr_decay(synth_small):
    schema = FeatureSchema.from_data(synth_small)
    tr, va, _ = loaders(synth_small)
    specs = parse_peers("lr")
    # a learning rate this large makes validation worse after the first evaluations
    cfg = TrainConfig(peers=["lr"], epochs=30, lr=3.0, patience=2, lr_decay=0.5, progress=False, eval_every=5)
    t = MutualTrainer(specs, schema, cfg)
    s = t.fit(tr, va)
    assert s["stopped"] == "early_stopping"
    evals = [r for r in t.progress.history if "valid_lr_auc" in r]
    assert t.progress.bad_evals == 2
    assert t.progress.lr == pytest.approx(3.0 * 0.5**2)
    best = max(r["valid_lr_auc"] for r in evals)
    assert t.evaluate(va)["lr"]["auc"] == pytest.approx(best)  # best weights restored


def test_fused_sparse_adam_matches_dense_adam_auc(tmp_path):
    """Issue 5: the sparse (lazy) optimizer reaches the dense-Adam AUC within seed noise."""
    path = tmp_path / "s.tsv"
    synth_criteo(path, rows=40_000, seed=3)
    data = read_criteo(path, hash_buckets=4000, cache=False)
    aucs = {}
    for engine in ("plain", "fused"):
        for seed in (0, 1):
            r = fit(data, peers=["deepfm"], epochs=2, engine=engine, seed=seed, progress=False, log=lambda *a: None)
            aucs.setdefault(engine, []).append(r.metrics["test"]["deepfm"]["auc"])
    print("test AUC by engine:", aucs)
    noise = max(np.ptp(aucs["plain"]), np.ptp(aucs["fused"]), 0.003)
    assert abs(np.mean(aucs["plain"]) - np.mean(aucs["fused"])) <= 2 * noise
    assert min(aucs["fused"]) > 0.7
