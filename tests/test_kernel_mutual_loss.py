"""The fused mutual-loss kernel against the plain-PyTorch reference (mlfast.ops.mutual_loss).

Every comparison is against the reference evaluated in float64 on the same (possibly bf16-rounded)
logits, so the tolerance measures the kernel's own fp32 error. Runs on CPU tensors through Triton's
interpreter (conftest sets TRITON_INTERPRET=1 where there is no GPU) and on CUDA when present.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before triton is imported (conftest does it first in pytest)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from conftest import assert_close  # noqa: E402

from mlfast.kernels.mutual_loss import (  # noqa: E402
    KIND_IDS, MAX_PEERS, MutualLossFunction, SINGLE_PROGRAM_MAX_B, mutual_loss_forward)
from mlfast.ops.mutual_loss import (  # noqa: E402
    MutualLoss, fused_mutual_loss, mutual_loss, mutual_loss_grad, mutual_loss_terms)

KINDS = tuple(KIND_IDS)


@pytest.fixture
def device(kernel_device) -> torch.device:
    return kernel_device


def _inputs(gen, B, P, scale=3.0, dtype=torch.float32):
    z = (torch.randn(B, P, generator=gen, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, 2, (B,), generator=gen).float()
    return z, y


def _reference(z, y, alpha, kind):
    """float64 loss and dL/dz of the reference, on exactly the values the kernel sees."""
    z64 = z.detach().double().cpu().requires_grad_(True)
    a = alpha.detach().double().cpu().reshape(()) if isinstance(alpha, torch.Tensor) else alpha
    loss = mutual_loss(z64, y.double().cpu(), a, kind)
    loss.backward()
    return loss.detach(), z64.grad


def _fused(z, y, alpha, kind, grad_output=1.0, **launch):
    zk = z.detach().clone().requires_grad_(True)
    loss = MutualLossFunction.apply(zk, y, alpha, kind, launch.get("block_b"), launch.get("num_programs"))
    loss.backward(torch.tensor(grad_output, device=z.device))
    return loss.detach(), zk.grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("B", [1, 7, 41, 401])
def test_loss_and_grad_match_reference(device, gen, kind, P, B):
    z, y = _inputs(gen, B, P)
    alpha = float(torch.empty(()).uniform_(0.1, 2.0, generator=gen))
    go = float(torch.empty(()).uniform_(0.5, 3.0, generator=gen))  # grad_output != 1
    loss, grad = _fused(z.to(device), y.to(device), alpha, kind, go)
    ref_loss, ref_grad = _reference(z, y, alpha, kind)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == z.dtype and grad.shape == (B, P)
    assert_close(loss, ref_loss, msg=f"loss {kind} P={P} B={B}")
    assert_close(grad, go * ref_grad, msg=f"grad {kind} P={P} B={B}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("P,B", [(5, 97), (8, 97), (13, 31), (MAX_PEERS, 7)])
def test_wide_peer_counts(device, gen, kind, P, B):
    # P = 5 pads the peer axis to 8 lanes, 13 to 16: the padded lanes must not enter the means.
    # MAX_PEERS is the widest launch (BLOCK_B at its floor of 16 rows).
    z, y = _inputs(gen, B, P)
    loss, grad = _fused(z.to(device), y.to(device), 0.8, kind, 1.4)
    ref_loss, ref_grad = _reference(z, y, 0.8, kind)
    assert_close(loss, ref_loss)
    assert_close(grad, 1.4 * ref_grad)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block_b, num_programs", [(16, 1), (64, 3), (32, 7)])
def test_many_blocks_and_partial_sums(device, gen, kind, block_b, num_programs):
    # 1000 rows: 63 block steps of 16 in one program, or partial sums over 3 and 7 programs (the
    # last one ragged), added up by the second pass.
    z, y = _inputs(gen, 1000, 2)
    loss, grad = _fused(z.to(device), y.to(device), 0.6, kind, 1.7, block_b=block_b,
                        num_programs=num_programs)
    ref_loss, ref_grad = _reference(z, y, 0.6, kind)
    assert_close(loss, ref_loss)
    assert_close(grad, 1.7 * ref_grad)


def test_default_launch_above_single_program_limit(device, gen):
    B = SINGLE_PROGRAM_MAX_B + 1001  # the heuristics choose several programs + the second pass
    z, y = _inputs(gen, B, 2)
    loss, grad = _fused(z.to(device), y.to(device), 1.0, "kl")
    ref_loss, ref_grad = _reference(z, y, 1.0, "kl")
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)


@pytest.mark.parametrize("kind", KINDS)
def test_alpha_tensor_is_read_on_device(device, gen, kind):
    z, y = _inputs(gen, 41, 3)
    z, y = z.to(device), y.to(device)
    alpha = torch.tensor([0.25], device=device)
    loss_a, grad_a = mutual_loss_forward(z, y, alpha, kind)
    assert_close(loss_a, _reference(z, y, 0.25, kind)[0])
    assert_close(grad_a, _reference(z, y, 0.25, kind)[1])
    # Ramping alpha in place (as the trainer does inside a CUDA graph) changes the next launch.
    alpha.fill_(1.5)
    loss_b, grad_b = mutual_loss_forward(z, y, alpha, kind)
    assert_close(loss_b, _reference(z, y, 1.5, kind)[0])
    assert_close(grad_b, _reference(z, y, 1.5, kind)[1])
    # A 0-dim tensor and a float give the same result as the 1-element tensor.
    loss_c, _ = mutual_loss_forward(z, y, torch.tensor(1.5, device=device), kind)
    loss_d, _ = mutual_loss_forward(z, y, 1.5, kind)
    assert_close(loss_c, loss_b)
    assert_close(loss_d, loss_b)


@pytest.mark.parametrize("kind", KINDS)
def test_alpha_zero_is_the_plain_bce(device, gen, kind):
    z, y = _inputs(gen, 41, 3)
    loss, grad = _fused(z.to(device), y.to(device), 0.0, kind)
    zz = z.double().requires_grad_(True)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        zz, y.double()[:, None].expand_as(zz), reduction="none").mean(0).sum()
    bce.backward()
    assert_close(loss, bce)
    assert_close(grad, zz.grad)


@pytest.mark.parametrize("kind", KINDS)
def test_extreme_logits(device, gen, kind):
    B, P = 64, 3
    sign = torch.where(torch.rand(B, P, generator=gen) < 0.5, -1.0, 1.0).double()
    z = sign * (100.0 + torch.rand(B, P, generator=gen, dtype=torch.float64))
    z[:8] = 100.0  # identical peers: every peer term is exactly 0
    z[8:16, 1] = -z[8:16, 0]  # opposite peers at |z| ~ 100
    z = z.float()
    y = torch.randint(0, 2, (B,), generator=gen).float()
    loss, grad = _fused(z.to(device), y.to(device), 0.7, kind, 2.0)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    ref_loss, ref_grad = _reference(z, y, 0.7, kind)
    assert_close(loss, ref_loss)
    assert_close(grad, 2.0 * ref_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_low_and_high_precision_inputs(device, gen, dtype, kind):
    z, y = _inputs(gen, 401, 2, dtype=dtype)
    loss, grad = _fused(z.to(device), y.to(device), 0.9, kind, 1.3)
    assert grad.dtype == dtype
    ref_loss, ref_grad = _reference(z, y, 0.9, kind)
    math_dtype = torch.float32 if dtype == torch.float64 else dtype  # fp32 math in the kernel
    assert_close(loss, ref_loss, dtype=math_dtype)
    assert_close(grad, 1.3 * ref_grad, dtype=math_dtype)


def _objective(z, y, alpha, kind, i):
    """What peer i minimises with the other peers held fixed: for ``kl`` and ``mse`` (stop-gradient
    targets) its derivative in z_i is dL/dz_i; ``symkl`` differentiates the whole loss instead."""
    if kind == "symkl":
        return lambda t: mutual_loss(torch.cat([z[:, :i], t, z[:, i + 1:]], 1), y, alpha, kind)
    P = z.shape[1]

    def f(t):
        bce, peer = mutual_loss_terms(torch.cat([z[:, :i], t, z[:, i + 1:]], 1), y, alpha, kind)
        return bce[i] + alpha / (P - 1) * peer[i]
    return f


@pytest.mark.parametrize("kind", KINDS)
def test_closed_form_gradients_agree(device, gen, kind):
    # Four routes to dL/dz must agree: finite differences of each peer's objective (gradcheck),
    # autograd through the reference, the closed forms of mutual_loss_grad, and the kernel.
    z, y = _inputs(gen, 7, 3)
    z64, y64 = z.double(), y.double()
    for i in range(3):
        col = z64[:, i:i + 1].clone().requires_grad_(True)
        assert torch.autograd.gradcheck(_objective(z64, y64, 0.8, kind, i), (col,))
        (fd_grad,) = torch.autograd.grad(_objective(z64, y64, 0.8, kind, i)(col), col)
        torch.testing.assert_close(fd_grad[:, 0], mutual_loss_grad(z64, y, 0.8, kind)[:, i],
                                   rtol=1e-12, atol=1e-12)
    _, ref_grad = _reference(z, y, 0.8, kind)
    closed = mutual_loss_grad(z.double(), y, 0.8, kind)
    torch.testing.assert_close(closed, ref_grad, rtol=1e-12, atol=1e-12)
    _, grad = mutual_loss_forward(z.to(device), y.to(device), 0.8, kind)
    assert_close(grad, closed)


def test_strided_logits_and_integer_or_bool_labels(device, gen):
    z, y = _inputs(gen, 41, 6)
    z = z.to(device)[:, ::2]  # [41, 3] with strides (6, 2)
    y = y.to(device)
    ref_loss, ref_grad = _reference(z, y, 0.5, "symkl")
    for labels in (y, y.long(), y.bool(), y.to(torch.uint8)):
        loss, grad = mutual_loss_forward(z, labels, 0.5, "symkl")
        assert_close(loss, ref_loss)
        assert_close(grad, ref_grad)


def test_deterministic_and_no_grad_when_not_required(device, gen):
    z, y = _inputs(gen, 2000, 4)
    z, y = z.to(device), y.to(device)
    l1, g1 = mutual_loss_forward(z, y, 0.5, "kl", num_programs=5, block_b=64)
    l2, g2 = mutual_loss_forward(z, y, 0.5, "kl", num_programs=5, block_b=64)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)  # bitwise: no atomics in the reduction
    l3, g3 = mutual_loss_forward(z, y, 0.5, "kl", num_programs=5, block_b=64, write_grad=False)
    assert g3 is None and torch.equal(l3, l1)
    # Through autograd with an input that needs no gradient the kernel skips the gradient store.
    assert_close(MutualLossFunction.apply(z, y, 0.5, "kl"), l1)


def test_empty_batch_is_nan_like_the_reference(device):
    z, y = torch.zeros(0, 2, device=device), torch.zeros(0, device=device)
    loss, grad = mutual_loss_forward(z, y)
    assert torch.isnan(loss) and torch.isnan(mutual_loss(z, y)) and grad.shape == (0, 2)


def test_bad_inputs_say_what_was_expected(device):
    z, y = torch.zeros(4, 2, device=device), torch.zeros(4, device=device)
    with pytest.raises(ValueError, match=f"1 <= P <= MAX_PEERS = {MAX_PEERS}"):
        mutual_loss_forward(torch.zeros(4, MAX_PEERS + 1, device=device), y)
    with pytest.raises(ValueError, match="1 <= P"):
        mutual_loss_forward(torch.zeros(4, 0, device=device), y)
    with pytest.raises(ValueError, match=r"labels must be \[B=4\]"):
        mutual_loss_forward(z, torch.zeros(5, device=device))
    with pytest.raises(ValueError, match="unknown mutual loss"):
        mutual_loss_forward(z, y, kind="js")
    with pytest.raises(ValueError, match="1 element"):
        mutual_loss_forward(z, y, torch.ones(2, device=device))


@pytest.mark.parametrize("kind", KINDS)
def test_module_and_dispatcher(device, gen, kind):
    z, y = _inputs(gen, 41, 2)
    z, y = z.to(device), y.to(device)
    ref = mutual_loss(z, y, 0.4, kind)
    fused = fused_mutual_loss(z, y, 0.4, kind, backend="triton")
    assert_close(fused, ref)
    auto = fused_mutual_loss(z, y, 0.4, kind)  # reference on the CPU, the kernel on CUDA
    if device.type == "cpu":
        assert torch.equal(auto, ref)
    else:
        assert torch.equal(auto, fused)
    module = MutualLoss(kind, alpha=torch.tensor(0.4), backend="triton").to(device)
    zz = z.clone().requires_grad_(True)
    module(zz, y).backward()
    assert_close(zz.grad, mutual_loss_grad(z, y, 0.4, kind))
    assert_close(module(z, y, alpha=0.0), mutual_loss(z, y, 0.0, kind))
