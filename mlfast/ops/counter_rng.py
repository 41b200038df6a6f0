"""Counter-based random numbers: value i of stream ``seed`` is a pure function of (seed, i).

No generator state to carry: any element of a table's initialisation can be regenerated on its own
(a checkpoint stores only the rows training changed; the rest are regenerated from the seed), the
same on every machine, thread count and torch version.

The mixer is SplitMix64's finaliser (Steele, Lea & Flood, 2014) applied to ``seed`` and the
counter (a bijection of 64-bit words with good avalanche), and normals come from Box-Muller on two
53-bit uniforms.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np

from mlfast.ops.threads import parallel_for

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@nb.njit(inline="always")
def mix64(x):  # pragma: no cover - numba
    """SplitMix64's finaliser: a bijection of uint64 with full avalanche."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


@nb.njit(inline="always")
def stream_key(seed):  # pragma: no cover - numba
    return mix64(np.uint64(seed) * _GOLDEN + _GOLDEN)


@nb.njit(inline="always")
def uniform53(key, counter):  # pragma: no cover - numba
    """A uniform in (0, 1] from 53 bits of mix(key + counter * golden)."""
    h = mix64(key + np.uint64(counter) * _GOLDEN)
    return (np.float64(h >> np.uint64(11)) + 1.0) * (1.0 / 9007199254740992.0)


@nb.njit(inline="always")
def normal(key, counter):  # pragma: no cover - numba
    """A standard normal: Box-Muller on the uniforms of counters 2c and 2c + 1."""
    u1 = uniform53(key, np.uint64(2) * np.uint64(counter))
    u2 = uniform53(key, np.uint64(2) * np.uint64(counter) + np.uint64(1))
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


@nb.njit(nogil=True, cache=True)
def _fill_normal(out, rows, seed, width, col0, std, lo, hi):  # pragma: no cover - numba
    key = stream_key(seed)
    for i in range(lo, hi):
        base = np.uint64(rows[i]) * np.uint64(width)
        for c in range(width):
            out[i, col0 + c] = np.float32(std * normal(key, base + np.uint64(c)))


def normal_rows(seed: int, rows: np.ndarray, width: int, std: float, out: np.ndarray | None = None,
                col0: int = 0) -> np.ndarray:
    """``std`` x N(0, 1) for elements (r, c), r in ``rows``, c < ``width``, of stream ``seed``:
    ``out[i, col0 + c]`` (float32) is element (rows[i], c) whatever else is generated.

    Example::

        >>> a = normal_rows(7, np.arange(4), 3, 1.0)
        >>> bool((normal_rows(7, np.array([2]), 3, 1.0)[0] == a[2]).all())
        True
    """
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if out is None:
        out = np.empty((len(rows), width), np.float32)
    if out.dtype != np.float32 or out.ndim != 2 or out.shape[0] != len(rows) or out.shape[1] < col0 + width:
        raise ValueError(f"out must be float32 [{len(rows)}, >= {col0 + width}], got {out.dtype} {out.shape}")
    if rows.size and rows.min() < 0:
        raise ValueError("rows must be >= 0")
    key = np.uint64(seed % (1 << 64))
    # serial GIL-free pieces on the shared thread budget (not numba's prange: see mlfast.ops.threads)
    parallel_for(lambda lo, hi: _fill_normal(out, rows, key, int(width), int(col0), float(std), lo, hi),
                 len(rows), 1 << 15)
    return out
