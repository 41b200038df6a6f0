"""``mlfast train`` as one rank of a torchrun job, and `fit`, the Python API's multi-process twin.

Every rank runs the same program on the same data. Rank 0 alone decides about the run directory
(new, ``--resume``, ``--overwrite``, an already finished run), reads the data first (so the binary
cache is written once; the others then read it), writes ``config.json``, ``train.log``,
``metrics.json``, the curves, ``model.pt`` (merged from every rank's shard) and ``finished.json``,
and prints; its decisions reach the others by broadcast. Each rank writes its own checkpoint shard.

Under torchrun's ``--max-restarts``, a restarted job (``TORCHELASTIC_RESTART_COUNT`` > 0) resumes
from the last complete sharded checkpoint by itself; it needs ``--out`` (a default directory name
has the start time in it, which a restart would not find).
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from mlfast.api import MODEL_FILE, FitResult, Predictor, Session, _finished, _train, plan_run
from mlfast.dist.comm import Comm, CommStats
from mlfast.dist.data import shard_loader
from mlfast.dist.launch import (DistContext, configure_rank_logging, init_process_group, launched_by_torchrun,
                                restart_count, run_with_torchrun, shutdown_process_group)
from mlfast.dist.topology import Topology
from mlfast.dist.trainer import DistTrainer
from mlfast.io.data import CTRData
from mlfast.io.prepare import prepare_data
from mlfast.models import parse_peers
from mlfast.train import checkpoint as ckpt
from mlfast.train.config import TrainConfig

log = logging.getLogger("mlfast")


class DistSession(Session):
    """`Session` for one rank: its data shard's training loader, `DistTrainer` phases, a merged
    ``model.pt``."""

    def __init__(self, prep, cfg: TrainConfig, ctx: DistContext, log: Callable | None = None):
        super().__init__(prep, cfg, device=ctx.device, log=log)
        self.ctx = ctx
        topo = ctx.topology
        if topo.shards > 1:
            self.loaders["train"] = shard_loader(self.loaders["train"], topo.shard, topo.shards)

    def train_group(self, specs, out, *, cfg: TrainConfig | None = None, init_states=None, lr: float | None = None,
                    resume: bool = False, evaluate_first: bool = False):
        cfg = cfg or self.cfg
        ctx = self.ctx
        world = ctx.world
        out = world.broadcast_object(None if out is None else str(out), kind="setup")  # only rank 0 was told
        out = Path(out) if out is not None else None
        t = DistTrainer(specs, self.schema, cfg, ctx=ctx, init_states=init_states, lr=lr,
                        dense_touch=getattr(self, "dense_touch", False))
        t._extra_state = self.extra
        done = world.broadcast_object(_finished(out) if resume and ctx.is_writer else None, kind="setup")
        if done is not None and done.get("epochs", cfg.epochs) >= cfg.epochs:
            t.load_finished(out)
            return t, done["summary"] if "summary" in done else done
        board = None
        if out is not None and ctx.is_writer:
            (out / "finished.json").unlink(missing_ok=True)
            if cfg.tensorboard:
                from mlfast.report import TensorBoardScalars

                board = TensorBoardScalars(out / "tensorboard")
                t.listeners.append(board)
        try:
            summary = t.fit(self.loaders["train"], self.loaders["valid"], out,
                            resume=resume and out is not None and t.has_checkpoint(out),
                            extra_state=self.extra, evaluate_first=evaluate_first)
        finally:
            if board is not None:
                board.close()
        merged = t.merged_snapshot()
        if out is not None and ctx.is_writer:
            ckpt.save_checkpoint(out / MODEL_FILE, {"kind": "model", "state": merged, **t._meta()})
            ckpt.fault_point("after_model")
            ckpt.write_json(out / "finished.json", {"epochs": cfg.epochs, "summary": summary})
        world.barrier()
        return t, summary


def _on_rank0(world: Comm, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0, its result (or its failure) on every rank."""
    result: Any = None
    if world.index == 0:
        try:
            result = ("ok", fn())
        except BaseException as exc:  # noqa: BLE001 - every rank stops, rank 0 with the original error
            world.broadcast_object(("error", f"{type(exc).__name__}: {exc}"), kind="setup")
            raise
    got = world.broadcast_object(result, kind="setup")
    if got[0] == "error":
        raise RuntimeError(f"rank 0 stopped: {got[1]}")
    return got[1]


def fit(train: str | Path | CTRData | None, valid=None, test=None, *, peers=None, out: str | Path | None = None,
        resume: bool = False, overwrite: bool = False, reader: dict[str, Any] | None = None,
        log: Callable | None = None, log_file: bool = False, **config: Any) -> FitResult:
    """``mlfast.fit`` for one rank of a job started by torchrun (every rank calls it alike).

    Takes `mlfast.api.fit`'s arguments; ``parallel`` (data | peers | both), ``exchange_every`` and
    ``backend`` choose the layout. Only rank 0 writes the run directory. The returned predictor is
    this rank's (its lookups are collective under ``--parallel data``): to score files from one
    process, ``mlfast.load_run(out)`` after the job.

    Example (``torchrun --nproc-per-node 2 train.py``)::

        from mlfast.dist.run import fit
        result = fit("train.txt", peers=["deepfm", "dcn"], parallel="data", out="runs/x")
    """
    from mlfast.api import _RunLog

    t_start = time.perf_counter()
    device, backend, local_rank = init_process_group(config.get("device", "auto"), config.get("backend", "auto"))
    W, r = dist.get_world_size(), dist.get_rank()
    configure_rank_logging(r, W)
    world = Comm("world", list(range(W)), None, CommStats(), device)
    writer = r == 0
    say = log or globals()["log"].info
    out_dir = Path(out) if out is not None else None
    with _RunLog(out_dir if (out_dir is not None and log_file and writer) else None) as run_log:
        plan = _on_rank0(world, lambda: plan_run(train, valid, test, peers, out_dir, resume, overwrite, reader,
                                                  config, say))
        cfg = TrainConfig.from_dict(plan["config"])
        if plan.get("finished") is not None:
            pred = Predictor.load(out_dir, cfg.device) if writer else None
            return FitResult(plan["finished"], pred, out_dir, [], already_finished=True)
        specs = parse_peers(cfg.peers)
        if cfg.regime != "joint" and W > 1:
            raise ValueError("regime=finetune runs in one process; a multi-process run trains the peers jointly "
                             "(--regime joint)")
        Topology.make(cfg.parallel, W, r, len(specs))  # a bad layout fails here, before the data is read
        split = plan["split_from_train"]

        def read():
            return prepare_data(plan["train"], None if split else plan["valid"], None if split else plan["test"],
                                reader=plan["reader"], split_seed=cfg.seed)

        # rank 0 reads first and writes the cache; the others read after it (a cache hit)
        first: list = []
        _on_rank0(world, lambda: first.append(read()) or True)  # a failure there stops every rank
        prep = first[0] if writer else read()
        ctx = DistContext.create(cfg.parallel, len(specs), device, backend, local_rank)
        try:
            s = DistSession(prep, cfg, ctx, log=say)
        except BaseException:
            if writer and plan["created"] and out_dir is not None and out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()
            raise
        if writer:
            say(f"data: {prep.info['rows']} rows, {s.schema.num_fields} fields, {s.schema.table_rows:,} table rows; "
                f"read in {prep.info['read_seconds']:.1f}s; global batch size {s.batch_size}; {ctx.describe()}")
            if out_dir is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
                ckpt.write_json(out_dir / "config.json", {
                    "config": cfg.to_dict(), "peers": [p.to_dict() for p in specs], "schema": s.schema.to_dict(),
                    "reader": prep.reader, "data": prep.info})
                if prep.vocab is not None:
                    prep.vocab.save(out_dir / "vocab.npz")
                run_log.start_file()
        try:
            result = _train(s, specs, cfg, out_dir if writer else None, plan["resume"], say, t_start)
        except BaseException:
            if writer and plan["created"] and out_dir is not None and not any(out_dir.rglob("*.pt")):
                shutil.rmtree(out_dir, ignore_errors=True)  # nothing worth keeping: no checkpoint was written
            raise
        return result


# ---------------------------------------------------------------------------------------------
# The command line

def cmd_train_distributed(a, cfg: TrainConfig, ropts: dict) -> int:
    """``mlfast train`` with ``--nproc N`` (start torchrun) or as one rank under torchrun."""
    from mlfast.cli import UsageError

    if cfg.regime != "joint":
        raise UsageError("--regime finetune runs in one process; several processes train the peers jointly")
    if not launched_by_torchrun():
        if a.nproc < 1:
            raise UsageError(f"--nproc {a.nproc}: expected >= 1")
        if not hasattr(a, "_argv"):
            raise UsageError("--nproc: the command line is not known here; run torchrun yourself")
        return run_with_torchrun(a._argv, a.nproc)
    if a.nproc:
        raise UsageError("--nproc starts torchrun itself; under torchrun, use its --nproc-per-node instead")
    if restart_count() > 0 and not a.out:
        raise UsageError("a job restarted by torchrun --max-restarts needs --out to find its checkpoints")
    device, backend, _ = init_process_group(cfg.device, cfg.backend)
    try:
        return _train_rank(a, cfg, ropts, device)
    finally:
        shutdown_process_group()  # on every path: a rank must not exit with its groups alive


def _train_rank(a, cfg: TrainConfig, ropts: dict, device) -> int:
    from mlfast.cli import _existing_file, _given_settings, ensure_demo_data
    from mlfast.report import metrics_table

    W, r = dist.get_world_size(), dist.get_rank()
    configure_rank_logging(r, W)
    world = Comm("world", list(range(W)), None, CommStats(), device)
    resume, overwrite = a.resume, a.overwrite
    try:
        if restart_count() > 0:  # torchrun --max-restarts restarted the job: continue it
            resume, overwrite = _on_rank0(world, lambda: Path(a.out).is_dir()), False
        data = a.data
        if data:
            _existing_file(data, "training file")
        elif not resume:
            data = _on_rank0(world, lambda: str(ensure_demo_data(a.demo_rows)))
        out = _on_rank0(world, lambda: a.out or f"runs/{'-'.join(s.split(':')[0] for s in cfg.peers)}-"
                                                f"{time.strftime('%Y%m%d-%H%M%S')}")
        kwargs = {k: v for k, v in cfg.to_dict().items() if k != "peers"}
        peers, reader = cfg.peers, ropts
        if resume:
            given = _given_settings(a, a._given, cfg, ropts)
            kwargs = given["config"]
            peers = kwargs.pop("peers", None)
            reader = given["reader"]
        result = fit(data, a.valid, a.test, peers=peers, out=out, resume=resume, overwrite=overwrite, reader=reader,
                     log_file=True, **kwargs)
    except Exception as exc:
        if W > 1 and exc.args and isinstance(exc.args[0], str) and not exc.args[0].startswith("rank "):
            exc.args = (f"[rank {r}/{W}] {exc.args[0]}",) + exc.args[1:]
        from mlfast.train.trainer import Interrupted

        if isinstance(exc, Interrupted) and r != 0:
            return 128 + exc.signum  # rank 0 says it
        raise
    if r == 0:
        m = result.metrics
        print(metrics_table({"valid": m.get("valid"), "test": m.get("test")}))
        train = m.get("train") or {}
        rate = train.get("samples_per_second")
        d = train.get("distributed") or {}
        sent = sum((d.get("bytes_sent_per_step") or {}).values())
        print(f"\n{train.get('samples', 0):,} samples in {train.get('train_seconds', 0):.1f}s "
              f"({'-' if rate is None else f'{rate:,.0f}'} samples/s) on {W} processes "
              f"(--parallel {cfg.parallel}); rank 0 sent {sent / 1e6:.3f} MB per step; stopped: "
              f"{train.get('stopped')}")
        print(f"run directory: {out} (metrics.json, curves.csv, model.pt, dist/ checkpoint shards, train.log)")
    return 0
