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
* ``lines`` [N] int64: where each row came from, so results can be joined back to the input (rows
  of bad lines skipped with ``on_bad_line="skip"`` leave gaps): a text log's 1-based line number,
  a Parquet / Arrow file's 0-based row index (``meta["position"]`` says which: ``"line"`` /
  ``"row"``), with ``file_index`` [N] into ``meta["files"]`` for a directory or glob of files.
  None for data built in memory.
* ``ids``: the raw text of an id column (``read(..., id_column=...)``) as a :class:`TextColumn`.
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


def _rows(index: np.ndarray | slice, n: int) -> np.ndarray:
    """An index (array, boolean mask or slice) over n rows as int64 row numbers, negatives wrapped
    (as BagField.take reads its index)."""
    if isinstance(index, slice):
        return np.arange(*index.indices(n), dtype=np.int64)
    index = np.asarray(index)
    rows = np.flatnonzero(index) if index.dtype == np.bool_ else index.astype(np.int64, copy=False)
    return np.where(rows < 0, rows + n, rows)


@dataclass(eq=False)
class TextColumn:
    """N strings stored as Arrow stores a string column: row ``i`` is the UTF-8 bytes
    ``data[offsets[i]:offsets[i+1]]`` (invalid bytes decode as U+FFFD).

    An id column of millions of rows costs its bytes plus 8 per row and no Python object until a
    value is asked for (an object array of ``str`` costs ~60 bytes more per row), it maps straight
    from the cache, and ``take`` selects rows in one compiled pass.

        >>> t = TextColumn.from_strings(["a", "", "b,c"], name="id")
        >>> len(t), t[2], t.take(np.array([2, 0])).tolist(), t.name
        (3, 'b,c', ['b,c', 'a'], 'id')
    """

    offsets: np.ndarray  # [N+1] int64, offsets[0] == 0, non-decreasing
    data: np.ndarray  # [nbytes] uint8
    name: str = ""  # the column's name (a header name, or the reader's name for it)

    def __post_init__(self) -> None:
        o, v = self.offsets, self.data
        if o.ndim != 1 or o.dtype != np.int64 or len(o) < 1 or v.ndim != 1 or v.dtype != np.uint8:
            raise ValueError(f"a text column is offsets [N+1] int64 and data [nbytes] uint8, got {o.shape} {o.dtype}"
                             f" and {v.shape} {v.dtype}")
        if o[0] != 0 or o[-1] != len(v):
            raise ValueError(f"text offsets must run from 0 to len(data)={len(v)}, got {o[0]}..{o[-1]}")

    @classmethod
    def from_lengths(cls, lengths: np.ndarray, data: np.ndarray, name: str = "") -> "TextColumn":
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1):
            data = np.asarray(data, np.uint8).reshape(-1)
        return cls(offsets, data, name)  # a memory-mapped cache column stays mapped

    @classmethod
    def from_strings(cls, values: Any, name: str = "") -> "TextColumn":
        encoded = [str(v).encode("utf-8") for v in values]
        data = np.frombuffer(b"".join(encoded), np.uint8).copy()
        return cls.from_lengths(np.fromiter(map(len, encoded), np.int64, len(encoded)), data, name)

    @classmethod
    def concat(cls, columns: list["TextColumn"], name: str | None = None) -> "TextColumn":
        lengths = np.concatenate([np.diff(np.asarray(c.offsets)) for c in columns])
        data = np.concatenate([np.asarray(c.data) for c in columns])
        return cls.from_lengths(lengths, data, columns[0].name if name is None else name)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: Any) -> Any:
        """Row ``index``'s text (an int), or the rows ``index`` selects (a slice or an array) as a TextColumn."""
        if isinstance(index, (int, np.integer)):
            n = len(self)
            i = int(index) + n if index < 0 else int(index)
            if not 0 <= i < n:
                raise IndexError(f"row {index} out of range for {n} rows")
            return bytes(self.data[self.offsets[i]:self.offsets[i + 1]]).decode("utf-8", "replace")
        return self.take(index)

    def __iter__(self) -> Any:
        return iter(self.tolist())

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.empty(len(self), object)
        out[:] = self.tolist()
        return out if dtype is None else out.astype(dtype)

    def tolist(self) -> list[str]:
        buf, o = np.asarray(self.data).tobytes(), np.asarray(self.offsets).tolist()
        return [buf[o[i]:o[i + 1]].decode("utf-8", "replace") for i in range(len(o) - 1)]

    def take(self, index: np.ndarray | slice) -> "TextColumn":
        """The rows ``index`` (an index array, a boolean mask or a slice) as a new compact TextColumn."""
        rows = _rows(index, len(self))
        offsets = np.asarray(self.offsets)
        out_offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(offsets[rows + 1] - offsets[rows], out=out_offsets[1:])
        out_data = np.empty(int(out_offsets[-1]), np.uint8)
        _copy_spans(np.asarray(self.data), offsets[rows], offsets[rows + 1], out_offsets, out_data)
        return TextColumn(out_offsets, out_data, self.name)

    def __repr__(self) -> str:
        head = self[:3].tolist() if len(self) else []
        return f"TextColumn(name={self.name!r}, rows={len(self)}, head={head}{'...' if len(self) > 3 else ''})"


@dataclass
class CTRData:
    """Parsed click-log rows in the layout the embedding kernels read.

    Example::

        >>> import mlfast
        >>> d = mlfast.read_criteo("../shared/datasets_raw/criteo_kaggle_head10k/train_head10000.txt")
        >>> d.sparse.shape, d.field_offsets.shape
        ((10000, 39), (40,))
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
    # [N] int64 source position of each row (text: 1-based line; Parquet / Arrow: 0-based row of its
    # file; meta["position"] says which), None when the rows have no source (built in memory)
    lines: np.ndarray | None = None
    file_index: np.ndarray | None = None  # [N] int32 index into meta["files"] (several files), else None
    ids: TextColumn | None = None  # the id column's raw text (read(..., id_column=...)), else None

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
        for name in ("lines", "file_index"):
            a = getattr(self, name)
            if a is not None and (a.shape != (n,) or a.dtype.kind not in "iu"):
                raise ValueError(f"{name} must be [N={n}] integers, got {a.shape} {a.dtype}")
        if self.ids is not None and len(self.ids) != n:
            raise ValueError(f"ids has {len(self.ids)} rows, the data {n}")

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
            lines=None if self.lines is None else self.lines[index],
            file_index=None if self.file_index is None else self.file_index[index],
            ids=None if self.ids is None else self.ids.take(index),
            skipped=dict(self.skipped),
            meta=dict(self.meta),
        )
