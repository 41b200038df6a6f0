"""The mutual trainer: plumbing identities, exact resume (after a stop, SIGINT or SIGTERM),
divergence, undefined metrics, and learning on generated data."""
from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch

from mlfast.api import fit
from mlfast.io.batches import BatchLoader, split_indices
from mlfast.io.reader import read_criteo
from mlfast.io.synth import synth_criteo
from mlfast.models import FeatureSchema, parse_peers
from mlfast.train import checkpoint as ckpt
from mlfast.train.config import TrainConfig
from mlfast.train.tables import DenseTables
from mlfast.train.trainer import Interrupted, MutualTrainer, TrainingDiverged, peer_seed

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


def weights(trainer: MutualTrainer, i: int) -> dict[str, torch.Tensor]:
    """Peer i's whole function: its table [V, W] and its dense state."""
    t = trainer.group.tables
    table = t.tables[i].detach().clone() if isinstance(t, DenseTables) else t.peer_weight(i)
    return {"table": table, **trainer.group.peer_states([i])[i]}


def assert_same_weights(a: MutualTrainer, b: MutualTrainer, pairs) -> None:
    for i, j in pairs:
        wa, wb = weights(a, i), weights(b, j)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize("engine", ["plain", "fused"])
def test_alpha_zero_group_equals_each_peer_alone(synth_small, engine):
    """With alpha = 0 the peer term vanishes: each peer of a group trains exactly as it would alone
    (same seed, same batches), to the bit. Dropout off, so the RNG streams cannot differ."""
    schema = FeatureSchema.from_data(synth_small)
    tr, va, _ = loaders(synth_small)
    specs = parse_peers("deepfm:dropout=0,dcn:dropout=0")
    cfg = TrainConfig(peers=[str(s) for s in specs], epochs=1, max_steps=6, alpha=0.0, engine=engine,
                      deterministic=True, progress=False)
    group = MutualTrainer(specs, schema, cfg)
    group.fit(tr)
    for i, spec in enumerate(specs):
        solo = MutualTrainer([spec], schema, cfg, seeds=[peer_seed(cfg.seed, spec.label)])
        init = weights(solo, 0)["table"]
        solo.fit(tr)
        assert_same_weights(group, solo, [(i, 0)])
        assert not torch.equal(weights(solo, 0)["table"], init)  # and training did move the weights


@pytest.mark.parametrize("engine", ["plain", "fused"])
def test_resume_after_interruption_is_exact(synth_small, engine, tmp_path):
    schema = FeatureSchema.from_data(synth_small)
    tr, va, _ = loaders(synth_small)
    specs = parse_peers("deepfm,dcn")
    cfg = TrainConfig(peers=[str(s) for s in specs], epochs=2, engine=engine, deterministic=True,
                      progress=False, eval_every=11, patience=100, lr_decay=0.5)
    full = MutualTrainer(specs, schema, cfg)
    full_summary = full.fit(tr, va, tmp_path / "full")
    # interrupted mid-epoch (step 17 of 76), then resumed by a fresh trainer
    MutualTrainer(specs, schema, cfg.replace(max_steps=17)).fit(tr, va, tmp_path / "cut")
    resumed = MutualTrainer(specs, schema, cfg)
    summary = resumed.fit(tr, va, tmp_path / "cut", resume=True)
    assert summary["steps"] == full_summary["steps"] == 2 * len(tr)
    assert full.progress.history == resumed.progress.history  # every logged loss and metric
    assert summary["best_step"] == full_summary["best_step"] and summary["best_valid"] == full_summary["best_valid"]
    assert_same_weights(full, resumed, [(0, 0), (1, 1)])
    assert full.evaluate(va) == resumed.evaluate(va)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_after_the_step_and_resumes_exactly(synth_small, tmp_path, signum):
    schema = FeatureSchema.from_data(synth_small)
    tr, va, _ = loaders(synth_small)
    specs = parse_peers("deepfm,dcn")
    cfg = TrainConfig(peers=[str(s) for s in specs], epochs=1, deterministic=True, progress=False, eval_every=9,
                      patience=100)
    full = MutualTrainer(specs, schema, cfg)
    full.fit(tr, va, tmp_path / "full")
    cut = MutualTrainer(specs, schema, cfg)
    step = cut.engine.train_step
    calls = {"n": 0}

    def train_step(batch, guard=None):  # the signal arrives in the middle of step 13
        calls["n"] += 1
        if calls["n"] == 13:
            os.kill(os.getpid(), signum)
        return step(batch, guard)

    cut.engine.train_step = train_step
    with pytest.raises(Interrupted) as e:
        cut.fit(tr, va, tmp_path / "cut")
    assert e.value.signum == signum and e.value.saved == tmp_path / "cut" / "last.pt"
    assert cut.progress.step == 13  # the step in flight finished, nothing after it ran
    assert ckpt.load_checkpoint(tmp_path / "cut" / "last.pt")["progress"]["step"] == 13
    assert signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL)  # handlers restored
    resumed = MutualTrainer(specs, schema, cfg)
    resumed.fit(tr, va, tmp_path / "cut", resume=True)
    assert full.progress.history == resumed.progress.history
    assert full.progress.best_step == resumed.progress.best_step
    assert full.progress.best_metrics == resumed.progress.best_metrics
    assert_same_weights(full, resumed, [(0, 0), (1, 1)])


def test_early_stopping_and_lr_decay(synth_small):
    schema = FeatureSchema.from_data(synth_small)
    tr, va, _ = loaders(synth_small)
    specs = parse_peers("lr")
    # a learning rate this large makes validation worse after the first evaluations
    cfg = TrainConfig(peers=["lr"], epochs=30, lr=3.0, patience=2, lr_decay=0.5, progress=False, eval_every=5,
                      max_loss=1e6)  # wild, on purpose: not a divergence
    t = MutualTrainer(specs, schema, cfg)
    s = t.fit(tr, va)
    assert s["stopped"] == "early_stopping"
    evals = [r for r in t.progress.history if "valid_lr_auc" in r]
    assert t.progress.bad_evals == 2
    assert t.progress.lr == pytest.approx(3.0 * 0.5**2)
    best = max(r["valid_lr_auc"] for r in evals)
    assert t.evaluate(va)["lr"]["auc"] == pytest.approx(best)  # best weights restored


def test_final_validation_is_reused_only_for_the_weights_it_scored(synth_small, tmp_path):
    """A run that ends on its best (validated at the last step) hands that validation on as
    ``final_valid``: equal to predicting the split again. A run whose best came earlier does not;
    nor does one whose early stop restored earlier weights. And last.pt is written once at the
    end-of-epoch validation, not again when the run completes."""
    schema = FeatureSchema.from_data(synth_small)
    tr, va, _ = loaders(synth_small)
    specs = parse_peers("deepfm,dcn")
    cfg = TrainConfig(peers=[str(s) for s in specs], epochs=1, progress=False)
    t = MutualTrainer(specs, schema, cfg)
    s = t.fit(tr, va, tmp_path / "run")
    assert all(b == s["steps"] for b in s["best_step"].values())
    assert t.final_valid is not None and t.final_valid[0] is va
    assert t.final_valid[1] == t.evaluate(va)
    assert s["checkpoint_seconds"]["writes"] == 2  # best.pt and last.pt at the validation, nothing after
    # the best was earlier: the weights restored are not the ones validated last
    t.progress.best_step[0] = 0
    t.finish()
    assert t.final_valid is None
    lr = MutualTrainer(parse_peers("lr"), schema, TrainConfig(peers=["lr"], epochs=30, lr=3.0, patience=2,
                                                              progress=False, eval_every=5, max_loss=1e6))
    lr.fit(tr, va)
    assert lr.progress.stopped == "early_stopping" and lr.final_valid is None


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(synth_small, tmp_path):
    schema = FeatureSchema.from_data(synth_small)
    tr, va, _ = loaders(synth_small)
    specs = parse_peers("deepfm,dcn")
    cfg = TrainConfig(peers=[str(s) for s in specs], epochs=1, lr=1e-3, progress=False, checkpoint_every=5,
                      patience=100)
    t = MutualTrainer(specs, schema, cfg)
    step = t.engine.train_step
    calls = {"n": 0}

    def train_step(batch, guard=None):
        calls["n"] += 1
        if calls["n"] == 8:
            t.engine.set_lr(1e4)  # from step 8 on, dcn... every peer explodes
        return step(batch, guard)

    t.engine.train_step = train_step
    with pytest.raises(TrainingDiverged, match=r"at step (8|9|1\d)\b.*(deepfm|dcn)"):
        t.fit(tr, va, tmp_path / "run")
    saved = ckpt.load_checkpoint(tmp_path / "run" / "last.pt")
    assert saved["progress"]["step"] == 5  # the checkpoint before the divergence, not a later one
    assert all(math.isfinite(x) for r in saved["progress"]["history"] for x in r.values() if isinstance(x, float))


def test_skip_bad_batches_counts_them(synth_small):
    schema = FeatureSchema.from_data(synth_small)
    tr, va, _ = loaders(synth_small)
    specs = parse_peers("lr")
    cfg = TrainConfig(peers=["lr"], epochs=1, max_steps=10, progress=False, skip_bad_batches=True, max_loss=0.01)
    t = MutualTrainer(specs, schema, cfg)
    s = t.fit(tr)
    # every batch's BCE (~0.5) exceeds max_loss: all skipped, none applied, the run still completes
    assert s["skipped_batches"] == len(tr) and s["steps"] == 0


def test_undefined_auc_selects_on_logloss_and_writes_null(synth_small, tmp_path):
    data = synth_small.take(np.arange(3000))
    data.labels[:] = 0.0
    data.labels[:: 7] = 1.0
    va = data.take(np.arange(2000, 3000))
    va.labels[:] = 0.0  # one class: AUC undefined
    r = fit(data.take(np.arange(2000)), va, va, peers=["lr"], epochs=2, out=tmp_path / "run", progress=False)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())  # strict JSON: no NaN
    assert m["valid"]["lr"]["auc"] is None and m["valid"]["lr"]["logloss"] > 0
    assert m["train"]["selection_metric"] == "logloss"
    assert m["train"]["best_step"]["lr"] > 0
    assert r.metrics["test"]["ensemble"]["auc"] is None


def test_fused_sparse_adam_matches_dense_adam_auc(tmp_path):
    """The sparse (lazy) optimizer reaches the dense-Adam AUC within seed noise."""
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


def test_ids_from_the_caller_are_checked_at_the_api_boundary(synth_small):
    """Data built by hand (not by the reader) is checked once: a wild id is an error naming its
    field, never a silent out-of-bounds read in a kernel."""
    bad = synth_small.take(np.arange(2000))
    bad.meta = {}
    bad.sparse = bad.sparse.copy()
    bad.sparse[5, 20] = bad.field_offsets[21]  # one past the field's last row: the next field's
    with pytest.raises(ValueError, match=f"field {bad.field_names[20]} has ids"):
        fit(bad, peers=["lr"], epochs=1, progress=False, log=lambda *a: None)
    ok = synth_small.take(np.arange(2000))
    r = fit(ok, peers=["lr"], epochs=1, max_steps=2, progress=False, log=lambda *a: None)
    with pytest.raises(ValueError, match="has ids"):
        r.predictor.predict(bad)
