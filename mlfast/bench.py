"""``mlfast bench``: training-step throughput of mlfast against the plain-PyTorch ways, in one run.

Workload (ANCHORS.md): DeepFM + DCN trained mutually, 39 categorical fields, embedding dim 16,
MLP 400-400-400 with BatchNorm and dropout 0.2, DCN with 3 cross layers, KL mutual loss, ids
already on the device (no loader in the loop). Implementations, each an `Engine` on a `PeerGroup`:

* ``eager``   FuxiCTR-style: one table per peer, dense Adam over every row, ``F.dropout`` (``PlainEngine``)
* ``compile`` the same, forward + loss under ``torch.compile(mode="reduce-overhead")``
* ``sparse``  sparse-gradient embeddings + ``SparseAdam`` (``TorchSparseEngine``)
* ``mlfast``  interleaved peer tables, fused lookup + sparse optimizer, fused loss
* ``mlp``     the peers' MLPs alone (same shapes and precision, no embeddings, no dropout, dense
              Adam): the compute bound of the step on this machine, not a way to train

On CUDA every engine's step runs through the same `GraphedStep` (captured once, replayed), so the
comparison is graphed against graphed; a failed capture is recorded in the row. Throughput is
samples per second over timed steps after warm-up; every row also carries the median step time
with p20/p80. Ratios are computed only between rows of the same run. The JSON is rewritten after
every row, so a time-out keeps what was measured.

"% of MLP bound" divides two timings taken minutes apart; on a machine whose speed drifts (a shared
VM) that moves the ratio by several points. So mlfast and the bound are also timed in alternation,
blocks of steps flipped every round in one process (`interleaved_bound`): "% interleaved", the
steadier figure.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from mlfast.io.batches import Batch
from mlfast.models import FeatureSchema, build_model, parse_peers
from mlfast.ops.allocator import tune_malloc
from mlfast.train.baselines import CompiledPlainEngine, TorchSparseEngine
from mlfast.train.config import TrainConfig
from mlfast.train.engine import FusedEngine, PlainEngine, build_group
from mlfast.train.graphed import GraphedStep

IMPLS = {"eager": PlainEngine, "compile": CompiledPlainEngine, "sparse": TorchSparseEngine, "mlfast": FusedEngine,
         "mlp": None}
NUM_FIELDS = 39
PLAIN = ("eager", "compile", "sparse")  # the plain-PyTorch ways; "mlp" is a bound, not an alternative


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


def random_batches(schema: FeatureSchema, batch: int, count: int, device, seed: int = 0,
                   ids_dtype: torch.dtype = torch.int32) -> list[Batch]:
    """``count`` batches of ids drawn per field with a Zipf-like skew (hot rows repeat, as in logs)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    off = torch.tensor(schema.field_offsets, dtype=torch.int64)
    sizes = (off[1:] - off[:-1]).double()
    out = []
    for _ in range(count):
        u = torch.rand(batch, schema.num_fields, generator=g, dtype=torch.float64)
        ids = (sizes * u.pow(3)).long().clamp_max(sizes.long() - 1) + off[:-1]
        labels = (torch.rand(batch, generator=g) < 0.25).float()
        out.append(Batch(sparse=ids.to(ids_dtype).to(device), dense=None, labels=labels.to(device),
                         index=torch.arange(batch)))
    return out


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MLPBound:
    """The peers' MLPs alone, fed random inputs of the embedding shape: forward, a BCE, backward
    and dense Adam; same precision as the engines. What the step costs when embeddings, dropout and
    the mutual loss are free."""

    name = "mlp"

    def __init__(self, specs, schema: FeatureSchema, cfg: TrainConfig, device: torch.device):
        self.device = device
        self.mlps = nn.ModuleList()
        for spec in specs:
            m = build_model(dataclasses.replace(spec, options={**spec.options, "dropout": 0.0}), schema,
                            cfg.embedding_dim)
            mlp = getattr(m, "mlp", None)
            if mlp is None:
                raise ValueError(f"{spec.model} has no MLP block to time")
            self.mlps.append(mlp)
        self.mlps.to(device)
        self.in_dims = [m.linears[0].in_features for m in self.mlps]
        self.opt = torch.optim.Adam(self.mlps.parameters(), lr=1e-3, fused=True)
        self.use_bf16 = cfg.bf16

    def train_step(self, batch: Batch, guard=None) -> torch.Tensor:
        B = batch.sparse.shape[0]
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.use_bf16 else torch.autocast(
            self.device.type, enabled=False)
        with ctx:
            # DCN's deep part ends without an output layer ([B, 400]): its mean stands in for it
            outs = [mlp(torch.randn(B, d, device=self.device)).float().mean(1) for mlp, d in
                    zip(self.mlps, self.in_dims)]
        loss = sum(nn.functional.binary_cross_entropy_with_logits(o, batch.labels) for o in outs)
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        self.opt.step()
        return loss.detach().reshape(1)


def build(impl: str, wl: Workload, device: torch.device, bf16: bool = False, seed: int = 0):
    """The engine (or the MLP bound) of ``impl`` for ``wl``."""
    schema = schema_for(wl.rows)
    specs = parse_peers(wl.peers)
    cfg = TrainConfig(peers=[str(s) for s in specs], embedding_l2=0.0, progress=False, bf16=bf16)
    torch.manual_seed(seed)
    if impl == "mlp":
        return MLPBound(specs, schema, cfg, device), schema
    seeds = [seed + i for i in range(len(specs))]
    kind = "fused" if impl == "mlfast" else "plain"
    lr = torch.full((1,), 1e-3, dtype=torch.float32, device=device)
    # dense_touch: the benchmark stands for training on data that touches every row (steady state)
    group = build_group(specs, schema, cfg, device, seeds, lr, engine=kind, dense_touch=True)
    if kind == "fused" and device.type == "cpu":
        # the steady state of a long run: every row initialised, the optimizer state's pages backed
        tables = group.tables
        tables.materialize(torch.arange(tables.num_rows))
        for x in tables.state.tensors().values():
            x.zero_()
    if impl != "mlfast":  # the plain-PyTorch ways: F.dropout (as FuxiCTR's models), DCN's cross in torch ops
        from mlfast.models.blocks import use_reference_ops

        use_reference_ops(group)
    engine = IMPLS[impl](group, cfg, device, 1e-3, lr)
    engine.set_alpha(1.0)
    group.train(True)
    return engine, schema


def time_engine(impl: str, wl: Workload, device: torch.device, steps: int = 30, warmup: int = 5,
                seed: int = 0, bf16: bool = False) -> dict:
    """Build ``impl`` for ``wl`` and time ``steps`` training steps after ``warmup``."""
    engine, schema = build(impl, wl, device, bf16, seed)
    step = GraphedStep(engine, enabled=device.type == "cuda" and impl not in ("compile", "mlp"), fallback=True)
    batches = random_batches(schema, wl.batch, 8, device, seed)
    for i in range(warmup):
        step(batches[i % len(batches)])
    _sync(device)
    cuda = device.type == "cuda"
    # per-step times from CUDA events (no host sync between steps); wall time for the total
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)] \
        if cuda else []
    times = []
    t_all = time.perf_counter()
    for i in range(steps):
        b = batches[i % len(batches)]
        if cuda:
            events[i][0].record()
            loss = step(b)
            events[i][1].record()
        else:
            t0 = time.perf_counter()
            loss = step(b)
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
        "precision": "bf16" if bf16 else "fp32", "samples_per_s": steps * wl.batch / total,
        "ms_per_step_median": float(np.median(ms)), "ms_p20": float(np.percentile(ms, 20)),
        "ms_p80": float(np.percentile(ms, 80)), "steps": steps, "warmup": warmup, "graph": dict(step.stats),
    }


def alternate_blocks(run: Callable[[str], object], names: Sequence[str], rounds: int, block: int,
                     sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """ms per step of each side, per block: the sides take turns in blocks of ``block`` timed calls
    of ``run(name)`` (the order flipped every round), each block after one untimed call (the first
    step after a switch finds the caches full of the other side's data). The one alternation loop of
    `interleaved_bound` and ``bench/step_ab.py``.

    Example::

        >>> sorted(alternate_blocks(lambda name: None, ["a", "b"], rounds=2, block=1))
        ['a', 'b']
    """
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (list(names) if r % 2 == 0 else list(names)[::-1]):
            run(name)  # untimed: back in cache after the other side's block
            sync()
            t0 = time.perf_counter()
            for _ in range(block):
                run(name)
            sync()
            times[name].append((time.perf_counter() - t0) / block * 1e3)
    return times


def interleaved_bound(wl: Workload, device: torch.device, rounds: int = 6, block: int = 4, warmup: int = 3,
                      seed: int = 0, bf16: bool = False) -> dict:
    """mlfast's step against the MLP bound timed in alternation (blocks of ``block`` steps, the order
    flipped every round) in one process: a machine whose speed drifts between the two separate
    timings of ``time_engine`` skews their ratio; here the drift falls on both (`alternate_blocks`;
    without its untimed step after each switch, mlfast's blocks of 3 averaged 156 ms per step at
    1.8 M rows, B=1024, against 93 ms timed alone). Median ms per step of each and ``pct`` =
    100 * bound ms / mlfast ms."""
    sides = {}
    for impl in ("mlfast", "mlp"):
        engine, schema = build(impl, wl, device, bf16, seed)
        step = GraphedStep(engine, enabled=device.type == "cuda" and impl == "mlfast", fallback=True)
        batches = random_batches(schema, wl.batch, 8, device, seed)
        for i in range(warmup):
            step(batches[i % len(batches)])
        sides[impl] = (step, batches)
    calls = {impl: 0 for impl in sides}

    def run(impl: str) -> None:
        step, batches = sides[impl]
        step(batches[calls[impl] % len(batches)])
        calls[impl] += 1

    times = alternate_blocks(run, ("mlfast", "mlp"), rounds, block, lambda: _sync(device))
    ms = {impl: float(np.median(t)) for impl, t in times.items()}
    return {"mlfast_ms": ms["mlfast"], "mlp_ms": ms["mlp"], "pct": 100.0 * ms["mlp"] / ms["mlfast"],
            "rounds": rounds, "block": block}


def environment(device: torch.device) -> dict:
    from mlfast.ops.cpu_features import cpu_features

    feats = cpu_features()
    env = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
           "cpu": feats.get("model") or platform.processor() or platform.machine(),
           "cpu_flags": {k: v for k, v in feats.items() if k != "model"}, "threads": torch.get_num_threads()}
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
    return [Workload(rows=200_000, batch=1024), Workload(rows=1_800_000, batch=1024),
            Workload(rows=1_800_000, batch=4096)]


def ratios(rows: list[dict], workload: str) -> None:
    """x_eager, x_best_plain, pct_of_bound for the rows of ``workload`` (in place). The best-plain
    ratio needs every plain alternative timed in this run: otherwise it is left out and the row
    says which were missing."""
    ok = {r["impl"]: r for r in rows if r["workload"] == workload and "samples_per_s" in r}
    eager = ok.get("eager")
    bound = ok.get("mlp")
    for r in ok.values():
        r["x_eager"] = r["samples_per_s"] / eager["samples_per_s"] if eager else None
        if bound is not None and r["impl"] != "mlp":
            r["pct_of_mlp_bound"] = 100.0 * r["samples_per_s"] / bound["samples_per_s"]
    m = ok.get("mlfast")
    if m is not None:
        missing = [i for i in PLAIN if i not in ok]
        m["best_plain_missing"] = missing
        m["x_best_plain"] = None if missing else m["samples_per_s"] / max(ok[i]["samples_per_s"] for i in PLAIN)


def run(impls: Sequence[str], workloads: Sequence[Workload], device: torch.device, steps: int, warmup: int,
        log=print, bf16: bool = False, json_path: str | None = None) -> dict:
    """Time every impl on every workload; returns {"gpu", "torch", "triton", ..., "rows": [...]}.
    With mlfast and mlp both timed, also their ratio timed in alternation
    (`interleaved_bound`): the mlfast row's ``pct_of_mlp_bound_interleaved``."""
    # the heap settings training runs with (mlfast.ops.allocator), for every impl alike
    result = {**environment(device), "malloc": tune_malloc(), "config": {
        "fields": NUM_FIELDS, "embedding_dim": 16, "mlp": [400, 400, 400], "dcn_layers": 3,
        "mutual": "kl", "optimizer": "adam lr=1e-3", "precision": "bf16" if bf16 else "fp32", "steps": steps,
        "warmup": warmup}, "rows": []}
    rows = result["rows"]
    for wl in workloads:
        for impl in impls:
            try:
                r = time_engine(impl, wl, device, steps, warmup, bf16=bf16)
            except Exception as exc:  # one failing baseline (e.g. compile) must not lose the others
                r = {"impl": impl, "workload": wl.name, "error": f"{type(exc).__name__}: {exc}"}
                log(f"  {impl:8s} {wl.name}: FAILED ({r['error'][:200]})")
                rows.append(r)
                _write(json_path, result)
                continue
            rows.append(r)
            ratios(rows, wl.name)
            log(f"  {impl:8s} {wl.name}: {r['samples_per_s']:>12,.0f} samples/s  "
                f"{r['ms_per_step_median']:8.2f} ms/step (p20 {r['ms_p20']:.2f}, p80 {r['ms_p80']:.2f})"
                + (f"  x{r['x_eager']:.2f} eager" if r.get("x_eager") else ""))
            _write(json_path, result)
        ratios(rows, wl.name)
        if {"mlfast", "mlp"} <= set(impls):
            mine = next((r for r in rows if r["workload"] == wl.name and r["impl"] == "mlfast" and "error" not in r), None)
            try:
                il = interleaved_bound(wl, device, bf16=bf16)
            except Exception as exc:  # noqa: BLE001 - the separate timings above still stand
                log(f"  interleaved mlfast / MLP bound {wl.name}: FAILED ({type(exc).__name__}: {exc})")
            else:
                if mine is not None:
                    mine["pct_of_mlp_bound_interleaved"] = il["pct"]
                    mine["interleaved"] = il
                log(f"  interleaved {wl.name}: mlfast {il['mlfast_ms']:.2f} ms/step, MLP bound {il['mlp_ms']:.2f}: "
                    f"{il['pct']:.1f} % of the bound")
            _write(json_path, result)
    _write(json_path, result)
    return result


def _write(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".partial")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(path)


def format_results(result: dict) -> str:
    from mlfast.report import format_table

    head = f"{result.get('gpu') or result['cpu']} | torch {result['torch']} | triton {result['triton']} | " \
           f"{result['config']['precision']}"
    body = format_table(
        ["workload", "impl", "samples/s", "ms/step", "x eager", "x best plain", "% of MLP bound",
         "% interleaved"],
        [[r["workload"], r["impl"], r.get("samples_per_s"), r.get("ms_per_step_median"), r.get("x_eager"),
          r.get("x_best_plain"), r.get("pct_of_mlp_bound"), r.get("pct_of_mlp_bound_interleaved")] if "error" not in r
         else [r["workload"], r["impl"], "error", "-", "-", "-", "-", "-"] for r in result["rows"]])
    return head + "\n" + body


def main(impls: Sequence[str], device: str, rows: Sequence[int] | None, batches: Sequence[int] | None,
         steps: int, warmup: int, json_path: str | None, bf16: bool = False) -> dict:
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
    result = run(impls, workloads, dev, steps, warmup, bf16=bf16, json_path=json_path)
    print(format_results(result))
    return result
