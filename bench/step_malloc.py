"""The heap settings (``mlfast.ops.allocator``) A/B: ``mlfast bench``'s DeepFM + DCN training step
(1.8 M rows per table, B = 4096, the fused engine, CPU) in fresh processes, glibc's defaults
(``MLFAST_MALLOC=system``) and mlfast's settings alternated pair by pair (the settings are
process-wide and set once, so they cannot alternate inside one process). Per process: median ms
per step over the timed steps and minor page faults per step.

    python bench/step_malloc.py [--pairs 3] [--steps 20] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench_common import machine, quantile  # noqa: E402

SIDES = {"system": {"MLFAST_MALLOC": "system"}, "mlfast": {}}


def child(steps: int, warmup: int) -> dict:
    """One process's measurement (run with --child)."""
    from mlfast.ops.allocator import tune_malloc

    applied = tune_malloc()  # what the trainer does first; None under MLFAST_MALLOC=system
    from step_ab import engine_step

    step = engine_step()
    for _ in range(warmup):
        step()
    times, f0 = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - t0))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return {"malloc": applied, "median_ms": quantile(times, 0.5), "faults_per_step": faults / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.steps, args.warmup)))
        return
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "MLFAST_MALLOC"))}
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    for i in range(args.pairs):
        for side in (list(SIDES) if i % 2 == 0 else list(SIDES)[::-1]):
            out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps), "--warmup",
                                  str(args.warmup)], env={**clean, **SIDES[side]}, capture_output=True, text=True,
                                 check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs[side].append(r)
            print(f"pair {i + 1} {side:>7}: {r['median_ms']:7.1f} ms per step, {r['faults_per_step']:9.1f} minor faults "
                  f"per step", flush=True)
    res = {"machine": machine(), "pairs": args.pairs, "steps": args.steps, "runs": runs,
           "ratios": [a["median_ms"] / b["median_ms"] for a, b in zip(runs["system"], runs["mlfast"])]}
    print("system / mlfast per pair:", ", ".join(f"{x:.3f}" for x in res["ratios"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
