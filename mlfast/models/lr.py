"""Logistic regression: logit = b + sum_f w_f (+ u . dense)."""
from __future__ import annotations

import torch

from mlfast.models.base import CTRModel, FeatureSchema, register
from mlfast.models.blocks import LinearTerm


@register
class LR(CTRModel):
    """Logistic regression over one-hot features: each table row is just its weight w (width 1).

    ``embedding_dim`` is accepted (peers share one) but unused: LR has no embedding vectors.

    Example::

        >>> m = LR(FeatureSchema((0, 5, 9)))
        >>> m(torch.randn(2, 2, m.embedding_width)).shape   # rows looked up for 2 samples x 2 fields
        torch.Size([2])
    """

    name = "lr"
    uses_linear = True
    uses_vectors = False

    def __init__(self, schema: FeatureSchema, embedding_dim: int = 16):
        super().__init__(schema, embedding_dim)
        self.linear = LinearTerm(schema.num_dense)

    def forward(self, emb: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        _, w = self.split_embedded(emb)
        return self.linear(w, self.dense_input(dense))
