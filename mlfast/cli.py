"""The ``mlfast`` command: train, eval, predict, synth, study, bench.

Every argument is checked before any work starts: unknown peers or options, missing files and
conflicting flags are reported with the bad value and the flag named.

Exit status: 0 success; 1 a data or runtime error (a malformed input line, a diverged run, a
missing run directory, ...); 2 a usage error (a bad command line, a run directory that exists
without --resume / --overwrite, a setting that cannot change on --resume); 130 interrupted by
SIGINT (Ctrl-C) and 143 by SIGTERM, after saving the state (continue with --resume).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

_T0 = time.perf_counter()  # wall time of the command, reported after training
DEMO_ROWS = 200_000
EXIT_USAGE, EXIT_ERROR = 2, 1
log = logging.getLogger("mlfast")


class UsageError(Exception):
    """A bad command line: reported before any work, exit status 2."""


class _Formatter(argparse.HelpFormatter):
    """Help with every option's default shown (unless its help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if "%(default)" in h or "default" in h.lower() or action.default in (None, argparse.SUPPRESS, False) \
                or not action.option_strings:
            return h
        return h + " (default: %(default)s)"


def _parser(prog: str | None = None, **kw: Any) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, allow_abbrev=False, formatter_class=_Formatter, **kw)


def _existing_file(path: str, what: str) -> str:
    p = Path(path)
    if not p.exists():
        from glob import glob, has_magic

        if has_magic(path) and glob(path):  # a glob of Parquet / Arrow files (mlfast.io.arrow)
            return path
        raise UsageError(f"{what} not found: {path}")
    return path


def _add_reader_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reading the data")
    g.add_argument("--format", default="auto", choices=["auto", "criteo", "train", "test", "avazu", "parquet", "arrow"],
                   help="input format (default: detected from the file)")
    g.add_argument("--hash-buckets", type=str, default=None, metavar="N[,N...]",
                   help="hash buckets per field: one number for all, or one per field "
                        "(default: 1024 for bucketised integers, 131072 for categoricals)")
    g.add_argument("--hash-seed", type=int, default=0, help="seed of the feature hash")
    g.add_argument("--no-int-buckets", action="store_true",
                   help="do not add I1..I13 as FuxiCTR-bucketised categorical fields")
    g.add_argument("--on-bad-line", choices=["error", "skip"], default="error",
                   help="error: stop at the first malformed line, naming file, line and field; skip: drop and "
                        "count it")
    g.add_argument("--no-cache", action="store_true", help="do not use or write the binary cache")
    g.add_argument("--reader-threads", type=int, default=None, metavar="N",
                   help="parser threads (default: all cores)")
    g.add_argument("--min-count", type=int, default=None, metavar="N",
                   help="vocabulary mode (FuxiCTR/BARS): values seen fewer than N times in the training "
                        "split share an out-of-vocabulary row (BARS: Criteo 10, Avazu 2) instead of hashing "
                        "(default: hashing)")
    d = p.add_argument_group("generic delimited logs and Parquet / Arrow files (any of these switches to a "
                             "user-given schema)")
    d.add_argument("--label", help="label column (header name or 0-based index)")
    d.add_argument("--categorical", help="comma-separated categorical columns")
    d.add_argument("--numeric", help="comma-separated numeric columns (log-transformed)")
    d.add_argument("--sequence", help="comma-separated multi-hot columns (lists such as a click history "
                                      "'170301^573514': one mean-pooled bag field each)")
    d.add_argument("--sequence-separator", default=None, help="separator of the values in a --sequence column "
                                                              "(default '^')")
    d.add_argument("--sequence-max-len", type=int, default=None, metavar="N",
                   help="keep each --sequence list's last N values (default: all)")
    d.add_argument("--delimiter", default=None, help="field delimiter (default ',')")
    d.add_argument("--no-header", action="store_true", help="the file has no header row")
    d.add_argument("--quote", default=None, metavar="CHAR",
                   help="quote character of quoted fields (default '\"', as pandas/Excel CSV: "
                        "\"New York, NY\", \"\" inside for a quote); --quote '' disables quoting")
    d.add_argument("--no-quote", action="store_true", help="no quoting: a quote is a plain byte (--quote '')")


def _reader_options(a: argparse.Namespace) -> dict:
    from mlfast.io.prepare import reader_options

    buckets = None
    if a.hash_buckets:
        try:
            parts = [int(x) for x in a.hash_buckets.split(",")]
        except ValueError:
            raise UsageError(f"--hash-buckets {a.hash_buckets!r}: expected a number or comma-separated numbers")
        if any(x < 1 for x in parts):
            raise UsageError(f"--hash-buckets {a.hash_buckets!r}: bucket counts must be >= 1")
        buckets = parts[0] if len(parts) == 1 else parts
    fmt = {"criteo": "auto"}.get(a.format, a.format)
    schema = None
    if a.label or a.categorical or a.numeric or a.delimiter or a.no_header or a.sequence or a.sequence_separator \
            or a.sequence_max_len is not None or a.quote is not None or a.no_quote:
        if not a.categorical:
            raise UsageError("a generic delimited log needs --categorical (and usually --label)")
        if a.no_quote and a.quote:
            raise UsageError(f"--no-quote conflicts with --quote {a.quote!r}")
        if a.format not in ("auto", "parquet", "arrow"):
            raise UsageError(f"--format {a.format} conflicts with a delimited schema (--label/--categorical/...)")

        def cols(text):
            return [int(c) if c.strip().isdigit() and a.no_header else c.strip() for c in text.split(",") if c.strip()]

        label = a.label
        if label is not None and label.isdigit() and a.no_header:
            label = int(label)
        schema = {"delimiter": a.delimiter or ",", "header": not a.no_header, "label": label,
                  "numeric": cols(a.numeric or ""), "categorical": cols(a.categorical), "numeric_transform": "log",
                  "sequence": cols(a.sequence or ""), "sequence_separator": a.sequence_separator or "^",
                  "sequence_max_len": a.sequence_max_len,
                  "quote": None if a.no_quote or a.quote == "" else '"' if a.quote is None else a.quote}
    if a.min_count is not None and a.min_count < 1:
        raise UsageError(f"--min-count {a.min_count}: expected >= 1")
    try:
        return reader_options(format=fmt, hash_buckets=buckets, hash_seed=a.hash_seed,
                              int_buckets=not a.no_int_buckets, on_bad_line=a.on_bad_line,
                              cache=not a.no_cache, num_threads=a.reader_threads, schema=schema,
                              min_count=a.min_count, stream=getattr(a, "stream", False) or None,
                              window_rows=getattr(a, "window_rows", None),
                              stream_lanes=getattr(a, "stream_lanes", None))
    except ValueError as exc:
        raise UsageError(str(exc))


# Reader settings as the run stores them, and the flags that set them (for --resume checks).
_READER_FLAGS = {"format": "format", "hash_buckets": "hash_buckets", "hash_seed": "hash_seed",
                 "int_buckets": "no_int_buckets", "on_bad_line": "on_bad_line", "cache": "no_cache",
                 "num_threads": "reader_threads", "min_count": "min_count", "stream": "stream",
                 "window_rows": "window_rows", "stream_lanes": "stream_lanes",
                 "schema": ("label", "categorical", "numeric", "sequence", "sequence_separator", "sequence_max_len",
                            "delimiter", "no_header", "quote", "no_quote")}


def _peers_help() -> str:
    from mlfast.models import MODELS

    return ("comma-separated peers, each a model with options, e.g. deepfm,dcn:layers=4,dcn (a model may appear "
            f"twice). Models: {', '.join(sorted(MODELS))}")


def _add_train_args(p: argparse.ArgumentParser, default_peers: str = "deepfm,dcn") -> None:
    p.add_argument("data", nargs="?", help="training file, directory or glob (Criteo TSV, Avazu CSV, any delimited "
                   "log, Parquet / Arrow; .gz ok); omitted: a generated Criteo-format demo file "
                   "(--demo-rows rows); with --resume: the run's own")
    p.add_argument("--peers", default=default_peers, help=_peers_help())
    p.add_argument("--valid", help="validation file (default: 8:1:1 seeded split of DATA)")
    p.add_argument("--test", help="test file (needs --valid)")
    p.add_argument("--out", help="run directory (default: runs/<peers>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (its saved settings are the defaults; "
                        "only --epochs/--finetune-epochs, --max-steps, --patience, --checkpoint-every, --device, "
                        "--threads, --quiet and the CUDA-graph flags may change)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--demo-rows", type=int, default=DEMO_ROWS, metavar="N",
                   help="rows of the generated demo file used when DATA is omitted")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=3, help="passes over the training data")
    g.add_argument("--batch-size", type=int, default=None,
                   help="default 4096, halved while an epoch would have fewer than 64 steps (not below 128)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (dense layers and embeddings)")
    g.add_argument("--embedding-dim", type=int, default=16, help="embedding size per field")
    g.add_argument("--embedding-l2", type=float, default=1e-5, help="L2 on the embedding rows each batch touches")
    g.add_argument("--net-l2", type=float, default=0.0, help="L2 (Adam weight decay) on the dense layers")
    g.add_argument("--alpha", type=float, default=1.0, help="weight of the peer term")
    g.add_argument("--mutual", choices=["kl", "symkl", "mse"], default="kl", help="peer term")
    g.add_argument("--alpha-warmup", type=int, default=0, metavar="STEPS", help="ramp alpha from 0 over STEPS")
    g.add_argument("--regime", choices=["joint", "finetune"], default="joint",
                   help="joint: mutual from scratch; finetune: each peer alone first, then mutual (the paper)")
    g.add_argument("--finetune-epochs", type=int, default=None, help="epochs of mutual fine-tuning (default 2)")
    g.add_argument("--finetune-lr", type=float, default=None, help="learning rate of fine-tuning (default: --lr)")
    g.add_argument("--eval-every", type=int, default=0, metavar="STEPS",
                   help="also validate every STEPS steps (0: after each epoch only)")
    g.add_argument("--patience", type=int, default=2, help="stop after this many evaluations without improvement")
    g.add_argument("--lr-decay", type=float, default=0.1, help="learning-rate factor when validation stalls")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: no limit)")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also checkpoint every STEPS steps (0: at each evaluation)")
    g.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the data order")
    g.add_argument("--deterministic", action="store_true",
                   help="bit-reproducible kernels (the sorted GPU update path, deterministic torch algorithms)")
    g.add_argument("--use-dense", action="store_true", help="also feed the log-transformed numeric columns")
    g.add_argument("--max-loss", type=float, default=20.0,
                   help="a peer whose training BCE is non-finite or above this (nats per sample) stops the run")
    g.add_argument("--skip-bad-batches", action="store_true",
                   help="skip and count batches with a non-finite loss or a peer BCE above --max-loss "
                        "instead of stopping (one host sync per step)")
    e = p.add_argument_group("execution")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    e.add_argument("--engine", choices=["auto", "plain", "fused"], default="auto",
                   help="fused: one table for all peers, sparse optimizer fused into the backward; plain: the "
                        "FuxiCTR-style reference (a table per peer, dense Adam)")
    e.add_argument("--kernels", choices=["auto", "triton", "numba", "reference"], default="auto",
                   help="fused engine's op backends: auto (Triton on CUDA, numba on the CPU), triton, numba, "
                        "reference (plain PyTorch)")
    e.add_argument("--sparse-optimizer", choices=["adam", "adagrad", "sgd"], default="adam",
                   help="fused engine's embedding optimizer")
    e.add_argument("--bf16", action="store_true",
                   help="bf16 autocast of the models (CUDA, or CPUs with AVX512-BF16 / AMX), fp32 weights and loss")
    e.add_argument("--no-cuda-graph", action="store_true", help="do not capture the training step in a CUDA graph")
    e.add_argument("--graph-fallback", action="store_true",
                   help="run the step eagerly if CUDA-graph capture fails (default: stop with the error)")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    m = p.add_argument_group("several processes (torch.distributed; also: torchrun --nproc-per-node N -m mlfast train "
                             "...)")
    m.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train with N processes on this machine (runs torch.distributed.run --standalone)")
    m.add_argument("--parallel", choices=["data", "peers", "both"], default="data",
                   help="data: every process holds all peers and a shard of each batch and of the embedding rows; "
                        "peers: peers spread over the processes, logits exchanged; both: peer groups x data shards")
    m.add_argument("--exchange-every", type=int, default=1, metavar="K",
                   help="peers/both: use copies of the other peers refreshed every K steps instead of exchanging "
                        "logits every step (codistillation with stale predictions)")
    m.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="collective backend: auto (NCCL on CUDA, gloo on the CPU)")
    o = p.add_argument_group("output")
    o.add_argument("--quiet", action="store_true", help="no progress bar / periodic progress lines")
    o.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                   help="messages shown on the terminal (train.log in the run directory keeps info and above)")
    o.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard scalars to <run>/tensorboard (needs the tensorboard package)")
    s = p.add_argument_group("data larger than memory")
    s.add_argument("--stream", action="store_true",
                   help="train from the cache files on disk instead of memory: blocks of rows read a window at a "
                        "time, shuffled by block and within each window, memory bounded whatever the data size "
                        "(text logs; DATA may be a directory or glob of files, e.g. Criteo 1TB's day files; an 8:1:1 "
                        "split of DATA is then by blocks of rows)")
    s.add_argument("--window-rows", type=int, default=None, metavar="N",
                   help="--stream: rows read and shuffled together (default 262144, about 100 MB of Criteo)")
    s.add_argument("--stream-lanes", type=int, default=None, metavar="L",
                   help="--stream: deal the training blocks to L lanes, each read and shuffled on its own, a batch "
                        "being B/L rows of each; a data shard of --nproc reads only its own lanes (default: 1, or "
                        "one per data shard: each process reads only its share). The same L gives the same "
                        "batches on any number of processes dividing it")
    _add_reader_args(p)


# TrainConfig field -> the command-line flag that sets it (for messages and --resume checks).
_CONFIG_FLAGS = {
    "peers": "peers", "embedding_dim": "embedding_dim", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
    "embedding_l2": "embedding_l2", "net_l2": "net_l2", "alpha": "alpha", "mutual": "mutual",
    "alpha_warmup_steps": "alpha_warmup", "regime": "regime", "finetune_epochs": "finetune_epochs",
    "finetune_lr": "finetune_lr", "eval_every": "eval_every", "patience": "patience", "lr_decay": "lr_decay",
    "max_steps": "max_steps", "checkpoint_every": "checkpoint_every", "seed": "seed",
    "deterministic": "deterministic", "device": "device", "bf16": "bf16", "engine": "engine", "kernels": "kernels",
    "sparse_optimizer": "sparse_optimizer", "cuda_graph": "no_cuda_graph", "graph_fallback": "graph_fallback",
    "use_dense": "use_dense", "num_threads": "threads", "progress": "quiet", "max_loss": "max_loss",
    "skip_bad_batches": "skip_bad_batches", "tensorboard": "tensorboard",
    "parallel": "parallel", "exchange_every": "exchange_every", "backend": "backend",
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _cli_message(msg: str) -> str:
    """An error from the library, its setting names turned into the flags that set them."""
    import re

    def field(m: re.Match) -> str:
        name = m.group(1)
        dest = _CONFIG_FLAGS.get(name)
        if dest is None:
            return m.group(0)
        return f"{_flag(dest)} {m.group(2)}"

    msg = re.sub(r"\b([a-z_0-9]+)=(\S+?):", lambda m: field(m) + ":", msg)
    msg = msg.replace("Use read_delimited(path, DelimitedSchema(...)) or read(path, format='delimited', schema=...)",
                      "To read it as a delimited log, name its columns: --label COL --categorical COLS "
                      "[--numeric COLS] [--delimiter C] [--no-header]")
    return msg


def _resume_conflict_message(exc) -> str:
    """A `ResumeConflict` in terms of the flags that set each setting."""
    reader_dest = {k: (v if isinstance(v, str) else v[0]) for k, v in _READER_FLAGS.items()}
    parts = []
    for key, saved, given in exc.conflicts:
        if key.startswith("reader."):
            name = _flag(reader_dest.get(key[7:], key[7:]))
        elif key.startswith("data."):
            name = {"data.train": "DATA", "data.valid": "--valid", "data.test": "--test"}[key]
        else:
            name = _flag(_CONFIG_FLAGS.get(key, key))
        parts.append(f"{name}: the run was trained with {saved!r}, given {given!r}")
    return ("--resume continues the saved run with its own settings; only --epochs/--finetune-epochs, --max-steps, "
            "--patience, --checkpoint-every, --device, --threads, --quiet and the CUDA-graph flags may change. "
            "Differing: " + "; ".join(parts) + " (drop them, or start a new run with another --out)")


def _train_config(a: argparse.Namespace):
    from mlfast.models import parse_peers
    from mlfast.train.config import TrainConfig

    try:
        specs = parse_peers(a.peers)
    except ValueError as exc:
        raise UsageError(f"--peers: {exc}")
    resume = getattr(a, "resume", False)  # on --resume the saved run's regime and peers decide
    if not resume and a.regime != "finetune" and (a.finetune_epochs is not None or a.finetune_lr is not None):
        raise UsageError("--finetune-epochs/--finetune-lr only apply with --regime finetune")
    if not resume and a.regime == "finetune" and len(specs) < 2:
        raise UsageError(f"--regime finetune needs at least two peers, got {a.peers!r}")
    if a.test and not a.valid:
        raise UsageError("--test needs --valid (without both, DATA is split 8:1:1 into train/valid/test)")
    if a.resume and not a.out:
        raise UsageError("--resume needs --out (the run directory to continue)")
    if a.resume and a.overwrite:
        raise UsageError("--resume and --overwrite contradict each other")
    if a.device not in ("auto", "cpu"):
        import torch

        if a.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {a.device}: CUDA is not available on this machine")
    if a.engine == "plain" and a.sparse_optimizer != "adam":
        raise UsageError("--sparse-optimizer applies to the fused engine, not --engine plain")
    if a.engine == "plain" and a.kernels != "auto":
        raise UsageError("--kernels applies to the fused engine, not --engine plain")
    kw = dict(
        peers=[str(s) for s in specs], embedding_dim=a.embedding_dim, epochs=a.epochs, batch_size=a.batch_size,
        lr=a.lr, embedding_l2=a.embedding_l2, net_l2=a.net_l2, alpha=a.alpha, mutual=a.mutual,
        alpha_warmup_steps=a.alpha_warmup, regime=a.regime, finetune_lr=a.finetune_lr, eval_every=a.eval_every,
        patience=a.patience, lr_decay=a.lr_decay, max_steps=a.max_steps, checkpoint_every=a.checkpoint_every,
        seed=a.seed, deterministic=a.deterministic, device=a.device, bf16=a.bf16, engine=a.engine,
        kernels=a.kernels, sparse_optimizer=a.sparse_optimizer, cuda_graph=not a.no_cuda_graph,
        graph_fallback=a.graph_fallback, use_dense=a.use_dense, num_threads=a.threads, progress=not a.quiet,
        max_loss=a.max_loss, skip_bad_batches=a.skip_bad_batches, tensorboard=a.tensorboard,
        parallel=a.parallel, exchange_every=a.exchange_every, backend=a.backend,
    )
    if a.finetune_epochs is not None:
        kw["finetune_epochs"] = a.finetune_epochs
    try:
        cfg = TrainConfig(**kw)
    except ValueError as exc:
        raise UsageError(_cli_message(str(exc)))
    if cfg.bf16:
        from mlfast.train.engine import bf16_autocast_supported
        from mlfast.train.trainer import resolve_device

        ok, why = bf16_autocast_supported(resolve_device(cfg.device))
        if not ok:
            raise UsageError(f"--bf16: {why}")
    if cfg.kernels == "triton":
        from mlfast.ops.backends import select_backends
        from mlfast.train.trainer import resolve_device

        try:
            select_backends("triton", resolve_device(cfg.device))
        except ValueError as exc:
            raise UsageError(f"--kernels triton: {exc}")
    return cfg


def demo_data_path(rows: int = DEMO_ROWS, seed: int = 0) -> Path:
    """Where the generated demo file lives (generated once, reused)."""
    from mlfast.io.cache import default_cache_dir

    return default_cache_dir() / "demo" / f"criteo_synth_{rows}_seed{seed}.tsv"


def ensure_demo_data(rows: int = DEMO_ROWS, seed: int = 0) -> Path:
    from mlfast.io.synth import synth_criteo

    path = demo_data_path(rows, seed)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("generating demo data: %s Criteo-format rows -> %s", f"{rows:,}", path)
        tmp = path.with_name(path.name + ".partial")
        report = synth_criteo(str(tmp), rows=rows, seed=seed)
        os.replace(tmp, path)
        side = Path(str(tmp) + ".synth.json")
        if side.exists():
            os.replace(side, Path(str(path) + ".synth.json"))
        log.info("  hidden model's Bayes-optimal AUC %.4f, logloss %.4f", report.bayes_auc, report.bayes_logloss)
    return path


def _given_settings(a: argparse.Namespace, given: set[str], cfg, ropts: dict) -> dict:
    """The settings the user typed, in the run's terms (for --resume checks)."""
    conf = {}
    for field_name, dest in _CONFIG_FLAGS.items():
        if dest in given:
            conf[field_name] = getattr(cfg, field_name)
    reader = {}
    for opt, dests in _READER_FLAGS.items():
        dests = dests if isinstance(dests, tuple) else (dests,)
        if any(d in given for d in dests):
            reader[opt] = ropts[opt]
    return {"config": conf, "reader": reader, "data": {"train": a.data, "valid": a.valid, "test": a.test}}


def cmd_train(a: argparse.Namespace) -> int:
    from mlfast.api import fit
    from mlfast.report import metrics_table, solo_vs_mutual_table

    cfg = _train_config(a)
    ropts = _reader_options(a)
    if a.demo_rows < 100:
        raise UsageError(f"--demo-rows {a.demo_rows}: expected >= 100")
    for flag in ("valid", "test"):
        if getattr(a, flag):
            _existing_file(getattr(a, flag), f"--{flag} file")
    from mlfast.dist.launch import launched_by_torchrun

    if a.nproc is not None or launched_by_torchrun():  # several processes: mlfast.dist
        from mlfast.dist.run import cmd_train_distributed

        return cmd_train_distributed(a, cfg, ropts)
    if getattr(a, "_given", set()) & {"parallel", "exchange_every", "backend"}:
        log.warning("--parallel / --exchange-every / --backend apply to several processes (--nproc N or torchrun); "
                    "this run has one")
    if a.data:
        _existing_file(a.data, "training file")
        data = a.data
    elif a.resume:
        data = None  # the run's own
    else:
        data = str(ensure_demo_data(a.demo_rows))
    out = a.out or f"runs/{'-'.join(s.split(':')[0] for s in cfg.peers)}-{time.strftime('%Y%m%d-%H%M%S')}"
    kwargs = {k: v for k, v in cfg.to_dict().items() if k != "peers"}
    peers = cfg.peers
    reader = ropts
    if a.resume:
        given = _given_settings(a, a._given, cfg, ropts)
        kwargs = given["config"]
        peers = kwargs.pop("peers", None)
        reader = given["reader"]
    result = fit(data, a.valid, a.test, peers=peers, out=out, resume=a.resume, overwrite=a.overwrite, reader=reader,
                 log_file=True, **kwargs)
    m = result.metrics
    print(metrics_table({"valid": m.get("valid"), "test": m.get("test")}))
    if "solo_vs_mutual" in m:
        print(f"\nsolo vs mutual ({m['solo_vs_mutual']['split']} split):")
        print(solo_vs_mutual_table(m["solo_vs_mutual"]["rows"]))
    train = m["train"]
    rate = train.get("samples_per_second")
    print(f"\n{train['samples']:,} samples in {train['train_seconds']:.1f}s "
          f"({'-' if rate is None else f'{rate:,.0f}'} samples/s); stopped: {train['stopped']}"
          + (f"; {train['skipped_batches']} bad batches skipped" if train.get("skipped_batches") else ""))
    print(f"command wall time {time.perf_counter() - _T0:.1f}s (training {train['train_seconds']:.1f}s, validation "
          f"{train.get('validate_seconds') or 0:.1f}s)")
    print(f"run directory: {out} (metrics.json, curves.csv, curves.png, model.pt, checkpoints, train.log)")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from mlfast.api import load_run
    from mlfast.report import metrics_table

    _existing_file(a.data, "data file")
    pred = load_run(a.run, device=a.device)
    metrics = pred.evaluate(a.data, on_bad_line=a.on_bad_line)
    print(metrics_table({Path(a.data).name: metrics}))
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from mlfast.api import load_run

    _existing_file(a.data, "data file")
    pred = load_run(a.run, device=a.device)
    extra = {} if a.id_column is None else {"id_column": a.id_column}
    # read, scored and written chunk by chunk: memory bounded by two chunks, whatever the file size
    r = pred.predict_file(a.data, a.out, on_bad_line=a.on_bad_line, **extra)
    skipped = sum(v for k, v in r["skipped"].items() if k != "blank_line")
    note = f" ({skipped} bad lines skipped: {r['skipped']})" if skipped else ""
    peers = [c for c in r["columns"] if c in pred.labels or c == "ensemble"]
    print(f"wrote {r['rows']:,} rows x {len(peers)} columns ({', '.join(peers)}) to {a.out}{note}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from mlfast.api import load_run
    from mlfast.export import export_predictor, select_peers

    if not Path(a.run).is_dir():
        raise UsageError(f"run directory not found: {a.run}")
    if Path(a.out).is_dir():
        raise UsageError(f"--out {a.out} is a directory: give the file to write (e.g. {Path(a.out) / 'model.onnx'})")
    if a.verify_rows < 1:
        raise UsageError(f"--verify-rows {a.verify_rows}: expected >= 1")
    if a.dynamo and a.format != "onnx":
        raise UsageError("--dynamo chooses the ONNX exporter: it needs --format onnx")
    if a.opset < 16:
        raise UsageError(f"--opset {a.opset}: the bag pooling needs ScatterElements with reduction=add (opset 16+)")
    if a.verify_data:
        _existing_file(a.verify_data, "--verify-data file")
    pred = load_run(a.run, device="cpu")
    try:
        select_peers(pred.labels, a.peer)
    except ValueError as exc:
        raise UsageError(f"--peer: {exc}")
    r = export_predictor(pred, a.out, a.format, a.peer, verify=not a.no_verify, verify_rows=a.verify_rows,
                         verify_data=a.verify_data, opset=a.opset, dynamo=a.dynamo, run_dir=a.run)
    check = (f"matches mlfast predict within {r.max_abs_diff:.2g} on {r.verified_rows} rows"
             if r.max_abs_diff is not None else "not verified (--no-verify)")
    print(f"wrote {', '.join(str(f) for f in r.files)} ({a.format}, {a.peer}) and {r.sidecar_path}; {check}")
    return 0


def cmd_synth(a: argparse.Namespace) -> int:
    from mlfast.io.synth import synth_criteo

    paths = list(a.paths)
    if len(paths) == 2 and paths[0] == "criteo":  # the older `mlfast synth criteo OUT` form
        paths = paths[1:]
    if len(paths) != 1:
        raise UsageError(f"expected one output file, got {paths}")
    if a.rows < 1:
        raise UsageError(f"--rows {a.rows}: expected >= 1")
    r = synth_criteo(paths[0], rows=a.rows, seed=a.seed, test_format=a.test_format)
    print(f"wrote {r.rows:,} rows ({r.bytes / 1e6:.1f} MB) to {r.path} in {r.seconds:.1f}s; positive rate "
          f"{r.positive_rate:.3f}; hidden model's Bayes-optimal AUC {r.bayes_auc:.4f}, logloss {r.bayes_logloss:.4f}")
    return 0


def cmd_study(a: argparse.Namespace) -> int:
    from mlfast.models import parse_peers
    from mlfast.study import parse_groups, run_study

    a.regime = "finetune"
    if a.finetune_epochs is None:
        a.finetune_epochs = 2
    cfg = _train_config(a)
    try:
        parse_groups(a.groups, [s.label for s in parse_peers(cfg.peers)])
    except ValueError as exc:
        raise UsageError(f"--groups: {exc}")
    seeds = _int_list(a.seeds, "--seeds", allow_zero=True)
    ropts = _reader_options(a)
    for flag in ("valid", "test"):
        if getattr(a, flag):
            _existing_file(getattr(a, flag), f"--{flag} file")
    data = _existing_file(a.data, "training file") if a.data else str(ensure_demo_data(a.demo_rows))
    out = a.out or f"runs/study-{time.strftime('%Y%m%d-%H%M%S')}"
    kw = {k: v for k, v in cfg.to_dict().items() if k not in ("peers", "seed", "regime")}
    run_study(data, a.valid, a.test, peers=cfg.peers, groups=a.groups, seeds=seeds, split_seed=a.split_seed,
              reader=ropts, out=out, resume=a.resume, control=not a.no_control, log=print, **kw)
    print(f"study directory: {out} (study.csv, study_runs.csv, study.json, study.png, every phase's run)")
    return 0


_SCALE = {"k": 10**3, "m": 10**6, "g": 10**9}


def _count(x: str) -> int:
    """A count as people write it: ``4096``, ``1e6``, ``200k``, ``1.8M`` (what --help prints).

    Example::

        >>> _count("1.8M"), _count("200k"), _count("4096"), _count("1e6")
        (1800000, 200000, 4096, 1000000)
    """
    x = x.strip()
    scale = _SCALE.get(x[-1:].lower(), 1)
    v = float(x[:-1] if scale != 1 else x) * scale
    if v != int(v):
        raise ValueError(x)
    return int(v)


def _int_list(text: str, flag: str, allow_zero: bool = False) -> list[int]:
    try:
        vals = [_count(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers (4096, 200k, 1.8M)")
    if not vals or any(v < (0 if allow_zero else 1) for v in vals):
        raise UsageError(f"{flag} {text!r}: expected numbers >= {0 if allow_zero else 1}")
    return vals


def cmd_bench(a: argparse.Namespace) -> int:
    from mlfast import bench

    impls = [x for x in a.impls.split(",") if x]
    unknown = [i for i in impls if i not in bench.IMPLS]
    if unknown:
        raise UsageError(f"--impls: unknown impl {unknown[0]!r}; choose from {', '.join(bench.IMPLS)}")
    rows = _int_list(a.rows, "--rows") if a.rows else None
    batches = _int_list(a.batch_sizes, "--batch-sizes") if a.batch_sizes else None
    if a.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {a.device}: CUDA is not available on this machine")
    bench.main(impls, a.device, rows, batches, a.steps, a.warmup, a.json, bf16=a.bf16)
    return 0


def _version() -> str:
    from mlfast import __version__

    return f"mlfast {__version__}"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    p = _parser("mlfast", description="Mutual learning for CTR models on raw click logs.",
                epilog="exit status: 0 ok, 1 data or runtime error, 2 usage error, 130 / 143 interrupted by "
                       "SIGINT / SIGTERM (state saved: continue with --resume). `mlfast <command> --help` lists "
                       "every option.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=lambda **kw: _parser(**kw))
    subs: dict[str, argparse.ArgumentParser] = {}
    t = sub.add_parser("train", help="train peers mutually on a raw log file")
    _add_train_args(t)
    t.set_defaults(func=cmd_train)
    subs["train"] = t
    for name, func, helptext in (("eval", cmd_eval, "print per-peer and ensemble metrics of a run on a file"),
                                 ("predict", cmd_predict, "write per-peer and ensemble probabilities as CSV")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("run", help="run directory written by mlfast train")
        q.add_argument("data", help="file to score (read with the run's format and hashing)")
        if name == "predict":
            q.add_argument("--out", required=True, help="CSV to write: a line column (each row's 1-based line "
                                                        "number in the file, so rows join back also when bad "
                                                        "lines were skipped; Parquet / Arrow: row, 0-based, "
                                                        "after file for several files) or --id-column's values, "
                                                        "then one column per peer and the ensemble")
            q.add_argument("--id-column", metavar="COL", default=None,
                           help="write this column's raw values first instead of the line number: a header name, "
                                "or a 0-based column index (a file without a header; Criteo, Avazu)")
        q.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
        q.add_argument("--on-bad-line", choices=["error", "skip"], default="error",
                       help="error: stop at the first malformed line; skip: drop and count it")
        q.set_defaults(func=func)
        subs[name] = q
    x = sub.add_parser("export", help="write a run's peers as ONNX or TorchScript for serving without mlfast, "
                                      "checked against mlfast predict")
    x.add_argument("run", help="run directory written by mlfast train")
    x.add_argument("--out", required=True, help="file to write (e.g. model.onnx); its sidecar <out>.json says "
                                                "which inputs to feed")
    x.add_argument("--format", choices=["onnx", "torchscript"], default="onnx",
                   help="onnx (run with onnxruntime) or torchscript (torch.jit.load)")
    x.add_argument("--peer", default="ensemble",
                   help="ensemble (mean of the peers' probabilities), all (each peer, then the ensemble) or one "
                        "peer's label")
    x.add_argument("--no-verify", action="store_true",
                   help="skip the check that the written file gives mlfast predict's probabilities (within 1e-5)")
    x.add_argument("--verify-rows", type=int, default=256,
                   help="rows the check scores (random valid ids, or the first rows of --verify-data)")
    x.add_argument("--verify-data", help="check on this file's first rows (read as the run reads files) instead of "
                                         "random valid ids")
    x.add_argument("--opset", type=int, default=18, help="ONNX opset version (16 or later)")
    x.add_argument("--dynamo", action="store_true",
                   help="use PyTorch's torch.export-based ONNX exporter (needs onnxscript; required when the "
                        "weights pass 1 GiB: they go to <out>.data) instead of the TorchScript-based one")
    x.set_defaults(func=cmd_export)
    subs["export"] = x
    s = sub.add_parser("synth", help="generate Criteo-format data from a hidden model")
    s.add_argument("paths", nargs="+", metavar="OUT", help="file to write (.gz compresses)")
    s.add_argument("--rows", type=int, default=1_000_000, help="rows to write")
    s.add_argument("--seed", type=int, default=0, help="generator seed")
    s.add_argument("--test-format", action="store_true", help="39 fields, no label")
    s.set_defaults(func=cmd_synth)
    subs["synth"] = s
    st = sub.add_parser("study", help="the paper's protocol: pretrain each peer alone, fine-tune groups "
                                      "mutually, over seeds; solo-vs-mutual table")
    _add_train_args(st, default_peers="deepfm,dcn,ipnn,fibinet")
    st.add_argument("--groups", default="default",
                    help="default (all pairs + all peers), pairs, all, or groups like deepfm+dcn,deepfm+dcn+ipnn")
    st.add_argument("--seeds", default="0", help="comma-separated training seeds")
    st.add_argument("--split-seed", type=int, default=0, help="seed of the 8:1:1 split (fixed across seeds)")
    st.add_argument("--no-control", action="store_true",
                    help="skip the control (each peer fine-tuned alone for the same epochs), which "
                         "separates the mutual term's effect from the extra training")
    st.set_defaults(func=cmd_study)
    subs["study"] = st
    b = sub.add_parser("bench", help="training-step throughput: mlfast vs plain PyTorch, in one run")
    b.add_argument("--impls", default="eager,compile,sparse,mlfast,mlp",
                   help="comma-separated: eager, compile, sparse, mlfast, mlp (the peers' MLPs alone: the bound)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    b.add_argument("--rows", help="rows per peer table, comma-separated (default: 1.8M,35.3M on CUDA; 200k,1.8M on "
                                  "the CPU)")
    b.add_argument("--batch-sizes", help="comma-separated (default: 4096,16384 on CUDA; 1024,4096 on the CPU)")
    b.add_argument("--steps", type=int, default=30, help="timed steps per row")
    b.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    b.add_argument("--bf16", action="store_true", help="time every implementation under bf16 autocast")
    b.add_argument("--json", help="also write the results here, after every row (bench/results/<name>.json)")
    b.set_defaults(func=cmd_bench)
    subs["bench"] = b
    return p, subs


def _given_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The option destinations the command line set explicitly (defaults suppressed)."""
    saved = [(act, act.default) for act in parser._actions]
    try:
        for act, _ in saved:
            if act.option_strings:
                act.default = argparse.SUPPRESS
        ns, _ = parser.parse_known_args(argv)
    finally:
        for act, d in saved:
            act.default = d
    return set(vars(ns))


def _setup_logging(level: str) -> None:
    root = logging.getLogger("mlfast")
    root.setLevel(logging.DEBUG)
    if not any(getattr(h, "_mlfast_console", False) for h in root.handlers):
        h = _StderrHandler()
        h._mlfast_console = True  # type: ignore[attr-defined]
        h.setFormatter(_ConsoleFormat())
        root.addHandler(h)
    for h in root.handlers:
        if getattr(h, "_mlfast_console", False):
            h.setLevel(getattr(logging, level.upper()))
    root.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each message (it may be replaced)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _ConsoleFormat(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return msg if record.levelno == logging.INFO else f"{record.levelname.lower()}: {msg}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subs = build_parser()
    ns, extra = parser.parse_known_args(argv)
    sub = subs[ns.command]
    if extra:  # report unknown options with the subcommand's usage, not the top level's
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    ns._given = _given_dests(sub, argv[argv.index(ns.command) + 1:])
    ns._argv = argv  # `mlfast train --nproc N` passes it on to torchrun
    _setup_logging(getattr(ns, "log_level", "info"))
    try:
        return ns.func(ns)
    except UsageError as exc:
        sub.print_usage(sys.stderr)
        print(f"mlfast {ns.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"mlfast {ns.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as exc:  # noqa: BLE001 - every error reaches the user as one line
        from mlfast.api import ResumeConflict, RunDirectoryError
        from mlfast.train.trainer import Interrupted

        if isinstance(exc, Interrupted):
            print(f"mlfast {ns.command}: {exc}", file=sys.stderr)
            return 128 + exc.signum
        if isinstance(exc, ResumeConflict):
            print(f"mlfast {ns.command}: error: {_resume_conflict_message(exc)}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(exc, RunDirectoryError):
            print(f"mlfast {ns.command}: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(exc, (ValueError, OSError, RuntimeError, IndexError, KeyError)):
            print(f"mlfast {ns.command}: error: {_cli_message(str(exc))}", file=sys.stderr)
            log.debug("traceback", exc_info=True)
            return EXIT_ERROR
        raise


def run() -> None:
    """The ``mlfast`` command (and ``python -m mlfast``): :func:`main`, then exit with its status.

    A rank of a torchrun job leaves without finalising the interpreter: once main has returned (its
    files written, its process groups destroyed), the exit handlers run and the process ends with
    ``os._exit``. Finalising would race with gloo's worker threads, which may still be releasing the
    last collective's tensors: such a release needs the GIL, a finalising interpreter ends the
    thread instead (``pthread_exit`` through C++ frames), and the rank aborted ("terminate called
    without an active exception", SIGABRT) in about 1 of 20 two-process runs on a loaded 2-core
    machine (gdb on the core: ``ProcessGroupGloo::runLoop`` -> ``~AsyncAllgatherWork`` ->
    ``decref_pyobject`` -> ``take_gil`` -> ``pthread_exit``, during ``Py_FinalizeEx``)."""
    code = main()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        import atexit

        atexit._run_exitfuncs()  # logging's flush, the process groups, prefetch threads, ...
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
