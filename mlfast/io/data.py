"""The in-memory result of reading a click log: the one layout every later stage reads.

`CTRData` is what `read_criteo` (and the Avazu / generic readers) return, what the cache stores,
what the batch iterator slices and what the embedding kernels index. Nothing downstream re-lays it
out:

* ``sparse`` [N, F] int64 holds *global* row ids into ONE flat embedding table of
  ``field_offsets[-1]`` rows; field ``f`` owns rows ``field_offsets[f] .. field_offsets[f+1]-1`` and
  its first row (``field_offsets[f]``) is reserved for "missing".
* ``dense`` [N, Dd] float32 and ``dense_missing`` [N, Dd] bool hold the numeric columns after the
  reader's documented transform (missing -> 0.0 with the mask set).
* ``labels`` [N] float32 in {0, 1}, or ``None`` for unlabeled input (Criteo test format).
* ``bags``: multi-hot fields (e.g. a click history ``170301^573514``), one :class:`BagField` each
  (CSR: ``offsets`` [N+1], ``values`` [nnz] global row ids). They come after the one-hot fields in
  ``field_offsets`` / ``field_names``; a model pools each bag to one embedding per row (mean) and
  reads it as one more field, so a schema has ``num_fields = F + num_bags`` fields.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numba as nb
import numpy as np


@nb.njit(cache=True, nogil=True)
def _copy_spans(values, starts, ends, out_offsets, out_values):  # pragma: no cover - numba
    """Row i of the output = values[starts[i]:ends[i]]; out_offsets[1:] are filled, [0] is 0."""
    k = 0
    for i in range(starts.shape[0]):
        for j in range(starts[i], ends[i]):
            out_values[k] = values[j]
            k += 1
        out_offsets[i + 1] = k


@dataclass
class BagField:
    """One multi-hot field of N rows in CSR form: row ``i`` holds ``values[offsets[i]:offsets[i+1]]``.

    ``offsets`` [N+1] int64 (``offsets[0] == 0``, non-decreasing), ``values`` [nnz] int64 global
    row ids into the flat table (or raw 64-bit keys when read with ``keys=True``).

        >>> b = BagField(np.array([0, 2, 3]), np.array([7, 8, 9]))
        >>> b.take(np.array([1, 0])).values.tolist(), b.lengths.tolist()
        ([9, 7, 8], [2, 1])
    """

    offsets: np.ndarray
    values: np.ndarray

    def __post_init__(self) -> None:
        o, v = self.offsets, self.values
        if o.ndim != 1 or o.dtype != np.int64 or len(o) < 1 or v.ndim != 1 or v.dtype != np.int64:
            raise ValueError(f"a bag field is offsets [N+1] int64 and values [nnz] int64, got {o.shape} {o.dtype}"
                             f" and {v.shape} {v.dtype}")
        if o[0] != 0 or o[-1] != len(v):
            raise ValueError(f"bag offsets must run from 0 to len(values)={len(v)}, got {o[0]}..{o[-1]}")

    @classmethod
    def from_lengths(cls, lengths: np.ndarray, values: np.ndarray) -> "BagField":
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(offsets, values)

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def truncate(self, max_len: int) -> "BagField":
        """Each bag cut to its last ``max_len`` values (a history's most recent ones, when the log
        lists them oldest first); ``self`` when no bag is longer.

            >>> BagField(np.array([0, 3, 4]), np.array([1, 2, 3, 4])).truncate(2).values.tolist()
            [2, 3, 4]
        """
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        offsets = np.asarray(self.offsets)
        if self.num_rows == 0 or self.lengths.max() <= max_len:
            return self
        return self._spans(np.maximum(offsets[:-1], offsets[1:] - max_len), offsets[1:])

    def take(self, index: np.ndarray | slice) -> "BagField":
        """The bags of rows ``index`` (an index array or a slice), as a new compact BagField."""
        if isinstance(index, slice):
            rows = np.arange(*index.indices(self.num_rows), dtype=np.int64)
        else:
            index = np.asarray(index)
            rows = np.flatnonzero(index) if index.dtype == np.bool_ else index.astype(np.int64, copy=False)
            rows = np.where(rows < 0, rows + self.num_rows, rows)
        offsets = np.asarray(self.offsets)
        return self._spans(offsets[rows], offsets[rows + 1])

    def _spans(self, starts: np.ndarray, ends: np.ndarray) -> "BagField":
        """A BagField whose row i is ``values[starts[i]:ends[i]]``."""
        out_offsets = np.zeros(len(starts) + 1, np.int64)
        np.cumsum(ends - starts, out=out_offsets[1:])
        out_values = np.empty(int(out_offsets[-1]), np.int64)
        _copy_spans(np.asarray(self.values), starts, ends, out_offsets, out_values)
        return BagField(out_offsets, out_values)


@dataclass
class CTRData:
    """Parsed click-log rows in the layout the embedding kernels read.

    Example::

        >>> import mlfast
        >>> d = mlfast.read_criteo("../shared/datasets_raw/criteo_kaggle_head10k/train_head10000.txt")
        >>> d.sparse.shape, d.field_offsets.shape        # (10000, 39), (40,)
    """

    labels: np.ndarray | None  # [N] float32, None when the input has no label column
    dense: np.ndarray  # [N, Dd] float32, transformed numeric features (0.0 where missing)
    dense_missing: np.ndarray  # [N, Dd] bool
    sparse: np.ndarray  # [N, F] int64 global row ids into one flat table
    field_offsets: np.ndarray  # [F + S + 1] int64; field f owns rows [off[f], off[f+1]); bags last
    field_names: list[str]  # F + S names, e.g. ["I1", ..., "I13", "C1", ..., "C26"]
    dense_names: list[str] = field(default_factory=list)  # Dd names
    skipped: dict[str, int] = field(default_factory=dict)  # bad lines skipped, per reason
    source: str = ""  # path the rows came from
    meta: dict[str, Any] = field(default_factory=dict)  # reader configuration, cache info, ...
    bags: list[BagField] = field(default_factory=list)  # S multi-hot fields (after the F one-hot ones)

    def __post_init__(self) -> None:
        n = self.sparse.shape[0]
        if self.sparse.ndim != 2 or self.sparse.dtype != np.int64:
            raise ValueError(f"sparse must be [N, F] int64, got {self.sparse.shape} {self.sparse.dtype}")
        nf = self.sparse.shape[1] + len(self.bags)
        if self.field_offsets.shape != (nf + 1,):
            raise ValueError(f"field_offsets must have F+S+1={nf + 1} entries, got {self.field_offsets.shape}")
        for b in self.bags:
            if b.num_rows != n:
                raise ValueError(f"a bag field has {b.num_rows} rows, the data {n}")
        if self.labels is not None and self.labels.shape != (n,):
            raise ValueError(f"labels must be [N={n}], got {self.labels.shape}")
        if self.dense.shape[0] != n or self.dense_missing.shape != self.dense.shape:
            raise ValueError("dense and dense_missing must be [N, Dd] with the same shape")
        if len(self.field_names) != nf:
            raise ValueError(f"{len(self.field_names)} field names for {nf} fields")

    @property
    def num_rows(self) -> int:
        return int(self.sparse.shape[0])

    def __len__(self) -> int:
        return self.num_rows

    @property
    def num_fields(self) -> int:
        """All fields a model sees: the one-hot ``sparse`` columns and the bags."""
        return int(self.sparse.shape[1]) + len(self.bags)

    @property
    def num_bags(self) -> int:
        return len(self.bags)

    @property
    def num_dense(self) -> int:
        return int(self.dense.shape[1])

    @property
    def table_rows(self) -> int:
        """Rows of the flat embedding table the sparse ids index."""
        return int(self.field_offsets[-1])

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def take(self, index: np.ndarray | slice) -> "CTRData":
        """Rows ``index`` as a new CTRData (copies for an index array, views for a slice)."""
        return dataclasses.replace(
            self,
            labels=None if self.labels is None else self.labels[index],
            dense=self.dense[index],
            dense_missing=self.dense_missing[index],
            sparse=self.sparse[index],
            bags=[b.take(index) for b in self.bags],
            skipped=dict(self.skipped),
            meta=dict(self.meta),
        )
