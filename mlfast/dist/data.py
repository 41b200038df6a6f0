"""Each data shard's part of every global batch.

A data-parallel rank must see, at step k, rows [lo, hi) of the global batch k that a single
process with batch B would train on (``mlfast.dist.topology.shard_bounds``), so that D ranks
together take exactly one global step. `ShardedBatchLoader` is a `BatchLoader` over the same rows,
seed and order on every rank (``order(epoch)``: the same permutation everywhere) that gathers only
its shard's rows of each batch and says where they sit (`ShardBatch`: ``offset``, ``global_size``).
``len()`` is the global number of batches, the same on every rank, so the ranks' loops stay in step
(a shard may get no rows of a tiny last batch; it still takes part in the step).

What a streaming source (data larger than memory) needs to replace it: the same global batch order
(a permutation or shuffle buffer seeded by (seed, epoch), identical on every rank), ``len()`` the
same everywhere, ``epoch(e, start_batch=k)`` that skips to batch k without reading what it skips
(exact resume), and per batch only the rows [lo, hi) of the data shard (decode only those, or let
each rank read its own byte ranges of the batch's chunk).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mlfast.dist.topology import shard_bounds
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
