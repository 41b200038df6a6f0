"""Generator and batch-gather throughput.

* ``synth``: ``synth_criteo`` writing ``MLFAST_BENCH_ROWS`` (default 1,000,000) Criteo lines as
  plain TSV, gzip level 1 and gzip level 6 (rows/s and MB/s of text).
* ``gather``: one batch's rows of a [2M, 39] int64 id matrix (B = 4096, shuffled row ids), as
  ``BatchLoader`` gathers them: ``mlfast.io.batches.gather_rows`` (numba, GIL released) against the
  numpy reference the tests compare it with (fancy indexing) and ``np.take`` into a buffer; also
  from a memmap of the same matrix.
* ``epoch``: a whole shuffled epoch of a 1M-row ``CTRData`` through ``BatchLoader`` (B = 4096),
  without and with the prefetch thread, consuming only or with a stand-in step per batch (a
  [4096, 256] x [256, 256] matmul, which releases the GIL like a training step).

Run ``python bench/test_bench_synth.py`` for the table (median with p20-p80), or under pytest
``pytest bench/test_bench_synth.py --benchmark-enable``. Timings on a shared machine swing with its
load: compare rows of one run, as ratios; the table records the load average.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from mlfast.io.batches import BatchLoader, gather_rows
from mlfast.io.data import CTRData
from mlfast.io.synth import synth_criteo
from bench_common import machine, quantile

ROWS = int(os.environ.get("MLFAST_BENCH_ROWS", 1_000_000))
GATHER_N, GATHER_F, BATCH = 2_000_000, 39, 4096


def synth_cases(directory: Path, rows: int) -> dict[str, Callable[[], object]]:
    return {
        "synth_tsv": lambda: synth_criteo(directory / "s.tsv", rows, seed=1, sidecar=False),
        "synth_gz1": lambda: synth_criteo(directory / "s1.tsv.gz", rows, seed=1, sidecar=False, gzip_level=1),
        "synth_gz6": lambda: synth_criteo(directory / "s6.tsv.gz", rows, seed=1, sidecar=False, gzip_level=6),
    }


def gather_cases(directory: Path) -> dict[str, Callable[[], object]]:
    rng = np.random.default_rng(0)
    src = rng.integers(0, 1 << 40, (GATHER_N, GATHER_F))
    np.save(directory / "ids.npy", src)
    mm = np.load(directory / "ids.npy", mmap_mode="r")
    # successive calls take successive batches of one permutation (~80 MB of rows before one repeats),
    # so the rows come from memory, as in an epoch, not from a cache warmed by the previous call
    batches = rng.permutation(GATHER_N)[: 64 * BATCH].reshape(64, BATCH)
    out = np.empty((BATCH, GATHER_F), np.int64)
    k = [0]

    def nxt() -> np.ndarray:
        k[0] += 1
        return batches[k[0] % len(batches)]

    return {
        "gather_numba": lambda: gather_rows(src, nxt(), out),
        "gather_numpy_fancy": lambda: src[nxt()],
        "gather_numpy_take": lambda: np.take(src, nxt(), axis=0, out=out),
        "gather_numba_memmap": lambda: gather_rows(mm, nxt(), out),
        "gather_numpy_fancy_memmap": lambda: mm[nxt()],
    }


def epoch_cases(rows: int) -> dict[str, Callable[[], object]]:
    rng = np.random.default_rng(0)
    d = CTRData(labels=(rng.random(rows) < 0.25).astype(np.float32),
                dense=rng.random((rows, 13), dtype=np.float32), dense_missing=np.zeros((rows, 13), bool),
                sparse=rng.integers(0, 1 << 22, (rows, 39)), field_offsets=np.arange(40, dtype=np.int64) << 17,
                field_names=[f"f{i}" for i in range(39)])

    w = torch.randn(256, 256)

    def run(prefetch: int, work: bool):
        def f():
            n = 0
            for b in BatchLoader(d, BATCH, shuffle=True, seed=0, prefetch=prefetch).epoch(0):
                n += len(b)
                if work:  # a stand-in training step that releases the GIL, for the thread to overlap
                    torch.mm(b.dense.repeat(1, 20)[:, :256], w)
            assert n == rows
        return f

    return {"epoch_prefetch0": run(0, False), "epoch_prefetch2": run(2, False),
            "epoch_prefetch0_with_step": run(0, True), "epoch_prefetch2_with_step": run(2, True)}


def time_cases(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Wall seconds per round after one warm-up, cases taken in turn within each round so that a
    change of the machine's load affects every case alike."""
    for fn in fns.values():
        fn()
    walls: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            walls[name].append(time.perf_counter() - t0)
    return walls


# ------------------------------------------------------------------------------------------------
# pytest-benchmark


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_synth")


@pytest.mark.parametrize("name", ["synth_tsv", "synth_gz1", "synth_gz6"])
def test_bench_synth(benchmark, bench_dir, name):
    fn = synth_cases(bench_dir, ROWS)[name]
    rep = benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    med = benchmark.stats.stats.median
    benchmark.extra_info.update(rows=ROWS, rows_per_s=ROWS / med, text_mb_per_s=rep.text_bytes / med / 1e6,
                                bytes_on_disk=rep.bytes, machine=machine())


@pytest.mark.parametrize("name", ["gather_numba", "gather_numpy_fancy", "gather_numpy_take",
                                  "gather_numba_memmap", "gather_numpy_fancy_memmap"])
def test_bench_gather(benchmark, bench_dir, name):
    fn = gather_cases(bench_dir)[name]
    benchmark.pedantic(fn, rounds=200, iterations=1, warmup_rounds=5)
    med = benchmark.stats.stats.median
    benchmark.extra_info.update(batch=BATCH, fields=GATHER_F, gb_per_s=2 * BATCH * GATHER_F * 8 / med / 1e9,
                                machine=machine())


@pytest.mark.parametrize("name", ["epoch_prefetch0", "epoch_prefetch2", "epoch_prefetch0_with_step",
                                  "epoch_prefetch2_with_step"])
def test_bench_epoch(benchmark, name):
    fn = epoch_cases(ROWS)[name]
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(rows=ROWS, rows_per_s=ROWS / benchmark.stats.stats.median, machine=machine())


# ------------------------------------------------------------------------------------------------
# Script: one table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=ROWS)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="mlfast_bench_synth_") as tmp:
        directory = Path(tmp)
        print(f"\n| case | median s (p20-p80) | rate |")
        print("|---|---|---|")
        walls = time_cases(synth_cases(directory, a.rows), a.rounds)
        text = (directory / "s.tsv").stat().st_size
        for name, w in walls.items():
            med = statistics.median(w)
            print(f"| {name} ({a.rows:,} rows) | {med:.3f} ({quantile(w, .2):.3f}-{quantile(w, .8):.3f}) "
                  f"| {a.rows / med / 1e6:.2f} M rows/s, {text / med / 1e6:.0f} MB/s of text |")
        walls = time_cases(gather_cases(directory), max(50, a.rounds * 50))
        for name, w in walls.items():
            med = statistics.median(w)
            print(f"| {name} [{BATCH} x {GATHER_F}] of {GATHER_N:,} | {med * 1e6:.1f} us "
                  f"({quantile(w, .2) * 1e6:.1f}-{quantile(w, .8) * 1e6:.1f}) "
                  f"| {2 * BATCH * GATHER_F * 8 / med / 1e9:.2f} GB/s (read + write) |")
    walls = time_cases(epoch_cases(a.rows), a.rounds)
    for name, w in walls.items():
        med = statistics.median(w)
        print(f"| {name} ({a.rows:,} rows, B={BATCH}) | {med:.3f} ({quantile(w, .2):.3f}-{quantile(w, .8):.3f}) "
              f"| {a.rows / med / 1e6:.2f} M rows/s |")


if __name__ == "__main__":
    main()
