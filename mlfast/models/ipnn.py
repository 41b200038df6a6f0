"""IPNN (Qu et al., 2016), as in FuxiCTR: an MLP over the embeddings and all pairwise inner products."""
from __future__ import annotations

import torch

from mlfast.models.base import CTRModel, FeatureSchema, register
from mlfast.models.blocks import MLP, InnerProduct, concat_dense


@register
class IPNN(CTRModel):
    """logit = MLP([v_1..v_F, <v_i, v_j> for i < j, dense]). Alias: ``pnn``.

    Example::

        >>> m = IPNN(FeatureSchema((0, 5, 9, 12)), embedding_dim=4, mlp=(8,)).eval()
        >>> m(torch.randn(1, 3, m.embedding_width)).shape   # rows looked up for 1 sample x 3 fields
        torch.Size([1])
    """

    name = "ipnn"

    def __init__(
        self,
        schema: FeatureSchema,
        embedding_dim: int = 16,
        mlp: tuple[int, ...] = (400, 400, 400),
        dropout: float = 0.2,
        batch_norm: bool = True,
    ):
        super().__init__(schema, embedding_dim)
        self.product = InnerProduct(schema.num_fields)
        in_dim = schema.num_fields * embedding_dim + self.product.num_pairs + schema.num_dense
        self.mlp = MLP(in_dim, mlp, output_dim=1, dropout=dropout, batch_norm=batch_norm)

    def forward(self, emb: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        v, _ = self.split_embedded(emb)
        x = torch.cat([v.flatten(1), self.product(v)], dim=1)
        return self.mlp(concat_dense(x, self.dense_input(dense))).squeeze(1)
