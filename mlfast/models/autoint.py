"""AutoInt+ (Song et al., 2019): stacked multi-head self-attention over fields, plus an MLP."""
from __future__ import annotations

import torch
from torch import nn

from mlfast.models.base import CTRModel, FeatureSchema, register
from mlfast.models.blocks import MLP, SelfAttentionLayer, check_dropout, check_positive, concat_dense, linear


@register
class AutoInt(CTRModel):
    """h = Attn_L(...Attn_1(v)) ([B, F, attention_dim]); logit = fc(flatten(h)) + MLP([v, dense]).

    Defaults as FuxiCTR: 2 attention layers, 1 head, attention_dim 8, residual on, no 1/sqrt(d)
    scaling. ``mlp=()`` leaves a single linear layer over [v, dense] in place of the MLP.
    Aliases: ``autoint+``, ``autointplus``.

    Example::

        >>> m = AutoInt(FeatureSchema((0, 5, 9)), embedding_dim=4, mlp=(8,)).eval()
        >>> m(torch.randn(2, 2, m.embedding_width)).shape   # rows looked up for 2 samples x 2 fields
        torch.Size([2])
    """

    name = "autoint"

    def __init__(
        self,
        schema: FeatureSchema,
        embedding_dim: int = 16,
        attention_layers: int = 2,
        heads: int = 1,
        attention_dim: int = 8,
        residual: bool = True,
        scale: bool = False,
        layer_norm: bool = False,
        attention_dropout: float = 0.0,
        mlp: tuple[int, ...] = (400, 400, 400),
        dropout: float = 0.2,
        batch_norm: bool = True,
    ):
        super().__init__(schema, embedding_dim)
        check_positive("autoint", heads=heads, attention_dim=attention_dim)
        if attention_layers < 0:
            raise ValueError(f"autoint: option attention_layers={attention_layers!r} must be >= 0")
        check_dropout("autoint", "attention_dropout", attention_dropout)
        if attention_dim % heads:
            raise ValueError(f"autoint: option attention_dim={attention_dim} is not divisible by heads={heads}")
        dims = [embedding_dim] + [attention_dim] * attention_layers
        self.attention = nn.Sequential(*(
            SelfAttentionLayer(a, b, heads, residual, scale, attention_dropout, layer_norm)
            for a, b in zip(dims, dims[1:])
        ))
        self.fc = linear(schema.num_fields * dims[-1], 1)
        in_dim = schema.num_fields * embedding_dim + schema.num_dense
        self.mlp = MLP(in_dim, mlp, output_dim=1, dropout=dropout, batch_norm=batch_norm)

    def forward(self, emb: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        v, _ = self.split_embedded(emb)
        attn = self.fc(self.attention(v).flatten(1)).squeeze(1)
        return attn + self.mlp(concat_dense(v.flatten(1), self.dense_input(dense))).squeeze(1)
