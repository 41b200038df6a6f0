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
    """Optimizer state of one table. ``step`` counts updates (t of the first update is 1)."""

    step: int = 0
    sum_sq: torch.Tensor | None = None  # adagrad: [V, num_segments]
    exp_avg: torch.Tensor | None = None  # adam: [V, W]
    exp_avg_sq: torch.Tensor | None = None  # adam: [V, W]
    segments: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def create(cls, weight: torch.Tensor, cfg: SparseOptimConfig, segments: Sequence[int] | None = None):
        V, W = weight.shape
        segs = tuple(segments) if segments else (W,)
        if sum(segs) != W:
            raise ValueError(f"segments {segs} do not add up to the table width {W}")
        st = cls(segments=segs)
        if cfg.kind == "adagrad":
            st.sum_sq = torch.zeros(V, len(segs), dtype=torch.float32, device=weight.device)
        elif cfg.kind == "adam":
            st.exp_avg = torch.zeros(V, W, dtype=torch.float32, device=weight.device)
            st.exp_avg_sq = torch.zeros(V, W, dtype=torch.float32, device=weight.device)
        return st

    def state_dict(self) -> dict:
        return {"step": self.step, "sum_sq": self.sum_sq, "exp_avg": self.exp_avg,
                "exp_avg_sq": self.exp_avg_sq, "segments": list(self.segments)}

    def load_state_dict(self, d: dict) -> None:
        self.step = int(d["step"])
        self.segments = tuple(d["segments"])
        for k in ("sum_sq", "exp_avg", "exp_avg_sq"):
            cur, new = getattr(self, k), d[k]
            if new is None:
                setattr(self, k, None)
            elif cur is None:
                setattr(self, k, new.clone())
            else:
                cur.copy_(new)


def segment_index(segments: Sequence[int], device=None) -> torch.Tensor:
    """[W] long: the segment each column belongs to."""
    return torch.repeat_interleave(
        torch.arange(len(segments), device=device), torch.tensor(list(segments), device=device)
    )


@torch.no_grad()
def sparse_update_reference(
    weight: torch.Tensor,
    ids: torch.Tensor,
    grads: torch.Tensor,
    state: SparseOptimState,
    cfg: SparseOptimConfig,
) -> None:
    """Apply one sparse optimizer step in place (plain PyTorch; the reference for the kernels)."""
    if ids.ndim != 1 or grads.shape != (ids.shape[0], weight.shape[1]):
        raise ValueError(f"ids [N] and grads [N, W={weight.shape[1]}] expected, "
                         f"got {tuple(ids.shape)} and {tuple(grads.shape)}")
    state.step += 1
    if ids.numel() == 0:
        return
    rows, inverse = torch.unique(ids, return_inverse=True)
    g = torch.zeros(rows.shape[0], weight.shape[1], dtype=torch.float32, device=weight.device)
    g.index_add_(0, inverse, grads.float())
    w = weight[rows].float()
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
        m = state.exp_avg[rows].mul_(cfg.beta1).add_(g, alpha=1 - cfg.beta1)
        v = state.exp_avg_sq[rows].mul_(cfg.beta2).addcmul_(g, g, value=1 - cfg.beta2)
        state.exp_avg[rows] = m
        state.exp_avg_sq[rows] = v
        step_size = cfg.lr * math.sqrt(1 - cfg.beta2**t) / (1 - cfg.beta1**t)
        w -= step_size * m / (v.sqrt() + cfg.eps)
    weight[rows] = w.to(weight.dtype)
