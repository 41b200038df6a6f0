"""Backward of the interleaved lookup fused with the sparse optimizer: no dense gradient exists.

Inputs of one step: the table ``weight`` [V, Wtot] (P peers interleaved, packed or with aligned
rows: see ``mlfast.kernels.layout``), the looked-up ids [N] (N = B*F, repeats allowed, int32 or
int64) and the gradients of the P lookup outputs, each [N, W_p] with any strides (read in place:
no concatenation). Let G_p = dL/dout_p. The lookup out_p[n] = weight[ids[n], seg_p] is a gather,
so its backward is the scatter-add of the output gradients into the looked-up rows, and the math
(exactly ``mlfast.ops.sparse_optim.sparse_update_reference`` on the peers' columns) is, for every
row r that appears in ids:

    g_r  = sum_{n: ids[n] = r} concat_p(G_p[n])               dL/dw_r: duplicates summed
    g_r += weight_decay * w_r                                 embedding L2, touched rows only
    sgd:      w_r -= lr * g_r
    adagrad:  s_rp += mean_{d in peer p} g_rd^2;   w_rd -= lr * g_rd / (sqrt(s_rp) + eps)
    adam:     m_r = b1 m_r + (1-b1) g_r;  v_r = b2 v_r + (1-b2) g_r^2
              w_r -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m_r / (sqrt(v_r) + eps)   (torch SparseAdam)

(for a bag lookup the caller scales each member's gradient by its per-sample weight or 1/|bag|
first: dL/dw[indices[i]] += s_i * G_p[bag(i)]). Nothing else is read or written: untouched rows,
and the pad columns of aligned rows in the weight and in the state, keep their bits. The step
counter t and lr are device tensors read inside the kernels (t is incremented by a device op, the
bias corrections are computed in-kernel), and every buffer has a size fixed by N alone, so a whole
training step can be captured in a CUDA graph: no ``.item()``, no branch on device values in
Python (``bounds_check=True`` is the exception: it syncs once to validate the ids).

Two paths:

* deterministic (default): sort the ids (stable radix sort; int32 ids are sorted as they are,
  int64 ids of a table under 2^31 rows become int32 keys, which halves the radix passes), then cut
  the sorted positions into chunks of ``SORT_CHUNK``. A chunk's program gathers its gradients in
  sorted order, sums each run of equal ids inside the chunk (a [C, C] equal-key mask times the
  [C, piece] gradients, a fixed-order fp32 FMA product), and updates every row whose run ends
  inside the chunk. A run that started in earlier chunks (a hot id: a field with 3 values
  repeats each id ~B/3 times) adds those chunks' partial sums, written by a first kernel, in a
  fixed order. Same inputs -> bit-identical weights, and a hot row costs
  O(run / SORT_CHUNK / CARRY_CHUNKS) loop iterations, not O(run).
* atomic (``deterministic=False``): no sort. A [V] int32 scratch ``slots`` (all -1 between steps,
  owned by the caller) gives each distinct row a compact slot: the first lookup of a row wins an
  atomic compare-and-swap and takes the next slot from a device counter; every lookup then
  atomically adds its gradient into its row's slot of an [N, Wtot] fp32 buffer; a last kernel
  updates the counted rows and resets their scratch entries to -1. fp32 atomics add in an
  arbitrary order, so results match the reference within float rounding but can differ in the
  last bits from run to run, and a hot row's adds serialise in L2.

The trade-off: the sort path pays for a sort of N keys and reads the gradients in sorted, i.e.
scattered, order, and is reproducible; the atomic path reads the gradients in order but pays 2N
scattered atomics (claim + add), an [N, Wtot] accumulator and the [V] scratch, and is not
bit-reproducible. Both read every gradient once and each touched row's weight and state once, and
write them once. Every row is handled as power-of-two column pieces of one peer each (see
``mlfast.kernels.layout``): a gradient piece is read from its peer's tensor alone.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from .layout import (
    _check_device, _check_index, _check_layout, _first_error, _pieces, _raise_index_error, _row_align, _row_start,
)

__all__ = ["sparse_update", "KINDS"]

KINDS = ("sgd", "adagrad", "adam")
SORT_CHUNK = 32  # sorted positions per program (deterministic path): a power of two >= 16 (tl.dot)
CARRY_CHUNKS = 32  # earlier chunks' partial sums a hot row adds per loop iteration
ROWS_PER_PROGRAM = 32  # lookups / unique rows per program (atomic path)
SORT_WARPS = 4  # warps of the sorted-path kernels: a [32, 16] tile is 4 elements (one 16-byte vector) per thread
UPDATE_WARPS = 4  # warps of the atomic path's accumulate/update kernels
CLAIM_BLOCK = 64  # lookups per program of the slot-claiming kernel


# ---------------------------------------------------------------------------------------------
# Shared device functions

@triton.jit
def _adam_step_size(step_ptr, lr, ln_b1, ln_b2):
    """lr * sqrt(1 - b2^t) / (1 - b1^t), with 1 - b^t = -expm1(t ln b) accurate in fp32 also for
    t ln b near 0 (1 - 0.999^1 = 1e-3 would lose 4 digits to cancellation in 1 - exp)."""
    t = tl.load(step_ptr).to(tl.float32)
    x, y = t * ln_b1, t * ln_b2
    # the series are written out (not a helper called twice): the interpreter pays per call
    sx = -x * (1.0 + x / 2.0 * (1.0 + x / 3.0 * (1.0 + x / 4.0 * (1.0 + x / 5.0 * (1.0 + x / 6.0)))))
    sy = -y * (1.0 + y / 2.0 * (1.0 + y / 3.0 * (1.0 + y / 4.0 * (1.0 + y / 5.0 * (1.0 + y / 6.0)))))
    c1 = tl.where(x > -0.1, sx, 1.0 - tl.exp(x))
    c2 = tl.where(y > -0.1, sy, 1.0 - tl.exp(y))
    return lr * tl.sqrt_rn(c2) / c1


@triton.jit
def _gather_pieces(grads, gs_n, gs_d, n, active, OFFS: tl.constexpr, PC: tl.constexpr, PW: tl.constexpr,
                   PP: tl.constexpr, PT: tl.constexpr):
    """The gradient rows of lookups ``n`` as a tuple of [R, PT[i]] fp32 tiles, one per piece, each
    read from its peer's tensor alone (zeros where inactive and in tile columns past PW[i]). One
    call for all pieces: under the Triton interpreter every device-function call costs ~1 ms."""
    out = ()
    row = n.to(tl.int64)[:, None]
    for i in tl.static_range(len(PC)):
        d = tl.arange(0, PT[i])
        ptr = grads[PP[i]] + row * gs_n[PP[i]] + (PC[i] - OFFS[PP[i]] + d)[None, :] * gs_d[PP[i]]
        if PT[i] > PW[i]:
            mask = active[:, None] & (d < PW[i])[None, :]
        else:
            mask = active[:, None]
        out = out + (tl.load(ptr, mask=mask, other=0.0).to(tl.float32),)
    return out


@triton.jit
def _apply_update(weight_ptr, sum_sq_ptr, m_ptr, v_ptr, step_ptr, lr_ptr, rows, active, gs,
                  wd, b1, omb1, b2, omb2, eps, ln_b1, ln_b2,
                  KIND: tl.constexpr, HAS_WD: tl.constexpr, WTOT: tl.constexpr, ALIGN: tl.constexpr,
                  WIDTHS: tl.constexpr, PC: tl.constexpr, PW: tl.constexpr, PP: tl.constexpr, PT: tl.constexpr):
    """Apply the optimizer to rows ``rows`` [R] (where ``active``) with the summed gradient pieces
    ``gs`` (a tuple of [R, PT[i]] fp32 tiles, zero past PW[i])."""
    start = _row_start(rows, WTOT, ALIGN)
    lr = tl.load(lr_ptr).to(tl.float32)
    masks = ()
    offs = ()
    ws = ()
    for i in tl.static_range(len(PC)):
        if PT[i] > PW[i]:
            mask = active[:, None] & (tl.arange(0, PT[i]) < PW[i])[None, :]
        else:
            mask = active[:, None]  # uniform along the row: aligned pieces move as vectors
        off = start[:, None] + (PC[i] + tl.arange(0, PT[i]))[None, :]
        masks = masks + (mask,)
        offs = offs + (off,)
        ws = ws + (tl.load(weight_ptr + off, mask=mask, other=0.0).to(tl.float32),)
    if HAS_WD:
        decayed = ()
        for i in tl.static_range(len(PC)):
            decayed = decayed + (gs[i] + wd * ws[i],)
        gs = decayed
    if KIND == 0:
        for i in tl.static_range(len(PC)):
            w = ws[i] - lr * gs[i]
            tl.store(weight_ptr + offs[i], w.to(weight_ptr.dtype.element_ty), mask=masks[i])
    elif KIND == 1:
        # row-wise: one accumulator per (row, peer), from the mean square over the peer's pieces
        for p in tl.static_range(len(WIDTHS)):
            ss = tl.zeros([rows.shape[0]], dtype=tl.float32)
            for i in tl.static_range(len(PC)):
                if PP[i] == p:
                    ss += tl.sum(gs[i] * gs[i], axis=1)
            s_ptr = sum_sq_ptr + rows.to(tl.int64) * len(WIDTHS) + p
            s = tl.load(s_ptr, mask=active, other=0.0).to(tl.float32) + ss / WIDTHS[p]
            tl.store(s_ptr, s.to(sum_sq_ptr.dtype.element_ty), mask=active)
            denom = (tl.sqrt_rn(s) + eps)[:, None]
            for i in tl.static_range(len(PC)):
                if PP[i] == p:
                    w = ws[i] - lr * gs[i] / denom
                    tl.store(weight_ptr + offs[i], w.to(weight_ptr.dtype.element_ty), mask=masks[i])
    else:
        step_size = _adam_step_size(step_ptr, lr, ln_b1, ln_b2)
        for i in tl.static_range(len(PC)):
            g = gs[i]
            m = tl.load(m_ptr + offs[i], mask=masks[i], other=0.0).to(tl.float32) * b1 + omb1 * g
            v = tl.load(v_ptr + offs[i], mask=masks[i], other=0.0).to(tl.float32) * b2 + omb2 * (g * g)
            tl.store(m_ptr + offs[i], m.to(m_ptr.dtype.element_ty), mask=masks[i])
            tl.store(v_ptr + offs[i], v.to(v_ptr.dtype.element_ty), mask=masks[i])
            w = ws[i] - step_size * (m / (tl.sqrt_rn(v) + eps))
            tl.store(weight_ptr + offs[i], w.to(weight_ptr.dtype.element_ty), mask=masks[i])


# ---------------------------------------------------------------------------------------------
# Deterministic path: sorted ids, chunked segmented sums

@triton.jit
def _chunk_carry_kernel(keys_ptr, perm_ptr, grads, gs_n, gs_d, carry_ptr, N,
                        WTOT: tl.constexpr, OFFS: tl.constexpr, PC: tl.constexpr, PW: tl.constexpr,
                        PP: tl.constexpr, C: tl.constexpr):
    """carry[c] = the partial sum, inside chunk c, of the run that continues into chunk c + 1."""
    c = tl.program_id(0).to(tl.int64)
    first = c * C
    last = tl.minimum(first + C, N) - 1
    key_last = tl.load(keys_ptr + last)
    key_next = tl.load(keys_ptr + last + 1, mask=last + 1 < N, other=-1)
    if key_next == key_last:
        pos = first + tl.arange(0, C)
        sel = tl.load(keys_ptr + pos, mask=pos < N, other=-1) == key_last
        n = tl.load(perm_ptr + pos, mask=sel, other=0)
        gs = _gather_pieces(grads, gs_n, gs_d, n, sel, OFFS, PC, PW, PP, PW)
        for i in tl.static_range(len(PC)):
            tl.store(carry_ptr + c * WTOT + PC[i] + tl.arange(0, PW[i]), tl.sum(gs[i], axis=0))


@triton.jit
def _sorted_update_kernel(
    keys_ptr, perm_ptr, grads, gs_n, gs_d, carry_ptr, N,
    weight_ptr, sum_sq_ptr, m_ptr, v_ptr, step_ptr, lr_ptr,
    wd, b1, omb1, b2, omb2, eps, ln_b1, ln_b2,
    KIND: tl.constexpr, HAS_WD: tl.constexpr, WTOT: tl.constexpr, ALIGN: tl.constexpr, OFFS: tl.constexpr,
    WIDTHS: tl.constexpr, PC: tl.constexpr, PW: tl.constexpr, PP: tl.constexpr, PT: tl.constexpr,
    C: tl.constexpr, PCH: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    first = c * C
    pos = first + tl.arange(0, C)
    inb = pos < N
    key = tl.load(keys_ptr + pos, mask=inb, other=-1)
    key_next = tl.load(keys_ptr + pos + 1, mask=pos + 1 < N, other=-1)
    run_end = inb & (key != key_next)
    # The run that continues past this chunk is updated by a later chunk: skip its gradients.
    last = tl.minimum(first + C, N) - 1
    key_last = tl.load(keys_ptr + last)
    last_ends = tl.load(keys_ptr + last + 1, mask=last + 1 < N, other=-1) != key_last
    need = inb & ((key != key_last) | last_ends)
    n = tl.load(perm_ptr + pos, mask=need, other=0)
    # Each row's run total inside the chunk: (key_i == key_j) [C, C] @ g [C, PT]. Products are
    # exact (x1 or x0) and the FMA dot ("ieee": no TF32) adds in a fixed order, so the sum is
    # reproducible; only the rows where a run ends use it. tl.dot needs tiles of >= 16 columns:
    # narrower pieces ride in a 16-column tile whose extra columns are masked (PT > PW).
    same = (key[:, None] == key[None, :]).to(tl.float32)
    gathered = _gather_pieces(grads, gs_n, gs_d, n, need, OFFS, PC, PW, PP, PT)
    gs = ()
    for i in tl.static_range(len(PC)):
        gs = gs + (tl.dot(same, gathered[i], input_precision="ieee"),)
    # The run of the chunk's first key may have started in earlier chunks: chunk k contributes
    # its carry iff its last key is key0, and keys are sorted, so the contributing chunks are
    # c-1, c-2, ... down to where the run started; read PCH of them per iteration.
    key0 = tl.load(keys_ptr + first)
    cont = key0 == tl.load(keys_ptr + first - 1, mask=first > 0, other=-1)
    if cont:
        # [PCH, piece] accumulators, reduced once after the loop
        parts = ()
        for i in tl.static_range(len(PC)):  # (tl.zeros takes an indexed constexpr only through a shape)
            parts = parts + (tl.zeros([PCH, tl.arange(0, PT[i]).shape[0]], dtype=tl.float32),)
        k = c - 1
        more = k >= 0
        while more:
            kk = k - tl.arange(0, PCH)
            ok = kk >= 0
            sel = ok & (tl.load(keys_ptr + kk * C + (C - 1), mask=ok, other=-1) == key0)
            new = ()
            for i in tl.static_range(len(PC)):
                d = tl.arange(0, PT[i])
                part = tl.load(carry_ptr + kk[:, None] * WTOT + (PC[i] + d)[None, :],
                               mask=sel[:, None] & (d < PW[i])[None, :], other=0.0)
                new = new + (parts[i] + part,)
            parts = new
            # the run is contiguous: it goes on past this window iff the window's oldest chunk is in it
            k -= PCH
            more = (k >= 0) & (tl.load(keys_ptr + (k + 1) * C + (C - 1), mask=k >= -1, other=-1) == key0)
        head = (key == key0)[:, None]
        with_carry = ()
        for i in tl.static_range(len(PC)):
            with_carry = with_carry + (gs[i] + tl.where(head, tl.sum(parts[i], axis=0)[None, :], 0.0),)
        gs = with_carry
    _apply_update(weight_ptr, sum_sq_ptr, m_ptr, v_ptr, step_ptr, lr_ptr, key, run_end, gs,
                  wd, b1, omb1, b2, omb2, eps, ln_b1, ln_b2, KIND, HAS_WD, WTOT, ALIGN, WIDTHS, PC, PW, PP, PT)


# ---------------------------------------------------------------------------------------------
# Atomic path: slot claiming through a [V] scratch, atomic accumulation, update of unique rows

@triton.jit
def _claim_slots_kernel(ids_ptr, slots_ptr, count_ptr, uniq_ptr, acc_ptr, N,
                        WTOT: tl.constexpr, PC: tl.constexpr, PW: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    # atomic_cas has no mask: lanes past N repeat the last lookup, and whichever lane wins a row
    # does that row's bookkeeping, so the repeat is harmless.
    row = tl.load(ids_ptr + tl.minimum(n, N - 1))
    old = tl.atomic_cas(slots_ptr + row.to(tl.int64), tl.full([BLOCK], -1, tl.int32),
                        tl.full([BLOCK], -2, tl.int32), sem="relaxed")
    lead = old == -1
    u = tl.atomic_add(count_ptr + tl.zeros([BLOCK], tl.int32), tl.full([BLOCK], 1, tl.int32),
                      mask=lead, sem="relaxed")
    tl.store(uniq_ptr + u, row, mask=lead)
    tl.store(slots_ptr + row.to(tl.int64), u, mask=lead)
    for i in tl.static_range(len(PC)):
        d = PC[i] + tl.arange(0, PW[i])
        zero = tl.zeros([BLOCK, d.shape[0]], dtype=tl.float32)
        tl.store(acc_ptr + u.to(tl.int64)[:, None] * WTOT + d[None, :], zero, mask=lead[:, None])


@triton.jit
def _accumulate_kernel(ids_ptr, slots_ptr, grads, gs_n, gs_d, acc_ptr, N,
                       WTOT: tl.constexpr, OFFS: tl.constexpr, PC: tl.constexpr, PW: tl.constexpr,
                       PP: tl.constexpr, R: tl.constexpr):
    n = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    inb = n < N
    row = tl.load(ids_ptr + n, mask=inb, other=0)
    u = tl.load(slots_ptr + row.to(tl.int64), mask=inb, other=0).to(tl.int64)
    gs = _gather_pieces(grads, gs_n, gs_d, n, inb, OFFS, PC, PW, PP, PW)
    for i in tl.static_range(len(PC)):
        d = PC[i] + tl.arange(0, PW[i])
        tl.atomic_add(acc_ptr + u[:, None] * WTOT + d[None, :], gs[i], mask=inb[:, None], sem="relaxed")


@triton.jit
def _unique_update_kernel(
    uniq_ptr, count_ptr, slots_ptr, acc_ptr,
    weight_ptr, sum_sq_ptr, m_ptr, v_ptr, step_ptr, lr_ptr,
    wd, b1, omb1, b2, omb2, eps, ln_b1, ln_b2,
    KIND: tl.constexpr, HAS_WD: tl.constexpr, WTOT: tl.constexpr, ALIGN: tl.constexpr,
    WIDTHS: tl.constexpr, PC: tl.constexpr, PW: tl.constexpr, PP: tl.constexpr, R: tl.constexpr,
):
    first = tl.program_id(0).to(tl.int64) * R
    count = tl.load(count_ptr)
    if first < count:
        u = first + tl.arange(0, R)
        active = u < count
        rows = tl.load(uniq_ptr + u, mask=active, other=0)
        gs = ()
        for i in tl.static_range(len(PC)):
            d = PC[i] + tl.arange(0, PW[i])
            gs = gs + (tl.load(acc_ptr + u[:, None] * WTOT + d[None, :], mask=active[:, None], other=0.0),)
        _apply_update(weight_ptr, sum_sq_ptr, m_ptr, v_ptr, step_ptr, lr_ptr, rows, active, gs,
                      wd, b1, omb1, b2, omb2, eps, ln_b1, ln_b2, KIND, HAS_WD, WTOT, ALIGN, WIDTHS, PC, PW, PP, PW)
        tl.store(slots_ptr + rows.to(tl.int64), tl.full([R], -1, tl.int32), mask=active)


# ---------------------------------------------------------------------------------------------
# Launcher

def _grad_views(grads, widths: tuple[int, ...], N: int) -> list[torch.Tensor]:
    """Each peer's gradient as an [N, W_p] view (a copy only when its strides cannot be merged)."""
    if isinstance(grads, torch.Tensor):
        if grads.shape[-1] != sum(widths) or grads.numel() != N * sum(widths):
            raise ValueError(f"grads must be [N={N}, {sum(widths)}] (the peers' columns side by side), "
                             f"got {tuple(grads.shape)}")
        flat = grads.reshape(N, sum(widths))
        out, o = [], 0
        for w in widths:
            out.append(flat[:, o:o + w])
            o += w
        return out
    grads = list(grads)
    if len(grads) != len(widths):
        raise ValueError(f"{len(grads)} gradients for {len(widths)} peers")
    out = []
    for p, (g, w) in enumerate(zip(grads, widths)):
        if g.shape[-1] != w or g.numel() != N * w:
            raise ValueError(f"gradient of peer {p} must hold [N={N}, {w}], got {tuple(g.shape)}")
        out.append(g.reshape(N, w))
    return out


def _check_state(name: str, t: torch.Tensor | None, shape: tuple[int, ...], kind: str) -> torch.Tensor:
    if t is None:
        raise ValueError(f"kind={kind!r} needs {name} {list(shape)}")
    if tuple(t.shape) != shape or not t.is_contiguous() or not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a contiguous float tensor {list(shape)}, got {t.dtype} "
                         f"{list(t.shape)}{'' if t.is_contiguous() else ' (not contiguous)'}")
    return t


def _beta_log(b: float) -> float:
    return math.log(b) if b > 0 else float("-inf")


def sparse_update(weight: torch.Tensor, ids: torch.Tensor, grads, widths: Sequence[int],
                  col_offsets: Sequence[int] | None = None, *, kind: str, step: torch.Tensor,
                  lr: torch.Tensor, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                  weight_decay: float = 0.0, sum_sq: torch.Tensor | None = None,
                  exp_avg: torch.Tensor | None = None, exp_avg_sq: torch.Tensor | None = None,
                  slots: torch.Tensor | None = None, deterministic: bool = True,
                  bounds_check: bool = False) -> None:
    """One fused sparse optimizer step on the interleaved ``weight`` [V, Wtot], in place.

    ``ids``: the looked-up ids (int32 or int64, any shape, N elements). ``grads``: the P lookup-
    output gradients (each [*ids.shape, W_p] or [N, W_p], any strides, fp32 or bf16) or one
    [N, sum(widths)] tensor (the peers' columns side by side). ``col_offsets``: as in
    ``embedding_forward`` (``None``: packed). ``kind``: ``"sgd"``, ``"adagrad"`` (needs ``sum_sq``
    [V, P]) or ``"adam"`` (needs ``exp_avg`` and ``exp_avg_sq``, the weight's shape). ``step``: a
    [1] int64 device tensor, incremented first (t of the first update is 1); ``lr``: a [1] float32
    device tensor, read in-kernel (change it in place for a schedule: captured CUDA graphs follow).
    ``deterministic=False`` takes the atomic path and needs ``slots``, a [V] int32 tensor filled
    with -1 that the caller allocates once (the kernels leave it all -1 again).
    ``bounds_check=True`` validates the ids first (one host sync) and raises ``IndexError`` naming
    the first id outside [0, V), before anything (``step`` included) is modified.

    Example (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)::

        >>> w = torch.zeros(1000, 33)
        >>> step, lr = torch.zeros(1, dtype=torch.int64), torch.full((1,), 0.5)
        >>> ids = torch.tensor([[7, 7, 999]], dtype=torch.int32)
        >>> g = [torch.ones(1, 3, 17), torch.full((1, 3, 16), 2.0)]
        >>> sparse_update(w, ids, g, (17, 16), kind="sgd", step=step, lr=lr)
        >>> w[7, 16].item(), w[7, 17].item(), w[999, 0].item(), int(step)
        (-1.0, -2.0, -0.5, 1)
    """
    ws, offs = _check_layout(weight, widths, col_offsets)
    if kind not in KINDS:
        raise ValueError(f"unknown sparse optimizer kind {kind!r}; expected one of {KINDS}")
    _check_index(ids, "ids")
    flat = ids.reshape(-1)
    N, (V, wtot) = flat.numel(), weight.shape
    gv = _grad_views(grads, ws, N)
    if step.numel() != 1 or step.dtype != torch.int64:
        raise ValueError(f"step must be a [1] int64 tensor, got {step.dtype} {list(step.shape)}")
    if lr.numel() != 1 or not lr.dtype.is_floating_point:
        raise ValueError(f"lr must be a [1] float32 tensor, got {lr.dtype} {list(lr.shape)}")
    if kind == "sgd":
        state_ptrs = (weight, weight, weight)  # unused pointers: the kernels read no state
    elif kind == "adagrad":
        state_ptrs = (_check_state("sum_sq", sum_sq, (V, len(ws)), kind), weight, weight)
    else:
        state_ptrs = (weight, _check_state("exp_avg", exp_avg, (V, wtot), kind),
                      _check_state("exp_avg_sq", exp_avg_sq, (V, wtot), kind))
    if not deterministic and (slots is None or slots.shape != (V,) or slots.dtype != torch.int32
                              or not slots.is_contiguous()):
        got = "None" if slots is None else f"{slots.dtype} {list(slots.shape)}"
        raise ValueError(f"deterministic=False needs slots, a contiguous [V={V}] int32 tensor filled with -1; "
                         f"got {got}")
    _check_device(weight, flat, step, lr, *gv, *state_ptrs, *(() if deterministic else (slots,)))
    if bounds_check and N:
        lo, hi = _first_error(torch.stack(torch.aminmax(flat)))
        if lo < 0 or hi >= V:
            pos = int(((flat < 0) | (flat >= V)).nonzero()[0])
            _raise_index_error("ids", ids, pos, V)
    step.add_(1)
    if N == 0:
        return
    hyper = (float(weight_decay), float(beta1), 1.0 - float(beta1), float(beta2), 1.0 - float(beta2),
             float(eps), _beta_log(beta1), _beta_log(beta2))
    pieces = _pieces(ws, offs)
    consts = dict(KIND=KINDS.index(kind), HAS_WD=weight_decay != 0, WTOT=wtot, ALIGN=_row_align(wtot),
                  WIDTHS=ws, **pieces)
    gs_n = tuple(g.stride(0) for g in gv)
    gs_d = tuple(g.stride(1) for g in gv)
    gv = tuple(gv)
    flat = flat.contiguous()
    if deterministic:
        # int32 keys halve the radix passes; int32 ids are sorted as they come
        keys = flat if flat.dtype == torch.int32 or V > 2**31 else flat.to(torch.int32)
        keys, perm = torch.sort(keys, stable=True)
        nchunks = triton.cdiv(N, SORT_CHUNK)
        carry = torch.empty(nchunks, wtot, dtype=torch.float32, device=weight.device)
        _chunk_carry_kernel[(nchunks,)](
            keys, perm, gv, gs_n, gs_d, carry, N,
            WTOT=wtot, OFFS=offs, **pieces, C=SORT_CHUNK, num_warps=SORT_WARPS)
        _sorted_update_kernel[(nchunks,)](
            keys, perm, gv, gs_n, gs_d, carry, N, weight, *state_ptrs, step, lr, *hyper,
            **consts, OFFS=offs, PT=tuple(max(16, w) for w in pieces["PW"]), C=SORT_CHUNK, PCH=CARRY_CHUNKS,
            num_warps=SORT_WARPS)
    else:
        count = torch.zeros(1, dtype=torch.int32, device=weight.device)
        uniq = torch.empty(N, dtype=flat.dtype, device=weight.device)
        acc = torch.empty(N, wtot, dtype=torch.float32, device=weight.device)
        _claim_slots_kernel[(triton.cdiv(N, CLAIM_BLOCK),)](
            flat, slots, count, uniq, acc, N, WTOT=wtot, PC=pieces["PC"], PW=pieces["PW"], BLOCK=CLAIM_BLOCK,
            num_warps=4)
        grid = (triton.cdiv(N, ROWS_PER_PROGRAM),)
        _accumulate_kernel[grid](
            flat, slots, gv, gs_n, gs_d, acc, N, WTOT=wtot, OFFS=offs, **pieces, R=ROWS_PER_PROGRAM,
            num_warps=UPDATE_WARPS)
        _unique_update_kernel[grid](
            uniq, count, slots, acc, weight, *state_ptrs, step, lr, *hyper,
            **consts, R=ROWS_PER_PROGRAM, num_warps=UPDATE_WARPS)
