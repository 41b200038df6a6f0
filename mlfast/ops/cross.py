"""DCN's cross network in closed form: one [B, D] x [D, L] product and one scaled add, any device.

The network, for x_0 [B, D], per-layer weights w [L, D] and biases b [L, D]:

    s_l     = x_l . w_l                       (one number per row)
    x_{l+1} = x_0 * s_l + b_l + x_l           l = 0 .. L-1, the output is x_L

Every layer adds a multiple of x_0 and a constant vector, so x_l never leaves the span of x_0 and
the biases:

    x_l = alpha_l x_0 + beta_l,    alpha_0 = 1, alpha_{l+1} = alpha_l + s_l  (per row)
                                   beta_l  = b_0 + ... + b_{l-1}              (the same for every row)
    s_l = alpha_l (x_0 . w_l) + beta_l . w_l

So the whole network is c = x_0 W^T ([B, L]: one matrix product), L steps of a recurrence on [B]
vectors, and x_L = alpha_L x_0 + beta_L (one pass over [B, D]), where the layer-by-layer form
(``cross_reference``) makes ~4 passes over [B, D] per layer forward and ~8 backward. Autograd
differentiates the closed form as it is: its backward is two small matrix products and about five
elementwise passes over [B, D], whatever L. It is the same function, not an approximation (fp64 agrees with the
reference within 3e-15 relative; fp32 to float rounding: tests/test_cross.py). Being plain torch ops it
runs on CUDA, under autocast, torch.compile and every exporter.

``MLFAST_CROSS=reference`` (or ``impl="reference"``) selects the layer-by-layer form, for A/B runs
and for the plain-PyTorch baselines of the benchmarks (``models.blocks.use_reference_ops``).
"""
from __future__ import annotations

import torch

from mlfast.ops.backends import choose_impl

IMPLS = ("fast", "reference")
ENV_VAR = "MLFAST_CROSS"


def cross_reference(x0: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x_L of the cross network layer by layer, as DCN defines it: the reference.

    Example::

        >>> x0 = torch.tensor([[1.0, 2.0]]); w = torch.tensor([[1.0, 0.0]]); b = torch.zeros(1, 2)
        >>> cross_reference(x0, w, b).tolist()    # x0 * (x0 . w) + x0 = 2 x0
        [[2.0, 4.0]]
    """
    x = x0
    for layer in range(weight.shape[0]):
        x = x0 * (x @ weight[layer]).unsqueeze(1) + bias[layer] + x
    return x


def cross_closed_form(x0: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x_L of the cross network as alpha_L x_0 + beta_L (see the module docstring).

    Example::

        >>> x0, w, b = torch.randn(5, 4), torch.randn(3, 4), torch.randn(3, 4)
        >>> torch.allclose(cross_closed_form(x0, w, b), cross_reference(x0, w, b), rtol=1e-4, atol=1e-4)
        True
    """
    c = x0 @ weight.t()  # [B, L]: x_0 . w_l
    beta = torch.cumsum(bias, 0) - bias  # [L, D]: beta_l = b_0 + ... + b_{l-1}
    e = (beta * weight).sum(1)  # [L]: beta_l . w_l
    alpha = torch.ones(x0.shape[0], 1, dtype=c.dtype, device=x0.device)
    for layer in range(weight.shape[0]):
        alpha = alpha + (alpha * c[:, layer:layer + 1] + e[layer])  # + s_l
    return torch.addcmul(bias.sum(0), x0, alpha)  # alpha_L x_0 + beta_L


def resolve_impl(impl: str) -> str:
    """The implementation that runs for ``impl`` ("auto" | "fast" | "reference"); "auto" reads
    ``MLFAST_CROSS`` (default "fast").

    Example::

        >>> resolve_impl("auto"), resolve_impl("reference")
        ('fast', 'reference')
    """
    return choose_impl(impl, ENV_VAR, IMPLS, "cross")


def cross_network(x0: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """x_L of DCN's cross network for x0 [B, D], weight and bias [L, D].

    Example::

        >>> x0, w, b = torch.randn(5, 4), torch.randn(2, 4), torch.randn(2, 4)
        >>> torch.allclose(cross_network(x0, w, b), cross_reference(x0, w, b), atol=1e-5)
        True
    """
    if x0.ndim != 2 or weight.ndim != 2 or weight.shape != bias.shape or weight.shape[1] != x0.shape[1]:
        raise ValueError(f"x0 [B, D], weight and bias [L, D] expected, got {tuple(x0.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(bias.shape)}")
    if resolve_impl(impl) == "reference":
        return cross_reference(x0, weight, bias)
    return cross_closed_form(x0, weight, bias)


__all__ = ["cross_network", "cross_reference", "cross_closed_form", "resolve_impl"]
