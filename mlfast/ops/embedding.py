"""The embedding lookup of P peers' interleaved tables: one-hot ids and multi-hot bags in one op,
whose backward is one fused sparse optimizer step. The one Function: ``EmbeddingLookupFunction``.

Layout (``TableLayout``): peer p's table is the column slice ``weight[:, off_p : off_p + W_p]`` of
one row-major ``weight`` [V, R]. With ``align=4`` (the default) each peer's columns start on a
multiple of 4 floats and R is a multiple of 4, so every row and segment is 16-byte aligned (vector
loads on the GPU, as FBGEMM aligns rows); the columns between segments are padding, never read
into an output and never written by an update.

Forward, for ids [B, F] and S bag fields (each ``(offsets [B+1], values [nnz])``, mean-pooled):

    out_p[b, f]     = weight[ids[b, f], seg_p]                       f < F
    out_p[b, F + s] = mean_{i in bag(s, b)} weight[values_s[i], seg_p]   (an empty bag gives 0)

Backward: the gradient of row r is the sum over its lookups of the output gradient (a bag member
gets its bag's gradient divided by the bag's size):

    g_r = sum_{(b, f): ids[b, f] = r} dL/dout_p[b, f]  +  sum_{s, b, i in bag(s, b): values_s[i] = r} dL/dout_p[b, F + s] / |bag(s, b)|

and instead of returning it, the backward hands the lookups' gradients to the table's sparse
optimizer (``mlfast.ops.sparse_update``), which sums duplicates and updates only those rows: no
dense [V, R] gradient ever exists. Autograd sees the table through an empty ``anchor`` tensor that
requires grad; it receives no gradient.

Forward backends (``LOOKUP_BACKENDS``): ``"triton"`` (``mlfast.kernels.embedding_bag``: one launch
for all one-hot fields and peers, one for all bags) and ``"torch"`` (index_select / index_add, the
reference and the CPU path). The update backend is the table's (see ``mlfast.ops.sparse_update``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

LOOKUP_BACKENDS = ("triton", "torch")
ROW_ALIGN = 4  # floats: 16-byte rows and segments

Bags = Sequence[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TableLayout:
    """Where each peer's columns lie in the interleaved row.

    Example::

        >>> TableLayout.make((17, 16))
        TableLayout(widths=(17, 16), col_offsets=(0, 20), row_width=36)
        >>> TableLayout.make((17, 16), align=1).row_width
        33
    """

    widths: tuple[int, ...]
    col_offsets: tuple[int, ...]
    row_width: int

    @classmethod
    def make(cls, widths: Sequence[int], align: int = ROW_ALIGN) -> "TableLayout":
        ws = tuple(int(w) for w in widths)
        if not ws or any(w < 1 for w in ws):
            raise ValueError(f"widths must be one or more positive column counts, got {tuple(widths)}")
        if align < 1:
            raise ValueError(f"align must be >= 1, got {align}")
        offs, acc = [], 0
        for w in ws:
            offs.append(acc)
            acc += -(-w // align) * align
        return cls(ws, tuple(offs), acc)

    def __post_init__(self) -> None:
        end = 0
        for o, w in zip(self.col_offsets, self.widths):
            if o < end or w < 1:
                raise ValueError(f"bad layout: widths {self.widths} at offsets {self.col_offsets}")
            end = o + w
        if len(self.col_offsets) != len(self.widths) or end > self.row_width:
            raise ValueError(f"bad layout: widths {self.widths} at offsets {self.col_offsets} in rows of "
                             f"{self.row_width}")

    @property
    def num_peers(self) -> int:
        return len(self.widths)

    @property
    def packed(self) -> bool:
        return self.row_width == sum(self.widths)

    def columns(self, p: int) -> slice:
        return slice(self.col_offsets[p], self.col_offsets[p] + self.widths[p])

    def to_dict(self) -> dict:
        return {"widths": list(self.widths), "col_offsets": list(self.col_offsets), "row_width": self.row_width}

    @classmethod
    def from_dict(cls, d: dict) -> "TableLayout":
        return cls(tuple(d["widths"]), tuple(d["col_offsets"]), int(d["row_width"]))


class LookupTable(Protocol):
    """What the lookup op needs from a table (``mlfast.train.tables.PeerTables`` implements it)."""

    weight: torch.Tensor
    layout: TableLayout
    lookup_backend: str
    out_dtype: torch.dtype | None
    bounds_check: bool
    anchor: torch.Tensor

    def apply_gradients(self, ids: torch.Tensor, grads: Sequence[torch.Tensor]) -> None: ...


# ---------------------------------------------------------------------------------------------
# Forward (no autograd): every backend returns P tensors [B, F + S, W_p]

def _check_ids(ids: torch.Tensor, bags: Bags, num_rows: int) -> None:
    """IndexError naming the first id outside [0, num_rows) (a host sync: API boundaries only)."""
    for name, t in [("ids", ids)] + [(f"bag field {s} values", v) for s, (_, v) in enumerate(bags)]:
        if t.numel() == 0:
            continue
        bad = (t < 0) | (t >= num_rows)
        if bool(bad.any()):
            pos = int(torch.nonzero(bad.reshape(-1))[0])
            raise IndexError(f"{name}: id {int(t.reshape(-1)[pos])} at position {pos} is outside the table's "
                             f"rows [0, {num_rows})")


def check_bags(ids: torch.Tensor, bags: Bags) -> None:
    if ids.ndim != 2:
        raise ValueError(f"ids must be [B, F], got shape {tuple(ids.shape)}")
    B = ids.shape[0]
    for s, (o, v) in enumerate(bags):
        if o.shape != (B + 1,) or v.ndim != 1:
            raise ValueError(f"bag field {s}: expected offsets [B+1={B + 1}] and values [nnz], got "
                             f"{tuple(o.shape)} and {tuple(v.shape)}")
        if o.device != ids.device or v.device != ids.device:
            raise ValueError(f"bag field {s} is on {v.device}, the ids on {ids.device}")


def merge_bags(bags: Bags) -> tuple[torch.Tensor, torch.Tensor]:
    """S bag fields of B rows as one list of S*B bags, field by field: (values [nnz], offsets
    [S*B + 1]); on the device, no host sync."""
    values = torch.cat([v for _, v in bags]) if len(bags) > 1 else bags[0][1]
    parts, base = [], None
    for k, (o, _) in enumerate(bags):
        o = o if base is None else o + base
        parts.append(o if k == len(bags) - 1 else o[:-1])
        base = o[-1:]
    return values, (torch.cat(parts) if len(parts) > 1 else parts[0])


def _bag_members(offsets: torch.Tensor, nnz: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's bag [nnz] and mean scale 1/|bag| [nnz] (``output_size``: no host sync)."""
    counts = offsets[1:] - offsets[:-1]
    bag_of = torch.repeat_interleave(torch.arange(counts.numel(), device=offsets.device), counts, output_size=nnz)
    return bag_of, (1.0 / counts.clamp(min=1).float()).index_select(0, bag_of)


def _gather_torch(weight, layout: TableLayout, ids, values, offsets, out_dtype) -> list[torch.Tensor]:
    B, F = ids.shape
    dtype = out_dtype or weight.dtype
    rows = weight.index_select(0, ids.reshape(-1)).view(B, F, weight.shape[1])
    if values is None:
        return [rows[..., layout.columns(p)].to(dtype, copy=True) for p in range(layout.num_peers)]
    bag_of, scale = _bag_members(offsets, values.numel())
    members = weight.index_select(0, values) * scale[:, None]
    pooled = torch.zeros(offsets.numel() - 1, weight.shape[1], dtype=torch.float32, device=weight.device)
    pooled.index_add_(0, bag_of, members)
    pooled = pooled.view(-1, B, weight.shape[1]).transpose(0, 1)  # [B, S, R]
    both = torch.cat([rows, pooled.to(rows.dtype)], 1)
    return [both[..., layout.columns(p)].to(dtype, copy=True) for p in range(layout.num_peers)]


def _gather_triton(weight, layout: TableLayout, ids, values, offsets, out_dtype, bounds_check) -> list[torch.Tensor]:
    from mlfast.kernels.embedding_bag import embedding_bag_forward, embedding_forward

    onehot = embedding_forward(weight, ids, layout.widths, col_offsets=layout.col_offsets, out_dtype=out_dtype,
                               bounds_check=bounds_check)
    if values is None:
        return onehot
    B = ids.shape[0]
    pooled = embedding_bag_forward(weight, values, offsets, layout.widths, col_offsets=layout.col_offsets,
                                   mode="mean", out_dtype=out_dtype, bounds_check=bounds_check)
    return [torch.cat([e, p.view(-1, B, p.shape[-1]).transpose(0, 1)], 1) for e, p in zip(onehot, pooled)]


def gather(table: LookupTable, ids: torch.Tensor, values: torch.Tensor | None,
           offsets: torch.Tensor | None) -> list[torch.Tensor]:
    """The forward of the lookup through the table's backend (no autograd)."""
    if table.lookup_backend == "triton":
        return _gather_triton(table.weight, table.layout, ids, values, offsets, table.out_dtype, table.bounds_check)
    if table.bounds_check:
        _check_ids(ids, [] if values is None else [(offsets, values)], table.weight.shape[0])
    return _gather_torch(table.weight, table.layout, ids, values, offsets, table.out_dtype)


# ---------------------------------------------------------------------------------------------
# The one autograd Function

class EmbeddingLookupFunction(torch.autograd.Function):
    """(ids [B, F], merged bags) -> P tensors [B, F + S, W_p]; backward = ONE fused optimizer step
    on every row the batch touched (one-hot and bag members together); no table gradient."""

    @staticmethod
    def forward(ctx, anchor, ids, values, offsets, table: LookupTable):
        ctx.table = table
        ctx.save_for_backward(ids, values, offsets)
        ctx.set_materialize_grads(False)  # an unused peer's None gradient becomes a stride-0 zero
        return tuple(gather(table, ids, values, offsets))

    @staticmethod
    def backward(ctx, *grads):
        ids, values, offsets = ctx.saved_tensors
        table: LookupTable = ctx.table
        B, F = ids.shape
        flat_ids = ids.reshape(-1)
        if values is not None:
            S = (offsets.numel() - 1) // max(B, 1)
            bag_of, scale = _bag_members(offsets, values.numel())
            flat_ids = torch.cat([flat_ids, values.to(flat_ids.dtype)])
        full = []
        for g, w in zip(grads, table.layout.widths):
            if g is None:  # this peer's output was not used: a zero gradient without memory
                full.append(torch.zeros((), dtype=torch.float32, device=ids.device).expand(flat_ids.numel(), w))
                continue
            onehot = g[:, :F].reshape(B * F, w)
            if values is None:
                full.append(onehot)
                continue
            per_bag = g[:, F:].transpose(0, 1).reshape(S * B, w)  # bag k = field k // B, row k % B
            member = per_bag.float().index_select(0, bag_of) * scale[:, None]
            full.append(torch.cat([onehot.float(), member]))
        table.apply_gradients(flat_ids, full)
        return None, None, None, None, None


def lookup(table: LookupTable, ids: torch.Tensor, bags: Bags = (), requires_grad: bool | None = None,
           ) -> list[torch.Tensor]:
    """Each peer's rows [B, F + S, W_p] for one-hot ids [B, F] and S bag fields (mean-pooled).

    With gradients enabled (default: ``torch.is_grad_enabled()``), the backward of the outputs is
    one optimizer step of the table over every row the batch touched; otherwise this only reads.
    """
    check_bags(ids, bags)
    values, offsets = merge_bags(bags) if bags else (None, None)
    if requires_grad is None:
        requires_grad = torch.is_grad_enabled()
    if not requires_grad:
        with torch.no_grad():
            return gather(table, ids, values, offsets)
    return list(EmbeddingLookupFunction.apply(table.anchor, ids, values, offsets, table))
