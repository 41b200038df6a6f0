"""The pieces of multi-process training that need no second process: the process layout, batch
and row sharding, the dropout masks of a shard, snapshot merge / split, the sharded checkpoint
store, and the command line."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mlfast.dist.checkpoint import ShardedStore, latest_complete, local_part, merge_snapshots
from mlfast.dist.data import ShardedBatchLoader
from mlfast.dist.launch import strip_option
from mlfast.dist.layers import relu_dropout_forward_at
from mlfast.dist.sharded_tables import ShardedPeerTables, local_rows
from mlfast.dist.topology import Topology
from mlfast.io.batches import shard_bounds
from mlfast.io.batches import BatchLoader
from mlfast.io.data import CTRData
from mlfast.models import FeatureSchema, parse_peers
from mlfast.ops.dropout import relu_dropout_forward
from mlfast.train.group import PeerGroup


@pytest.mark.parametrize("mode,world,peers,expect", [
    ("data", 4, 2, (1, 4)), ("peers", 3, 5, (3, 1)), ("both", 4, 2, (2, 2)), ("both", 8, 3, (2, 4)),
    ("both", 6, 3, (3, 2)), ("peers", 1, 2, (1, 1)),
])
def test_topology_layouts(mode, world, peers, expect):
    tops = [Topology.make(mode, world, r, peers) for r in range(world)]
    assert (tops[0].groups, tops[0].shards) == expect
    # every peer is owned by exactly one group, contiguous and balanced
    owned = sorted(p for g in range(tops[0].groups) for p in tops[0].peers_of(g))
    assert owned == list(range(peers))
    sizes = [len(tops[0].peers_of(g)) for g in range(tops[0].groups)]
    assert max(sizes) - min(sizes) <= 1
    # data groups and peer groups partition the world; a rank is in one of each
    for t in tops:
        assert t.rank in t.data_ranks and t.rank in t.peer_ranks
        assert all(tops[r].group == t.group for r in t.data_ranks)
        assert all(tops[r].shard == t.shard for r in t.peer_ranks)


def test_topology_errors():
    with pytest.raises(ValueError, match="at least 3 peers"):
        Topology.make("peers", 3, 0, 2)
    with pytest.raises(ValueError, match="parallel='rows'"):
        Topology.make("rows", 2, 0, 2)


@pytest.mark.parametrize("n,shards", [(37, 2), (5, 4), (3, 4), (4096, 8), (1, 1)])
def test_shard_bounds_cover_a_batch_in_order(n, shards):
    parts = [shard_bounds(n, d, shards) for d in range(shards)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert max(h - l for l, h in parts) - min(h - l for l, h in parts) <= 1


def test_sharded_loader_gives_each_shard_its_rows_of_every_global_batch(np_rng):
    n = 103
    data = CTRData(labels=np.zeros(n, np.float32), dense=np.zeros((n, 1), np.float32),
                   dense_missing=np.zeros((n, 1), bool), sparse=np.arange(n).reshape(n, 1),
                   field_offsets=np.array([0, n]), field_names=["a"])
    idx = np.sort(np_rng.choice(n, 90, replace=False))
    base = BatchLoader(data, 16, indices=idx, shuffle=True, seed=5, min_last=2)
    whole = [b.index.tolist() for b in base.epoch(3)]
    shards = [list(ShardedBatchLoader(base, d, 3).epoch(3)) for d in range(3)]
    assert all(len(s) == len(base) for s in shards)
    for k, rows in enumerate(whole):
        got = [shards[d][k] for d in range(3)]
        assert sum((b.index.tolist() for b in got), []) == rows  # the global batch, in order
        assert [b.offset for b in got] == [shard_bounds(len(rows), d, 3)[0] for d in range(3)]
        assert all(b.global_size == len(rows) for b in got)
    resumed = list(ShardedBatchLoader(base, 1, 3).epoch(3, start_batch=4))
    assert [b.index.tolist() for b in resumed] == [b.index.tolist() for b in shards[1][4:]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_shards_dropout_masks_are_the_single_process_masks_of_its_rows(dtype, gen):
    x = torch.randn(37, 45, generator=gen).to(dtype)  # rows of 45: shard starts fall inside Philox blocks
    full = relu_dropout_forward(x, 0.3, seed=123, counter=7)
    for lo, hi in [(0, 18), (18, 37), (5, 6), (36, 37), (11, 11)]:
        part = relu_dropout_forward_at(x[lo:hi].contiguous(), 0.3, 123, 7, start=lo * 45)
        assert torch.equal(part, full[lo:hi]), (lo, hi)


def test_sharded_rows_start_where_the_single_process_rows_do():
    widths = (17, 16, 1)
    whole = PeerGroup.build(parse_peers("deepfm:mlp=8,dcn:mlp=8,lr"), FeatureSchema((0, 40, 101)), embedding_dim=16,
                            seeds=[4, 5, 6]).tables
    assert tuple(whole.widths) == widths

    class TwoRanks:  # only the size is read when no lookup runs
        size = 2

    for d in range(2):
        t = ShardedPeerTables(101, widths, shard=d, shards=2, comm=TwoRanks(), seeds=[4, 5, 6], lazy=False)
        assert t.num_rows == local_rows(101, d, 2) == (51 if d == 0 else 50)
        for p in range(3):
            assert torch.equal(t.peer_weight(p), whole.peer_weight(p)[d::2])


def _trained_group(seed: int) -> PeerGroup:
    from mlfast.ops.sparse_optim import SparseOptimConfig

    g = PeerGroup.build(parse_peers("deepfm:mlp=8,dcn:mlp=8,lr"), FeatureSchema((0, 40, 101)), embedding_dim=4,
                        seeds=[4, 5, 6], optimizer=SparseOptimConfig("adam", lr=0.1))
    ids = torch.randint(0, 101, (64, 2), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] %= 40
    ids[:, 1] = 40 + ids[:, 1] % 61
    g(ids).sum().backward()  # one update of the rows these ids touched
    return g


@pytest.mark.parametrize("mode,world", [("data", 3), ("peers", 2), ("both", 4)])
def test_split_and_merge_snapshots_round_trip(mode, world):
    g = _trained_group(1)
    snap = g.snapshot()
    t = g.tables
    meta = {"widths": list(t.widths), "seeds": list(t.seeds), "labels": list(t.labels), "init_std": t.init_std,
            "num_rows": t.num_rows}
    parts = []
    for r in range(world):
        topo = Topology.make(mode, world, r, 3)
        parts.append({"own": topo.own_peers, "shard": topo.shard, "shards": topo.shards,
                      "snapshot": local_part(snap, topo.own_peers, topo.shard, topo.shards)})
    merged = merge_snapshots(parts, meta)
    back = PeerGroup.build(parse_peers("deepfm:mlp=8,dcn:mlp=8,lr"), FeatureSchema((0, 40, 101)), embedding_dim=4,
                           seeds=[4, 5, 6])
    back.restore(merged)
    for p in range(3):
        assert torch.equal(back.tables.peer_weight(p), t.peer_weight(p))
    assert torch.equal(merged["tables"]["rows"], snap["tables"]["rows"])
    # a per-peer merge (best weights) holds only that peer's columns
    one = merge_snapshots(parts, meta, peers=[1])
    assert list(one["tables"]["peers"]) == [1] and one["peers"][0] is None and one["peers"][1] is not None


def test_sharded_store_uses_only_complete_steps(tmp_path):
    stores = [ShardedStore(tmp_path, "last", r, 2) for r in range(2)]
    for step, writers in ((3, (0, 1)), (6, (0, 1)), (9, (0,))):  # step 9: rank 1 died before writing
        for r in writers:
            p = stores[r].path(step)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x")
    assert stores[0].latest() == 6 and latest_complete(tmp_path, "last") == (6, 2)
    stores[0].collect_garbage()
    stores[1].collect_garbage()
    assert not (tmp_path / "dist" / "last" / "step-000000003").exists()  # both shards of step 3 gone
    assert stores[0].path(6).exists() and stores[0].path(9).exists()
    assert ShardedStore(tmp_path, "last", 0, 4).latest() is None  # another world size: nothing to resume


def test_command_line_flags():
    from mlfast.cli import _train_config, build_parser

    _, subs = build_parser()
    a = subs["train"].parse_args(["x.tsv", "--parallel", "both", "--exchange-every", "4", "--backend", "gloo",
                                  "--nproc", "4"])
    cfg = _train_config(a)
    assert (cfg.parallel, cfg.exchange_every, cfg.backend, a.nproc) == ("both", 4, "gloo", 4)
    assert strip_option(["train", "x", "--nproc", "4", "--parallel", "data", "--nproc=2"], "--nproc") == \
        ["train", "x", "--parallel", "data"]
    with pytest.raises(ValueError, match="exchange_every"):
        cfg.replace(exchange_every=0)
