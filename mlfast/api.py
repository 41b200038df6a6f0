"""The Python API, mirroring the CLI: read data, train peers (jointly or solo-then-mutual), evaluate,
predict, and load a finished run.

Example (runs as is from the repository root)::

    import mlfast
    result = mlfast.fit("../shared/datasets_raw/criteo_kaggle_head10k/train_head10000.txt",
                        peers=["deepfm", "dcn"], epochs=2, out="runs/head10k")
    print(result.metrics["test"]["ensemble"])           # {"auc": ..., "logloss": ...}
    probs = result.predict("../shared/datasets_raw/criteo_kaggle_head10k/test_head10000_nolabel.txt")
    probs["deepfm"][:5], probs["ensemble"][:5]
"""
from __future__ import annotations

import copy
import json
import os
import time
import logging
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from mlfast.io.batches import BatchLoader
from mlfast.io.data import CTRData
from mlfast.io.prepare import (READER_DEFAULTS, Prepared, Split, apply_vocabulary, check_batch_size,
                               check_ids_in_range, iter_file, prepare_data, read_file, reader_options)
from mlfast.models import FeatureSchema, PeerSpec, parse_peers
from mlfast.report import plot_curves, solo_vs_mutual_rows, write_curves_csv
from mlfast.train import checkpoint as ckpt
from mlfast.train.config import TrainConfig
from mlfast.train.group import PeerGroup
from mlfast.train.metrics import peer_metrics
from mlfast.train.trainer import MutualTrainer, predict_group, resolve_device

__all__ = ["fit", "load_run", "FitResult", "Predictor", "RunExists", "ResumeConflict", "RunDirectoryError", "prepare_data", "reader_options", "read_file",
           "write_predictions_csv", "PredictionCSV", "prediction_keys", "Split", "Prepared", "READER_DEFAULTS"]

log = logging.getLogger("mlfast")

EVAL_BATCH_SIZE = 16384  # rows scored at once on a GPU
# On the CPU smaller batches score faster (they stay in cache): bench/eval_batch.py on the 2-core
# Xeon, DeepFM + DCN with the default tables: 4,096 rows 1.45x the rows/s of 16,384.
CPU_EVAL_BATCH_SIZE = 4096
# predict / eval read a file in chunks of this much text (or rows of Parquet / Arrow): about 100 MB
# of Criteo columns in memory per chunk, two chunks at a time (one parsed while the other is scored)
PREDICT_CHUNK_BYTES = 32 << 20
PREDICT_BATCH_ROWS = 262_144
MODEL_FILE = "model.pt"
RUN_FILES = ("config.json", "last.pt", "best.pt", MODEL_FILE, "metrics.json", "curves.csv", "curves.png",
             "finished.json", "train.log", "vocab.npz")
# Settings a resumed run may change: they extend or steer the continuation without making it a
# different run (every other setting must match the saved configuration).
RESUME_MUTABLE = frozenset({"epochs", "finetune_epochs", "max_steps", "patience", "checkpoint_every", "device",
                            "num_threads", "progress", "cuda_graph", "graph_fallback", "backend"})


class RunDirectoryError(ValueError):
    """A problem with how a run directory was asked for (the CLI's exit status 2)."""


class RunExists(RunDirectoryError):
    """The run directory already holds a run and neither resume nor overwrite was asked for."""


class ResumeConflict(RunDirectoryError):
    """Settings given again on resume differ from the saved run's and cannot change.
    ``conflicts``: (setting, saved value, given value) triples."""

    def __init__(self, message: str, conflicts: list[tuple[str, Any, Any]]):
        super().__init__(message)
        self.conflicts = conflicts


# ------------------------------------------------------------------------------------ predictor
class Predictor:
    """Trained peers (a `PeerGroup`, no training state) that score CTRData or files.

    ``Predictor.load(run_dir)`` loads ``model.pt`` (written when a run finishes), falling back to
    ``best.pt`` / ``last.pt`` of an unfinished run. After ``fit`` the result's predictor holds the
    trainer's own group: validation, ``predict`` and ``eval`` run through the same module.
    """

    def __init__(self, group: PeerGroup, reader: dict[str, Any], use_dense: bool = False, device=None, vocab=None):
        self.group = group.eval()
        self.specs = list(group.specs)
        self.labels = group.labels
        self.schema = group.schema
        self.reader = dict(reader)
        self.vocab = vocab
        self.use_dense = use_dense
        self.device = resolve_device(device) if device is not None else next(group.buffers()).device

    @property
    def models(self) -> list:
        return list(self.group.peers)

    @classmethod
    def load(cls, run_dir: str | Path, device=None) -> "Predictor":
        run = Path(run_dir)
        if not run.is_dir():
            raise FileNotFoundError(f"run directory not found: {run}")
        for name in (MODEL_FILE, "best.pt", "last.pt"):
            if (run / name).is_file():
                state = ckpt.load_checkpoint(run / name)
                break
        else:
            from mlfast.dist.checkpoint import load_sharded_run  # a multi-process run stopped before model.pt

            state = load_sharded_run(run)
            if state is None:
                raise FileNotFoundError(f"{run}: no {MODEL_FILE}, best.pt or last.pt (is this an mlfast run directory?)")
        dev = resolve_device(device)
        group = inference_group(state, dev)
        vocab = None
        if state.get("vocab") is not None:
            from mlfast.io.vocab import Vocabulary

            vocab = Vocabulary.from_state(state["vocab"])
        return cls(group, state.get("reader", READER_DEFAULTS), state["config"]["use_dense"], dev, vocab)

    def read(self, path: str | Path, **overrides: Any) -> CTRData:
        """Read a file exactly as the training data was read (same format options, hashing or vocabulary)."""
        return self._checked(read_file(path, self._read_options(overrides), keys=self.vocab is not None), path)

    def read_chunks(self, path: str | Path, *, chunk_bytes: int = PREDICT_CHUNK_BYTES,
                    batch_rows: int = PREDICT_BATCH_ROWS, **overrides: Any) -> Iterator[CTRData]:
        """:meth:`read`'s rows in chunks of about ``chunk_bytes`` of text (``batch_rows`` rows of
        Parquet / Arrow), never all in memory; concatenated, they are :meth:`read`'s rows and their
        ``skipped`` counts add up to its."""
        opts = self._read_options(overrides)
        for chunk in iter_file(path, opts, keys=self.vocab is not None, chunk_bytes=chunk_bytes,
                               batch_rows=batch_rows):
            yield self._checked(chunk, path)

    def _read_options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        opts = {**self.reader, **overrides}
        if "format" not in overrides and opts.get("format") in ("train", "test"):
            opts["format"] = "auto"  # a test-format (unlabelled) file must be accepted too
        return opts

    def _checked(self, data: CTRData, path: str | Path) -> CTRData:
        if self.vocab is not None:
            data = apply_vocabulary(data, self.vocab)
        if tuple(int(x) for x in data.field_offsets) != self.schema.field_offsets:
            raise ValueError(f"{path}: its field layout differs from the trained models' "
                             f"({data.num_fields} fields, {data.table_rows} rows vs {self.schema.num_fields}, "
                             f"{self.schema.table_rows})")
        return data

    def predict_chunks(self, path: str | Path, batch_size: int | None = None, **read_options: Any
                       ) -> Iterator[tuple[CTRData, np.ndarray]]:
        """(chunk, probabilities [n, P]) for each of :meth:`read_chunks`' chunks (``read_options``
        go there), the next chunk parsed in a background thread while this one is scored: a file
        of any size in the memory of two chunks."""
        from mlfast.io.batches import background

        def produce(stop):
            for chunk in self.read_chunks(path, **read_options):
                if stop.is_set():
                    return
                yield chunk

        empty = np.zeros((0, len(self.labels)), np.float32)
        for chunk in background(produce, 1):
            yield chunk, (self.predict_proba(chunk, batch_size) if len(chunk) else empty)

    def predict_proba(self, data: str | Path | CTRData, batch_size: int | None = None) -> np.ndarray:
        """Probabilities [N, P] in input order (a path is read chunk by chunk: :meth:`predict_chunks`)."""
        if not isinstance(data, CTRData):
            parts = [p for _, p in self.predict_chunks(data, batch_size)]
            return np.concatenate(parts) if parts else np.zeros((0, len(self.labels)), np.float32)
        if tuple(int(x) for x in data.field_offsets) != self.schema.field_offsets:
            raise ValueError(f"{data.source or 'the data'}: its field layout differs from the trained models'")
        if not data.meta.get("format"):  # built by the caller, not by the reader: check its ids once
            check_ids_in_range(data)
        loader = BatchLoader(data, batch_size or eval_batch_size(self.device), device=self.device,
                             use_dense=self.use_dense)
        return predict_group(self.group, loader)[0]

    def predict(self, data: str | Path | CTRData, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """{peer label: probabilities [N], ..., "ensemble": mean probability [N]} in input order."""
        return self._named(self.predict_proba(data, batch_size))

    def _named(self, p: np.ndarray) -> dict[str, np.ndarray]:
        out = {name: p[:, i] for i, name in enumerate(self.labels)}
        out["ensemble"] = p.mean(1)
        return out

    def evaluate(self, data: str | Path | CTRData, batch_size: int | None = None, **read_options: Any
                 ) -> dict[str, dict]:
        """AUC / logloss of each peer and the ensemble (exact: over every row). A path is read chunk
        by chunk (``read_options``: :meth:`read_chunks`'), keeping only labels and probabilities."""
        if isinstance(data, CTRData):
            if data.labels is None:
                raise ValueError(f"{data.source}: has no labels, cannot evaluate (use predict)")
            return peer_metrics(data.labels, self.predict_proba(data, batch_size), self.labels)
        labels, probs = [], []
        for chunk, p in self.predict_chunks(data, batch_size, **read_options):
            if chunk.labels is None:
                raise ValueError(f"{data}: has no labels, cannot evaluate (use predict)")
            labels.append(chunk.labels)
            probs.append(p)
        if not probs or not sum(len(p) for p in probs):
            raise ValueError(f"{data}: holds no rows to evaluate")
        return peer_metrics(np.concatenate(labels), np.concatenate(probs), self.labels)

    def predict_file(self, path: str | Path, out: str | Path, batch_size: int | None = None,
                     **read_options: Any) -> dict[str, Any]:
        """Score a file of any size into the CSV ``out`` (:func:`write_predictions_csv`'s columns,
        written chunk by chunk to a temporary file renamed at the end): key column(s) first (the
        ``id_column`` read option's raw values, else each row's line number, or file and row for
        Parquet / Arrow), then one column per peer and ``ensemble``. Returns the rows written, the
        columns and the skipped-line counts."""
        rows, skipped = 0, {}
        with PredictionCSV(out) as csv:
            for chunk, p in self.predict_chunks(path, batch_size, **read_options):
                csv.write(self._named(p), prediction_keys(chunk))
                rows += len(chunk)
                for k, v in chunk.skipped.items():
                    skipped[k] = skipped.get(k, 0) + int(v)
            if csv.columns is None:  # not even a header line in the input
                csv.write(self._named(np.zeros((0, len(self.labels)), np.float32)), [("line", np.zeros(0, np.int64))])
        return {"rows": rows, "columns": csv.columns, "skipped": skipped}


def prediction_keys(data: CTRData) -> list[tuple[str, Any]]:
    """What joins a prediction back to its input row: the id column, else the row's place in the
    source (bad lines skipped leave gaps, so never the row's position in the result)."""
    if data.ids is not None:
        return [(data.ids.name, data.ids)]
    if data.lines is None:
        return [("row", np.arange(len(data)))]
    if data.meta.get("position") == "row":  # Parquet / Arrow: 0-based row of the file
        keys = [("row", data.lines)]
        if data.file_index is not None:
            keys.insert(0, ("file", np.asarray(data.meta["files"], dtype=object)[data.file_index]))
        return keys
    return [("line", data.lines)]


def eval_batch_size(device: torch.device | str) -> int:
    """Rows validation, ``eval`` and ``predict`` score at once on ``device``."""
    return EVAL_BATCH_SIZE if torch.device(device).type == "cuda" else CPU_EVAL_BATCH_SIZE


def inference_group(state: dict[str, Any], device: torch.device) -> PeerGroup:
    """The `PeerGroup` of a checkpoint (model.pt, best.pt or last.pt), without optimizer state."""
    specs = [PeerSpec.from_dict(p) for p in state["peers"]]
    schema = FeatureSchema.from_dict(state["schema"])
    cfg = state["config"]
    snaps = [state["state"]] if "state" in state else [b for b in state["best"] if b is not None]
    seeds = snaps[0]["tables"]["seeds"] if snaps else state["seeds"]
    group = PeerGroup.build(specs, schema, embedding_dim=cfg["embedding_dim"], seeds=seeds, kind="fused",
                            device=device)
    if "state" in state:
        group.restore(state["state"])
    else:  # best.pt: each peer's best weights, possibly from different steps
        for i, b in enumerate(state["best"]):
            if b is not None:
                group.restore(b, peers=[i])
    return group.eval()


def write_predictions_csv(preds: dict[str, np.ndarray], path: str | Path,
                          ids: tuple[str, Any] | list[tuple[str, Any]] | None = None) -> None:
    """CSV (UTF-8) with a header: ``ids``' column first (e.g. ``("line", data.lines)``, or a list of
    such (name, values) pairs: several columns), one column per peer, then ``ensemble``; one line
    per input row. A value holding a comma, a quote or a line break is quoted as RFC 4180 does.

        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "p.csv")
        >>> write_predictions_csv({"ensemble": np.array([0.25])}, p, ids=("id", ["a,b"]))
        >>> print(open(p).read(), end="")
        id,ensemble
        "a,b",0.25
    """
    with PredictionCSV(path) as csv:
        csv.write(preds, ids)


def _quoted(values: Any) -> np.ndarray:
    v = np.asarray(values).astype(str)
    special = np.zeros(v.shape, bool)
    for c in (",", '"', "\n", "\r"):
        special |= np.char.find(v, c) >= 0
    if not special.any():
        return v
    return np.where(special, np.char.add(np.char.add('"', np.char.replace(v, '"', '""')), '"'), v)


class PredictionCSV:
    """The predictions CSV written in parts (:func:`write_predictions_csv`'s format): ``write``
    appends rows (the header with the first part), into ``PATH.tmp`` renamed to ``PATH`` when the
    ``with`` block ends without an error (removed when it raises): never a partial file at PATH."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.columns: list[str] | None = None
        self._f = None

    def __enter__(self) -> "PredictionCSV":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.tmp, "w", encoding="utf-8", newline="")
        return self

    def write(self, preds: dict[str, np.ndarray], ids: tuple[str, Any] | list[tuple[str, Any]] | None = None) -> None:
        id_cols = [] if ids is None else [ids] if isinstance(ids, tuple) else list(ids)
        names = [name for name, _ in id_cols] + list(preds)
        if self.columns is None:
            self.columns = names
            self._f.write(",".join(_quoted(np.asarray(names, dtype=object)).tolist()) + "\n")
        elif names != self.columns:
            raise ValueError(f"predictions with columns {names} after {self.columns}")
        cols = [_quoted(values) for _, values in id_cols] + [np.char.mod("%.6g", preds[n]) for n in preds]
        if cols and len(cols[0]):
            np.savetxt(self._f, np.stack(cols, 1), fmt="%s", delimiter=",")

    def __exit__(self, kind, exc, tb) -> None:
        self._f.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- phases
class Session:
    """One prepared dataset, its loaders and the run-level state the training phases share."""

    def __init__(self, prep: Prepared, cfg: TrainConfig, device=None, log: Callable | None = None):
        self.prep = prep
        self.cfg = cfg
        self.log = log or globals()["log"].info
        self.device = resolve_device(device if device is not None else cfg.device)
        self.schema = FeatureSchema.from_data(prep.train_data, use_dense=cfg.use_dense)
        n_train = len(prep.splits["train"])
        # an epoch's lookups outnumber the table's rows: the data will touch most of them
        self.dense_touch = n_train * self.schema.num_fields >= self.schema.table_rows
        self.batch_size = cfg.resolved_batch_size(n_train)
        if cfg.batch_size is not None:
            check_batch_size(cfg.batch_size, n_train)
        ebs = max(self.batch_size, eval_batch_size(self.device))
        sp = prep.splits
        ids_dtype = torch.int32 if self.schema.table_rows < 2**31 else torch.int64
        common = {"device": self.device, "use_dense": cfg.use_dense, "ids_dtype": ids_dtype}
        self.loaders = {
            "train": sp["train"].loader(self.batch_size, shuffle=True, seed=cfg.seed, min_last=2, **common),
            "valid": sp["valid"].loader(ebs, **common),
            "test": sp["test"].loader(ebs, **common) if sp["test"] else None,
        }
        dropped = n_train % self.batch_size == 1
        if dropped:
            self.log("note: the last batch of each epoch would hold 1 row, which BatchNorm cannot normalise: it is "
                     "left out (a different row each epoch, the training order being shuffled)")
        self.extra = {"reader": prep.reader, "data": prep.info,
                      "vocab": prep.vocab.to_state() if prep.vocab is not None else None}

    def evaluate(self, trainer: MutualTrainer) -> dict[str, Any]:
        """{"valid": metrics, "test": metrics} of the trainer's weights (None for a split not given).
        The validation split is not predicted again when the run ended on the weights it validated
        last (``trainer.final_valid``): those metrics are the ones it would compute."""
        out = {}
        fv = trainer.final_valid
        for name in ("valid", "test"):
            loader = self.loaders[name]
            if loader is None:
                out[name] = None
            elif name == "valid" and fv is not None and fv[0] is loader:
                out[name] = copy.deepcopy(fv[1])
            else:
                out[name] = trainer.evaluate(loader)
        return out

    def predictions(self, trainer: MutualTrainer) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
        """{split: (probabilities [N, P], labels [N])} for valid and test."""
        return {name: (trainer.predict(self.loaders[name]) if self.loaders[name] is not None else None)
                for name in ("valid", "test")}

    def train_group(self, specs: Sequence[PeerSpec], out: Path | None, *, cfg: TrainConfig | None = None,
                    init_states=None, lr: float | None = None, resume: bool = False,
                    evaluate_first: bool = False) -> tuple[MutualTrainer, dict]:
        """Train ``specs`` together (one peer = alone); a finished phase in ``out`` is loaded, not redone."""
        cfg = cfg or self.cfg
        t = MutualTrainer(specs, self.schema, cfg, device=self.device, init_states=init_states, lr=lr,
                          dense_touch=self.dense_touch)
        t._extra_state = self.extra
        done = _finished(out) if resume else None
        if done is not None and done.get("epochs", cfg.epochs) >= cfg.epochs:
            t.load_finished(out)
            return t, done["summary"] if "summary" in done else done
        if out is not None:
            (out / "finished.json").unlink(missing_ok=True)  # a stale (or extended) phase is not done
        board = None
        if cfg.tensorboard and out is not None:
            from mlfast.report import TensorBoardScalars

            board = TensorBoardScalars(out / "tensorboard")
            t.listeners.append(board)
        try:
            summary = t.fit(self.loaders["train"], self.loaders["valid"], out,
                            resume=resume and out is not None and (out / "last.pt").exists(),
                            extra_state=self.extra, evaluate_first=evaluate_first)
        finally:
            if board is not None:
                board.close()
        if out is not None:
            ckpt.save_checkpoint(out / MODEL_FILE, {"kind": "model", "state": t.group.snapshot(), **t._meta()})
            ckpt.fault_point("after_model")
            ckpt.write_json(out / "finished.json", {"epochs": cfg.epochs, "summary": summary})
        return t, summary

    def pretrain(self, specs: Sequence[PeerSpec], out: Path | None, resume: bool = False):
        """Each peer alone (the paper's step 1). Returns per label: its weights, its valid/test
        metrics, its training summary and its valid/test predictions."""
        states, metrics, summaries, preds = {}, {}, {}, {}
        for spec in specs:
            self.log(f"pretraining {spec.label} alone")
            sub = out / f"solo_{spec.label}" if out is not None else None
            t, summaries[spec.label] = self.train_group([spec], sub, resume=resume)
            states[spec.label] = t.group.snapshot()
            preds[spec.label] = self.predictions(t)
            metrics[spec.label] = {k: (peer_metrics(v[1], v[0], [spec.label]) if v is not None else None)
                                   for k, v in preds[spec.label].items()}
        return states, metrics, summaries, preds

    def finetune(self, specs: Sequence[PeerSpec], solo_states: dict, out: Path | None, resume: bool = False):
        """All peers from their solo weights, trained mutually (the paper's step 2)."""
        cfg = self.cfg.replace(epochs=self.cfg.finetune_epochs)
        how = "mutually" if len(specs) > 1 else "alone (control: same schedule, no peer term)"
        self.log(f"fine-tuning {'+'.join(s.label for s in specs)} {how}")
        t, summary = self.train_group(specs, out, cfg=cfg, init_states=[solo_states[s.label] for s in specs],
                                      lr=self.cfg.finetune_lr or self.cfg.lr, resume=resume, evaluate_first=True)
        return t, self.evaluate(t), summary


def _finished(run: Path | None) -> dict | None:
    if run is None or not (run / "finished.json").is_file() or not (run / MODEL_FILE).is_file():
        return None
    return json.loads((run / "finished.json").read_text())


# ------------------------------------------------------------------------------ run directories
def _saved_run(out_dir: Path) -> dict | None:
    f = out_dir / "config.json"
    return json.loads(f.read_text()) if f.is_file() else None


def resume_settings(out_dir: Path, given: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any], dict[str, Any], list[str]]:
    """The saved configuration of the run in ``out_dir`` with the settings ``given`` again applied
    (``{"config": {...}, "reader": {...}, "data": {"train":..., "valid":..., "test":...}}``);
    ValueError naming every given setting that differs from the saved run but cannot change on
    resume. Returns (config, reader options, data paths, changed settings)."""
    saved = _saved_run(out_dir)
    if saved is None:
        raise FileNotFoundError(f"--resume: {out_dir} holds no mlfast run (no config.json)")
    cfg = dict(saved["config"])
    conflicts: list[tuple[str, Any, Any]] = []
    changed = []
    for k, v in given.get("config", {}).items():
        if k not in cfg:
            conflicts.append((k, None, v))
        elif _norm(cfg[k]) != _norm(v):
            if k in RESUME_MUTABLE:
                cfg[k] = v
                changed.append(k)
            else:
                conflicts.append((k, cfg[k], v))
    reader = dict(saved["reader"])
    for k, v in given.get("reader", {}).items():
        if _norm(reader.get(k)) != _norm(v):
            conflicts.append((f"reader.{k}", reader.get(k), v))
    data = {k: saved["data"].get(k) for k in ("train", "valid", "test")}
    for k, v in given.get("data", {}).items():
        if v is not None and data.get(k) is not None and Path(v).resolve() != Path(data[k]).resolve():
            conflicts.append((f"data.{k}", data[k], v))
    if conflicts:
        raise ResumeConflict(
            f"--resume: these settings differ from the saved run in {out_dir} and cannot change on resume (only "
            f"{', '.join(sorted(RESUME_MUTABLE))} can): "
            + "; ".join(f"{k}: saved {s!r}, given {g!r}" for k, s, g in conflicts), conflicts)
    return TrainConfig.from_dict(cfg), reader, data, changed


def _norm(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_norm(x) for x in v]
    if isinstance(v, list):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def prepare_run_dir(out_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Check (and with ``overwrite`` clear) the run directory; True when it did not exist before."""
    if resume:
        if not out_dir.is_dir():
            raise FileNotFoundError(f"--resume: run directory not found: {out_dir}")
        return False
    if out_dir.exists() and not out_dir.is_dir():
        raise RunExists(f"--out {out_dir} is a file, not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise RunExists(f"--out {out_dir} already holds files (a previous run?): pass --resume to continue it, "
                            f"--overwrite to replace it, or choose another --out")
        if not (out_dir / "config.json").is_file():
            raise RunExists(f"--overwrite: {out_dir} does not look like an mlfast run directory (no config.json); "
                            "refusing to delete it")
        shutil.rmtree(out_dir)
    return not out_dir.exists()


# ----------------------------------------------------------------------------------------- fit
@dataclass
class FitResult:
    """What `fit` returns: metrics, the trained peers and a predictor for new data."""

    metrics: dict[str, Any]
    predictor: Predictor
    out_dir: Path | None = None
    history: list[dict] = field(default_factory=list)
    already_finished: bool = False

    @property
    def models(self) -> list:
        return self.predictor.models

    @property
    def peers(self) -> list[str]:
        return self.predictor.labels

    def predict(self, data, batch_size: int | None = None) -> dict[str, np.ndarray]:
        return self.predictor.predict(data, batch_size)

    def evaluate(self, data, batch_size: int | None = None) -> dict[str, dict[str, float]]:
        return self.predictor.evaluate(data, batch_size)


def fit(
    train: str | Path | CTRData | None,
    valid: str | Path | CTRData | None = None,
    test: str | Path | CTRData | None = None,
    *,
    peers: str | Sequence[str] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    reader: dict[str, Any] | None = None,
    log: Callable | None = None,
    log_file: bool = False,
    **config: Any,
) -> FitResult:
    """Train peers mutually on ``train`` and report per-peer and ensemble AUC / logloss.

    ``config`` takes any `TrainConfig` field (``epochs``, ``batch_size``, ``lr``, ``alpha``,
    ``mutual``, ``regime``, ``seed``, ``device`` ...); ``reader`` any `reader_options` key
    (hashing, ``min_count`` for vocabulary mode, ``schema`` for generic logs). Without ``valid``
    the training file is split 8:1:1 (seeded by ``seed``) into train / valid / test.
    ``regime="finetune"`` trains each peer alone first, then all mutually from those weights,
    and reports each peer's solo vs mutual metrics (``metrics["solo_vs_mutual"]``).

    ``out``: the run directory; an existing one needs ``resume=True`` (continue it: its saved
    configuration is the default, ``config`` given again must agree except `RESUME_MUTABLE`, e.g.
    ``epochs`` to train a finished run longer) or ``overwrite=True``. ``log_file``: also write the
    ``mlfast`` logger's messages to ``<out>/train.log``.
    """
    with _RunLog(Path(out) if (out is not None and log_file) else None) as run_log:
        return _fit(train, valid, test, peers=peers, out=out, resume=resume, overwrite=overwrite, reader=reader,
                    log=log, run_log=run_log, **config)


class _RunLog:
    """Collects the ``mlfast`` logger's records from the start of `fit` and, once the run directory
    exists, writes them (and every later one) to ``train.log`` there."""

    def __init__(self, out_dir: Path | None):
        self.out_dir = out_dir
        self.buffer: list[logging.LogRecord] = []
        self.file: logging.Handler | None = None
        self.catch: logging.Handler | None = None

    def __enter__(self) -> "_RunLog":
        if self.out_dir is not None:
            self.catch = _ListHandler(self.buffer)
            logging.getLogger("mlfast").addHandler(self.catch)
            logging.getLogger("mlfast").setLevel(min(logging.getLogger("mlfast").level or logging.INFO, logging.INFO))
        return self

    def start_file(self) -> None:
        if self.out_dir is None or self.file is not None:
            return
        self.file = logging.FileHandler(self.out_dir / "train.log")
        self.file.setLevel(logging.INFO)
        self.file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        for r in self.buffer:
            if r.levelno >= logging.INFO:
                self.file.handle(r)
        logging.getLogger("mlfast").addHandler(self.file)
        logging.getLogger("mlfast").removeHandler(self.catch)
        self.catch = None

    def __exit__(self, *exc) -> None:
        logger = logging.getLogger("mlfast")
        if exc[0] is not None and self.file is not None:
            logger.error("%s: %s", exc[0].__name__, exc[1])
        for h in (self.catch, self.file):
            if h is not None:
                logger.removeHandler(h)
                h.close()


class _ListHandler(logging.Handler):
    def __init__(self, records: list):
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def plan_run(train, valid, test, peers, out_dir: Path | None, resume: bool, overwrite: bool, reader, config: dict,
             say: Callable) -> dict[str, Any]:
    """The decisions about the run directory and the settings, before any data is read: with
    ``resume`` the saved run's settings and data (given ones checked against them), else the given
    ones. Returns ``{"config", "reader", "train", "valid", "test", "resume", "split_from_train",
    "created", "finished"}``; ``finished`` holds the metrics of a finished run that nothing asks to
    extend (then nothing else is to be done). One process (`fit`) and rank 0 of a job
    (`mlfast.dist.run.fit`) decide alike."""
    if resume and out_dir is None:
        raise ValueError("resume needs the run directory (out=...)")
    created = prepare_run_dir(out_dir, resume, overwrite) if out_dir is not None else False
    if resume and _saved_run(out_dir) is not None:
        given = {"config": dict(config, **({"peers": [str(s) for s in parse_peers(peers)]} if peers else {})),
                 "reader": {k: v for k, v in reader_options(**(reader or {})).items() if reader and k in reader},
                 "data": {"train": None if isinstance(train, CTRData) else train,
                          "valid": None if isinstance(valid, CTRData) else valid,
                          "test": None if isinstance(test, CTRData) else test}}
        cfg, ropts, paths, changed = resume_settings(out_dir, given)
        train = train if train is not None else paths["train"]
        valid = valid if valid is not None else paths["valid"]
        test = test if test is not None else paths["test"]
        done = (out_dir / "finished.json").is_file() and (out_dir / "metrics.json").is_file()
        if done and not _extends(out_dir, cfg):
            say(f"the run in {out_dir} already finished ({_stopped(out_dir)}); nothing to do. Pass a larger "
                f"--epochs to train it longer.")
            return {"config": cfg.to_dict(), "finished": json.loads((out_dir / "metrics.json").read_text())}
        if changed:
            say(f"resuming {out_dir} with changed settings: {', '.join(changed)}")
        split_from_train = paths["valid"] is None
    else:
        if resume:
            say(f"--resume: {out_dir} holds no run yet: starting from the beginning")
            resume = False
        specs = parse_peers(peers if peers is not None else TrainConfig().peers)
        cfg = TrainConfig(peers=[str(s) for s in specs], **config)
        ropts = reader_options(**(reader or {}))
        split_from_train = valid is None
    if train is None:
        raise ValueError("no training data given")
    return {"config": cfg.to_dict(), "reader": ropts, "train": train, "valid": valid, "test": test,
            "resume": resume, "split_from_train": split_from_train, "created": created, "finished": None}


def _fit(train, valid, test, *, peers, out, resume, overwrite, reader, log, run_log: _RunLog, **config) -> FitResult:
    t_start = time.perf_counter()
    say = log or globals()["log"].info
    out_dir = Path(out) if out is not None else None
    plan = plan_run(train, valid, test, peers, out_dir, resume, overwrite, reader, config, say)
    cfg = TrainConfig.from_dict(plan["config"])
    if plan["finished"] is not None:
        return FitResult(plan["finished"], Predictor.load(out_dir, cfg.device), out_dir, [], already_finished=True)
    specs = parse_peers(cfg.peers)
    train, valid, test, ropts = plan["train"], plan["valid"], plan["test"], plan["reader"]
    resume, created, split_from_train = plan["resume"], plan["created"], plan["split_from_train"]
    try:
        prep = prepare_data(train, valid if not split_from_train else None, test if not split_from_train else None,
                            reader=ropts, split_seed=cfg.seed)
        s = Session(prep, cfg, log=say)
    except BaseException:
        if created and out_dir is not None and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    say(f"data: {prep.info['rows']} rows, {s.schema.num_fields} fields, {s.schema.table_rows:,} table rows; "
        f"read in {prep.info['read_seconds']:.1f}s; batch size {s.batch_size}; device {s.device}")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(out_dir / "config.json", {"config": cfg.to_dict(), "peers": [p.to_dict() for p in specs],
                                                  "schema": s.schema.to_dict(), "reader": prep.reader,
                                                  "data": prep.info})
        if prep.vocab is not None:
            prep.vocab.save(out_dir / "vocab.npz")
        run_log.start_file()
    try:
        result = _train(s, specs, cfg, out_dir, resume, say, t_start)
    except BaseException:
        if created and out_dir is not None and not any(out_dir.rglob("last.pt")):
            shutil.rmtree(out_dir, ignore_errors=True)  # nothing worth keeping: no checkpoint was written
        raise
    return result


def _extends(out_dir: Path, cfg: TrainConfig) -> bool:
    """Whether ``cfg`` asks a finished run for more training than it got: more epochs, a step limit
    it stopped at raised (or lifted), or a patience it ran out of raised."""
    done = json.loads((out_dir / "finished.json").read_text())
    s = done.get("summary", {})
    if cfg.regime == "finetune":
        more_epochs = cfg.finetune_epochs > done.get("finetune_epochs", cfg.finetune_epochs)
    else:
        more_epochs = cfg.epochs > done.get("epochs", cfg.epochs)
    stopped = s.get("stopped")
    if stopped == "max_steps":
        return cfg.max_steps is None or cfg.max_steps > int(s.get("steps", 0))
    if stopped == "early_stopping":
        return cfg.patience > int(done.get("patience", cfg.patience))
    return more_epochs


def _stopped(out_dir: Path) -> str:
    done = json.loads((out_dir / "finished.json").read_text())
    s = done.get("summary", {})
    return f"stopped: {s.get('stopped', '?')} at step {s.get('steps', '?')}"


def _plot_in_background(history: list[dict], specs: Sequence[PeerSpec], cfg: TrainConfig,
                        out_dir: Path | None) -> Callable[[], None]:
    """Start rendering ``curves.png`` on a thread (it needs only the finished history, so it overlaps
    the test evaluation); returns the wait for it, which raises the plot's error if it failed."""
    if out_dir is None:
        return lambda: None
    errors: list[BaseException] = []

    def run() -> None:
        try:
            plot_curves(history, [p.label for p in specs], out_dir / "curves.png",
                        title=f"{'+'.join(p.label for p in specs)} ({cfg.mutual}, alpha={cfg.alpha})")
        except BaseException as e:  # noqa: BLE001 - raised on the waiting thread
            errors.append(e)

    thread = threading.Thread(target=run, name="mlfast-plot", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if errors:
            raise errors[0]
    return wait


def _train(s: Session, specs: list[PeerSpec], cfg: TrainConfig, out_dir: Path | None, resume: bool,
           say: Callable, t_start: float) -> FitResult:
    metrics: dict[str, Any] = {"peers": [p.label for p in specs], "regime": cfg.regime, "batch_size": s.batch_size}
    t_train = time.perf_counter()
    if out_dir is not None:
        (out_dir / "finished.json").unlink(missing_ok=True)
    if cfg.regime == "joint":
        final, summary = s.train_group(specs, out_dir, resume=resume)
        plotted = _plot_in_background(final.progress.history, specs, cfg, out_dir)
        metrics.update(s.evaluate(final), train=summary)
    else:
        solo_states, solo_metrics, solo_summaries, _ = s.pretrain(specs, out_dir, resume)
        model_dir = out_dir / "mutual" if out_dir is not None else None
        final, mutual, summary = s.finetune(specs, solo_states, model_dir, resume)
        split = "test" if s.loaders["test"] is not None else "valid"
        rows = solo_vs_mutual_rows({k: v[split][k] for k, v in solo_metrics.items()},
                                   {k: mutual[split][k] for k in solo_metrics})
        metrics.update(mutual, solo=solo_metrics, solo_train=solo_summaries, train=summary,
                       solo_vs_mutual={"split": split, "rows": rows})
        plotted = _plot_in_background(final.progress.history, specs, cfg, out_dir)
    history = final.progress.history
    tr = metrics["train"]
    metrics["timing"] = {"read_and_setup": round(t_train - t_start, 3), "training": round(tr["train_seconds"], 3),
                         "validation": round(tr.get("validate_seconds") or 0.0, 3),
                         "fit_total": round(time.perf_counter() - t_start, 3)}
    if out_dir is not None:
        if cfg.regime != "joint":
            ckpt.save_checkpoint(out_dir / MODEL_FILE, {"kind": "model", "state": final.group.snapshot(),
                                                        **final._meta()})
        ckpt.write_json(out_dir / "metrics.json", metrics)
        write_curves_csv(history, out_dir / "curves.csv")
        plotted()
        ckpt.fault_point("before_finished")
        ckpt.write_json(out_dir / "finished.json", {"epochs": cfg.epochs, "finetune_epochs": cfg.finetune_epochs,
                                                    "patience": cfg.patience,
                                                    "summary": metrics["train"]})
    predictor = Predictor(final.group, s.prep.reader, cfg.use_dense, s.device, s.prep.vocab)
    return FitResult(metrics=metrics, predictor=predictor, out_dir=out_dir, history=list(history))


def load_run(run_dir: str | Path, device=None) -> Predictor:
    """A finished (or interrupted) run's peers, ready to predict: ``load_run("runs/x").predict(path)``."""
    return Predictor.load(run_dir, device)
