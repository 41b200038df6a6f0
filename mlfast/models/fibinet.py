"""FiBiNET (Huang et al., 2019): SENET field re-weighting and bilinear interactions feeding an MLP."""
from __future__ import annotations

import torch

from mlfast.models.base import CTRModel, FeatureSchema, register
from mlfast.models.blocks import MLP, Bilinear, BilinearType, LinearTerm, SENet, concat_dense


@register
class FiBiNET(CTRModel):
    """p = Bilinear_1(v), q = Bilinear_2(SENET(v)) (each [B, F(F-1)/2, D]);
    logit = sum_f w_f + MLP([p, q, dense]).

    As in FuxiCTR the first-order term has no bias of its own: the MLP's output layer has one.

    Example::

        >>> m = FiBiNET(FeatureSchema((0, 5, 9, 12)), embedding_dim=4, mlp=(8,)).eval()
        >>> m(torch.randn(1, 3, m.embedding_width)).shape   # rows looked up for 1 sample x 3 fields
        torch.Size([1])
    """

    name = "fibinet"
    uses_linear = True

    def __init__(
        self,
        schema: FeatureSchema,
        embedding_dim: int = 16,
        bilinear: BilinearType = "field_interaction",
        reduction_ratio: float = 3.0,
        mlp: tuple[int, ...] = (400, 400, 400),
        dropout: float = 0.2,
        batch_norm: bool = True,
    ):
        super().__init__(schema, embedding_dim)
        if bilinear not in ("field_all", "field_each", "field_interaction"):
            raise ValueError(f"fibinet: option bilinear={bilinear!r} is not one of "
                             "field_all|field_each|field_interaction")
        if not reduction_ratio > 0:
            raise ValueError(f"fibinet: option reduction_ratio={reduction_ratio!r} must be > 0")
        Fn = schema.num_fields
        self.linear = LinearTerm(bias=False)
        self.senet = SENet(Fn, reduction_ratio)
        self.bilinear_p = Bilinear(Fn, embedding_dim, bilinear)
        self.bilinear_q = Bilinear(Fn, embedding_dim, bilinear)
        in_dim = Fn * (Fn - 1) * embedding_dim + schema.num_dense
        self.mlp = MLP(in_dim, mlp, output_dim=1, dropout=dropout, batch_norm=batch_norm)

    def forward(self, emb: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        v, w = self.split_embedded(emb)
        pq = torch.cat([self.bilinear_p(v).flatten(1), self.bilinear_q(self.senet(v)).flatten(1)], dim=1)
        return self.linear(w) + self.mlp(concat_dense(pq, self.dense_input(dense))).squeeze(1)
