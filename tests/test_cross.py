"""The fused DCN cross network (mlfast.ops.cross) against its reference, torch's autograd."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from mlfast.models.blocks import CrossNet
from mlfast.ops import cross
from mlfast.ops.cross import cross_backward, cross_forward, cross_network, cross_reference, resolve_impl


def _inputs(B, D, L, dtype, gen):
    x0 = torch.randn(B, D, dtype=dtype, generator=gen)
    w = torch.randn(L, D, dtype=dtype, generator=gen) / D**0.5
    b = torch.randn(L, D, dtype=dtype, generator=gen)
    return x0, w, b


def _grads(f, x0, w, b, g):
    x0, w, b = (t.clone().requires_grad_() for t in (x0, w, b))
    y = f(x0, w, b)
    y.backward(g)
    return y.detach(), x0.grad, w.grad, b.grad


@pytest.mark.parametrize("B, D, L", [(1, 1, 1), (7, 5, 1), (300, 37, 3), (513, 64, 4), (1000, 624, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_matches_autograd_of_the_reference(B, D, L, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x0, w, b = _inputs(B, D, L, dtype, gen)
    g = torch.randn(B, D, dtype=dtype, generator=gen)
    fast = _grads(lambda *a: cross_network(*a, impl="fast"), x0, w, b, g)
    ref = _grads(cross_reference, x0, w, b, g)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for name, a, r in zip(("x_L", "dL/dx0", "dL/dw", "dL/db"), fast, ref):
        scale = float(r.abs().max()) or 1.0
        assert float((a - r).abs().max()) <= tol * scale * max(1, B) ** 0.5, name


def test_gradcheck_in_float64(seed):
    gen = torch.Generator().manual_seed(seed)
    x0, w, b = (t.requires_grad_() for t in _inputs(6, 4, 2, torch.float64, gen))
    assert torch.autograd.gradcheck(lambda *a: cross_network(*a, impl="fast"), (x0, w, b))


def test_bitwise_the_same_for_any_thread_count(seed):
    gen = torch.Generator().manual_seed(seed)
    x0, w, b = _inputs(cross.CHUNK_ROWS * 5 + 17, 48, 3, torch.float32, gen)
    g = torch.randn(x0.shape, generator=gen)
    one = (cross_forward(x0, w, b, threads=1), *cross_backward(g, x0, w, b, threads=1))
    for threads in (2, 3, 8):
        many = (cross_forward(x0, w, b, threads=threads), *cross_backward(g, x0, w, b, threads=threads))
        assert all(torch.equal(a, c) for a, c in zip(one, many)), threads


def test_empty_batch_and_non_finite_values():
    w, b = torch.ones(2, 3), torch.zeros(2, 3)
    x0 = torch.empty(0, 3, requires_grad=True)
    y = cross_network(x0, w, b, impl="fast")
    assert y.shape == (0, 3)
    gx0, gw, gb = cross_backward(torch.empty(0, 3), x0.detach(), w, b)
    assert gx0.shape == (0, 3) and not gw.any() and not gb.any()
    x0 = torch.tensor([[1.0, float("nan"), 2.0], [1.0, 1.0, float("inf")]])
    fast, ref = cross_network(x0, w, b, impl="fast"), cross_reference(x0, w, b)
    assert torch.equal(fast.isnan(), ref.isnan()) and torch.equal(fast.isinf(), ref.isinf())


def test_dispatch(monkeypatch):
    x = torch.zeros(2, 3)
    assert resolve_impl("auto", x) == "fast"
    assert resolve_impl("fast", x.half()) == "reference"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert resolve_impl("fast", x) == "reference"  # bf16 matrix products: the reference's ops
    with warnings.catch_warnings():  # the argument checks read shapes: a trace records them as constants
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace: mlfast export still offers it
        traced = torch.jit.trace(lambda x0, w, b: cross_network(x0, w, b, impl="fast"),
                                 (torch.randn(4, 3), torch.randn(2, 3), torch.randn(2, 3)), check_trace=False)
    assert "CrossNetFunction" not in str(traced.graph) and "aten::mul" in str(traced.graph)  # no opaque step
    x0, w, b = torch.randn(5, 3), torch.randn(2, 3), torch.randn(2, 3)
    assert torch.allclose(traced(x0, w, b), cross_reference(x0, w, b))
    monkeypatch.setenv(cross.ENV_VAR, "reference")
    assert resolve_impl("auto", x) == "reference"
    monkeypatch.setenv(cross.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="MLFAST_CROSS='bogus'"):
        resolve_impl("auto", x)
    with pytest.raises(ValueError, match="x0 \\[B, D\\]"):
        cross_network(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 4))


def test_crossnet_module_trains_the_same_as_with_the_reference(monkeypatch, seed):
    """A few Adam steps of a CrossNet + head, fused vs reference: the same weights within float error."""
    def run(impl):
        monkeypatch.setenv(cross.ENV_VAR, impl)
        torch.manual_seed(seed)
        net = CrossNet(24, num_layers=3)
        head = torch.nn.Linear(24, 1)
        opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=1e-2)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(5):
            x = torch.randn(64, 24, generator=gen)
            y = (torch.rand(64, generator=gen) < 0.3).float()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(head(net(x)).squeeze(1), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in net.parameters()])
    fast, ref = run("fast"), run("reference")
    np.testing.assert_allclose(fast.numpy(), ref.numpy(), rtol=1e-4, atol=1e-5)
