"""Building blocks shared by the model zoo, each vectorised over fields (no per-field Python loop).

Shapes: ``v`` [B, F, D] embedding vectors, ``w`` [B, F] first-order weights, ``x`` [B, K] flat
inputs. Initialisation follows FuxiCTR: Linear / CIN weights Xavier-normal with zero biases; the
embedding tables are the trainer's (``mlfast.train.tables``).

Every block here has an independent loop-by-loop reference in ``tests/test_models.py``.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mlfast.ops.cross import cross_network
from mlfast.ops.dropout import ReLUDropout
from mlfast.ops.linear import Linear

BilinearType = Literal["field_all", "field_each", "field_interaction"]


def xavier_init_(module: nn.Module) -> nn.Module:
    """FuxiCTR's initialisation of dense layers: Xavier-normal weights, zero biases (in place)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def linear(in_features: int, out_features: int, bias: bool = True) -> Linear:
    """A dense layer with FuxiCTR's initialisation: ``mlfast.ops.linear.Linear``, an ``nn.Linear``
    whose CPU products run through oneDNN."""
    return xavier_init_(Linear(in_features, out_features, bias=bias))  # type: ignore[return-value]


def check_positive(model: str, **values: int | Sequence[int]) -> None:
    """ValueError naming the option unless every given count (or list of counts) is >= 1."""
    for key, val in values.items():
        items = tuple(val) if isinstance(val, (tuple, list)) else (val,)
        if any(int(x) < 1 for x in items):
            raise ValueError(f"{model}: option {key}={val!r} must be >= 1")


def check_dropout(model: str, key: str, p: float) -> None:
    if not 0.0 <= p < 1.0:  # also rejects NaN
        raise ValueError(f"{model}: option {key}={p!r} must be in [0, 1)")


def concat_dense(x: torch.Tensor, dense: torch.Tensor | None) -> torch.Tensor:
    """[x, dense] along the feature axis (x itself when there are no dense features)."""
    if dense is None:
        return x
    return torch.cat([x, dense.to(x.dtype)], dim=1)


def pair_indices(num_fields: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) int64 [P] over all field pairs i < j, P = F (F - 1) / 2, row-major (FuxiCTR's order)."""
    ij = torch.triu_indices(num_fields, num_fields, offset=1)
    return ij[0].contiguous(), ij[1].contiguous()


def use_reference_ops(module: nn.Module) -> int:
    """Run every op inside ``module`` that mlfast computes its own way (the fused ReLU + dropout, the
    closed-form cross network, the oneDNN dense layers) by its plain reference; returns how many
    modules changed. The benchmarks' plain-PyTorch baselines use
    this: they must not get mlfast's own ops for free.

    Example::

        >>> use_reference_ops(nn.Sequential(CrossNet(4), MLP(4, (3,), dropout=0.1)))
        4
    """
    n = 0
    for m in module.modules():
        if isinstance(m, (CrossNet, ReLUDropout, Linear)):
            m.impl = "reference"
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# MLP


class MLP(nn.Module):
    """FuxiCTR's MLP block: per hidden layer Linear -> BatchNorm -> ReLU -> Dropout, then an
    optional output Linear.

    ``output_dim=None`` returns the last hidden layer (or the input itself when there is no hidden
    layer); ``hidden=()`` with ``output_dim=1`` is a plain linear layer over the input.

    With ``dropout > 0``, ReLU and dropout run as one fused op (``mlfast.ops.dropout.ReLUDropout``,
    shared by the hidden layers: each call advances its counter, so every layer and step gets its
    own mask). Its RNG state (``dropout.seed``, ``dropout.counter``) is in the state_dict; the seed
    is drawn from torch's generator after the Linear layers are initialised, so their initial
    weights are what they were with ``nn.Dropout``.

    Example::

        >>> mlp = MLP(8, hidden=(16, 16), output_dim=1).eval()
        >>> mlp(torch.randn(4, 8)).shape
        torch.Size([4, 1])
    """

    def __init__(
        self,
        input_dim: int,
        hidden: Sequence[int] = (400, 400, 400),
        output_dim: int | None = 1,
        dropout: float = 0.2,
        batch_norm: bool = True,
    ):
        super().__init__()
        check_positive("MLP", hidden=tuple(hidden))
        check_dropout("MLP", "dropout", dropout)
        dims = [int(input_dim), *(int(h) for h in hidden)]
        # No Linear bias in front of BatchNorm: BN subtracts the batch mean, so such a bias gets only
        # rounding noise as gradient, which Adam turns into a random walk (FuxiCTR keeps it).
        self.linears = nn.ModuleList(linear(a, b, bias=not batch_norm) for a, b in zip(dims, dims[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) for b in dims[1:]) if batch_norm else nn.ModuleList()
        self.out = linear(dims[-1], output_dim) if output_dim is not None else None
        self.output_dim = output_dim if output_dim is not None else dims[-1]
        self.dropout = ReLUDropout(dropout) if dropout > 0 and len(self.linears) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, lin in enumerate(self.linears):
            x = lin(x)
            if len(self.norms):
                x = self.norms[i](x)
            x = self.dropout(x) if self.dropout is not None else torch.relu(x)
        return self.out(x) if self.out is not None else x


# ---------------------------------------------------------------------------------------------
# First- and second-order terms


class LinearTerm(nn.Module):
    """First-order logit: ``bias + sum_f w_f`` (+ ``dense @ u`` when the model has dense inputs).

    The per-feature weights ``w`` come from the last column of the model's table, so this block
    only owns the bias and the dense weights.

    Example::

        >>> t = LinearTerm(num_dense=0)
        >>> t(torch.ones(2, 3)).tolist()   # bias starts at 0
        [3.0, 3.0]
    """

    def __init__(self, num_dense: int = 0, bias: bool = True):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(())) if bias else None
        self.dense = linear(num_dense, 1, bias=False) if num_dense > 0 else None

    def forward(self, w: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        out = w.sum(dim=1)
        if self.bias is not None:
            out = out + self.bias
        if self.dense is not None and dense is not None:
            out = out + self.dense(dense.to(out.dtype)).squeeze(1)
        return out


def fm_interaction(v: torch.Tensor) -> torch.Tensor:
    """FM second-order logit [B]: sum_{i<j} <v_i, v_j> = 0.5 * sum_d [(sum_f v)^2 - sum_f v^2].

    Example::

        >>> v = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
        >>> fm_interaction(v).tolist()   # 1*3 + 2*4
        [11.0]
    """
    s = v.sum(dim=1)
    return 0.5 * (s.square() - v.square().sum(dim=1)).sum(dim=1)


class InnerProduct(nn.Module):
    """IPNN's product layer: <v_i, v_j> for every field pair i < j -> [B, F (F - 1) / 2].

    One batched matmul gives all F^2 products (twice the needed work, but a single GEMM beats
    gathering P pairs of D-vectors); the upper triangle is then picked by flat index.

    Example::

        >>> InnerProduct(3)(torch.ones(2, 3, 4)).tolist()
        [[4.0, 4.0, 4.0], [4.0, 4.0, 4.0]]
    """

    def __init__(self, num_fields: int):
        super().__init__()
        i, j = pair_indices(num_fields)
        self.register_buffer("flat_index", i * num_fields + j, persistent=False)
        self.num_pairs = int(i.numel())

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        gram = torch.bmm(v, v.transpose(1, 2))
        return gram.flatten(1).index_select(1, self.flat_index)


# ---------------------------------------------------------------------------------------------
# Cross networks (DCN, DCNv2)


class CrossNet(nn.Module):
    """DCN's cross network: x_{l+1} = x_0 * (x_l . w_l) + b_l + x_l, one rank-1 layer each.

    Example::

        >>> CrossNet(6, num_layers=3)(torch.randn(4, 6)).shape
        torch.Size([4, 6])
    """

    def __init__(self, dim: int, num_layers: int = 3, impl: str = "auto"):
        super().__init__()
        # Xavier-normal of a Linear(dim, 1), as FuxiCTR's CrossInteraction initialises its weight.
        self.weight = nn.Parameter(torch.randn(num_layers, dim) * math.sqrt(2.0 / (dim + 1)))
        self.bias = nn.Parameter(torch.zeros(num_layers, dim))
        self.impl = impl  # "auto" | "fast" | "reference": see mlfast.ops.cross.resolve_impl

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        # in closed form (mlfast.ops.cross); cross_reference is the layer loop of the docstring
        return cross_network(x0, self.weight, self.bias, self.impl)


class CrossNetV2(nn.Module):
    """DCNv2's full-rank cross network: x_{l+1} = x_0 * (W_l x_l + b_l) + x_l.

    Example::

        >>> CrossNetV2(6, num_layers=2)(torch.randn(4, 6)).shape
        torch.Size([4, 6])
    """

    def __init__(self, dim: int, num_layers: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(linear(dim, dim) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for lin in self.layers:
            x = x0 * lin(x) + x
        return x


class CrossNetMix(nn.Module):
    """DCNv2's low-rank mixture of cross experts. Per layer l and expert e:

        E_e(x_l) = x_0 * (U_e tanh(C_e tanh(V_e^T x_l)) + b_l)
        x_{l+1}  = sum_e softmax_e(g_e . x_l) E_e(x_l) + x_l

    with U_e, V_e [dim, r], C_e [r, r], a shared bias b_l and gates g_e [dim] shared across layers
    (as in the paper's reference code and FuxiCTR). All experts run in one einsum per step.

    Example::

        >>> CrossNetMix(6, num_layers=2, low_rank=3, num_experts=2)(torch.randn(4, 6)).shape
        torch.Size([4, 6])
    """

    def __init__(self, dim: int, num_layers: int = 3, low_rank: int = 32, num_experts: int = 4):
        super().__init__()

        def xavier(*shape: int) -> nn.Parameter:
            t = torch.empty(*shape)
            for i in range(shape[0]):  # per layer, as one xavier_normal_ tensor each
                nn.init.xavier_normal_(t[i])
            return nn.Parameter(t)

        self.U = xavier(num_layers, num_experts, dim, low_rank)
        self.V = xavier(num_layers, num_experts, dim, low_rank)
        self.C = xavier(num_layers, num_experts, low_rank, low_rank)
        self.bias = nn.Parameter(torch.zeros(num_layers, dim))
        self.gate = linear(dim, num_experts, bias=False)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in range(self.U.shape[0]):
            h = torch.tanh(torch.einsum("bd,edr->ber", x, self.V[layer]))
            h = torch.tanh(torch.einsum("ber,esr->bes", h, self.C[layer]))
            experts = x0.unsqueeze(1) * (torch.einsum("bes,eds->bed", h, self.U[layer]) + self.bias[layer])
            gates = torch.softmax(self.gate(x), dim=1)
            x = torch.einsum("bed,be->bd", experts, gates) + x
        return x


# ---------------------------------------------------------------------------------------------
# FiBiNET


class SENet(nn.Module):
    """Squeeze-excitation over fields: z_f = mean_d v_fd, a = ReLU(W2 ReLU(W1 z)), v'_f = a_f v_f.

    Example::

        >>> SENet(6, reduction_ratio=3)(torch.randn(2, 6, 4)).shape
        torch.Size([2, 6, 4])
    """

    def __init__(self, num_fields: int, reduction_ratio: float = 3.0):
        super().__init__()
        reduced = max(1, int(num_fields / reduction_ratio))
        self.squeeze = linear(num_fields, reduced, bias=False)
        self.excite = linear(reduced, num_fields, bias=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.excite(torch.relu(self.squeeze(v.mean(dim=2)))))
        return v * a.unsqueeze(2)


class Bilinear(nn.Module):
    """FiBiNET's bilinear interaction: p_ij = (v_i W) * v_j for every pair i < j -> [B, P, D].

    ``kind`` picks how W is shared: ``field_all`` (one W), ``field_each`` (W_i per left field),
    ``field_interaction`` (W_ij per pair).

    Example::

        >>> Bilinear(4, 3, "field_each")(torch.randn(2, 4, 3)).shape
        torch.Size([2, 6, 3])
    """

    def __init__(self, num_fields: int, dim: int, kind: BilinearType = "field_interaction"):
        super().__init__()
        i, j = pair_indices(num_fields)
        self.register_buffer("left", i, persistent=False)
        self.register_buffer("right", j, persistent=False)
        counts = {"field_all": 1, "field_each": num_fields, "field_interaction": int(i.numel())}
        if kind not in counts:
            raise ValueError(f"bilinear type {kind!r} is not one of {'|'.join(counts)}")
        self.kind = kind
        n = counts[kind]
        self.weight = nn.Parameter(torch.empty(n, dim, dim))
        for k in range(n):
            nn.init.xavier_normal_(self.weight[k])

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        right = v.index_select(1, self.right)
        if self.kind == "field_interaction":
            left = torch.einsum("bpd,pde->bpe", v.index_select(1, self.left), self.weight)
        else:
            # Transform each field once (F products), then pick the pairs' left sides.
            if self.kind == "field_all":
                hidden = v @ self.weight[0]
            else:
                hidden = torch.einsum("bfd,fde->bfe", v, self.weight)
            left = hidden.index_select(1, self.left)
        return left * right


# ---------------------------------------------------------------------------------------------
# xDeepFM


class CIN(nn.Module):
    """xDeepFM's compressed interaction network, returning a logit [B].

    Layer k maps X_{k-1} [H_{k-1}, D] to X_k [H_k, D] with
        X_k[o, d] = sum_{h, m} W_k[o, h, m] X_0[h, d] X_{k-1}[m, d] + b_k[o],
    each X_k is sum-pooled over d, and a Linear maps the concatenated poolings to the logit.

    The (h, m) outer product is never built (it is [B, D, F * H], 400 MB at B=4096, F=H=39): one
    GEMM first contracts W_k with the longer of X_0 / X_{k-1} along its field axis, leaving
    [B, D, H_k, min(F, H_{k-1})], then a multiply-and-sum over the shorter axis finishes the layer.
    Rows are kept as [B, D, H] so that both steps run over a contiguous last axis.

    Example::

        >>> CIN(4, layer_sizes=(3, 2))(torch.randn(5, 4, 6)).shape
        torch.Size([5])
    """

    def __init__(self, num_fields: int, layer_sizes: Sequence[int] = (16, 16, 16)):
        super().__init__()
        sizes = [num_fields, *(int(s) for s in layer_sizes)]
        # A Linear over the flattened (h, m) axis: the kernel-size-1 Conv1d of the paper.
        self.layers = nn.ModuleList(linear(num_fields * a, b) for a, b in zip(sizes, sizes[1:]))
        self.fc = linear(sum(sizes[1:]), 1)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        B, Fn, D = v.shape
        x0 = v.transpose(1, 2)  # [B, D, F]
        x = x0
        pooled = []
        for lin in self.layers:
            O, H = lin.out_features, x.shape[2]
            W = lin.weight.reshape(O, Fn, H)  # the Linear's input index is h * H + m
            if H <= Fn:  # T[b, d, o, m] = sum_h W[o, h, m] X_0[b, d, h]
                T = torch.matmul(x0, W.permute(1, 0, 2).reshape(Fn, O * H)).view(B, D, O, H)
                x = (T * x.unsqueeze(2)).sum(3) + lin.bias
            else:  # T[b, d, o, h] = sum_m W[o, h, m] X_{k-1}[b, d, m]
                T = torch.matmul(x, W.permute(2, 0, 1).reshape(H, O * Fn)).view(B, D, O, Fn)
                x = (T * x0.unsqueeze(2)).sum(3) + lin.bias
            pooled.append(x.sum(dim=1))
        return self.fc(torch.cat(pooled, dim=1)).squeeze(1)


# ---------------------------------------------------------------------------------------------
# AutoInt


class SelfAttentionLayer(nn.Module):
    """AutoInt's interacting layer: multi-head self-attention over fields with a residual, ReLU.

        head_h = softmax(Q_h K_h^T / s) V_h   (s = sqrt(head_dim) if ``scale`` else 1)
        out    = ReLU(concat_h head_h + R x)  (R = identity when input and output widths match)

    Example::

        >>> SelfAttentionLayer(4, attention_dim=8, num_heads=2)(torch.randn(3, 5, 4)).shape
        torch.Size([3, 5, 8])
    """

    def __init__(
        self,
        input_dim: int,
        attention_dim: int = 8,
        num_heads: int = 1,
        residual: bool = True,
        scale: bool = False,
        dropout: float = 0.0,
        layer_norm: bool = False,
    ):
        super().__init__()
        if attention_dim % num_heads:
            raise ValueError(f"attention_dim={attention_dim} is not divisible by heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = attention_dim // num_heads
        self.qkv = linear(input_dim, 3 * attention_dim, bias=False)  # W_q, W_k, W_v stacked
        self.residual = residual
        self.res = linear(input_dim, attention_dim, bias=False) if residual and input_dim != attention_dim else None
        self.scale = 1.0 / math.sqrt(self.head_dim) if scale else 1.0
        self.dropout = dropout
        self.norm = nn.LayerNorm(attention_dim) if layer_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, Fn, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, Fn, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, scale=self.scale
        )
        out = out.transpose(1, 2).reshape(B, Fn, self.num_heads * self.head_dim)
        if self.residual:
            out = out + (self.res(x) if self.res is not None else x)
        if self.norm is not None:
            out = self.norm(out)
        return torch.relu(out)
