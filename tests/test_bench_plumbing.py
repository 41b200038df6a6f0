"""The benchmark plumbing: ratios only between rows of one run, no best-plain ratio without every
plain alternative, a results collector that fails on any failed stage or missed bar, and a small
`mlfast bench` run on the CPU (every implementation, the MLP bound included)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mlfast import bench

ROOT = Path(__file__).resolve().parents[1]


def collector():
    spec = importlib.util.spec_from_file_location("collect_results", ROOT / "bench" / "collect_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def row(impl, sps, rows=1_800_000, wl="w"):
    return {"impl": impl, "workload": wl, "rows": rows, "samples_per_s": sps}


def test_best_plain_ratio_needs_every_plain_alternative():
    rows = [row("eager", 100.0), row("sparse", 300.0), row("mlfast", 900.0), row("mlp", 1000.0)]
    bench.ratios(rows, "w")
    m = rows[2]
    assert m["x_eager"] == 9.0 and m["pct_of_mlp_bound"] == 90.0
    assert m["x_best_plain"] is None and m["best_plain_missing"] == ["compile"]
    rows.insert(1, row("compile", 450.0))
    bench.ratios(rows, "w")
    assert rows[3]["x_best_plain"] == 2.0 and rows[3]["best_plain_missing"] == []


def _write(out: Path, step: dict | None, stages: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if step is not None:
        (out / "step.json").write_text(json.dumps(step))
    (out / "stages.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stages))
    for name in ("loss.json", "embedding.json"):
        (out / name).write_text("{}")


def test_collector_exit_status(tmp_path):
    cr = collector()
    good = {"gpu": "H200", "rows": [row("eager", 100.0), row("compile", 200.0), row("sparse", 300.0),
                                    row("mlfast", 700.0)]}
    _write(tmp_path / "a", good, [{"stage": "bench_step", "rc": 0}])
    assert cr.main(["x", str(tmp_path / "a"), str(tmp_path / "res")]) == 0
    # the eager row missing: no crash, a problem, a non-zero exit
    missing = {"gpu": "H200", "rows": [row("compile", 200.0), row("sparse", 300.0), row("mlfast", 900.0)]}
    _write(tmp_path / "b", missing, [{"stage": "bench_step", "rc": 0}])
    assert cr.main(["x", str(tmp_path / "b"), str(tmp_path / "res")]) == 1
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert any("missing eager" in p for p in res["problems"])
    # a failed stage alone fails the collection
    _write(tmp_path / "c", good, [{"stage": "gpu_tests", "rc": 1}])
    assert cr.main(["x", str(tmp_path / "c"), str(tmp_path / "res")]) == 1
    # a missed bar: 700 / 300 = 2.33 >= 2 but 7x eager < 5? no: 7 >= 5; make it miss
    slow = {"gpu": "H200", "rows": [row("eager", 100.0), row("compile", 200.0), row("sparse", 300.0),
                                    row("mlfast", 450.0)]}
    _write(tmp_path / "d", slow, [])
    assert cr.main(["x", str(tmp_path / "d"), str(tmp_path / "res")]) == 1
    # nothing measured at all
    _write(tmp_path / "e", None, [])
    assert cr.main(["x", str(tmp_path / "e"), str(tmp_path / "res")]) == 1


@pytest.mark.slow
def test_bench_runs_every_implementation_on_the_cpu(tmp_path):
    out = tmp_path / "step.json"
    res = bench.main(["eager", "sparse", "mlfast", "mlp"], "cpu", [20_000], [256], 2, 1, str(out))
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    by = {r["impl"]: r for r in saved["rows"]}
    assert set(by) == {"eager", "sparse", "mlfast", "mlp"} and all("samples_per_s" in r for r in by.values())
    assert by["mlfast"]["x_eager"] > 0 and by["mlfast"]["pct_of_mlp_bound"] > 0
    il = by["mlfast"]["interleaved"]
    assert il["mlfast_ms"] > 0 and il["mlp_ms"] > 0
    assert by["mlfast"]["pct_of_mlp_bound_interleaved"] == pytest.approx(100 * il["mlp_ms"] / il["mlfast_ms"])
    assert by["mlfast"]["best_plain_missing"] == ["compile"] and by["mlfast"]["x_best_plain"] is None
    assert "avx512f" in saved["cpu_flags"] and saved["cpu"]


def test_plain_baselines_run_the_reference_ops_and_mlfast_its_own():
    from mlfast.models.blocks import CrossNet
    from mlfast.ops.dropout import ReLUDropout

    wl = bench.Workload(rows=2_000, batch=8)
    for impl, want in (("eager", {"reference"}), ("mlfast", {"auto"})):
        engine, _ = bench.build(impl, wl, torch.device("cpu"))
        impls = {m.impl for m in engine.group.modules() if isinstance(m, (CrossNet, ReLUDropout))}
        assert impls == want, impl
