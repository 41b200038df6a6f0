"""xDeepFM (Lian et al., 2018): linear term + compressed interaction network + MLP."""
from __future__ import annotations

import torch

from mlfast.models.base import CTRModel, FeatureSchema, register
from mlfast.models.blocks import CIN, MLP, LinearTerm, check_positive, concat_dense


@register
class XDeepFM(CTRModel):
    """logit = sum_f w_f + CIN(v) + MLP([v_1..v_F, dense]); ``cin`` gives the CIN layer sizes.

    As in FuxiCTR the first-order term has no bias of its own: the CIN and MLP outputs have one.

    Example::

        >>> m = XDeepFM(FeatureSchema((0, 5, 9)), embedding_dim=4, cin=(3, 3), mlp=(8,)).eval()
        >>> m(torch.randn(2, 2, m.embedding_width)).shape   # rows looked up for 2 samples x 2 fields
        torch.Size([2])
    """

    name = "xdeepfm"
    uses_linear = True

    def __init__(
        self,
        schema: FeatureSchema,
        embedding_dim: int = 16,
        cin: tuple[int, ...] = (16, 16, 16),
        mlp: tuple[int, ...] = (400, 400, 400),
        dropout: float = 0.2,
        batch_norm: bool = True,
    ):
        super().__init__(schema, embedding_dim)
        if not cin:
            raise ValueError("xdeepfm: option cin=() needs at least one layer size")
        check_positive("xdeepfm", cin=cin)
        self.linear = LinearTerm(bias=False)
        self.cin = CIN(schema.num_fields, cin)
        in_dim = schema.num_fields * embedding_dim + schema.num_dense
        self.mlp = MLP(in_dim, mlp, output_dim=1, dropout=dropout, batch_norm=batch_norm)

    def forward(self, emb: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        v, w = self.split_embedded(emb)
        deep = self.mlp(concat_dense(v.flatten(1), self.dense_input(dense))).squeeze(1)
        return self.linear(w) + self.cin(v) + deep
