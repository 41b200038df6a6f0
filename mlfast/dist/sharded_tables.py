"""Row-sharded embedding tables: each of D ranks owns a slice of every peer's rows and their
optimizer state, the way TorchRec shards a table row-wise, so table capacity grows with D.

Sharding: global row r lives on shard ``r % D`` at local row ``r // D``. Round-robin rather than
TorchRec's contiguous blocks because all fields share one flat table here: blocks would put whole
fields on one rank (the small, hot integer fields together), round-robin spreads every field's
hashed ids evenly.

A lookup of ids [B, F] (+ bags) on shard d (every rank of the data group at once):

    1. the batch's distinct ids U, sorted, grouped by owner (``owner = id % D``);
    2. all-to-all of the counts, then of the ids (int32 when the table has < 2^31 rows);
    3. each owner initialises rows it has never seen (lazy CPU tables), gathers the requested rows
       [n, R] (all of its peers' columns) and sends them back (all-to-all);
    4. the requester looks its batch up in those U rows with the ordinary lookup op
       (``mlfast.ops.embedding.lookup``: one-hot and bags, any backend) through `_FetchedRows`.

Backward: the lookup op hands the rows' gradients to ``_FetchedRows.apply_gradients``, which sums
them per distinct id (one [U, R] block), sends each block row to its owner (all-to-all) and the
owner runs the fused sparse optimizer step on its own rows (``PeerTables.apply_gradients``: the
duplicates from different requesters are summed there, L2 applied once per distinct row). Every
shard steps once per global step, so the Adam step counter is the global step everywhere. Bytes
per step and rank: ids 4 U, rows and gradients 4 U R each (U: the local batch's distinct ids).

Initialisation is keyed by the *global* row, so a shard's rows start exactly where a single
process's do, and a snapshot of shard d (local rows ``l``) is a slice of the single-process table
at rows ``l * D + d`` (``mlfast.dist.checkpoint`` merges them).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from mlfast.dist.comm import Comm
from mlfast.ops.embedding import Bags, TableLayout, check_bags, lookup
from mlfast.train.tables import PeerTables


def local_rows(global_rows: int, shard: int, shards: int) -> int:
    """Rows of shard ``shard`` (global rows ``shard, shard + D, ...``); at least one, so a shard of
    a table smaller than D still is a valid table (its extra row is never looked up)."""
    return max(1, (global_rows - shard + shards - 1) // shards)


class ShardedPeerTables(PeerTables):
    """Shard ``shard`` of ``shards`` of P peers' interleaved tables (a `PeerTables` of the local
    rows) whose ``forward`` takes *global* ids and fetches rows from their owners through
    ``comm``. With ``shards == 1`` it is a `PeerTables` of the whole table.

    ``dirty`` marks local rows updated since `take_dirty` last ran (what a stale copy of these
    peers needs refreshed, ``--exchange-every``).
    """

    def __init__(self, global_rows: int, widths: Sequence[int], *, shard: int, shards: int, comm: Comm | None,
                 **kwargs: Any):
        if not 0 <= shard < shards:
            raise ValueError(f"shard {shard} of {shards}")
        if shards > 1 and (comm is None or comm.size != shards):
            raise ValueError(f"{shards} shards need a group of {shards} ranks, got {comm}")
        # set before PeerTables.__init__: an eager table initialises its rows there (_init_rows)
        object.__setattr__(self, "shard", int(shard))
        object.__setattr__(self, "shards", int(shards))
        object.__setattr__(self, "global_rows", int(global_rows))
        super().__init__(local_rows(global_rows, shard, shards), widths, **kwargs)
        self.comm = comm
        self.register_buffer("dirty", torch.zeros(self.num_rows, dtype=torch.bool, device=self.weight.device),
                             persistent=False)

    # sharding ---------------------------------------------------------------------------------
    def to_global(self, rows: torch.Tensor | np.ndarray):
        return rows * self.shards + self.shard

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "shard": self.shard, "shards": self.shards, "global_rows": self.global_rows}

    def _row_keys(self, rows: np.ndarray) -> np.ndarray:
        """The counter RNG is keyed by the global row: a row starts the same on any shard count."""
        return rows * self.shards + self.shard

    # lookup ----------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, bags: Bags = ()) -> list[torch.Tensor]:
        if self.shards == 1:
            return super().forward(ids, bags)
        check_bags(ids, bags)
        D = self.shards
        B, F = ids.shape
        flat = torch.cat([ids.reshape(-1).long(), *(v.long() for _, v in bags)]) if bags else ids.reshape(-1).long()
        uniq, inv = torch.unique(flat, return_inverse=True)  # sorted: grouped by owner after a stable sort
        owner = uniq % D
        order = torch.argsort(owner, stable=True)
        send_ids = uniq.index_select(0, order)
        send_counts = torch.bincount(owner, minlength=D)
        recv_counts = self.comm.exchange_counts(send_counts, "ids")
        sc, rc = send_counts.tolist(), recv_counts.tolist()  # the host sync every uneven all-to-all needs
        wire = torch.int32 if self.global_rows < 2**31 else torch.int64
        recv_ids = self.comm.all_to_all(send_ids.to(wire), sc, rc, "ids").long()
        local = torch.div(recv_ids, D, rounding_mode="floor")
        if self._live is not None:
            self.materialize(local)
        fetched = self.comm.all_to_all(self.weight.index_select(0, local), rc, sc, "rows")
        rows = torch.empty_like(fetched)
        rows[order] = fetched  # back to the sorted distinct ids
        table = _FetchedRows(self, rows, order, sc, rc, local)
        local_ids = inv[:B * F].view(B, F)
        local_bags, at = [], B * F
        for o, v in bags:
            local_bags.append((o, inv[at:at + v.numel()]))
            at += v.numel()
        return lookup(table, local_ids, local_bags, requires_grad=torch.is_grad_enabled() and self.state is not None)

    @torch.no_grad()
    def apply_gradients(self, ids: torch.Tensor, grads: Sequence[torch.Tensor]) -> None:
        """The optimizer step on local rows ``ids`` (duplicates summed), marking them dirty."""
        super().apply_gradients(ids, grads)
        self.dirty.index_fill_(0, ids.reshape(-1).long(), True)

    # stale copies ----------------------------------------------------------------------------
    @torch.no_grad()
    def take_dirty(self, peers: Sequence[int]) -> dict[str, Any]:
        """The local rows updated since the last call and those peers' columns of them
        ({"rows": [T], p: [T, W_p]}); clears the marks."""
        rows = torch.nonzero(self.dirty).flatten()
        w = self.weight.index_select(0, rows)
        self.dirty.zero_()
        return {"rows": rows.cpu(), **{int(p): w[:, self.layout.columns(p)].cpu() for p in peers}}

    @torch.no_grad()
    def put_rows(self, p: int, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite peer ``p``'s columns of local ``rows`` (a stale copy being refreshed)."""
        if rows.numel() == 0:
            return
        idx = rows.to(self.weight.device).long()
        if self._live is not None:
            self.materialize(idx.cpu())
        self.weight[idx, self.layout.columns(p)] = values.to(self.weight)
        self.updated[idx] = True


class _FetchedRows:
    """The distinct rows a lookup fetched [U, R], seen by the lookup op as a table
    (`mlfast.ops.embedding.LookupTable`); its gradients go back to the rows' owners."""

    def __init__(self, owner: ShardedPeerTables, weight: torch.Tensor, order: torch.Tensor, send_counts: list[int],
                 recv_counts: list[int], recv_local: torch.Tensor):
        self.owner = owner
        self.weight = weight
        self.layout: TableLayout = owner.layout
        self.lookup_backend = owner.lookup_backend
        self.out_dtype = owner.out_dtype
        self.bounds_check = False
        self.anchor = owner.anchor
        self.order, self.send_counts, self.recv_counts, self.recv_local = order, send_counts, recv_counts, recv_local

    @torch.no_grad()
    def apply_gradients(self, ids: torch.Tensor, grads: Sequence[torch.Tensor]) -> None:
        layout = self.layout
        N = ids.numel()
        flat = torch.zeros(N, layout.row_width, dtype=torch.float32, device=self.weight.device)
        for p, (g, w) in enumerate(zip(grads, layout.widths)):
            flat[:, layout.columns(p)] = g.reshape(N, w)
        per_row = torch.zeros_like(self.weight, dtype=torch.float32)
        per_row.index_add_(0, ids.reshape(-1).long(), flat)  # one gradient per distinct id
        recv = self.owner.comm.all_to_all(per_row.index_select(0, self.order), self.send_counts, self.recv_counts,
                                          "grads")
        self.owner.apply_gradients(self.recv_local, [recv[:, layout.columns(p)] for p in range(layout.num_peers)])
