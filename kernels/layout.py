"""The interleaved row layout every kernel of this package reads: P peers' tables in ONE buffer.

Peer p's table is the column slice ``weight[:, off_p : off_p + W_p]`` of one row-major ``weight``
[V, Wtot]. One row id therefore costs one contiguous read of a few sectors that serves every peer,
instead of P reads from P tables (P x the random-access latency, P x the partial-sector waste at
the row ends).

Two layouts, both described by ``col_offsets`` (``off_p``) and the row width ``Wtot``:

* packed (``peer_offsets(widths)``, ``Wtot = sum(widths)``): DeepFM 17 + DCN 16 = 33 floats, 132 B.
  Row starts are only 4-byte aligned, so every access is a scalar load.
* aligned (``peer_offsets(widths, align=4)``, ``Wtot = row_width(widths, 4)``): each peer starts on
  a multiple of 4 columns and the row width is a multiple of 4 (DeepFM 17 -> 20, + DCN 16 = 36
  floats, 144 B), as FBGEMM pads its rows: every row start and every peer segment is 16-byte
  aligned, so a segment's first ``4 * (W_p // 4)`` columns move as 16-byte vectors. The pad columns
  are never read into outputs and never written: they keep whatever they hold.

How the kernels cover a row: each peer's columns are split into power-of-two "pieces", largest
first (17 -> 16 + 1, 16 -> 16, 9 -> 8 + 1), and each piece is one [rows, piece] tile. Every lane
of every tile is a real column of one peer (no lanes idle up to the next power of two of the row,
64 for 36 columns, and no per-column peer masks), a piece belongs to exactly one peer (its
gradient is read from that peer's tensor alone), and a piece that starts on an aligned column of an
aligned row compiles to 16-byte accesses: Triton's alignment analysis sees ``row * Wtot`` with a
constexpr ``Wtot`` divisible by 4, and ``_row_start`` states it once more with ``tl.multiple_of``.

Row addresses are int64 (``_row_start``): row * Wtot passes 2^31 at 65M rows of 33 columns, whatever
the dtype of the ids (int32 ids are read as they are and widened in registers).

Kernels run compiled on CUDA tensors, or under the Triton interpreter (``TRITON_INTERPRET=1`` set
before ``triton`` is first imported) on CPU tensors; ``kernels_interpreted()`` says which.
"""
from __future__ import annotations

from numbers import Integral
from typing import Sequence

import torch
import triton
import triton.language as tl

__all__ = ["peer_offsets", "row_width", "kernels_interpreted"]


def peer_offsets(widths: Sequence[int], align: int = 1) -> tuple[int, ...]:
    """First column of each peer in the interleaved row; with ``align``, each peer starts on a
    multiple of ``align`` columns (``align=4``: 16-byte aligned fp32 segments).

    Example::

        >>> peer_offsets((17, 16)), peer_offsets((17, 16), align=4)
        ((0, 17), (0, 20))
    """
    a = _check_align(align)
    offs, acc = [], 0
    for w in _check_widths(widths):
        offs.append(acc)
        acc += -(-w // a) * a
    return tuple(offs)


def row_width(widths: Sequence[int], align: int = 1) -> int:
    """Columns of one interleaved row with ``peer_offsets(widths, align)``: a multiple of ``align``.

    Example::

        >>> row_width((17, 16)), row_width((17, 16), align=4)
        (33, 36)
    """
    a = _check_align(align)
    ws = _check_widths(widths)
    end = peer_offsets(ws, a)[-1] + ws[-1]
    return -(-end // a) * a


def _check_align(align: int) -> int:
    a = int(align)
    if a < 1 or a & (a - 1):
        raise ValueError(f"align must be a power of two >= 1, got {align}")
    return a


def _check_widths(widths: Sequence[int], total: int | None = None) -> tuple[int, ...]:
    ws = tuple(int(w) for w in widths)
    if not ws or any(w < 1 for w in ws):
        raise ValueError(f"widths must be one or more positive column counts, got {tuple(widths)}")
    if total is not None and sum(ws) != total:
        raise ValueError(f"widths {ws} add up to {sum(ws)}, but the table has {total} columns")
    return ws


def _check_layout(weight: torch.Tensor, widths: Sequence[int],
                  col_offsets: Sequence[int] | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(widths, offsets) of ``weight``'s peers. ``col_offsets=None``: packed, the widths must fill
    the row exactly; otherwise the segments must be ascending, disjoint and inside the row."""
    _check_table(weight)
    wtot = weight.shape[1]
    if col_offsets is None:
        ws = _check_widths(widths, wtot)
        return ws, peer_offsets(ws)
    ws = _check_widths(widths)
    if isinstance(col_offsets, (torch.Tensor, torch.dtype)) or not all(isinstance(o, Integral) for o in col_offsets):
        raise TypeError(f"col_offsets must be a sequence of ints (each peer's first column), got {col_offsets!r}: "
                        "arguments after widths moved one place, pass them by keyword")
    offs = tuple(int(o) for o in col_offsets)
    if len(offs) != len(ws):
        raise ValueError(f"{len(offs)} col_offsets for {len(ws)} peers")
    end = 0
    for p, (o, w) in enumerate(zip(offs, ws)):
        if o < end or o + w > wtot:
            raise ValueError(f"peer {p} (columns {o}..{o + w - 1}) overlaps the previous peer or passes the "
                             f"row of {wtot} columns: col_offsets {offs} and widths {ws} must give "
                             "ascending, disjoint segments inside the row")
        end = o + w
    return ws, offs


def _check_table(weight: torch.Tensor) -> None:
    if weight.ndim != 2 or weight.stride(1) != 1 or weight.stride(0) != weight.shape[1]:
        raise ValueError(f"weight must be a contiguous [V, Wtot] table, got shape {tuple(weight.shape)} "
                         f"strides {weight.stride()}")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"weight must be floating point, got {weight.dtype}")


def _check_index(t: torch.Tensor, name: str) -> None:
    if t.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be int64 or int32, got {t.dtype}")


def _check_device(*tensors: torch.Tensor, kernels: bool = True) -> None:
    """One device for all; with ``kernels``, one the Triton kernels can run on."""
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {dev} and {t.device}")
    if kernels and dev.type != "cuda" and not kernels_interpreted():
        raise RuntimeError(
            f"the Triton kernels are compiled for the GPU but got {dev} tensors: run on CUDA, or set "
            "TRITON_INTERPRET=1 before triton is first imported"
        )


def _pieces(widths: tuple[int, ...], offsets: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Each peer's columns as power-of-two tiles, largest first: constexprs PC (first column), PW
    (width) and PP (peer) of every piece. (17, 16) at (0, 20) -> PC (0, 16, 20), PW (16, 1, 16)."""
    pc, pw, pp = [], [], []
    for p, (o, w) in enumerate(zip(offsets, widths)):
        for bit in reversed(range(w.bit_length())):
            if w >> bit & 1:
                pc.append(o)
                pw.append(1 << bit)
                pp.append(p)
                o += 1 << bit
    return {"PC": tuple(pc), "PW": tuple(pw), "PP": tuple(pp)}


def _row_align(wtot: int) -> int:
    """The largest power of two (at most 16 elements) dividing the row width."""
    return min(16, wtot & -wtot)


def _first_error(err: torch.Tensor) -> list[int]:
    """The error slots a bounds-checked launch wrote: the one host sync of that mode."""
    return err.tolist()


def _raise_index_error(name: str, t: torch.Tensor, pos: int, bound: int) -> None:
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(pos), t.shape)) if t.ndim > 1 else (pos,)
    value = int(t.reshape(-1)[pos])
    raise IndexError(f"{name}[{', '.join(map(str, where))}] = {value} is out of range: the table has rows "
                     f"[0, {bound}) (first offending position {pos} of {t.numel()})")


@triton.jit
def _row_start(rows, WTOT: tl.constexpr, ALIGN: tl.constexpr):
    """Element offset of each row: int64, so that row * Wtot may pass 2^31; a multiple of ALIGN
    (the row width's power-of-two factor), which lets aligned rows move as 16-byte vectors."""
    return tl.multiple_of(rows.to(tl.int64) * WTOT, ALIGN)


def kernels_interpreted() -> bool:
    """True when the Triton kernels of this package run under the interpreter (CPU tensors)."""
    return not isinstance(_row_start, triton.runtime.JITFunction)
