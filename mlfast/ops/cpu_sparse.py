"""Sparse embedding optimizers on the CPU, in numba: exactly ``mlfast.ops.sparse_optim``'s definition.

``sparse_update`` replaces torch's embedding backward + optimizer step on the CPU training path: it
reads the gradient of each looked-up row and touches only the rows that were looked up, never a
dense gradient of the table.

How one step runs (C independent chunks, no locks, deterministic):

* The touched rows are dealt to C chunks (C = the shared thread budget, ``mlfast.ops.threads``:
  torch's thread count) by ``owner(r) = (r >> 4) % C``:
  blocks of 16 consecutive rows, so two threads never write the same cache line of the id->slot map
  and rarely of the table.
* Pass 1: each chunk scans all N ids in order and, for the rows it owns, gives each new row a slot
  through a table-sized id->slot map (``slot[r]``, -1 when unused) and chains the row's occurrences
  in increasing n (a linked list through ``nxt``). Only ids are read: 8 bytes per occurrence.
* Pass 2: per owned row, in first-seen order, the chunk sums the row's gradients along its chain
  (so duplicates are always added in increasing n, whatever the thread count: bitwise the same
  result with 1 or 16 threads), applies weight decay and the update, and resets ``slot[r]`` to -1.
  Rows ``_PREFETCH_AHEAD`` updates ahead are prefetched: the table is far larger than the caches.

Scanning all N ids once per chunk costs C sequential passes over 8 N bytes, far less than the random
row traffic of the update itself; in exchange every row is owned by one thread from aggregation to
update, and each gradient row is read exactly once, never copied. The scratch buffers (the id->slot
map and the per-step row lists) are kept per Python thread and table size, so a step allocates
nothing. Each chunk is a serial, GIL-free numba function run by ``parallel_for`` (not numba's
``prange``, whose OpenMP pool would spin against torch's: see ``mlfast.ops.threads``).
"""
from __future__ import annotations

import math
import threading
from typing import Sequence

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from mlfast.ops.sparse_optim import SparseOptimConfig, SparseOptimState, check_segments, packed_offsets
from mlfast.ops.threads import budget, parallel_for

_KIND_IDS = {"sgd": 0, "adagrad": 1, "adam": 2}
_ROW_BLOCK_SHIFT = 4  # rows are dealt to threads in blocks of 2**4
# Rows are updated in first-seen order, i.e. at random places in a table far larger than the caches;
# each row would stall on DRAM. Prefetching the rows this many updates ahead hid most of it: the
# single-thread update of a 1.8 M x 33 table went from ~30 ms to ~14 ms per step (development box).
_PREFETCH_AHEAD = 8


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the CPU to fetch the cache line holding ``arr[idx]`` (LLVM's prefetch: read, keep)."""
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]],
                                       wraparound=False, boundscheck=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch", [i8p], ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
        # rw = 0 (read), locality = 3 (keep in all levels), cache type = 1 (data)
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, inline="always")
def _prefetch_row(arr, start, width):
    # One hint per 16 float32 (64-byte lines) plus the last element, whose line the stride can
    # miss when the row does not start on a line boundary.
    for k in range(0, width, 16):
        _prefetch(arr, start + k)
    _prefetch(arr, start + width - 1)


@njit(cache=True, inline="always")
def row_offset(row, width):
    """Flat offset of element 0 of row ``row`` in a row-major [V, width] array, in int64.

    Both factors are widened first: with int32 ids a product like 2**27 * 17 would wrap. Tested
    alone (tests/test_cpu_sparse.py) because a table big enough to exercise it is 8 GiB.

    Example::

        >>> row_offset(np.int32(2**27), np.int32(17))
        2281701376
    """
    return np.int64(row) * np.int64(width)


@njit(cache=True)
def _id_bounds(ids):
    lo, hi = ids[0], ids[0]
    for n in range(1, ids.shape[0]):
        r = ids[n]
        if r < lo:
            lo = r
        if r > hi:
            hi = r
    return lo, hi


@njit(nogil=True, cache=True)
def _sparse_update_chunk(c, n_chunks, weight, ids, grads, g_strides, g_offsets, width, exp_avg, exp_avg_sq,
                         sum_sq, seg_widths, seg_offsets, kind, lr, beta1, beta2, eps, weight_decay, step_size,
                         slot, uniq, first, last, nxt):
    # Chunk c of the step (rows with (r >> _ROW_BLOCK_SHIFT) % n_chunks == c), serial and GIL-free:
    # the launcher runs the chunks on the shared thread budget. weight / exp_avg / exp_avg_sq are
    # flat row-major views; unused state arrays are empty. grads is a tuple of flat float32 arrays,
    # one per segment k: lookup n's gradient of segment k is grads[k][n * g_strides[k] + g_offsets[k]
    # + d], so the peers' gradients are read where autograd left them (one [N, W_p] tensor each), or
    # out of one packed [N, R] tensor, without a copy. Scalars arrive as float32 so the update runs
    # in fp32, as the reference does.
    N = ids.shape[0]
    S = seg_widths.shape[0]
    one = np.float32(1.0)
    base = np.int64(c) * N  # this chunk's region of uniq / first / last
    # Pass 1: a slot per owned row, and the row's occurrences chained in increasing n
    # (first[s] -> nxt[n] -> ... -> -1). Only ids are read here; grads are read once, in pass 2.
    U = 0
    for n in range(N):
        r = ids[n]
        if (r >> _ROW_BLOCK_SHIFT) % n_chunks != c:
            continue
        s = slot[r]
        if s < 0:
            s = U
            slot[r] = s
            uniq[base + s] = r
            first[base + s] = n
            U += 1
        else:
            nxt[last[base + s]] = n
        last[base + s] = n
        nxt[n] = -1
    # Pass 2: per owned row, sum its gradients along the chain, then update it.
    g = np.empty(width, np.float32)
    for s in range(U):
        if s + _PREFETCH_AHEAD < U:
            ra = row_offset(uniq[base + s + _PREFETCH_AHEAD], width)
            _prefetch_row(weight, ra, width)
            na = first[base + s + _PREFETCH_AHEAD]
            for k in range(S):
                _prefetch_row(grads[k], row_offset(na, g_strides[k]) + g_offsets[k], seg_widths[k])
            if kind == 2:
                _prefetch_row(exp_avg, ra, width)
                _prefetch_row(exp_avg_sq, ra, width)
            elif kind == 1:
                _prefetch(sum_sq, row_offset(uniq[base + s + _PREFETCH_AHEAD], S))
        r = uniq[base + s]
        slot[r] = -1
        # Row views, indexed from 0 inside the loops: numba then drops its negative-index
        # wraparound and LLVM vectorizes the element loops (adam's sqrt and divide included).
        # g holds the row's summed gradient at the weight's column offsets.
        for k in range(S):
            wk = seg_widths[k]
            gk = g[seg_offsets[k]:seg_offsets[k] + wk]
            gsrc = grads[k]
            stride = g_strides[k]
            off = g_offsets[k]
            n = first[base + s]
            src = row_offset(n, stride) + off
            gn = gsrc[src:src + wk]
            for d in range(wk):
                gk[d] = gn[d]
            n = nxt[n]
            while n >= 0:
                src = row_offset(n, stride) + off
                gn = gsrc[src:src + wk]
                for d in range(wk):
                    gk[d] += gn[d]
                n = nxt[n]
        w0 = row_offset(r, width)
        s0 = row_offset(r, S)
        # Segment by segment: the columns between them are padding, never written.
        for k in range(S):
            wk = seg_widths[k]
            col = seg_offsets[k]
            gk = g[col:col + wk]
            ws = weight[w0 + col:w0 + col + wk]
            if weight_decay != 0:
                for d in range(wk):
                    gk[d] += weight_decay * ws[d]
            if kind == 0:  # sgd
                for d in range(wk):
                    ws[d] -= lr * gk[d]
            elif kind == 1:  # row-wise adagrad: one accumulator per row and segment
                sq = np.float32(0.0)
                for d in range(wk):
                    sq += gk[d] * gk[d]
                acc_k = sum_sq[s0 + k] + sq / np.float32(wk)
                sum_sq[s0 + k] = acc_k
                denom = np.sqrt(acc_k) + eps
                for d in range(wk):
                    ws[d] -= lr * gk[d] / denom
            else:  # lazy adam
                m_row = exp_avg[w0 + col:w0 + col + wk]
                v_row = exp_avg_sq[w0 + col:w0 + col + wk]
                for d in range(wk):
                    m = m_row[d] * beta1 + (one - beta1) * gk[d]
                    v = v_row[d] * beta2 + (one - beta2) * gk[d] * gk[d]
                    m_row[d] = m
                    v_row[d] = v
                    ws[d] -= step_size * m / (np.sqrt(v) + eps)


class _Scratch(threading.local):
    """Per-Python-thread buffers: the id->slot map per table size, and the per-step row lists."""

    def __init__(self) -> None:
        self.slots: dict[int, np.ndarray] = {}
        self.rows = np.empty((3, 0), np.int64)  # uniq, first, last: n_chunks * N each
        self.nxt = np.empty(0, np.int64)

    def get(self, V: int, N: int, n_chunks: int):
        slot = self.slots.get(V)
        if slot is None:
            # int32 slots: a slot indexes the rows of one step (< N < 2^31), and halving the map
            # matters at 35 M rows. The kernel restores every entry it sets to -1.
            slot = self.slots[V] = np.full(V, -1, np.int32)
        # A chunk may own all N ids (every id in one 16-row block), so each gets room for N rows.
        if self.rows.shape[1] < n_chunks * N:
            self.rows = np.empty((3, n_chunks * N), np.int64)
        if self.nxt.size < N:
            self.nxt = np.empty(N, np.int64)
        return slot, self.rows[0], self.rows[1], self.rows[2], self.nxt


_SCRATCH = _Scratch()
_EMPTY = np.empty(0, np.float32)


def _numpy_f32(t: torch.Tensor | None, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if t is None:
        raise ValueError(f"optimizer state {name} is missing: create it with SparseOptimState.create")
    if t.device.type != "cpu" or t.dtype != torch.float32 or tuple(t.shape) != shape or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous float32 CPU tensor of shape {shape}, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}"
                         f"{'' if t.is_contiguous() else ' (not contiguous)'}")
    return t.numpy().reshape(-1)


@torch.no_grad()
def sparse_update(
    weight: torch.Tensor,
    ids: torch.Tensor,
    grads: torch.Tensor | Sequence[torch.Tensor],
    state: SparseOptimState,
    cfg: SparseOptimConfig,
    threads: int | None = None,
) -> None:
    """One sparse optimizer step in place, with the semantics of ``sparse_update_reference``.

    ``threads``: how many chunks (and threads) the rows are dealt to (default: the shared budget,
    ``torch.get_num_threads()``); the result is bitwise the same for any count.

    ``weight`` [V, W] float32 (contiguous, CPU) is updated in place; ``ids`` [N] (int64 or int32,
    repeats allowed) are the looked-up rows and ``grads`` their gradients (cast to float32 if
    needed): one [N, W] tensor (padding columns ignored), or one tensor of N x W_k elements per
    segment k of ``state.segments`` (the peers' gradients as the lookup's backward gets them: read in
    place, never packed into one buffer). ``state.step`` is incremented even when ``ids`` is empty.
    Ids outside [0, V) raise ``ValueError`` before anything (the step counter included) is touched.

    Example::

        >>> from mlfast.ops.sparse_optim import SparseOptimConfig, SparseOptimState
        >>> w = torch.zeros(10, 4); cfg = SparseOptimConfig("adam", lr=0.1)
        >>> st = SparseOptimState.create(w, cfg)
        >>> sparse_update(w, torch.tensor([3, 3, 7]), torch.ones(3, 4), st, cfg)
        >>> round(float(w[3, 0]), 4), float(w[0, 0]), st.step    # adam's first step is ~lr
        (-0.1, 0.0, 1)
    """
    V, W = weight.shape
    segs = tuple(state.segments) or (W,)
    offs = state.col_offsets if state.col_offsets is not None else packed_offsets(segs)
    packed = isinstance(grads, torch.Tensor)
    parts = [grads] if packed else list(grads)
    if ids.ndim != 1 or (packed and grads.shape != (ids.shape[0], W)):
        raise ValueError(f"ids [N] and grads [N, W={W}] expected, "
                         f"got {tuple(ids.shape)} and {tuple(grads.shape) if packed else '...'}")
    if not packed and (len(parts) != len(segs) or any(g.numel() != ids.shape[0] * w for g, w in zip(parts, segs))):
        raise ValueError(f"one gradient of N x W_k elements per segment expected (N={ids.shape[0]}, widths "
                         f"{segs}), got shapes {[tuple(g.shape) for g in parts]}")
    devices = {weight.device.type, ids.device.type, *(g.device.type for g in parts)}
    if devices != {"cpu"}:
        raise ValueError(f"sparse_update runs on CPU tensors, got weight on {weight.device}, ids on "
                         f"{ids.device}, grads on {', '.join(str(g.device) for g in parts)}")
    if weight.dtype != torch.float32 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous float32 tensor, got {weight.dtype}"
                         f"{'' if weight.is_contiguous() else ' (not contiguous)'}")
    check_segments(segs, state.col_offsets, W)
    kind = _KIND_IDS[cfg.kind]
    exp_avg = exp_avg_sq = sum_sq = _EMPTY
    if cfg.kind == "adam":
        exp_avg = _numpy_f32(state.exp_avg, "exp_avg", (V, W))
        exp_avg_sq = _numpy_f32(state.exp_avg_sq, "exp_avg_sq", (V, W))
    elif cfg.kind == "adagrad":
        sum_sq = _numpy_f32(state.sum_sq, "sum_sq", (V, len(segs)))

    N = ids.shape[0]
    if N == 0:
        state.step += 1
        return
    if ids.dtype not in (torch.int64, torch.int32):
        ids = ids.long()
    ids_np = ids.contiguous().numpy()
    lo, hi = _id_bounds(ids_np)
    if lo < 0 or hi >= V:
        raise ValueError(f"ids must lie in [0, V={V}), got min {lo} and max {hi}")
    state.step += 1
    flat = [g.to(torch.float32).contiguous().numpy().reshape(-1) for g in parts]
    if packed:  # every segment read out of the one [N, W] buffer, at its columns
        g_arrays, g_strides, g_offsets = tuple(flat * len(segs)), [W] * len(segs), list(offs)
    else:
        g_arrays, g_strides, g_offsets = tuple(flat), list(segs), [0] * len(segs)
    t = state.step
    step_size = cfg.lr * math.sqrt(1 - cfg.beta2**t) / (1 - cfg.beta1**t) if cfg.kind == "adam" else 0.0
    n_chunks = budget() if threads is None else max(1, int(threads))
    slot, uniq, first, last, nxt = _SCRATCH.get(V, N, n_chunks)
    f32 = np.float32
    args = (weight.numpy().reshape(-1), ids_np, g_arrays, np.asarray(g_strides, np.int64),
            np.asarray(g_offsets, np.int64), W, exp_avg, exp_avg_sq, sum_sq,
            np.asarray(segs, np.int64), np.asarray(offs, np.int64), kind, f32(cfg.lr), f32(cfg.beta1),
            f32(cfg.beta2), f32(cfg.eps), f32(cfg.weight_decay), f32(step_size), slot, uniq, first, last, nxt)

    def chunks(lo: int, hi: int) -> None:
        for c in range(lo, hi):
            _sparse_update_chunk(c, n_chunks, *args)

    parallel_for(chunks, n_chunks, 1, n_chunks)


def warmup() -> None:
    """Compile (or load from numba's on-disk cache) the kernels for int64 and int32 ids, so the
    first training step does not pay for it. Trainers call this once at setup.

    Example::

        >>> warmup()
    """
    for kind in _KIND_IDS:
        cfg = SparseOptimConfig(kind)
        w = torch.zeros(4, 3)
        st = SparseOptimState.create(w, cfg, segments=(1, 2))
        for dtype in (torch.int64, torch.int32):
            sparse_update(w, torch.tensor([0, 3, 0], dtype=dtype), torch.ones(3, 3), st, cfg)
