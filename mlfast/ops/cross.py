"""DCN's cross network in one pass over the rows, forward and backward (numba, CPU).

What it computes, for x_0 [B, D], per-layer weights w [L, D] and biases b [L, D]:

    s_l     = x_l . w_l                       (one number per row)
    x_{l+1} = x_0 * s_l + b_l + x_l           l = 0 .. L-1, the output is x_L

and in the backward, with g_L = dL/dx_L, going down l = L-1 .. 0:

    t_l      = g_{l+1} . x_0                  (per row)
    dL/db_l  = sum_rows g_{l+1}
    dL/dw_l  = sum_rows t_l x_l
    g_l      = g_{l+1} + t_l w_l
    dL/dx_0  = g_0 + sum_l s_l g_{l+1}

Every line is row-local but for the two sums over rows, so one row's work runs start to finish on a
[D] vector that stays in L1. ``cross_reference`` (the same formula in torch ops, autograd's
gradient) takes ~8 passes over [B, D] per layer forward and backward, each allocating its result;
the fused forward reads x_0 and writes x_L (x_1 .. x_{L-1} never leave the row buffer), and the
backward recomputes them from x_0 (2 L dot products and axpys per row, far cheaper than storing and
reloading them), reads dL/dx_L, writes dL/dx_0: 3 passes in all, whatever L.

Determinism: the row sums (dL/dw, dL/db) are accumulated per chunk of ``CHUNK_ROWS`` rows and the
chunks are added in chunk order, so the result is bitwise the same for any thread count; it is not
bitwise autograd's (another summation order), the tests compare within float tolerance.

Dispatch (``resolve_impl``): the fused path runs for float32 / float64 CPU tensors outside autocast
and outside tracers; CUDA, other dtypes, CPU bf16 autocast and anything being traced or exported
(torch.jit.trace, ONNX export, torch.compile / torch.export) take ``cross_reference``. ``MLFAST_CROSS=reference`` selects
the reference everywhere for A/B runs.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from numba import njit

from mlfast.ops.threads import parallel_for

IMPLS = ("fast", "reference")
ENV_VAR = "MLFAST_CROSS"
FAST_DTYPES = (torch.float32, torch.float64)
CHUNK_ROWS = 256  # rows per work item; also the unit of the deterministic row sums
# Reassociation lets LLVM vectorise the dot products (and contract, fuse multiply-adds); no
# finite-math flags, so NaN and inf propagate as in the reference.
_FASTMATH = {"reassoc", "contract"}


def cross_reference(x0: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x_L of the cross network in plain torch ops (autograd differentiates it): the reference.

    Example::

        >>> x0 = torch.tensor([[1.0, 2.0]]); w = torch.tensor([[1.0, 0.0]]); b = torch.zeros(1, 2)
        >>> cross_reference(x0, w, b).tolist()    # x0 * (x0 . w) + x0 = 2 x0
        [[2.0, 4.0]]
    """
    x = x0
    for layer in range(weight.shape[0]):
        x = x0 * (x @ weight[layer]).unsqueeze(1) + bias[layer] + x
    return x


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _cross_fwd_kernel(x0, w, b, out):
    # x0, out: [n, D] rows of one chunk; w, b: [L, D]. x_l lives in out's row, updated in place.
    L, D = w.shape
    for r in range(x0.shape[0]):
        xr = out[r]
        x0r = x0[r]
        for d in range(D):
            xr[d] = x0r[d]
        for layer in range(L):
            wl = w[layer]
            bl = b[layer]
            s = xr[0] * wl[0]
            for d in range(1, D):
                s += xr[d] * wl[d]
            for d in range(D):
                xr[d] = x0r[d] * s + bl[d] + xr[d]


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _cross_bwd_kernel(x0, w, b, gout, gx0, gw, gb, xs, s):
    # One chunk: x0, gout, gx0 [n, D]; w, b [L, D]; gw, gb [L, D] this chunk's row sums (zeroed by
    # the caller); xs [L, D], s [L]: scratch for one row's x_0 .. x_{L-1} and s_0 .. s_{L-1}.
    L, D = w.shape
    for r in range(x0.shape[0]):
        x0r = x0[r]
        # recompute x_l and s_l for this row
        for d in range(D):
            xs[0, d] = x0r[d]
        for layer in range(L):
            xl = xs[layer]
            wl = w[layer]
            acc = xl[0] * wl[0]
            for d in range(1, D):
                acc += xl[d] * wl[d]
            s[layer] = acc
            if layer + 1 < L:
                xn = xs[layer + 1]
                bl = b[layer]
                for d in range(D):
                    xn[d] = x0r[d] * acc + bl[d] + xl[d]
        # g (gx0's row) runs from dL/dx_L down to g_0
        g = gx0[r]
        go = gout[r]
        for d in range(D):
            g[d] = go[d]
        for layer in range(L - 1, -1, -1):
            xl = xs[layer]
            wl = w[layer]
            gbl = gb[layer]
            gwl = gw[layer]
            t = g[0] * x0r[0]
            for d in range(1, D):
                t += g[d] * x0r[d]
            sl = s[layer]
            for d in range(D):
                gd = g[d]
                gbl[d] += gd
                gwl[d] += t * xl[d]
                xl[d] = sl * gd  # x_l is done with: its slot now holds s_l g_{l+1}
                g[d] = gd + t * wl[d]
        for layer in range(L):  # dL/dx_0 = g_0 + sum_l s_l g_{l+1}
            xl = xs[layer]
            for d in range(D):
                g[d] += xl[d]


def resolve_impl(impl: str, x0: torch.Tensor) -> str:
    """The implementation that runs for ``impl`` ("auto" | "fast" | "reference") on ``x0``.

    "auto" reads ``MLFAST_CROSS`` (default "fast"); "fast" falls back to "reference" off the CPU,
    for dtypes other than float32 / float64, under autocast (bf16 matrix products) and while a
    tracer records (see ``_tracing``).

    Example::

        >>> resolve_impl("auto", torch.zeros(2, 3)), resolve_impl("fast", torch.zeros(2, 3, dtype=torch.half))
        ('fast', 'reference')
    """
    if impl == "auto":
        impl = os.environ.get(ENV_VAR, "") or "fast"
        if impl not in IMPLS:
            raise ValueError(f"environment variable {ENV_VAR}={impl!r}: expected one of {', '.join(IMPLS)}")
    elif impl not in IMPLS:
        raise ValueError(f"cross impl {impl!r}: expected auto, {', '.join(IMPLS)}")
    if impl == "fast" and (x0.device.type != "cpu" or x0.dtype not in FAST_DTYPES
                           or torch.is_autocast_enabled("cpu") or _tracing()):
        return "reference"
    return impl


def _tracing() -> bool:
    """Whether a tracer is recording this call (torch.jit.trace, ONNX export, torch.compile /
    torch.export): they get the torch ops, which they can see into; a numba call on the tensors'
    memory would be an opaque (or, in an exported file, missing) step."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def cross_forward(x0: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  threads: int | None = None) -> torch.Tensor:
    """x_L (a new [B, D] tensor) by the fused kernel; same dtype as ``x0``."""
    w, b = _np(weight.to(x0.dtype)), _np(bias.to(x0.dtype))
    x0n = _np(x0)
    out = torch.empty(x0.shape, dtype=x0.dtype)
    on = out.numpy()

    def rows(lo: int, hi: int) -> None:
        _cross_fwd_kernel(x0n[lo:hi], w, b, on[lo:hi])

    parallel_for(rows, x0.shape[0], CHUNK_ROWS, threads)
    return out


def cross_backward(grad: torch.Tensor, x0: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dx_0 [B, D], dL/dw [L, D], dL/db [L, D]) for ``grad`` = dL/dx_L; see the module docstring."""
    dt = x0.dtype
    w, b = _np(weight.to(dt)), _np(bias.to(dt))
    x0n, gn = _np(x0), _np(grad.to(dt))
    B = x0.shape[0]
    L, D = w.shape
    gx0 = torch.empty((B, D), dtype=dt)
    gxn = gx0.numpy()
    nchunks = -(-B // CHUNK_ROWS)
    sums = np.zeros((nchunks, 2, L, D), w.dtype)  # per chunk: (dL/dw, dL/db)

    def rows(lo: int, hi: int) -> None:  # parallel_for may hand one thread several chunks at once
        xs, s = np.empty((L, D), w.dtype), np.empty(L, w.dtype)
        for a in range(lo, hi, CHUNK_ROWS):
            z, c = min(hi, a + CHUNK_ROWS), a // CHUNK_ROWS
            _cross_bwd_kernel(x0n[a:z], w, b, gn[a:z], gxn[a:z], sums[c, 0], sums[c, 1], xs, s)

    parallel_for(rows, B, CHUNK_ROWS, threads)
    total = np.zeros((2, L, D), w.dtype)
    for c in range(nchunks):  # chunk order: the same sums for any thread count
        total += sums[c]
    return gx0, torch.from_numpy(total[0]).to(weight.dtype), torch.from_numpy(total[1]).to(bias.dtype)


class CrossNetFunction(torch.autograd.Function):
    """(x_0, w [L, D], b [L, D]) -> x_L; saves only its inputs."""

    @staticmethod
    def forward(ctx, x0: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x0, weight, bias)
        return cross_forward(x0, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x0, weight, bias = ctx.saved_tensors
        return cross_backward(grad, x0, weight, bias)


def cross_network(x0: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """x_L of DCN's cross network; the fused numba path where `resolve_impl` allows it.

    Example::

        >>> x0, w, b = torch.randn(5, 4), torch.randn(2, 4), torch.randn(2, 4)
        >>> torch.allclose(cross_network(x0, w, b), cross_reference(x0, w, b), atol=1e-5)
        True
    """
    if x0.ndim != 2 or weight.ndim != 2 or weight.shape != bias.shape or weight.shape[1] != x0.shape[1]:
        raise ValueError(f"x0 [B, D], weight and bias [L, D] expected, got {tuple(x0.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(bias.shape)}")
    if resolve_impl(impl, x0) == "reference":
        return cross_reference(x0, weight, bias)
    return CrossNetFunction.apply(x0, weight, bias)


def warmup() -> None:
    """Compile (or load from numba's cache) the kernels for float32 and float64.

    Example::

        >>> warmup()
    """
    for dt in FAST_DTYPES:
        x0 = torch.ones(3, 2, dtype=dt)
        w = torch.ones(2, 2, dtype=dt)
        cross_forward(x0, w, w)
        cross_backward(x0, x0, w, w)


__all__ = ["cross_network", "cross_reference", "cross_forward", "cross_backward", "CrossNetFunction",
           "resolve_impl", "warmup"]
