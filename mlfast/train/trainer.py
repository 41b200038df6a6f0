"""The mutual-learning training loop: peers, schedule, validation, early stopping, checkpoints.

The trainer owns the device, the engine (and through it the optimizers and the `PeerGroup`),
precision, the alpha warm-up, learning-rate decay on plateau, early stopping, checkpoints and the
learning curves. Models stay pure ``nn.Module``s. One ``MutualTrainer`` trains one group of peers
once; the regimes (joint, solo-then-mutual fine-tuning) are composed from it in ``api.py``.

Guarantees:

* **Exact resume.** ``last.pt`` holds everything a continuation needs (the tables' updated rows
  and their optimizer state, dense weights and optimizer state, each peer's best weights so far,
  the data order, RNG states, the step inside the epoch). It is written at step boundaries only:
  after each evaluation, every ``checkpoint_every`` steps, and when SIGINT / SIGTERM arrive (the
  step in flight finishes first). A run resumed from it ends with the same weights and metrics as
  an uninterrupted one, whether it was stopped by Ctrl-C, SIGTERM or SIGKILL.
* **No silent divergence.** Each step's total loss and every peer's BCE are checked on the device
  (no host sync in the step); a non-finite loss or a peer BCE above ``max_loss`` stops the run
  with `TrainingDiverged` naming the peer and the first bad step, before any checkpoint can
  record the bad state, unless ``skip_bad_batches`` (then such batches are skipped and counted).
* **Defined metrics.** A validation split with one class has no AUC: the run warns once and
  selects best weights and stops early on logloss instead.
* Checkpoints are written by a background thread from CPU snapshots (training does not wait for
  the disk), atomically; a temporary left by a killed write is removed on the next start.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import signal
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mlfast.models import FeatureSchema, PeerSpec
from mlfast.ops.allocator import tune_malloc
from mlfast.ops.backends import Backends
from mlfast.train import checkpoint as ckpt
from mlfast.train.config import TrainConfig
from mlfast.train.engine import Engine, losses_bad, make_engine
from mlfast.train.graphed import GraphedStep
from mlfast.train.group import PeerGroup
from mlfast.train.metrics import peer_metrics, selection_score

log = logging.getLogger("mlfast")

MIN_DELTA = 1e-6  # a score must beat the best by this much to count as an improvement
LOG_EVERY = 20  # steps between loss readings (each one is a host sync)
PLAIN_PROGRESS_SECONDS = 30.0  # without a terminal: one progress line at most this often


class TrainingDiverged(RuntimeError):
    """A peer's training loss became non-finite or exceeded ``max_loss``."""


class Interrupted(Exception):
    """SIGINT / SIGTERM arrived; the state at the last finished step was saved."""

    def __init__(self, signum: int, saved: Path | None):
        self.signum = signum
        self.saved = saved
        name = signal.Signals(signum).name
        where = f"state saved to {saved}; continue with --resume" if saved else "no run directory: nothing saved"
        super().__init__(f"{name} received: stopped after the step in flight; {where}")


def peer_seed(seed: int, label: str) -> int:
    """A peer's initialisation seed, from the run seed and its label: ``dcn`` and ``dcn_2`` start
    from different weights, and a peer starts from the same weights whatever group it is in (so a
    solo run and a study's solo phase agree)."""
    return (seed * 1_000_003 + zlib.crc32(label.encode())) % (1 << 62)


def resolve_device(spec: str | torch.device | None) -> torch.device:
    if isinstance(spec, torch.device):
        return spec
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available on this machine")
    return dev


def configure_determinism(enabled: bool) -> None:
    if enabled:
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(False)  # (this call imports torch._inductor: ~3 s, skip when off)


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so a resume continues exactly."""

    epoch: int = 0
    batch: int = 0  # batches of `epoch` already trained
    step: int = 0
    samples: int = 0
    lr: float = 0.0
    bad_evals: int = 0
    stopped: str = ""  # "", "early_stopping", "max_steps", "completed"
    train_seconds: float = 0.0
    loss_window: list[float] = field(default_factory=list)  # device sums since the last reading: [n, total, P bce]
    metric: str = "auc"  # what selects best weights: "auc", or "logloss" where AUC is undefined
    best_score: list[float] = field(default_factory=list)
    best_step: list[int] = field(default_factory=list)
    best_metrics: list[dict | None] = field(default_factory=list)
    skipped_batches: int = 0
    eval_seconds: float = 0.0  # validation (and the checkpoint snapshots taken with it)
    history: list[dict] = field(default_factory=list)


class MutualTrainer:
    """Train P peers together (P = 1 trains a single model with plain BCE).

    Example::

        >>> import mlfast
        >>> from mlfast.io.batches import BatchLoader
        >>> from mlfast.models import parse_peers
        >>> data = mlfast.read_criteo("../shared/datasets_raw/criteo_kaggle_head10k/train_head10000.txt",
        ...                           hash_buckets=1000)
        >>> cfg = TrainConfig(epochs=1, batch_size=512, device="cpu")
        >>> trainer = MutualTrainer(parse_peers("deepfm,dcn"), FeatureSchema.from_data(data), cfg)
        >>> train = BatchLoader(data, 512, indices=range(8000), shuffle=True)
        >>> valid = BatchLoader(data, 1024, indices=range(8000, 10000))
        >>> summary = trainer.fit(train, valid)   # out_dir=... keeps checkpoints
        >>> summary["steps"], summary["stopped"], sorted(summary["best_valid"])
        (16, 'completed', ['dcn', 'deepfm'])
    """

    def __init__(
        self,
        peers: Sequence[PeerSpec],
        schema: FeatureSchema,
        cfg: TrainConfig,
        *,
        init_states: Sequence[dict | None] | None = None,
        lr: float | None = None,
        device: str | torch.device | None = None,
        seeds: Sequence[int] | None = None,
        engine: str | None = None,
        backends: Backends | None = None,
        dense_touch: bool = False,
    ):
        self.cfg = cfg
        self.specs = list(peers)
        self.labels = [s.label or s.model for s in self.specs]
        self.schema = schema
        self.device = resolve_device(device if device is not None else cfg.device)
        tune_malloc()  # each step's freed buffers stay mapped for the next (mlfast.ops.allocator)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        configure_determinism(cfg.deterministic)
        ckpt.seed_everything(cfg.seed)
        self.seeds = list(seeds) if seeds is not None else [peer_seed(cfg.seed, lbl) for lbl in self.labels]
        self.engine: Engine = self.build_engine(self.specs, schema, cfg, self.device, self.seeds,
                                                lr=lr if lr is not None else cfg.lr, engine=engine, backends=backends,
                                                dense_touch=dense_touch)
        self.group: PeerGroup = self.engine.group
        ckpt.seed_everything(cfg.seed)
        if init_states is not None:  # snapshots of single-peer groups (pretrained solo runs)
            for i, snap in enumerate(init_states):
                if snap is not None:
                    self.group.load_peer(i, snap, 0)
        self.step_fn = GraphedStep(self.engine, enabled=cfg.cuda_graph and not cfg.skip_bad_batches,
                                   fallback=cfg.graph_fallback)
        P = len(self.specs)
        self.progress = Progress(lr=float(lr if lr is not None else cfg.lr), best_score=[-math.inf] * P,
                                 best_step=[-1] * P, best_metrics=[None] * P)
        self.best: list[dict | None] = [None] * P  # each peer's best snapshot (CPU)
        self.writer = ckpt.CheckpointWriter()
        self.listeners: list[Callable[[dict], None]] = []  # each history row, as logged (e.g. TensorBoard)
        self._stop_signal: int | None = None
        self._extra_state: dict = {}
        self._warned_undefined = False
        self.finished_on_best = False
        # (validation loader, its metrics) when the weights `finish` left are the ones last validated
        self.final_valid: tuple[Any, dict] | None = None
        self._last_valid: tuple[int, Any, dict] | None = None  # (step, loader, metrics) of the last validation
        self._saved_at: tuple[int, int, int] | None = None  # (step, epoch, batch) of the last last.pt

    def build_engine(self, specs: Sequence[PeerSpec], schema: FeatureSchema, cfg: TrainConfig, device: torch.device,
                     seeds: Sequence[int], *, lr: float, engine: str | None, backends: Backends | None,
                     dense_touch: bool = False) -> Engine:
        """The engine that trains the group (a hook: ``mlfast.dist`` builds a rank's engine here)."""
        return make_engine(specs, schema, cfg, device, seeds, lr=lr, engine=engine, backends=backends,
                           dense_touch=dense_touch)

    # ------------------------------------------------------------------------------- prediction
    @torch.no_grad()
    def predict(self, loader, epoch: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities [N, P], labels [N] or None) over ``loader`` in its order."""
        return predict_group(self.group, loader, self.engine.autocast, epoch)

    def evaluate(self, loader) -> dict[str, dict[str, float | None]]:
        """{peer label: {auc, logloss}, "ensemble": {...}} on a labelled loader."""
        p, y = self.predict(loader)
        if y is None:
            raise ValueError("evaluation needs labelled data")
        return peer_metrics(y, p, self.labels)

    # ---------------------------------------------------------------------------------- training
    def fit(self, train, valid=None, out_dir: str | Path | None = None, resume: bool = False,
            extra_state: dict | None = None, evaluate_first: bool = False) -> dict[str, Any]:
        """Train until ``epochs``, early stopping or ``max_steps``; returns the run summary.

        Validation (if given) runs every ``eval_every`` steps and after each epoch; each peer's
        best-by-validation weights are kept and restored at the end. With ``out_dir``, ``last.pt``
        is written at each evaluation / every ``checkpoint_every`` steps / on SIGINT and SIGTERM,
        ``best.pt`` at each improvement, and ``resume=True`` continues from ``last.pt`` exactly.
        ``evaluate_first`` validates the starting weights too (fine-tuning: the pretrained state
        is a candidate for "best", so early stopping never returns a peer worse on validation).
        """
        cfg = self.cfg
        out = Path(out_dir) if out_dir is not None else None
        if extra_state is not None:
            self._extra_state = extra_state
        if out is not None:
            for f in ckpt.clean_stale_temporaries(out):
                log.info("removed %s (left by an interrupted checkpoint write)", f)
        if resume:
            if out is None or not self.has_checkpoint(out):
                raise FileNotFoundError(f"--resume: no checkpoint at {out / 'last.pt' if out else '(no --out)'}")
            self.load_training_state(out)
        pr = self.progress
        stream = getattr(train, "loader", train)  # a data shard's loader wraps the stream
        if getattr(stream, "lanes", 1) > 1:
            log.info("training stream: %d lanes of %s rows per batch; each epoch leaves out the lanes' ragged tail, "
                     "%d of %d rows (a different tail each epoch)", stream.lanes,
                     "/".join(map(str, sorted(set(stream.lane_sizes)))), stream.left_out, stream.rows)
        total_steps = len(train) * cfg.epochs
        if cfg.max_steps:
            total_steps = min(total_steps, cfg.max_steps)
        P = len(self.specs)
        window = pr.loss_window or [0.0] * (2 + P)
        self._loss_sum = torch.tensor(window[1:], dtype=torch.float32, device=self.device)
        self._loss_count = int(window[0])
        self._bad = torch.zeros(P, dtype=torch.bool, device=self.device)
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._step_t = torch.full((), pr.step, dtype=torch.int64, device=self.device)
        self.group.train(True)
        if not cfg.alpha_warmup_steps:
            self.engine.set_alpha(cfg.alpha)
        reporter = _Reporter(cfg.progress, total_steps, pr, self.labels, len(train))
        clock = _Clock(pr)
        try:
            with self._stop_on_signals():
                if evaluate_first and valid is not None and pr.step == 0 and not pr.history:
                    with clock.paused():
                        self._validate(valid, out, reporter, count_bad=False)
                while pr.epoch < cfg.epochs and not pr.stopped:
                    for batch in train.epoch(pr.epoch, start_batch=pr.batch):
                        self._train_one(batch)
                        reporter.step(clock)
                        if pr.step % LOG_EVERY == 0:
                            self._read_losses(reporter)
                        if self._stop_signal is not None:
                            with clock.paused():
                                raise Interrupted(self._stop_signal, self._save_on_signal(out))
                        if cfg.max_steps and pr.step >= cfg.max_steps:
                            pr.stopped = "max_steps"
                            break
                        if valid is not None and cfg.eval_every and pr.step % cfg.eval_every == 0:
                            with clock.paused():
                                self._validate(valid, out, reporter)
                            if pr.stopped:
                                break
                        elif out is not None and cfg.checkpoint_every and pr.step % cfg.checkpoint_every == 0:
                            with clock.paused():
                                self._check_health()
                                self.save_training_state(out)
                    if pr.stopped:
                        break
                    pr.epoch += 1
                    pr.batch = 0
                    with clock.paused():
                        if valid is not None:
                            self._validate(valid, out, reporter)
                        elif out is not None:
                            self._check_health()
                            self.save_training_state(out)
                if not pr.stopped:
                    pr.stopped = "completed"
                clock.stop()
                self._check_health()
                # last.pt is already this state when the run ended on a validation (which saves it):
                # resuming from it ends at once all the same
                if out is not None and self._saved_at != (pr.step, pr.epoch, pr.batch):
                    self.save_training_state(out)
        finally:
            clock.stop()
            reporter.close()
            with contextlib.suppress(Exception):
                self.writer.flush()
        self.writer.flush()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Restore each peer's best weights (when validation ran) and summarise the run."""
        pr = self.progress
        self.finished_on_best = False
        self.final_valid = None
        if all(b is not None for b in self.best):
            self.restore_best()
            self.finished_on_best = True
            last = self._last_valid
            if last is not None and last[0] == pr.step and all(b == pr.step for b in pr.best_step):
                # every peer's best is the state validated last, so the weights now are those it scored
                self.final_valid = (last[1], last[2])
        return {
            "steps": pr.step,
            "samples": pr.samples,
            "epochs_completed": pr.epoch,
            "stopped": pr.stopped,
            "train_seconds": pr.train_seconds,
            "validate_seconds": pr.eval_seconds,
            "samples_per_second": pr.samples / pr.train_seconds if pr.train_seconds > 0 else None,
            "selection_metric": pr.metric,
            "best_step": dict(zip(self.labels, pr.best_step)),
            "best_valid": dict(zip(self.labels, pr.best_metrics)),
            "skipped_batches": pr.skipped_batches,
            "graph": dict(self.step_fn.stats),
            "checkpoint_seconds": {"writing": round(self.writer.seconds_writing, 3),
                                   "waiting": round(self.writer.seconds_waiting, 3), "writes": self.writer.writes},
        }

    def _train_one(self, batch) -> None:
        cfg, pr = self.cfg, self.progress
        if cfg.alpha_warmup_steps and pr.step <= cfg.alpha_warmup_steps:
            self.engine.set_alpha(cfg.alpha * min(1.0, (pr.step + 1) / cfg.alpha_warmup_steps))
        if cfg.skip_bad_batches:
            out = self.engine.train_step(batch, guard=cfg.max_loss)
            if losses_bad(out, cfg.max_loss):  # a host sync per step: the price of skipping
                pr.skipped_batches += 1
                if pr.skipped_batches in (1, 10, 100) or pr.skipped_batches % 1000 == 0:
                    log.warning("skipped batch %d of epoch %d (step %d): loss %s; %d skipped so far",
                                pr.batch, pr.epoch, pr.step + 1, _fmt_losses(out, self.labels), pr.skipped_batches)
                pr.batch += 1
                return
        else:
            out = self.step_fn(batch)
        self._step_t += 1
        bad = ~torch.isfinite(out[1:]) | (out[1:] > cfg.max_loss) | ~torch.isfinite(out[:1])
        self._bad |= bad
        self._first_bad = torch.where(bad.any() & (self._first_bad < 0), self._step_t, self._first_bad)
        self._loss_sum += out
        self._loss_count += 1
        pr.step += 1
        pr.batch += 1
        pr.samples += int(batch.sparse.shape[0])

    def _check_health(self) -> None:
        """Raise `TrainingDiverged` if any step since the start looked bad (one host sync)."""
        if not hasattr(self, "_bad") or not bool(self._bad.any()):
            return
        peers = [lbl for lbl, b in zip(self.labels, self._bad.tolist()) if b]
        step = int(self._first_bad)
        pr = self.progress
        raise TrainingDiverged(
            f"training diverged at step {step}: the loss of peer {', '.join(peers)} became non-finite or exceeded "
            f"{self.cfg.max_loss:g} nats per sample (learning rate {pr.lr:g}). The last checkpoint written "
            "before it is kept; lower --lr, or pass --skip-bad-batches to skip such batches")

    def _read_losses(self, reporter: "_Reporter") -> None:
        pr = self.progress
        sums = self._loss_sum.tolist()  # the one host sync per LOG_EVERY steps
        self._check_health()
        n = max(self._loss_count, 1)
        self._loss_sum.zero_()
        self._loss_count = 0
        row = {"step": pr.step, "epoch": pr.epoch, "samples": pr.samples, "train_loss": sums[0] / n, "lr": pr.lr}
        for lbl, s in zip(self.labels, sums[1:]):
            row[f"train_{lbl}_bce"] = s / n
        pr.history.append(row)
        reporter.loss(row["train_loss"])
        for f in self.listeners:
            f(row)

    def _validate(self, valid, out: Path | None, reporter: "_Reporter", count_bad: bool = True) -> None:
        t0 = time.perf_counter()
        try:
            self._validate_now(valid, out, reporter, count_bad)
        finally:
            self.progress.eval_seconds += time.perf_counter() - t0

    def _validate_now(self, valid, out: Path | None, reporter: "_Reporter", count_bad: bool) -> None:
        cfg, pr = self.cfg, self.progress
        if getattr(self, "_loss_count", 0):
            self._read_losses(reporter)  # the training loss up to this evaluation, in the same history
        self._check_health()
        metrics = self.evaluate(valid)
        self._last_valid = (pr.step, valid, metrics)
        if pr.metric == "auc" and any(m["auc"] is None for m in metrics.values()):
            pr.metric = "logloss"
            pr.best_score = [-math.inf] * len(self.labels)
        if pr.metric == "logloss" and not self._warned_undefined:
            self._warned_undefined = True
            log.warning("validation AUC is undefined (the validation split has one class): selecting best weights "
                        "and stopping early on validation logloss")
        row = {"step": pr.step, "epoch": pr.epoch, "samples": pr.samples, "lr": pr.lr}
        for name, m in metrics.items():
            row[f"valid_{name}_auc"] = m["auc"]
            row[f"valid_{name}_logloss"] = m["logloss"]
        pr.history.append(row)
        reporter.validation(pr, metrics)
        for f in self.listeners:
            f(row)
        improved = []
        for i, name in enumerate(self.labels):
            score = selection_score(metrics[name], pr.metric)
            if score > pr.best_score[i] + MIN_DELTA:
                pr.best_score[i] = score
                pr.best_step[i] = pr.step
                pr.best_metrics[i] = dict(metrics[name])
                improved.append(i)
        if improved:
            self.keep_best(improved)
        if improved or not count_bad:
            pr.bad_evals = 0
            if out is not None and improved:
                self._save_best(out)
        else:
            pr.bad_evals += 1
            if cfg.lr_decay < 1 and pr.lr > cfg.min_lr:
                pr.lr = max(pr.lr * cfg.lr_decay, cfg.min_lr)
                self.engine.set_lr(pr.lr)
            if pr.bad_evals >= cfg.patience > 0:
                pr.stopped = "early_stopping"
        if out is not None:
            self.save_training_state(out)

    def keep_best(self, improved: Sequence[int]) -> None:
        """Keep the current weights of the ``improved`` peers as their best (a hook for ``mlfast.dist``)."""
        # only the improved peers' columns of the rows updates touched: no whole-table copy
        snap = self.group.snapshot(peers=improved)
        for i in improved:
            self.best[i] = _peer_part(snap, i)

    def restore_best(self) -> None:
        for i, snap in enumerate(self.best):
            if snap is not None:
                self.group.restore(snap, peers=[i])

    # ------------------------------------------------------------------------------ checkpoints
    def _meta(self) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "peers": [s.to_dict() for s in self.specs],
            "seeds": list(self.seeds),
            "schema": self.schema.to_dict(),
            **self._extra_state,
        }

    def _save_best(self, out: Path) -> None:
        pr = self.progress
        self.writer.submit(out / "best.pt", {
            **self._meta(), "kind": "best", "best": list(self.best), "best_step": list(pr.best_step),
            "best_metrics": copy.deepcopy(pr.best_metrics), "metric": pr.metric,
        })

    def save_training_state(self, out: Path, sync: bool = False) -> None:
        """Submit ``last.pt`` (a snapshot taken now, written in the background unless ``sync``)."""
        pr = self.progress
        if hasattr(self, "_loss_sum"):
            pr.loss_window = [float(self._loss_count)] + self._loss_sum.tolist()
        state = {
            **self._meta(),
            "kind": "last",
            "state": self.group.snapshot(optimizer_state=True),
            "optimizer": _detached_copy(self.engine.optimizer_state()),
            "progress": copy.deepcopy(dataclasses.asdict(pr)),
            "rng": ckpt.rng_state(),
            "best": list(self.best),
        }
        self.writer.submit(out / "last.pt", state)
        self._saved_at = (pr.step, pr.epoch, pr.batch)
        if sync:
            self.writer.flush()

    def _save_on_signal(self, out: Path | None) -> Path | None:
        if out is None:
            return None
        self._check_health()
        self.save_training_state(out, sync=True)
        return out / "last.pt"

    def has_checkpoint(self, out: Path) -> bool:
        """Whether ``out`` holds a checkpoint to resume from (a hook for ``mlfast.dist``)."""
        return (out / "last.pt").is_file()

    def load_finished(self, run: Path) -> None:
        """Load the final peer weights of a finished run directory (its model.pt)."""
        state = ckpt.load_checkpoint(run / "model.pt")
        self.group.restore(state["state"])

    def load_training_state(self, out: Path) -> None:
        state = ckpt.load_checkpoint(out / "last.pt")
        mine = [s.to_dict() for s in self.specs]
        if state["peers"] != mine:
            raise ValueError(f"--resume: {out / 'last.pt'} was trained with peers "
                             f"{[p['label'] for p in state['peers']]}, not {self.labels}")
        if state["schema"] != self.schema.to_dict():
            raise ValueError(f"--resume: {out / 'last.pt'} was trained on data with a different field layout")
        self.group.restore(state["state"])
        self.engine.load_optimizer_state(state["optimizer"])
        self.step_fn.reset()  # captured graphs point at the tensors the load replaced
        self.progress = Progress(**state["progress"])
        self.engine.set_lr(self.progress.lr)
        if self.progress.stopped == "max_steps":
            self.progress.stopped = ""  # a run cut short by --max-steps continues
        if self.progress.stopped == "completed" and self.progress.epoch < self.cfg.epochs:
            self.progress.stopped = ""  # --epochs raised: a finished run continues
        if self.progress.stopped == "early_stopping" and self.progress.bad_evals < self.cfg.patience:
            self.progress.stopped = ""  # --patience raised
        ckpt.set_rng_state(state["rng"])
        self.best = list(state["best"])

    # --------------------------------------------------------------------------------- signals
    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGINT / SIGTERM stop training after the step in flight (a second Ctrl-C stops at once)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        prev = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum

        self._stop_signal = None
        for s in prev:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in prev.items():
                signal.signal(s, h)


def predict_group(group: PeerGroup, loader, autocast: Callable = contextlib.nullcontext,
                  epoch: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities [N, P], labels [N] or None) of ``group`` over ``loader`` in its order."""
    was_training = group.training
    group.train(False)
    probs, labels = [], []
    # On the CPU each batch's results go straight into arrays allocated once: thousands of small
    # result tensors kept between the batches' large, freed activations fragment glibc's heap, which
    # then cannot shrink (measured: 2 M rows scored in batches of 4,096 grew to 8.6 GB of RSS; 1.4 GB
    # this way). On CUDA they stay on the device until the end (no sync per batch).
    n_max = len(loader) * loader.batch_size
    cpu = next(group.buffers()).device.type == "cpu"
    p_out = np.empty((n_max, group.num_peers), np.float32) if cpu else None
    y_out, pos = None, 0
    with torch.no_grad():
        for batch in loader.epoch(epoch):
            with autocast():
                prob = torch.sigmoid(group(batch.sparse, batch.dense, batch.bags))
            if not cpu:
                probs.append(prob)
                if batch.labels is not None:
                    labels.append(batch.labels)
                continue
            n = len(batch)
            p_out[pos:pos + n] = prob.float().numpy()
            if batch.labels is not None:
                if y_out is None:
                    y_out = np.empty(n_max, np.float32)
                y_out[pos:pos + n] = batch.labels.numpy()
            pos += n
    group.train(was_training)
    if cpu:
        return p_out[:pos], None if y_out is None else y_out[:pos]
    p = torch.cat(probs).float().cpu().numpy() if probs else np.zeros((0, group.num_peers), np.float32)
    y = torch.cat(labels).cpu().numpy() if labels else None
    return p, y


def _fmt_losses(out: torch.Tensor, labels: Sequence[str]) -> str:
    v = out.tolist()
    return f"total {v[0]:.4g} (" + ", ".join(f"{lbl} {x:.4g}" for lbl, x in zip(labels, v[1:])) + ")"


def _peer_part(snap: dict, i: int) -> dict:
    """Peer i's share of a group snapshot taken with ``peers=[..., i, ...]``."""
    t = snap["tables"]
    return {"tables": {**{k: v for k, v in t.items() if k != "peers"}, "peers": {i: t["peers"][i]}},
            "peers": [st if j == i else None for j, st in enumerate(snap["peers"])]}


def _detached_copy(obj: Any) -> Any:
    """A deep copy whose tensors are CPU clones (a checkpoint must not change as training goes on)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _detached_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detached_copy(v) for v in obj)
    return copy.deepcopy(obj)


class _Clock:
    """Training wall time (evaluation and checkpointing excluded), accumulated in progress."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.t0: float | None = time.perf_counter()

    def stop(self) -> None:
        if self.t0 is not None:
            self.progress.train_seconds += time.perf_counter() - self.t0
            self.t0 = None

    def rate(self) -> float:
        running = time.perf_counter() - self.t0 if self.t0 is not None else 0.0
        return self.progress.samples / max(1e-9, self.progress.train_seconds + running)

    @contextlib.contextmanager
    def paused(self):
        self.stop()
        try:
            yield
        finally:
            self.t0 = time.perf_counter()


def format_validation(step: int, epochs: float, metrics: dict[str, dict[str, float | None]]) -> str:
    """One line: ``step 126 (epoch 1.00) valid: deepfm AUC 0.7082 logloss 0.4634 | ... | ensemble ...``
    (``epochs``: epochs trained so far, fractional mid-epoch)."""
    def f(x):
        return "-" if x is None else f"{x:.4f}"

    parts = [f"{name} AUC {f(m['auc'])} logloss {f(m['logloss'])}" for name, m in metrics.items()]
    return f"step {step} (epoch {epochs:.2f}) valid: " + " | ".join(parts)


class _Reporter:
    """Progress on a terminal (a tqdm bar), plain periodic log lines otherwise; one line per
    validation either way."""

    def __init__(self, enabled: bool, total: int, pr: Progress, labels: Sequence[str], steps_per_epoch: int):
        self.enabled = enabled
        self.total = total
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.pr = pr
        self.bar = None
        self.last_line = time.perf_counter()
        self.last_loss: float | None = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=pr.step, unit="step", dynamic_ncols=True, leave=False)

    def step(self, clock: _Clock) -> None:
        self.clock = clock
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled and time.perf_counter() - self.last_line >= PLAIN_PROGRESS_SECONDS:
            self.last_line = time.perf_counter()
            loss = "-" if self.last_loss is None else f"{self.last_loss:.4f}"
            log.info("step %d/%d (epoch %.2f): loss %s, %s samples/s", self.pr.step, self.total, self.epochs(), loss,
                     f"{clock.rate():,.0f}")

    def loss(self, value: float) -> None:
        self.last_loss = value
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{value:.4f}", samples_per_s=f"{self.clock.rate():,.0f}")

    def epochs(self) -> float:
        return self.pr.epoch + self.pr.batch / self.steps_per_epoch

    def validation(self, pr: Progress, metrics: dict) -> None:
        line = format_validation(pr.step, self.epochs(), metrics)
        if self.bar is not None:
            self.bar.clear()
        log.info(line)
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
