"""Fused mutual-learning loss: ONE launch computes the scalar loss and writes dL/dlogits.

The loss is the one defined (and implemented in plain PyTorch) in ``mlfast.ops.mutual_loss``: for logits
z [B, P] of P peers (p = sigmoid(z)), labels y [B] and c = alpha / (P - 1),

    L = 1/B sum_b [ sum_i BCE(y_b, z_bi) + c * sum_{i != j} D(p_bj, p_bi) ].

Because the peers' inputs are fixed targets in ``kl`` and ``mse`` (and ``symkl`` is symmetric), the
whole gradient is closed-form, so the forward kernel writes dL/dz next to the loss and the backward
only multiplies that stored gradient by grad_output (Liger-Kernel's pattern: a second pass over the
logits is never needed). Chain: ``_mutual_loss_fwd_kernel`` -> ``mutual_loss_forward`` ->
``MutualLossFunction`` -> ``mlfast.ops.mutual_loss.MutualLoss`` / ``fused_mutual_loss``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

KIND_IDS = {"kl": 0, "symkl": 1, "mse": 2}

# Up to this batch one program walks the whole batch: at B = 4096..16384 the kernel is bound by the
# launch and by one DRAM round trip per block, so more programs plus a second reduction pass would
# only add a launch. Above it, programs write partial sums that a second, one-program pass adds up
# in a fixed order (deterministic: no atomics anywhere).
SINGLE_PROGRAM_MAX_B = 16384
MAX_PARTIALS = 1024
# The most peers one launch takes. The math has no limit (all peer sums are centred O(P) sums over
# the padded peer axis), but registers do: a block step holds BLOCK_B x P_PAD elements, and the
# launch heuristics keep that at 4096 (16 per thread of 8 warps) only while BLOCK_B can shrink,
# i.e. down to its floor of 16 rows at P_PAD = 256. Above, the tile grows with P (on sm_90: 202
# registers per thread at P = 512, the 255 ceiling at P = 1024). tests/test_kernel_compile.py
# compiles P = MAX_PEERS for sm_90 without spills; test_kernel_mutual_loss checks it against the
# reference.
MAX_PEERS = 256

# The math, per row b (the row index is dropped), with S = sum_i p_i, Z = sum_i z_i, their means
# pbar = S / P, zbar = Z / P and qbar_i = 1 - p_i = sigmoid(-z_i):
#
# Forward. BCE_i = softplus(z_i) - y z_i, with softplus(z) = max(z, 0) + log(1 + exp(-|z|)), finite
# for any z. The peer terms are summed over ordered pairs; all three reduce to centred O(P) sums:
#   kl:    sum_{i!=j} KL(p_j || p_i) = sum_{i!=j} [sp(z_i) - sp(z_j) - p_j (z_i - z_j)]
#          (the softplus terms cancel pairwise)  = sum_{i<j} (p_i - p_j)(z_i - z_j)
#          = P * sum_i (p_i - pbar)(z_i - zbar)
#   symkl: KL(p_j||p_i) + KL(p_i||p_j) = (p_i - p_j)(z_i - z_j), each unordered pair counted twice:
#          2 P * sum_i (p_i - pbar)(z_i - zbar)
#   mse:   sum_{i!=j} (p_i - p_j)^2 = 2 P * sum_i (p_i - pbar)^2
# The centred form matters at |z| ~ 100: P sum p z - S Z would cancel two numbers of size P^2 |z|.
#
# Backward (dL/dz_i, before the 1/B), from mlfast.ops.mutual_loss.mutual_loss_grad:
#   BCE:   p_i - y
#   kl:    c * sum_{j!=i} (p_i - p_j)                              = c * P (p_i - pbar)
#   symkl: c * 2 sum_{j!=i} [(p_i - p_j) + p_i qbar_i (z_i - z_j)] = c * 2P [(p_i - pbar) + p_i qbar_i (z_i - zbar)]
#   mse:   c * 2 sum_{j!=i} (p_i - p_j) p_i qbar_i                  = c * 2P (p_i - pbar) p_i qbar_i
# p and p * qbar come from one exp: e = exp(-|z|), r = 1 / (1 + e), p = r or e r, p qbar = e r^2,
# so p (1 - p) keeps full relative precision where p rounds to 1.


@triton.jit
def _mutual_loss_fwd_kernel(
    z_ptr, stride_zb, stride_zp,  # logits [B, P], any float dtype, any strides
    y_ptr, stride_y,  # labels [B], float or integer
    alpha_ptr, alpha_val,  # alpha read from alpha_ptr[0] when ALPHA_FROM_PTR, else the scalar
    grad_ptr,  # dL/dz [B, P] contiguous, logits' dtype (not touched unless WRITE_GRAD)
    out_ptr,  # fp32: the loss (one program) or this program's partial sum
    B, inv_B,
    P: tl.constexpr, P_PAD: tl.constexpr, KIND: tl.constexpr,
    ALPHA_FROM_PTR: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_B: tl.constexpr, NUM_STEPS: tl.constexpr,
):
    # NUM_STEPS (block steps per program) is a constexpr rather than a runtime bound because Triton
    # 3.6's interpreter cannot loop to a runtime bound under numpy >= 2.4 (triton-lang/triton#9171);
    # it takes few values (1 below BLOCK_B rows, at most SINGLE_PROGRAM_MAX_B / BLOCK_B, 4 for the
    # multi-program case), so it costs few compilations, and a constant trip count pipelines.
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * (NUM_STEPS * BLOCK_B)
    cols = tl.arange(0, P_PAD)
    col_ok = cols < P
    if ALPHA_FROM_PTR:
        alpha = tl.load(alpha_ptr).to(tl.float32)
    else:
        alpha = alpha_val
    if P > 1:
        c = alpha / (P - 1)
    acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    # Programs own NUM_STEPS * BLOCK_B consecutive rows: only the last one has rows past B.
    for start in range(0, NUM_STEPS * BLOCK_B, BLOCK_B):
        rows = row_start + start + tl.arange(0, BLOCK_B)  # int64: rows * stride may pass 2^31
        row_ok = rows < B
        ok = row_ok[:, None] & col_ok[None, :]
        z = tl.load(z_ptr + rows[:, None] * stride_zb + cols[None, :] * stride_zp, mask=ok, other=0.0)
        z = z.to(tl.float32)
        y = tl.load(y_ptr + rows * stride_y, mask=row_ok, other=0).to(tl.float32)[:, None]
        e = tl.exp(-tl.abs(z))
        r = 1.0 / (1.0 + e)
        p = tl.where(z >= 0, r, e * r)
        row_loss = tl.sum(tl.where(ok, tl.maximum(z, 0.0) + tl.log(1.0 + e) - y * z, 0.0), axis=1)
        g = p - y
        if P > 1:
            pbar = tl.sum(tl.where(ok, p, 0.0), axis=1)[:, None] / P
            zbar = tl.sum(z, axis=1)[:, None] / P  # padded columns loaded as 0
            dp = tl.where(ok, p - pbar, 0.0)
            if KIND == 2:  # mse
                row_loss += c * 2.0 * P * tl.sum(dp * dp, axis=1)
                g += c * 2.0 * P * dp * (e * r * r)
            else:
                dz = tl.where(ok, z - zbar, 0.0)
                pair = P * tl.sum(dp * dz, axis=1)
                if KIND == 0:  # kl
                    row_loss += c * pair
                    g += c * P * dp
                else:  # symkl
                    row_loss += c * 2.0 * pair
                    g += c * 2.0 * P * (dp + (e * r * r) * dz)
        acc += tl.where(row_ok, row_loss, 0.0)
        if WRITE_GRAD:
            tl.store(grad_ptr + rows[:, None] * P + cols[None, :],
                     (g * inv_B).to(grad_ptr.dtype.element_ty), mask=ok)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0) * inv_B)


@triton.jit
def _mutual_loss_sum_kernel(partials_ptr, out_ptr, N, BLOCK: tl.constexpr):
    # The second pass for large B: one program adds the partial sums in a fixed order.
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr, tl.sum(tl.load(partials_ptr + offs, mask=offs < N, other=0.0), axis=0))


# True when TRITON_INTERPRET=1 was set before triton was imported: the kernels then run in Python on
# any tensors (CPU included); otherwise they are compiled and need CUDA tensors. Checked on the
# kernel object, not the environment, because setting the variable after the import has no effect.
_INTERPRETED = not isinstance(_mutual_loss_fwd_kernel, triton.runtime.JITFunction)


def _kernel_for(kernel, device: torch.device):
    if device.type == "cpu" and not _INTERPRETED:
        raise RuntimeError("the Triton mutual loss got CPU tensors, but Triton's interpreter is off: set "
                           "TRITON_INTERPRET=1 before triton is first imported, or use mlfast.ops.mutual_loss."
                           "mutual_loss (the plain-PyTorch reference) on the CPU")
    return kernel


def _launch_config(B: int, P_PAD: int, block_b: int | None, num_programs: int | None):
    if block_b is None:
        # ~4096 elements per block step: B = 4096, P = 2 takes two steps of one 8-warp program.
        block_b = max(16, min(4096 // P_PAD, triton.next_power_of_2(max(B, 1))))
    if block_b & (block_b - 1):
        raise ValueError(f"block_b must be a power of two, got {block_b}")
    if num_programs is None:
        num_programs = 1 if B <= SINGLE_PROGRAM_MAX_B else min(triton.cdiv(B, 4 * block_b), MAX_PARTIALS)
    if not 1 <= num_programs <= MAX_PARTIALS:
        raise ValueError(f"num_programs must be in [1, {MAX_PARTIALS}], got {num_programs}")
    num_programs = min(num_programs, max(1, triton.cdiv(B, block_b)))
    rows_per_program = triton.cdiv(triton.cdiv(max(B, 1), num_programs), block_b) * block_b
    num_programs = max(1, triton.cdiv(B, rows_per_program))
    num_warps = 8 if block_b * P_PAD >= 4096 else 4
    return block_b, num_programs, rows_per_program, num_warps


def mutual_loss_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float | torch.Tensor = 1.0,
    kind: str = "kl",
    *,
    write_grad: bool = True,
    block_b: int | None = None,
    num_programs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the fused kernel: returns (loss [] fp32, dL/dlogits [B, P] in logits' dtype or None).

    ``alpha`` is a Python float or a 1-element tensor on the logits' device, read inside the kernel
    (no host sync, safe to change between replays of a CUDA graph). ``block_b`` (rows per block
    step, a power of two) and ``num_programs`` (partial sums for large B) override the launch
    heuristics, for tests and tuning. CPU tensors need Triton's interpreter (TRITON_INTERPRET=1
    set before triton is imported).

    Example::

        >>> z, y = torch.randn(41, 2), torch.randint(0, 2, (41,)).float()
        >>> loss, grad = mutual_loss_forward(z, y, alpha=0.5, kind="kl")
        >>> loss.shape, grad.shape
        (torch.Size([]), torch.Size([41, 2]))
    """
    if kind not in KIND_IDS:
        raise ValueError(f"unknown mutual loss {kind!r}; expected one of {', '.join(KIND_IDS)}")
    if logits.ndim != 2 or not 1 <= logits.shape[1] <= MAX_PEERS:
        raise ValueError(f"logits must be [B, P] with 1 <= P <= MAX_PEERS = {MAX_PEERS}, got shape "
                         f"{tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    B, P = logits.shape
    if labels.shape != (B,):
        raise ValueError(f"labels must be [B={B}], got shape {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels on {labels.device}, logits on {logits.device}: expected one device")
    if labels.dtype == torch.bool:
        labels = labels.view(torch.uint8)  # a free reinterpretation; Triton loads bytes
    alpha_from_ptr = isinstance(alpha, torch.Tensor)
    if alpha_from_ptr:
        if alpha.numel() != 1 or alpha.device != logits.device:
            raise ValueError(f"alpha tensor must hold 1 element on {logits.device}, "
                             f"got shape {tuple(alpha.shape)} on {alpha.device}")
        alpha_ptr, alpha_val = alpha, 0.0
    else:
        alpha_ptr, alpha_val = logits, float(alpha)  # alpha_ptr unused: any pointer will do

    loss = torch.empty((), dtype=torch.float32, device=logits.device)
    grad = torch.empty((B, P), dtype=logits.dtype, device=logits.device) if write_grad else None
    if B == 0:  # the mean over an empty batch, as torch's: nan
        loss.fill_(float("nan"))
        return loss, grad
    P_PAD = triton.next_power_of_2(P)
    block_b, G, rows_per_program, num_warps = _launch_config(B, P_PAD, block_b, num_programs)
    out = loss if G == 1 else torch.empty(G, dtype=torch.float32, device=logits.device)
    _kernel_for(_mutual_loss_fwd_kernel, logits.device)[(G,)](
        logits, logits.stride(0), logits.stride(1),
        labels, labels.stride(0),
        alpha_ptr, alpha_val,
        grad if write_grad else logits,
        out,
        B, 1.0 / B,
        P=P, P_PAD=P_PAD, KIND=KIND_IDS[kind],
        ALPHA_FROM_PTR=alpha_from_ptr, WRITE_GRAD=write_grad, BLOCK_B=block_b,
        NUM_STEPS=rows_per_program // block_b,
        num_warps=num_warps,
    )
    if G > 1:
        _kernel_for(_mutual_loss_sum_kernel, logits.device)[(1,)](
            out, loss, G, BLOCK=triton.next_power_of_2(G), num_warps=4)
    return loss, grad


class MutualLossFunction(torch.autograd.Function):
    """Autograd wrapper: the forward launch stores dL/dlogits, backward scales it by grad_output.

    ``alpha`` and ``labels`` get no gradient. Example::

        >>> z = torch.randn(41, 2, requires_grad=True); y = torch.randint(0, 2, (41,)).float()
        >>> MutualLossFunction.apply(z, y, 1.0, "kl").backward()
    """

    @staticmethod
    def forward(ctx, logits, labels, alpha=1.0, kind="kl", block_b=None, num_programs=None):
        loss, grad = mutual_loss_forward(logits, labels, alpha, kind, write_grad=logits.requires_grad,
                                         block_b=block_b, num_programs=num_programs)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # Always one multiply, even when grad_output is 1: testing that would sync with the host.
        return grad * grad_output, None, None, None, None, None
