"""What a data-parallel rank changes in its models so that D shards of a global batch B train
exactly like one process with batch B: BatchNorm over the whole global batch, and dropout masks
that are the single process's masks of the shard's rows.

**BatchNorm** (`SyncBatchNorm1d`, torch's ``SyncBatchNorm`` does not run on the CPU with gloo).
Shard k has n_k rows with mean m_k and centred sum of squares M2_k; one all-gather of
(n_k, m_k, M2_k) gives the global statistics by Chan et al.'s pairwise formula

    N = sum_k n_k,   mean = sum_k n_k m_k / N,   M2 = sum_k M2_k + sum_k n_k (m_k - mean)^2,
    var = M2 / N   (normalisation; the running variance takes the unbiased M2 / (N - 1))

and the backward, with xhat = (x - mean) / sqrt(var + eps) and g = dL/dy,

    dL/dx = gamma / sqrt(var + eps) * (g - sum(g) / N - xhat * sum(g xhat) / N)

needs the two sums over the global batch: one all-reduce of 2C floats. The weight and bias
gradients stay per shard (sum(g xhat), sum(g)); the dense all-reduce adds them up like every other
parameter gradient.

**Dropout** (`ShardReLUDropout`). ``mlfast.ops.dropout`` draws element i's mask from Philox at
(seed, counter, i), i the flat index in the layer's [B, H] input. Row b of the global batch is row
b - lo of shard [lo, hi), so the shard's element j is the global element lo * H + j: the shard
runs the same kernel starting at that element (`relu_dropout_forward_at`) and gets bit for bit the
single process's mask of its rows. (The reference path, ``F.dropout`` on torch's generator, used on
CUDA, cannot do this: there each rank draws its own masks, equal in distribution only.)

Both are subclasses of the modules they replace, with the same state_dict: a checkpoint of a
distributed run loads into ordinary models.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlfast.dist.comm import Comm
from mlfast.ops import dropout as _dropout
from mlfast.ops.dropout import ReLUDropout, relu_dropout_backward, relu_dropout_forward


# ---------------------------------------------------------------------------------------------
# Dropout: the single process's mask of a shard's rows

def relu_dropout_forward_at(x: torch.Tensor, p: float, seed: int, counter: int, start: int) -> torch.Tensor:
    """``relu_dropout_forward`` of elements ``start .. start + x.numel()`` of a larger flat input:
    element j of ``x`` gets the mask of element ``start + j``.

    Example::

        >>> x = torch.randn(6, 100)
        >>> full = relu_dropout_forward(x, 0.3, seed=5, counter=2)
        >>> torch.equal(relu_dropout_forward_at(x[4:], 0.3, 5, 2, start=400), full[4:])
        True
    """
    if start == 0:
        return relu_dropout_forward(x, p, seed, counter)
    _dropout._check_fast(x, p)
    B, LANES = _dropout.BLOCK, _dropout.LANES
    n = x.numel()
    head, first = start % B, start // B
    blocks = -(-(head + n) // B)
    # the kernel works on whole Philox blocks: put x where its elements sit inside them
    buf = torch.zeros(blocks * B, dtype=x.dtype)
    buf[head:head + n] = x.reshape(-1)
    out = torch.empty_like(buf)
    xf, yf = _dropout._flat_numpy(buf), _dropout._flat_numpy(out)
    seed, counter = seed & (2**64 - 1), counter & (2**64 - 1)
    u = np.uint64
    key = (u(seed & 0xFFFFFFFF), u(seed >> 32), u(counter & 0xFFFFFFFF), u(counter >> 32),
           u(_dropout.keep_threshold(p)), _dropout._scale(x.dtype, p))

    # one serial kernel call (a rank usually runs one thread per core); a ``start`` argument of
    # mlfast.ops.dropout.relu_dropout_forward would let this use that launcher's threads
    _dropout._relu_dropout_fwd_kernel(xf, yf, u(first * LANES), *key)
    return out[head:head + n].view(x.shape).clone()


class _ShardReLUDropoutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int, counter: int, start: int) -> torch.Tensor:
        y = relu_dropout_forward_at(x.contiguous(), p, seed, counter, start)
        ctx.save_for_backward(y)
        ctx.p = p
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (y,) = ctx.saved_tensors
        return relu_dropout_backward(grad, y, ctx.p), None, None, None, None


class ShardReLUDropout(ReLUDropout):
    """`ReLUDropout` on rows ``row_offset ..`` of the global batch (set by the engine each step)."""

    row_offset: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or self.row_offset == 0:
            return super().forward(x)
        if _dropout.resolve_impl(self.impl, x) == "reference":
            y = F.dropout(torch.relu(x), self.p, training=True)
        else:
            start = self.row_offset * (x[0].numel() if x.ndim > 1 else 1)
            y = _ShardReLUDropoutFunction.apply(x, self.p, int(self.seed), int(self.counter), start)
        with torch.no_grad():
            self.counter.add_(1)
        return y


# ---------------------------------------------------------------------------------------------
# BatchNorm over the data-parallel group

class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, factor: float, comm: Comm):
        xf = x.float()
        n, C = xf.shape
        if n:
            mean_k = xf.mean(0)
            m2_k = (xf - mean_k).square().sum(0)
        else:
            mean_k = m2_k = torch.zeros(C, dtype=torch.float32, device=x.device)
        local = torch.cat([torch.tensor([float(n)], device=x.device), mean_k, m2_k])
        allst = comm.all_gather(local, "batchnorm")  # [D, 1 + 2C]
        counts, means, m2s = allst[:, :1], allst[:, 1:1 + C], allst[:, 1 + C:]
        N = float(counts.sum())
        if N < 2:
            raise ValueError(f"BatchNorm needs more than one row per global batch, got {int(N)}")
        mean = (counts * means).sum(0) / N
        m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
        invstd = torch.rsqrt(m2 / N + eps)
        xhat = (xf - mean) * invstd
        y = xhat * weight + bias if weight is not None else xhat
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                running_var.mul_(1 - factor).add_(m2 / (N - 1), alpha=factor)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.N, ctx.comm = N, comm
        return y.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        xhat, invstd, weight = ctx.saved_tensors
        g = grad.float()
        C = g.shape[1]
        sum_g, sum_gx = g.sum(0), (g * xhat).sum(0)
        both = ctx.comm.all_reduce(torch.cat([sum_g, sum_gx]), "batchnorm")
        scale = invstd * weight if weight is not None else invstd
        dx = scale * (g - both[:C] / ctx.N - xhat * (both[C:] / ctx.N))
        has_w = weight is not None
        return (dx.to(grad.dtype), sum_gx if has_w else None, sum_g if has_w else None, None, None, None, None, None)


class SyncBatchNorm1d(nn.BatchNorm1d):
    """`nn.BatchNorm1d` whose training statistics are those of the whole global batch, over
    ``comm`` (the data-parallel group); evaluation uses the running statistics as usual."""

    comm: Comm | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.comm is None or self.comm.size == 1:
            return super().forward(x)
        if x.ndim != 2:
            raise ValueError(f"SyncBatchNorm1d takes [N, C] inputs, got {tuple(x.shape)}")
        factor = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias,
                                            self.running_mean if self.track_running_stats else None,
                                            self.running_var if self.track_running_stats else None,
                                            self.eps, factor, self.comm)


def convert_for_data_parallel(module: nn.Module, comm: Comm) -> list[nn.Module]:
    """Turn ``module``'s BatchNorm1d and ReLUDropout layers into their synchronised / sharded
    forms in place (same parameters, buffers and state_dict); returns the converted dropouts
    (the engine sets their ``row_offset`` each step)."""
    dropouts = []
    for m in module.modules():
        if type(m) is nn.BatchNorm1d:
            m.__class__ = SyncBatchNorm1d
            m.comm = comm
        elif type(m) is ReLUDropout:
            m.__class__ = ShardReLUDropout
            m.row_offset = 0
            dropouts.append(m)
    return dropouts
