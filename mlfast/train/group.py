"""The trained object: P peer models and their embedding tables, as one ``nn.Module``.

``PeerGroup(sparse, dense, bags)`` looks up every field of every peer in one pass of its tables and
returns the peers' logits [B, P]. The same object is trained by an engine, validated by the
trainer, used by ``predict`` / ``eval`` / ``load_run`` and exported for serving; checkpoints store
its `snapshot` (the tables' updated rows and every peer's dense state).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from mlfast.models import CTRModel, FeatureSchema, PeerSpec, build_model
from mlfast.ops.backends import Backends
from mlfast.ops.sparse_optim import SparseOptimConfig
from mlfast.train.tables import EMBEDDING_INIT_STD, DenseTables, PeerTables

TABLE_KINDS = ("fused", "dense")


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands the peer a contiguous gradient [B].

    The gradient of a column of the stacked logits [B, P] is a strided view; the peer's output
    bias sums it over the batch, and a strided sum adds in another order than a contiguous one. So
    without this a peer trained in a group of P and the same peer trained alone would differ in
    the last bits of every bias gradient, which Adam's normalisation then magnifies."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        return z.view_as(z)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g.contiguous()


class PeerGroup(nn.Module):
    """Peers and their tables.

    Example::

        >>> from mlfast.models import FeatureSchema, parse_peers
        >>> g = PeerGroup.build(parse_peers("deepfm:mlp=8,dcn:mlp=8"), FeatureSchema((0, 10, 25)), embedding_dim=4,
        ...                     seeds=[1, 2]).eval()
        >>> g(torch.tensor([[1, 12], [0, 24]])).shape
        torch.Size([2, 2])
    """

    def __init__(self, specs: Sequence[PeerSpec], schema: FeatureSchema, tables: PeerTables | DenseTables,
                 models: Sequence[CTRModel]):
        super().__init__()
        self.specs = list(specs)
        self.schema = schema
        self.tables = tables
        self.peers = nn.ModuleList(models)
        if len(self.peers) != tables.num_peers:
            raise ValueError(f"{len(self.peers)} models for tables of {tables.num_peers} peers")
        for m, w in zip(self.peers, tables.widths):
            if m.embedding_width != w:
                raise ValueError(f"{m.name} reads rows of {m.embedding_width} columns, its table has {w}")

    @classmethod
    def build(cls, specs: Sequence[PeerSpec], schema: FeatureSchema, *, embedding_dim: int, seeds: Sequence[int],
              kind: str = "fused", optimizer: SparseOptimConfig | None = None, backends: Backends | None = None,
              device: str | torch.device | None = None, lr: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None, bounds_check: bool = False, sparse_grad: bool = False,
              init_std: float = EMBEDDING_INIT_STD, dense_touch: bool = False) -> "PeerGroup":
        """Models built from ``seeds`` (peer i's dense layers under ``torch.manual_seed(seeds[i])``,
        its table columns from the same seed), so a peer starts from the same weights whatever
        group or table kind it is in. ``kind``: "fused" (`PeerTables`) or "dense" (`DenseTables`,
        the plain-PyTorch reference)."""
        if kind not in TABLE_KINDS:
            raise ValueError(f"kind={kind!r}: expected one of {TABLE_KINDS}")
        specs = list(specs)
        if len(seeds) != len(specs):
            raise ValueError(f"{len(seeds)} seeds for {len(specs)} peers")
        models = []
        for spec, seed in zip(specs, seeds):
            torch.manual_seed(seed)
            models.append(build_model(spec, schema, embedding_dim))
        widths = [m.embedding_width for m in models]
        labels = [s.label or s.model for s in specs]
        if kind == "fused":
            tables: PeerTables | DenseTables = PeerTables(
                schema.table_rows, widths, labels=labels, seeds=seeds, init_std=init_std, optimizer=optimizer,
                backends=backends, device=device, lr=lr, out_dtype=out_dtype, bounds_check=bounds_check,
                dense_touch=dense_touch)
        else:
            tables = DenseTables(schema.table_rows, widths, labels=labels, seeds=seeds, init_std=init_std,
                                 device=device, sparse_grad=sparse_grad)
        return cls(specs, schema, tables, [m.to(device) for m in models])

    @property
    def labels(self) -> list[str]:
        return list(self.tables.labels)

    @property
    def num_peers(self) -> int:
        return len(self.peers)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor | None = None,
                bags: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> torch.Tensor:
        """Logits [B, P] (float32) for one-hot ids ``sparse`` [B, F], ``dense`` [B, num_dense] and
        one ``(offsets [B+1], values)`` pair per bag field of the schema."""
        if len(bags) != self.schema.num_bags:
            raise ValueError(f"the schema has {self.schema.num_bags} bag fields, got {len(bags)}")
        if sparse.ndim != 2 or sparse.shape[1] != self.schema.num_onehot:
            raise ValueError(f"sparse ids must be [B, {self.schema.num_onehot}], got {tuple(sparse.shape)}")
        embs = self.tables(sparse, bags)
        return torch.stack([_ContiguousGrad.apply(m(e, dense).float()) for m, e in zip(self.peers, embs)], dim=1)

    # state -------------------------------------------------------------------------------------
    def peer_states(self, peers: Sequence[int] | None = None) -> list[dict[str, torch.Tensor] | None]:
        """Each listed peer's dense ``state_dict`` as CPU copies (others None)."""
        keep = range(self.num_peers) if peers is None else set(peers)
        return [{k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()} if i in keep else None
                for i, m in enumerate(self.peers)]

    def snapshot(self, peers: Sequence[int] | None = None, optimizer_state: bool = False) -> dict[str, Any]:
        """Everything that defines the peers' function (``peers``: only those): the tables'
        updated rows and each peer's dense state. Small when little of the tables was touched."""
        return {"tables": self.tables.snapshot(peers, optimizer_state=optimizer_state),
                "peers": self.peer_states(peers)}

    @torch.no_grad()
    def restore(self, snap: dict[str, Any], peers: Sequence[int] | None = None) -> None:
        """Load a `snapshot` in place (``peers``: only those peers change)."""
        self.tables.restore(snap["tables"], peers)
        for i, (m, st) in enumerate(zip(self.peers, snap["peers"])):
            if (peers is None or i in peers) and st is not None:
                m.load_state_dict(st)

    @torch.no_grad()
    def load_peer(self, dst: int, snap: dict[str, Any], src: int = 0) -> None:
        """Peer ``dst`` from peer ``src`` of another group's snapshot (table columns and dense
        state; e.g. a solo run's model as one peer of a mutual group)."""
        self.tables.restore_peer(dst, snap["tables"], src)
        self.peers[dst].load_state_dict(snap["peers"][src])
