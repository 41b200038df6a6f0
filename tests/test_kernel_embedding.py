"""The fused interleaved lookups (mlfast.kernels.embedding_bag) and PeerTables against plain torch.

Forward lookups are compared with ``F.embedding`` on each peer's own table and bags with
``nn.EmbeddingBag``; ``PeerTables`` (lookup + fused backward) with the ``cpu`` and ``reference``
backends. Runs on CPU tensors through Triton's interpreter (conftest sets TRITON_INTERPRET=1 where
there is no GPU) and on CUDA when present.
"""
from __future__ import annotations

import mmap
import os
import sys

import torch

if not torch.cuda.is_available():  # before triton is imported (conftest does it first in pytest)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402
from conftest import assert_close  # noqa: E402

from mlfast.kernels.embedding_bag import (  # noqa: E402
    embedding_bag_forward, embedding_forward, embedding_forward_tables, peer_offsets)
from mlfast.train.tables import PeerTables  # noqa: E402
from mlfast.ops.sparse_optim import SparseOptimConfig, SparseOptimState, sparse_update_reference  # noqa: E402

WIDTH_SETS = [(17, 16), (16,), (17, 16, 5, 9), (3, 64, 1)]


@pytest.fixture
def device(kernel_device) -> torch.device:
    return kernel_device


def _ids(gen, shape, V):
    """Random ids with repeats, the last row of the table, and row 0."""
    ids = torch.randint(0, V, shape, generator=gen)
    flat = ids.view(-1)
    flat[0] = V - 1
    if flat.numel() > 2:
        flat[1] = V - 1
        flat[-1] = 0
    return ids


def _split(weight, widths):
    return [weight[:, o:o + w] for o, w in zip(peer_offsets(widths), widths)]


# ---------------------------------------------------------------------------------------------
# One-hot forward

@pytest.mark.parametrize("widths", WIDTH_SETS)
@pytest.mark.parametrize("B,F_", [(1, 1), (7, 39), (41, 3)])
def test_forward_matches_per_peer_embedding(device, gen, widths, B, F_):
    V = 257
    weight = torch.randn(V, sum(widths), generator=gen).to(device)
    ids = _ids(gen, (B, F_), V).to(device)
    outs = embedding_forward(weight, ids, widths)
    assert len(outs) == len(widths)
    for out, table, w in zip(outs, _split(weight, widths), widths):
        assert out.shape == (B, F_, w) and out.is_contiguous() and out.dtype == torch.float32
        torch.testing.assert_close(out, F.embedding(ids, table), rtol=0, atol=0)  # a copy: exact


def test_forward_bf16_output_and_int32_ids(device, gen):
    widths, V = (17, 16), 300
    weight = torch.randn(V, 33, generator=gen).to(device)
    ids = _ids(gen, (13, 39), V).to(device)
    outs = embedding_forward(weight, ids.int(), widths, out_dtype=torch.bfloat16)
    for out, table in zip(outs, _split(weight, widths)):
        assert out.dtype == torch.bfloat16
        assert_close(out, F.embedding(ids, table))


def test_separate_tables_equal_interleaved(device, gen):
    widths, V = (17, 16, 5), 99
    weight = torch.randn(V, sum(widths), generator=gen).to(device)
    ids = _ids(gen, (9, 11), V).to(device)
    inter = embedding_forward(weight, ids, widths)
    sep = embedding_forward_tables([t.contiguous() for t in _split(weight, widths)], ids)
    for a, b in zip(inter, sep):
        assert torch.equal(a, b)


def test_forward_empty_batch(device):
    outs = embedding_forward(torch.zeros(5, 33, device=device), torch.zeros(0, 39, dtype=torch.long, device=device),
                             (17, 16))
    assert [tuple(o.shape) for o in outs] == [(0, 39, 17), (0, 39, 16)]


def test_forward_rejects_bad_layouts(device):
    w = torch.zeros(5, 33, device=device)
    ids = torch.zeros(2, 3, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="add up to 32"):
        embedding_forward(w, ids, (16, 16))
    with pytest.raises(ValueError, match="contiguous"):
        embedding_forward(w.t(), ids, (3, 2))
    with pytest.raises(ValueError, match="int64"):
        embedding_forward(w, ids.float(), (17, 16))


# ---------------------------------------------------------------------------------------------
# Multi-hot bags

def _bags(gen, n_bags, V, max_len):
    """Random bag sizes in [0, max_len] (empty bags first, last and in the middle)."""
    sizes = torch.randint(0, max_len + 1, (n_bags,), generator=gen)
    sizes[0] = 0
    sizes[-1] = 0
    if n_bags > 3:
        sizes[n_bags // 2] = 0
        sizes[1] = max_len
    offsets = torch.zeros(n_bags + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(sizes, 0)
    indices = _ids(gen, (int(offsets[-1]),), V)
    return indices, offsets


@pytest.mark.parametrize("widths", [(17, 16), (3, 64, 1)])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_bag_forward_matches_embedding_bag(device, gen, widths, mode, weighted):
    V, n_bags = 211, 23
    weight = torch.randn(V, sum(widths), generator=gen)
    indices, offsets = _bags(gen, n_bags, V, max_len=37)  # 37 > BAG_CHUNK: several chunks per bag
    psw = torch.rand(indices.numel(), generator=gen) * 2 - 0.5 if weighted else None
    outs = embedding_bag_forward(weight.to(device), indices.to(device), offsets.to(device), widths,
                                 per_sample_weights=None if psw is None else psw.to(device), mode=mode)
    for out, table, w in zip(outs, _split(weight, widths), widths):
        bag = torch.nn.EmbeddingBag.from_pretrained(table.contiguous(), mode=mode, include_last_offset=True)
        ref = bag(indices, offsets, per_sample_weights=psw)
        assert out.shape == (n_bags, w)
        assert_close(out, ref)
        assert torch.count_nonzero(out[0]) == 0 and torch.count_nonzero(out[-1]) == 0  # empty bags


def test_bag_forward_bf16_and_all_empty(device, gen):
    weight = torch.randn(50, 33, generator=gen)
    indices, offsets = _bags(gen, 9, 50, max_len=5)
    a, b = embedding_bag_forward(weight.to(device), indices.to(device), offsets.to(device), (17, 16),
                                 out_dtype=torch.bfloat16)
    ref = torch.nn.EmbeddingBag.from_pretrained(weight, mode="sum", include_last_offset=True)(indices, offsets)
    assert a.dtype == torch.bfloat16
    assert_close(torch.cat([a, b], 1), ref)
    empty = embedding_bag_forward(weight.to(device), torch.zeros(0, dtype=torch.long, device=device),
                                  torch.zeros(4, dtype=torch.long, device=device), (17, 16), mode="mean")
    assert all(torch.count_nonzero(e) == 0 and e.shape[0] == 3 for e in empty)


def test_bag_forward_rejects_weights_with_mean(device):
    w = torch.zeros(5, 33, device=device)
    idx, off = torch.zeros(3, dtype=torch.long, device=device), torch.tensor([0, 3], device=device)
    with pytest.raises(ValueError, match="mode='sum'"):
        embedding_bag_forward(w, idx, off, (17, 16), per_sample_weights=torch.ones(3, device=device), mode="mean")


# ---------------------------------------------------------------------------------------------
# Index arithmetic past 2^31
#
# A table whose element offsets pass 2^31 needs > 8 GiB. On the CPU the table is an anonymous
# MAP_NORESERVE mapping: the kernel sees a real [V, Wtot] tensor, but only the pages of the rows
# written below ever get memory (the rest read as zeros), so the test costs a few MiB. Rows are
# taken on both sides of row * Wtot = 2^31 and 2^32 and at the table end: with 32-bit offsets
# they would wrap to other rows or into an unused guard region and the comparison would fail. On CUDA
# the table is allocated for real when the GPU has room.

def huge_table(rows: int, width: int, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """A [rows, width] tensor whose untouched parts cost no memory (CPU) or a real one (CUDA)."""
    nbytes = rows * width * torch.empty(0, dtype=dtype).element_size()
    if device.type == "cuda":
        if torch.cuda.mem_get_info(device)[0] < nbytes + (2 << 30):
            pytest.skip(f"needs {(nbytes >> 30) + 2} GiB of free GPU memory per table")
        return torch.empty(rows, width, dtype=dtype, device=device)
    if not hasattr(mmap, "MAP_ANONYMOUS"):
        pytest.skip("needs anonymous mmap")
    # MAP_NORESERVE (Python exposes it from 3.13; 0x4000 on Linux): no swap is reserved, so the
    # mapping may exceed the machine's memory
    noreserve = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | noreserve
    # 8 GiB of unused mapping in front: an offset that wrapped to a negative int32 reads zeros
    # there and fails the comparison, instead of crashing the test process.
    guard = 2**31 * 4
    buf = mmap.mmap(-1, guard + nbytes, flags=flags)
    return torch.frombuffer(buf, dtype=dtype, offset=guard).view(rows, width)


def rows_past_2_31(width: int) -> tuple[int, torch.Tensor]:
    """(table rows, interesting row ids) for a table of ``width`` columns."""
    b31, b32 = 2**31 // width, 2**32 // width
    V = b32 + 50
    rows = torch.cat([torch.arange(b31 - 3, b31 + 4), torch.arange(b32 - 3, b32 + 4), torch.tensor([V - 1])])
    return V, rows


def test_forward_index_arithmetic_past_2_31(device, gen):
    widths = (17, 16)
    V, rows = rows_past_2_31(33)
    weight = huge_table(V, 33, device)
    vals = torch.randn(rows.numel(), 33, generator=gen).to(device)
    weight[rows.to(device)] = vals
    assert (V - 1) * 33 > 2**32
    perm = torch.randperm(rows.numel(), generator=gen)
    ids = rows[perm].repeat(4).view(4, -1).to(device)
    a, b = embedding_forward(weight, ids, widths)
    expect = vals[perm.to(device)].repeat(4, 1).view(4, -1, 33)
    assert torch.equal(a, expect[..., :17]) and torch.equal(b, expect[..., 17:])
    idx = ids.reshape(-1)
    off = torch.arange(0, idx.numel() + 1, 2, device=device)
    pooled = embedding_bag_forward(weight, idx, off, widths)
    ref = expect.reshape(-1, 2, 33).sum(1)
    assert_close(torch.cat(pooled, 1), ref)


# ---------------------------------------------------------------------------------------------
# PeerTables: lookup + fused backward through autograd

def _loss(outs, gen_weights):
    """A loss whose gradient differs per element (grad_output != 1) and per peer."""
    return sum((o * gw).sum() for o, gw in zip(outs, gen_weights))


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("deterministic", [True, False])
def test_peer_tables_train_like_reference(device, gen, kind, deterministic):
    widths, V, B, F_ = (17, 16, 5), 120, 6, 13
    peers = [torch.randn(V, w, generator=gen) * 0.1 for w in widths]
    cfg = SparseOptimConfig(kind, lr=0.05, weight_decay=1e-3)
    fused = PeerTables.from_peer_weights([p.to(device) for p in peers], cfg, labels=("deepfm", "dcn", "lr"),
                                         backend="triton", deterministic=deterministic)
    ref = PeerTables.from_peer_weights(peers, cfg, backend="reference")
    for step in range(3):
        ids = _ids(gen, (B, F_), V)
        gw = [torch.randn(B, F_, w, generator=gen) for w in widths]
        _loss(fused.lookup(ids.to(device)), [g.to(device) for g in gw]).backward()
        _loss(ref.lookup(ids), gw).backward()
        if step == 1:
            fused.set_lr(0.02)
            ref.set_lr(0.02)
    assert fused.step_count == ref.step_count == 3
    assert_close(fused.weight, ref.weight)
    for p, label in enumerate(fused.labels):
        assert_close(fused.peer_weight(label), ref.peer_weight(p))


def test_peer_tables_unused_peer_and_no_grad_lookup(device, gen):
    """A peer whose output gets no gradient still has its touched rows decayed/moved like a zero
    gradient (the reference semantics); a lookup without gradients changes nothing."""
    widths, V = (17, 16), 64
    peers = [torch.randn(V, w, generator=gen) for w in widths]
    cfg = SparseOptimConfig("adam", lr=0.1, weight_decay=0.01)
    fused = PeerTables.from_peer_weights([p.to(device) for p in peers], cfg)
    fused_tr = PeerTables.from_peer_weights([p.to(device) for p in peers], cfg, backend="triton")
    ref = PeerTables.from_peer_weights(peers, cfg, backend="reference")
    ids = _ids(gen, (5, 7), V)
    before = fused.weight.clone()
    with torch.no_grad():
        fused.lookup(ids.to(device))
    fused.lookup(ids.to(device), requires_grad=False)
    assert torch.equal(fused.weight, before) and fused.step_count == 0
    for t, i in ((fused_tr, ids.to(device)), (ref, ids)):
        a, _ = t.lookup(i)
        (3.0 * a.sum()).backward()
    assert_close(fused_tr.weight, ref.weight)
    assert not torch.equal(ref.weight[:, 17:], torch.cat(peers, 1)[:, 17:])  # decay moved the dcn rows


def test_peer_tables_checkpoint_round_trip(device, gen):
    widths, V = (17, 16), 200
    cfg = SparseOptimConfig("adam", lr=0.05)
    a = PeerTables.create(V, widths, cfg, device=device, generator=gen, backend="triton")
    batches = [(_ids(gen, (4, 9), V), [torch.randn(4, 9, w, generator=gen) for w in widths]) for _ in range(4)]

    def train(t, bs):
        for ids, gw in bs:
            _loss(t.lookup(ids.to(device)), [g.to(device) for g in gw]).backward()

    train(a, batches[:2])
    def snapshot(v):
        if isinstance(v, dict):
            return {k: snapshot(x) for k, x in v.items()}
        return v.clone() if isinstance(v, torch.Tensor) else v

    sd = snapshot(a.state_dict())
    # what the trainer's checkpoint holds: no weight (the peers' weights are stored already), and
    # only the rows with state (72 lookups touch under half of the 200 rows)
    compact = snapshot(a.state_dict(weight=False, compact=True))
    assert "weight" not in compact and isinstance(compact["exp_avg_sq"], dict)
    assert compact["exp_avg"]["rows"].numel() < V // 2
    peer_weights = [a.peer_weight(p).clone() for p in range(2)]
    b = PeerTables.create(V, widths, cfg, device=device, backend="triton")
    b.load_state_dict(sd)
    assert b.step_count == 2
    c = PeerTables.create(V, widths, cfg, device=device, backend="triton")
    c.state.exp_avg.fill_(7.0)  # stale state must be cleared, not kept, in rows the checkpoint omits
    for p, w in enumerate(peer_weights):
        c.set_peer_weight(p, w)
    c.load_state_dict(compact)
    train(a, batches[2:])
    train(b, batches[2:])
    train(c, batches[2:])
    for t in (b, c):
        assert torch.equal(a.weight, t.weight)
        assert torch.equal(a.state.exp_avg, t.state.exp_avg)
        assert torch.equal(a.state.exp_avg_sq, t.state.exp_avg_sq)
    # per-model tables in and out
    b.set_peer_weight("peer1", torch.zeros(V, 16, device=device))
    assert torch.count_nonzero(b.peer_weight(1)) == 0 and torch.equal(b.peer_weight(0), a.peer_weight(0))
    with pytest.raises(ValueError, match="widths"):
        PeerTables.create(V, (16, 16), cfg, device=device).load_state_dict(sd)
    with pytest.raises(ValueError, match="must be"):
        b.set_peer_weight(0, torch.zeros(V, 16, device=device))


# ---------------------------------------------------------------------------------------------
# PeerTables bags: pooled lookup + fused backward, against nn.functional.embedding_bag + autograd

def _reference_bag_step(table, widths, indices, offsets, psw, mode, gw, state, cfg):
    """One step the plain way: per-peer ``F.embedding_bag`` on dense parameters, autograd's dense
    table gradient, then the reference sparse optimizer on the touched rows."""
    params = [torch.nn.Parameter(t.clone()) for t in _split(table, widths)]
    outs = [F.embedding_bag(indices, p, offsets, mode=mode, per_sample_weights=psw,
                                              include_last_offset=True) for p in params]
    grads = torch.autograd.grad(_loss(outs, gw), params)
    touched = torch.unique(indices)
    sparse_update_reference(table, touched, torch.cat([g[touched] for g in grads], 1), state, cfg)
    return outs


@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_peer_tables_bags_train_like_embedding_bag(device, gen, backend, kind, mode, weighted):
    if backend == "cpu" and device.type != "cpu":
        pytest.skip("the numba backend runs on CPU tensors")
    widths, V, n_bags = (17, 16, 5), 90, 11
    peers = [torch.randn(V, w, generator=gen) * 0.1 for w in widths]
    cfg = SparseOptimConfig(kind, lr=0.05, weight_decay=1e-3)
    fused = PeerTables.from_peer_weights([p.to(device) for p in peers], cfg, backend=backend)
    table = torch.cat(peers, 1).contiguous()
    state = SparseOptimState.create(table, cfg, widths)
    for step in range(3):
        indices, offsets = _bags(gen, n_bags, V, max_len=20)  # repeats, empty bags, > BAG_CHUNK members
        psw = torch.rand(indices.numel(), generator=gen) * 2 - 0.5 if weighted else None
        gw = [torch.randn(n_bags, w, generator=gen) for w in widths]
        outs = fused.lookup_bags(indices.to(device), offsets.to(device),
                                 None if psw is None else psw.to(device), mode=mode)
        ref_outs = _reference_bag_step(table, widths, indices, offsets, psw, mode, gw, state, cfg)
        for o, r in zip(outs, ref_outs):
            assert_close(o, r.detach())
        _loss(outs, [g.to(device) for g in gw]).backward()
        assert_close(fused.weight, table, msg=f"step {step}")
    assert fused.step_count == state.step == 3
    assert not torch.equal(table, torch.cat(peers, 1))


def test_peer_tables_bags_unused_peer_no_grad_and_empty(device, gen):
    widths, V = (17, 16), 40
    peers = [torch.randn(V, w, generator=gen) for w in widths]
    cfg = SparseOptimConfig("adam", lr=0.1)
    t = PeerTables.from_peer_weights([p.to(device) for p in peers], cfg, backend="triton")
    indices, offsets = _bags(gen, 6, V, max_len=4)
    before = t.weight.clone()
    a, b = t.lookup_bags(indices.to(device), offsets.to(device), requires_grad=False)
    assert torch.equal(t.weight, before) and t.step_count == 0 and a.shape == (6, 17)
    a, _ = t.lookup_bags(indices.to(device), offsets.to(device))
    (2.0 * a.sum()).backward()  # dcn's output unused: its member rows see a zero gradient
    touched = torch.unique(indices).to(device)
    moved = (t.weight != before).any(1)
    assert moved.nonzero().flatten().tolist() == touched.tolist()  # exactly the member rows moved
    assert torch.equal(t.weight[:, 17:], before[:, 17:])  # adam with zero gradient and no decay: no move
    e = t.lookup_bags(torch.zeros(0, dtype=torch.long, device=device),
                      torch.zeros(4, dtype=torch.long, device=device), mode="mean")
    assert [x.shape for x in e] == [(3, 17), (3, 16)] and all(torch.count_nonzero(x) == 0 for x in e)
    sum(x.sum() for x in e).backward()
    assert t.step_count == 2  # an all-empty batch is still one optimizer step
    with pytest.raises(ValueError, match="mode='sum'"):
        t.lookup_bags(indices.to(device), offsets.to(device), torch.ones(indices.numel(), device=device), mode="mean")


# ---------------------------------------------------------------------------------------------
# PeerTables one-hot + bag fields together: what a model with multi-hot fields reads

@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_peer_tables_fields_train_like_embedding_and_embedding_bag(device, gen, backend, kind):
    """[B, F + S, W] = one-hot rows then each bag field's mean row, and ONE optimizer step over
    every touched row (one-hot and bag members together, repeats summed), as F.embedding +
    F.embedding_bag on dense parameters, autograd and the reference sparse optimizer."""
    if backend == "cpu" and device.type != "cpu":
        pytest.skip("the numba backend runs on CPU tensors")
    widths, V, B, F_, S = (17, 16), 70, 9, 3, 2
    peers = [torch.randn(V, w, generator=gen) * 0.1 for w in widths]
    cfg = SparseOptimConfig(kind, lr=0.05, weight_decay=1e-3)
    fused = PeerTables.from_peer_weights([p.to(device) for p in peers], cfg, backend=backend)
    table = torch.cat(peers, 1).contiguous()
    state = SparseOptimState.create(table, cfg, widths)
    for step in range(3):
        ids = _ids(gen, (B, F_), V)
        ids[1] = ids[0]  # repeated one-hot rows
        bags = [_bags(gen, B, V, max_len=6)[::-1] for _ in range(S)]  # (offsets, values) per field
        bags[1][1][:2] = ids[0, 0]  # a row that is both a one-hot id and a bag member
        gw = [torch.randn(B, F_ + S, w, generator=gen) for w in widths]
        outs = fused.lookup_fields(ids.to(device), [(o.to(device), v.to(device)) for o, v in bags])
        params = [torch.nn.Parameter(t.clone()) for t in _split(table, widths)]
        ref = [torch.cat([F.embedding(ids, p), torch.stack(
            [F.embedding_bag(v, p, o, mode="mean", include_last_offset=True) for o, v in bags], 1)], 1)
            for p in params]
        grads = torch.autograd.grad(_loss(ref, gw), params)
        touched = torch.unique(torch.cat([ids.reshape(-1), *(v for _, v in bags)]))
        sparse_update_reference(table, touched, torch.cat([g[touched] for g in grads], 1), state, cfg)
        for o, r in zip(outs, ref):
            assert o.shape == (B, F_ + S, o.shape[-1])
            assert_close(o, r.detach())
        _loss(outs, [g.to(device) for g in gw]).backward()
        assert_close(fused.weight, table, msg=f"step {step}")
    assert fused.step_count == state.step == 3  # one step per lookup, not one per field
    no_grad = fused.lookup_fields(ids.to(device), [(o.to(device), v.to(device)) for o, v in bags],
                                  requires_grad=False)
    assert fused.step_count == 3 and no_grad[0].shape == (B, F_ + S, 17)
    with pytest.raises(ValueError, match="offsets"):
        fused.lookup_fields(ids.to(device), [(bags[0][0][:-1].to(device), bags[0][1].to(device))])
