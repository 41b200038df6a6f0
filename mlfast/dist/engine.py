"""The distributed training step: `DistEngine`, an `Engine` (``mlfast.train.engine``) for one rank.

A rank holds its peer group's peers (all peers under ``--parallel data``) as a `PeerGroup` whose
tables are row-sharded over its data group (`ShardedPeerTables`), and takes its data shard's rows
[lo, hi) of each global batch of B rows (`ShardBatch`). One step:

1. forward of its peers on its b = hi - lo rows (embedding rows fetched from their owners;
   BatchNorm over the data group; dropout masks of rows lo.. as in one process);
2. the logits of every peer: with G > 1 peer groups, an all-gather over the peer group (B floats
   per peer and step), or, with ``--exchange-every K > 1``, a forward of this rank's stale copies of
   the other peers (no per-step traffic; copies refreshed every K steps);
3. the full mutual loss on those logits, the other peers' as constants, times b / B: its gradient
   is exactly the single process's for this rank's peers and rows, for every mutual kind (symkl
   included: the loss is the same function; only the variables differ);
4. backward: the tables' gradients go to their owners, each shard runs the fused sparse
   optimizer step on its rows; the dense gradients are summed over the data group (one
   all-reduce of a flat buffer, as DDP does, without its overlap) and fused Adam steps.

Returns the global [1 + P] losses (summed over the data group), the same on every rank.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from mlfast.dist.launch import DistContext
from mlfast.dist.layers import convert_for_data_parallel
from mlfast.dist.sharded_tables import ShardedPeerTables
from mlfast.io.batches import Batch
from mlfast.models import FeatureSchema, PeerSpec, build_model
from mlfast.ops.backends import Backends, select_backends
from mlfast.ops.dense_adam import FusedAdam
from mlfast.ops.mutual_loss import fused_mutual_loss
from mlfast.ops.sparse_optim import SparseOptimConfig
from mlfast.train.config import TrainConfig
from mlfast.train.engine import EngineBase, losses_bad
from mlfast.train.group import PeerGroup


def build_shard_group(specs: Sequence[PeerSpec], peers: Sequence[int], schema: FeatureSchema, cfg: TrainConfig,
                      device: torch.device, seeds: Sequence[int], ctx: DistContext, *, train: bool = True,
                      lr: torch.Tensor | None = None, backends: Backends | None = None,
                      dense_touch: bool = False) -> PeerGroup:
    """The `PeerGroup` of ``peers`` (global indices) on this rank: each model built as
    ``PeerGroup.build`` builds it (same seed, same initial weights), the tables sharded over the
    data group. ``train=False``: inference-only tables, no model conversion (stale copies)."""
    sub = [specs[i] for i in peers]
    sub_seeds = [int(seeds[i]) for i in peers]
    models = []
    for spec, seed in zip(sub, sub_seeds):
        torch.manual_seed(seed)
        models.append(build_model(spec, schema, cfg.embedding_dim))
    opt = SparseOptimConfig(kind=cfg.sparse_optimizer, lr=cfg.lr, weight_decay=cfg.embedding_l2) if train else None
    topo = ctx.topology
    tables = ShardedPeerTables(schema.table_rows, [m.embedding_width for m in models], shard=topo.shard,
                               shards=topo.shards, comm=ctx.data, labels=[s.label or s.model for s in sub],
                               seeds=sub_seeds, optimizer=opt, backends=backends, device=device,
                               lr=lr if train else None, dense_touch=dense_touch)
    return PeerGroup(sub, schema, tables, [m.to(device) for m in models])


class DistEngine(EngineBase):
    """One rank's share of a mutual step (see the module docstring); follows the `Engine` protocol.

    ``group``: this rank's peers (``own_peers``, global indices, contiguous). ``step_index`` is
    set by the trainer before each step (it decides when stale copies are refreshed).
    """

    name = "dist"

    def __init__(self, ctx: DistContext, specs: Sequence[PeerSpec], schema: FeatureSchema, cfg: TrainConfig,
                 device: torch.device, seeds: Sequence[int], lr: float, backends: Backends | None = None,
                 dense_touch: bool = False):
        self.ctx = ctx
        self.topo = ctx.topology
        self.num_all = len(specs)
        if self.topo.num_peers != self.num_all:
            raise ValueError(f"the process layout was made for {self.topo.num_peers} peers, this group has "
                             f"{self.num_all}")
        self.own = self.topo.own_peers
        backends = backends or select_backends(cfg.kernels, device, cfg.deterministic)
        lr_t = torch.full((1,), float(lr), dtype=torch.float32, device=device)
        group = build_shard_group(specs, self.own, schema, cfg, device, seeds, ctx, lr=lr_t, backends=backends,
                                  dense_touch=dense_touch)
        super().__init__(group, cfg, device, lr, lr_t)
        self.backends = backends
        self.dropouts = convert_for_data_parallel(group, ctx.data) if ctx.data.size > 1 else []
        self.dense_params = list(group.peers.parameters())
        self.optimizer = FusedAdam(self.dense_params, lr=self.lr, weight_decay=cfg.net_l2)
        self.exchange_every = int(cfg.exchange_every)
        self.others = [i for i in range(self.num_all) if i not in self.own]
        self.copies: PeerGroup | None = None
        if self.topo.groups > 1 and self.exchange_every > 1:
            self.copies = build_shard_group(specs, self.others, schema, cfg, device, seeds, ctx, train=False,
                                            backends=backends).eval()
        self.last_refresh = -1
        self.step_index = 0

    # Engine protocol ---------------------------------------------------------------------------
    def train_step(self, batch: Batch, guard: float | None = None) -> torch.Tensor:
        b = len(batch)
        B = int(getattr(batch, "global_size", 0) or b)
        for m in self.dropouts:
            m.row_offset = int(getattr(batch, "offset", 0))
        if self.copies is not None:
            self.refresh_copies()
        own = self.logits(batch)
        full = self.all_logits(own, batch)
        if b:
            scale = b / B
            loss = fused_mutual_loss(full, batch.labels, self.alpha, self.cfg.mutual, backend=self.backends.loss)
            loss = loss * scale if scale != 1 else loss
            out = torch.cat([loss.detach().reshape(1), self.peer_bce(full, batch.labels) * scale])
        else:  # no rows of this batch here: still take part in every collective of the step
            loss = own.sum() * 0.0
            out = torch.zeros(1 + self.num_all, dtype=torch.float32, device=self.device)
        out = self.ctx.data.all_reduce(out, "losses")
        if losses_bad(out, guard):
            return out
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()  # the embedding rows are updated here, on their owners
        self.all_reduce_dense()
        self.optimizer.step()
        return out

    def optimizer_state(self) -> dict:
        return {"dense": self.optimizer.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["dense"])
        for g in self.optimizer.param_groups:  # the loaded state replaces the shared lr tensor
            g["lr"] = self.lr

    # pieces ------------------------------------------------------------------------------------
    def all_logits(self, own: torch.Tensor, batch: Batch) -> torch.Tensor:
        """[b, P]: this rank's peers' logits (with gradient) among the others' (constants)."""
        topo = self.topo
        if topo.groups == 1:
            return own
        lo = self.own[0]
        if self.copies is not None:
            with torch.no_grad(), self.autocast():
                others = self.copies(batch.sparse, batch.dense, batch.bags)
            return torch.cat([others[:, :lo], own, others[:, lo:]], 1)
        width = topo.max_peers_per_group
        mine = own.detach()
        if mine.shape[1] < width:
            mine = F.pad(mine, (0, width - mine.shape[1]))
        every = self.ctx.peer.all_gather(mine, "logits")  # [G, b, width]
        parts = [own if g == topo.group else every[g, :, :len(topo.peers_of(g))] for g in range(topo.groups)]
        return torch.cat(parts, 1)

    @torch.no_grad()
    def all_reduce_dense(self) -> None:
        """Sum the dense gradients over the data group (each shard's loss is already scaled by b / B)."""
        if self.ctx.data.size == 1:
            return
        for p in self.dense_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in self.dense_params])
        self.ctx.data.all_reduce(flat, "dense")
        at = 0
        for p in self.dense_params:
            n = p.numel()
            p.grad.copy_(flat[at:at + n].view_as(p.grad))
            at += n

    # stale copies of the other peers (--exchange-every K > 1) ------------------------------------
    @torch.no_grad()
    def refresh_copies(self, force: bool = False) -> None:
        """Every K steps: send this rank's peers (dense state, table rows updated since the last
        refresh, its own shard) to the peer group and load theirs into the copies."""
        s = self.step_index
        if self.copies is None or (not force and (s % self.exchange_every or self.last_refresh == s)):
            return
        tables: ShardedPeerTables = self.group.tables
        delta = tables.take_dirty(range(len(self.own)))
        payload = {"peers": {gi: st for gi, st in zip(self.own, self.group.peer_states())},
                   "rows": delta["rows"], "cols": {gi: delta[li] for li, gi in enumerate(self.own)}}
        ctab: ShardedPeerTables = self.copies.tables
        for g, got in enumerate(self.ctx.peer.all_gather_object(payload, "copies")):
            if g == self.topo.group:
                continue
            for gi, st in got["peers"].items():
                li = self.others.index(gi)
                self.copies.peers[li].load_state_dict(st)
                ctab.put_rows(li, got["rows"], got["cols"][gi])
        self.last_refresh = s

    def exchange_state(self) -> dict[str, Any] | None:
        """What a checkpoint needs to resume the copies exactly (None without copies)."""
        if self.copies is None:
            return None
        return {"copies": self.copies.snapshot(), "last_refresh": self.last_refresh,
                "dirty": torch.nonzero(self.group.tables.dirty).flatten().cpu()}

    @torch.no_grad()
    def load_exchange_state(self, state: dict[str, Any] | None) -> None:
        if self.copies is None or state is None:
            return
        self.copies.restore(state["copies"])
        self.last_refresh = int(state["last_refresh"])
        dirty = self.group.tables.dirty
        dirty.zero_()
        dirty[state["dirty"].to(dirty.device)] = True
