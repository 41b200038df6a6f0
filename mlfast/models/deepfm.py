"""DeepFM (Guo et al., 2017): an FM and an MLP over the same embeddings, logits summed."""
from __future__ import annotations

import torch

from mlfast.models.base import CTRModel, FeatureSchema, register
from mlfast.models.blocks import MLP, LinearTerm, concat_dense, fm_interaction


@register
class DeepFM(CTRModel):
    """logit = b + sum_f w_f + sum_{i<j} <v_i, v_j> + MLP([v_1..v_F, dense]).

    Example::

        >>> m = DeepFM(FeatureSchema((0, 5, 9)), embedding_dim=4, mlp=(8, 8)).eval()
        >>> m(torch.randn(2, 2, m.embedding_width)).shape   # rows looked up for 2 samples x 2 fields
        torch.Size([2])
    """

    name = "deepfm"
    uses_linear = True

    def __init__(
        self,
        schema: FeatureSchema,
        embedding_dim: int = 16,
        mlp: tuple[int, ...] = (400, 400, 400),
        dropout: float = 0.2,
        batch_norm: bool = True,
    ):
        super().__init__(schema, embedding_dim)
        self.linear = LinearTerm()  # dense features go to the MLP
        in_dim = schema.num_fields * embedding_dim + schema.num_dense
        self.mlp = MLP(in_dim, mlp, output_dim=1, dropout=dropout, batch_norm=batch_norm)

    def forward(self, emb: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        v, w = self.split_embedded(emb)
        deep = self.mlp(concat_dense(v.flatten(1), self.dense_input(dense))).squeeze(1)
        return self.linear(w) + fm_interaction(v) + deep
