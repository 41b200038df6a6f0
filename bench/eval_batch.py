"""Scoring speed by batch size (validation, `eval`, `predict`): the peers of a `mlfast train` run
with the default tables scored over the same in-memory rows at several batch sizes, alternated, in
one process. What `mlfast.api.eval_batch_size` picks per device comes from this.

    python bench/eval_batch.py [--rows 200000] [--peers deepfm,dcn] [--repeats 3] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--peers", default="deepfm,dcn")
    ap.add_argument("--sizes", default="2048,4096,8192,16384")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from mlfast.api import load_run
    from mlfast.cli import main as cli
    from mlfast.io.synth import synth_criteo

    tmp = Path(tempfile.mkdtemp(prefix="mlfast_eval_batch_"))
    synth_criteo(tmp / "train.tsv", rows=20_000, seed=1)
    assert cli(["train", str(tmp / "train.tsv"), "--out", str(tmp / "run"), "--peers", a.peers, "--epochs", "1",
                "--quiet", "--no-cache"]) == 0
    synth_criteo(tmp / "score.tsv", rows=a.rows, seed=2)
    pred = load_run(tmp / "run", device="cpu")
    data = pred.read(tmp / "score.tsv", cache=False)
    sizes = [int(s) for s in a.sizes.split(",")]
    pred.predict_proba(data, sizes[0])  # warm up
    rates: dict[int, list[float]] = {s: [] for s in sizes}
    for _ in range(a.repeats):
        for s in sizes:
            t = time.perf_counter()
            pred.predict_proba(data, s)
            rates[s].append(len(data) / (time.perf_counter() - t))
    best = {s: max(v) for s, v in rates.items()}
    for s in sizes:
        print(f"batch {s:6d}: " + ", ".join(f"{r:,.0f}" for r in rates[s]) + f" rows/s (best x{best[s] / best[sizes[-1]]:.2f}"
              f" of batch {sizes[-1]})")
    if a.json:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
        Path(a.json).write_text(json.dumps({"machine": {"cpu": cpu, "cores": os.cpu_count()}, "peers": a.peers,
                                            "rows": a.rows, "rows_per_second": {str(k): [round(x) for x in v]
                                                                                for k, v in rates.items()},
                                            "when": time.strftime("%Y-%m-%d")}, indent=1) + "\n")


if __name__ == "__main__":
    main()
