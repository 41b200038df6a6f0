"""Helpers the benchmark scripts share: the machine description recorded with each table,
order-statistic quantiles (median, p20, p80) of a list of timings, round-robin timing of CPU
alternatives in one process (``time_round_robin``, its table rows ``round_robin_rows`` and their
printout ``print_rows``), ONE timing method for kernels and
their baselines (``time_ms``), the device-copy yardstick of the same bytes (``copy_ms``), and a JSON
results file rewritten after every case (``ResultsFile``), so a run cut short keeps what it measured.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Sequence


def quantile(xs: list[float], q: float) -> float:
    """The order statistic nearest to quantile ``q`` (no interpolation: always a measured time)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def machine() -> str:
    """CPU model, core count and load average, e.g. ``AMD EPYC 7B13, 2 CPUs, load average 0.76``."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, load average {load:.2f}"


# Bigger than the L2 of any current GPU (H100 50 MB, H200 60 MB, B200 126 MB): zeroing it evicts
# everything a previous repetition left in L2.
FLUSH_BYTES = 256 << 20
_flush_buffers: dict = {}


def time_ms(fn: Callable[[], object], device: str = "cuda", graph: bool = False, flush: bool = True,
            reps: int = 50, warmup: int = 5) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn``: the one method every kernel and baseline is timed with.

    On CUDA each repetition is bracketed by its own pair of events, after an L2 flush (``flush``,
    outside the bracket) so every repetition starts from DRAM; ``graph=True`` captures ``fn`` once
    in a CUDA graph and times its replays (the trainer's step), so launch overhead is gone. The same
    flag values must be used for the two sides of any comparison. On the CPU: wall-clock per call
    (no flush, no graph; under the Triton interpreter these numbers only show the code runs).
    """
    if device != "cuda":
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t0))
        return quantile(ts, 0.5), quantile(ts, 0.2), quantile(ts, 0.8)
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # allocator and lazy-init work happen outside the capture
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
        run()
    buf = None
    if flush:
        dev = torch.cuda.current_device()
        buf = _flush_buffers.get(dev)
        if buf is None:
            buf = _flush_buffers[dev] = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        if buf is not None:
            buf.zero_()
        s.record()
        run()
        e.record()
    torch.cuda.synchronize()
    ts = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return quantile(ts, 0.5), quantile(ts, 0.2), quantile(ts, 0.8)


def copy_ms(nbytes: int, device: str = "cuda", graph: bool = False, flush: bool = True, reps: int = 50,
            warmup: int = 5) -> tuple[float, float, float]:
    """``time_ms`` of a device-to-device copy that moves ``nbytes`` in all (``nbytes / 2`` read and
    as many written): the yardstick for an operation whose counted traffic is ``nbytes``. Timed
    like the operation (same ``graph`` / ``flush``), at the same size, so launch and tail effects
    match: the fraction ``copy_ms / op_ms`` stays under 1 unless the operation moves its counted
    bytes faster than a plain copy of them."""
    import torch

    n = max(1, nbytes // 2 // 4)
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src), device, graph, flush, reps, warmup)


class ResultsFile:
    """Rows of a benchmark run, rewritten as one JSON list after every ``add`` (write to a temporary
    name, then rename: a run killed mid-write still leaves the previous complete file)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.rows: list[dict] = []

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.rows, indent=1))
            os.replace(tmp, self.path)
        return row


def time_round_robin(steps: dict[str, Callable[[], object]], rounds: int,
                     warmup: int = 3) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall, process CPU) seconds per call of each step, the steps interleaved call by call. CPU
    time counts all of the process's threads, spinning ones included; on a shared machine it is
    less skewed by other jobs than wall time."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def round_robin_rows(steps: dict[str, Callable[[], object]], rounds: int, baseline: str, **labels) -> list[dict]:
    """`time_round_robin` of ``steps``, one row per step: ``labels``, the step's name as ``method``,
    median / p20 / p80 wall ms and median process-CPU ms, and both medians as ratios to
    ``baseline``'s."""
    import torch

    wall, cpu = time_round_robin(steps, rounds)
    ref, ref_cpu = quantile(wall[baseline], 0.5), quantile(cpu[baseline], 0.5)
    rows = []
    for m in steps:
        med, med_cpu = quantile(wall[m], 0.5), quantile(cpu[m], 0.5)
        rows.append({**labels, "method": m, "median_ms": 1e3 * med, "p20_ms": 1e3 * quantile(wall[m], 0.2),
                     "p80_ms": 1e3 * quantile(wall[m], 0.8), "ratio": med / ref, "cpu_ms": 1e3 * med_cpu,
                     "cpu_ratio": med_cpu / ref_cpu, "baseline": baseline, "rounds": rounds,
                     "threads": torch.get_num_threads()})
    return rows


def print_rows(rows: list[dict], labels: Sequence[tuple[str, int]]) -> None:
    """The rows of `round_robin_rows` as a table: the ``(key, width)`` label columns, then the timings."""
    head = " ".join(f"{k:>{w}}" for k, w in labels)
    print(f"{head} {'median ms':>10} {'p20':>8} {'p80':>8} {'ratio':>7} {'cpu ms':>8} {'cpu ratio':>9}")
    for r in rows:
        cols = " ".join(f"{r[k]:>{w}}" for k, w in labels)
        print(f"{cols} {r['median_ms']:10.2f} {r['p20_ms']:8.2f} {r['p80_ms']:8.2f} {r['ratio']:7.3f} "
              f"{r['cpu_ms']:8.2f} {r['cpu_ratio']:9.3f}")
