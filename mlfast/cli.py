"""The ``mlfast`` command: train, eval, predict, synth (and bench, study).

Every argument is checked before any work starts: unknown peers or options, missing files and
conflicting flags are reported with the bad value named, and the exit status is 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

DEMO_ROWS = 200_000


class UsageError(Exception):
    """A bad command line: reported before any work, exit status 2."""


def _existing_file(path: str, what: str) -> str:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} not found: {path}")
    if p.is_dir():
        raise UsageError(f"{what} is a directory, not a file: {path}")
    return path


def _add_reader_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reading the data")
    g.add_argument("--format", default="auto", choices=["auto", "criteo", "train", "test", "avazu"],
                   help="input format (default: detected from the file)")
    g.add_argument("--hash-buckets", type=str, default=None, metavar="N[,N...]",
                   help="hash buckets per field: one number for all, or one per field "
                        "(default: 1024 for bucketised integers, 131072 for categoricals)")
    g.add_argument("--hash-seed", type=int, default=0)
    g.add_argument("--no-int-buckets", action="store_true",
                   help="do not add I1..I13 as FuxiCTR-bucketised categorical fields")
    g.add_argument("--on-bad-line", choices=["error", "skip"], default="error",
                   help="error (default): stop at the first malformed line; skip: count and drop it")
    g.add_argument("--no-cache", action="store_true", help="do not use or write the binary cache")
    g.add_argument("--reader-threads", type=int, default=None)
    g.add_argument("--min-count", type=int, default=None, metavar="N",
                   help="vocabulary mode (FuxiCTR/BARS): values seen fewer than N times in the training "
                        "split share an out-of-vocabulary row (BARS: Criteo 10, Avazu 2) instead of hashing")
    d = p.add_argument_group("generic delimited logs (any of these switches to a user-given schema)")
    d.add_argument("--label", help="label column (header name or 0-based index)")
    d.add_argument("--categorical", help="comma-separated categorical columns")
    d.add_argument("--numeric", help="comma-separated numeric columns (log-transformed)")
    d.add_argument("--sequence", help="comma-separated multi-hot columns (lists such as a click history "
                                      "'170301^573514': one mean-pooled bag field each)")
    d.add_argument("--sequence-separator", default=None, help="separator of the values in a --sequence column "
                                                              "(default '^')")
    d.add_argument("--sequence-max-len", type=int, default=None, metavar="N",
                   help="keep each --sequence list's last N values")
    d.add_argument("--delimiter", default=None, help="field delimiter (default ',')")
    d.add_argument("--no-header", action="store_true", help="the file has no header row")
    d.add_argument("--quote", default=None, metavar="CHAR",
                   help="quote character of quoted fields (default '\"', as pandas/Excel CSV: "
                        "\"New York, NY\", \"\" inside for a quote); --quote '' disables quoting")
    d.add_argument("--no-quote", action="store_true", help="no quoting: a quote is a plain byte (--quote '')")


def _reader_options(a: argparse.Namespace) -> dict:
    from mlfast.api import reader_options

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
        if a.format != "auto":
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
    return reader_options(format=fmt, hash_buckets=buckets, hash_seed=a.hash_seed,
                          int_buckets=not a.no_int_buckets, on_bad_line=a.on_bad_line,
                          cache=not a.no_cache, num_threads=a.reader_threads, schema=schema,
                          min_count=a.min_count)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="?", help="training file (Criteo TSV, Avazu CSV, .gz ok); "
                   f"omitted: a generated Criteo-format demo file ({DEMO_ROWS:,} rows)")
    p.add_argument("--peers", default="deepfm,dcn",
                   help="comma-separated peers with options, e.g. deepfm,dcn:layers=4,dcn (default: deepfm,dcn)")
    p.add_argument("--valid", help="validation file (default: 8:1:1 seeded split of DATA)")
    p.add_argument("--test", help="test file (needs --valid)")
    p.add_argument("--out", help="run directory (default: runs/<peers>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--batch-size", type=int, default=None, help="default 4096 (smaller for small data)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--embedding-dim", type=int, default=16)
    g.add_argument("--embedding-l2", type=float, default=1e-5)
    g.add_argument("--net-l2", type=float, default=0.0)
    g.add_argument("--alpha", type=float, default=1.0, help="weight of the peer term")
    g.add_argument("--mutual", choices=["kl", "symkl", "mse"], default="kl", help="peer term")
    g.add_argument("--alpha-warmup", type=int, default=0, metavar="STEPS", help="ramp alpha from 0 over STEPS")
    g.add_argument("--regime", choices=["joint", "finetune"], default="joint",
                   help="joint: mutual from scratch; finetune: each peer alone first, then mutual (the paper)")
    g.add_argument("--finetune-epochs", type=int, default=None)
    g.add_argument("--finetune-lr", type=float, default=None)
    g.add_argument("--eval-every", type=int, default=0, metavar="STEPS")
    g.add_argument("--patience", type=int, default=2)
    g.add_argument("--lr-decay", type=float, default=0.1)
    g.add_argument("--max-steps", type=int, default=None)
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--deterministic", action="store_true")
    g.add_argument("--use-dense", action="store_true", help="also feed the log-transformed integers")
    e = p.add_argument_group("execution")
    e.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    e.add_argument("--engine", choices=["auto", "plain", "fused"], default="auto")
    e.add_argument("--sparse-optimizer", choices=["adam", "adagrad", "sgd"], default="adam")
    e.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    e.add_argument("--no-cuda-graph", action="store_true")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_reader_args(p)


def _train_config(a: argparse.Namespace):
    from mlfast.train.config import TrainConfig
    from mlfast.models import parse_peers

    try:
        specs = parse_peers(a.peers)
    except ValueError as exc:
        raise UsageError(f"--peers: {exc}")
    if a.regime != "finetune" and (a.finetune_epochs is not None or a.finetune_lr is not None):
        raise UsageError("--finetune-epochs/--finetune-lr only apply with --regime finetune")
    if a.regime == "finetune" and len(specs) < 2:
        raise UsageError(f"--regime finetune needs at least two peers, got {a.peers!r}")
    if a.test and not a.valid:
        raise UsageError("--test needs --valid (without both, DATA is split 8:1:1 into train/valid/test)")
    if a.resume and not a.out:
        raise UsageError("--resume needs --out (the run directory to continue)")
    if a.bf16 or (a.device not in ("auto", "cpu")):
        import torch

        if a.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {a.device}: CUDA is not available on this machine")
        if a.bf16 and not torch.cuda.is_available():
            raise UsageError("--bf16 needs a CUDA device")
    if a.engine == "plain" and a.sparse_optimizer != "adam":
        raise UsageError("--sparse-optimizer applies to the fused engine, not --engine plain")
    kw = dict(
        peers=[str(s) for s in specs], embedding_dim=a.embedding_dim, epochs=a.epochs, batch_size=a.batch_size,
        lr=a.lr, embedding_l2=a.embedding_l2, net_l2=a.net_l2, alpha=a.alpha, mutual=a.mutual,
        alpha_warmup_steps=a.alpha_warmup, regime=a.regime, finetune_lr=a.finetune_lr, eval_every=a.eval_every,
        patience=a.patience, lr_decay=a.lr_decay, max_steps=a.max_steps, checkpoint_every=a.checkpoint_every,
        seed=a.seed, deterministic=a.deterministic, device=a.device, bf16=a.bf16, engine=a.engine,
        sparse_optimizer=a.sparse_optimizer, cuda_graph=not a.no_cuda_graph, use_dense=a.use_dense,
        num_threads=a.threads, progress=not a.quiet,
    )
    if a.finetune_epochs is not None:
        kw["finetune_epochs"] = a.finetune_epochs
    try:
        return TrainConfig(**kw)
    except ValueError as exc:
        raise UsageError(str(exc))


def demo_data_path(rows: int = DEMO_ROWS, seed: int = 0) -> Path:
    """Where the generated demo file lives (generated once, reused)."""
    from mlfast.io.cache import default_cache_dir

    return default_cache_dir() / "demo" / f"criteo_synth_{rows}_seed{seed}.tsv"


def ensure_demo_data(rows: int = DEMO_ROWS, seed: int = 0) -> Path:
    from mlfast.io.synth import synth_criteo

    path = demo_data_path(rows, seed)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"generating demo data: {rows:,} Criteo-format rows -> {path}")
        tmp = path.with_name(path.name + ".partial")
        report = synth_criteo(str(tmp), rows=rows, seed=seed)
        os.replace(tmp, path)
        side = Path(str(tmp) + ".synth.json")
        if side.exists():
            os.replace(side, Path(str(path) + ".synth.json"))
        print(f"  hidden model's Bayes-optimal AUC {report.bayes_auc:.4f}, logloss {report.bayes_logloss:.4f}")
    return path


def cmd_train(a: argparse.Namespace) -> int:
    from mlfast.api import fit

    cfg = _train_config(a)
    ropts = _reader_options(a)
    for flag in ("valid", "test"):
        if getattr(a, flag):
            _existing_file(getattr(a, flag), f"--{flag} file")
    if a.data:
        _existing_file(a.data, "training file")
        data = a.data
    else:
        data = str(ensure_demo_data())
    out = a.out or f"runs/{'-'.join(s.split(':')[0] for s in cfg.peers)}-{time.strftime('%Y%m%d-%H%M%S')}"
    if a.resume and not Path(out).is_dir():
        raise UsageError(f"--resume: run directory not found: {out}")
    result = fit(data, a.valid, a.test, peers=cfg.peers, out=out, resume=a.resume, reader=ropts,
                 **{k: v for k, v in cfg.to_dict().items() if k != "peers"})
    train = result.metrics["train"]
    print(f"\n{train['samples']:,} samples in {train['train_seconds']:.1f}s "
          f"({train['samples_per_second']:,.0f} samples/s); stopped: {train['stopped']}")
    print(f"run directory: {out} (metrics.json, curves.csv, curves.png, model.pt, checkpoints)")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from mlfast.api import load_run
    from mlfast.report import metrics_table

    _existing_file(a.data, "data file")
    pred = load_run(a.run, device=a.device)
    metrics = pred.evaluate(pred.read(a.data, on_bad_line=a.on_bad_line))
    print(metrics_table({Path(a.data).name: metrics}))
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from mlfast.api import load_run, write_predictions_csv

    _existing_file(a.data, "data file")
    pred = load_run(a.run, device=a.device)
    data = pred.read(a.data, on_bad_line=a.on_bad_line)
    preds = pred.predict(data)
    write_predictions_csv(preds, a.out)
    skipped = sum(v for k, v in data.skipped.items() if k != "blank_line")
    note = f" ({skipped} bad lines skipped: {data.skipped})" if skipped else ""
    print(f"wrote {len(data):,} rows x {len(preds)} columns ({', '.join(preds)}) to {a.out}{note}")
    return 0


def cmd_synth(a: argparse.Namespace) -> int:
    from mlfast.io.synth import synth_criteo

    if a.rows < 1:
        raise UsageError(f"--rows {a.rows}: expected >= 1")
    r = synth_criteo(a.out, rows=a.rows, seed=a.seed, test_format=a.test_format)
    print(f"wrote {r.rows:,} rows ({r.bytes / 1e6:.1f} MB) to {r.path} in {r.seconds:.1f}s; positive rate "
          f"{r.positive_rate:.3f}; hidden model's Bayes-optimal AUC {r.bayes_auc:.4f}, logloss {r.bayes_logloss:.4f}")
    return 0


def cmd_study(a: argparse.Namespace) -> int:
    from mlfast.study import parse_groups, run_study
    from mlfast.models import parse_peers

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
    data = _existing_file(a.data, "training file") if a.data else str(ensure_demo_data())
    out = a.out or f"runs/study-{time.strftime('%Y%m%d-%H%M%S')}"
    kw = {k: v for k, v in cfg.to_dict().items() if k not in ("peers", "seed", "regime")}
    run_study(data, a.valid, a.test, peers=cfg.peers, groups=a.groups, seeds=seeds, split_seed=a.split_seed,
              reader=ropts, out=out, resume=a.resume, control=not a.no_control, **kw)
    print(f"study directory: {out} (study.csv, study_runs.csv, study.json, study.png, every phase's run)")
    return 0


def _int_list(text: str, flag: str, allow_zero: bool = False) -> list[int]:
    try:
        vals = [int(float(x)) for x in text.split(",") if x]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers")
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
    bench.main(impls, a.device, rows, batches, a.steps, a.warmup, a.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlfast", description="Mutual learning for CTR models on raw click logs.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train peers mutually on a raw log file")
    _add_train_args(t)
    t.set_defaults(func=cmd_train)
    for name, func, helptext in (("eval", cmd_eval, "print per-peer and ensemble metrics of a run on a file"),
                                 ("predict", cmd_predict, "write per-peer and ensemble probabilities as CSV")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("run", help="run directory written by mlfast train")
        q.add_argument("data", help="file to score (read with the run's format and hashing)")
        if name == "predict":
            q.add_argument("--out", required=True, help="CSV to write")
        q.add_argument("--device", default="auto")
        q.add_argument("--on-bad-line", choices=["error", "skip"], default="error")
        q.set_defaults(func=func)
    s = sub.add_parser("synth", help="generate Criteo-format data from a hidden model")
    s.add_argument("kind", choices=["criteo"])
    s.add_argument("out", help="file to write (.gz compresses)")
    s.add_argument("--rows", type=int, default=1_000_000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--test-format", action="store_true", help="39 fields, no label")
    s.set_defaults(func=cmd_synth)
    st = sub.add_parser("study", help="the paper's protocol: pretrain each peer alone, fine-tune groups "
                                      "mutually, over seeds; solo-vs-mutual table")
    _add_train_args(st)
    st.set_defaults(peers="deepfm,dcn,ipnn,fibinet")
    st.add_argument("--groups", default="default",
                    help="default (all pairs + all peers), pairs, all, or groups like deepfm+dcn,deepfm+dcn+ipnn")
    st.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    st.add_argument("--split-seed", type=int, default=0, help="seed of the 8:1:1 split (fixed across seeds)")
    st.add_argument("--no-control", action="store_true",
                    help="skip the control (each peer fine-tuned alone for the same epochs), which "
                         "separates the mutual term's effect from the extra training")
    st.set_defaults(func=cmd_study)
    b = sub.add_parser("bench", help="training-step throughput: mlfast vs plain PyTorch, in one run")
    b.add_argument("--impls", default="eager,compile,sparse,mlfast",
                   help="comma-separated: eager, compile, sparse, mlfast (default: all)")
    b.add_argument("--device", default="auto")
    b.add_argument("--rows", help="rows per peer table, comma-separated (default: 1.8M,35.3M on CUDA)")
    b.add_argument("--batch-sizes", help="comma-separated (default: 4096,16384 on CUDA)")
    b.add_argument("--steps", type=int, default=30)
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--json", help="write the results here (bench/results/<name>.json)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return a.func(a)
    except UsageError as exc:
        parser.exit(2, f"mlfast {a.command}: error: {exc}\n")
    except (ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"mlfast {a.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
