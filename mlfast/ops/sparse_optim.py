"""Sparse (row-wise, lazy) embedding optimizers: the definition and the plain-PyTorch reference.

The fused Triton backward (``mlfast.kernels.embedding_bag``) and the numba CPU kernels
(``mlfast.ops.cpu_sparse``) implement exactly this; tests compare both against
``sparse_update_reference``.

Inputs of one step: the table ``weight`` [V, W] (W may hold several peers' columns side by side:
``segments`` gives each peer's width), the looked-up ids ``ids`` [N] (N = B*F, repeats allowed) and
the gradient of each looked-up row ``grads`` [N, W]. Only rows that appear in ``ids`` are read or
written:

1. g_r = sum of grads[n] over n with ids[n] == r                  (duplicates summed)
2. g_r += weight_decay * w_r                                       (embedding L2 on touched rows)
3. update, per kind, with the step counter t >= 1 (global, as torch's SparseAdam):
   * ``sgd``:     w_r -= lr * g_r
   * ``adagrad`` (row-wise, one accumulator per row and segment, as FBGEMM's rowwise Adagrad):
                  s_rk += mean_{d in segment k} g_rd^2;  w_rd -= lr * g_rd / (sqrt(s_rk) + eps)
   * ``adam``    (lazy: moments of untouched rows do not decay, bias correction with the global t,
                  identical to ``torch.optim.SparseAdam`` on the summed gradient):
                  m_r = b1 m_r + (1-b1) g_r;  v_r = b2 v_r + (1-b2) g_r^2
                  w_r -= lr * sqrt(1-b2^t) / (1-b1^t) * m_r / (sqrt(v_r) + eps)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

SPARSE_OPTIMIZERS = ("sgd", "adagrad", "adam")


@dataclass(frozen=True)
class SparseOptimConfig:
    kind: str = "adam"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0  # embedding L2 (lambda): adds lambda * w_r to touched rows' gradient

    def __post_init__(self) -> None:
        if self.kind not in SPARSE_OPTIMIZERS:
            raise ValueError(f"unknown sparse optimizer {self.kind!r}; expected one of {SPARSE_OPTIMIZERS}")


@dataclass
class SparseOptimState:
    """Optimizer state of one table. ``step`` counts updates (t of the first update is 1).

    ``segments`` are the peers' widths and ``col_offsets`` their first columns in the row (None:
    packed side by side from column 0). Columns in no segment are padding (rows aligned to 16
    bytes): never read or written by an update."""

    step: int = 0
    sum_sq: torch.Tensor | None = None  # adagrad: [V, num_segments]
    exp_avg: torch.Tensor | None = None  # adam: [V, W]
    exp_avg_sq: torch.Tensor | None = None  # adam: [V, W]
    segments: tuple[int, ...] = field(default_factory=tuple)
    col_offsets: tuple[int, ...] | None = None

    @classmethod
    def create(cls, weight: torch.Tensor, cfg: SparseOptimConfig, segments: Sequence[int] | None = None,
               col_offsets: Sequence[int] | None = None):
        V, W = weight.shape
        segs = tuple(segments) if segments else (W,)
        offs = tuple(col_offsets) if col_offsets is not None else None
        check_segments(segs, offs, W)
        st = cls(segments=segs, col_offsets=offs)
        if cfg.kind == "adagrad":
            st.sum_sq = torch.zeros(V, len(segs), dtype=torch.float32, device=weight.device)
        elif cfg.kind == "adam":
            st.exp_avg = torch.zeros(V, W, dtype=torch.float32, device=weight.device)
            st.exp_avg_sq = torch.zeros(V, W, dtype=torch.float32, device=weight.device)
        return st

    def state_dict(self) -> dict:
        return {"step": self.step, "sum_sq": self.sum_sq, "exp_avg": self.exp_avg,
                "exp_avg_sq": self.exp_avg_sq, "segments": list(self.segments),
                "col_offsets": None if self.col_offsets is None else list(self.col_offsets)}

    def load_state_dict(self, d: dict) -> None:
        self.step = int(d["step"])
        self.segments = tuple(d["segments"])
        self.col_offsets = tuple(d["col_offsets"]) if d.get("col_offsets") is not None else None
        for k in ("sum_sq", "exp_avg", "exp_avg_sq"):
            cur, new = getattr(self, k), d[k]
            if new is None:
                setattr(self, k, None)
            elif cur is None:
                setattr(self, k, new.clone())
            else:
                cur.copy_(new)


def packed_offsets(segments: Sequence[int]) -> tuple[int, ...]:
    """First column of each segment when they are packed side by side from column 0."""
    out, acc = [], 0
    for w in segments:
        out.append(acc)
        acc += int(w)
    return tuple(out)


def check_segments(segments: Sequence[int], col_offsets: Sequence[int] | None, width: int) -> None:
    """ValueError unless the segments lie inside a row of ``width`` columns, in order, without overlap."""
    segs = tuple(int(s) for s in segments)
    offs = packed_offsets(segs) if col_offsets is None else tuple(int(o) for o in col_offsets)
    if not segs or any(s < 1 for s in segs) or len(offs) != len(segs):
        raise ValueError(f"segments {segs} / column offsets {offs}: expected one positive width per offset")
    end = 0
    for o, s in zip(offs, segs):
        if o < end:
            raise ValueError(f"segments {segs} at column offsets {offs} overlap or are out of order")
        end = o + s
    if (col_offsets is None and end != width) or end > width:
        raise ValueError(f"segments {segs} at column offsets {offs} do not fit the table width {width}")


def segment_index(segments: Sequence[int], device=None) -> torch.Tensor:
    """[sum(segments)] long: the segment each (non-padding) column belongs to."""
    return torch.repeat_interleave(
        torch.arange(len(segments), device=device), torch.tensor(list(segments), device=device)
    )


def segment_columns(segments: Sequence[int], col_offsets: Sequence[int] | None = None, device=None) -> torch.Tensor:
    """[sum(segments)] long: the columns that belong to a segment, in order (padding left out)."""
    offs = packed_offsets(segments) if col_offsets is None else col_offsets
    return torch.cat([torch.arange(o, o + w, device=device) for o, w in zip(offs, segments)])


@torch.no_grad()
def sparse_update_reference(
    weight: torch.Tensor,
    ids: torch.Tensor,
    grads: torch.Tensor,
    state: SparseOptimState,
    cfg: SparseOptimConfig,
) -> None:
    """Apply one sparse optimizer step in place (plain PyTorch; the reference for the kernels).

    ``grads`` [N, W] holds each lookup's gradient over the whole row (padding columns ignored)."""
    if ids.ndim != 1 or grads.shape != (ids.shape[0], weight.shape[1]):
        raise ValueError(f"ids [N] and grads [N, W={weight.shape[1]}] expected, "
                         f"got {tuple(ids.shape)} and {tuple(grads.shape)}")
    state.step += 1
    if ids.numel() == 0:
        return
    cols = segment_columns(state.segments, state.col_offsets, weight.device)
    rows, inverse = torch.unique(ids.long(), return_inverse=True)
    g = torch.zeros(rows.shape[0], cols.numel(), dtype=torch.float32, device=weight.device)
    g.index_add_(0, inverse, grads.float()[:, cols])
    w = weight[rows][:, cols].float()
    if cfg.weight_decay:
        g += cfg.weight_decay * w
    if cfg.kind == "sgd":
        w -= cfg.lr * g
    elif cfg.kind == "adagrad":
        seg = segment_index(state.segments, weight.device)
        counts = torch.tensor(state.segments, dtype=torch.float32, device=weight.device)
        mean_sq = torch.zeros(rows.shape[0], len(state.segments), device=weight.device)
        mean_sq.index_add_(1, seg, g * g)
        s = state.sum_sq[rows] + mean_sq / counts
        state.sum_sq[rows] = s
        w -= cfg.lr * g / (s.sqrt()[:, seg] + cfg.eps)
    else:
        t = state.step
        m = state.exp_avg[rows][:, cols].mul_(cfg.beta1).add_(g, alpha=1 - cfg.beta1)
        v = state.exp_avg_sq[rows][:, cols].mul_(cfg.beta2).addcmul_(g, g, value=1 - cfg.beta2)
        _put(state.exp_avg, rows, cols, m)
        _put(state.exp_avg_sq, rows, cols, v)
        step_size = cfg.lr * math.sqrt(1 - cfg.beta2**t) / (1 - cfg.beta1**t)
        w -= step_size * m / (v.sqrt() + cfg.eps)
    _put(weight, rows, cols, w.to(weight.dtype))


def _put(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> None:
    """t[rows][:, cols] = values, in place."""
    if cols.numel() == t.shape[1]:
        t[rows] = values
    else:
        t[rows.unsqueeze(1), cols.unsqueeze(0)] = values
