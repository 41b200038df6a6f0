"""Training data larger than memory: batches streamed from the cache files, block-shuffled.

``open_dataset(paths, options)`` parses each text log into the cache once (or finds it there) and
keeps only its column *files* (:class:`mlfast.io.cache.DiskColumn`, read by row ranges with
``pread``, never memory-mapped): a dataset of any size, over one file, several files, a directory
or a glob (e.g. Criteo 1TB's ``day_0`` .. ``day_23``, one cache entry each).

Rows are grouped in **blocks** of ``block_rows`` consecutive rows of one file (4096 for data of 4M
rows or more; fewer rows per block on smaller data, so that it still has about a thousand blocks).
``StreamLoader`` visits a split's blocks in an order seeded by (seed, epoch), reads them a
**window** of ``window_rows`` rows at a time (a few MB per block, read sequentially), shuffles the
rows inside each window (seeded by (seed, epoch, window)) and cuts the stream into batches of
exactly ``batch_size`` rows across window boundaries. Memory holds two windows (the one being cut
into batches and the next, read by a background thread), whatever the data size. Without
``shuffle`` (evaluation) blocks and rows keep their file order.

**Lanes** (``lanes=L``, training only): the epoch's block order is dealt to L lanes (block i to
lane i mod L), each read, windowed (``window_rows / L`` rows) and row-shuffled on its own (seeded by
(seed, epoch, window, lane)); batch k is lane 0's k-th batch of B/L rows, then lane 1's, ... (the
sizes of :func:`mlfast.io.batches.shard_bounds`). Data shard s of S (S divides L) takes lanes
s*L/S .. (s+1)*L/S - 1, which are exactly its rows of each batch: **each process reads only its
share of the data**, and a single process with the same L trains on the same batches. Every batch is
full and every epoch has the same number of them (the fewest a lane can be dealt), so an epoch
leaves out the lanes' ragged tail (``left_out`` rows: under one block per lane plus a lane batch; a
different tail each epoch, the block order being reshuffled).

Like :class:`mlfast.io.batches.BatchLoader`: ``epoch(e)`` visits every row of the split exactly
once (with one lane), ``epoch(e, start_batch=k)`` yields exactly batches ``k ..`` of that epoch (exact mid-epoch
resume; the windows before batch ``k`` are skipped without being read), batches are
``mlfast.io.batches.Batch`` with ``index`` holding the dataset's global row numbers.

Splits: separate validation / test files, or one file split 8:1:1 **by blocks** (seeded): a block
never straddles two splits, and no per-row index is ever built (the in-memory path splits rows).

Example::

    >>> import tempfile
    >>> ds = open_dataset("../shared/datasets_raw/criteo_kaggle_head10k/train_head10000.txt",
    ...                   {"cache": True}, cache_dir=tempfile.mkdtemp())
    >>> len(ds), ds.block_rows, ds.num_blocks
    (10000, 10, 1000)
    >>> train, valid, test = split_blocks(ds, (8, 1, 1), seed=0)
    >>> loader = StreamLoader(ds, train, 512, shuffle=True, seed=0, window_rows=2048)
    >>> sum(len(b) for b in loader.epoch(0)), int(ds.block_lengths[train].sum())
    (8000, 8000)
"""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from mlfast.io.batches import Batch, BatchLoader, background, num_batches, shard_bounds, split_sizes
from mlfast.io.cache import DiskColumn
from mlfast.io.data import CTRData

MAX_BLOCK_ROWS = 4096
TARGET_BLOCKS = 1000
DEFAULT_WINDOW_ROWS = 262_144  # about 100 MB of Criteo columns per window
COLUMNS = ("labels", "dense", "dense_missing", "sparse", "lines")


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """A file, a directory (its regular files not starting with ``.`` or ``_``, in name order), a
    glob, or a list of any of these -> the files, in order. FileNotFoundError when one names nothing."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[str] = []
    for item in items:
        p = os.fspath(item)
        if os.path.isdir(p):
            found = sorted(os.path.join(p, n) for n in os.listdir(p)
                           if not n.startswith((".", "_")) and os.path.isfile(os.path.join(p, n)))
            if not found:
                raise FileNotFoundError(f"{p}: the directory holds no data files")
            out += found
        elif os.path.exists(p):
            out.append(p)
        elif glob.has_magic(p):
            found = sorted(m for m in glob.glob(p) if os.path.isfile(m))
            if not found:
                raise FileNotFoundError(f"{p}: the pattern matches no file")
            out += found
        else:
            raise FileNotFoundError(f"{p}: no such file")
    return out


def block_rows_for(rows: int) -> int:
    """Rows per block for a dataset of ``rows``: 4096, or fewer so that small data still has about
    ``TARGET_BLOCKS`` blocks (a split and a shuffle by blocks stay fine-grained)."""
    return int(max(1, min(MAX_BLOCK_ROWS, rows // TARGET_BLOCKS)))


class DiskDataset:
    """One or more cached files read by row ranges: the field layout (``header``, a zero-row
    CTRData), the rows, and the block table (``block_file``, ``block_start``, ``block_lengths``)."""

    def __init__(self, parts: Sequence[tuple[CTRData, dict[str, DiskColumn], int]], source: str,
                 block_rows: int | None = None):
        if not parts:
            raise ValueError("a dataset needs at least one file")
        first = parts[0][0]
        for h, _, _ in parts[1:]:
            if (list(h.field_names) != list(first.field_names) or list(h.dense_names) != list(first.dense_names)
                    or not np.array_equal(h.field_offsets, first.field_offsets)
                    or (h.labels is None) != (first.labels is None)):
                raise ValueError(f"{h.source} has another layout than {first.source} (fields, hashing or label "
                                 f"column): the files of one dataset must be read alike")
        self.files = [h.source for h, _, _ in parts]
        self.columns = [cols for _, cols, _ in parts]
        self.file_rows = np.array([n for _, _, n in parts], np.int64)
        skipped: dict[str, int] = {}
        for h, _, _ in parts:
            for k, v in h.skipped.items():
                skipped[k] = skipped.get(k, 0) + int(v)
        meta = {**first.meta, "files": list(self.files), "stream": True,
                "cache": [h.meta.get("cache") for h, _, _ in parts]}
        self.header = dataclasses.replace(first, skipped=skipped, source=source, meta=meta)
        self.file_offset = np.concatenate([[0], np.cumsum(self.file_rows)])
        self.block_rows = int(block_rows) if block_rows else block_rows_for(int(self.file_rows.sum()))
        counts = -(-self.file_rows // self.block_rows)
        self.block_file = np.repeat(np.arange(len(parts), dtype=np.int64), counts)
        first_block = np.concatenate([[0], np.cumsum(counts)])[:-1]
        k = np.arange(len(self.block_file), dtype=np.int64) - np.repeat(first_block, counts)
        self.block_start = k * self.block_rows  # within its file
        self.block_lengths = np.minimum(self.block_rows, self.file_rows[self.block_file] - self.block_start)

    # CTRData-like properties the rest of mlfast reads from a dataset
    def __len__(self) -> int:
        return int(self.file_offset[-1])

    @property
    def num_blocks(self) -> int:
        return len(self.block_file)

    @property
    def source(self) -> str:
        return self.header.source

    @property
    def skipped(self) -> dict[str, int]:
        return self.header.skipped

    @property
    def labels(self):  # None when the files have no label column (test format)
        return self.header.labels

    def read_blocks(self, blocks: np.ndarray) -> tuple[CTRData, np.ndarray]:
        """The rows of ``blocks`` (in that order) in memory, and their global row numbers."""
        blocks = np.asarray(blocks, np.int64)
        lens = self.block_lengths[blocks]
        n = int(lens.sum())
        h = self.header
        out = {name: np.empty((n,) + getattr(h, name).shape[1:], getattr(h, name).dtype)
               for name in COLUMNS if getattr(h, name) is not None}
        at = 0
        for b, m in zip(blocks.tolist(), lens.tolist()):
            f, start = int(self.block_file[b]), int(self.block_start[b])
            for name, arr in out.items():
                self.columns[f][name].read_into(start, arr[at:at + m])
            at += m
        rows = np.repeat(self.file_offset[self.block_file[blocks]] + self.block_start[blocks], lens)
        rows += np.arange(n, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
        return dataclasses.replace(h, **out), rows

    def close(self) -> None:
        for cols in self.columns:
            for c in cols.values():
                c.close()


def open_dataset(paths: str | os.PathLike | Sequence[str | os.PathLike], options: dict[str, Any],
                 cache_dir: str | os.PathLike | None = None, block_rows: int | None = None) -> DiskDataset:
    """The files ``paths`` names (see :func:`expand_paths`), each parsed into the cache once, as one
    dataset. ``options``: :func:`mlfast.io.reader.read` keyword arguments (``schema`` as a dict is
    turned into a DelimitedSchema)."""
    from mlfast.io.reader import DelimitedSchema, read_on_disk

    kw = {k: v for k, v in options.items() if k not in ("schema", "min_count")}
    if options.get("min_count") is not None:
        raise ValueError("vocabulary mode (--min-count) counts every value in memory: streaming from disk uses "
                         "hashing (leave --min-count out)")
    if options.get("schema") is not None:
        kw["format"] = "delimited"
        schema = options["schema"]
        kw["schema"] = DelimitedSchema(**{"quote": None, **schema}) if isinstance(schema, dict) else schema
    if cache_dir is not None:
        kw["cache_dir"] = cache_dir
    files = expand_paths(paths)
    source = os.fspath(paths) if isinstance(paths, (str, os.PathLike)) else ",".join(map(os.fspath, paths))
    return DiskDataset([read_on_disk(f, **kw) for f in files], source, block_rows)


def split_blocks(ds: DiskDataset, ratios: Sequence[float] = (8, 1, 1), seed: int = 0) -> tuple[np.ndarray, ...]:
    """A seeded split of the dataset's blocks (each part sorted: read forwards)."""
    sizes = split_sizes(ds.num_blocks, ratios)
    perm = np.random.default_rng(seed).permutation(ds.num_blocks).astype(np.int64)
    return tuple(np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1]))


def _concat(parts: list[CTRData]) -> CTRData:
    if len(parts) == 1:
        return parts[0]
    cols = {name: np.concatenate([getattr(p, name) for p in parts])
            for name in COLUMNS if getattr(parts[0], name) is not None}
    return dataclasses.replace(parts[0], **cols)


class StreamLoader:
    """Batches of a :class:`DiskDataset`'s ``blocks`` (see the module docstring): the interface of
    :class:`mlfast.io.batches.BatchLoader` (``epoch``, ``len``, ``batch_size``), memory bounded by
    two windows of ``window_rows`` rows."""

    def __init__(self, dataset: DiskDataset, blocks: np.ndarray | None, batch_size: int, *, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, device: str | torch.device | None = None,
                 use_dense: bool = True, min_last: int = 1, ids_dtype: torch.dtype = torch.int64,
                 window_rows: int = DEFAULT_WINDOW_ROWS, prefetch: int = 1, lanes: int | None = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if window_rows < 1:
            raise ValueError(f"window_rows must be >= 1, got {window_rows}")
        # lanes=None: one lane here, one per data shard when a multi-process run shards the loader
        self.auto_lanes = lanes is None
        lanes = 1 if lanes is None else lanes
        if not 1 <= int(lanes) <= batch_size:
            raise ValueError(f"lanes must be in [1, batch_size={batch_size}], got {lanes}")
        if int(lanes) > 1 and not shuffle:
            raise ValueError("lanes split a shuffled (training) stream; evaluation reads one stream in file order")
        self.dataset = dataset
        self.blocks = np.arange(dataset.num_blocks, dtype=np.int64) if blocks is None else np.asarray(blocks, np.int64)
        self.rows = int(dataset.block_lengths[self.blocks].sum())
        self.batch_size = int(batch_size)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.min_last = max(1, int(min_last))
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.use_dense = bool(use_dense) and dataset.header.num_dense > 0
        self.ids_dtype = ids_dtype
        self.window_rows = int(window_rows)
        self.window_blocks = max(1, int(window_rows) // dataset.block_rows)
        self.prefetch = int(prefetch)
        self._epoch = 0
        self.lanes = int(lanes)
        self.lane_sizes = [hi - lo for lo, hi in (shard_bounds(self.batch_size, k, self.lanes)
                                                  for k in range(self.lanes))]
        self._len = num_batches(self.rows, self.batch_size, self.drop_last, self.min_last)
        if self.lanes > 1:
            # Full batches only, as many in every epoch: the fewest rows a lane can get is the sum of
            # its share of blocks, taking the shortest ones (blocks are equal but for each file's last).
            lens = np.sort(dataset.block_lengths[self.blocks])
            fewest = int(lens[:len(lens) // self.lanes].sum())
            self._len = fewest // max(self.lane_sizes)
            if self._len < 1:
                raise ValueError(f"{self.lanes} lanes of {len(lens)} blocks ({self.rows:,} rows): a lane holds too few "
                                 f"rows for one batch of {max(self.lane_sizes)} (batch size {self.batch_size}); "
                                 f"use fewer lanes or a smaller batch")

    def with_lanes(self, lanes: int) -> "StreamLoader":
        """The same stream read in ``lanes`` lanes (see the module docstring)."""
        return self._like(self.blocks, lanes)

    def with_blocks(self, blocks: np.ndarray) -> "StreamLoader":
        """The same kind of stream over ``blocks`` only."""
        return self._like(blocks, self.lanes)

    def _like(self, blocks: np.ndarray, lanes: int) -> "StreamLoader":
        return StreamLoader(self.dataset, blocks, self.batch_size, shuffle=self.shuffle, seed=self.seed,
                            drop_last=self.drop_last, device=self.device, use_dense=self.use_dense,
                            min_last=self.min_last, ids_dtype=self.ids_dtype, window_rows=self.window_rows,
                            prefetch=self.prefetch, lanes=lanes)

    @property
    def left_out(self) -> int:
        """Rows an epoch leaves out: with lanes, the ragged tail of the lanes (a different one each epoch)."""
        return self.rows - self._len * self.batch_size if self.lanes > 1 else 0

    @property
    def data(self) -> CTRData:
        """The zero-row header (field layout, names) in place of BatchLoader's in-memory data."""
        return self.dataset.header

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(self._epoch)

    def block_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.blocks
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.blocks)

    def _windows(self, epoch: int, order: np.ndarray, K: int, key: tuple, first: int, stop=None
                 ) -> Iterator[tuple[CTRData, np.ndarray, np.ndarray]]:
        """(rows of window w in file order, their global row numbers, the visiting order) for the
        windows of ``K`` blocks of ``order`` from ``first`` on."""
        for w in range(first, -(-len(order) // K)):
            if stop is not None and stop.is_set():
                return
            data, rows = self.dataset.read_blocks(order[w * K:(w + 1) * K])
            visit = (np.random.default_rng([self.seed, int(epoch), w, *key]).permutation(len(rows)) if self.shuffle
                     else np.arange(len(rows), dtype=np.int64))
            yield data, rows, visit

    def epoch(self, epoch: int, start_batch: int = 0, lanes: Sequence[int] | None = None) -> Iterator[Batch]:
        """Batches ``start_batch ..`` of epoch ``epoch``; ``lanes``: only these lanes' rows of each
        batch (a data shard's: consecutive lanes), concatenated in lane order."""
        nb = len(self)
        if not 0 <= start_batch <= nb:
            raise ValueError(f"start_batch must be in [0, {nb}] for {nb} batches, got {start_batch}")
        if self.lanes == 1:
            return self._stream(epoch, self.block_order(epoch), self.window_blocks, (), self.batch_size, self.rows,
                                start_batch)
        order, L = self.block_order(epoch), self.lanes
        K = max(1, self.window_blocks // L)  # the lanes together hold a window's rows
        streams = [self._stream(epoch, order[k::L], K, (k,), self.lane_sizes[k],
                                int(self.dataset.block_lengths[order[k::L]].sum()), start_batch)
                   for k in (range(L) if lanes is None else lanes)]
        return _zip_lanes(streams)

    def _emit(self, data: CTRData, rows: np.ndarray, visit: np.ndarray, B: int) -> Iterator[Batch]:
        loader = BatchLoader(data, B, indices=visit, device=self.device, prefetch=0,
                             use_dense=self.use_dense, ids_dtype=self.ids_dtype)
        for batch in loader.epoch(0):
            batch.index = torch.from_numpy(rows[batch.index.numpy()])
            yield batch

    def _stream(self, epoch: int, order: np.ndarray, K: int, key: tuple, B: int, total: int,
                start_batch: int) -> Iterator[Batch]:
        """Batches ``start_batch .. len(self)`` of ``B`` rows of the blocks ``order`` (``total`` rows),
        read ``K`` blocks a window (one lane, or the whole stream)."""
        nb = len(self)
        if start_batch >= nb:
            return
        sizes = np.add.reduceat(self.dataset.block_lengths[order], np.arange(0, len(order), K))
        ends = np.cumsum(sizes)
        pos = start_batch * B  # the first row to hand out, in the epoch's row stream
        w0 = int(np.searchsorted(ends, pos, side="right"))
        skip = pos - (int(ends[w0 - 1]) if w0 else 0)
        windows = self._windows(epoch, order, K, key, w0) if self.prefetch == 0 else \
            background(lambda stop: self._windows(epoch, order, K, key, w0, stop), self.prefetch)
        # A batch that straddles two windows is assembled from the rows left over ("carry", fewer
        # than B, copied) and the head of the next window; the rest is gathered from the window.
        carry: tuple[CTRData, np.ndarray] | None = None
        k, seen = start_batch, pos  # batches handed out; rows of the epoch's stream read so far
        try:
            for data, rows, visit in windows:
                visit, skip = visit[skip:], 0
                seen += len(visit)
                final = seen >= total
                if carry is not None:
                    head, visit = visit[:B - len(carry[1])], visit[B - len(carry[1]):]
                    carry = (_concat([carry[0], data.take(head)]), np.concatenate([carry[1], rows[head]]))
                    if len(carry[1]) < B and not final:
                        continue  # a window smaller than what the batch still needs
                    if k < nb:
                        yield from self._emit(carry[0], carry[1], np.arange(len(carry[1])), B)
                        k += 1
                    carry = None
                take = min(len(visit), (nb - k) * B) if final else min(len(visit) // B, nb - k) * B
                if take:
                    for batch in self._emit(data, rows, visit[:take], B):
                        yield batch
                        k += 1
                if k >= nb:
                    return
                if take < len(visit) and not final:
                    carry = (data.take(visit[take:]), rows[visit[take:]])
        finally:
            if hasattr(windows, "close"):
                windows.close()


def _zip_lanes(streams: list[Iterator[Batch]]) -> Iterator[Batch]:
    """Each step's batches of the lanes, concatenated (the lanes yield as many batches each)."""
    if len(streams) == 1:
        yield from streams[0]
        return
    try:
        for parts in zip(*streams):
            yield Batch(torch.cat([b.sparse for b in parts]),
                        None if parts[0].dense is None else torch.cat([b.dense for b in parts]),
                        None if parts[0].labels is None else torch.cat([b.labels for b in parts]),
                        torch.cat([b.index for b in parts]))
    finally:
        for s in streams:
            s.close()


__all__ = ["DiskDataset", "StreamLoader", "open_dataset", "split_blocks", "expand_paths", "block_rows_for",
           "DEFAULT_WINDOW_ROWS"]
