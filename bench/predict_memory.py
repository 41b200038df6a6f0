"""Scoring a large file: `mlfast predict` (read, scored and written chunk by chunk) against the
whole-file way it replaced (``Predictor.read`` the file into memory, ``predict``, then
``write_predictions_csv``), in the same sitting, each in a fresh process: wall time and peak RSS.

    python bench/predict_memory.py --rows 2000000 [--json bench/results/predict_cpu.json]

Trains a small run (DeepFM + DCN, 1 epoch on 20k generated rows, default hashed tables) once, then
times both ways on a generated Criteo file of ``--rows`` rows (no cache: both parse the text), and
checks that the two CSVs hold the same keys and predictions (within float rounding).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WHOLE = r"""
import resource, sys, time
t = time.perf_counter()
from mlfast.api import load_run, prediction_keys, write_predictions_csv
pred = load_run(sys.argv[1], device="cpu")
data = pred.read(sys.argv[2], cache=False)
write_predictions_csv(pred.predict(data), sys.argv[3], ids=prediction_keys(data))
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
CHUNKED = r"""
import resource, sys, time
t = time.perf_counter()
from mlfast.api import load_run
pred = load_run(sys.argv[1], device="cpu")
pred.predict_file(sys.argv[2], sys.argv[3])
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def run(script: str, *args: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    secs, kib = out.stdout.split()
    return float(secs), int(kib) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import numpy as np

    from mlfast.cli import main as cli
    from mlfast.io.synth import synth_criteo

    tmp = Path(tempfile.mkdtemp(prefix="mlfast_predict_bench_"))
    synth_criteo(tmp / "train.tsv", rows=20_000, seed=1)
    assert cli(["train", str(tmp / "train.tsv"), "--out", str(tmp / "run"), "--peers", "deepfm,dcn", "--epochs", "1",
                "--quiet", "--no-cache"]) == 0
    synth_criteo(tmp / "big.tsv", rows=a.rows, seed=2)
    size = os.path.getsize(tmp / "big.tsv")
    rows = []
    for r in range(a.repeats):  # alternated: both see the same page cache and machine load
        for name, script in (("whole", WHOLE), ("chunked", CHUNKED)):
            secs, mib = run(script, str(tmp / "run"), str(tmp / "big.tsv"), str(tmp / f"{name}.csv"))
            rows.append({"way": name, "repeat": r, "seconds": round(secs, 2), "peak_rss_mib": round(mib)})
            print(f"{name:8s} repeat {r}: {secs:6.1f} s, peak RSS {mib:,.0f} MiB", flush=True)
    w = np.loadtxt(tmp / "whole.csv", delimiter=",", skiprows=1)
    c = np.loadtxt(tmp / "chunked.csv", delimiter=",", skiprows=1)
    np.testing.assert_array_equal(w[:, 0], c[:, 0])
    np.testing.assert_allclose(w[:, 1:], c[:, 1:], atol=2e-6)
    best = {way: min(x["seconds"] for x in rows if x["way"] == way) for way in ("whole", "chunked")}
    peak = {way: max(x["peak_rss_mib"] for x in rows if x["way"] == way) for way in ("whole", "chunked")}
    print(f"{a.rows:,} rows ({size / 1e9:.2f} GB): chunked/whole time {best['chunked'] / best['whole']:.2f}x, "
          f"peak RSS {peak['chunked']:,} vs {peak['whole']:,} MiB ({peak['whole'] / peak['chunked']:.2f}x less)")
    if a.json:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
        Path(a.json).write_text(json.dumps({"machine": {"cpu": cpu, "cores": os.cpu_count(),
                                                        "python": platform.python_version()},
                                            "rows": a.rows, "file_bytes": size, "runs": rows, "best_seconds": best,
                                            "peak_rss_mib": peak, "when": time.strftime("%Y-%m-%d")}, indent=1) + "\n")


if __name__ == "__main__":
    main()
