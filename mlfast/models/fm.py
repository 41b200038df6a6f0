"""Factorization machine (Rendle, 2010): logit = b + sum_f w_f + sum_{i<j} <v_i, v_j> (+ u . dense)."""
from __future__ import annotations

import torch

from mlfast.models.base import CTRModel, FeatureSchema, register
from mlfast.models.blocks import LinearTerm, fm_interaction


@register
class FM(CTRModel):
    """Factorization machine: first-order term plus all pairwise inner products of field vectors.

    Example::

        >>> m = FM(FeatureSchema((0, 5, 9)), embedding_dim=4)
        >>> m(torch.randn(2, 2, m.embedding_width)).shape   # rows looked up for 2 samples x 2 fields
        torch.Size([2])
    """

    name = "fm"
    uses_linear = True

    def __init__(self, schema: FeatureSchema, embedding_dim: int = 16):
        super().__init__(schema, embedding_dim)
        self.linear = LinearTerm(schema.num_dense)

    def forward(self, emb: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        v, w = self.split_embedded(emb)
        return self.linear(w, self.dense_input(dense)) + fm_interaction(v)
