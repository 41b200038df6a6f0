"""The C heap's settings for a training process: freed step buffers stay mapped for the next step.

A CPU training step allocates and frees the same activations and gradients every step (a few to a
few tens of MB each at B=4096). With glibc's defaults the heap's free top is handed back to the
OS when it passes the trim threshold (and buffers past the mmap threshold are unmapped on free), so
the next step faults the same memory in again, 4 KiB and one zeroing at a time. Measured on
mlfast's DeepFM + DCN step (1.8M rows, B=4096, 2-core AMD EPYC; ``bench/step_malloc.py``, three
alternated process pairs): 9,700-15,400 minor faults per step with glibc's defaults, 45-300 with
these settings (the heap's top still grows past its old extent now and then), and the step
1.11-1.19x faster. What it costs: up to ``TRIM_THRESHOLD`` of freed memory may stay in the process
instead of going back to the OS.

Only glibc's allocator is touched (Linux); elsewhere, or where the user chose the settings
(``MALLOC_*_`` variables, ``GLIBC_TUNABLES``, a preloaded allocator), nothing changes.
``MLFAST_MALLOC=system`` keeps the defaults.
"""
from __future__ import annotations

import ctypes
import os
import platform

MMAP_THRESHOLD = 64 << 20  # buffers below this come from the heap (and are reused), not mmap
TRIM_THRESHOLD = 512 << 20  # the heap's free top is given back to the OS only past this
TOP_PAD = 64 << 20  # each heap growth asks for this much more, so growth is rare
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
_USER_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")
_APPLIED: dict | None = None


def tune_malloc() -> dict | None:
    """Apply mlfast's heap settings to this process, once; returns them, or None where nothing was
    changed (not glibc, ``MLFAST_MALLOC=system``, or the user's own malloc settings in the
    environment). Safe to call from every entry point.

    Example::

        >>> s = tune_malloc()
        >>> s is None or s["trim_threshold"] == TRIM_THRESHOLD
        True
    """
    global _APPLIED
    if _APPLIED is not None:
        return _APPLIED
    if os.environ.get("MLFAST_MALLOC", "").lower() == "system" or any(os.environ.get(k) for k in _USER_ENV):
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first (setting any of them turns glibc's dynamic thresholds off); glibc
    # releases before 2.35 refuse one above 32 MiB
    mmap_threshold = next((v for v in (MMAP_THRESHOLD, 32 << 20) if mallopt(_M_MMAP_THRESHOLD, v) == 1), None)
    if mmap_threshold is None or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1 or mallopt(_M_TOP_PAD, TOP_PAD) != 1:
        return None
    _APPLIED = {"mmap_threshold": mmap_threshold, "trim_threshold": TRIM_THRESHOLD, "top_pad": TOP_PAD}
    return _APPLIED
