"""``mlfast bench``: training-step throughput of mlfast against the plain-PyTorch ways, in one run.

Workload (ANCHORS.md): DeepFM + DCN trained mutually, 39 categorical fields, embedding dim 16,
MLP 400-400-400 with BatchNorm and dropout 0.2, DCN with 3 cross layers, KL mutual loss, fp32,
ids already on the device (no loader in the loop). Implementations:

* ``eager``   FuxiCTR-style: one table per peer, dense Adam over every row (``PlainEngine``)
* ``compile`` the same, forward + loss under ``torch.compile(mode="reduce-overhead")``
* ``sparse``  sparse-gradient embeddings + ``SparseAdam`` (``TorchSparseEngine``)
* ``mlfast``  interleaved peer tables, fused lookup + sparse optimizer, fused loss, CUDA graph

Throughput is samples per second over timed steps after warm-up; every row also carries the
median step time with p20/p80. Compare only within one run (ANCHORS: run-to-run noise is large).
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from mlfast.train.baselines import CompiledPlainEngine, TorchSparseEngine
from mlfast.train.config import TrainConfig
from mlfast.train.engine import FusedEngine, PlainEngine
from mlfast.models import FeatureSchema, build_model, parse_peers

IMPLS = {"eager": PlainEngine, "compile": CompiledPlainEngine, "sparse": TorchSparseEngine, "mlfast": FusedEngine}
NUM_FIELDS = 39


@dataclass(frozen=True)
class Workload:
    peers: str = "deepfm,dcn"
    rows: int = 1_800_000  # rows per peer table
    batch: int = 4096

    @property
    def name(self) -> str:
        return f"{self.peers.replace(',', '+')} rows={_short(self.rows)} B={self.batch}"


def _short(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}k"


def schema_for(rows: int, fields: int = NUM_FIELDS) -> FeatureSchema:
    """Fields of (nearly) equal size summing to ``rows``."""
    sizes = np.full(fields, rows // fields)
    sizes[: rows % fields] += 1
    return FeatureSchema(tuple(np.concatenate([[0], np.cumsum(sizes)]).tolist()))


def random_batches(schema: FeatureSchema, batch: int, count: int, device, seed: int = 0):
    """``count`` batches of ids drawn per field with a Zipf-like skew (hot rows repeat, as in logs)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    off = torch.tensor(schema.field_offsets, dtype=torch.int64)
    sizes = (off[1:] - off[:-1]).double()
    out = []
    for _ in range(count):
        u = torch.rand(batch, schema.num_fields, generator=g, dtype=torch.float64)
        ids = (sizes * u.pow(3)).long().clamp_max(sizes.long() - 1) + off[:-1]
        labels = (torch.rand(batch, generator=g) < 0.25).float()
        out.append((ids.to(device), labels.to(device)))
    return out


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_engine(impl: str, wl: Workload, device: torch.device, steps: int = 30, warmup: int = 5,
                seed: int = 0) -> dict:
    """Build ``impl`` for ``wl`` and time ``steps`` training steps after ``warmup``."""
    schema = schema_for(wl.rows)
    specs = parse_peers(wl.peers)
    cfg = TrainConfig(peers=[str(s) for s in specs], embedding_l2=0.0, engine="plain", progress=False)
    torch.manual_seed(seed)
    peers = nn.ModuleList([build_model(s, schema, 16) for s in specs]).to(device)
    engine = IMPLS[impl](peers, cfg, device, 1e-3)
    engine.set_alpha(1.0)
    engine.train(True)
    batches = random_batches(schema, wl.batch, 8, device, seed)
    for i in range(warmup):
        ids, y = batches[i % len(batches)]
        engine.train_step(ids, None, y)
    _sync(device)
    cuda = device.type == "cuda"
    # per-step times from CUDA events (no host sync between steps); wall time for the total
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)] if cuda else []
    times = []
    t_all = time.perf_counter()
    for i in range(steps):
        ids, y = batches[i % len(batches)]
        if cuda:
            events[i][0].record()
            loss = engine.train_step(ids, None, y)
            events[i][1].record()
        else:
            t0 = time.perf_counter()
            loss = engine.train_step(ids, None, y)
            times.append((time.perf_counter() - t0) * 1e3)
    _sync(device)
    total = time.perf_counter() - t_all
    if cuda:
        times = [a.elapsed_time(b) for a, b in events]
    if not torch.isfinite(loss).all():
        raise RuntimeError(f"{impl}: non-finite loss in {wl.name}")
    ms = np.array(times)
    return {
        "impl": impl, "workload": wl.name, "peers": wl.peers, "rows": wl.rows, "batch": wl.batch,
        "samples_per_s": steps * wl.batch / total,
        "ms_per_step_median": float(np.median(ms)), "ms_p20": float(np.percentile(ms, 20)),
        "ms_p80": float(np.percentile(ms, 80)), "steps": steps, "warmup": warmup,
    }


def environment(device: torch.device) -> dict:
    env = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["gpu"] = None
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def default_workloads(device: torch.device) -> list[Workload]:
    if device.type == "cuda":
        return [Workload(rows=1_800_000, batch=4096), Workload(rows=1_800_000, batch=16384),
                Workload(rows=35_300_000, batch=4096), Workload(rows=35_300_000, batch=16384)]
    # the CPU is the development / CI path: the same model, sizes a 2-core machine can time
    return [Workload(rows=200_000, batch=1024), Workload(rows=1_800_000, batch=1024)]


def run(impls: Sequence[str], workloads: Sequence[Workload], device: torch.device, steps: int, warmup: int,
        log=print) -> dict:
    """Time every impl on every workload; returns {"gpu", "torch", "triton", ..., "rows": [...]}."""
    result = {**environment(device), "config": {
        "fields": NUM_FIELDS, "embedding_dim": 16, "mlp": [400, 400, 400], "dcn_layers": 3,
        "mutual": "kl", "optimizer": "adam lr=1e-3", "precision": "fp32", "steps": steps, "warmup": warmup}}
    rows = []
    for wl in workloads:
        base = None
        for impl in impls:
            try:
                r = time_engine(impl, wl, device, steps, warmup)
            except Exception as exc:  # one failing baseline (e.g. compile) must not lose the others
                r = {"impl": impl, "workload": wl.name, "error": f"{type(exc).__name__}: {exc}"}
                log(f"  {impl:8s} {wl.name}: FAILED ({r['error'][:200]})")
                rows.append(r)
                continue
            if impl == "eager":
                base = r["samples_per_s"]
            r["x_eager"] = r["samples_per_s"] / base if base else None
            rows.append(r)
            log(f"  {impl:8s} {wl.name}: {r['samples_per_s']:>12,.0f} samples/s  "
                f"{r['ms_per_step_median']:8.2f} ms/step (p20 {r['ms_p20']:.2f}, p80 {r['ms_p80']:.2f})"
                + (f"  x{r['x_eager']:.2f} eager" if r.get("x_eager") else ""))
        ok = [r for r in rows if r["workload"] == wl.name and "error" not in r]
        best_alt = max((r["samples_per_s"] for r in ok if r["impl"] != "mlfast"), default=None)
        for r in ok:
            if r["impl"] == "mlfast" and best_alt:
                r["x_best_plain"] = r["samples_per_s"] / best_alt
    result["rows"] = rows
    return result


def format_results(result: dict) -> str:
    from mlfast.report import format_table

    head = f"{result.get('gpu') or result['cpu']} | torch {result['torch']} | triton {result['triton']}"
    body = format_table(
        ["workload", "impl", "samples/s", "ms/step", "x eager", "x best plain"],
        [[r["workload"], r["impl"], r.get("samples_per_s"), r.get("ms_per_step_median"), r.get("x_eager"),
          r.get("x_best_plain")] if "error" not in r else [r["workload"], r["impl"], "error", "-", "-", "-"]
         for r in result["rows"]])
    return head + "\n" + body


def main(impls: Sequence[str], device: str, rows: Sequence[int] | None, batches: Sequence[int] | None,
         steps: int, warmup: int, json_path: str | None) -> dict:
    from mlfast.train.trainer import resolve_device

    dev = resolve_device(device)
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise ValueError(f"unknown impl {unknown[0]!r}; choose from {', '.join(IMPLS)}")
    if rows or batches:
        base = default_workloads(dev)
        rows = rows or sorted({w.rows for w in base})
        batches = batches or sorted({w.batch for w in base})
        workloads = [Workload(rows=r, batch=b) for r in rows for b in batches]
    else:
        workloads = default_workloads(dev)
    result = run(impls, workloads, dev, steps, warmup)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    print(format_results(result))
    return result
