"""The mutual-learning loss, in plain PyTorch: the reference every fused kernel is tested against.

For P peers with logits z_i (one column each of ``logits`` [B, P]), p_i = sigmoid(z_i) and labels y:

    L = sum_i [ mean_b BCE(y, p_i) + alpha / (P - 1) * sum_{j != i} mean_b D(p_j, p_i) ]

with the peer term D one of

* ``kl``    (Deep Mutual Learning): KL(sg(p_j) || p_i); the other peer is a fixed target.
            dKL/dz_i = p_i - p_j.
* ``symkl``: KL(p_j || p_i) + KL(p_i || p_j) with the gradient through both peers.
            d/dz_i of the pair's two terms: (p_i - p_j) + p_i (1 - p_i) (z_i - z_j).
* ``mse``   (arXiv 2406.12087): (p_i - sg(p_j))^2; d/dz_i = 2 (p_i - p_j) p_i (1 - p_i).

and dBCE/dz_i = p_i - y. Everything is computed from logits (log p = -softplus(-z),
log(1 - p) = -softplus(z)), so nothing overflows for |z| in the hundreds. With P = 1 the peer term
vanishes and L is the plain BCE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MUTUAL_KINDS = ("kl", "symkl", "mse")


def _check(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> None:
    if kind not in MUTUAL_KINDS:
        raise ValueError(f"unknown mutual loss {kind!r}; expected one of {', '.join(MUTUAL_KINDS)}")
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, P], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must be [B={logits.shape[0]}], got shape {tuple(labels.shape)}")


def binary_kl_logits(q_logits: torch.Tensor, p_logits: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(Bernoulli(sigmoid(q)) || Bernoulli(sigmoid(p))), stable in logits."""
    q = torch.sigmoid(q_logits)
    log_q, log_1mq = -F.softplus(-q_logits), -F.softplus(q_logits)
    log_p, log_1mp = -F.softplus(-p_logits), -F.softplus(p_logits)
    return q * (log_q - log_p) + (1 - q) * (log_1mq - log_1mp)


def mutual_loss_terms(
    logits: torch.Tensor, labels: torch.Tensor, alpha: float | torch.Tensor = 1.0, kind: str = "kl"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-peer (BCE [P], peer term [P]) so that L = sum(bce + alpha/(P-1) * peer).

    ``peer[i]`` is sum_{j != i} mean_b D(p_j, p_i) (not yet scaled by alpha / (P - 1)).
    """
    _check(logits, labels, kind)
    z = logits if logits.dtype == torch.float64 else logits.float()
    y = labels.to(z.dtype).unsqueeze(1).expand_as(z)
    bce = F.binary_cross_entropy_with_logits(z, y, reduction="none").mean(0)
    P = z.shape[1]
    peer = torch.zeros_like(bce)
    if P > 1:
        zi = z.unsqueeze(2)  # [B, P(i), 1]
        zj = z.unsqueeze(1)  # [B, 1, P(j)]
        if kind == "kl":
            d = binary_kl_logits(zj.detach().expand(-1, P, -1), zi.expand(-1, -1, P))
        elif kind == "symkl":
            zi_, zj_ = zi.expand(-1, -1, P), zj.expand(-1, P, -1)
            d = binary_kl_logits(zj_, zi_) + binary_kl_logits(zi_, zj_)
        else:  # mse
            d = (torch.sigmoid(zi) - torch.sigmoid(zj).detach()) ** 2
        off_diag = ~torch.eye(P, dtype=torch.bool, device=z.device)
        peer = (d.mean(0) * off_diag).sum(1)
    return bce, peer


def mutual_loss(
    logits: torch.Tensor, labels: torch.Tensor, alpha: float | torch.Tensor = 1.0, kind: str = "kl"
) -> torch.Tensor:
    """Total mutual-learning loss (a scalar) for ``logits`` [B, P] and ``labels`` [B].

    Example::

        >>> z = torch.randn(8, 2, requires_grad=True); y = torch.randint(0, 2, (8,)).float()
        >>> mutual_loss(z, y, alpha=1.0, kind="kl").backward()
    """
    bce, peer = mutual_loss_terms(logits, labels, alpha, kind)
    P = logits.shape[1]
    if P == 1:
        return bce.sum()
    return bce.sum() + alpha / (P - 1) * peer.sum()


def mutual_loss_grad(
    logits: torch.Tensor, labels: torch.Tensor, alpha: float = 1.0, kind: str = "kl"
) -> torch.Tensor:
    """dL/dlogits [B, P] in closed form (the formulas in the module docstring), for tests."""
    _check(logits, labels, kind)
    z = logits.double()
    B, P = z.shape
    p = torch.sigmoid(z)
    g = p - labels.double().unsqueeze(1)
    if P > 1:
        pi, pj = p.unsqueeze(2), p.unsqueeze(1)
        if kind == "kl":
            t = pi - pj
        elif kind == "symkl":
            # d/dz_i [KL(p_j||p_i) + KL(p_i||p_j)] appears in peer i's term and, symmetrically,
            # in peer j's term (same pair, same value): both contribute.
            t = 2 * ((pi - pj) + pi * (1 - pi) * (z.unsqueeze(2) - z.unsqueeze(1)))
        else:
            t = 2 * (pi - pj) * pi * (1 - pi)
        t = t * (~torch.eye(P, dtype=torch.bool, device=z.device))
        g = g + alpha / (P - 1) * t.sum(2)
    return (g / B).to(logits.dtype)


MUTUAL_BACKENDS = ("auto", "triton", "reference")


def fused_mutual_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float | torch.Tensor = 1.0,
    kind: str = "kl",
    backend: str = "auto",
) -> torch.Tensor:
    """``mutual_loss`` through the fused Triton kernel where it can run, else the reference.

    ``backend``: ``"auto"`` uses the kernel (``mlfast.kernels.mutual_loss``: one launch for the loss
    and its gradient) on CUDA tensors when Triton is installed and the reference otherwise;
    ``"triton"`` always uses the kernel (CPU tensors then need ``TRITON_INTERPRET=1`` set before
    triton is imported); ``"reference"`` always uses ``mutual_loss``. The kernel returns an fp32
    loss, computes in fp32 whatever the logits' dtype, reads a tensor ``alpha`` on the device and
    gives no gradient to ``alpha``.

    Example::

        >>> z = torch.randn(8, 2, requires_grad=True); y = torch.randint(0, 2, (8,)).float()
        >>> fused_mutual_loss(z, y, alpha=0.5, kind="kl").backward()   # CPU: the reference
    """
    if backend not in MUTUAL_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(MUTUAL_BACKENDS)}")
    if backend == "auto":
        backend = "triton" if logits.is_cuda and _triton_available() else "reference"
    if backend == "reference":
        return mutual_loss(logits, labels, alpha, kind)
    from mlfast.kernels.mutual_loss import MutualLossFunction

    return MutualLossFunction.apply(logits, labels, alpha, kind)


_TRITON_AVAILABLE: bool | None = None


def _triton_available() -> bool:
    global _TRITON_AVAILABLE
    if _TRITON_AVAILABLE is None:  # probed once: the loss runs every step
        try:
            import triton  # noqa: F401
            _TRITON_AVAILABLE = True
        except ImportError:
            _TRITON_AVAILABLE = False
    return _TRITON_AVAILABLE


class MutualLoss(torch.nn.Module):
    """The mutual-learning loss as a module (``fused_mutual_loss`` with a fixed kind and alpha).

    ``alpha`` may be a float or a 1-element tensor (registered as a buffer, so it follows
    ``.to(device)`` and the trainer can ramp it in place inside a CUDA graph); ``forward`` also
    accepts an ``alpha`` overriding it for one call.

    Example::

        >>> loss_fn = MutualLoss(kind="symkl", alpha=0.5)
        >>> z = torch.randn(8, 3, requires_grad=True); y = torch.randint(0, 2, (8,)).float()
        >>> loss_fn(z, y).backward()
    """

    def __init__(self, kind: str = "kl", alpha: float | torch.Tensor = 1.0, backend: str = "auto") -> None:
        super().__init__()
        if kind not in MUTUAL_KINDS:
            raise ValueError(f"unknown mutual loss {kind!r}; expected one of {', '.join(MUTUAL_KINDS)}")
        if backend not in MUTUAL_BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(MUTUAL_BACKENDS)}")
        self.kind, self.backend = kind, backend
        if isinstance(alpha, torch.Tensor):
            self.register_buffer("alpha", alpha.detach().reshape(()).float())
        else:
            self.alpha = float(alpha)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                alpha: float | torch.Tensor | None = None) -> torch.Tensor:
        return fused_mutual_loss(logits, labels, self.alpha if alpha is None else alpha, self.kind, self.backend)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, backend={self.backend!r}"
