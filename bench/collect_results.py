"""Merge a device run's benchmark files into one results JSON and check the bars; exits non-zero on
any failed stage, any missed bar, or any bar that cannot be checked.

    python bench/collect_results.py OUT_DIR bench/results

reads OUT_DIR/{step.json, loss.json, embedding.json, stages.jsonl} (any may be missing: a missing
file is reported as a failure, never silently skipped), writes OUT_DIR/results.json and
RESULTS_DIR/<gpu>.json:

    {"gpu": ..., "torch": ..., "triton": ..., "config": {...},
     "rows": [{"impl": "eager"|"compile"|"sparse"|"mlfast"|"mlp", "workload": ..., "samples_per_s": ...}, ...],
     "bars": [...], "kernels": {"mutual_loss": ..., "embedding": ...}, "stages": [...], "problems": [...]}

Every ratio is between rows of the same `mlfast bench` process (step.json): `mlfast bench` times
all implementations, `compile` included, at every workload, in one run; a workload where one of the
plain alternatives is missing or failed has no best-plain ratio, and its bar counts as missed.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# mlfast >= 5x eager at 1.8M rows, >= 10x at 35M rows, >= 2x the best plain alternative
EAGER_BARS = {1_800_000: 5.0, 35_300_000: 10.0}
BEST_PLAIN_BAR = 2.0
PLAIN = ("eager", "compile", "sparse")


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def check(step: dict | None, stages: list[dict]) -> tuple[list[dict], list[str]]:
    """(bars, problems) for the rows of one `mlfast bench` run."""
    problems = [f"stage {s['stage']} failed (rc {s['rc']})" for s in stages if s.get("rc", 0) != 0]
    bars: list[dict] = []
    if step is None:
        problems.append("no step.json: the training-step benchmark did not run or wrote nothing")
        return bars, problems
    rows = step.get("rows", [])
    for r in rows:
        if "error" in r:
            problems.append(f"{r['workload']} {r['impl']}: {r['error'][:200]}")
    for wl in dict.fromkeys(r["workload"] for r in rows):
        ok = {r["impl"]: r for r in rows if r["workload"] == wl and "samples_per_s" in r}
        m = ok.get("mlfast")
        if m is None:
            problems.append(f"{wl}: no mlfast row")
            continue
        missing = [i for i in PLAIN if i not in ok]
        eager_x = m["samples_per_s"] / ok["eager"]["samples_per_s"] if "eager" in ok else None
        best_x = None if missing else m["samples_per_s"] / max(ok[i]["samples_per_s"] for i in PLAIN)
        need = EAGER_BARS.get(m["rows"])
        bar = {"workload": wl, "x_eager": eager_x, "eager_bar": need,
               "eager_bar_met": None if need is None else (eager_x is not None and eager_x >= need),
               "x_best_plain": best_x, "best_plain_bar": BEST_PLAIN_BAR,
               "best_plain_bar_met": best_x is not None and best_x >= BEST_PLAIN_BAR,
               "best_plain_missing": missing,
               "graph": {i: ok[i].get("graph", {}).get("captures") for i in ok}}
        bars.append(bar)
        if missing:
            problems.append(f"{wl}: best-plain bar not checkable, missing {', '.join(missing)}")
        elif not bar["best_plain_bar_met"]:
            problems.append(f"{wl}: x{best_x:.2f} the best plain alternative, bar {BEST_PLAIN_BAR}")
        if need is not None and not bar["eager_bar_met"]:
            problems.append(f"{wl}: x{eager_x or 0:.2f} eager, bar {need}")
    return bars, problems


def merge(out: Path) -> dict:
    step = _load(out / "step.json")
    stages = []
    if (out / "stages.jsonl").is_file():
        stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines() if line.strip()]
    bars, problems = check(step, stages)
    base = step or {}
    kernels = {"mutual_loss": _load(out / "loss.json"), "embedding": _load(out / "embedding.json")}
    for name, k in kernels.items():
        if k is None:
            problems.append(f"no {name} kernel results")
    return {"gpu": base.get("gpu"), "torch": base.get("torch"), "triton": base.get("triton"), "cuda": base.get("cuda"),
            "python": base.get("python"), "cpu": base.get("cpu"), "config": base.get("config"),
            "rows": base.get("rows", []), "bars": bars, "kernels": kernels, "stages": stages, "problems": problems}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__)
        return 2
    out, results_dir = Path(argv[1]), Path(argv[2])
    res = merge(out)
    text = json.dumps(res, indent=1) + "\n"
    (out / "results.json").write_text(text)
    name = re.sub(r"[^A-Za-z0-9]+", "_", res["gpu"] or res["cpu"] or "unknown").strip("_").lower()
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(text)
    print(f"{res['gpu'] or res['cpu']} | torch {res['torch']} | triton {res['triton']}")
    for r in res["rows"]:
        if "samples_per_s" in r:
            extra = "" if r.get("x_best_plain") is None else f"  x{r['x_best_plain']:.2f} best plain"
            print(f"{r['workload']:32s} {r['impl']:8s} {r['samples_per_s']:>14,.0f} samples/s  "
                  f"x{r.get('x_eager') or float('nan'):.2f} eager{extra}")
        else:
            print(f"{r['workload']:32s} {r['impl']:8s} ERROR {r.get('error', '')[:100]}")
    for p in res["problems"]:
        print("PROBLEM:", p)
    print(f"wrote {out / 'results.json'} and {results_dir / (name + '.json')}")
    return 1 if res["problems"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
