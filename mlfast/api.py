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

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mlfast.train import checkpoint as ckpt
from mlfast.io.batches import BatchLoader, split_indices
from mlfast.train.config import TrainConfig
from mlfast.io.data import CTRData
from mlfast.train.metrics import peer_metrics
from mlfast.models import CTRModel, FeatureSchema, PeerSpec, build_model, parse_peers
from mlfast.report import metrics_table, plot_curves, solo_vs_mutual_rows, solo_vs_mutual_table, write_curves_csv
from mlfast.train.trainer import MutualTrainer, peer_seed, resolve_device

SPLIT_RATIOS = (8, 1, 1)
EVAL_BATCH_SIZE = 16384
MODEL_FILE = "model.pt"

READER_DEFAULTS: dict[str, Any] = {
    "format": "auto",
    "hash_buckets": None,
    "hash_seed": 0,
    "int_buckets": True,
    "on_bad_line": "error",
    "cache": True,
    "num_threads": None,
    "schema": None,  # a DelimitedSchema (as a dict) for generic delimited logs
    "min_count": None,  # vocabulary mode (FuxiCTR/BARS): values seen < min_count times -> OOV
}


def reader_options(**overrides: Any) -> dict[str, Any]:
    """The reader settings of a run (stored with it so eval/predict parse new files identically)."""
    unknown = set(overrides) - set(READER_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown reader options: {', '.join(sorted(unknown))}")
    opts = {**READER_DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    if opts["min_count"] is not None and int(opts["min_count"]) < 1:
        raise ValueError(f"min_count={opts['min_count']!r}: expected an integer >= 1")
    if opts["schema"] is not None and not isinstance(opts["schema"], dict):
        opts["schema"] = dataclasses.asdict(opts["schema"])
    return opts


def read_file(path: str | Path, options: dict[str, Any], keys: bool = False) -> CTRData:
    """Read one file with the run's reader options (``keys=True``: raw 64-bit keys, for vocabularies)."""
    from mlfast.io.reader import DelimitedSchema, read

    kw = {k: v for k, v in options.items() if k not in ("schema", "min_count")}
    if options.get("schema") is not None:
        kw["format"] = "delimited"
        # A run stored before quoting existed has no "quote": it read quotes as plain bytes.
        kw["schema"] = DelimitedSchema(**{"quote": None, **options["schema"]})
    return read(str(path), keys=keys, **kw)


def _check_same_layout(ref: CTRData, other: CTRData, what: str) -> None:
    if list(ref.field_names) != list(other.field_names) or not np.array_equal(
            np.asarray(ref.field_offsets), np.asarray(other.field_offsets)):
        raise ValueError(f"{what} ({other.source}) has a different field layout than the training data "
                         f"({ref.source}): read both with the same format and hashing options")


# ------------------------------------------------------------------------------- data preparation
@dataclass
class Split:
    """A dataset with the rows of one split (None = all rows)."""

    data: CTRData
    indices: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.data) if self.indices is None else len(self.indices)

    def loader(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, device=None,
               use_dense: bool = False) -> BatchLoader:
        return BatchLoader(self.data, batch_size, indices=self.indices, shuffle=shuffle, seed=seed,
                           device=device, use_dense=use_dense)


@dataclass
class Prepared:
    """Train / valid / test splits in the embedding layout, and how they were made."""

    splits: dict[str, Split | None]
    reader: dict[str, Any]
    vocab: Any = None  # mlfast.io.vocab.Vocabulary in vocabulary mode
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def train_data(self) -> CTRData:
        return self.splits["train"].data


def prepare_data(train: str | Path | CTRData, valid=None, test=None, *, reader: dict[str, Any] | None = None,
                 split_seed: int = 0) -> Prepared:
    """Read the files (or take CTRData as is) and make the splits.

    Without ``valid`` the training file is split 8:1:1 (seeded by ``split_seed``); ``test``
    without ``valid`` is refused. With ``reader["min_count"]`` the vocabulary is counted on the
    training rows only, then applied to every split (unseen values -> the field's OOV row).
    """
    ropts = reader_options(**(reader or {}))
    vocab_mode = ropts["min_count"] is not None
    if test is not None and valid is None:
        raise ValueError("a test file without a validation file: give a validation file too, or neither "
                         "(then the training file is split 8:1:1)")

    def load(x, what):
        if x is None:
            return None
        if isinstance(x, CTRData):
            if vocab_mode and not x.meta.get("keys"):
                raise ValueError(f"{what}: vocabulary mode needs data read with keys=True")
            d = x
        else:
            d = read_file(x, ropts, keys=vocab_mode)
        if d.labels is None:
            raise ValueError(f"{what} ({d.source}) has no labels (test format): it cannot be used to train or evaluate")
        return d

    t0 = time.perf_counter()
    tr, va, te = load(train, "training data"), load(valid, "validation data"), load(test, "test data")
    for what, d in (("validation data", va), ("test data", te)):
        if d is not None:
            _check_same_layout(tr, d, what)
    if va is None:
        i_tr, i_va, i_te = split_indices(len(tr), SPLIT_RATIOS, split_seed)
    else:
        i_tr = i_va = i_te = None
    vocab = None
    if vocab_mode:
        from mlfast.io.vocab import Vocabulary

        vocab = Vocabulary.fit(tr.sparse, tr.field_names, int(ropts["min_count"]), rows=i_tr, bags=tr.bags)
        tr = apply_vocabulary(tr, vocab)
        va = apply_vocabulary(va, vocab) if va is not None else None
        te = apply_vocabulary(te, vocab) if te is not None else None
    if va is None:
        splits = {"train": Split(tr, i_tr), "valid": Split(tr, i_va), "test": Split(tr, i_te)}
    else:
        splits = {"train": Split(tr), "valid": Split(va), "test": Split(te) if te is not None else None}
    info = {
        "train": tr.source, "valid": va.source if va is not None else None, "test": te.source if te is not None else None,
        "split": None if valid is not None else {"ratios": list(SPLIT_RATIOS), "seed": split_seed},
        "rows": {k: len(v) for k, v in splits.items() if v is not None},
        "skipped": dict(tr.skipped), "read_seconds": time.perf_counter() - t0,
    }
    return Prepared(splits, ropts, vocab, info)


def apply_vocabulary(data: CTRData, vocab) -> CTRData:
    """Keys -> row ids of ``vocab`` (a new CTRData; dense and labels shared)."""
    if not data.meta.get("keys"):
        raise ValueError(f"{data.source}: vocabulary mode needs data read with keys=True")
    meta = {**data.meta, "keys": False, "min_count": vocab.min_count}
    return dataclasses.replace(data, sparse=vocab.transform(data.sparse), bags=vocab.transform_bags(data.bags),
                               field_offsets=vocab.field_offsets, meta=meta)


# ------------------------------------------------------------------------------------ predictor
class Predictor:
    """Trained peers (plain PyTorch, no training state) that score CTRData or files.

    ``Predictor.load(run_dir)`` loads ``model.pt`` (written when a run finishes), falling back to
    ``best.pt`` / ``last.pt`` of an unfinished run.
    """

    def __init__(self, specs: Sequence[PeerSpec], schema: FeatureSchema, states: Sequence[dict],
                 reader: dict[str, Any], embedding_dim: int = 16, use_dense: bool = False, device=None,
                 vocab=None):
        self.specs = list(specs)
        self.labels = [s.label for s in self.specs]
        self.schema = schema
        self.reader = dict(reader)
        self.vocab = vocab
        self.use_dense = use_dense
        self.device = resolve_device(device)
        self.models: list[CTRModel] = []
        for spec, st in zip(self.specs, states):
            m = build_model(spec, schema, embedding_dim)
            m.load_state_dict(st)
            self.models.append(m.to(self.device).eval())

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
            raise FileNotFoundError(f"{run}: no {MODEL_FILE}, best.pt or last.pt (is this an mlfast run directory?)")
        cfg = state["config"]
        vocab = None
        if state.get("vocab") is not None:
            from mlfast.io.vocab import Vocabulary

            vocab = Vocabulary.from_state(state["vocab"])
        return cls([PeerSpec.from_dict(p) for p in state["peers"]], FeatureSchema.from_dict(state["schema"]),
                   state["peer_states"], state.get("reader", READER_DEFAULTS), cfg["embedding_dim"],
                   cfg["use_dense"], device, vocab)

    def read(self, path: str | Path, **overrides: Any) -> CTRData:
        """Read a file exactly as the training data was read (same format options, hashing or vocabulary)."""
        opts = {**self.reader, **overrides}
        if "format" not in overrides and opts.get("format") in ("train", "test"):
            opts["format"] = "auto"  # a test-format (unlabelled) file must be accepted too
        data = read_file(path, opts, keys=self.vocab is not None)
        if self.vocab is not None:
            data = apply_vocabulary(data, self.vocab)
        if tuple(int(x) for x in data.field_offsets) != self.schema.field_offsets:
            raise ValueError(f"{path}: its field layout differs from the trained models' "
                             f"({data.num_fields} fields, {data.table_rows} rows vs {self.schema.num_fields}, "
                             f"{self.schema.table_rows})")
        return data

    @torch.no_grad()
    def predict_proba(self, data: str | Path | CTRData, batch_size: int = EVAL_BATCH_SIZE) -> np.ndarray:
        """Probabilities [N, P] in input order."""
        if not isinstance(data, CTRData):
            data = self.read(data)
        loader = BatchLoader(data, batch_size, device=self.device, use_dense=self.use_dense)
        out = []
        for b in loader.epoch(0):
            out.append(torch.stack([torch.sigmoid(m(b.sparse, b.dense, b.bags).float()) for m in self.models], 1))
        return torch.cat(out).cpu().numpy() if out else np.zeros((0, len(self.models)), np.float32)

    def predict(self, data: str | Path | CTRData, batch_size: int = EVAL_BATCH_SIZE) -> dict[str, np.ndarray]:
        """{peer label: probabilities [N], ..., "ensemble": mean probability [N]} in input order."""
        p = self.predict_proba(data, batch_size)
        out = {name: p[:, i] for i, name in enumerate(self.labels)}
        out["ensemble"] = p.mean(1)
        return out

    def evaluate(self, data: str | Path | CTRData, batch_size: int = EVAL_BATCH_SIZE) -> dict[str, dict[str, float]]:
        if not isinstance(data, CTRData):
            data = self.read(data)
        if data.labels is None:
            raise ValueError(f"{data.source}: has no labels, cannot evaluate (use predict)")
        return peer_metrics(data.labels, self.predict_proba(data, batch_size), self.labels)


def write_predictions_csv(preds: dict[str, np.ndarray], path: str | Path) -> None:
    """CSV with a header (one column per peer, then ``ensemble``), one row per input row."""
    names = list(preds)
    cols = np.stack([preds[n] for n in names], 1) if names else np.zeros((0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(",".join(names) + "\n")
        np.savetxt(f, cols, fmt="%.6g", delimiter=",")


# ---------------------------------------------------------------------------------- phases
class Session:
    """One prepared dataset, its loaders and the run-level state the training phases share."""

    def __init__(self, prep: Prepared, cfg: TrainConfig, device=None, log: Callable = print):
        self.prep = prep
        self.cfg = cfg
        self.log = log
        self.device = resolve_device(device if device is not None else cfg.device)
        self.schema = FeatureSchema.from_data(prep.train_data, use_dense=cfg.use_dense)
        self.batch_size = cfg.resolved_batch_size(len(prep.splits["train"]))
        ebs = max(self.batch_size, EVAL_BATCH_SIZE)
        sp = prep.splits
        self.loaders = {
            "train": sp["train"].loader(self.batch_size, shuffle=True, seed=cfg.seed, device=self.device,
                                        use_dense=cfg.use_dense),
            "valid": sp["valid"].loader(ebs, device=self.device, use_dense=cfg.use_dense),
            "test": sp["test"].loader(ebs, device=self.device, use_dense=cfg.use_dense) if sp["test"] else None,
        }
        self.extra = {"reader": prep.reader, "data": prep.info,
                      "vocab": prep.vocab.to_state() if prep.vocab is not None else None}

    def evaluate(self, trainer: MutualTrainer) -> dict[str, Any]:
        return {name: (trainer.evaluate(self.loaders[name]) if self.loaders[name] is not None else None)
                for name in ("valid", "test")}

    def predictions(self, trainer: MutualTrainer) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
        """{split: (probabilities [N, P], labels [N])} for valid and test."""
        return {name: (trainer.predict(self.loaders[name]) if self.loaders[name] is not None else None)
                for name in ("valid", "test")}

    def train_group(self, specs: Sequence[PeerSpec], out: Path | None, *, cfg: TrainConfig | None = None,
                    init_states=None, lr: float | None = None, resume: bool = False,
                    evaluate_first: bool = False) -> tuple[MutualTrainer, dict]:
        """Train ``specs`` together (one peer = alone); a finished phase in ``out`` is loaded, not redone."""
        cfg = cfg or self.cfg
        t = MutualTrainer(specs, self.schema, cfg, device=self.device, init_states=init_states, lr=lr)
        done = _finished(out) if resume else None
        if done is not None:
            t.load_finished(out)
            return t, done
        if out is not None and not resume:
            (out / "finished.json").unlink(missing_ok=True)  # a stale phase must not be taken as done
        summary = t.fit(self.loaders["train"], self.loaders["valid"], out,
                        resume=resume and out is not None and (out / "last.pt").exists(),
                        extra_state=self.extra, evaluate_first=evaluate_first)
        if out is not None:
            save_model(t, out / MODEL_FILE, out)
            ckpt.write_json(out / "finished.json", summary)
        return t, summary

    def pretrain(self, specs: Sequence[PeerSpec], out: Path | None, resume: bool = False):
        """Each peer alone (the paper's step 1). Returns per label: its weights, its valid/test
        metrics, its training summary and its valid/test predictions."""
        states, metrics, summaries, preds = {}, {}, {}, {}
        for spec in specs:
            self.log(f"pretraining {spec.label} alone")
            sub = out / f"solo_{spec.label}" if out is not None else None
            t, summaries[spec.label] = self.train_group([spec], sub, resume=resume)
            states[spec.label] = t.peer_states()[0]
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


def save_model(trainer: MutualTrainer, path: Path, run_dir: Path) -> None:
    """Write the trainer's final peers as ``path`` (what eval/predict load). When they are the
    best-by-validation weights already in ``run_dir/best.pt`` (the usual case: the trainer restores
    them at the end), the file is hard-linked instead of written again: tables can be gigabytes."""
    best = run_dir / "best.pt"
    if trainer.finished_on_best and best.is_file():
        tmp = path.with_name(path.name + ".link")
        tmp.unlink(missing_ok=True)
        try:
            os.link(best, tmp)
            os.replace(tmp, path)
            return
        except OSError:
            pass  # no hard links on this file system: write a copy
    ckpt.save_checkpoint(path, {"kind": "model", "peer_states": trainer.peer_states(copy=False), **trainer._meta()})


# ----------------------------------------------------------------------------------------- fit
@dataclass
class FitResult:
    """What `fit` returns: metrics, the trained peers and a predictor for new data."""

    metrics: dict[str, Any]
    predictor: Predictor
    out_dir: Path | None = None
    history: list[dict] = field(default_factory=list)

    @property
    def models(self) -> list[CTRModel]:
        return self.predictor.models

    @property
    def peers(self) -> list[str]:
        return self.predictor.labels

    def predict(self, data, batch_size: int = EVAL_BATCH_SIZE) -> dict[str, np.ndarray]:
        return self.predictor.predict(data, batch_size)

    def evaluate(self, data, batch_size: int = EVAL_BATCH_SIZE) -> dict[str, dict[str, float]]:
        return self.predictor.evaluate(data, batch_size)


def fit(
    train: str | Path | CTRData,
    valid: str | Path | CTRData | None = None,
    test: str | Path | CTRData | None = None,
    *,
    peers: str | Sequence[str] = ("deepfm", "dcn"),
    out: str | Path | None = None,
    resume: bool = False,
    reader: dict[str, Any] | None = None,
    log: Callable = print,
    **config: Any,
) -> FitResult:
    """Train peers mutually on ``train`` and report per-peer and ensemble AUC / logloss.

    ``config`` takes any `TrainConfig` field (``epochs``, ``batch_size``, ``lr``, ``alpha``,
    ``mutual``, ``regime``, ``seed``, ``device`` ...); ``reader`` any `reader_options` key
    (hashing, ``min_count`` for vocabulary mode, ``schema`` for generic logs). Without ``valid``
    the training file is split 8:1:1 (seeded by ``seed``) into train / valid / test.
    ``regime="finetune"`` trains each peer alone first, then all mutually from those weights,
    and reports each peer's solo vs mutual metrics (``metrics["solo_vs_mutual"]``).
    """
    specs = parse_peers(peers)
    cfg = TrainConfig(peers=[str(s) for s in specs], **config)
    out_dir = Path(out) if out is not None else None
    if resume and out_dir is None:
        raise ValueError("resume needs the run directory (out=...)")
    prep = prepare_data(train, valid, test, reader=reader, split_seed=cfg.seed)
    s = Session(prep, cfg, log=log)
    log(f"data: {prep.info['rows']} rows, {s.schema.num_fields} fields, {s.schema.table_rows:,} table rows; "
        f"read in {prep.info['read_seconds']:.1f}s; batch size {s.batch_size}; device {s.device}")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(out_dir / "config.json", {"config": cfg.to_dict(), "peers": [p.to_dict() for p in specs],
                                                  "schema": s.schema.to_dict(), "reader": prep.reader,
                                                  "data": prep.info})
        if prep.vocab is not None:
            prep.vocab.save(out_dir / "vocab.npz")
    metrics: dict[str, Any] = {"peers": [p.label for p in specs], "regime": cfg.regime, "batch_size": s.batch_size}
    if cfg.regime == "joint":
        final, summary = s.train_group(specs, out_dir, resume=resume)
        metrics.update(s.evaluate(final), train=summary)
        model_dir = out_dir
    else:
        solo_states, solo_metrics, solo_summaries, _ = s.pretrain(specs, out_dir, resume)
        model_dir = out_dir / "mutual" if out_dir is not None else None
        final, mutual, summary = s.finetune(specs, solo_states, model_dir, resume)
        split = "test" if s.loaders["test"] is not None else "valid"
        rows = solo_vs_mutual_rows({k: v[split][k] for k, v in solo_metrics.items()},
                                   {k: mutual[split][k] for k in solo_metrics})
        metrics.update(mutual, solo=solo_metrics, solo_train=solo_summaries, train=summary,
                       solo_vs_mutual={"split": split, "rows": rows})
    history = final.progress.history
    if out_dir is not None:
        if model_dir != out_dir:
            save_model(final, out_dir / MODEL_FILE, model_dir)
        ckpt.write_json(out_dir / "metrics.json", metrics)
        write_curves_csv(history, out_dir / "curves.csv")
        plot_curves(history, [p.label for p in specs], out_dir / "curves.png",
                    title=f"{'+'.join(p.label for p in specs)} ({cfg.mutual}, alpha={cfg.alpha})")
    log(metrics_table({"valid": metrics.get("valid"), "test": metrics.get("test")}))
    if "solo_vs_mutual" in metrics:
        log(f"\nsolo vs mutual ({metrics['solo_vs_mutual']['split']} split):")
        log(solo_vs_mutual_table(metrics["solo_vs_mutual"]["rows"]))
    predictor = Predictor(specs, s.schema, final.peer_states(), prep.reader, cfg.embedding_dim, cfg.use_dense,
                          s.device, prep.vocab)
    return FitResult(metrics=metrics, predictor=predictor, out_dir=out_dir, history=list(history))


def load_run(run_dir: str | Path, device=None) -> Predictor:
    """A finished (or interrupted) run's peers, ready to predict: ``load_run("runs/x").predict(path)``."""
    return Predictor.load(run_dir, device)
