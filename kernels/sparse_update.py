"""Backward of the interleaved lookup fused with the sparse optimizer: no dense gradient exists.

Inputs of one step: the table ``weight`` [V, Wtot] (P peers interleaved, ``widths`` W_p), the
looked-up ids [N] (N = B*F, repeats allowed) and the gradients of the P lookup outputs, each
[N, W_p] with any strides (read in place: no concatenation). The math is exactly
``mlfast.ops.sparse_optim`` (the reference): for every row r that appears in ids,

    g_r  = sum_{n: ids[n] = r} concat_p(grad_p[n])            duplicates summed
    g_r += weight_decay * w_r                                 embedding L2, touched rows only
    sgd:      w_r -= lr * g_r
    adagrad:  s_rp += mean_{d in peer p} g_rd^2;   w_rd -= lr * g_rd / (sqrt(s_rp) + eps)
    adam:     m_r = b1 m_r + (1-b1) g_r;  v_r = b2 v_r + (1-b2) g_r^2
              w_r -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m_r / (sqrt(v_r) + eps)   (torch SparseAdam)

and nothing else is read or written. The step counter t and lr are device tensors read inside the
kernels (t is incremented by a device op, the bias corrections are computed in-kernel), and every
buffer has a size fixed by N alone, so a whole training step can be captured in a CUDA graph: no
``.item()``, no branch on device values in Python.

Two paths:

* deterministic (default): sort the ids (stable radix sort: int32 keys when V < 2^31), then cut the
  sorted positions into chunks of ``SORT_CHUNK``. A chunk's program gathers its gradients in
  sorted order, sums each run of equal ids inside the chunk (a [C, C] equal-key mask times the
  [C, Wtot] gradients, a fixed-order fp32 FMA product), and updates every row whose run ends
  inside the chunk. A run that started in earlier chunks (a hot id: a field with 3 values
  repeats each id ~B/3 times) adds those chunks' partial sums, written by a first kernel, in a
  fixed order. Same inputs -> bit-identical weights, and a hot row costs
  O(run / SORT_CHUNK / CARRY_CHUNKS) loop iterations, not O(run).
* atomic (``deterministic=False``): no sort. A [V] int32 scratch ``slots`` (all -1 between steps)
  gives each distinct row a compact slot: the first lookup of a row wins an atomic compare-and-swap
  and takes the next slot from a device counter; every lookup then atomically adds its gradient
  into its row's slot of a [N, Wtot] fp32 buffer; a last kernel updates the counted rows and resets
  their scratch entries. fp32 atomics add in an arbitrary order, so results match the reference
  within float rounding but can differ in the last bits from run to run, and a hot row's adds
  serialise in L2. Costs 4 bytes per table row of scratch.

The trade-off: the sort path pays for a sort of N keys (a few radix passes over 12 N bytes) and
reads the gradients in sorted, i.e. scattered, order, and is reproducible; the atomic path reads
the gradients in order but pays 2N scattered atomics (claim + add), a [N, Wtot] accumulator and the
[V] scratch, and is not bit-reproducible. Both read every gradient once and each touched row's
weight and state once, and write them once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from mlfast.ops.sparse_optim import SparseOptimConfig, SparseOptimState

from .embedding_bag import _check_device, _check_table, _check_widths, _row_start, peer_offsets

__all__ = ["DeviceOptimState", "sparse_update"]

KIND_IDS = {"sgd": 0, "adagrad": 1, "adam": 2}
SORT_CHUNK = 32  # sorted positions per program (deterministic path); >= 16 for tl.dot
CARRY_CHUNKS = 32  # earlier chunks' partial sums a hot row adds per loop iteration
ROWS_PER_PROGRAM = 32  # lookups / unique rows per program (atomic path)
UPDATE_WARPS = 4  # warps of the gather/update kernels
CLAIM_BLOCK = 64  # lookups per program of the slot-claiming kernel (its [BLOCK, WPAD] zero tile sets the registers)


@dataclass
class DeviceOptimState:
    """Optimizer state of an interleaved table, all on the table's device.

    ``step`` [1] int64 counts updates (t of the first update is 1) and ``lr`` [1] float32 is read
    by the kernels at every step: change it in place (``lr.fill_``) for a schedule, and a captured
    CUDA graph follows. ``slots`` is the atomic path's [V] int32 scratch (-1 between steps).

    Example::

        >>> w = torch.zeros(10, 33)
        >>> st = DeviceOptimState.create(w, (17, 16), SparseOptimConfig("adagrad"))
        >>> st.sum_sq.shape
        torch.Size([10, 2])
    """

    step: torch.Tensor
    lr: torch.Tensor
    sum_sq: torch.Tensor | None = None  # adagrad: [V, P]
    exp_avg: torch.Tensor | None = None  # adam: [V, Wtot]
    exp_avg_sq: torch.Tensor | None = None  # adam: [V, Wtot]
    slots: torch.Tensor | None = None  # atomic path: [V] int32

    @classmethod
    def create(cls, weight: torch.Tensor, widths: Sequence[int], cfg: SparseOptimConfig,
               lr: float | None = None) -> "DeviceOptimState":
        V, W = weight.shape
        ws = _check_widths(widths, W)
        dev = weight.device
        st = cls(step=torch.zeros(1, dtype=torch.int64, device=dev),
                 lr=torch.full((1,), cfg.lr if lr is None else lr, dtype=torch.float32, device=dev))
        if cfg.kind == "adagrad":
            st.sum_sq = torch.zeros(V, len(ws), dtype=torch.float32, device=dev)
        elif cfg.kind == "adam":
            st.exp_avg = torch.zeros(V, W, dtype=torch.float32, device=dev)
            st.exp_avg_sq = torch.zeros(V, W, dtype=torch.float32, device=dev)
        return st

    def ensure_slots(self, num_rows: int, device: torch.device) -> torch.Tensor:
        if self.slots is None or self.slots.numel() != num_rows or self.slots.device != device:
            self.slots = torch.full((num_rows,), -1, dtype=torch.int32, device=device)
        return self.slots

    def to_reference(self, widths: Sequence[int]) -> SparseOptimState:
        """The same state as ``mlfast.ops.sparse_optim.SparseOptimState`` (shares the tensors; the
        step becomes a Python int, which syncs with the device)."""
        return SparseOptimState(step=int(self.step.item()), sum_sq=self.sum_sq, exp_avg=self.exp_avg,
                                exp_avg_sq=self.exp_avg_sq, segments=tuple(int(w) for w in widths))


# ---------------------------------------------------------------------------------------------
# Shared device functions

@triton.jit
def _one_minus_pow(t, ln_b):
    """1 - b^t = -expm1(t ln b), accurate in fp32 also for t ln b near 0 (1 - 0.999^1 = 1e-3
    would lose 4 digits to cancellation in 1 - exp)."""
    x = t * ln_b
    series = -x * (1.0 + x / 2.0 * (1.0 + x / 3.0 * (1.0 + x / 4.0 * (1.0 + x / 5.0 * (1.0 + x / 6.0)))))
    return tl.where(x > -0.1, series, 1.0 - tl.exp(x))


@triton.jit
def _gather_grads(grads, gs_n, gs_d, n, active, d, OFFS: tl.constexpr, WIDTHS: tl.constexpr):
    """[R, WPAD] fp32: the interleaved gradient rows of lookups ``n`` (zeros where inactive)."""
    g = tl.zeros([n.shape[0], d.shape[0]], dtype=tl.float32)
    for p in tl.static_range(len(WIDTHS)):
        seg = (d >= OFFS[p]) & (d < OFFS[p] + WIDTHS[p])
        ptr = grads[p] + n.to(tl.int64)[:, None] * gs_n[p] + (d - OFFS[p])[None, :] * gs_d[p]
        g += tl.load(ptr, mask=active[:, None] & seg[None, :], other=0.0).to(tl.float32)
    return g


@triton.jit
def _apply_update(weight_ptr, sum_sq_ptr, m_ptr, v_ptr, step_ptr, lr_ptr, rows, active, g, d,
                  wd, b1, omb1, b2, omb2, eps, ln_b1, ln_b2,
                  KIND: tl.constexpr, HAS_WD: tl.constexpr, WTOT: tl.constexpr,
                  OFFS: tl.constexpr, WIDTHS: tl.constexpr):
    """Apply the optimizer to rows ``rows`` [R] (where ``active``) with summed gradients g [R, WPAD]."""
    mask = active[:, None] & (d < WTOT)[None, :]
    offs = _row_start(rows, WTOT)[:, None] + d[None, :]
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lr = tl.load(lr_ptr).to(tl.float32)
    if HAS_WD:
        g = g + wd * w
    if KIND == 0:
        w = w - lr * g
    elif KIND == 1:
        denom = tl.zeros_like(g) + 1.0
        for p in tl.static_range(len(WIDTHS)):
            seg = (d >= OFFS[p]) & (d < OFFS[p] + WIDTHS[p])
            mean_sq = tl.sum(tl.where(seg[None, :], g * g, 0.0), axis=1) / WIDTHS[p]
            s_ptr = sum_sq_ptr + rows.to(tl.int64) * len(WIDTHS) + p
            s = tl.load(s_ptr, mask=active, other=0.0) + mean_sq
            tl.store(s_ptr, s, mask=active)
            denom = tl.where(seg[None, :], tl.sqrt_rn(s)[:, None] + eps, denom)
        w = w - lr * g / denom
    else:
        t = tl.load(step_ptr).to(tl.float32)
        step_size = lr * tl.sqrt_rn(_one_minus_pow(t, ln_b2)) / _one_minus_pow(t, ln_b1)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0) * b1 + omb1 * g
        v = tl.load(v_ptr + offs, mask=mask, other=0.0) * b2 + omb2 * (g * g)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        w = w - step_size * (m / (tl.sqrt_rn(v) + eps))
    tl.store(weight_ptr + offs, w.to(weight_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Deterministic path: sorted ids, chunked segmented sums

@triton.jit
def _chunk_carry_kernel(keys_ptr, perm_ptr, grads, gs_n, gs_d, carry_ptr, N,
                        OFFS: tl.constexpr, WIDTHS: tl.constexpr, WPAD: tl.constexpr, C: tl.constexpr):
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
        d = tl.arange(0, WPAD)
        g = _gather_grads(grads, gs_n, gs_d, n, sel, d, OFFS, WIDTHS)
        tl.store(carry_ptr + c * WPAD + d, tl.sum(g, axis=0))


@triton.jit
def _carry_in(keys_ptr, carry_ptr, c, key0, d, C: tl.constexpr, PCH: tl.constexpr):
    """Sum of the earlier chunks' partial sums of the run of ``key0`` that reaches chunk c.

    Chunk k contributes iff its last key is key0; keys are sorted, so the contributing chunks are
    c-1, c-2, ... down to where the run started: read PCH of them per iteration."""
    cin = tl.zeros([d.shape[0]], dtype=tl.float32)
    k = c - 1
    more = k >= 0
    while more:
        kk = k - tl.arange(0, PCH)
        ok = kk >= 0
        sel = ok & (tl.load(keys_ptr + kk * C + (C - 1), mask=ok, other=-1) == key0)
        part = tl.load(carry_ptr + kk[:, None] * d.shape[0] + d[None, :], mask=sel[:, None], other=0.0)
        cin += tl.sum(part, axis=0)
        more = tl.sum(sel.to(tl.int32), axis=0) == PCH
        k -= PCH
    return cin


@triton.jit
def _sorted_update_kernel(
    keys_ptr, perm_ptr, grads, gs_n, gs_d, carry_ptr, N,
    weight_ptr, sum_sq_ptr, m_ptr, v_ptr, step_ptr, lr_ptr,
    wd, b1, omb1, b2, omb2, eps, ln_b1, ln_b2,
    KIND: tl.constexpr, HAS_WD: tl.constexpr, WTOT: tl.constexpr, OFFS: tl.constexpr,
    WIDTHS: tl.constexpr, WPAD: tl.constexpr, C: tl.constexpr, PCH: tl.constexpr,
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
    d = tl.arange(0, WPAD)
    g = _gather_grads(grads, gs_n, gs_d, n, need, d, OFFS, WIDTHS)
    # Each row's run total inside the chunk: (key_i == key_j) [C, C] @ g [C, WPAD]. Products are
    # exact (x1 or x0) and the FMA dot ("ieee": no TF32) adds in a fixed order, so the sum is
    # reproducible; only the rows where a run ends use it.
    same = (key[:, None] == key[None, :]).to(tl.float32)
    g = tl.dot(same, g, input_precision="ieee")
    key0 = tl.load(keys_ptr + first)
    if key0 == tl.load(keys_ptr + first - 1, mask=first > 0, other=-1):
        cin = _carry_in(keys_ptr, carry_ptr, c, key0, d, C, PCH)
        g += tl.where((key == key0)[:, None], cin[None, :], 0.0)
    _apply_update(weight_ptr, sum_sq_ptr, m_ptr, v_ptr, step_ptr, lr_ptr, key, run_end, g, d,
                  wd, b1, omb1, b2, omb2, eps, ln_b1, ln_b2, KIND, HAS_WD, WTOT, OFFS, WIDTHS)


# ---------------------------------------------------------------------------------------------
# Atomic path: slot claiming through a [V] scratch, atomic accumulation, update of unique rows

@triton.jit
def _claim_slots_kernel(ids_ptr, slots_ptr, count_ptr, uniq_ptr, acc_ptr, N,
                        WTOT: tl.constexpr, WPAD: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    # atomic_cas has no mask: lanes past N repeat the last lookup, and whichever lane wins a row
    # does that row's bookkeeping, so the repeat is harmless.
    row = tl.load(ids_ptr + tl.minimum(n, N - 1)).to(tl.int64)
    old = tl.atomic_cas(slots_ptr + row, tl.full([BLOCK], -1, tl.int32), tl.full([BLOCK], -2, tl.int32),
                        sem="relaxed")
    lead = old == -1
    u = tl.atomic_add(count_ptr + tl.zeros([BLOCK], tl.int32), tl.full([BLOCK], 1, tl.int32),
                      mask=lead, sem="relaxed")
    tl.store(uniq_ptr + u, row, mask=lead)
    tl.store(slots_ptr + row, u, mask=lead)
    d = tl.arange(0, WPAD)
    tl.store(acc_ptr + u.to(tl.int64)[:, None] * WTOT + d[None, :], tl.zeros([BLOCK, WPAD], tl.float32),
             mask=lead[:, None] & (d < WTOT)[None, :])


@triton.jit
def _accumulate_kernel(ids_ptr, slots_ptr, grads, gs_n, gs_d, acc_ptr, N,
                       WTOT: tl.constexpr, OFFS: tl.constexpr, WIDTHS: tl.constexpr,
                       WPAD: tl.constexpr, R: tl.constexpr):
    n = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    inb = n < N
    row = tl.load(ids_ptr + n, mask=inb, other=0)
    u = tl.load(slots_ptr + row, mask=inb, other=0).to(tl.int64)
    d = tl.arange(0, WPAD)
    g = _gather_grads(grads, gs_n, gs_d, n, inb, d, OFFS, WIDTHS)
    tl.atomic_add(acc_ptr + u[:, None] * WTOT + d[None, :], g, mask=inb[:, None] & (d < WTOT)[None, :],
                  sem="relaxed")


@triton.jit
def _unique_update_kernel(
    uniq_ptr, count_ptr, slots_ptr, acc_ptr,
    weight_ptr, sum_sq_ptr, m_ptr, v_ptr, step_ptr, lr_ptr,
    wd, b1, omb1, b2, omb2, eps, ln_b1, ln_b2,
    KIND: tl.constexpr, HAS_WD: tl.constexpr, WTOT: tl.constexpr, OFFS: tl.constexpr,
    WIDTHS: tl.constexpr, WPAD: tl.constexpr, R: tl.constexpr,
):
    first = tl.program_id(0).to(tl.int64) * R
    count = tl.load(count_ptr)
    if first < count:
        u = first + tl.arange(0, R)
        active = u < count
        rows = tl.load(uniq_ptr + u, mask=active, other=0)
        d = tl.arange(0, WPAD)
        g = tl.load(acc_ptr + u[:, None] * WTOT + d[None, :], mask=active[:, None] & (d < WTOT)[None, :],
                    other=0.0)
        _apply_update(weight_ptr, sum_sq_ptr, m_ptr, v_ptr, step_ptr, lr_ptr, rows, active, g, d,
                      wd, b1, omb1, b2, omb2, eps, ln_b1, ln_b2, KIND, HAS_WD, WTOT, OFFS, WIDTHS)
        tl.store(slots_ptr + rows, tl.full([R], -1, tl.int32), mask=active)


# ---------------------------------------------------------------------------------------------
# Launcher

def _grad_views(grads, widths: tuple[int, ...], N: int) -> list[torch.Tensor]:
    """Each peer's gradient as an [N, W_p] view (a copy only when its strides cannot be merged)."""
    if isinstance(grads, torch.Tensor):
        if grads.shape[-1] != sum(widths) or grads.numel() != N * sum(widths):
            raise ValueError(f"grads must be [N={N}, {sum(widths)}], got {tuple(grads.shape)}")
        flat = grads.reshape(N, sum(widths))
        return [flat[:, o:o + w] for o, w in zip(peer_offsets(widths), widths)]
    grads = list(grads)
    if len(grads) != len(widths):
        raise ValueError(f"{len(grads)} gradients for {len(widths)} peers")
    out = []
    for p, (g, w) in enumerate(zip(grads, widths)):
        if g.shape[-1] != w or g.numel() != N * w:
            raise ValueError(f"gradient of peer {p} must hold [N={N}, {w}], got {tuple(g.shape)}")
        out.append(g.reshape(N, w))
    return out


def _beta_log(b: float) -> float:
    return math.log(b) if b > 0 else float("-inf")


def sparse_update(weight: torch.Tensor, ids: torch.Tensor, grads, widths: Sequence[int],
                  state: DeviceOptimState, cfg: SparseOptimConfig, deterministic: bool = True) -> None:
    """One fused sparse optimizer step on the interleaved ``weight`` [V, Wtot], in place.

    ``grads`` is the list of the P lookup-output gradients (each [*ids.shape, W_p] or [N, W_p],
    any strides, fp32 or bf16) or one [N, Wtot] tensor. ``state.step`` is incremented first (t of
    the first update is 1), as in ``mlfast.ops.sparse_optim.sparse_update_reference``.

    Example (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)::

        >>> w = torch.zeros(1000, 33)
        >>> cfg = SparseOptimConfig("sgd", lr=0.5)
        >>> st = DeviceOptimState.create(w, (17, 16), cfg)
        >>> ids = torch.tensor([[7, 7, 999]])
        >>> g = [torch.ones(1, 3, 17), torch.full((1, 3, 16), 2.0)]
        >>> sparse_update(w, ids, g, (17, 16), st, cfg)
        >>> w[7, 16].item(), w[7, 17].item(), w[999, 0].item(), int(st.step)
        (-1.0, -2.0, -0.5, 1)
    """
    _check_table(weight)
    ws = _check_widths(widths, weight.shape[1])
    flat = ids.reshape(-1)
    if flat.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids must be int64 (or int32), got {ids.dtype}")
    N = flat.numel()
    gv = _grad_views(grads, ws, N)
    _check_device(weight, flat, state.step, state.lr, *gv)
    kind = KIND_IDS[cfg.kind]
    state_ptrs = {
        0: (weight, weight, weight),
        1: (state.sum_sq, weight, weight),
        2: (weight, state.exp_avg, state.exp_avg_sq),
    }[kind]
    if any(t is None for t in state_ptrs):
        raise ValueError(f"state has no {cfg.kind} buffers: build it with DeviceOptimState.create")
    state.step.add_(1)
    if N == 0:
        return
    V, wtot = weight.shape
    wpad = max(16, triton.next_power_of_2(wtot))  # tl.dot needs a dimension of at least 16
    hyper = (float(cfg.weight_decay), float(cfg.beta1), 1.0 - float(cfg.beta1), float(cfg.beta2),
             1.0 - float(cfg.beta2), float(cfg.eps), _beta_log(cfg.beta1), _beta_log(cfg.beta2))
    consts = dict(KIND=kind, HAS_WD=cfg.weight_decay != 0, WTOT=wtot, OFFS=peer_offsets(ws), WIDTHS=ws)
    gs_n = tuple(g.stride(0) for g in gv)
    gs_d = tuple(g.stride(1) for g in gv)
    gv = tuple(gv)
    flat = flat.contiguous()
    if deterministic:
        keys = flat.to(torch.int32) if V < 2**31 else flat  # 32-bit keys halve the radix passes
        keys, perm = torch.sort(keys, stable=True)
        nchunks = triton.cdiv(N, SORT_CHUNK)
        carry = torch.empty(nchunks, wpad, dtype=torch.float32, device=weight.device)
        _chunk_carry_kernel[(nchunks,)](
            keys, perm, gv, gs_n, gs_d, carry, N,
            OFFS=consts["OFFS"], WIDTHS=ws, WPAD=wpad, C=SORT_CHUNK, num_warps=UPDATE_WARPS)
        _sorted_update_kernel[(nchunks,)](
            keys, perm, gv, gs_n, gs_d, carry, N, weight, *state_ptrs, state.step, state.lr, *hyper,
            **consts, WPAD=wpad, C=SORT_CHUNK, PCH=CARRY_CHUNKS, num_warps=UPDATE_WARPS)
    else:
        slots = state.ensure_slots(V, weight.device)
        count = torch.zeros(1, dtype=torch.int32, device=weight.device)
        uniq = torch.empty(N, dtype=torch.int64, device=weight.device)
        acc = torch.empty(N, wtot, dtype=torch.float32, device=weight.device)
        _claim_slots_kernel[(triton.cdiv(N, CLAIM_BLOCK),)](
            flat, slots, count, uniq, acc, N, WTOT=wtot, WPAD=wpad, BLOCK=CLAIM_BLOCK, num_warps=4)
        grid = (triton.cdiv(N, ROWS_PER_PROGRAM),)
        _accumulate_kernel[grid](
            flat, slots, gv, gs_n, gs_d, acc, N, WTOT=wtot, OFFS=consts["OFFS"], WIDTHS=ws, WPAD=wpad,
            R=ROWS_PER_PROGRAM, num_warps=UPDATE_WARPS)
        _unique_update_kernel[grid](
            uniq, count, slots, acc, weight, *state_ptrs, state.step, state.lr, *hyper,
            **consts, WPAD=wpad, R=ROWS_PER_PROGRAM, num_warps=UPDATE_WARPS)
