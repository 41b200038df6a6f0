"""Dense layers on the CPU through oneDNN's matrix multiply instead of the BLAS ``torch.mm`` calls.

PyTorch's CPU ``F.linear`` and its backward run fp32 products through its BLAS (MKL in the x86
wheels). On the AMD EPYC (Zen 5, AVX-512) machines this project runs on, MKL takes a path at about
half the speed of oneDNN's matmul (bundled with the same wheel, ``torch.ops.mkldnn._linear_pointwise``,
the op Inductor's CPU backend emits for linear layers). Measured there, 2 cores, the MLP shapes of
the benchmark (``bench/test_bench_linear.py``, B=4096, 20 round-robin rounds): [4096, 400] x
[400, 400] forward 8.15 -> 3.90 ms, input gradient 8.12 -> 4.00 ms, weight gradient 8.03 -> 6.34
ms, a layer's forward + backward 24.3 -> 14.1 ms; [4096, 624] -> 400: 36.4 -> 19.4 ms.

`Linear` is an ``nn.Linear`` (same parameters, initialisation and state_dict) whose forward and
backward are three such products: y = x W^T + b, dL/dx = g W, dL/dW = g^T x (dL/db = sum g). It
takes this path for float32 CPU tensors outside autocast, tracing, export and ``torch.compile``
(and unless ``torch.backends.mkldnn.flags(enabled=False)`` is in force);
everything else (CUDA, bf16 autocast, the exporters) runs ``F.linear``, which is also the reference
the tests compare it with (tests/test_linear.py). Both are fp32 products with fp32 accumulation:
they agree to float rounding, not bitwise.

``MLFAST_LINEAR=reference`` (or ``impl="reference"``) selects ``F.linear`` everywhere, for A/B runs
and for the plain-PyTorch baselines of the benchmarks (``models.blocks.use_reference_ops``).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from mlfast.ops.backends import choose_impl

IMPLS = ("fast", "reference")
ENV_VAR = "MLFAST_LINEAR"


@functools.lru_cache(maxsize=1)
def onednn_available() -> bool:
    """Whether this torch has oneDNN's dense matmul op (x86 and aarch64 wheels do)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] @ b[N, K]^T (+ bias [N]) by oneDNN; either operand may be a transposed view."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _mm(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g = g.contiguous()  # e.g. the stride-0 gradient of a sum
        gx = _mm(g, weight.t()) if ctx.needs_input_grad[0] else None
        gw = _mm(g.t(), x.t()) if ctx.needs_input_grad[1] else None
        gb = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def resolve_impl(impl: str) -> str:
    """The implementation that runs for ``impl`` ("auto" | "fast" | "reference"); "auto" reads
    ``MLFAST_LINEAR`` (default "fast").

    Example::

        >>> resolve_impl("auto"), resolve_impl("reference")
        ('fast', 'reference')
    """
    return choose_impl(impl, ENV_VAR, IMPLS, "linear")


def takes_fast_path(x: torch.Tensor, weight: torch.Tensor, impl: str = "auto") -> bool:
    """Whether `linear` runs oneDNN's product for these tensors (see the module docstring)."""
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling() or \
            torch.onnx.is_in_onnx_export():  # first: nothing below may run while a graph is recorded
        return False
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.device.type == "cpu" and x.numel() > 0 and not torch.is_autocast_enabled("cpu")
            and resolve_impl(impl) == "fast" and onednn_available()
            and torch._C._get_mkldnn_enabled())  # torch.backends.mkldnn.flags(enabled=False) is obeyed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where `takes_fast_path`.

    Example::

        >>> x, w, b = torch.randn(5, 4), torch.randn(3, 4), torch.randn(3)
        >>> torch.allclose(linear(x, w, b), F.linear(x, w, b), atol=1e-6)
        True
    """
    if not takes_fast_path(x, weight, impl):
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    y = _OneDNNLinear.apply(flat, weight, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` whose CPU fp32 products run through `linear` (oneDNN). ``impl``: "auto" |
    "fast" | "reference" (``F.linear``).

    Example::

        >>> m = Linear(4, 3)
        >>> m(torch.randn(2, 4)).shape, isinstance(m, nn.Linear)
        (torch.Size([2, 3]), True)
    """

    impl: str = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.impl)


__all__ = ["Linear", "linear", "onednn_available", "resolve_impl", "takes_fast_path"]
