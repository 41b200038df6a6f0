"""Deep & Cross Network (Wang et al., 2017): a cross network and an MLP side by side."""
from __future__ import annotations

import torch

from mlfast.models.base import CTRModel, FeatureSchema, register
from mlfast.models.blocks import MLP, CrossNet, concat_dense, linear


@register
class DCN(CTRModel):
    """x_0 = [v_1..v_F, dense]; logit = fc([CrossNet(x_0), MLP(x_0)]) with ``layers`` cross layers.

    ``mlp=()`` drops the deep branch (cross network only).

    Example::

        >>> m = DCN(FeatureSchema((0, 5, 9)), embedding_dim=4, layers=2, mlp=(8,)).eval()
        >>> m(torch.randn(2, 2, m.embedding_width)).shape   # rows looked up for 2 samples x 2 fields
        torch.Size([2])
    """

    name = "dcn"

    def __init__(
        self,
        schema: FeatureSchema,
        embedding_dim: int = 16,
        layers: int = 3,
        mlp: tuple[int, ...] = (400, 400, 400),
        dropout: float = 0.2,
        batch_norm: bool = True,
    ):
        super().__init__(schema, embedding_dim)
        if layers < 0:
            raise ValueError(f"dcn: option layers={layers!r} must be >= 0")
        in_dim = schema.num_fields * embedding_dim + schema.num_dense
        self.cross = CrossNet(in_dim, layers)
        self.mlp = MLP(in_dim, mlp, output_dim=None, dropout=dropout, batch_norm=batch_norm) if mlp else None
        self.fc = linear(in_dim + (self.mlp.output_dim if self.mlp is not None else 0), 1)

    def forward(self, emb: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        v, _ = self.split_embedded(emb)
        x0 = concat_dense(v.flatten(1), self.dense_input(dense))
        out = self.cross(x0)
        if self.mlp is not None:
            out = torch.cat([out, self.mlp(x0)], dim=1)
        return self.fc(out).squeeze(1)
