"""DCN-V2 (Wang et al., 2021): full-rank or low-rank-mixture cross layers, stacked or parallel to an MLP."""
from __future__ import annotations

from typing import Literal

import torch

from mlfast.models.base import CTRModel, FeatureSchema, register
from mlfast.models.blocks import MLP, CrossNetMix, CrossNetV2, check_positive, concat_dense, linear

Structure = Literal["parallel", "stacked", "stacked_parallel", "crossnet_only"]


@register
class DCNv2(CTRModel):
    """x_0 = [v_1..v_F, dense], c = Cross(x_0) with ``layers`` layers, then by ``structure``:

    * ``parallel`` (default): logit = fc([c, MLP(x_0)])
    * ``stacked``:            logit = fc(MLP(c))
    * ``stacked_parallel``:   logit = fc([MLP_s(c), MLP_p(x_0)])
    * ``crossnet_only``:      logit = fc(c)

    Cross layers are full rank (x_{l+1} = x_0 * (W_l x_l + b_l) + x_l) unless
    ``low_rank_mixture=true``: then ``experts`` low-rank (``low_rank``) experts with a softmax gate.
    Alias: ``dcn_v2``.

    Example::

        >>> m = DCNv2(FeatureSchema((0, 5, 9)), embedding_dim=4, mlp=(8,), low_rank_mixture=True,
        ...           low_rank=2, experts=2).eval()
        >>> m(torch.randn(2, 2, m.embedding_width)).shape   # rows looked up for 2 samples x 2 fields
        torch.Size([2])
    """

    name = "dcnv2"

    def __init__(
        self,
        schema: FeatureSchema,
        embedding_dim: int = 16,
        layers: int = 3,
        structure: Structure = "parallel",
        low_rank_mixture: bool = False,
        low_rank: int = 32,
        experts: int = 4,
        mlp: tuple[int, ...] = (400, 400, 400),
        dropout: float = 0.2,
        batch_norm: bool = True,
    ):
        super().__init__(schema, embedding_dim)
        if layers < 0:
            raise ValueError(f"dcnv2: option layers={layers!r} must be >= 0")
        if structure not in ("parallel", "stacked", "stacked_parallel", "crossnet_only"):
            raise ValueError(f"dcnv2: option structure={structure!r} is not one of "
                             "parallel|stacked|stacked_parallel|crossnet_only")
        check_positive("dcnv2", low_rank=low_rank, experts=experts)
        self.structure = structure
        in_dim = schema.num_fields * embedding_dim + schema.num_dense
        self.cross = (CrossNetMix(in_dim, layers, low_rank, experts) if low_rank_mixture
                      else CrossNetV2(in_dim, layers))

        def deep() -> MLP:
            return MLP(in_dim, mlp, output_dim=None, dropout=dropout, batch_norm=batch_norm)

        self.stacked_mlp = deep() if structure in ("stacked", "stacked_parallel") else None
        self.parallel_mlp = deep() if structure in ("parallel", "stacked_parallel") else None
        fc_dim = {
            "crossnet_only": in_dim,
            "stacked": self.stacked_mlp.output_dim if self.stacked_mlp else 0,
            "parallel": in_dim + (self.parallel_mlp.output_dim if self.parallel_mlp else 0),
            "stacked_parallel": sum(m.output_dim for m in (self.stacked_mlp, self.parallel_mlp) if m),
        }[structure]
        self.fc = linear(fc_dim, 1)

    def forward(self, emb: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        v, _ = self.split_embedded(emb)
        x0 = concat_dense(v.flatten(1), self.dense_input(dense))
        c = self.cross(x0)
        if self.stacked_mlp is not None:
            c = self.stacked_mlp(c)
        if self.parallel_mlp is not None:
            c = torch.cat([c, self.parallel_mlp(x0)], dim=1)
        return self.fc(c).squeeze(1)
