"""The fused engine against the plain one, step by step, on every backend (Triton under the
interpreter on the CPU, compiled on CUDA), and the engine protocol every engine follows."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICES, TRITON_CPU
from mlfast.io.batches import Batch
from mlfast.models import FeatureSchema, parse_peers
from mlfast.ops.backends import select_backends
from mlfast.train.baselines import TorchSparseEngine
from mlfast.train.config import TrainConfig
from mlfast.train.engine import Engine, build_group, make_engine
from mlfast.train.tables import DenseTables

SCHEMA = FeatureSchema((0, 37, 60, 101))  # 3 fields, odd sizes
PEERS = "deepfm:mlp=8-8,dropout=0,dcn:mlp=8,layers=2,dropout=0,lr"
SEEDS = [11, 12, 13]


def engine_for(kind: str, device, cfg: TrainConfig, kernels: str = "auto", schema=SCHEMA, lr: float = 1e-2):
    dev = torch.device(device)
    backends = select_backends(kernels, dev, cfg.deterministic) if kind == "fused" else None
    return make_engine(parse_peers(PEERS), schema, cfg, dev, SEEDS, lr=lr, engine=kind, backends=backends)


def batches(device, n=3, B=19, seed=1, ids_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.stack([torch.randint(a, b, (B,), generator=g)
                           for a, b in zip(SCHEMA.field_offsets, SCHEMA.field_offsets[1:])], 1)
        ids[0] = ids[1]  # repeated rows in a batch
        y = (torch.rand(B, generator=g) < 0.3).float()
        out.append(Batch(sparse=ids.to(ids_dtype).to(device), dense=None, labels=y.to(device), index=torch.arange(B)))
    return out


def tables_of(engine) -> list[torch.Tensor]:
    t = engine.group.tables
    if isinstance(t, DenseTables):
        return [w.detach().cpu().clone() for w in t.tables]
    return [t.peer_weight(p).cpu() for p in range(t.num_peers)]


def dense_of(engine) -> list[dict]:
    return engine.group.peer_states()


def kernel_choices(device: str) -> list[str]:
    return ["triton"] if device == "cuda" else ["numba", "reference"] + (["triton"] if TRITON_CPU else [])


def test_every_engine_follows_the_protocol():
    cfg = TrainConfig(peers=PEERS.split(","), progress=False)
    for kind in ("fused", "plain"):
        assert isinstance(engine_for(kind, "cpu", cfg), Engine)
    group = build_group(parse_peers(PEERS), SCHEMA, cfg, torch.device("cpu"), SEEDS, engine="plain")
    assert isinstance(TorchSparseEngine(group, cfg, torch.device("cpu"), 1e-3), Engine)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mutual, optimizer", [("kl", "sgd"), ("symkl", "sgd"), ("mse", "sgd"), ("kl", "adam"),
                                              ("kl", "adagrad")])
def test_fused_backends_agree_with_the_reference_backend(device, mutual, optimizer):
    """Every backend against the plain-PyTorch one, 3 steps. With SGD the step is linear in the
    gradients, so the backends' different summation orders stay at rounding level (fp32
    tolerance). Adam and Adagrad divide by the gradient's own magnitude: where a row's summed
    gradient is itself at rounding level (terms that cancel), a different order moves that row by a
    different fraction of one step, so those compare to a small fraction (1e-3) of the step size."""
    lr = 1e-2
    cfg = TrainConfig(peers=PEERS.split(","), sparse_optimizer=optimizer, embedding_l2=1e-3, mutual=mutual,
                      alpha=0.7, cuda_graph=False, progress=False)
    tol = dict(rtol=1e-5, atol=1e-6) if optimizer == "sgd" else dict(rtol=0, atol=1e-3 * lr)
    results = {}
    for kernels in kernel_choices(device) + ["reference"]:
        eng = engine_for("fused", device, cfg, kernels, lr=lr)
        eng.set_alpha(0.7)
        outs = [eng.train_step(b) for b in batches(device)]
        assert all(o.shape == (4,) for o in outs)  # total loss, then each of the 3 peers' BCE
        results[kernels] = ([float(o[0]) for o in outs], tables_of(eng), dense_of(eng))
    ref_losses, ref_tables, ref_dense = results["reference"]
    for kernels, (losses, tabs, dense) in results.items():
        assert losses == pytest.approx(ref_losses, rel=1e-5), kernels
        for a, b in zip(tabs, ref_tables):
            torch.testing.assert_close(a, b, **tol, msg=f"{kernels} table")
        for a, b in zip(dense, ref_dense):
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=f"{kernels} {k}")


@pytest.mark.parametrize("device", DEVICES)
def test_int32_ids_train_like_int64(device):
    cfg = TrainConfig(peers=PEERS.split(","), cuda_graph=False, progress=False)
    a, b = engine_for("fused", device, cfg), engine_for("fused", device, cfg)
    for e, dt in ((a, torch.int64), (b, torch.int32)):
        e.set_alpha(1.0)
        for bt in batches(device, ids_dtype=dt):
            e.train_step(bt)
    for x, y in zip(tables_of(a), tables_of(b)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_first_step_matches_plain_engine(device):
    """Same init, same batch: the fused engine computes the same loss as the plain reference step,
    updates the dense layers identically (both Adam) and changes only the looked-up table rows."""
    cfg = TrainConfig(peers=PEERS.split(","), embedding_l2=0.0, cuda_graph=False, progress=False)
    plain, fused = engine_for("plain", device, cfg, lr=1e-3), engine_for("fused", device, cfg, lr=1e-3)
    before = tables_of(fused)
    for a, b in zip(before, tables_of(plain)):
        assert torch.equal(a, b)  # both table kinds start from the same counter-based initialisation
    (b0,) = batches(device, n=1)
    for e in (plain, fused):
        e.set_alpha(1.0)
    lp, lf = plain.train_step(b0), fused.train_step(b0)
    torch.testing.assert_close(lf, lp, rtol=1e-5, atol=1e-6)
    touched = torch.zeros(SCHEMA.table_rows, dtype=torch.bool)
    touched[b0.sparse.reshape(-1).cpu()] = True
    for a, b, a0 in zip(tables_of(fused), tables_of(plain), before):
        assert torch.equal(a[~touched], a0[~touched])  # untouched rows
        # first Adam step: both move each touched entry by ~lr * sign(g)
        torch.testing.assert_close(a[touched], b[touched], rtol=0, atol=2e-5)
    for a, b in zip(dense_of(fused), dense_of(plain)):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)
    assert int(fused.group.tables.updated.sum()) == int(touched.sum()) == int(plain.group.tables.updated.sum())


def test_one_learning_rate_for_dense_layers_and_tables():
    cfg = TrainConfig(peers=PEERS.split(","), progress=False)
    eng = engine_for("fused", "cpu", cfg)
    eng.set_lr(0.25)
    assert float(eng.group.tables.state.lr) == 0.25
    assert all(float(g["lr"]) == 0.25 for g in eng.optimizer.param_groups)
    assert eng.group.tables.state.lr.data_ptr() == eng.lr.data_ptr()  # the same tensor, not a copy


# ---------------------------------------------------------------------------------------------
# Multi-hot bag fields: the fused engine's one lookup (one-hot + pooled bags, one optimizer step)
# against the plain tables' F.embedding + F.embedding_bag

BAG_SCHEMA = FeatureSchema((0, 37, 60, 101, 150, 171), num_bags=2)  # 3 one-hot fields, then 2 bags


def bag_batches(device, n=3, B=19, seed=1):
    g = torch.Generator().manual_seed(seed)
    offs = BAG_SCHEMA.field_offsets
    out = []
    for _ in range(n):
        ids = torch.stack([torch.randint(offs[f], offs[f + 1], (B,), generator=g) for f in range(3)], 1)
        bags = []
        for f in (3, 4):
            lengths = torch.randint(1, 5, (B,), generator=g)
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
            values = torch.randint(offs[f], offs[f + 1], (int(offsets[-1]),), generator=g)
            bags.append((offsets.to(device), values.to(device)))
        y = (torch.rand(B, generator=g) < 0.3).float()
        out.append(Batch(sparse=ids.to(device), dense=None, labels=y.to(device), index=torch.arange(B),
                         bags=tuple(bags)))
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_bag_fields_fused_backends_agree_and_first_step_matches_plain(device):
    cfg = TrainConfig(peers=PEERS.split(","), sparse_optimizer="adam", embedding_l2=0.0, cuda_graph=False,
                      progress=False)
    results = {}
    for kernels in kernel_choices(device) + ["reference"]:
        eng = engine_for("fused", device, cfg, kernels, schema=BAG_SCHEMA)
        eng.set_alpha(0.7)
        losses = [float(eng.train_step(b)[0]) for b in bag_batches(device)]
        assert eng.group.tables.step_count == 3
        results[kernels] = (losses, tables_of(eng), eng)
    ref_losses, ref_tables, ref_eng = results["reference"]
    for kernels, (losses, tabs, _) in results.items():
        assert losses == pytest.approx(ref_losses, rel=1e-5), kernels
        for a, b in zip(tabs, ref_tables):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"{kernels} table")
    # predictions read the same rows as training did: the fused group against plain tables holding its weights
    (b,) = bag_batches(device, n=1, seed=5)
    plain = engine_for("plain", device, cfg, schema=BAG_SCHEMA)
    with torch.no_grad():
        for p, w in enumerate(tables_of(ref_eng)):
            plain.group.tables.tables[p].copy_(w.to(device))
    for i, st in enumerate(ref_eng.group.peer_states()):
        plain.group.peers[i].load_state_dict(st)
    ref_eng.group.eval()
    plain.group.eval()
    with torch.no_grad():
        torch.testing.assert_close(ref_eng.group(b.sparse, None, b.bags), plain.group(b.sparse, None, b.bags),
                                   rtol=1e-5, atol=1e-6)
    # the first step of the plain engine computes the same loss
    plain = engine_for("plain", device, cfg, schema=BAG_SCHEMA)
    fused = engine_for("fused", device, cfg, schema=BAG_SCHEMA)
    (b,) = bag_batches(device, n=1)
    for e in (plain, fused):
        e.set_alpha(0.7)
    torch.testing.assert_close(fused.train_step(b), plain.train_step(b), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="bag fields"):
        plain.train_step(Batch(sparse=b.sparse, dense=None, labels=b.labels, index=b.index))


def test_guard_skips_a_bad_batch_without_touching_anything():
    cfg = TrainConfig(peers=PEERS.split(","), progress=False)
    for kind in ("fused", "plain"):
        eng = engine_for(kind, "cpu", cfg)
        eng.set_alpha(1.0)
        before, dense = tables_of(eng), dense_of(eng)
        (b,) = batches("cpu", n=1)
        out = eng.train_step(b, guard=1e-9)  # every real BCE exceeds this: the batch is "bad"
        assert out.shape == (4,)
        for x, y in zip(tables_of(eng), before):
            assert torch.equal(x, y), kind
        for a, d in zip(dense_of(eng), dense):
            for k in a:
                if "running" not in k and "num_batches" not in k:  # BatchNorm statistics move in forward
                    assert torch.equal(a[k], d[k]), (kind, k)


def test_one_peer_limit_for_every_backend():
    from mlfast.train.config import MAX_PEERS

    with pytest.raises(ValueError, match=f"at most {MAX_PEERS} peers"):
        TrainConfig(peers=["lr"] * (MAX_PEERS + 1))
    TrainConfig(peers=["lr"] * MAX_PEERS)
    if TRITON_CPU or torch.cuda.is_available():
        from mlfast.kernels.mutual_loss import MAX_PEERS as KERNEL_MAX

        assert MAX_PEERS <= KERNEL_MAX
