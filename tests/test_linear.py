"""The oneDNN dense layer (mlfast.ops.linear) against its reference, F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlfast.models.blocks import MLP, use_reference_ops
from mlfast.ops import linear as lin
from mlfast.ops.linear import Linear, linear, onednn_available, takes_fast_path

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN matmul op")


def _run(f, x, w, b, g):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    y = f(x, w, b)
    y.backward(g)
    return y.detach(), x.grad, w.grad, (b.grad if b is not None else None)


@needs_onednn
@pytest.mark.parametrize("x_shape, out, bias", [
    ((4096, 400), 400, False), ((300, 624), 400, True), ((7, 5), 1, True), ((1, 3), 2, True),
    ((513, 1), 9, False), ((6, 39, 16), 8, True), ((2, 3, 4, 5), 3, False)])
def test_value_and_gradients_match_f_linear(x_shape, out, bias, gen):
    """fp32 products with fp32 accumulation both ways: equal to float rounding (fp64 checks the scale)."""
    x = torch.randn(*x_shape, generator=gen)
    w = torch.randn(out, x_shape[-1], generator=gen) / x_shape[-1] ** 0.5
    b = torch.randn(out, generator=gen) if bias else None
    g = torch.randn(*x_shape[:-1], out, generator=gen)
    assert takes_fast_path(x, w)
    fast = _run(lambda *a: linear(*a, impl="fast"), x, w, b, g)
    ref = _run(lambda *a: F.linear(*a), x.double(), w.double(), None if b is None else b.double(), g.double())
    for name, a, r in zip(("y", "dL/dx", "dL/dw", "dL/db"), fast, ref):
        if r is None:
            assert a is None, name
            continue
        assert a.shape == r.shape and a.dtype == torch.float32, name
        scale = float(r.abs().max()) or 1.0
        k = x_shape[-1] if name in ("y", "dL/dx") else x.numel() // x_shape[-1]
        assert float((a.double() - r).abs().max()) <= 2e-7 * scale * k ** 0.5 + 1e-6 * scale, name


@needs_onednn
def test_non_contiguous_inputs_and_a_stride_zero_gradient(gen):
    x = torch.randn(40, 30, generator=gen).t()  # [30, 40], transposed
    w = torch.randn(5, 40, generator=gen)
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    linear(xf, wf, impl="fast").sum().backward()  # sum's backward hands a stride-0 gradient
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.linear(xr, wr).sum().backward()
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wf.grad, wr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN:UserWarning")  # mkldnn.flags' own
def test_where_the_reference_runs(monkeypatch):
    x, w = torch.randn(4, 3), torch.randn(2, 3)
    assert not takes_fast_path(x.double(), w.double())
    assert not takes_fast_path(x, w, impl="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not takes_fast_path(x, w)  # bf16 autocast keeps F.linear (and its bf16 kernels)
    with torch.backends.mkldnn.flags(enabled=False):
        assert not takes_fast_path(x, w)
    monkeypatch.setenv(lin.ENV_VAR, "reference")
    assert not takes_fast_path(x, w)
    monkeypatch.setenv(lin.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="MLFAST_LINEAR"):
        linear(x, w)


@needs_onednn
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
def test_traced_modules_record_the_reference_op():
    m = Linear(3, 2).eval()
    traced = torch.jit.trace(m, torch.randn(4, 3))
    assert "mkldnn" not in str(traced.graph) and "linear" in str(traced.graph)


def test_linear_is_an_nn_linear_and_reference_ops_switch_it():
    mlp = MLP(6, (5, 4), dropout=0.0)
    plain = nn.Linear(6, 5)
    assert isinstance(mlp.linears[0], nn.Linear)
    assert set(mlp.linears[0].state_dict()) == set(nn.Linear(6, 5, bias=False).state_dict())
    assert set(Linear(6, 5).state_dict()) == set(plain.state_dict())
    assert use_reference_ops(mlp) == 3  # two hidden layers and the output layer
    assert all(m.impl == "reference" for m in mlp.modules() if isinstance(m, Linear))


@needs_onednn
def test_an_mlp_trains_the_same_either_way(gen):
    """Ten Adam steps of an MLP (BatchNorm, no dropout) through oneDNN and through F.linear: the
    weights stay within float rounding of each other."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    a = MLP(20, (32, 16), dropout=0.0)
    b = MLP(20, (32, 16), dropout=0.0)
    b.load_state_dict(a.state_dict())
    use_reference_ops(b)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (a, b)]
    for _ in range(10):
        x, y = torch.randn(64, 20, generator=gen), torch.rand(64, generator=gen)
        for m, opt in zip((a, b), opts):
            opt.zero_grad()
            F.binary_cross_entropy_with_logits(m(x).squeeze(1), y).backward()
            opt.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-4, msg=name)
