"""The mutual-learning training loop: peers, schedule, validation, early stopping, checkpoints.

The trainer owns devices, optimizers (through an engine, see ``engine.py``), precision, the alpha
warm-up, learning-rate decay on plateau, early stopping on validation AUC, checkpoints and the
learning curves. Models stay pure ``nn.Module``s. One ``MutualTrainer`` trains one group of peers
once; the regimes (joint, solo-then-mutual fine-tuning) are composed from it in ``api.py``.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from mlfast.train import checkpoint as ckpt
from mlfast.train.config import TrainConfig
from mlfast.train.engine import Engine, make_engine
from mlfast.train.metrics import peer_metrics
from mlfast.models import FeatureSchema, PeerSpec, build_model

MIN_DELTA = 1e-6  # an AUC must beat the best by this much to count as an improvement
LOG_EVERY = 20  # steps between progress updates (each one is a host sync)


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
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)


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
    loss_window: list[float] = field(default_factory=lambda: [0.0, 0.0])  # (sum, steps) since last log
    best_auc: list[float] = field(default_factory=list)
    best_step: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


class MutualTrainer:
    """Train P peers together (P = 1 trains a single model with plain BCE).

    Example::

        >>> trainer = MutualTrainer(parse_peers("deepfm,dcn"), FeatureSchema.from_data(data), TrainConfig())
        >>> result = trainer.fit(train_loader, valid_loader, out_dir="runs/x")
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
    ):
        self.cfg = cfg
        self.specs = list(peers)
        self.labels = [s.label or s.model for s in self.specs]
        self.schema = schema
        self.device = resolve_device(device if device is not None else cfg.device)
        if cfg.bf16 and self.device.type != "cuda":
            raise ValueError("--bf16 needs a CUDA device (bf16 autocast on the CPU is slower, not faster)")
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        configure_determinism(cfg.deterministic)
        ckpt.seed_everything(cfg.seed)
        seeds = list(seeds) if seeds is not None else [peer_seed(cfg.seed, lbl) for lbl in self.labels]
        models = []
        for spec, seed in zip(self.specs, seeds):
            torch.manual_seed(seed)
            models.append(build_model(spec, schema, cfg.embedding_dim))
        ckpt.seed_everything(cfg.seed)
        self.peers = nn.ModuleList(models).to(self.device)
        if init_states is not None:
            for m, st in zip(self.peers, init_states):
                if st is not None:
                    m.load_state_dict(st)
        self.engine: Engine = make_engine(self.peers, cfg, self.device, lr if lr is not None else cfg.lr)
        self.progress = Progress(lr=self.engine.lr, best_auc=[-math.inf] * len(self.specs),
                                 best_step=[-1] * len(self.specs))
        self.best_states: list[dict | None] = [None] * len(self.specs)
        self.best_metrics: list[dict | None] = [None] * len(self.specs)

    # ------------------------------------------------------------------------------- prediction
    @torch.no_grad()
    def predict(self, loader, epoch: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities [N, P], labels [N] or None) over ``loader`` in its order."""
        self.engine.train(False)
        probs, labels = [], []
        for batch in loader.epoch(epoch):
            probs.append(torch.sigmoid(self.engine.predict_logits(batch.sparse, batch.dense, batch.bags)))
            if batch.labels is not None:
                labels.append(batch.labels)
        self.engine.train(True)
        p = torch.cat(probs).cpu().numpy() if probs else np.zeros((0, len(self.specs)), np.float32)
        y = torch.cat(labels).cpu().numpy() if labels else None
        return p, y

    def evaluate(self, loader) -> dict[str, dict[str, float]]:
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
        best-by-validation weights are kept (in ``best.pt`` when ``out_dir`` is set) and restored
        at the end. With ``out_dir``, ``last.pt`` is written at each evaluation / every
        ``checkpoint_every`` steps / on Ctrl-C, and ``resume=True`` continues from it exactly.
        ``evaluate_first`` validates the starting weights too (fine-tuning: the pretrained state is
        a candidate for "best", so early stopping never returns a peer worse on validation).
        """
        cfg = self.cfg
        out = Path(out_dir) if out_dir is not None else None
        self._extra_state = extra_state or {}
        if resume:
            if out is None or not (out / "last.pt").is_file():
                raise FileNotFoundError(f"--resume: no checkpoint at {out / 'last.pt' if out else '(no --out)'}")
            self.load_training_state(out)
        pr = self.progress
        steps_per_epoch = len(train)
        total_steps = steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            total_steps = min(total_steps, cfg.max_steps)
        bar = _progress_bar(cfg.progress, total_steps, pr.step)
        # the running training loss stays on the device: read once per LOG_EVERY steps
        self._loss_sum = torch.full((), pr.loss_window[0], device=self.device)
        self._loss_count = int(pr.loss_window[1])
        self.engine.train(True)
        if not cfg.alpha_warmup_steps:
            self.engine.set_alpha(cfg.alpha)
        if evaluate_first and valid is not None and pr.step == 0 and not pr.history:
            self._validate(valid, out, count_bad=False)
        clock = _Clock(pr)
        try:
            while pr.epoch < cfg.epochs and not pr.stopped:
                for batch in train.epoch(pr.epoch, start_batch=pr.batch):
                    if cfg.alpha_warmup_steps and pr.step <= cfg.alpha_warmup_steps:
                        self.engine.set_alpha(cfg.alpha * min(1.0, (pr.step + 1) / cfg.alpha_warmup_steps))
                    self._loss_sum += self.engine.train_step(batch.sparse, batch.dense, batch.labels, batch.bags)
                    self._loss_count += 1
                    pr.step += 1
                    pr.batch += 1
                    pr.samples += int(batch.sparse.shape[0])
                    bar.update(1)
                    if pr.step % LOG_EVERY == 0:
                        train_loss = float(self._loss_sum) / self._loss_count  # the one host sync
                        self._loss_sum.zero_()
                        self._loss_count = 0
                        pr.history.append({"step": pr.step, "epoch": pr.epoch, "samples": pr.samples,
                                           "train_loss": train_loss, "lr": pr.lr})
                        bar.set_postfix(loss=f"{train_loss:.4f}", samples_per_s=f"{clock.rate():,.0f}")
                    if cfg.max_steps and pr.step >= cfg.max_steps:
                        pr.stopped = "max_steps"
                        break
                    if valid is not None and cfg.eval_every and pr.step % cfg.eval_every == 0:
                        with clock.paused():
                            self._validate(valid, out)
                        if pr.stopped:
                            break
                    elif out is not None and cfg.checkpoint_every and pr.step % cfg.checkpoint_every == 0:
                        with clock.paused():
                            self.save_training_state(out)
                if pr.stopped:
                    break
                pr.epoch += 1
                pr.batch = 0
                with clock.paused():
                    if valid is not None:
                        self._validate(valid, out)
                    elif out is not None:
                        self.save_training_state(out)
            if not pr.stopped:
                pr.stopped = "completed"
        except KeyboardInterrupt:
            clock.stop()
            if out is not None:
                self.save_training_state(out)
                bar.write(f"interrupted: state saved to {out / 'last.pt'}; continue with --resume")
            raise
        finally:
            clock.stop()
            bar.close()
        if out is not None:
            self.save_training_state(out)
        self.finished_on_best = False
        if valid is not None and all(s is not None for s in self.best_states):
            self.restore_best()
            self.finished_on_best = True
        return {
            "steps": pr.step,
            "samples": pr.samples,
            "epochs_completed": pr.epoch,
            "stopped": pr.stopped,
            "train_seconds": pr.train_seconds,
            "samples_per_second": pr.samples / pr.train_seconds if pr.train_seconds > 0 else float("nan"),
            "best_step": dict(zip(self.labels, pr.best_step)),
            "best_valid": dict(zip(self.labels, self.best_metrics)),
        }

    def _validate(self, valid, out: Path | None, count_bad: bool = True) -> None:
        cfg, pr = self.cfg, self.progress
        metrics = self.evaluate(valid)
        row = {"step": pr.step, "epoch": pr.epoch, "samples": pr.samples, "lr": pr.lr}
        for name, m in metrics.items():
            row[f"valid_{name}_auc"] = m["auc"]
            row[f"valid_{name}_logloss"] = m["logloss"]
        pr.history.append(row)
        improved = False
        for i, name in enumerate(self.labels):
            auc = metrics[name]["auc"]
            if auc > pr.best_auc[i] + MIN_DELTA:
                pr.best_auc[i] = auc
                pr.best_step[i] = pr.step
                self.best_states[i] = self.engine.peer_state_dict(i)
                self.best_metrics[i] = dict(metrics[name])
                improved = True
        if improved or not count_bad:
            pr.bad_evals = 0
            if out is not None:
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

    def restore_best(self) -> None:
        for i, st in enumerate(self.best_states):
            if st is not None:
                self.engine.load_peer_state_dict(i, st)

    def peer_states(self, copy: bool = True) -> list[dict]:
        return [self.engine.peer_state_dict(i, copy) for i in range(len(self.specs))]

    # ------------------------------------------------------------------------------ checkpoints
    def _meta(self) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "peers": [s.to_dict() for s in self.specs],
            "schema": self.schema.to_dict(),
            **self._extra_state,
        }

    def _save_best(self, out: Path) -> None:
        ckpt.save_checkpoint(out / "best.pt", {
            **self._meta(),
            "kind": "best",
            "peer_states": self.best_states,
            "best_metrics": self.best_metrics,
            "best_step": list(self.progress.best_step),
        })

    def save_training_state(self, out: Path) -> None:
        pr = self.progress
        if hasattr(self, "_loss_sum"):
            pr.loss_window = [float(self._loss_sum), float(self._loss_count)]
        ckpt.save_checkpoint(out / "last.pt", {
            **self._meta(),
            "kind": "last",
            "peer_states": self.peer_states(copy=False),
            "optimizer": self.engine.optimizer_state_dict(),
            "progress": pr.__dict__,
            "rng": ckpt.rng_state(),
        })

    finished_on_best = False  # fit() ended with every peer restored to its best.pt weights

    def load_finished(self, run: Path) -> None:
        """Load the final peer weights of a finished run directory (its model.pt)."""
        state = ckpt.load_checkpoint(run / "model.pt")
        for i, st in enumerate(state["peer_states"]):
            self.engine.load_peer_state_dict(i, st)

    def load_training_state(self, out: Path) -> None:
        state = ckpt.load_checkpoint(out / "last.pt")
        mine = [s.to_dict() for s in self.specs]
        if state["peers"] != mine:
            raise ValueError(f"--resume: {out / 'last.pt'} was trained with peers "
                             f"{[p['label'] for p in state['peers']]}, not {self.labels}")
        if state["schema"] != self.schema.to_dict():
            raise ValueError(f"--resume: {out / 'last.pt'} was trained on data with a different field layout")
        for i, st in enumerate(state["peer_states"]):
            self.engine.load_peer_state_dict(i, st)
        self.engine.load_optimizer_state_dict(state["optimizer"])
        self.progress = Progress(**state["progress"])
        self.engine.set_lr(self.progress.lr)
        if self.progress.stopped == "max_steps":
            self.progress.stopped = ""  # a run cut short by --max-steps continues
        ckpt.set_rng_state(state["rng"])
        best_path = out / "best.pt"
        if best_path.is_file():
            best = ckpt.load_checkpoint(best_path)
            self.best_states = list(best["peer_states"])
            self.best_metrics = list(best["best_metrics"])


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


class _NullBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def write(self, s: str) -> None:
        print(s)
    def close(self) -> None: ...


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)
