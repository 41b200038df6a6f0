"""Parquet reading throughput: mlfast's columnar reader (decode + parse + hash, CTRData out) against
pyarrow's own read of the same file (decode only) and mlfast's text path on the same rows as TSV.

On a generated Criteo file (``mlfast.io.synth.synth_criteo``, 300,000 lines by default) written
once as TSV and once as Parquet (pyarrow, snappy, 64Ki-row groups; I1..I13 int64, C1..C26 string),
read under one schema (label, 13 numeric, 26 categorical columns):

* ``pyarrow_table``:   ``pyarrow.parquet.read_table`` on every CPU: decoding only, the floor.
* ``pyarrow_batches``: ``ParquetFile.iter_batches`` (64Ki rows): the streaming decode the reader uses.
* ``columnar_1t``:     ``read_columnar(cache=False, num_threads=1)``.
* ``columnar_all``:    the same on every CPU (pyarrow's decode threads and the parser's).
* ``text_all``:        ``read_delimited`` of the TSV under the same schema, every CPU.
* ``columnar_hit``:    ``read_columnar`` from the cache (map + verify).

Rates are rows/s and MB/s of the Parquet file (text_all: of the TSV); "x pyarrow" is against
``pyarrow_table``'s median in the same run. Run ``python bench/test_bench_parquet.py --rows 300000``
for the table (cases take turns within each round), or ``pytest bench/test_bench_parquet.py
--benchmark-enable``. The table records the load average it ran under.
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

from bench_common import machine, quantile
from mlfast.io import arrow, reader
from mlfast.io.synth import synth_criteo

ROWS = int(os.environ.get("MLFAST_BENCH_ROWS", 300_000))
NAMES = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
SCHEMA = reader.DelimitedSchema(delimiter="\t", header=False, label=0, numeric=list(range(1, 14)),
                                categorical=list(range(14, 40)))


def make_files(directory: Path, rows: int) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.csv as pc
    import pyarrow.parquet as pq

    tsv, par = directory / f"criteo_{rows}.tsv", directory / f"criteo_{rows}.parquet"
    if not tsv.exists():
        synth_criteo(tsv, rows, seed=1, sidecar=False)
    if not par.exists():
        types = {n: pa.int64() for n in NAMES[:14]} | {n: pa.string() for n in NAMES[14:]}
        table = pc.read_csv(tsv, read_options=pc.ReadOptions(column_names=NAMES),
                            parse_options=pc.ParseOptions(delimiter="\t"),
                            convert_options=pc.ConvertOptions(column_types=types))
        pq.write_table(table, par, row_group_size=1 << 16)
    return tsv, par


def cases(tsv: Path, par: Path, cache_root: Path) -> dict[str, Callable[[], object]]:
    import pyarrow.parquet as pq

    threads = os.cpu_count() or 1

    def batches():
        n = 0
        for b in pq.ParquetFile(par).iter_batches(batch_size=1 << 16):
            n += b.num_rows
        return n

    return {
        "pyarrow_table": lambda: pq.read_table(par),
        "pyarrow_batches": batches,
        "columnar_1t": lambda: arrow.read_columnar(par, SCHEMA, cache=False, num_threads=1),
        "columnar_all": lambda: arrow.read_columnar(par, SCHEMA, cache=False, num_threads=threads),
        "text_all": lambda: reader.read_delimited(tsv, SCHEMA, cache=False, num_threads=threads),
        "columnar_hit": lambda: arrow.read_columnar(par, SCHEMA, cache_dir=cache_root, num_threads=threads),
    }


def time_cases(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple[list[float], list[float]]]:
    """Wall and CPU seconds per round, the cases taking turns within each round (after a warm-up)."""
    last = {name: fn() for name, fn in fns.items()}
    walls: dict[str, list[float]] = {name: [] for name in fns}
    cpus: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            del last[name]
            c0, t0 = time.process_time(), time.perf_counter()
            last[name] = fn()
            walls[name].append(time.perf_counter() - t0)
            cpus[name].append(time.process_time() - c0)
    return {name: (walls[name], cpus[name]) for name in fns}


@pytest.fixture(scope="session")
def bench_files(tmp_path_factory):
    pytest.importorskip("pyarrow")
    directory = tmp_path_factory.mktemp("bench_parquet")
    return (*make_files(directory, ROWS), directory / "cache")


@pytest.mark.parametrize("name", ["pyarrow_table", "pyarrow_batches", "columnar_1t", "columnar_all", "text_all",
                                  "columnar_hit"])
def test_bench_parquet(benchmark, bench_files, name):
    tsv, par, cache_root = bench_files
    fn = cases(tsv, par, cache_root)[name]
    fn()
    benchmark.pedantic(fn, rounds=5, iterations=1)
    size = (tsv if name == "text_all" else par).stat().st_size
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(rows=ROWS, rows_per_s=ROWS / median, input_bytes=size, mb_per_s=size / median / 1e6,
                                machine=machine())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=ROWS)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write the data files (default: a temporary dir)")
    a = ap.parse_args()
    directory = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="mlfast_bench_parquet_"))
    directory.mkdir(parents=True, exist_ok=True)
    tsv, par = make_files(directory, a.rows)
    print(f"{a.rows:,} Criteo rows: TSV {tsv.stat().st_size / 1e6:.1f} MB, Parquet {par.stat().st_size / 1e6:.1f} MB")
    print(machine())
    results = time_cases(cases(tsv, par, directory / "cache"), a.rounds)
    base = statistics.median(results["pyarrow_table"][0])
    print("\n| case | median s (p20-p80) | rows/s | MB/s of its input | CPU s | x pyarrow_table |")
    print("|---|---|---|---|---|---|")
    for name, (walls, cpus) in results.items():
        med = statistics.median(walls)
        size = (tsv if name == "text_all" else par).stat().st_size
        print(f"| {name} | {med:.3f} ({quantile(walls, 0.2):.3f}-{quantile(walls, 0.8):.3f}) | {a.rows / med:,.0f} "
              f"| {size / med / 1e6:,.0f} | {statistics.median(cpus):.2f} | {base / med:.2f} |")
    print(f"\n{machine()}")
    if not a.dir:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
