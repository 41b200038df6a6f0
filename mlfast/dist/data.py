"""Each data shard's part of every global batch.

A data-parallel rank must see, at step k, rows [lo, hi) of the global batch k that a single
process with batch B would train on (``mlfast.io.batches.shard_bounds``), so that D ranks
together take exactly one global step. `ShardedBatchLoader` is a `BatchLoader` over the same rows,
seed and order on every rank (``order(epoch)``: the same permutation everywhere) that gathers only
its shard's rows of each batch and says where they sit (`ShardBatch`: ``offset``, ``global_size``).
``len()`` is the global number of batches, the same on every rank, so the ranks' loops stay in step
(a shard may get no rows of a tiny last batch; it still takes part in the step).

Streamed data (``--stream``, :class:`mlfast.io.stream.StreamLoader`): `ShardedStreamLoader` runs
the same seeded window order on every rank and keeps each global batch's rows [lo, hi). Every rank
reads every window (memory stays bounded by two windows; on one node the page cache serves the
ranks' reads of the same blocks once from disk); reading only a shard's rows would need each batch's
rows to be spread over fewer blocks than the shuffle spreads them.
`shard_loader` picks the right one for a loader.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mlfast.io.batches import shard_bounds
from mlfast.io.batches import Batch, BatchLoader


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
    """A :class:`mlfast.io.stream.StreamLoader`'s global batches, each cut to data shard ``shard``
    of ``shards`` (`ShardBatch`), with its ``len`` and exact ``epoch(e, start_batch)``. A training
    stream read in lanes (``shards`` divides ``loader.lanes``) gives each shard its own lanes: it
    reads only its rows. A one-lane stream (evaluation) is read whole by every shard and cut."""

    def __init__(self, loader, shard: int, shards: int):
        if not 0 <= shard < shards:
            raise ValueError(f"shard {shard} of {shards}")
        if loader.lanes > 1 and loader.lanes % shards:
            raise ValueError(f"{loader.lanes} stream lanes cannot be shared by {shards} data shards: the number of "
                             f"lanes must be a multiple of the number of data shards")
        self.loader, self.shard, self.shards = loader, int(shard), int(shards)
        self.batch_size = loader.batch_size
        self.data = loader.data

    @property
    def num_rows(self) -> int:
        return self.loader.rows

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, start_batch: int = 0):
        def cut(t, lo, hi):
            return None if t is None else t[lo:hi]

        def whole():
            for b in self.loader.epoch(epoch, start_batch):
                n = len(b)
                lo, hi = shard_bounds(n, self.shard, self.shards)
                yield ShardBatch(cut(b.sparse, lo, hi), cut(b.dense, lo, hi), cut(b.labels, lo, hi), b.index[lo:hi],
                                 (), n, lo)

        def own_lanes():
            k = self.loader.lanes // self.shards
            lo = shard_bounds(self.batch_size, self.shard, self.shards)[0]
            for b in self.loader.epoch(epoch, start_batch, lanes=range(self.shard * k, (self.shard + 1) * k)):
                yield ShardBatch(b.sparse, b.dense, b.labels, b.index, (), self.batch_size, lo)

        return own_lanes() if self.loader.lanes > 1 else whole()


def shard_loader(loader, shard: int, shards: int):
    """``loader`` cut to data shard ``shard`` of ``shards`` (in memory or streamed)."""
    from mlfast.io.stream import StreamLoader

    if isinstance(loader, StreamLoader):
        if loader.shuffle and loader.lanes == 1 and getattr(loader, "auto_lanes", False):
            loader = loader.with_lanes(shards)  # by default each data shard reads its own lane
        return ShardedStreamLoader(loader, shard, shards)
    return ShardedBatchLoader(loader, shard, shards)
