"""Training-step engines: how one mutual step (forward, loss, backward, optimizer) is executed.

* ``PlainEngine`` — the reference and the baseline: each peer's own ``nn.Embedding``-style table,
  dense ``torch.optim.Adam`` over every parameter (FuxiCTR's way), the plain-PyTorch mutual loss.
  No host syncs and no per-field loops; it is what the fused engine is measured against.
* ``FusedEngine`` — the peers' tables interleaved in one ``PeerTables`` buffer, looked up for all
  peers in one pass, with the sparse optimizer fused into the backward (Triton on CUDA, numba on
  the CPU); the fused mutual-loss kernel on CUDA; torch's fused Adam for the dense layers; on CUDA
  the whole step is captured in a CUDA graph and replayed.

Both expose the same small interface so the trainer does not care which one runs.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Sequence

import torch
from torch import nn

from mlfast.train.config import TrainConfig
from mlfast.ops.mutual_loss import fused_mutual_loss, mutual_loss
from mlfast.ops.sparse_optim import SparseOptimConfig


def _stack_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([z.float() for z in logits], dim=1)


class Engine:
    """Shared parts: peers, device, precision, alpha schedule. Subclasses implement the step."""

    def __init__(self, peers: nn.ModuleList, cfg: TrainConfig, device: torch.device, lr: float):
        self.peers = peers
        self.cfg = cfg
        self.device = device
        self.lr = lr
        # alpha lives on the device: the warm-up ramp changes it without host syncs or re-capture
        self.alpha = torch.zeros((), dtype=torch.float32, device=device)
        self.use_bf16 = bool(cfg.bf16 and device.type == "cuda")

    @property
    def num_peers(self) -> int:
        return len(self.peers)

    def set_alpha(self, value: float) -> None:
        self.alpha.fill_(value)

    def autocast(self):
        if self.use_bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train(self, mode: bool = True) -> None:
        self.peers.train(mode)

    # interface -------------------------------------------------------------------------------
    def train_step(self, sparse, dense, labels, bags=()) -> torch.Tensor:
        """One step on a batch: one-hot ids [B, F], dense [B, Dd] or None, labels [B] and the
        batch's bag fields (``(offsets [B+1], ids)`` per multi-hot field); returns the loss."""
        raise NotImplementedError

    @torch.no_grad()
    def predict_logits(self, sparse, dense, bags=()) -> torch.Tensor:
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        raise NotImplementedError

    def peer_state_dict(self, i: int, copy: bool = True) -> dict:
        """Peer i's full ``state_dict`` (embedding table included), on the CPU. ``copy=False`` may
        share memory with the live weights (fine for an immediate save, not for keeping)."""
        raise NotImplementedError

    def load_peer_state_dict(self, i: int, state: dict) -> None:
        raise NotImplementedError

    def optimizer_state_dict(self) -> dict:
        raise NotImplementedError

    def load_optimizer_state_dict(self, state: dict) -> None:
        raise NotImplementedError


def _cpu_state(sd: dict, copy: bool = True) -> dict:
    return {k: v.detach().to("cpu", copy=copy) for k, v in sd.items()}


class PlainEngine(Engine):
    """nn.Embedding tables + dense Adam over everything: the FuxiCTR-style reference step."""

    name = "plain"

    def __init__(self, peers: nn.ModuleList, cfg: TrainConfig, device: torch.device, lr: float):
        super().__init__(peers, cfg, device, lr)
        emb_params = [m.embedding.weight for m in peers]
        emb_ids = {id(p) for p in emb_params}
        dense_params = [p for p in peers.parameters() if id(p) not in emb_ids]
        fused = device.type == "cuda"
        self.optimizer = torch.optim.Adam(
            [{"params": dense_params, "weight_decay": cfg.net_l2}, {"params": emb_params, "weight_decay": 0.0}],
            lr=lr, fused=fused or None,
        )

    def _forward(self, sparse, dense, bags=()) -> torch.Tensor:
        with self.autocast():
            return _stack_logits([m(sparse, dense, bags) for m in self.peers])

    def train_step(self, sparse, dense, labels, bags=()) -> torch.Tensor:
        logits = self._forward(sparse, dense, bags)
        loss = mutual_loss(logits, labels, self.alpha, self.cfg.mutual)
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        if self.cfg.embedding_l2:
            self._embedding_l2(sparse, bags)
        self.optimizer.step()
        return loss.detach()

    def _embedding_l2(self, sparse, bags=()) -> None:
        """L2 on the rows this batch touched (the lazy form every sparse optimizer can apply):
        grad_r += lambda * w_r once for each distinct row r in the batch (bag members included)."""
        flat = torch.cat([sparse.reshape(-1), *(v for _, v in bags)]) if bags else sparse.reshape(-1)
        for m in self.peers:
            w = m.embedding.weight
            touched = torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)
            touched.index_fill_(0, flat, 1.0)
            w.grad.addcmul_(w.detach(), touched, value=self.cfg.embedding_l2)

    @torch.no_grad()
    def predict_logits(self, sparse, dense, bags=()) -> torch.Tensor:
        return self._forward(sparse, dense, bags)

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def peer_state_dict(self, i: int, copy: bool = True) -> dict:
        return _cpu_state(self.peers[i].state_dict(), copy)

    def load_peer_state_dict(self, i: int, state: dict) -> None:
        self.peers[i].load_state_dict(state)

    def optimizer_state_dict(self) -> dict:
        return {"dense": self.optimizer.state_dict()}

    def load_optimizer_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["dense"])


class FusedEngine(Engine):
    """All peers' tables in one interleaved buffer with a fused sparse optimizer (see module doc)."""

    name = "fused"

    def __init__(self, peers: nn.ModuleList, cfg: TrainConfig, device: torch.device, lr: float,
                 backend: str | None = None):
        """``backend``: the table / loss kernels: "triton" (default on CUDA), "cpu" (numba; default
        on the CPU) or "reference" (plain PyTorch). Tests run "triton" on the CPU under the
        Triton interpreter."""
        super().__init__(peers, cfg, device, lr)
        from mlfast.train.tables import PeerTables

        self.sparse_cfg = SparseOptimConfig(kind=cfg.sparse_optimizer, lr=lr, weight_decay=cfg.embedding_l2)
        backend = backend or ("triton" if device.type == "cuda" else "cpu")
        self.loss_backend = "triton" if backend == "triton" else "reference"
        weights = [m.embedding.weight.detach() for m in peers]
        self.tables = PeerTables.from_peer_weights(weights, self.sparse_cfg, backend=backend)
        # The peers keep no table of their own: the interleaved buffer is the only copy.
        for m in peers:
            del m.embedding
        dense_params = list(peers.parameters())
        cuda = device.type == "cuda"
        self.graphed = bool(cfg.cuda_graph and cuda)
        self.optimizer = torch.optim.Adam(
            dense_params, lr=torch.tensor(lr, device=device) if self.graphed else lr,
            weight_decay=cfg.net_l2, fused=cuda or None, capturable=self.graphed,
        )
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_batch = -1
        self._static: dict[str, torch.Tensor | None] = {}

    # step ------------------------------------------------------------------------------------
    def _forward(self, sparse, dense, bags=(), requires_grad: bool | None = None) -> torch.Tensor:
        embs = self.tables.lookup_fields(sparse, bags, requires_grad=requires_grad)
        with self.autocast():
            return _stack_logits([m.forward_embedded(e, dense) for m, e in zip(self.peers, embs)])

    def _eager_step(self, sparse, dense, labels, bags=()) -> torch.Tensor:
        logits = self._forward(sparse, dense, bags)
        loss = fused_mutual_loss(logits, labels, self.alpha, self.cfg.mutual, backend=self.loss_backend)
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()  # the embedding rows are updated here, inside the table's backward
        self.optimizer.step()
        return loss.detach()

    def train_step(self, sparse, dense, labels, bags=()) -> torch.Tensor:
        if not self.graphed or bags:  # bags change size from batch to batch: no static graph
            return self._eager_step(sparse, dense, labels, bags)
        if self._graph is None:
            return self._step_and_capture(sparse, dense, labels)
        if sparse.shape[0] != self._graph_batch:
            return self._eager_step(sparse, dense, labels)  # a ragged last batch is not graphed
        s = self._static
        s["sparse"].copy_(sparse, non_blocking=True)
        if dense is not None:
            s["dense"].copy_(dense, non_blocking=True)
        s["labels"].copy_(labels, non_blocking=True)
        self._graph.replay()
        return s["loss"].clone()

    def _step_and_capture(self, sparse, dense, labels) -> torch.Tensor:
        """Run this batch's step eagerly (it also warms up allocator pools, lazy optimizer state
        and kernel compilation, as capture requires), then record the step into a CUDA graph.
        Capture only records kernels, it runs nothing, so no batch is trained twice."""
        s = {"sparse": sparse.clone(), "dense": None if dense is None else dense.clone(), "labels": labels.clone()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss = self._eager_step(s["sparse"], s["dense"], s["labels"])
        torch.cuda.current_stream().wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                s["loss"] = self._eager_step(s["sparse"], s["dense"], s["labels"])
        except Exception as exc:  # pragma: no cover - depends on the CUDA stack
            warnings.warn(f"CUDA graph capture failed ({exc}); running the fused step eagerly")
            self.graphed = False
            return loss
        self._graph, self._graph_batch, self._static = graph, sparse.shape[0], s
        return loss

    @torch.no_grad()
    def predict_logits(self, sparse, dense, bags=()) -> torch.Tensor:
        return self._forward(sparse, dense, bags, requires_grad=False)

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        for g in self.optimizer.param_groups:
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr
        self.tables.set_lr(lr)

    def peer_state_dict(self, i: int, copy: bool = True) -> dict:
        sd = _cpu_state(self.peers[i].state_dict(), copy)
        sd["embedding.weight"] = self.tables.peer_weight(i).detach().cpu()  # already a fresh copy
        return dict(sorted(sd.items()))

    def load_peer_state_dict(self, i: int, state: dict) -> None:
        state = dict(state)
        self.tables.set_peer_weight(i, state.pop("embedding.weight"))
        self.peers[i].load_state_dict(state)

    def optimizer_state_dict(self) -> dict:
        # the table's weights are in the peers' state dicts already; untouched rows' state is zero
        return {"dense": self.optimizer.state_dict(), "tables": self.tables.state_dict(weight=False, compact=True)}

    def load_optimizer_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["dense"])
        self.tables.load_state_dict(state["tables"])


def resolve_engine(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.engine != "auto":
        return cfg.engine
    return "fused"


def make_engine(peers: nn.ModuleList, cfg: TrainConfig, device: torch.device, lr: float) -> Engine:
    kind = resolve_engine(cfg, device)
    return (FusedEngine if kind == "fused" else PlainEngine)(peers, cfg, device, lr)
