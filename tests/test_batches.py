"""Splits and the batch iterator: coverage, determinism, resume, and the prefetch thread's life."""
from __future__ import annotations

import inspect
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from mlfast.io.batches import (PREFETCH_THREAD_NAME, Batch, BatchLoader, gather_rows, iter_batches,
                               split_indices, split_sizes, stop_prefetch_threads)
from mlfast.io.data import CTRData


def make_data(n: int, f: int = 5, dd: int = 3, seed: int = 0, labels: bool = True) -> CTRData:
    rng = np.random.default_rng(seed)
    offsets = np.arange(f + 1, dtype=np.int64) * 1000
    sparse = offsets[:-1] + rng.integers(0, 1000, (n, f))
    dense = rng.standard_normal((n, dd)).astype(np.float32)
    return CTRData(
        labels=(rng.random(n) < 0.25).astype(np.float32) if labels else None,
        dense=dense, dense_missing=rng.random((n, dd)) < 0.1, sparse=sparse.astype(np.int64),
        field_offsets=offsets, field_names=[f"f{i}" for i in range(f)],
        dense_names=[f"d{i}" for i in range(dd)],
    )


def rows_of(batches) -> np.ndarray:
    return np.concatenate([b.index.numpy() for b in batches]) if batches else np.empty(0, np.int64)


def prefetch_threads() -> int:
    return sum(t.name == PREFETCH_THREAD_NAME for t in threading.enumerate())


# ---------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 2, 7, 10, 1001, 45_840_617])
def test_split_sizes_largest_remainder(n):
    sizes = split_sizes(n, (8, 1, 1))
    assert sum(sizes) == n
    exact = [n * 0.8, n * 0.1, n * 0.1]
    assert all(abs(s - q) < 1 for s, q in zip(sizes, exact))


def test_split_sizes_known_values():
    assert split_sizes(45_840_617) == [36_672_493, 4_584_062, 4_584_062]  # BARS Criteo_x4
    assert split_sizes(7) == [5, 1, 1]  # quotas 5.6 / .7 / .7: remainders .6 < .7 = .7 -> parts 1, 2 get one
    assert split_sizes(9) == [7, 1, 1]  # quotas 7.2 / .9 / .9
    assert split_sizes(10, (0.7, 0.3)) == [7, 3]
    assert split_sizes(5, (1, 1)) == [3, 2]  # tie on the remainder -> the earlier part
    with pytest.raises(ValueError, match="ratios"):
        split_sizes(5, (0, 0))


@pytest.mark.parametrize("n,ratios", [(10_007, (8, 1, 1)), (1000, (1, 1)), (333, (0.6, 0.2, 0.2))])
def test_split_indices_disjoint_complete(n, ratios):
    parts = split_indices(n, ratios, seed=7)
    assert [len(p) for p in parts] == split_sizes(n, ratios)
    allrows = np.concatenate(parts)
    assert allrows.dtype == np.int64
    np.testing.assert_array_equal(np.sort(allrows), np.arange(n))  # disjoint and complete
    for p in parts:
        assert np.all(np.diff(p) > 0)  # sorted
    again = split_indices(n, ratios, seed=7)
    other = split_indices(n, ratios, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not np.array_equal(parts[-1], other[-1])


def test_split_indices_is_a_seeded_permutation_cut():
    perm = np.random.default_rng(3).permutation(100)
    tr, va, te = split_indices(100, seed=3)
    np.testing.assert_array_equal(tr, np.sort(perm[:80]))
    np.testing.assert_array_equal(te, np.sort(perm[90:]))


# ---------------------------------------------------------------------------------------------
# gather
# ---------------------------------------------------------------------------------------------
def test_gather_rows_matches_numpy(tmp_path):
    rng = np.random.default_rng(1)
    src = rng.integers(-(1 << 62), 1 << 62, (500, 39))
    idx = rng.integers(0, 500, 257)
    np.testing.assert_array_equal(gather_rows(src, idx), src[idx])
    path = tmp_path / "s.npy"
    np.save(path, src)
    mm = np.load(path, mmap_mode="r")
    np.testing.assert_array_equal(gather_rows(mm, idx), src[idx])
    f = rng.random(500).astype(np.float32)
    np.testing.assert_array_equal(gather_rows(f, idx), f[idx])
    strided = src[:, ::2]  # not C-contiguous: numpy fallback
    np.testing.assert_array_equal(gather_rows(strided, idx), strided[idx])


# ---------------------------------------------------------------------------------------------
# loader
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_each_row_once_per_epoch(prefetch, shuffle, drop_last):
    d = make_data(1003)
    sub = np.random.default_rng(5).choice(1003, 777, replace=False)
    loader = BatchLoader(d, 64, indices=sub, shuffle=shuffle, seed=1, drop_last=drop_last, prefetch=prefetch)
    batches = list(loader.epoch(0))
    sizes = [len(b) for b in batches]
    assert len(batches) == len(loader) == (777 // 64 if drop_last else 13)
    assert sizes == [64] * 12 + ([] if drop_last else [777 - 12 * 64])
    seen = rows_of(batches)
    if drop_last:
        assert len(np.unique(seen)) == len(seen) == 768 and np.isin(seen, sub).all()
    else:
        np.testing.assert_array_equal(np.sort(seen), np.sort(sub))
    if not shuffle:
        np.testing.assert_array_equal(seen, sub[: len(seen)])
    else:
        np.testing.assert_array_equal(seen, np.random.default_rng([1, 0]).permutation(sub)[: len(seen)])
    # contents are the rows the index names, in the documented dtypes
    for b in batches[:3] + batches[-1:]:
        i = b.index.numpy()
        assert b.sparse.dtype == torch.int64 and b.dense.dtype == torch.float32 and b.labels.dtype == torch.float32
        np.testing.assert_array_equal(b.sparse.numpy(), d.sparse[i])
        np.testing.assert_array_equal(b.dense.numpy(), d.dense[i])
        np.testing.assert_array_equal(b.labels.numpy(), d.labels[i])


def test_shuffle_determinism_and_epochs():
    d = make_data(500)
    a = BatchLoader(d, 50, shuffle=True, seed=11)
    b = BatchLoader(d, 50, shuffle=True, seed=11, prefetch=0)
    c = BatchLoader(d, 50, shuffle=True, seed=12)
    e0 = rows_of(list(a.epoch(0)))
    np.testing.assert_array_equal(e0, rows_of(list(b.epoch(0))))  # same seed, same order (thread or not)
    e1 = rows_of(list(a.epoch(1)))
    assert np.mean(e0 != e1) > 0.9  # different epoch, different order
    assert np.mean(e0 != rows_of(list(c.epoch(0)))) > 0.9  # different seed, different order
    np.testing.assert_array_equal(np.sort(e0), np.sort(e1))
    a.set_epoch(1)
    np.testing.assert_array_equal(rows_of(list(a)), e1)


@pytest.mark.parametrize("prefetch", [0, 3])
@pytest.mark.parametrize("start", [0, 1, 7, 15, 16])
def test_resume_equals_tail(prefetch, start):
    d = make_data(1000)
    loader = BatchLoader(d, 64, shuffle=True, seed=4, prefetch=prefetch)
    full = list(loader.epoch(3))
    tail = list(loader.epoch(3, start_batch=start))
    assert len(full) == 16 and len(tail) == 16 - start
    for x, y in zip(full[start:], tail):
        assert torch.equal(x.index, y.index) and torch.equal(x.sparse, y.sparse) and torch.equal(x.labels, y.labels)
    with pytest.raises(ValueError, match="start_batch"):
        loader.epoch(3, start_batch=17)


def test_unlabeled_and_no_dense():
    d = make_data(10, labels=False)
    (b,) = BatchLoader(d, 16, use_dense=False).epoch(0)
    assert b.labels is None and b.dense is None and b.sparse.shape == (10, 5)
    np.testing.assert_array_equal(b.index.numpy(), np.arange(10))


def test_cpu_batches_do_not_alias_the_source():
    d = make_data(100)
    (b,) = BatchLoader(d, 128, prefetch=0).epoch(0)
    b.sparse.zero_()
    b.index.zero_()
    assert d.sparse[1, 0] != 0  # sparse was gathered (a copy) ...
    (b2,) = BatchLoader(d, 128, prefetch=0).epoch(0)
    np.testing.assert_array_equal(b2.index.numpy(), np.arange(100))  # ... and index is not a view


def test_bad_arguments():
    d = make_data(10)
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(d, 0)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\)"):
        BatchLoader(d, 2, indices=[0, 10])
    with pytest.raises(ValueError, match="1-D integer"):
        BatchLoader(d, 2, indices=np.zeros((2, 2), np.int64))


class _Boom(RuntimeError):
    pass


def test_prefetch_thread_propagates_exception(monkeypatch):
    d = make_data(640)
    loader = BatchLoader(d, 64, prefetch=2)
    real = loader._gather
    calls = []

    def gather(rows, host):
        calls.append(len(calls))
        if len(calls) == 3:
            raise _Boom("gather failed on batch 2")
        return real(rows, host)

    monkeypatch.setattr(loader, "_gather", gather)
    got = []
    with pytest.raises(_Boom, match="batch 2"):
        for b in loader.epoch(0):
            got.append(b)
    assert len(got) == 2  # the two good batches arrive first, then the error
    deadline = time.monotonic() + 5
    while prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert prefetch_threads() == 0


def test_early_break_stops_thread():
    d = make_data(5000)
    loader = BatchLoader(d, 10, prefetch=2)
    before = prefetch_threads()
    t0 = time.monotonic()
    for i, b in enumerate(loader.epoch(0)):
        if i == 1:
            time.sleep(0.05)  # let the producer fill the queue and block on put
            break
    # the generator is closed when the loop drops it: stop flag, join
    assert prefetch_threads() == before
    it = loader.epoch(0)
    next(it)
    assert prefetch_threads() == before + 1
    it.close()
    assert prefetch_threads() == before
    assert time.monotonic() - t0 < 5


def test_a_generator_never_closed_is_stopped_at_exit():
    d = make_data(5000)
    before = prefetch_threads()
    kept = BatchLoader(d, 10, prefetch=2).epoch(0)
    next(kept)  # left suspended, as a loop kept alive to the end of a program leaves it
    assert prefetch_threads() == before + 1
    assert stop_prefetch_threads() >= 1  # what runs at exit (atexit)
    assert prefetch_threads() == before
    kept.close()


def test_a_program_that_leaves_an_epoch_open_exits_cleanly(tmp_path):
    script = tmp_path / "open_epoch.py"
    # a program that keeps a suspended epoch (its prefetch thread running) until it exits
    script.write_text("import numpy as np\nfrom mlfast.io.batches import BatchLoader\nfrom mlfast.io.data import CTRData\n"
                      + inspect.getsource(make_data)
                      + "KEPT = BatchLoader(make_data(20000), 8, prefetch=4).epoch(0)\nnext(KEPT)\nprint('ok')\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_iter_batches_in_memory():
    d = make_data(300)
    got = list(iter_batches(d, 128, shuffle=True, seed=2, epoch=5, prefetch=0))
    assert [len(b) for b in got] == [128, 128, 44]
    np.testing.assert_array_equal(rows_of(got), np.random.default_rng([2, 5]).permutation(300))
    assert isinstance(got[0], Batch)
