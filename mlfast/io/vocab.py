"""Vocabulary mode (FuxiCTR/BARS preprocessing): count each field's values on the training split,
give the values seen at least ``min_count`` times their own row, and map the rest to the field's
out-of-vocabulary row.

Values are identified by the reader's 64-bit keys (``read_*(..., keys=True)``: the hash of
``mlfast/hashing.py`` before the bucket modulo; 0 = missing), so hashing and vocabularies share one
definition of "the same value". A field with K kept values owns K + 2 rows of the flat table:

    row 0        missing (empty in the input)
    rows 1..K    kept values, most frequent first (ties broken by key: deterministic)
    row K + 1    out of vocabulary: rarer than min_count in training, or never seen

Counting runs in numba on the CPU (``count_keys``) and in cupy on the GPU (``count_keys_cupy``);
both produce the same vocabulary, which is saved with the run (``save`` / ``load``) so eval and
predict map new data identically.

Multi-hot bag fields (``CTRData.bags``) get vocabularies of their own, after the one-hot fields:
every id in a bag counts once (a value in 100 training histories is seen 100 times), and an empty
bag's missing key maps to the field's missing row.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numba
import numpy as np

# FuxiCTR's thresholds for the BARS benchmarks
MIN_COUNT = {"criteo": 10, "avazu": 2}


@numba.njit(parallel=True, cache=True)
def _count_columns(keys: np.ndarray, uniq: np.ndarray, counts: np.ndarray, nuniq: np.ndarray) -> None:
    """Sort each column (in parallel over fields) and run-length count it, skipping missing (0)."""
    n, f = keys.shape
    for j in numba.prange(f):
        col = np.sort(keys[:, j])
        k = 0
        i = 0
        while i < n:
            key = col[i]
            start = i
            while i < n and col[i] == key:
                i += 1
            if key != 0:
                uniq[k, j] = key
                counts[k, j] = i - start
                k += 1
        nuniq[j] = k


def count_keys(keys: np.ndarray, rows: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per field: (distinct non-missing keys ascending, their counts) over ``rows`` of ``keys`` [N, F]."""
    k = np.ascontiguousarray(keys if rows is None else keys[rows]).view(np.uint64)
    n, f = k.shape
    uniq = np.empty((n, f), np.uint64)
    counts = np.empty((n, f), np.int64)
    nuniq = np.zeros(f, np.int64)
    if n:
        _count_columns(k, uniq, counts, nuniq)
    return [(uniq[: nuniq[j], j].copy(), counts[: nuniq[j], j].copy()) for j in range(f)]


def count_keys_cupy(keys, rows=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Same as `count_keys`, on the GPU with cupy (``keys`` a numpy array or a cupy array)."""
    import cupy as cp

    k = cp.asarray(keys if rows is None else keys[rows]).view(cp.uint64)
    out = []
    for j in range(k.shape[1]):
        col = k[:, j]
        col = col[col != 0]
        u, c = cp.unique(col, return_counts=True)
        out.append((cp.asnumpy(u), cp.asnumpy(c).astype(np.int64)))
    return out


@dataclass
class Vocabulary:
    """Kept keys per field (sorted by key for lookup) and their rows; see the module docstring."""

    keys: list[np.ndarray]  # per field: kept keys, sorted ascending (uint64)
    rows: list[np.ndarray]  # per field: the row (within the field, 1..K) of each kept key
    min_count: int
    field_names: list[str]
    num_bags: int = 0  # the last num_bags fields are bag fields

    @property
    def field_sizes(self) -> np.ndarray:
        return np.array([len(k) + 2 for k in self.keys], dtype=np.int64)

    @property
    def field_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.field_sizes)]).astype(np.int64)

    @classmethod
    def build(cls, counted: Sequence[tuple[np.ndarray, np.ndarray]], min_count: int,
              field_names: Sequence[str], num_bags: int = 0) -> "Vocabulary":
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        keys, rows = [], []
        for uniq, cnt in counted:
            keep = cnt >= min_count
            ku, kc = uniq[keep], cnt[keep]
            order = np.lexsort((ku, -kc))  # most frequent first, ties by key
            rank = np.empty(len(ku), np.int64)
            rank[order] = np.arange(1, len(ku) + 1)
            by_key = np.argsort(ku, kind="stable")
            keys.append(ku[by_key].astype(np.uint64))
            rows.append(rank[by_key])
        return cls(keys, rows, int(min_count), list(field_names), int(num_bags))

    @classmethod
    def fit(cls, keys: np.ndarray, field_names: Sequence[str], min_count: int,
            rows: np.ndarray | None = None, backend: str = "auto", bags: Sequence = ()) -> "Vocabulary":
        """Count ``keys`` [N, F] and the ids of ``bags`` (``BagField``s of keys; optionally only
        ``rows``) and keep values seen >= min_count times. ``field_names``: F + len(bags) names.

        ``backend``: "numba", "cupy", or "auto" (cupy when it and a GPU are present).
        """
        if backend == "auto":
            backend = "cupy" if _cupy_gpu() else "numba"
        count = count_keys_cupy if backend == "cupy" else count_keys
        counted = count(keys, rows)
        for bag in bags:
            values = bag.values if rows is None else bag.take(rows).values
            counted += count(np.asarray(values)[:, None])
        return cls.build(counted, min_count, field_names, len(bags))

    def transform(self, keys: np.ndarray) -> np.ndarray:
        """Global row ids [N, F] int64 for keys [N, F] (missing -> field row 0, unseen -> OOV)."""
        k = np.asarray(keys).view(np.uint64)
        nf = len(self.keys) - self.num_bags
        if k.ndim != 2 or k.shape[1] != nf:
            raise ValueError(f"keys must be [N, {nf}], got {k.shape}")
        out = np.empty(k.shape, np.int64)
        offsets = self.field_offsets
        for j in range(k.shape[1]):
            _map_field(k[:, j], self.keys[j], self.rows[j], offsets[j], len(self.keys[j]) + 1, out[:, j])
        return out

    def transform_bags(self, bags: Sequence) -> list:
        """The ``BagField``s of keys as BagFields of global row ids (same offsets)."""
        from mlfast.io.data import BagField

        if len(bags) != self.num_bags:
            raise ValueError(f"the vocabulary has {self.num_bags} bag fields, got {len(bags)}")
        offsets = self.field_offsets
        out = []
        for s, bag in enumerate(bags):
            j = len(self.keys) - self.num_bags + s
            ids = np.empty(len(bag.values), np.int64)
            _map_field(np.asarray(bag.values).view(np.uint64), self.keys[j], self.rows[j], offsets[j],
                       len(self.keys[j]) + 1, ids)
            out.append(BagField(np.asarray(bag.offsets), ids))
        return out

    def save(self, path: str | Path) -> None:
        arrays = {f"keys_{j}": k for j, k in enumerate(self.keys)}
        arrays.update({f"rows_{j}": r for j, r in enumerate(self.rows)})
        np.savez(path, min_count=np.int64(self.min_count), field_names=np.array(self.field_names),
                 num_bags=np.int64(self.num_bags), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        with np.load(path, allow_pickle=False) as z:
            names = [str(x) for x in z["field_names"]]
            return cls([z[f"keys_{j}"] for j in range(len(names))], [z[f"rows_{j}"] for j in range(len(names))],
                       int(z["min_count"]), names, int(z["num_bags"]) if "num_bags" in z else 0)

    def to_state(self) -> dict:
        return {"keys": self.keys, "rows": self.rows, "min_count": self.min_count, "field_names": self.field_names,
                "num_bags": self.num_bags}

    @classmethod
    def from_state(cls, d: dict) -> "Vocabulary":
        return cls(list(d["keys"]), list(d["rows"]), int(d["min_count"]), list(d["field_names"]),
                   int(d.get("num_bags", 0)))


@numba.njit(parallel=True, cache=True)
def _map_field(col, sorted_keys, rows, base, oov, out) -> None:
    n = col.shape[0]
    m = sorted_keys.shape[0]
    for i in numba.prange(n):
        key = col[i]
        if key == 0:
            out[i] = base
            continue
        lo, hi = 0, m
        while lo < hi:  # binary search in the kept keys
            mid = (lo + hi) >> 1
            if sorted_keys[mid] < key:
                lo = mid + 1
            else:
                hi = mid
        if lo < m and sorted_keys[lo] == key:
            out[i] = base + rows[lo]
        else:
            out[i] = base + oov


def _cupy_gpu() -> bool:
    try:
        import cupy as cp

        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False
