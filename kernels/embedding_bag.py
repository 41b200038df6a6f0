"""Fused embedding lookups for P peers whose tables are interleaved in ONE buffer.

Layout. Peer p's table is the column slice ``weight[:, off_p : off_p + W_p]`` of one row-major
``weight`` [V, Wtot] (Wtot = sum of the widths; DeepFM 17 + DCN 16 = 33). One row id therefore
costs one contiguous 4*Wtot-byte read that serves every peer, instead of P reads from P tables
(P x the random-access latency, P x the partial-sector waste at the row ends).

What is computed (no gradient here: the backward is fused with the optimizer in
``mlfast.kernels.sparse_update``; ``mlfast.kernels.peer_tables`` ties both into autograd, for
one-hot lookups and for bags):

* one-hot fields, ``embedding_forward``:      out_p[b, f, :] = weight[ids[b, f], off_p : off_p + W_p]
* multi-hot bags, ``embedding_bag_forward``:  out_p[j, :] = sum_{i in bag j} s_i * weight[indices[i], seg_p]
  with s_i = per_sample_weights[i] (1 when absent), divided by the bag size for ``mode="mean"``;
  an empty bag gives zeros (as ``nn.EmbeddingBag``).

Both are ONE launch for all fields and all peers. Row addresses are computed in int64
(``_row_start``): row * Wtot passes 2^31 at 65M rows of 33 columns, or 35M rows of 4 peers.
Ids must lie in [0, V): they come from the reader, which only emits valid global ids, and a
bounds check would cost a host sync.

Kernels run compiled on CUDA tensors, or under the Triton interpreter (``TRITON_INTERPRET=1`` set
before ``triton`` is first imported) on CPU tensors; ``kernels_interpreted()`` says which.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

__all__ = [
    "embedding_forward",
    "embedding_forward_tables",
    "embedding_bag_forward",
    "check_bags",
    "peer_offsets",
    "kernels_interpreted",
]

# Elements (row x column pairs) one forward program gathers: a power of two, so that a program
# holds BLOCK // Wtot whole rows with almost no idle lanes (2048 // 33 = 62 rows, 2046 elements).
FWD_BLOCK = 2048
FWD_WARPS = 4
BAG_CHUNK = 16  # bag members gathered per loop iteration of one bag program


def kernels_interpreted() -> bool:
    """True when the Triton kernels of this package run under the interpreter (CPU tensors)."""
    return not isinstance(_embedding_fwd_kernel, triton.runtime.JITFunction)


def peer_offsets(widths: Sequence[int]) -> tuple[int, ...]:
    """Column offset of each peer in the interleaved row: prefix sums of ``widths``.

    Example::

        >>> peer_offsets((17, 16))
        (0, 17)
    """
    offs, acc = [], 0
    for w in widths:
        offs.append(acc)
        acc += int(w)
    return tuple(offs)


def _check_widths(widths: Sequence[int], total: int | None = None) -> tuple[int, ...]:
    ws = tuple(int(w) for w in widths)
    if not ws or any(w < 1 for w in ws):
        raise ValueError(f"widths must be one or more positive column counts, got {tuple(widths)}")
    if total is not None and sum(ws) != total:
        raise ValueError(f"widths {ws} add up to {sum(ws)}, but the table has {total} columns")
    return ws


def _check_device(*tensors: torch.Tensor, kernels: bool = True) -> None:
    """One device for all; with ``kernels``, one the Triton kernels can run on."""
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {dev} and {t.device}")
    if kernels and dev.type != "cuda" and not kernels_interpreted():
        raise RuntimeError(
            f"the Triton kernels are compiled for the GPU but got {dev} tensors: run on CUDA, set "
            "TRITON_INTERPRET=1 before triton is first imported, or use PeerTables(backend='cpu')"
        )


def _check_table(weight: torch.Tensor) -> None:
    if weight.ndim != 2 or weight.stride(1) != 1 or weight.stride(0) != weight.shape[1]:
        raise ValueError(f"weight must be a contiguous [V, Wtot] table, got shape {tuple(weight.shape)} "
                         f"strides {weight.stride()}")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"weight must be floating point, got {weight.dtype}")


@triton.jit
def _row_start(rows, WTOT: tl.constexpr):
    """Element offset of each row: int64, so that row * Wtot may pass 2^31."""
    return rows.to(tl.int64) * WTOT


# ---------------------------------------------------------------------------------------------
# One-hot fields: ids [N] -> P outputs [N, W_p]
#
# A program owns ROWS = BLOCK // WTOT consecutive lookups and walks them as one flat vector of
# ROWS * WTOT (row, column) elements. Loads of one row are contiguous, and the stores of peer p
# cover the contiguous range out_p[n0 * W_p : (n0 + ROWS) * W_p], so both sides coalesce. With
# separate tables (INTERLEAVED=False) peer p's columns are read from its own [V, W_p] table.

@triton.jit
def _embedding_fwd_kernel(
    tables,  # tuple: (weight,) interleaved [V, WTOT], or P tables [V, W_p]
    ids_ptr,
    outs,  # tuple of P outputs, contiguous [N, W_p]
    N,
    WTOT: tl.constexpr,
    OFFS: tl.constexpr,
    WIDTHS: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK)
    r = e // WTOT
    d = e % WTOT
    n = pid * ROWS + r
    valid = (r < ROWS) & (n < N)
    row = tl.load(ids_ptr + n, mask=valid, other=0)
    if INTERLEAVED:
        x = tl.load(tables[0] + _row_start(row, WTOT) + d, mask=valid, other=0.0)
    for p in tl.static_range(len(WIDTHS)):
        seg = valid & (d >= OFFS[p]) & (d < OFFS[p] + WIDTHS[p])
        if not INTERLEAVED:
            x = tl.load(tables[p] + _row_start(row, WIDTHS[p]) + (d - OFFS[p]), mask=seg, other=0.0)
        tl.store(outs[p] + n * WIDTHS[p] + (d - OFFS[p]), x.to(outs[p].dtype.element_ty), mask=seg)


def _fwd_launch(tables: tuple, ids: torch.Tensor, widths: tuple[int, ...], out_dtype, interleaved: bool):
    flat = ids.reshape(-1)
    if flat.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids must be int64 (or int32), got {ids.dtype}")
    N = flat.numel()
    wtot = sum(widths)
    if wtot > FWD_BLOCK:
        raise ValueError(f"rows of {wtot} columns exceed the forward block of {FWD_BLOCK} elements")
    dtype = out_dtype or tables[0].dtype
    outs = tuple(torch.empty(*ids.shape, w, dtype=dtype, device=flat.device) for w in widths)
    if N:
        rows = FWD_BLOCK // wtot
        _embedding_fwd_kernel[(triton.cdiv(N, rows),)](
            tables, flat.contiguous(), outs, N,
            WTOT=wtot, OFFS=peer_offsets(widths), WIDTHS=widths, INTERLEAVED=interleaved,
            ROWS=rows, BLOCK=FWD_BLOCK, num_warps=FWD_WARPS,
        )
    return list(outs)


def embedding_forward(weight: torch.Tensor, ids: torch.Tensor, widths: Sequence[int],
                      out_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Look up ``ids`` for all P peers of the interleaved ``weight`` [V, sum(widths)] in one launch.

    Returns P contiguous tensors ``[*ids.shape, W_p]`` (the layout ``forward_embedded`` reads), in
    ``out_dtype`` (default: the table's dtype; ``torch.bfloat16`` halves the bytes written).

    Example (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)::

        >>> w = torch.randn(100, 33)
        >>> a, b = embedding_forward(w, torch.tensor([[3, 99]]), (17, 16))
        >>> a.shape, torch.equal(b[0, 1], w[99, 17:])
        (torch.Size([1, 2, 17]), True)
    """
    _check_table(weight)
    ws = _check_widths(widths, weight.shape[1])
    _check_device(weight, ids)
    return _fwd_launch((weight,), ids, ws, out_dtype, True)


def embedding_forward_tables(tables: Sequence[torch.Tensor], ids: torch.Tensor,
                             out_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Look up ``ids`` in P separate tables [V, W_p] in one launch (the non-interleaved layout).

    Same result as ``embedding_forward`` on ``torch.cat(tables, 1)``; kept to measure what the
    interleaving buys and for models that keep their own table.

    Example::

        >>> t1, t2 = torch.randn(10, 17), torch.randn(10, 16)
        >>> a, b = embedding_forward_tables([t1, t2], torch.tensor([1, 2]))
        >>> torch.equal(b, t2[1:3])
        True
    """
    tables = tuple(tables)
    for t in tables:
        _check_table(t)
        if t.shape[0] != tables[0].shape[0] or t.dtype != tables[0].dtype:
            raise ValueError("all tables must have the same number of rows and dtype")
    ws = _check_widths([t.shape[1] for t in tables])
    _check_device(*tables, ids)
    return _fwd_launch(tables, ids, ws, out_dtype, False)


# ---------------------------------------------------------------------------------------------
# Multi-hot bags: indices [nnz], offsets [n_bags + 1] -> P outputs [n_bags, W_p]
#
# One program per bag walks the bag's members CHUNK at a time as a [CHUNK, WPAD] tile of whole
# interleaved rows, accumulates in fp32, reduces once at the end and scatters each peer's columns.

@triton.jit
def _embedding_bag_fwd_kernel(
    weight_ptr,
    idx_ptr,
    offsets_ptr,
    psw_ptr,
    outs,
    WTOT: tl.constexpr,
    OFFS: tl.constexpr,
    WIDTHS: tl.constexpr,
    WPAD: tl.constexpr,
    CHUNK: tl.constexpr,
    HAS_PSW: tl.constexpr,
    MEAN: tl.constexpr,
):
    bag = tl.program_id(0).to(tl.int64)
    start = tl.load(offsets_ptr + bag).to(tl.int64)
    end = tl.load(offsets_ptr + bag + 1).to(tl.int64)
    d = tl.arange(0, WPAD)
    dm = d < WTOT
    acc = tl.zeros([CHUNK, WPAD], dtype=tl.float32)
    # a while loop, not range(start, end): the interpreter cannot take tensor loop bounds
    j = start
    while j < end:
        k = j + tl.arange(0, CHUNK)
        km = k < end
        row = tl.load(idx_ptr + k, mask=km, other=0)
        x = tl.load(weight_ptr + _row_start(row, WTOT)[:, None] + d[None, :],
                    mask=km[:, None] & dm[None, :], other=0.0).to(tl.float32)
        if HAS_PSW:
            x = x * tl.load(psw_ptr + k, mask=km, other=0.0).to(tl.float32)[:, None]
        acc += x
        j += CHUNK
    total = tl.sum(acc, axis=0)
    if MEAN:
        total = total / tl.maximum(end - start, 1).to(tl.float32)
    for p in tl.static_range(len(WIDTHS)):
        seg = (d >= OFFS[p]) & (d < OFFS[p] + WIDTHS[p])
        tl.store(outs[p] + bag * WIDTHS[p] + (d - OFFS[p]), total.to(outs[p].dtype.element_ty), mask=seg)


def check_bags(weight: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, widths: Sequence[int],
               per_sample_weights: torch.Tensor | None, mode: str, kernels: bool = True) -> tuple[int, ...]:
    """Validate a bag lookup's arguments (shapes, dtypes, devices, mode); returns the widths.
    ``kernels=False``: the caller runs a non-Triton backend (any device will do)."""
    _check_table(weight)
    ws = _check_widths(widths, weight.shape[1])
    if mode not in ("sum", "mean"):
        raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}")
    if indices.ndim != 1 or offsets.ndim != 1 or offsets.numel() < 1:
        raise ValueError(f"indices [nnz] and offsets [n_bags + 1] expected, got {tuple(indices.shape)} "
                         f"and {tuple(offsets.shape)}")
    if indices.dtype not in (torch.int64, torch.int32) or offsets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"indices and offsets must be integer, got {indices.dtype} and {offsets.dtype}")
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
                          widths: Sequence[int], per_sample_weights: torch.Tensor | None = None,
                          mode: str = "sum", out_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Pooled multi-hot lookups for all P peers in one launch: P tensors [n_bags, W_p].

    ``offsets`` [n_bags + 1] (the last entry is ``indices.numel()``, as ``nn.EmbeddingBag`` with
    ``include_last_offset=True``); bag j is ``indices[offsets[j]:offsets[j+1]]``. ``mode`` is
    ``"sum"`` or ``"mean"``; ``per_sample_weights`` [nnz] scales each member (``"sum"`` only, as in
    torch). Empty bags give zeros.

    Example::

        >>> w = torch.randn(100, 33)
        >>> idx, off = torch.tensor([4, 7, 7]), torch.tensor([0, 2, 2, 3])   # bags {4,7}, {}, {7}
        >>> a, b = embedding_bag_forward(w, idx, off, (17, 16))
        >>> a.shape, b.shape, float(b[1].abs().sum())
        (torch.Size([3, 17]), torch.Size([3, 16]), 0.0)
    """
    ws = check_bags(weight, indices, offsets, widths, per_sample_weights, mode)
    n_bags = offsets.numel() - 1
    dtype = out_dtype or weight.dtype
    outs = tuple(torch.empty(n_bags, w, dtype=dtype, device=weight.device) for w in ws)
    if n_bags:
        wtot = sum(ws)
        psw = per_sample_weights.contiguous() if per_sample_weights is not None else weight
        _embedding_bag_fwd_kernel[(n_bags,)](
            weight, indices.contiguous(), offsets.contiguous(), psw, outs,
            WTOT=wtot, OFFS=peer_offsets(ws), WIDTHS=ws, WPAD=triton.next_power_of_2(wtot),
            CHUNK=BAG_CHUNK, HAS_PSW=per_sample_weights is not None, MEAN=mode == "mean",
            num_warps=2,
        )
    return list(outs)
