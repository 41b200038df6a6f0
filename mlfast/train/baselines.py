"""The best plain-PyTorch alternatives to the fused engine, for the benchmarks to measure against.

* ``PlainEngine`` (in ``engine.py``) is the FuxiCTR-style eager baseline: ``nn.Embedding`` tables,
  dense Adam over every row.
* ``CompiledPlainEngine``: the same step with the forward + loss compiled by
  ``torch.compile(mode="reduce-overhead")`` (CUDA graphs on CUDA) and a compiled optimizer step.
* ``TorchSparseEngine``: embeddings with sparse gradients + ``torch.optim.SparseAdam`` (only the
  touched rows are updated), dense layers with Adam.

They are engines like the others (same interface) so one benchmark loop times them all.
"""
from __future__ import annotations

import torch
from torch import nn

from mlfast.train.config import TrainConfig
from mlfast.train.engine import PlainEngine, _stack_logits
from mlfast.ops.mutual_loss import mutual_loss


class CompiledPlainEngine(PlainEngine):
    name = "compile"

    def __init__(self, peers: nn.ModuleList, cfg: TrainConfig, device: torch.device, lr: float):
        super().__init__(peers, cfg, device, lr)
        mode = "reduce-overhead" if device.type == "cuda" else "default"

        def forward_loss(sparse, dense, labels, alpha):
            with self.autocast():
                logits = _stack_logits([m(sparse, dense) for m in self.peers])
            return mutual_loss(logits, labels, alpha, self.cfg.mutual)

        self._forward_loss = torch.compile(forward_loss, mode=mode)
        self._opt_step = torch.compile(self.optimizer.step)

    def train_step(self, sparse, dense, labels) -> torch.Tensor:
        loss = self._forward_loss(sparse, dense, labels, self.alpha)
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        if self.cfg.embedding_l2:
            self._embedding_l2(sparse)
        self._opt_step()
        return loss.detach().clone()


class TorchSparseEngine(PlainEngine):
    """Sparse-gradient embeddings + SparseAdam: torch's own answer to dense Adam on huge tables."""

    name = "sparse"

    def __init__(self, peers: nn.ModuleList, cfg: TrainConfig, device: torch.device, lr: float):
        # skip PlainEngine's optimizer: this one splits embedding and dense parameters
        self.peers, self.cfg, self.device, self.lr = peers, cfg, device, lr
        self.alpha = torch.zeros((), dtype=torch.float32, device=device)
        self.use_bf16 = bool(cfg.bf16 and device.type == "cuda")
        emb = [m.embedding.weight for m in peers]
        for m in peers:
            m.embedding.sparse_grad = True
        ids = {id(p) for p in emb}
        dense = [p for p in peers.parameters() if id(p) not in ids]
        self.sparse_opt = torch.optim.SparseAdam(emb, lr=lr)
        self.optimizer = torch.optim.Adam(dense, lr=lr, weight_decay=cfg.net_l2, fused=device.type == "cuda" or None)

    def train_step(self, sparse, dense, labels) -> torch.Tensor:
        logits = self._forward(sparse, dense)
        loss = mutual_loss(logits, labels, self.alpha, self.cfg.mutual)
        self.optimizer.zero_grad(set_to_none=False)
        self.sparse_opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.embedding_l2:
            for m in self.peers:  # lambda * w on the touched rows, added to the sparse gradient
                w = m.embedding.weight
                g = w.grad.coalesce()
                rows = g.indices()[0]
                w.grad = torch.sparse_coo_tensor(g.indices(), g.values() + self.cfg.embedding_l2 * w.detach()[rows],
                                                 g.shape)
        self.sparse_opt.step()
        self.optimizer.step()
        return loss.detach()

    def set_lr(self, lr: float) -> None:
        super().set_lr(lr)
        for g in self.sparse_opt.param_groups:
            g["lr"] = lr

    def optimizer_state_dict(self) -> dict:
        return {"dense": self.optimizer.state_dict(), "sparse": self.sparse_opt.state_dict()}

    def load_optimizer_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["dense"])
        self.sparse_opt.load_state_dict(state["sparse"])
