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
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np


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
    field_offsets: np.ndarray  # [F + 1] int64; field f owns rows [off[f], off[f+1])
    field_names: list[str]  # F names, e.g. ["I1", ..., "I13", "C1", ..., "C26"]
    dense_names: list[str] = field(default_factory=list)  # Dd names
    skipped: dict[str, int] = field(default_factory=dict)  # bad lines skipped, per reason
    source: str = ""  # path the rows came from
    meta: dict[str, Any] = field(default_factory=dict)  # reader configuration, cache info, ...

    def __post_init__(self) -> None:
        n = self.sparse.shape[0]
        if self.sparse.ndim != 2 or self.sparse.dtype != np.int64:
            raise ValueError(f"sparse must be [N, F] int64, got {self.sparse.shape} {self.sparse.dtype}")
        if self.field_offsets.shape != (self.sparse.shape[1] + 1,):
            raise ValueError(
                f"field_offsets must have F+1={self.sparse.shape[1] + 1} entries, got {self.field_offsets.shape}"
            )
        if self.labels is not None and self.labels.shape != (n,):
            raise ValueError(f"labels must be [N={n}], got {self.labels.shape}")
        if self.dense.shape[0] != n or self.dense_missing.shape != self.dense.shape:
            raise ValueError("dense and dense_missing must be [N, Dd] with the same shape")
        if len(self.field_names) != self.sparse.shape[1]:
            raise ValueError(f"{len(self.field_names)} field names for {self.sparse.shape[1]} fields")

    @property
    def num_rows(self) -> int:
        return int(self.sparse.shape[0])

    def __len__(self) -> int:
        return self.num_rows

    @property
    def num_fields(self) -> int:
        return int(self.sparse.shape[1])

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
            skipped=dict(self.skipped),
            meta=dict(self.meta),
        )
