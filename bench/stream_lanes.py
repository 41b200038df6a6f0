"""`mlfast train --stream --nproc 2`: each rank reading only its own lanes (the default) against
every rank reading every window and cutting its shard (``--stream-lanes 1``), in the same sitting,
alternated: training samples/s (metrics.json) and the largest peak RSS of any process (the ranks'
``ru_maxrss`` as their parent sees it).

    python bench/stream_lanes.py --rows 1000000 [--json bench/results/stream_lanes_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=80)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from mlfast.io.synth import synth_criteo

    tmp = Path(tempfile.mkdtemp(prefix="mlfast_lanes_bench_"))
    synth_criteo(tmp / "train.tsv", rows=a.rows, seed=1)
    env = {**os.environ, "MLFAST_CACHE_DIR": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "mlfast", "train", str(tmp / "train.tsv"), "--stream", "--nproc", "2",
            "--peers", "deepfm", "--batch-size", "4096", "--epochs", "1", "--max-steps", str(a.max_steps),
            "--eval-every", "0", "--quiet", "--threads", "1", "--hash-buckets", "100000"]
    # the cache is built once, outside the timings
    subprocess.run(base[:5] + ["--stream", "--peers", "lr", "--max-steps", "1", "--quiet", "--out", str(tmp / "warm"),
                               "--hash-buckets", "100000"], env=env, check=True, capture_output=True)
    runs = []
    for r in range(a.repeats):
        for name, extra in (("own lanes", []), ("every window", ["--stream-lanes", "1"])):
            out = tmp / f"{r}_{name.replace(' ', '_')}"
            cmd = base + ["--out", str(out)] + extra
            # each configuration in a fresh launcher, so ru_maxrss of its children is its own
            probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
                     "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
            res = subprocess.run([sys.executable, "-c", probe, *cmd], env=env, capture_output=True, text=True)
            if res.returncode:
                sys.exit(res.stderr[-3000:])
            rss = int(res.stdout.split()[-1]) / 1024
            m = json.loads((out / "metrics.json").read_text())["train"]
            runs.append({"way": name, "repeat": r, "samples_per_second": round(m["samples_per_second"]),
                         "peak_rss_mib": round(rss)})
            print(f"{name:12s} repeat {r}: {m['samples_per_second']:,.0f} samples/s, peak RSS {rss:,.0f} MiB",
                  flush=True)
    if a.json:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
        Path(a.json).write_text(json.dumps({"machine": {"cpu": cpu, "cores": os.cpu_count()}, "rows": a.rows,
                                            "runs": runs, "when": time.strftime("%Y-%m-%d")}, indent=1) + "\n")


if __name__ == "__main__":
    main()
