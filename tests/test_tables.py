"""PeerTables (mlfast.train.tables): one-hot + bag lookups with the fused backward on every backend
(Triton under the interpreter on the CPU, numba, plain PyTorch), against F.embedding /
F.embedding_bag + autograd + the reference sparse optimizer; initialisation, lazy rows, aligned
layout, snapshots and bounds checks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import TRITON_CPU, assert_close
from mlfast.ops.backends import select_backends
from mlfast.ops.embedding import TableLayout
from mlfast.ops.sparse_optim import SparseOptimConfig, SparseOptimState, sparse_update_reference
from mlfast.train.tables import DenseTables, PeerTables

WIDTHS = (17, 16, 5)
KERNELS = ["numba", "reference"] + (["triton"] if TRITON_CPU else [])


def tables(V, widths, cfg, kernels="reference", deterministic=True, seeds=None, **kw) -> PeerTables:
    return PeerTables(V, widths, optimizer=cfg, seeds=seeds or [7 + i for i in range(len(widths))],
                      backends=select_backends(kernels, "cpu", deterministic), **kw)


def _ids(gen, shape, V):
    """Random ids with repeats, the last row of the table, and row 0."""
    ids = torch.randint(0, V, shape, generator=gen)
    flat = ids.view(-1)
    flat[0] = V - 1
    if flat.numel() > 2:
        flat[1] = V - 1
        flat[-1] = 0
    return ids


def _bags(gen, B, V, max_len):
    """(offsets [B+1], values) with empty bags first, last and in the middle."""
    sizes = torch.randint(0, max_len + 1, (B,), generator=gen)
    sizes[0] = sizes[-1] = 0
    if B > 3:
        sizes[B // 2] = 0
        sizes[1] = max_len
    offsets = torch.zeros(B + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(sizes, 0)
    return offsets, _ids(gen, (int(offsets[-1]),), V)


def _loss(outs, gw):
    """A loss whose gradient differs per element (grad_output != 1) and per peer."""
    return sum((o * g).sum() for o, g in zip(outs, gw))


def packed(t: PeerTables) -> torch.Tensor:
    return torch.cat([t.peer_weight(p) for p in range(t.num_peers)], 1)


@pytest.mark.parametrize("kernels", KERNELS + (["triton-atomic"] if TRITON_CPU else []))
@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_fields_train_like_embedding_embedding_bag_and_the_reference_optimizer(gen, kernels, kind):
    """[B, F + S, W] = one-hot rows then each bag field's mean row, and ONE optimizer step over every
    touched row (one-hot and bag members together, repeats summed), as F.embedding + F.embedding_bag
    on dense parameters, autograd and the reference sparse optimizer on the packed table."""
    V, B, F_, S = 70, 9, 3, 2
    cfg = SparseOptimConfig(kind, lr=0.05, weight_decay=1e-3)
    name, _, path = kernels.partition("-")
    t = tables(V, WIDTHS, cfg, name, deterministic=path != "atomic")
    table = packed(t).clone()
    state = SparseOptimState.create(table, cfg, WIDTHS)
    for step in range(3):
        ids = _ids(gen, (B, F_), V)
        ids[1] = ids[0]  # repeated one-hot rows
        bags = [_bags(gen, B, V, max_len=6) for _ in range(S)]
        bags[1][1][:2] = ids[0, 0]  # a row that is both a one-hot id and a bag member
        gw = [torch.randn(B, F_ + S, w, generator=gen) for w in WIDTHS]
        outs = t(ids, bags)
        params = [torch.nn.Parameter(x.clone()) for x in table.split(WIDTHS, 1)]
        ref = [torch.cat([F.embedding(ids, p), torch.stack(
            [F.embedding_bag(v, p, o, mode="mean", include_last_offset=True) for o, v in bags], 1)], 1)
            for p in params]
        grads = torch.autograd.grad(_loss(ref, gw), params)
        touched = torch.unique(torch.cat([ids.reshape(-1), *(v for _, v in bags)]))
        sparse_update_reference(table, touched, torch.cat([g[touched] for g in grads], 1), state, cfg)
        for o, r in zip(outs, ref):
            assert o.shape == (B, F_ + S, o.shape[-1])
            assert_close(o, r.detach())
        _loss(outs, gw).backward()
        assert_close(packed(t), table, msg=f"step {step}")
        if step == 1:  # the learning rate is read on the device at every step
            t.set_lr(0.02)
            cfg = SparseOptimConfig(kind, lr=0.02, weight_decay=1e-3)
    assert t.step_count == state.step == 3  # one step per lookup, not one per field
    assert int(t.updated.sum()) == int((packed(t) != packed(tables(V, WIDTHS, cfg))).any(1).sum())


def test_unused_peer_no_grad_lookup_and_pad_columns(gen):
    """A peer whose output gets no gradient still has its touched rows moved as by a zero gradient
    (weight decay); a lookup without gradients changes nothing; padding columns never change."""
    cfg = SparseOptimConfig("adam", lr=0.1, weight_decay=0.01)
    t = tables(64, (17, 16), cfg, "numba")
    assert t.layout == TableLayout((17, 16), (0, 20), 36)
    ids = _ids(gen, (5, 7), 64)
    with torch.no_grad():
        t(ids)
    before = t.weight.clone()
    t(ids)  # no backward: nothing happens either
    assert torch.equal(t.weight, before) and t.step_count == 0
    a, _ = t(ids)
    (3.0 * a.sum()).backward()
    moved = (t.weight != before).any(1)
    assert moved.nonzero().flatten().tolist() == torch.unique(ids).tolist()
    assert not torch.equal(t.weight[:, 20:36], before[:, 20:36])  # decay moved the unused peer's rows
    assert torch.count_nonzero(t.weight[:, 17:20]) == 0  # padding: never written


def test_initial_values_are_a_function_of_seed_row_and_column():
    """A peer's table is the same in any group and in either table kind; lazy rows (the CPU
    default) equal eagerly initialised ones once looked up, and cost nothing before."""
    big = PeerTables(500, (17, 16, 5), seeds=[1, 2, 3])
    solo = PeerTables(500, (16,), seeds=[2], lazy=False)
    dense = DenseTables(500, (5, 17), seeds=[3, 1])
    assert torch.equal(big.peer_weight(1), solo.peer_weight(0))
    assert torch.equal(big.peer_weight(0), dense.tables[1].detach())
    assert torch.equal(big.peer_weight(2), dense.tables[0].detach())
    w = big.peer_weight(0)
    assert abs(float(w.std()) - 1e-4) < 1e-5 and abs(float(w.mean())) < 2e-6
    lazy = PeerTables(500, (17, 16), seeds=[1, 2])
    assert torch.count_nonzero(lazy.weight) == 0  # nothing materialised yet
    with torch.no_grad():
        out = lazy(torch.tensor([[3, 499]]))
    assert torch.equal(out[0][0, 1], big.peer_weight(0)[499])
    assert torch.count_nonzero(lazy.weight.any(1)) == 2  # only the two rows looked up


@pytest.mark.parametrize("kernels", KERNELS)
def test_snapshot_restore_is_exact_and_compact(gen, kernels):
    V = 300
    cfg = SparseOptimConfig("adam", lr=0.05, weight_decay=1e-3)
    batches = [(_ids(gen, (4, 9), V), [torch.randn(4, 9, w, generator=gen) for w in WIDTHS]) for _ in range(4)]

    def train(t, bs):
        for ids, gw in bs:
            _loss(t(ids), gw).backward()

    a = tables(V, WIDTHS, cfg, kernels)
    train(a, batches[:2])
    snap = a.snapshot(optimizer_state=True)
    assert snap["rows"].numel() == int(a.updated.sum()) < V // 2  # only the rows updates touched
    assert snap["weight"].shape == (snap["rows"].numel(), a.layout.row_width)
    b = tables(V, WIDTHS, cfg, kernels)
    train(b, batches[2:])  # different rows and state first: the restore must clear them
    b.restore(snap)
    assert b.step_count == 2 and torch.equal(b.updated, a.updated)
    eager = tables(V, WIDTHS, cfg, kernels, lazy=False)
    eager.restore(snap)
    for t in (a, b, eager):
        train(t, batches[2:])
    for t in (b, eager):
        assert torch.equal(packed(a), packed(t))
        for k, x in a.state.tensors().items():
            assert torch.equal(x[a.updated], t.state.tensors()[k][t.updated]), k
    with pytest.raises(ValueError, match="seeds"):
        tables(V, WIDTHS, cfg, kernels, seeds=[1, 2, 3]).restore(snap)


def test_peer_snapshots_and_a_solo_peer_into_a_group(gen):
    """Best-state bookkeeping: one peer's columns come back from its own snapshot (rows it touched
    later return to their initial values); a solo run's table becomes one peer of a group."""
    V, cfg = 200, SparseOptimConfig("sgd", lr=0.5)
    t = tables(V, (17, 16), cfg)
    fresh = packed(tables(V, (17, 16), cfg))
    _loss(t(_ids(gen, (3, 4), V)), [torch.randn(3, 4, w, generator=gen) for w in (17, 16)]).backward()
    best0 = t.snapshot(peers=[0])
    at_best = t.peer_weight(0)
    _loss(t(_ids(gen, (3, 4), V)), [torch.randn(3, 4, w, generator=gen) for w in (17, 16)]).backward()
    dcn_now = t.peer_weight(1)
    t.restore(best0, peers=[0])
    assert torch.equal(t.peer_weight(0), at_best) and torch.equal(t.peer_weight(1), dcn_now)
    solo = tables(V, (16,), cfg, seeds=[8])
    _loss(solo(_ids(gen, (5, 4), V)), [torch.randn(5, 4, 16, generator=gen)]).backward()
    group = tables(V, (17, 16), cfg)
    group.restore_peer(1, solo.snapshot(), 0)
    assert torch.equal(group.peer_weight(1), solo.peer_weight(0))
    assert torch.equal(group.peer_weight(0), fresh[:, :17])
    with pytest.raises(ValueError, match="seed"):
        group.restore_peer(0, tables(V, (17,), cfg, seeds=[99]).snapshot(), 0)


@pytest.mark.parametrize("kernels", KERNELS)
def test_bounds_checked_mode(kernels):
    cfg = SparseOptimConfig("sgd", lr=0.1)
    t = tables(50, (17, 16), cfg, kernels, bounds_check=True)
    with pytest.raises(IndexError, match="50"):
        t(torch.tensor([[1, 50]]))
    with pytest.raises(IndexError):
        t(torch.tensor([[1, 2]]), [(torch.tensor([0, 1, 2]), torch.tensor([3, -1]))])
    assert t.step_count == 0


def test_inference_tables_have_no_optimizer_state():
    t = PeerTables(100, (17, 16), seeds=[1, 2])
    assert t.state is None and "exp_avg" not in dict(t.named_buffers())
    out = t(torch.tensor([[1, 2]]))
    assert not out[0].requires_grad
