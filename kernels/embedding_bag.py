"""Fused embedding lookups for P peers whose tables are interleaved in ONE buffer.

The layout (packed or 16-byte aligned rows, ``col_offsets``, power-of-two column pieces, int64 row
addresses) is described in ``mlfast.kernels.layout``. What is computed (no gradient here: the
backward is fused with the optimizer in ``mlfast.kernels.sparse_update``):

* one-hot fields, ``embedding_forward``:      out_p[b, f, :] = weight[ids[b, f], off_p : off_p + W_p]
* multi-hot bags, ``embedding_bag_forward``:  out_p[j, :] = sum_{i in bag j} s_i * weight[indices[i], seg_p]
  with s_i = per_sample_weights[i] (1 when absent), divided by the bag size for ``mode="mean"``;
  an empty bag gives zeros (as ``nn.EmbeddingBag``).

Both are ONE launch for all fields and all peers; ids, indices and offsets are read as they come
(int32 or int64, no host-side conversion or copy of contiguous tensors).

Ids must lie in [0, V): the reader only emits valid global ids, and checking would cost a host
sync. ``bounds_check=True`` is the checked mode (as FBGEMM's): a lookup of an id outside [0, V)
reads nothing (its output row is zeros), the kernel records the first offending position, and
the launcher raises ``IndexError`` naming it and its value after one host sync. For bags the
offsets are checked too (non-decreasing, inside [0, nnz]); a bag with bad offsets reads nothing.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .layout import (
    _check_device, _check_index, _check_layout, _first_error, _pieces, _raise_index_error, _row_align, _row_start,
    kernels_interpreted, peer_offsets, row_width,
)

__all__ = [
    "embedding_forward",
    "embedding_bag_forward",
    "check_bags",
    "peer_offsets",
    "row_width",
    "kernels_interpreted",
]

# Elements (row x column pairs) one forward program gathers: ROWS = the power of two nearest above
# FWD_BLOCK // lanes rows (64 rows of 33 or 36 columns).
FWD_BLOCK = 2048
FWD_WARPS = 4
BAG_CHUNK = 16  # bag members gathered per loop iteration of one bag program
BAG_WARPS = 2


# ---------------------------------------------------------------------------------------------
# One-hot fields: ids [N] -> P outputs [N, W_p]
#
# A program owns ROWS consecutive lookups. For every piece it loads a [ROWS, piece] tile of the
# looked-up rows and stores it into the piece's peer output, whose ROWS rows are one contiguous
# range: both sides coalesce, and aligned pieces move as 16-byte vectors.

@triton.jit
def _embedding_fwd_kernel(
    weight_ptr,  # [V, WTOT]
    ids_ptr,  # [N] int32 or int64
    outs,  # tuple of P outputs, contiguous [N, W_p]
    N, V,
    err_ptr,  # int64 [1]: the first out-of-range position (BOUNDS only)
    WTOT: tl.constexpr, ALIGN: tl.constexpr, OFFS: tl.constexpr, WIDTHS: tl.constexpr,
    PC: tl.constexpr, PW: tl.constexpr, PP: tl.constexpr,
    ROWS: tl.constexpr, BOUNDS: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    inb = n < N
    row = tl.load(ids_ptr + n, mask=inb, other=0)
    read = inb
    if BOUNDS:
        bad = inb & ((row < 0) | (row >= V))
        first = tl.min(tl.where(bad, n, N), axis=0)
        tl.atomic_min(err_ptr, first, mask=first < N, sem="relaxed")
        read = inb & ~bad
    start = _row_start(row, WTOT, ALIGN)
    for i in tl.static_range(len(PC)):
        d = tl.arange(0, PW[i])
        x = tl.load(weight_ptr + start[:, None] + (PC[i] + d)[None, :], mask=read[:, None], other=0.0)
        dst = outs[PP[i]] + n[:, None] * WIDTHS[PP[i]] + (PC[i] - OFFS[PP[i]] + d)[None, :]
        tl.store(dst, x.to(outs[PP[i]].dtype.element_ty), mask=inb[:, None])


def embedding_forward(weight: torch.Tensor, ids: torch.Tensor, widths: Sequence[int],
                      col_offsets: Sequence[int] | None = None, out_dtype: torch.dtype | None = None,
                      bounds_check: bool = False) -> list[torch.Tensor]:
    """Look up ``ids`` for all P peers of the interleaved ``weight`` [V, Wtot] in one launch.

    ``col_offsets``: each peer's first column (``peer_offsets(widths, align=4)`` with
    ``Wtot = row_width(widths, 4)`` for 16-byte aligned rows); ``None`` is the packed layout,
    ``Wtot = sum(widths)``. ``ids``: int32 or int64, any shape. Returns P contiguous tensors
    ``[*ids.shape, W_p]`` in ``out_dtype`` (default: the table's dtype; ``torch.bfloat16`` halves
    the bytes written). ``bounds_check=True``: ids outside [0, V) read nothing and raise
    ``IndexError`` (one host sync).

    Example (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)::

        >>> w = torch.randn(100, row_width((17, 16), 4))                 # [100, 36]
        >>> a, b = embedding_forward(w, torch.tensor([[3, 99]], dtype=torch.int32), (17, 16),
        ...                          col_offsets=peer_offsets((17, 16), 4))
        >>> a.shape, torch.equal(b[0, 1], w[99, 20:36])
        (torch.Size([1, 2, 17]), True)
    """
    ws, offs = _check_layout(weight, widths, col_offsets)
    _check_index(ids, "ids")
    _check_device(weight, ids)
    flat = ids.reshape(-1)  # a view of the loader's contiguous ids
    N, (V, wtot) = flat.numel(), weight.shape
    dtype = out_dtype or weight.dtype
    outs = tuple(torch.empty(*ids.shape, w, dtype=dtype, device=weight.device) for w in ws)
    if N == 0:
        return list(outs)
    rows = triton.next_power_of_2(max(1, FWD_BLOCK // sum(ws)))
    err = torch.full((1,), N, dtype=torch.int64, device=weight.device) if bounds_check else flat
    _embedding_fwd_kernel[(triton.cdiv(N, rows),)](
        weight, flat, outs, N, V, err,
        WTOT=wtot, ALIGN=_row_align(wtot), OFFS=offs, WIDTHS=ws, **_pieces(ws, offs),
        ROWS=rows, BOUNDS=bool(bounds_check), num_warps=FWD_WARPS,
    )
    if bounds_check:
        (pos,) = _first_error(err)
        if pos < N:
            _raise_index_error("ids", ids, pos, V)
    return list(outs)


# ---------------------------------------------------------------------------------------------
# Multi-hot bags: indices [nnz], offsets [n_bags + 1] -> P outputs [n_bags, W_p]
#
# One program per bag walks the bag's members CHUNK at a time, accumulating one [CHUNK, piece]
# fp32 tile per piece, reduces once at the end and stores each piece into its peer's output.

@triton.jit
def _embedding_bag_fwd_kernel(
    weight_ptr,
    idx_ptr,
    offsets_ptr,
    psw_ptr,
    outs,
    V, nnz,
    err_ptr,  # int64 [2]: the first out-of-range member position, the first bag with bad offsets
    WTOT: tl.constexpr, ALIGN: tl.constexpr, OFFS: tl.constexpr, WIDTHS: tl.constexpr,
    PC: tl.constexpr, PW: tl.constexpr, PP: tl.constexpr,
    CHUNK: tl.constexpr, HAS_PSW: tl.constexpr, MEAN: tl.constexpr, BOUNDS: tl.constexpr,
):
    bag = tl.program_id(0).to(tl.int64)
    start = tl.load(offsets_ptr + bag).to(tl.int64)
    end = tl.load(offsets_ptr + bag + 1).to(tl.int64)
    if BOUNDS:
        tl.atomic_min(err_ptr + 1, bag, mask=(start < 0) | (end < start) | (end > nnz), sem="relaxed")
        start = tl.minimum(tl.maximum(start, 0), nnz)
        end = tl.minimum(tl.maximum(end, start), nnz)
    acc = ()
    for i in tl.static_range(len(PC)):  # (tl.zeros takes an indexed constexpr only through a shape)
        acc = acc + (tl.zeros([CHUNK, tl.arange(0, PW[i]).shape[0]], dtype=tl.float32),)
    # a while loop, not range(start, end): the interpreter cannot take tensor loop bounds
    j = start
    while j < end:
        k = j + tl.arange(0, CHUNK)
        km = k < end
        row = tl.load(idx_ptr + k, mask=km, other=0)
        if BOUNDS:
            bad = km & ((row < 0) | (row >= V))
            first = tl.min(tl.where(bad, k, nnz), axis=0)
            tl.atomic_min(err_ptr, first, mask=first < nnz, sem="relaxed")
            km = km & ~bad
        rs = _row_start(row, WTOT, ALIGN)
        if HAS_PSW:
            s = tl.load(psw_ptr + k, mask=km, other=0.0).to(tl.float32)
        new = ()
        for i in tl.static_range(len(PC)):
            d = PC[i] + tl.arange(0, PW[i])
            x = tl.load(weight_ptr + rs[:, None] + d[None, :], mask=km[:, None], other=0.0).to(tl.float32)
            if HAS_PSW:
                x = x * s[:, None]
            new = new + (acc[i] + x,)
        acc = new
        j += CHUNK
    for i in tl.static_range(len(PC)):
        total = tl.sum(acc[i], axis=0)
        if MEAN:
            total = total / tl.maximum(end - start, 1).to(tl.float32)
        d = tl.arange(0, PW[i])
        dst = outs[PP[i]] + bag * WIDTHS[PP[i]] + (PC[i] - OFFS[PP[i]]) + d
        tl.store(dst, total.to(outs[PP[i]].dtype.element_ty))


def check_bags(weight: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, widths: Sequence[int],
               col_offsets: Sequence[int] | None = None, per_sample_weights: torch.Tensor | None = None,
               mode: str = "sum", kernels: bool = True) -> tuple[int, ...]:
    """Validate a bag lookup's arguments (layout, shapes, dtypes, devices, mode); returns the
    widths. ``kernels=False``: the caller runs a non-Triton backend (any device will do)."""
    ws, _ = _check_layout(weight, widths, col_offsets)
    if mode not in ("sum", "mean"):
        raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}")
    if indices.ndim != 1 or offsets.ndim != 1 or offsets.numel() < 1:
        raise ValueError(f"indices [nnz] and offsets [n_bags + 1] expected, got {tuple(indices.shape)} "
                         f"and {tuple(offsets.shape)}")
    _check_index(indices, "indices")
    _check_index(offsets, "offsets")
    if per_sample_weights is not None:
        if mode != "sum":
            raise ValueError("per_sample_weights are only supported with mode='sum' (as nn.EmbeddingBag)")
        if per_sample_weights.shape != indices.shape:
            raise ValueError(f"per_sample_weights must be [nnz={indices.numel()}], "
                             f"got {tuple(per_sample_weights.shape)}")
    tensors = [weight, indices, offsets] + ([per_sample_weights] if per_sample_weights is not None else [])
    _check_device(*tensors, kernels=kernels)
    return ws


def embedding_bag_forward(weight: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                          widths: Sequence[int], col_offsets: Sequence[int] | None = None,
                          per_sample_weights: torch.Tensor | None = None, mode: str = "sum",
                          out_dtype: torch.dtype | None = None, bounds_check: bool = False) -> list[torch.Tensor]:
    """Pooled multi-hot lookups for all P peers in one launch: P tensors [n_bags, W_p].

    ``offsets`` [n_bags + 1] (the last entry is ``indices.numel()``, as ``nn.EmbeddingBag`` with
    ``include_last_offset=True``); bag j is ``indices[offsets[j]:offsets[j+1]]``; both int32 or
    int64. ``mode`` is ``"sum"`` or ``"mean"``; ``per_sample_weights`` [nnz] scales each member
    (``"sum"`` only, as in torch). Empty bags give zeros. ``col_offsets`` and ``bounds_check`` as
    in ``embedding_forward`` (a checked launch also rejects decreasing or out-of-range offsets).

    Example::

        >>> w = torch.randn(100, 33)
        >>> idx, off = torch.tensor([4, 7, 7]), torch.tensor([0, 2, 2, 3])   # bags {4,7}, {}, {7}
        >>> a, b = embedding_bag_forward(w, idx, off, (17, 16))
        >>> a.shape, b.shape, float(b[1].abs().sum())
        (torch.Size([3, 17]), torch.Size([3, 16]), 0.0)
    """
    ws = check_bags(weight, indices, offsets, widths, col_offsets, per_sample_weights, mode)
    _, offs = _check_layout(weight, ws, col_offsets)
    n_bags, nnz, (V, wtot) = offsets.numel() - 1, indices.numel(), weight.shape
    dtype = out_dtype or weight.dtype
    outs = tuple(torch.empty(n_bags, w, dtype=dtype, device=weight.device) for w in ws)
    if n_bags == 0:
        return list(outs)
    err = torch.tensor([nnz, n_bags], dtype=torch.int64, device=weight.device) if bounds_check else offsets
    psw = per_sample_weights.contiguous() if per_sample_weights is not None else weight
    _embedding_bag_fwd_kernel[(n_bags,)](
        weight, indices.contiguous(), offsets.contiguous(), psw, outs, V, nnz, err,
        WTOT=wtot, ALIGN=_row_align(wtot), OFFS=offs, WIDTHS=ws, **_pieces(ws, offs),
        CHUNK=BAG_CHUNK, HAS_PSW=per_sample_weights is not None, MEAN=mode == "mean", BOUNDS=bool(bounds_check),
        num_warps=BAG_WARPS,
    )
    if bounds_check:
        pos, bag = _first_error(err)
        if bag < n_bags:
            lo, hi = (int(x) for x in offsets[bag:bag + 2].tolist())
            raise IndexError(f"offsets[{bag}:{bag + 2}] = [{lo}, {hi}] is not a bag: offsets must be "
                             f"non-decreasing and inside [0, nnz={nnz}]")
        if pos < nnz:
            _raise_index_error("indices", indices, pos, V)
    return list(outs)
