"""`DistTrainer`: the mutual trainer (``mlfast.train.trainer.MutualTrainer``) as one rank of a job.

Everything the single-process trainer guarantees holds across ranks, because every decision is
taken from values that are identical on every rank: the step's losses are all-reduced (the
divergence check fires everywhere at once), validation metrics are computed by every rank from the
same gathered predictions (early stopping, learning-rate decay and best-weight selection agree),
and a SIGINT / SIGTERM seen by any rank stops every rank after the same step (one tiny all-reduce
per step carries it). Only rank 0 shows progress and writes reports; every rank writes its own
checkpoint shard (``mlfast.dist.checkpoint``) and resumes from it exactly, at the same world size.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import signal
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mlfast.dist import checkpoint as dckpt
from mlfast.dist.data import ShardedBatchLoader, ShardedStreamLoader, shard_loader
from mlfast.dist.engine import DistEngine
from mlfast.dist.launch import DistContext, align_numba_threads, restart_count
from mlfast.models import FeatureSchema, PeerSpec
from mlfast.ops.backends import Backends
from mlfast.train import checkpoint as ckpt
from mlfast.train.config import TrainConfig
from mlfast.train.engine import Engine
from mlfast.train.metrics import peer_metrics
from mlfast.train.trainer import MutualTrainer, Progress, _detached_copy, _peer_part, predict_group

log = logging.getLogger("mlfast")

# "RANK:STEP[:stop]": that rank SIGKILLs (with ":stop", SIGSTOPs) itself after STEP, in a job's first
# attempt only (tests of dead and stalled ranks; torchrun's restarts then run clean)
FAULT_ENV = "MLFAST_DIST_FAULT"


class DistTrainer(MutualTrainer):
    """`MutualTrainer` for one rank of ``ctx``'s job (same arguments, plus ``ctx``).

    ``fit(train, ...)`` takes the same loaders as a single process (every rank builds them alike);
    under ``--parallel data`` / ``both`` each rank trains on its shard of every batch.
    """

    def __init__(self, peers: Sequence[PeerSpec], schema: FeatureSchema, cfg: TrainConfig, *, ctx: DistContext,
                 **kwargs: Any):
        self.ctx = ctx
        self.saved_cfg = cfg
        # no CUDA graphs (a step's all-to-all sizes change every step); progress on rank 0 only
        super().__init__(peers, schema, cfg.replace(cuda_graph=False, progress=cfg.progress and ctx.is_writer),
                         device=ctx.device, **kwargs)
        align_numba_threads()  # after the trainer applied --threads
        self.own = list(self.engine.own)
        topo = ctx.topology
        if topo.shards > 1 and ctx.device.type == "cuda":
            # the reference dropout (CUDA) draws from torch's generator: shards must not share masks
            torch.cuda.manual_seed(cfg.seed * 1_000_003 + topo.shard)
        tables = self.group.tables
        mine = {"own": self.own, "widths": list(tables.widths)}
        widths = [0] * len(self.specs)
        for got in ctx.world.all_gather_object(mine, "setup"):
            for gi, w in zip(got["own"], got["widths"]):
                widths[gi] = w
        self.global_tables = {"widths": widths, "seeds": list(self.seeds), "labels": list(self.labels),
                              "init_std": tables.init_std, "num_rows": schema.table_rows}
        self.best_local: list[dict | None] = [None] * len(self.specs)  # own peers' best shard snapshots
        self._fault = _fault_step(ctx.rank)
        self._counted_from: int | None = None

    # hooks of MutualTrainer --------------------------------------------------------------------
    def build_engine(self, specs, schema, cfg, device, seeds, *, lr: float, engine: str | None,
                     backends: Backends | None, dense_touch: bool = False) -> Engine:
        if engine not in (None, "auto", "fused") or cfg.engine == "plain":
            raise ValueError("multi-process training runs the fused engine (sharded PeerTables); --engine plain is "
                             "single-process only")
        return DistEngine(self.ctx, specs, schema, cfg, device, seeds, lr, backends, dense_touch=dense_touch)

    def _meta(self) -> dict:
        return {**super()._meta(), "config": self.saved_cfg.to_dict()}

    def _train_one(self, batch) -> None:
        pr = self.progress
        if self._counted_from is None:  # the byte counters start with this process's first step
            self._counted_from = pr.step
            self.ctx.stats.reset()
        self.engine.step_index = pr.step
        before = pr.samples
        super()._train_one(batch)
        if pr.samples != before:  # the global batch, not this rank's shard of it
            pr.samples = before + int(getattr(batch, "global_size", 0) or len(batch))
        # one decision for every rank: stop after this step if any rank got SIGINT / SIGTERM
        flag = self.ctx.world.any_flag(int(self._stop_signal or 0))
        self._stop_signal = flag or None
        if self._fault is not None and pr.step == self._fault[0]:
            self.writer.flush()
            os.kill(os.getpid(), self._fault[1])

    def fit(self, train, valid=None, out_dir=None, resume: bool = False, extra_state: dict | None = None,
            evaluate_first: bool = False) -> dict[str, Any]:
        topo = self.ctx.topology
        if topo.shards > 1 and not isinstance(train, (ShardedBatchLoader, ShardedStreamLoader)):
            train = shard_loader(train, topo.shard, topo.shards)
        summary = super().fit(train, valid, out_dir, resume, extra_state, evaluate_first)
        summary["distributed"] = {**topo.to_dict(), "backend": self.ctx.backend,
                                  "bytes_sent_per_step": self.bytes_per_step()}
        return summary

    def bytes_per_step(self) -> dict[str, float]:
        """This rank's bytes sent per training step by this process, by kind (what validation sent,
        "predict", spread over the steps)."""
        steps = max(1, self.progress.step - (self._counted_from or 0))
        return {k: round(v / steps, 1) for k, v in sorted(self.ctx.stats.bytes.items())}

    # prediction: every rank takes part; everyone gets every row and peer -------------------------
    @torch.no_grad()
    def predict(self, loader, epoch: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        topo = self.ctx.topology
        sharded = shard_loader(loader, topo.shard, topo.shards) if topo.shards > 1 else loader
        P_own = len(self.own)
        p, y = predict_group(self.group, sharded, self.engine.autocast, epoch)  # this rank's rows
        has_labels = y is not None
        mine = torch.from_numpy(np.concatenate([p, y[:, None]], 1) if has_labels else p).float()
        # 1. the peers of this data shard's rows (peer group), 2. the rows of every shard (data group)
        width = topo.max_peers_per_group
        padded = torch.nn.functional.pad(mine[:, :P_own], (0, width - P_own)) if P_own < width else mine[:, :P_own]
        every = self.ctx.peer.all_gather(padded.to(self.ctx.device), "predict").cpu()  # [G, n_d, width]
        cols = [every[g, :, :len(topo.peers_of(g))] for g in range(topo.groups)]
        if has_labels:
            cols.append(mine[:, P_own:])
        shard_rows = torch.cat(cols, 1)  # [n_d, P (+ 1)]
        own = sharded.rows_by_shard() if topo.shards > 1 and hasattr(sharded, "rows_by_shard") else None
        if own is not None:  # each shard scored its own range of rows: theirs, in shard order
            pad = torch.zeros(max(own), shard_rows.shape[1])
            pad[:shard_rows.shape[0]] = shard_rows
            gathered = self.ctx.data.all_gather(pad.to(self.ctx.device), "predict").cpu()
            shard_rows = torch.cat([gathered[d, :n] for d, n in enumerate(own)])
        elif topo.shards > 1:
            counts = [[sharded_counts(loader, d, topo.shards, k) for k in range(len(loader))]
                      for d in range(topo.shards)]
            n_max = max(sum(c) for c in counts)
            pad = torch.zeros(n_max, shard_rows.shape[1])
            pad[:shard_rows.shape[0]] = shard_rows
            gathered = self.ctx.data.all_gather(pad.to(self.ctx.device), "predict").cpu()
            pieces = []
            starts = [0] * topo.shards
            for k in range(len(loader)):  # batch by batch, shard by shard: the loader's order
                for d in range(topo.shards):
                    n = counts[d][k]
                    pieces.append(gathered[d, starts[d]:starts[d] + n])
                    starts[d] += n
            shard_rows = torch.cat(pieces) if pieces else shard_rows[:0]
        P = len(self.specs)
        p = shard_rows[:, :P].numpy()
        y = shard_rows[:, P].numpy() if has_labels else None
        return p, y

    def evaluate(self, loader) -> dict[str, dict[str, float | None]]:
        p, y = self.predict(loader)
        if y is None:
            raise ValueError("evaluation needs labelled data")
        return peer_metrics(y, p, self.labels)

    # best weights ------------------------------------------------------------------------------
    def keep_best(self, improved: Sequence[int]) -> None:
        mine = [gi for gi in improved if gi in self.own]
        if mine:
            snap = self.group.snapshot(peers=[self.own.index(gi) for gi in mine])
            for gi in mine:
                self.best_local[gi] = _peer_part(snap, self.own.index(gi))
        for gi in improved:  # the trainer only asks whether every peer has a best
            self.best[gi] = self.best_local[gi] if gi in self.own else {"held_by": "another rank"}

    def restore_best(self) -> None:
        for gi in self.own:
            snap = self.best_local[gi]
            if snap is not None:
                self.group.restore(snap, peers=[self.own.index(gi)])

    def _save_best(self, out: Path) -> None:
        pr = self.progress
        store = dckpt.ShardedStore(out, "best", self.ctx.rank, self.ctx.world_size)
        self.writer.submit(store.path(pr.step), {
            **self._shard_meta(), "kind": "dist-best", "best": list(self.best_local),
            "best_step": list(pr.best_step), "best_metrics": copy.deepcopy(pr.best_metrics), "metric": pr.metric,
        })
        store.collect_garbage()

    # checkpoints -------------------------------------------------------------------------------
    def _shard_meta(self) -> dict[str, Any]:
        topo = self.ctx.topology
        return {**self._meta(), "topology": topo.to_dict(), "rank": topo.rank, "shard": topo.shard, "own": self.own,
                "global_tables": self.global_tables}

    def has_checkpoint(self, out: Path) -> bool:
        found = dckpt.latest_complete(out, "last") if self.ctx.is_writer else None
        return self.ctx.world.broadcast_object(found is not None, kind="setup")

    def save_training_state(self, out: Path, sync: bool = False) -> None:
        pr = self.progress
        if hasattr(self, "_loss_sum"):
            pr.loss_window = [float(self._loss_count)] + self._loss_sum.tolist()
        store = dckpt.ShardedStore(out, "last", self.ctx.rank, self.ctx.world_size)
        state = {
            **self._shard_meta(),
            "kind": "dist-last",
            "state": self.group.snapshot(optimizer_state=True),
            "optimizer": _detached_copy(self.engine.optimizer_state()),
            "exchange": _detached_copy(self.engine.exchange_state()),
            "progress": copy.deepcopy(dataclasses.asdict(pr)),
            "rng": ckpt.rng_state(),
            "best": list(self.best_local),
            "best_markers": [b is not None for b in self.best],
        }
        self.writer.submit(store.path(pr.step), state)
        self._saved_at = (pr.step, pr.epoch, pr.batch)
        store.collect_garbage()
        if sync:
            self.writer.flush()
            store.collect_garbage()

    def _save_on_signal(self, out: Path | None) -> Path | None:
        saved = super()._save_on_signal(out)
        return None if saved is None else out / dckpt.DIST_DIR / "last"

    def load_training_state(self, out: Path) -> None:
        world = self.ctx.world
        found = dckpt.latest_complete(out, "last") if self.ctx.is_writer else None
        found = world.broadcast_object(found, kind="setup")
        if found is None:
            raise FileNotFoundError(f"--resume: no complete sharded checkpoint in {out / dckpt.DIST_DIR / 'last'}")
        step, saved_world = found
        if saved_world != self.ctx.world_size:
            raise ValueError(f"--resume: {out} was checkpointed by {saved_world} processes; resuming needs the same "
                             f"number (this job has {self.ctx.world_size})")
        store = dckpt.ShardedStore(out, "last", self.ctx.rank, self.ctx.world_size)
        state = ckpt.load_checkpoint(store.path(step))
        topo = self.ctx.topology.to_dict()
        if state["topology"] != topo:
            raise ValueError(f"--resume: {out} was trained with the process layout {state['topology']}, this job has "
                             f"{topo} (--parallel and the world size must not change)")
        mine = [s.to_dict() for s in self.specs]
        if state["peers"] != mine:
            raise ValueError(f"--resume: {out} was trained with peers {[p['label'] for p in state['peers']]}, "
                             f"not {self.labels}")
        if state["schema"] != self.schema.to_dict():
            raise ValueError(f"--resume: {out} was trained on data with a different field layout")
        self.group.restore(state["state"])
        self.engine.load_optimizer_state(state["optimizer"])
        self.engine.load_exchange_state(state["exchange"])
        self.step_fn.reset()
        self.progress = Progress(**state["progress"])
        self.engine.set_lr(self.progress.lr)
        pr = self.progress
        if pr.stopped == "max_steps":
            pr.stopped = ""
        if pr.stopped == "completed" and pr.epoch < self.cfg.epochs:
            pr.stopped = ""
        if pr.stopped == "early_stopping" and pr.bad_evals < self.cfg.patience:
            pr.stopped = ""
        ckpt.set_rng_state(state["rng"])
        self.best_local = list(state["best"])
        self.best = [self.best_local[i] if i in self.own else ({"held_by": "another rank"} if m else None)
                     for i, m in enumerate(state["best_markers"])]

    def load_finished(self, run: Path) -> None:
        state = ckpt.load_checkpoint(run / "model.pt")
        topo = self.ctx.topology
        self.group.restore(dckpt.local_part(state["state"], self.own, topo.shard, topo.shards))

    def merged_snapshot(self) -> dict[str, Any] | None:
        """The whole group's snapshot in the single-process format, on rank 0 (None elsewhere);
        collective. Rank 0 holds every updated row in memory meanwhile."""
        topo = self.ctx.topology
        mine = {"own": self.own, "shard": topo.shard, "shards": topo.shards, "snapshot": self.group.snapshot()}
        parts = self.ctx.world.gather_object(mine, 0, "checkpoint")
        if not self.ctx.is_writer:
            return None
        return dckpt.merge_snapshots(parts, self.global_tables)


def sharded_counts(loader, shard: int, shards: int, k: int) -> int:
    """Rows of batch ``k`` of ``loader`` that data shard ``shard`` takes."""
    from mlfast.io.batches import shard_bounds

    rows = loader.rows if hasattr(loader, "rows") else len(loader.indices)  # streamed / in memory
    n = min(loader.batch_size, rows - k * loader.batch_size)
    lo, hi = shard_bounds(n, shard, shards)
    return hi - lo


def _fault_step(rank: int) -> tuple[int, int] | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec or restart_count() > 0:
        return None
    r, step, *how = spec.split(":")
    return (int(step), signal.SIGSTOP if how == ["stop"] else signal.SIGKILL) if int(r) == rank else None
