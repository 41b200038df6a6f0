"""Starting a distributed run: the environment torchrun sets, the process groups, `--nproc`.

* Under ``torchrun`` (``python -m torch.distributed.run``) rank, world size, local rank and the
  rendezvous come from the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``), as every PyTorch program reads them; multi-node through torchrun's own
  ``--nnodes`` / ``--rdzv-*`` options.
* ``mlfast train --nproc N ...`` runs ``python -m torch.distributed.run --standalone
  --nproc-per-node N -m mlfast train ...`` (the same command line without ``--nproc``).
* Backend: NCCL when the run's device is CUDA, gloo on the CPU; ``--backend`` overrides. Device:
  ``cuda:LOCAL_RANK`` for ``--device auto`` / ``cuda`` on a machine with GPUs, else the CPU.
* A collective that waits longer than ``MLFAST_DIST_TIMEOUT`` seconds (default 300) fails, so a
  rank that died never leaves the others hanging past that bound (usually they fail at once: the
  dead rank's connections close).
"""
from __future__ import annotations

import atexit
import datetime
import faulthandler
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist

from mlfast.dist.comm import Comm, CommStats
from mlfast.dist.topology import Topology
from mlfast.train.config import DIST_BACKENDS as BACKENDS

DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "MLFAST_DIST_TIMEOUT"
log = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a torchrun (or equivalently launched) job."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def restart_count() -> int:
    """How many times torchrun restarted this job's workers (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def timeout_seconds() -> float:
    v = os.environ.get(TIMEOUT_ENV)
    try:
        t = float(v) if v else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={v!r}: expected a number of seconds") from None
    if not t > 0:
        raise ValueError(f"{TIMEOUT_ENV}={v!r}: expected a positive number of seconds")
    return t


def strip_option(argv: Sequence[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == name:
            skip = True
            continue
        if a.startswith(name + "="):
            continue
        out.append(a)
    return out


def run_with_torchrun(argv: Sequence[str], nproc: int) -> int:
    """Run ``mlfast <argv>`` (without ``--nproc``) as ``nproc`` ranks through torch.distributed.run
    on this machine; returns its exit status. SIGTERM is passed on to it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "mlfast",
           *strip_option(argv, "--nproc")]
    proc = subprocess.Popen(cmd)
    prev = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda s, f: proc.send_signal(s))
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # Ctrl-C reached torchrun too (same process group): wait for it
                continue
    finally:
        signal.signal(signal.SIGTERM, prev)


def resolve_rank_device(spec: str, local_rank: int) -> torch.device:
    """The device of this rank: ``auto`` / ``cuda`` -> ``cuda:LOCAL_RANK`` where GPUs exist."""
    if spec in ("auto", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if spec == "cuda":
            raise ValueError("--device cuda: CUDA is not available on this machine")
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available on this machine")
    return dev


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {'|'.join(BACKENDS)}")
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("--backend nccl needs CUDA devices (this run's device is the CPU); use gloo")
    return backend


@dataclass
class DistContext:
    """This rank's view of the job: topology, device, backend and its three process groups.

    ``world``: every rank; ``data``: the ranks of this rank's peer group (dense all-reduce,
    BatchNorm, table shards); ``peer``: the ranks with this rank's data shard (logits).
    """

    topology: Topology
    device: torch.device
    backend: str
    world: Comm
    data: Comm
    peer: Comm
    stats: CommStats = field(default_factory=CommStats)
    local_rank: int = 0

    @property
    def rank(self) -> int:
        return self.topology.rank

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def is_writer(self) -> bool:
        """Rank 0 prints progress and writes reports and single-file checkpoints."""
        return self.topology.rank == 0

    @classmethod
    def create(cls, mode: str, num_peers: int, device: torch.device, backend: str,
               local_rank: int = 0) -> "DistContext":
        """Process groups for ``mode`` on an initialised default group (collective: every rank
        calls it with the same arguments)."""
        W, r = dist.get_world_size(), dist.get_rank()
        topo = Topology.make(mode, W, r, num_peers)
        stats = CommStats()
        world = Comm("world", list(range(W)), None, stats, device)
        G, D = topo.groups, topo.shards
        # new_group is collective over the whole world: every rank creates every group, in one order
        data_groups = [list(range(g * D, (g + 1) * D)) for g in range(G)]
        peer_groups = [[g * D + d for g in range(G)] for d in range(D)]
        mine_data = mine_peer = None
        for ranks in data_groups:
            pg = None if len(ranks) == W else (dist.new_group(ranks) if len(ranks) > 1 else "single")
            if r in ranks:
                mine_data = Comm("data", ranks, None if pg == "single" else pg, stats, device)
        for ranks in peer_groups:
            pg = None if len(ranks) == W else (dist.new_group(ranks) if len(ranks) > 1 else "single")
            if r in ranks:
                mine_peer = Comm("peer", ranks, None if pg == "single" else pg, stats, device)
        assert mine_data is not None and mine_peer is not None
        return cls(topo, device, backend, world, mine_data, mine_peer, stats, local_rank)

    def describe(self) -> str:
        return f"{self.topology.describe()}; backend {self.backend}, device {self.device}"


def init_process_group(device_spec: str = "auto", backend: str = "auto") -> tuple[torch.device, str, int]:
    """Initialise the default process group from torchrun's environment (once per process);
    returns (this rank's device, backend, local rank)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_rank_device(device_spec, local_rank)
    be = resolve_backend(backend, device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        kw = {"device_id": device} if be == "nccl" else {}
        timeout = datetime.timedelta(seconds=timeout_seconds())
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(be, store=_attempt_store(rank, world, timeout), rank=rank, world_size=world,
                                timeout=timeout, **kw)
        atexit.register(shutdown_process_group)
        if not faulthandler.is_enabled():
            faulthandler.enable()  # a rank that aborts or crashes shows every thread's Python stack
    align_numba_threads()
    return device, be, local_rank


def shutdown_process_group() -> None:
    """Destroy every process group of this process, if any (idempotent; registered at exit).

    Gloo's worker threads may still hold the last collective's tensors; released after the
    interpreter began finalising, they would need the GIL a finalising interpreter no longer gives,
    and the rank aborts at exit. Destroying the groups first joins those threads."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - exiting anyway; say why the groups stayed
            log.debug("destroy_process_group failed: %s", exc)


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store of torchrun's environment (``env://``), its keys prefixed by the restart
    attempt. torchrun's agent keeps one store across ``--max-restarts`` restarts; without the prefix a
    restarted rank can read the dead attempt's gloo addresses and fail to connect ("connectFullMesh
    ... Connection refused": every restart failed so, torch 2.13)."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(addr, port, world, is_master=not agent and rank == 0, timeout=timeout,
                          multi_tenant=not agent)
    return dist.PrefixStore(f"mlfast/attempt_{restart_count()}", store)


def align_numba_threads() -> int:
    """Give numba's parallel regions (e.g. the lazy row initialisation) torch's thread count.

    numba starts one pool thread per core in every process, and its threads spin-wait after each
    parallel region: with one rank per core, every rank's pool takes cycles from the others'
    compute (measured on 2 cores: two 1-thread ranks each ran 6x slower than alone). Returns the
    count set."""
    import numba

    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


class _RankPrefix(logging.Filter):
    """Prefixes warnings and errors with ``[rank r/W]`` (every rank logs its own errors)."""

    def __init__(self, rank: int, world: int):
        super().__init__()
        self.prefix = f"[rank {rank}/{world}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and not str(record.msg).startswith("[rank "):
            record.msg = self.prefix + str(record.msg)
        return True


def configure_rank_logging(rank: int, world: int) -> None:
    """Rank 0 logs as a single process does; the others show warnings and errors only, and every
    rank's warnings and errors carry its rank."""
    logger = logging.getLogger("mlfast")
    if not any(isinstance(f, _RankPrefix) for f in logger.filters):
        logger.addFilter(_RankPrefix(rank, world))
    if rank != 0:
        for h in logger.handlers:
            if getattr(h, "_mlfast_console", False):
                h.setLevel(max(h.level, logging.WARNING))
