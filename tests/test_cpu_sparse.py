"""The numba sparse optimizers (mlfast.ops.cpu_sparse) against sparse_update_reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_close

from mlfast.ops.cpu_sparse import row_offset, sparse_update, warmup
from mlfast.ops.sparse_optim import SparseOptimConfig, SparseOptimState, sparse_update_reference

KINDS = ("sgd", "adagrad", "adam")
STATE_KEYS = ("sum_sq", "exp_avg", "exp_avg_sq")


def _pair(V, segments, cfg, gen):
    """Two identical (weight, state) pairs: one for the numba path, one for the reference."""
    w = torch.randn(V, sum(segments), generator=gen)
    a, b = w.clone(), w.clone()
    return (a, SparseOptimState.create(a, cfg, segments)), (b, SparseOptimState.create(b, cfg, segments))


def _assert_same(fast, ref, rtol=None):
    """fp32 tolerance from conftest, or ``rtol`` (= atol) where summation order matters more."""
    (wf, sf), (wr, sr) = fast, ref
    assert sf.step == sr.step
    pairs = [("weight", wf, wr)] + [(k, getattr(sf, k), getattr(sr, k)) for k in STATE_KEYS
                                     if getattr(sr, k) is not None]
    for name, a, b in pairs:
        if rtol is None:
            assert_close(a, b, msg=name)
        else:
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol, msg=name)


def _batch(gen, V, N, W):
    ids = torch.randint(0, V, (N,), generator=gen)
    ids[:3] = V - 1  # the table's last row, repeated
    ids[3] = 0
    return ids, torch.randn(N, W, generator=gen)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("segments", [(17, 16), (8,), (1, 3, 2)])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_matches_reference_over_several_steps(gen, kind, segments, weight_decay):
    # V well below N: most rows repeat within a step, and rows reappear across steps with state.
    cfg = SparseOptimConfig(kind, lr=0.05, weight_decay=weight_decay)
    V = int(torch.randint(50, 400, (), generator=gen))
    fast, ref = _pair(V, segments, cfg, gen)
    for _ in range(3):
        ids, grads = _batch(gen, V, 1000, sum(segments))
        sparse_update(*fast[:1], ids, grads, fast[1], cfg)
        sparse_update_reference(*ref[:1], ids, grads, ref[1], cfg)
        _assert_same(fast, ref)
    assert fast[1].step == 3


@pytest.mark.parametrize("kind", KINDS)
def test_empty_ids_only_count_the_step(gen, kind):
    cfg = SparseOptimConfig(kind)
    fast, ref = _pair(30, (5, 4), cfg, gen)
    w_before = fast[0].clone()
    for _ in range(2):
        sparse_update(fast[0], torch.empty(0, dtype=torch.long), torch.empty(0, 9), fast[1], cfg)
        sparse_update_reference(ref[0], torch.empty(0, dtype=torch.long), torch.empty(0, 9), ref[1], cfg)
    assert fast[1].step == 2
    assert torch.equal(fast[0], w_before)
    # An empty step still advances Adam's bias correction for the next real step.
    ids, grads = _batch(gen, 30, 50, 9)
    sparse_update(fast[0], ids, grads, fast[1], cfg)
    sparse_update_reference(ref[0], ids, grads, ref[1], cfg)
    _assert_same(fast, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_one_row_repeated_and_one_row_block(gen, kind):
    # Every id in one 16-row block: a single thread owns the whole step (buffer sizing), and one
    # row hit 500 times sums 500 gradients.
    cfg = SparseOptimConfig(kind, lr=0.01, weight_decay=1e-3)
    fast, ref = _pair(100, (7, 6), cfg, gen)
    ids = torch.cat([torch.full((500,), 37), torch.randint(32, 48, (300,), generator=gen)])
    grads = torch.randn(800, 13, generator=gen)
    sparse_update(fast[0], ids, grads, fast[1], cfg)
    sparse_update_reference(ref[0], ids, grads, ref[1], cfg)
    # Both sides add ~530 fp32 gradients of row 37, in different orders (torch's index_add_ is
    # vectorized): their rounding differs by ~sqrt(530) ulps, past the 1e-5 of a single rounding.
    _assert_same(fast, ref, rtol=1e-4)


def test_bitwise_identical_across_thread_counts(gen):
    """Rows are dealt to chunks by owner; each row's gradients are summed in increasing n whatever
    the chunk count, so 1, 2, 3 and 7 chunks (threads) give the same bits."""
    cfg = SparseOptimConfig("adam", lr=0.01)
    V = 5000
    w0 = torch.randn(V, 33, generator=gen)
    ids, grads = _batch(gen, V, 20000, 33)
    results = []
    for threads in (1, 2, 3, 7):
        w = w0.clone()
        st = SparseOptimState.create(w, cfg, (17, 16))
        sparse_update(w, ids, grads, st, cfg, threads=threads)
        results.append((w, st.exp_avg, st.exp_avg_sq))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_aligned_rows_match_the_reference_and_keep_padding(gen):
    """A row layout with padding (each peer on a 4-float boundary): the same numbers as the
    reference, and the padding columns are never changed."""
    for kind in ("sgd", "adagrad", "adam"):
        cfg = SparseOptimConfig(kind, lr=0.05, weight_decay=1e-3)
        w = torch.randn(300, 36, generator=gen)
        w[:, 17:20] = 7.0  # padding with a value an update would be sure to move
        a, b = w.clone(), w.clone()
        sa = SparseOptimState.create(a, cfg, (17, 16), col_offsets=(0, 20))
        sb = SparseOptimState.create(b, cfg, (17, 16), col_offsets=(0, 20))
        for _ in range(3):
            ids, grads = _batch(gen, 300, 900, 36)
            grads[:, 17:20] = 0.0
            sparse_update(a, ids, grads, sa, cfg)
            sparse_update_reference(b, ids, grads, sb, cfg)
        assert_close(a, b)
        assert (a[:, 17:20] == 7.0).all() and (b[:, 17:20] == 7.0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_per_segment_gradients_read_in_place_equal_the_packed_buffer(gen, kind):
    """The lookup's backward hands one gradient per peer ([N, W_p], or [B, F, W_p]): bitwise the
    same update as the same numbers packed into one padded [N, R] buffer."""
    cfg = SparseOptimConfig(kind, lr=0.05, weight_decay=1e-3)
    w = torch.randn(300, 40, generator=gen)
    a, b = w.clone(), w.clone()
    segs, offs = (17, 16, 3), (0, 20, 36)
    sa = SparseOptimState.create(a, cfg, segs, col_offsets=offs)
    sb = SparseOptimState.create(b, cfg, segs, col_offsets=offs)
    for _ in range(3):
        ids = torch.randint(0, 300, (900,), generator=gen)
        parts = [torch.randn(30, 30, s, generator=gen) for s in segs]  # [B, F, W_p]: 900 lookups
        packed = torch.zeros(900, 40)
        for g, o, s in zip(parts, offs, segs):
            packed[:, o:o + s] = g.reshape(900, s)
        sparse_update(a, ids, parts, sa, cfg)
        sparse_update(b, ids, packed, sb, cfg)
    assert torch.equal(a, b)
    assert all(torch.equal(getattr(sa, k), getattr(sb, k)) for k in STATE_KEYS if getattr(sa, k) is not None)
    with pytest.raises(ValueError, match="one gradient of N x W_k elements per segment"):
        sparse_update(a, ids, parts[:2], sa, cfg)


def test_int32_ids_and_non_fp32_grads(gen):
    cfg = SparseOptimConfig("adagrad", lr=0.1)
    fast, ref = _pair(64, (4, 4), cfg, gen)
    ids, grads = _batch(gen, 64, 300, 8)
    grads = grads.bfloat16()
    sparse_update(fast[0], ids.int(), grads, fast[1], cfg)
    sparse_update_reference(ref[0], ids, grads, ref[1], cfg)
    _assert_same(fast, ref)


def test_bad_inputs_raise_before_touching_anything(gen):
    cfg = SparseOptimConfig("adam")
    w = torch.randn(10, 4, generator=gen)
    st = SparseOptimState.create(w, cfg)
    w_before = w.clone()
    with pytest.raises(ValueError, match=r"ids must lie in \[0, V=10\), got min 0 and max 10"):
        sparse_update(w, torch.tensor([0, 10]), torch.ones(2, 4), st, cfg)
    with pytest.raises(ValueError, match="got min -1"):
        sparse_update(w, torch.tensor([-1, 3]), torch.ones(2, 4), st, cfg)
    with pytest.raises(ValueError, match=r"grads \[N, W=4\] expected"):
        sparse_update(w, torch.tensor([1]), torch.ones(1, 5), st, cfg)
    with pytest.raises(ValueError, match="contiguous float32"):
        sparse_update(w.double(), torch.tensor([1]), torch.ones(1, 4), st, cfg)
    with pytest.raises(ValueError, match="exp_avg is missing"):
        sparse_update(w, torch.tensor([1]), torch.ones(1, 4), SparseOptimState(segments=(4,)), cfg)
    assert st.step == 0 and torch.equal(w, w_before)


def test_row_offset_is_int64_past_2_to_31():
    # The kernels address rows as row_offset(r, W) in flat views. A table with V * W past 2^31
    # elements is 8 GiB, so the index arithmetic is checked alone, for int32 and int64 operands:
    # 2^27 * 17 and (2^31 - 1) * 33 wrap in int32; 2^40 * 33 needs int64 everywhere.
    cases = [(2**27, 17), (2**31 - 1, 33), (2**40, 33), (1_800_000, 33)]
    for row, width in cases:
        expected = row * width
        assert row_offset(np.int64(row), np.int64(width)) == expected
        if row < 2**31:
            assert row_offset(np.int32(row), np.int32(width)) == expected


def test_warmup_leaves_kernels_compiled():
    warmup()
    from mlfast.ops.cpu_sparse import _sparse_update_chunk

    assert len(_sparse_update_chunk.signatures) >= 2  # int64 and int32 ids
