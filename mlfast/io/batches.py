"""Seeded train/valid/test splits and the batch iterator that feeds ``CTRData`` rows to the trainer.

``BatchLoader`` cuts an epoch into batches in a deterministic order (a permutation seeded by
``(seed, epoch)``), gathers the rows of each batch (numpy arrays or memmaps alike) and hands them
out as tensors in the layout the models read: ``sparse`` [B, F] int64 global ids, ``dense``
[B, Dd] float32, ``labels`` [B] float32, ``bags`` (one ``(offsets [B+1], values [nnz])`` pair per
multi-hot field), plus ``index`` [B], the source rows (to put predictions back in file order). ``start_batch`` resumes an epoch exactly where a checkpoint left it.

With ``prefetch > 0`` a background thread prepares that many batches ahead (bounded queue);
an exception in the thread is raised in the consumer, and the thread stops as soon as the consumer
stops iterating (``break``, an exception, or the generator being closed). On CUDA the thread gathers
into pinned host buffers and copies them with ``non_blocking=True`` on a side stream; the consumer
only enqueues a wait on that copy (no host synchronisation). On the CPU the gathered numpy arrays
are wrapped with ``torch.from_numpy``: the gather is the only copy.

Example::

    >>> import numpy as np
    >>> from mlfast.io.data import CTRData
    >>> from mlfast.io.batches import BatchLoader, split_indices
    >>> n = 10
    >>> d = CTRData(labels=np.zeros(n, np.float32), dense=np.zeros((n, 2), np.float32),
    ...             dense_missing=np.zeros((n, 2), bool), sparse=np.zeros((n, 3), np.int64),
    ...             field_offsets=np.array([0, 1, 2, 3]), field_names=["a", "b", "c"])
    >>> train, valid, test = split_indices(n, (8, 1, 1), seed=0)
    >>> loader = BatchLoader(d, 3, indices=train, shuffle=True, seed=0)
    >>> [len(b) for b in loader.epoch(0)]
    [3, 3, 2]
"""
from __future__ import annotations

import atexit
import math
import os
import queue
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Iterator, Sequence

import numba as nb
import numpy as np
import torch

from mlfast.io.data import CTRData

PREFETCH_THREAD_NAME = "mlfast-batch-prefetch"

# Prefetch threads still running, with their stop events. A loop that leaves an epoch early stops
# its thread when the generator is closed; one never closed (kept alive to the end of the program)
# is stopped here at exit, while the interpreter still runs: a daemon thread caught inside a torch
# op (GIL released) during interpreter finalisation is ended by pthread_exit, and that unwinding
# through C++ aborts the process ("terminate called without an active exception").
_LIVE_PREFETCH: dict[threading.Thread, threading.Event] = {}
_LIVE_LOCK = threading.Lock()


@atexit.register
def stop_prefetch_threads(timeout: float = 10.0) -> int:
    """Stop and join every running prefetch thread (at exit; callable any time). Returns how many
    were still running."""
    with _LIVE_LOCK:
        live = list(_LIVE_PREFETCH.items())
    for _, stop in live:
        stop.set()
    live = [(t, e) for t, e in live if t.is_alive()]
    for thread, _ in live:
        thread.join(timeout)
    return len(live)


def shard_bounds(n: int, shard: int, shards: int) -> tuple[int, int]:
    """Rows [lo, hi) of a batch of ``n`` rows that data shard ``shard`` of ``shards`` takes:
    contiguous and balanced (sizes differ by at most one), in shard order.

    >>> [shard_bounds(10, d, 3) for d in range(3)]
    [(0, 3), (3, 6), (6, 10)]
    """
    return shard * n // shards, (shard + 1) * n // shards


def num_batches(rows: int, batch_size: int, drop_last: bool = False, min_last: int = 1) -> int:
    """Batches of an epoch of ``rows``: the full ones, and the last partial one unless ``drop_last``
    or it holds fewer than ``min_last`` rows."""
    full, rest = divmod(rows, batch_size)
    return full + (1 if rest and not drop_last and rest >= min_last else 0)


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------
def split_sizes(n: int, ratios: Sequence[float] = (8, 1, 1)) -> list[int]:
    """Part sizes for ``n`` rows by the largest-remainder rule.

    Each part gets ``floor(n * r_i / sum(r))`` rows; the rows left over go, one each, to the parts
    with the largest fractional remainders (ties: the earlier part). Sizes sum to ``n`` exactly, and
    for Criteo's 45,840,617 rows at 8:1:1 this gives BARS's 36,672,493 / 4,584,062 / 4,584,062.

        >>> split_sizes(45_840_617)
        [36672493, 4584062, 4584062]
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    fr = [Fraction(r).limit_denominator(1 << 30) if isinstance(r, float) else Fraction(int(r)) for r in ratios]
    if not fr or any(r < 0 for r in fr) or sum(fr) == 0:
        raise ValueError(f"ratios must be non-negative with a positive sum, got {tuple(ratios)}")
    total = sum(fr)
    quotas = [n * r / total for r in fr]
    sizes = [math.floor(q) for q in quotas]
    left = n - sum(sizes)
    by_remainder = sorted(range(len(fr)), key=lambda i: (-(quotas[i] - sizes[i]), i))
    for i in by_remainder[:left]:
        sizes[i] += 1
    return sizes


def split_indices(n: int, ratios: Sequence[float] = (8, 1, 1), seed: int = 0) -> tuple[np.ndarray, ...]:
    """Seeded random split of rows ``0..n-1`` into ``len(ratios)`` disjoint parts covering all rows.

    Rows are assigned by ``np.random.default_rng(seed).permutation(n)``, cut at ``split_sizes``;
    each part is returned sorted (int64), so reading it from a memmap walks the file forwards.

        >>> tr, va, te = split_indices(10, seed=1)
        >>> len(tr), len(va), len(te), sorted(np.concatenate([tr, va, te]).tolist()) == list(range(10))
        (8, 1, 1, True)
    """
    sizes = split_sizes(n, ratios)
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64, copy=False)
    cuts = np.cumsum(sizes)[:-1]
    return tuple(np.sort(p) for p in np.split(perm, cuts))


# ---------------------------------------------------------------------------------------------
# Gather
# ---------------------------------------------------------------------------------------------
@nb.njit(cache=True, nogil=True)
def _gather2d(src, idx, out):  # pragma: no cover - numba
    """out[i, :] = src[idx[i], :] without holding the GIL (the prefetch thread runs beside the
    training step); row-by-row copies keep the batch order the shuffle chose."""
    w = src.shape[1]
    for i in range(idx.shape[0]):
        r = idx[i]
        for j in range(w):
            out[i, j] = src[r, j]


@nb.njit(cache=True, nogil=True)
def _gather1d(src, idx, out):  # pragma: no cover - numba
    for i in range(idx.shape[0]):
        out[i] = src[idx[i]]


def gather_rows(src: np.ndarray, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``src[idx]`` for a 1-D or 2-D array or memmap (C-contiguous rows), into ``out`` if given.

        >>> gather_rows(np.arange(12).reshape(4, 3), np.array([2, 0]))
        array([[6, 7, 8],
               [0, 1, 2]])
    """
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    if out is None:
        out = np.empty((len(idx),) + src.shape[1:], src.dtype)
    arr = src.view(np.ndarray) if isinstance(src, np.memmap) else src
    if arr.ndim == 2 and arr.flags.c_contiguous:
        _gather2d(arr, idx, out)
    elif arr.ndim == 1:
        _gather1d(arr, idx, out)
    else:
        np.take(arr, idx, axis=0, out=out)
    return out


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """One batch in the layout the models read. ``index`` stays on the host (bookkeeping for
    putting predictions back in source order); the other tensors are on the loader's device."""

    sparse: torch.Tensor  # [B, F] global row ids (int64, or int32 with ids_dtype=torch.int32)
    dense: torch.Tensor | None  # [B, Dd] float32, None with use_dense=False or no dense columns
    labels: torch.Tensor | None  # [B] float32, None for unlabeled data
    index: torch.Tensor  # [B] int64 source rows
    bags: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()  # per multi-hot field: (offsets [B+1], values)

    def __len__(self) -> int:
        return int(self.sparse.shape[0])


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()


class BatchLoader:
    """Deterministic, resumable batches of ``data`` rows (``indices`` if given, else all rows).

    ``epoch(e)`` visits every row of ``indices`` exactly once, in the order
    ``np.random.default_rng([seed, e]).permutation(indices)`` with ``shuffle`` (else as given), in
    batches of ``batch_size`` (the last one partial unless ``drop_last``). ``epoch(e, start_batch=k)``
    yields exactly batches ``k, k+1, ...`` of that same epoch. ``iter(loader)`` runs epoch
    ``set_epoch``'s value (0 by default).

        >>> import numpy as np
        >>> from mlfast.io.data import CTRData
        >>> d = CTRData(labels=np.arange(5, dtype=np.float32), dense=np.zeros((5, 1), np.float32),
        ...             dense_missing=np.zeros((5, 1), bool), sparse=np.arange(10).reshape(5, 2),
        ...             field_offsets=np.array([0, 5, 10]), field_names=["a", "b"])
        >>> loader = BatchLoader(d, 2, shuffle=True, seed=3)
        >>> len(loader), [b.index.tolist() for b in loader.epoch(1, start_batch=1)]
        (3, [[0, 2], [3]])
    """

    def __init__(
        self,
        data: CTRData,
        batch_size: int,
        *,
        indices: np.ndarray | Sequence[int] | None = None,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        device: str | torch.device | None = None,
        prefetch: int = 2,
        use_dense: bool = True,
        min_last: int = 1,
        ids_dtype: torch.dtype = torch.int64,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        n = data.num_rows
        if indices is None:
            idx = np.arange(n, dtype=np.int64)
        else:
            idx = np.asarray(indices)
            if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
                raise ValueError(f"indices must be a 1-D integer array, got shape {idx.shape} dtype {idx.dtype}")
            idx = idx.astype(np.int64, copy=False)
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"indices must lie in [0, {n}), got min {idx.min()} max {idx.max()}")
        self.data = data
        self.indices = idx
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        # A last batch smaller than this is left out of the epoch (training with BatchNorm: a batch of
        # one row cannot be normalised). With shuffling it is a different row each epoch.
        self.min_last = max(1, int(min_last))
        if ids_dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids_dtype must be torch.int64 or torch.int32, got {ids_dtype}")
        if ids_dtype == torch.int32 and int(data.field_offsets[-1]) >= 2**31:
            raise ValueError(f"int32 ids cannot index a table of {int(data.field_offsets[-1])} rows (>= 2^31)")
        self.ids_dtype = ids_dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {self.device} requested but CUDA is not available")
            if self.device.index is None:  # the prefetch thread must select the same device by index
                self.device = torch.device("cuda", torch.cuda.current_device())
        self.prefetch = int(prefetch)
        self.use_dense = bool(use_dense) and data.num_dense > 0
        self._epoch = 0

    def __len__(self) -> int:
        return num_batches(len(self.indices), self.batch_size, self.drop_last, self.min_last)

    @property
    def _ids_np(self):
        return np.int32 if self.ids_dtype == torch.int32 else np.int64

    def set_epoch(self, epoch: int) -> None:
        """The epoch ``iter(loader)`` runs next."""
        self._epoch = int(epoch)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(self._epoch)

    def order(self, epoch: int) -> np.ndarray:
        """All rows of ``epoch`` in visiting order (batch ``k`` is ``order[k*B:(k+1)*B]``)."""
        if not self.shuffle:
            return self.indices
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.indices)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches ``start_batch ..`` of ``epoch`` (arguments are checked here, not at first ``next``)."""
        nb_ = len(self)
        if not 0 <= start_batch <= nb_:
            raise ValueError(f"start_batch must be in [0, {nb_}] for {nb_} batches, got {start_batch}")
        order = self.order(epoch)
        if self.prefetch == 0:
            return (self._finish(b) for b in self._produce(order, start_batch, None))
        return self._threaded(order, start_batch)

    # -- producer side -----------------------------------------------------------------------
    def _produce(self, order: np.ndarray, start_batch: int, stop: threading.Event | None):
        """Batches as (Batch, copy-done event or None); runs in the prefetch thread if any."""
        cuda = self.device.type == "cuda"
        ring = _PinnedRing(self, slots=self.prefetch + 2) if cuda else None
        copy_stream = torch.cuda.Stream(self.device) if cuda else None
        bs = self.batch_size
        for k in range(start_batch, len(self)):
            if stop is not None and stop.is_set():
                return
            rows = order[k * bs:(k + 1) * bs]
            if not cuda:
                yield self._gather(rows, None), None
                continue
            slot, host = ring.next(len(rows))
            self._gather(rows, host)
            with torch.cuda.stream(copy_stream):
                dev = Batch(
                    sparse=host.sparse.to(self.device, non_blocking=True),
                    dense=None if host.dense is None else host.dense.to(self.device, non_blocking=True),
                    labels=None if host.labels is None else host.labels.to(self.device, non_blocking=True),
                    index=torch.from_numpy(np.array(rows)),  # host copy: the pinned slot is reused
                    # Bags vary in size: pinned per batch (torch's caching host allocator reuses the
                    # blocks once the copies that read them have finished).
                    bags=tuple((o.pin_memory().to(self.device, non_blocking=True),
                                v.pin_memory().to(self.device, non_blocking=True)) for o, v in self._bags(rows)),
                )
                done = torch.cuda.Event()
                done.record(copy_stream)
            ring.used(slot, done)
            yield dev, done

    def _gather(self, rows: np.ndarray, host: Batch | None) -> Batch:
        d = self.data
        if host is None:  # CPU: fresh arrays, handed over as tensors without another copy
            sparse = gather_rows(d.sparse, rows, np.empty((len(rows), d.sparse.shape[1]), self._ids_np))
            dense = gather_rows(d.dense, rows) if self.use_dense else None
            labels = gather_rows(d.labels, rows) if d.labels is not None else None
            return Batch(
                sparse=torch.from_numpy(sparse),
                dense=None if dense is None else torch.from_numpy(dense),
                labels=None if labels is None else torch.from_numpy(labels.astype(np.float32, copy=False)),
                index=torch.from_numpy(np.array(rows)),  # own copy: `rows` may view the caller's indices
                bags=self._bags(rows),
            )
        gather_rows(d.sparse, rows, host.sparse.numpy())
        if host.dense is not None:
            gather_rows(d.dense, rows, host.dense.numpy())
        if host.labels is not None:
            gather_rows(d.labels, rows, host.labels.numpy())
        return host

    def _bags(self, rows: np.ndarray) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        out = []
        for bag in self.data.bags:
            b = bag.take(rows)
            out.append((torch.from_numpy(b.offsets), torch.from_numpy(b.values)))
        return tuple(out)

    # -- consumer side -----------------------------------------------------------------------
    def _finish(self, item) -> Batch:
        batch, done = item
        if done is not None:
            # The consumer's stream waits for the copy on the GPU; record_stream keeps the caching
            # allocator from handing these blocks to the copy stream while this stream still reads them.
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(done)
            for t in (batch.sparse, batch.dense, batch.labels, *(t for bag in batch.bags for t in bag)):
                if t is not None:
                    t.record_stream(cur)
        return batch

    def _threaded(self, order: np.ndarray, start_batch: int) -> Iterator[Batch]:
        cuda = self.device if self.device.type == "cuda" else None
        return background(lambda stop: self._produce(order, start_batch, stop), self.prefetch, self._finish, cuda)


def background(produce: Callable[[threading.Event], Iterator[Any]], depth: int,
               finish: Callable[[Any], Any] = lambda x: x, cuda_device: torch.device | None = None) -> Iterator[Any]:
    """``finish(item)`` for each item of ``produce(stop)``, which runs in a background thread up to
    ``depth`` items ahead (a bounded queue). An exception in the thread is raised here; the thread
    stops (``stop`` set, then joined) as soon as the consumer stops iterating, or at exit."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            if cuda_device is not None:
                torch.cuda.set_device(cuda_device)
            for item in produce(stop):
                if not put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put(_Failure(e))
            return
        finally:
            with _LIVE_LOCK:
                _LIVE_PREFETCH.pop(threading.current_thread(), None)
        put(_DONE)

    thread = threading.Thread(target=work, name=PREFETCH_THREAD_NAME, daemon=True)

    def consume() -> Iterator[Any]:
        with _LIVE_LOCK:
            _LIVE_PREFETCH[thread] = stop
        try:
            thread.start()
        except BaseException:
            with _LIVE_LOCK:
                _LIVE_PREFETCH.pop(thread, None)
            raise
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield finish(item)
        finally:
            stop.set()
            thread.join()

    return consume()


class _PinnedRing:
    """Pinned host buffers reused round-robin; a slot is rewritten only after the device copy that
    read it has finished (its event), so at most ``slots`` batches of host memory are ever pinned."""

    def __init__(self, loader: BatchLoader, slots: int):
        d, bs = loader.data, loader.batch_size
        self.bufs = [
            Batch(
                sparse=torch.empty((bs, d.sparse.shape[1]), dtype=loader.ids_dtype).pin_memory(),
                dense=torch.empty((bs, d.num_dense), dtype=torch.float32).pin_memory() if loader.use_dense else None,
                labels=torch.empty(bs, dtype=torch.float32).pin_memory() if d.labels is not None else None,
                index=torch.empty(0, dtype=torch.int64),
            )
            for _ in range(slots)
        ]
        self.events: list[Any] = [None] * slots
        self.k = 0

    def next(self, rows: int) -> tuple[int, Batch]:
        s = self.k % len(self.bufs)
        self.k += 1
        if self.events[s] is not None:
            self.events[s].synchronize()  # blocks the prefetch thread only
        b = self.bufs[s]
        return s, Batch(sparse=b.sparse[:rows], dense=None if b.dense is None else b.dense[:rows],
                        labels=None if b.labels is None else b.labels[:rows], index=b.index)

    def used(self, slot: int, event: Any) -> None:
        self.events[slot] = event


def iter_batches(
    data_or_path: CTRData | str | os.PathLike,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    *,
    start_batch: int = 0,
    **loader_kwargs: Any,
) -> Iterator[Batch]:
    """Batches of one epoch of a ``CTRData`` or of a Criteo file (read with ``mlfast.io.reader``).

        >>> import numpy as np
        >>> from mlfast.io.data import CTRData
        >>> d = CTRData(labels=None, dense=np.zeros((4, 0), np.float32), dense_missing=np.zeros((4, 0), bool),
        ...             sparse=np.arange(4).reshape(4, 1), field_offsets=np.array([0, 4]), field_names=["a"])
        >>> [b.sparse[:, 0].tolist() for b in iter_batches(d, 3)]
        [[0, 1, 2], [3]]
    """
    if isinstance(data_or_path, (str, os.PathLike)):
        from mlfast.io.reader import read_criteo  # lazy: the native reader is optional for in-memory use

        data_or_path = read_criteo(data_or_path)
    loader = BatchLoader(data_or_path, batch_size, shuffle=shuffle, seed=seed, **loader_kwargs)
    return loader.epoch(epoch, start_batch=start_batch)


__all__ = ["Batch", "BatchLoader", "split_indices", "split_sizes", "iter_batches", "gather_rows",
           "PREFETCH_THREAD_NAME", "stop_prefetch_threads", "background", "num_batches", "shard_bounds"]
