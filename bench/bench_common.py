"""Helpers the benchmark scripts share: the machine description recorded with each table, and
order-statistic quantiles (median, p20, p80) of a list of timings."""
from __future__ import annotations

import os
import platform


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
