"""Each data shard's part of every global batch.

A data-parallel rank must see, at step k, rows [lo, hi) of the global batch k that a single
process with batch B would train on (``mlfast.io.batches.shard_bounds``), so that D ranks
together take exactly one global step. `ShardedBatchLoader` is a `BatchLoader` over the same rows,
seed and order on every rank (``order(epoch)``: the same permutation everywhere) that gathers only
its shard's rows of each batch and says where they sit (`ShardBatch`: ``offset``, ``global_size``).
``len()`` is the global number of batches, the same on every rank, so the ranks' loops stay in step
(a shard may get no rows of a tiny last batch; it still takes part in the step).

Streamed data (``--stream``, :class:`mlfast.io.stream.StreamLoader`): `ShardedStreamLoader` reads
only the shard's share. A training stream is read in lanes (one or more per shard): each shard reads
its own lanes' blocks, which are exactly its rows of each global batch. An evaluation stream (file
order) is split into contiguous ranges of blocks, one per shard, each read and scored by its shard
alone; the shards run as many batches (a shard past its end takes part with an empty one), and
``rows_by_shard()`` says how many rows each shard scored, to put the predictions together.
`shard_loader` picks the right one for a loader.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mlfast.io.batches import Batch, BatchLoader, shard_bounds


@dataclass
class ShardBatch(Batch):
    """A data shard's rows [offset, offset + len) of a global batch of ``global_size`` rows."""

    global_size: int = 0
    offset: int = 0


class ShardedBatchLoader(BatchLoader):
    """``loader``'s batches, each cut to data shard ``shard`` of ``shards``.

    Example::

        >>> import numpy as np
        >>> from mlfast.io.data import CTRData
        >>> d = CTRData(labels=np.zeros(10, np.float32), dense=np.zeros((10, 1), np.float32),
        ...             dense_missing=np.zeros((10, 1), bool), sparse=np.arange(10).reshape(10, 1),
        ...             field_offsets=np.array([0, 10]), field_names=["a"])
        >>> base = BatchLoader(d, 4)
        >>> [(b.index.tolist(), b.offset, b.global_size) for b in ShardedBatchLoader(base, 1, 2).epoch(0)]
        [([2, 3], 2, 4), ([6, 7], 2, 4), ([9], 1, 2)]
    """

    def __init__(self, loader: BatchLoader, shard: int, shards: int):
        super().__init__(loader.data, loader.batch_size, indices=loader.indices, shuffle=loader.shuffle,
                         seed=loader.seed, drop_last=loader.drop_last, device=loader.device, prefetch=loader.prefetch,
                         use_dense=loader.use_dense, min_last=loader.min_last, ids_dtype=loader.ids_dtype)
        if not 0 <= shard < shards:
            raise ValueError(f"shard {shard} of {shards}")
        self.shard, self.shards = int(shard), int(shards)

    def shard_rows(self, k: int) -> tuple[int, int, int]:
        """(lo, hi, global size) of batch ``k`` for this shard."""
        n = min(self.batch_size, len(self.indices) - k * self.batch_size)
        lo, hi = shard_bounds(n, self.shard, self.shards)
        return lo, hi, n

    @property
    def num_rows(self) -> int:
        return len(self.indices)

    def _produce(self, order: np.ndarray, start_batch: int, stop):
        cuda = self.device.type == "cuda"
        copy_stream = torch.cuda.Stream(self.device) if cuda else None
        bs = self.batch_size
        for k in range(start_batch, len(self)):
            if stop is not None and stop.is_set():
                return
            lo, hi, n = self.shard_rows(k)
            host = self._gather(order[k * bs + lo:k * bs + hi], None)
            if not cuda:
                yield ShardBatch(host.sparse, host.dense, host.labels, host.index, host.bags, n, lo), None
                continue
            with torch.cuda.stream(copy_stream):
                def dev(t):
                    return None if t is None else t.pin_memory().to(self.device, non_blocking=True)

                batch = ShardBatch(dev(host.sparse), dev(host.dense), dev(host.labels), host.index,
                                   tuple((dev(o), dev(v)) for o, v in host.bags), n, lo)
                done = torch.cuda.Event()
                done.record(copy_stream)
            yield batch, done


class ShardedStreamLoader:
    """A :class:`mlfast.io.stream.StreamLoader` cut to data shard ``shard`` of ``shards``
    (`ShardBatch` es), reading only that shard's share: its lanes of a training stream (``shards``
    divides ``loader.lanes``), or its range of blocks of an evaluation stream; a one-lane training
    stream is read whole by every shard, which keeps its rows of each global batch. ``len`` is the same
    on every shard; ``epoch(e, start_batch)`` exact."""

    def __init__(self, loader, shard: int, shards: int):
        if not 0 <= shard < shards:
            raise ValueError(f"shard {shard} of {shards}")
        if loader.lanes > 1 and loader.lanes % shards:
            raise ValueError(f"{loader.lanes} stream lanes cannot be shared by {shards} data shards: the number of "
                             f"lanes must be a multiple of the number of data shards")
        self.loader, self.shard, self.shards = loader, int(shard), int(shards)
        self.batch_size = loader.batch_size
        self.data = loader.data
        self.parts = None
        if not loader.shuffle:  # evaluation: a contiguous range of blocks per shard
            blocks = loader.blocks
            self.parts = [loader.with_blocks(blocks[slice(*shard_bounds(len(blocks), d, shards))])
                          for d in range(shards)]

    @property
    def num_rows(self) -> int:
        return self.loader.rows

    def __len__(self) -> int:
        return len(self.loader) if self.parts is None else max(len(p) for p in self.parts)

    def rows_by_shard(self) -> list[int] | None:
        """Rows each shard reads in an epoch (evaluation streams; None for training streams, whose
        shards take their slice of each global batch)."""
        return None if self.parts is None else [p.rows for p in self.parts]

    def epoch(self, epoch: int, start_batch: int = 0):
        if self.parts is not None:
            return self._own_blocks(epoch, start_batch)
        if self.loader.lanes == 1:  # one lane (--stream-lanes 1): every shard reads it whole, keeps its rows
            return self._cut(epoch, start_batch)
        k = self.loader.lanes // self.shards
        lo = shard_bounds(self.batch_size, self.shard, self.shards)[0]
        lanes = range(self.shard * k, (self.shard + 1) * k)
        return (ShardBatch(b.sparse, b.dense, b.labels, b.index, (), self.batch_size, lo)
                for b in self.loader.epoch(epoch, start_batch, lanes=lanes))

    def _cut(self, epoch: int, start_batch: int):
        for b in self.loader.epoch(epoch, start_batch):
            n = len(b)
            lo, hi = shard_bounds(n, self.shard, self.shards)
            dense = None if b.dense is None else b.dense[lo:hi]
            labels = None if b.labels is None else b.labels[lo:hi]
            yield ShardBatch(b.sparse[lo:hi], dense, labels, b.index[lo:hi], (), n, lo)

    def _own_blocks(self, epoch: int, start_batch: int):
        B = self.batch_size

        def rows(d: int, k: int) -> int:  # rows of shard d in its batch k
            return int(min(B, max(0, self.parts[d].rows - k * B)))

        mine = self.parts[self.shard]
        k = start_batch
        for b in mine.epoch(epoch, min(start_batch, len(mine))):
            sizes = [rows(d, k) for d in range(self.shards)]
            yield ShardBatch(b.sparse, b.dense, b.labels, b.index, (), sum(sizes), sum(sizes[:self.shard]))
            k += 1
        h, dev = self.loader.data, self.loader.device
        for k in range(k, len(self)):  # past this shard's end: empty batches, so every shard runs as many
            sizes = [rows(d, k) for d in range(self.shards)]
            yield ShardBatch(torch.zeros(0, h.num_fields, dtype=self.loader.ids_dtype, device=dev),
                             torch.zeros(0, h.num_dense, device=dev) if self.loader.use_dense else None,
                             torch.zeros(0, device=dev) if h.labels is not None else None,
                             torch.zeros(0, dtype=torch.int64), (), sum(sizes), sum(sizes[:self.shard]))


def shard_loader(loader, shard: int, shards: int):
    """``loader`` cut to data shard ``shard`` of ``shards`` (in memory or streamed)."""
    from mlfast.io.stream import StreamLoader

    if isinstance(loader, StreamLoader):
        if loader.shuffle and loader.lanes == 1 and loader.auto_lanes:
            loader = loader.with_lanes(shards)  # by default each data shard reads its own lane
        return ShardedStreamLoader(loader, shard, shards)
    return ShardedBatchLoader(loader, shard, shards)
