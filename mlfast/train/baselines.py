"""The best plain-PyTorch alternatives to the fused engine, for the benchmarks to measure against.

* ``PlainEngine`` (in ``engine.py``) is the FuxiCTR-style eager baseline: one ``nn.Parameter`` table
  per peer, dense Adam over every row.
* ``CompiledPlainEngine``: the same step with the forward + loss compiled by
  ``torch.compile(mode="reduce-overhead")`` (CUDA graphs on CUDA) and a compiled optimizer step.
* ``TorchSparseEngine``: embeddings with sparse gradients + ``torch.optim.SparseAdam`` (only the
  touched rows are updated), dense layers with Adam.

They follow the same `Engine` protocol, so one benchmark loop (and `GraphedStep`) times them all.
"""
from __future__ import annotations

import torch

from mlfast.io.batches import Batch
from mlfast.ops.mutual_loss import mutual_loss
from mlfast.train.config import TrainConfig
from mlfast.train.engine import EngineBase, PlainEngine, losses_bad
from mlfast.train.group import PeerGroup


class CompiledPlainEngine(PlainEngine):
    name = "compile"

    def __init__(self, group: PeerGroup, cfg: TrainConfig, device: torch.device, lr: float,
                 lr_tensor: torch.Tensor | None = None):
        super().__init__(group, cfg, device, lr, lr_tensor)
        mode = "reduce-overhead" if device.type == "cuda" else "default"

        def forward_loss(sparse, dense, labels, alpha):
            with self.autocast():
                logits = self.group(sparse, dense)
            return mutual_loss(logits, labels, alpha, self.cfg.mutual), logits.detach()

        self._forward_loss = torch.compile(forward_loss, mode=mode)
        self._opt_step = torch.compile(self.optimizer.step)

    def train_step(self, batch: Batch, guard: float | None = None) -> torch.Tensor:
        if batch.bags:
            raise ValueError("the compiled baseline times one-hot fields only")
        loss, logits = self._forward_loss(batch.sparse, batch.dense, batch.labels, self.alpha)
        out = torch.cat([loss.detach().reshape(1), self.peer_bce(logits, batch.labels)])
        if losses_bad(out, guard):
            return out
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        self.group.tables.mark_updated(batch.sparse)
        if self.cfg.embedding_l2:
            self._embedding_l2(batch)
        self._opt_step()
        return out.clone()


class TorchSparseEngine(EngineBase):
    """Sparse-gradient embeddings + SparseAdam: torch's own answer to dense Adam on huge tables."""

    name = "sparse"

    def __init__(self, group: PeerGroup, cfg: TrainConfig, device: torch.device, lr: float,
                 lr_tensor: torch.Tensor | None = None):
        super().__init__(group, cfg, device, lr, lr_tensor)
        group.tables.sparse_grad = True
        self.sparse_opt = torch.optim.SparseAdam(list(group.tables.parameters()), lr=self.lr_value)
        self.optimizer = torch.optim.Adam(list(group.peers.parameters()), lr=self.lr_value, weight_decay=cfg.net_l2,
                                          fused=device.type == "cuda" or None)

    def train_step(self, batch: Batch, guard: float | None = None) -> torch.Tensor:
        logits = self.logits(batch)
        loss = mutual_loss(logits, batch.labels, self.alpha, self.cfg.mutual)
        out = torch.cat([loss.detach().reshape(1), self.peer_bce(logits, batch.labels)])
        if losses_bad(out, guard):
            return out
        self.optimizer.zero_grad(set_to_none=False)
        self.sparse_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.group.tables.mark_updated(batch.sparse, batch.bags)
        if self.cfg.embedding_l2:
            for w in self.group.tables.parameters():  # lambda * w on the touched rows, added to the sparse gradient
                g = w.grad.coalesce()
                rows = g.indices()[0]
                w.grad = torch.sparse_coo_tensor(g.indices(), g.values() + self.cfg.embedding_l2 * w.detach()[rows],
                                                 g.shape)
        self.sparse_opt.step()
        self.optimizer.step()
        return out

    def set_lr(self, lr: float) -> None:
        super().set_lr(lr)
        for opt in (self.optimizer, self.sparse_opt):
            for g in opt.param_groups:
                g["lr"] = lr

    def optimizer_state(self) -> dict:
        return {"dense": self.optimizer.state_dict(), "sparse": self.sparse_opt.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["dense"])
        self.sparse_opt.load_state_dict(state["sparse"])
