"""Helpers of the multi-process tests: a free port, rank workers started with
``torch.multiprocessing.spawn`` (gloo on the CPU), the batches they train on and the
single-process reference they must equal.

Workers write their results to files (spawn returns nothing); every wait is bounded.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch

from mlfast.io.batches import Batch
from mlfast.models import FeatureSchema, parse_peers
from mlfast.train.config import TrainConfig

# 3 one-hot fields of odd sizes, then one bag field
SCHEMA = FeatureSchema((0, 37, 60, 101, 150), num_bags=1)
PEERS = "deepfm:mlp=16-16,dropout=0.2,dcn:mlp=16,layers=2,dropout=0.1,lr"
SEEDS = [11, 12, 13]


def free_port() -> int:
    """A port for rank 0's rendezvous store, chosen BELOW the kernel's ephemeral range.

    A port the OS hands out for ``bind(0)`` is an ephemeral one, and the previous test's gloo
    connections leave client sockets in TIME_WAIT on ephemeral ports for a minute: the store's
    ``bind`` then fails with EADDRINUSE now and then (a flaky spawn failure). Outside that range no
    client socket ever lives, so a port that binds now is still free when rank 0 binds it."""
    import random

    try:
        lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        lo = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(10001, lo))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def global_batches(n: int = 4, B: int = 37, seed: int = 1) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    offs = SCHEMA.field_offsets
    out = []
    for _ in range(n):
        ids = torch.stack([torch.randint(offs[f], offs[f + 1], (B,), generator=g) for f in range(3)], 1)
        ids[0] = ids[-1]  # a row looked up by both shards
        lengths = torch.randint(0, 4, (B,), generator=g)  # empty bags too
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
        values = torch.randint(offs[3], offs[4], (int(offsets[-1]),), generator=g)
        y = (torch.rand(B, generator=g) < 0.3).float()
        out.append(Batch(sparse=ids, dense=None, labels=y, index=torch.arange(B), bags=((offsets, values),)))
    return out


def shard_of(batch: Batch, lo: int, hi: int):
    from mlfast.dist.data import ShardBatch

    bags = []
    for o, v in batch.bags:
        bags.append((o[lo:hi + 1] - o[lo], v[int(o[lo]):int(o[hi])]))
    return ShardBatch(batch.sparse[lo:hi], None, batch.labels[lo:hi], batch.index[lo:hi], tuple(bags), len(batch), lo)


def config(mutual: str = "kl", exchange_every: int = 1, parallel: str = "data") -> TrainConfig:
    return TrainConfig(peers=PEERS.split(","), sparse_optimizer="adam", embedding_l2=1e-3, mutual=mutual, alpha=0.7,
                       cuda_graph=False, progress=False, kernels="numba", exchange_every=exchange_every,
                       parallel=parallel)


ADAM_EPS = 1e-4


def tame_adam(eng) -> None:
    """Adam's epsilon raised from 1e-8 to ADAM_EPS for the dense and the table optimizer, in the
    reference and in every rank alike. Why: a sum of B terms adds in another order on D shards
    than in one process, so each gradient differs from the single process's by ~1e-7 of its terms'
    size; Adam's first steps move a weight by ~lr * g / (|g| + eps), so a weight whose gradient
    is ~1e-9 by cancellation (it happens) moves by anything up to lr either way and the runs part.
    With eps = 1e-4 such a weight moves by ~lr * g / eps: the rounding stays at rounding size, and
    the comparison below can be tight for every weight."""
    import dataclasses

    for g in eng.optimizer.param_groups:
        g["eps"] = ADAM_EPS
    t = eng.group.tables
    t.cfg = dataclasses.replace(t.cfg, eps=ADAM_EPS)


def reference(cfg: TrainConfig, steps: int) -> dict[str, Any]:
    """The single-process run: losses, each peer's dense state and whole table."""
    from mlfast.train.engine import make_engine

    eng = make_engine(parse_peers(PEERS), SCHEMA, cfg, torch.device("cpu"), SEEDS, lr=1e-2, engine="fused")
    tame_adam(eng)
    eng.set_alpha(cfg.alpha)
    losses = [eng.train_step(b).clone() for b in global_batches(steps)]
    t = eng.group.tables
    return {"losses": torch.stack(losses), "dense": eng.group.peer_states(),
            "tables": [t.peer_weight(p) for p in range(t.num_peers)]}


def init_rank(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def engine_worker(rank: int, world: int, port: int, mode: str, mutual: str, exchange_every: int, steps: int,
                  out_dir: str) -> None:
    """One rank of a DistEngine run on `global_batches`; writes its shard of the result."""
    import torch.distributed as dist

    from mlfast.dist.engine import DistEngine
    from mlfast.dist.launch import DistContext, init_process_group
    from mlfast.io.batches import shard_bounds

    init_rank(rank, world, port)
    device, backend, _ = init_process_group("cpu", "gloo")
    specs = parse_peers(PEERS)
    ctx = DistContext.create(mode, len(specs), device, backend)
    cfg = config(mutual, exchange_every, mode)
    eng = DistEngine(ctx, specs, SCHEMA, cfg, device, SEEDS, 1e-2)
    tame_adam(eng)
    eng.set_alpha(cfg.alpha)
    topo = ctx.topology
    losses, copies, own_at = [], {}, {}
    for k, gb in enumerate(global_batches(steps)):
        lo, hi = shard_bounds(len(gb), topo.shard, topo.shards)
        eng.step_index = k
        if eng.copies is not None and k % exchange_every == 0:
            own_at[k] = eng.group.snapshot()  # what the others' copies of these peers must become now
        losses.append(eng.train_step(shard_of(gb, lo, hi)).clone())
        if eng.copies is not None and eng.last_refresh == k:  # right after a refresh
            copies[k] = eng.copies.snapshot()
    result = {"own": eng.own, "others": eng.others, "shard": topo.shard, "shards": topo.shards,
              "snapshot": eng.group.snapshot(), "losses": torch.stack(losses), "copies": copies, "own_at": own_at,
              "bytes": dict(ctx.stats.bytes)}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run_ranks(fn, world: int, *args: Any, timeout: float = 240) -> None:
    """``fn(rank, world, port, *args)`` on ``world`` spawned processes, bounded by ``timeout``."""
    import torch.multiprocessing as mp

    # the children read it before numba starts its pool (see mlfast/__init__.py)
    before = os.environ.get("LOCAL_WORLD_SIZE")
    os.environ["LOCAL_WORLD_SIZE"] = str(world)
    try:
        ctx = mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=False,
                                 start_method="spawn")
    finally:
        if before is None:
            os.environ.pop("LOCAL_WORLD_SIZE")
        else:
            os.environ["LOCAL_WORLD_SIZE"] = before
    import time

    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{world} ranks did not finish within {timeout} s")
