"""Criteo parsing throughput: the native reader (parse + hash) against pyarrow.csv (parse only).

On a generated Criteo file (``mlfast.io.synth.synth_criteo``, 1,000,000 lines by default, written
once per session in a temporary directory):

* ``pyarrow_1t``:   ``pyarrow.csv.read_csv`` on one thread: tokenising and converting the 40
                    columns (ints and strings), no hashing. The baseline.
* ``native_1t``:    ``read_criteo(cache=False, num_threads=1)``: parse, hash, CTRData out.
* ``native_all``:   the same on every CPU.
* ``cache_miss``:   ``read_criteo`` into an empty cache directory: parse + write the cache.
* ``cache_hit``:    ``read_criteo`` from the cache: map the columns and verify every checksum.

MB/s counts bytes of the input text (for the cache rows also bytes of cache, GB/s); the ratio is
against ``pyarrow_1t``'s median in the same process. Run ``python bench/test_bench_reader.py
--rows 1000000`` for the table (the cases take turns within each round), or under pytest
``pytest bench/test_bench_reader.py --benchmark-enable`` (rows from ``MLFAST_BENCH_ROWS``).
Timings on a shared machine swing with its load: compare rows of one run, as ratios; the table
records the load average it ran under and the CPU-time rate, which load disturbs less.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest

from mlfast.io import reader
from mlfast.io.synth import synth_criteo
from bench_common import machine, quantile

ROWS = int(os.environ.get("MLFAST_BENCH_ROWS", 1_000_000))
SEED = 1
CRITEO_NAMES = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]


def make_file(directory: Path, rows: int, seed: int = SEED) -> Path:
    path = Path(directory) / f"criteo_{rows}.tsv"
    if not path.exists():
        synth_criteo(path, rows, seed=seed, sidecar=False)
    return path


def pyarrow_read(path: Path):
    import pyarrow.csv as pc

    return pc.read_csv(path, read_options=pc.ReadOptions(use_threads=False, column_names=CRITEO_NAMES),
                       parse_options=pc.ParseOptions(delimiter="\t"))


def cache_bytes(entry: str) -> int:
    return sum(p.stat().st_size for p in Path(entry).glob("*.bin"))


def cases(path: Path, cache_root: Path) -> dict[str, Callable[[], object]]:
    """name -> a function that does one timed read (each returns what it read)."""
    threads = os.cpu_count() or 1
    hit_dir = cache_root / "hit"
    miss_dir = cache_root / "miss"

    def cache_miss():
        shutil.rmtree(miss_dir, ignore_errors=True)
        return reader.read_criteo(path, cache_dir=miss_dir, num_threads=threads)

    return {
        "pyarrow_1t": lambda: pyarrow_read(path),
        "native_1t": lambda: reader.read_criteo(path, cache=False, num_threads=1),
        "native_all": lambda: reader.read_criteo(path, cache=False, num_threads=threads),
        "cache_miss": cache_miss,
        "cache_hit": lambda: reader.read_criteo(path, cache_dir=hit_dir, num_threads=threads),
    }


def time_case(fn: Callable[[], object], rounds: int) -> tuple[list[float], list[float], object]:
    """Wall and process-CPU seconds of each round (after one warm-up round)."""
    return time_cases({"case": fn}, rounds)["case"]


def time_cases(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple[list[float], list[float], object]]:
    """Like time_case for several cases, taken in turn within each round, so that a change in the
    machine's load during the run affects every case alike."""
    last = {name: fn() for name, fn in fns.items()}  # warm-up (fills the cache for cache_hit)
    walls: dict[str, list[float]] = {name: [] for name in fns}
    cpus: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            del last[name]  # free the previous result first, as a loop reading files would
            c0, t0 = time.process_time(), time.perf_counter()
            last[name] = fn()
            walls[name].append(time.perf_counter() - t0)
            cpus[name].append(time.process_time() - c0)
    return {name: (walls[name], cpus[name], last[name]) for name in fns}


# ------------------------------------------------------------------------------------------------
# pytest-benchmark


@pytest.fixture(scope="session")
def bench_env(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bench_reader")
    path = make_file(directory, ROWS)
    walls, _, _ = time_case(lambda: pyarrow_read(path), 3)
    return path, directory / "cache", statistics.median(walls)


@pytest.mark.parametrize("name", ["pyarrow_1t", "native_1t", "native_all", "cache_miss", "cache_hit"])
def test_bench_reader(benchmark, bench_env, name):
    path, cache_root, pyarrow_median = bench_env
    fn = cases(path, cache_root)[name]
    fn()  # warm-up (and, for cache_hit, the miss that fills the cache)
    result = benchmark.pedantic(fn, rounds=5, iterations=1)
    size = path.stat().st_size
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(rows=ROWS, input_bytes=size, mb_per_s=size / median / 1e6,
                                ratio_to_pyarrow_1t=pyarrow_median / median, machine=machine())
    if name.startswith("cache"):
        benchmark.extra_info["cache_gb_per_s"] = cache_bytes(result.meta["cache"]["path"]) / median / 1e9
        benchmark.extra_info["cache_status"] = result.meta["cache"]["status"]


# ------------------------------------------------------------------------------------------------
# Script: one table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=ROWS)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write the data file (default: a temporary dir)")
    a = ap.parse_args()
    directory = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="mlfast_bench_reader_"))
    directory.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    path = make_file(directory, a.rows)
    size = path.stat().st_size
    print(f"{a.rows:,} Criteo lines, {size / 1e6:.1f} MB ({path}; {time.perf_counter() - t0:.1f} s to generate)")
    print(machine())
    results = time_cases(cases(path, directory / "cache"), a.rounds)
    base = statistics.median(results["pyarrow_1t"][0])
    print(f"\n| case | median s (p20-p80) | MB/s | CPU-time MB/s | x pyarrow 1t | cache GB/s |")
    print("|---|---|---|---|---|---|")
    for name, (walls, cpus, out) in results.items():
        med = statistics.median(walls)
        gbs = ""
        if name.startswith("cache"):
            gbs = f"{cache_bytes(out.meta['cache']['path']) / med / 1e9:.2f} ({out.meta['cache']['status']})"
        print(f"| {name} | {med:.3f} ({quantile(walls, 0.2):.3f}-{quantile(walls, 0.8):.3f}) | {size / med / 1e6:,.0f} "
              f"| {size / statistics.median(cpus) / 1e6:,.0f} | {base / med:.2f} | {gbs} |")
    if not a.dir:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
