"""Training-step engines: how one mutual step (forward, loss, backward, optimizer) runs on a
`PeerGroup`. Every engine follows the `Engine` protocol, so the trainer, `GraphedStep` and the
benchmarks treat them alike.

* ``FusedEngine``: the group's `PeerTables` (all peers' tables in one buffer, looked up in one
  pass, the sparse optimizer fused into the lookup's backward), the mutual loss through the
  backends' kernel, torch's fused Adam for the dense layers. One learning rate, a [1] device tensor
  shared by the dense optimizer and the tables.
* ``PlainEngine``: the reference and the FuxiCTR-style baseline: one ``nn.Parameter`` table per peer
  (`DenseTables`), dense Adam over every parameter, the plain-PyTorch mutual loss.

``train_step`` returns a [1 + P] device tensor: the total loss, then each peer's mean BCE (read by
the trainer's divergence check; no host sync in the step).
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

from mlfast.io.batches import Batch
from mlfast.models import FeatureSchema, PeerSpec
from mlfast.ops.backends import Backends, select_backends
from mlfast.ops.dense_adam import FusedAdam
from mlfast.ops.mutual_loss import fused_mutual_loss, mutual_loss
from mlfast.ops.sparse_optim import SparseOptimConfig
from mlfast.train.config import TrainConfig
from mlfast.train.group import PeerGroup
from mlfast.train.tables import DenseTables, PeerTables


@runtime_checkable
class Engine(Protocol):
    """What the trainer, `GraphedStep` and the benchmarks need from an engine."""

    name: str
    group: PeerGroup

    def train_step(self, batch: Batch, guard: float | None = None) -> torch.Tensor:
        """One optimizer step on ``batch``; returns [1 + P]: total loss, each peer's BCE. With
        ``guard``, a batch whose loss is non-finite or a peer's BCE above ``guard`` is not applied
        (a host sync: the caller asked to skip bad batches)."""
        ...

    def set_lr(self, lr: float) -> None: ...

    def set_alpha(self, alpha: float) -> None: ...

    def optimizer_state(self) -> dict: ...

    def load_optimizer_state(self, state: dict) -> None: ...


def bf16_autocast_supported(device: torch.device) -> tuple[bool, str]:
    """(supported, why not): bf16 autocast pays off on CUDA and on CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return True, ""
    from mlfast.ops.cpu_features import bf16_supported, cpu_features

    if bf16_supported():
        feats = cpu_features()
        amd = "AMD" in feats.get("model", "").upper()
        # measured (DeepFM + DCN, 1.8M rows, B=4096, 2 cores, bf16 vs fp32 step back to back): 0.72x on
        # an Intel Xeon with AVX512-BF16 and no AMX, 1.32-1.46x on an AMD EPYC (Zen 5)
        if not (feats.get("amx_bf16") and feats.get("amx_tile")) and not amd:
            logging.getLogger("mlfast").warning(
                "--bf16 on an Intel CPU with AVX512-BF16 but no AMX: it trains correctly, but measured slower than "
                "fp32 (0.72x on a 2-core Xeon, DeepFM + DCN, B=4096); AMX CPUs (and AMD's Zen 5: 1.3-1.5x) are "
                "where bf16 pays off")
        return True, ""
    return False, (f"this CPU ({cpu_features().get('model', 'unknown')}) has neither AVX512-BF16 nor AMX-BF16: "
                   "bf16 matrix products would be emulated and slower than fp32; train without --bf16")


def losses_bad(out: torch.Tensor, guard: float | None) -> bool:
    """Whether a step's [1 + P] losses (total, each peer's BCE) are non-finite or a peer's BCE is
    above ``guard`` (False without a guard; a host sync with one)."""
    if guard is None:
        return False
    v = out.tolist()
    return not all(math.isfinite(x) for x in v) or any(x > guard for x in v[1:])


class EngineBase:
    """The parts every engine shares: the group, alpha and learning-rate tensors, precision."""

    name = "base"

    def __init__(self, group: PeerGroup, cfg: TrainConfig, device: torch.device, lr: float,
                 lr_tensor: torch.Tensor | None = None):
        self.group = group
        self.cfg = cfg
        self.device = device
        # alpha and lr live on the device: the warm-up ramp and the decay change them in place,
        # without host syncs and without re-capturing a graphed step. ``lr_value`` keeps the exact
        # Python float for optimizers that take one (a float32 round trip would change its last bits).
        self.alpha = torch.zeros((), dtype=torch.float32, device=device)
        self.lr_value = float(lr)
        self.lr = lr_tensor if lr_tensor is not None else torch.full((1,), self.lr_value, dtype=torch.float32,
                                                                     device=device)
        self.use_bf16 = bool(cfg.bf16)
        if self.use_bf16:
            ok, why = bf16_autocast_supported(device)
            if not ok:
                raise ValueError(f"--bf16: {why}")

    @property
    def num_peers(self) -> int:
        return self.group.num_peers

    def set_alpha(self, alpha: float) -> None:
        self.alpha.fill_(alpha)

    def set_lr(self, lr: float) -> None:
        self.lr_value = float(lr)
        self.lr.fill_(lr)

    def autocast(self):
        if self.use_bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def logits(self, batch: Batch) -> torch.Tensor:
        with self.autocast():
            return self.group(batch.sparse, batch.dense, batch.bags)

    @staticmethod
    def peer_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each peer's mean BCE [P] (no gradient): the health signal of the step."""
        z = logits.detach()
        return F.binary_cross_entropy_with_logits(z, labels[:, None].expand_as(z).to(z.dtype),
                                                  reduction="none").mean(0)


class FusedEngine(EngineBase):
    """All peers' tables in one `PeerTables` with the sparse optimizer fused into the lookup's
    backward; the fused mutual loss; fused dense Adam (see the module docstring)."""

    name = "fused"

    def __init__(self, group: PeerGroup, cfg: TrainConfig, device: torch.device, lr: float,
                 lr_tensor: torch.Tensor | None = None):
        super().__init__(group, cfg, device, lr, lr_tensor)
        if not isinstance(group.tables, PeerTables) or group.tables.state is None:
            raise ValueError("FusedEngine trains a group built with kind='fused' and a sparse optimizer")
        self.backends = group.tables.backends
        dense_params = list(group.peers.parameters())
        # torch.optim.Adam(fused=True)'s kernel without torch.optim (see mlfast.ops.dense_adam); CPU and CUDA,
        # a tensor learning rate
        self.optimizer = FusedAdam(dense_params, lr=self.lr, weight_decay=cfg.net_l2)

    def train_step(self, batch: Batch, guard: float | None = None) -> torch.Tensor:
        logits = self.logits(batch)
        loss = fused_mutual_loss(logits, batch.labels, self.alpha, self.cfg.mutual, backend=self.backends.loss)
        out = torch.cat([loss.detach().reshape(1), self.peer_bce(logits, batch.labels)])
        if losses_bad(out, guard):
            return out
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()  # the embedding rows are updated here, inside the tables' backward
        self.optimizer.step()
        return out

    def optimizer_state(self) -> dict:
        return {"dense": self.optimizer.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["dense"])
        for g in self.optimizer.param_groups:  # the loaded state replaces the shared lr tensor
            g["lr"] = self.lr


class PlainEngine(EngineBase):
    """Per-peer ``nn.Parameter`` tables + dense Adam over everything: the FuxiCTR-style reference."""

    name = "plain"

    def __init__(self, group: PeerGroup, cfg: TrainConfig, device: torch.device, lr: float,
                 lr_tensor: torch.Tensor | None = None):
        super().__init__(group, cfg, device, lr, lr_tensor)
        if not isinstance(group.tables, DenseTables):
            raise ValueError("PlainEngine trains a group built with kind='dense'")
        emb = list(group.tables.parameters())
        self.optimizer = torch.optim.Adam(
            [{"params": list(group.peers.parameters()), "weight_decay": cfg.net_l2},
             {"params": emb, "weight_decay": 0.0}],
            lr=self.lr_value, fused=device.type == "cuda" or None)

    def set_lr(self, lr: float) -> None:
        super().set_lr(lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def train_step(self, batch: Batch, guard: float | None = None) -> torch.Tensor:
        logits = self.logits(batch)
        loss = mutual_loss(logits, batch.labels, self.alpha, self.cfg.mutual)
        out = torch.cat([loss.detach().reshape(1), self.peer_bce(logits, batch.labels)])
        if losses_bad(out, guard):
            return out
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        tables: DenseTables = self.group.tables
        tables.mark_updated(batch.sparse, batch.bags)
        if self.cfg.embedding_l2:
            self._embedding_l2(batch)
        self.optimizer.step()
        return out

    def _embedding_l2(self, batch: Batch) -> None:
        """L2 on the rows this batch touched (the lazy form every sparse optimizer applies):
        grad_r += lambda * w_r once for each distinct row r (bag members included)."""
        flat = torch.cat([batch.sparse.reshape(-1), *(v for _, v in batch.bags)]) if batch.bags \
            else batch.sparse.reshape(-1)
        for w in self.group.tables.parameters():
            touched = torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)
            touched.index_fill_(0, flat.long(), 1.0)
            w.grad.addcmul_(w.detach(), touched, value=self.cfg.embedding_l2)

    def optimizer_state(self) -> dict:
        return {"dense": self.optimizer.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["dense"])
        self.set_lr(self.lr_value)


ENGINES = {"fused": FusedEngine, "plain": PlainEngine}


def resolve_engine(cfg: TrainConfig) -> str:
    return "fused" if cfg.engine == "auto" else cfg.engine


def build_group(specs: Sequence[PeerSpec], schema: FeatureSchema, cfg: TrainConfig, device: torch.device,
                seeds: Sequence[int], lr: torch.Tensor | None = None, engine: str | None = None,
                backends: Backends | None = None, dense_touch: bool = False) -> PeerGroup:
    """The group an engine of kind ``engine`` (default: the config's) trains."""
    kind = engine or resolve_engine(cfg)
    if kind == "fused":
        backends = backends or select_backends(cfg.kernels, device, cfg.deterministic)
        opt = SparseOptimConfig(kind=cfg.sparse_optimizer, lr=cfg.lr, weight_decay=cfg.embedding_l2)
        return PeerGroup.build(specs, schema, embedding_dim=cfg.embedding_dim, seeds=seeds, kind="fused",
                               optimizer=opt, backends=backends, device=device, lr=lr, dense_touch=dense_touch)
    return PeerGroup.build(specs, schema, embedding_dim=cfg.embedding_dim, seeds=seeds, kind="dense", device=device)


def make_engine(specs: Sequence[PeerSpec], schema: FeatureSchema, cfg: TrainConfig, device: torch.device,
                seeds: Sequence[int], lr: float | None = None, engine: str | None = None,
                backends: Backends | None = None, dense_touch: bool = False) -> Engine:
    """A fresh group of ``specs`` and the engine that trains it (``dense_touch``: the data will
    look up most table rows, see `PeerTables`)."""
    kind = engine or resolve_engine(cfg)
    lr = float(cfg.lr if lr is None else lr)
    lr_t = torch.full((1,), lr, dtype=torch.float32, device=device)
    group = build_group(specs, schema, cfg, device, seeds, lr_t, kind, backends, dense_touch)
    return ENGINES[kind](group, cfg, device, lr, lr_t)
