"""DCN's cross network in closed form (mlfast.ops.cross) against the layer-by-layer reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import DEVICES

from mlfast.models.blocks import CrossNet
from mlfast.ops import cross
from mlfast.ops.cross import cross_closed_form, cross_network, cross_reference, resolve_impl


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


@pytest.mark.parametrize("B, D, L", [(1, 1, 1), (7, 5, 1), (300, 37, 3), (513, 64, 6), (1000, 624, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_closed_form_equals_the_layer_by_layer_network(B, D, L, dtype, device, gen):
    """Value and every gradient: fp64 to ~1e-13 (the same function), fp32 to float rounding."""
    x0, w, b = (t.to(device) for t in _inputs(B, D, L, dtype, gen))
    g = torch.randn(B, D, dtype=dtype, generator=gen).to(device)
    fast = _grads(cross_closed_form, x0, w, b, g)
    ref = _grads(cross_reference, x0, w, b, g)
    tol = 1e-12 if dtype == torch.float64 else 3e-5
    for name, a, r in zip(("x_L", "dL/dx0", "dL/dw", "dL/db"), fast, ref):
        scale = float(r.abs().max()) or 1.0
        assert float((a - r).abs().max()) <= tol * scale, name


def test_gradcheck_in_float64(gen):
    x0, w, b = (t.requires_grad_() for t in _inputs(6, 4, 3, torch.float64, gen))
    assert torch.autograd.gradcheck(cross_closed_form, (x0, w, b))
    assert torch.autograd.gradgradcheck(cross_closed_form, (x0, w, b))


def test_empty_batch_and_non_finite_values():
    w, b = torch.ones(2, 3), torch.zeros(2, 3)
    assert cross_closed_form(torch.empty(0, 3), w, b).shape == (0, 3)
    x0 = torch.tensor([[1.0, float("nan"), 2.0], [1.0, 1.0, float("inf")], [1.0, 2.0, 3.0]])
    fast, ref = cross_closed_form(x0, w, b), cross_reference(x0, w, b)
    assert torch.equal(fast[:2].isfinite(), ref[:2].isfinite())  # a non-finite row stays non-finite
    assert torch.allclose(fast[2], ref[2])


def test_under_bf16_autocast_it_stays_close_to_fp32(gen):
    x0, w, b = _inputs(256, 64, 3, torch.float32, gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = cross_closed_form(x0, w, b).float()
    ref = cross_reference(x0, w, b)
    assert float((low - ref).abs().max()) <= 0.05 * float(ref.abs().max())


def test_dispatch_and_bad_shapes(monkeypatch):
    assert resolve_impl("auto") == "fast"
    monkeypatch.setenv(cross.ENV_VAR, "reference")
    assert resolve_impl("auto") == "reference"
    monkeypatch.setenv(cross.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="MLFAST_CROSS='bogus'"):
        resolve_impl("auto")
    with pytest.raises(ValueError, match="cross impl 'numba'"):
        resolve_impl("numba")
    with pytest.raises(ValueError, match="x0 \\[B, D\\]"):
        cross_network(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 4))


def test_crossnet_module_trains_the_same_as_with_the_reference(monkeypatch, seed):
    """A few Adam steps of a CrossNet + head, closed form vs reference: the same weights within float error."""
    def run(impl):
        torch.manual_seed(seed)
        net = CrossNet(24, num_layers=3, impl=impl)
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
