"""Multi-process training equals one process (gloo on the CPU, fp32, deterministic).

Each test spawns the ranks (``torch.multiprocessing.spawn``), trains `DistEngine` for a few steps
on the same global batches as a single-process `FusedEngine` (batch B = 37: odd, so the two data
shards differ in size; a bag field with empty bags; a row looked up by both shards; dropout on),
merges the ranks' shards into one snapshot and compares every peer's whole table and dense state,
and the reported losses, with a tight tolerance:

* ``data``, 2 processes: row-sharded tables, BatchNorm over both shards, dropout masks of each
  shard's rows, the loss scaled b / B;
* ``peers``, 2 processes, K = 1: peers {deepfm} and {dcn, lr}, logits exchanged, symkl (the kind
  whose gradient flows through both peers of a pair);
* ``both``, 4 processes: 2 peer groups x 2 data shards, mse;
* ``peers`` with ``--exchange-every 2``: after each refresh a rank's copies of the other peers
  are exactly their owners' state at that step (no single-process equivalent: stale on purpose).
"""
from __future__ import annotations

import torch

import dist_helpers as H
from mlfast.dist.checkpoint import merge_snapshots
from mlfast.models import parse_peers
from mlfast.train.group import PeerGroup

TOL = {"rtol": 1e-5, "atol": 5e-6}  # fp32 sums in another order; see dist_helpers.tame_adam
STEPS = 4


def _group_from(snapshot: dict) -> PeerGroup:
    g = PeerGroup.build(parse_peers(H.PEERS), H.SCHEMA, embedding_dim=16, seeds=H.SEEDS)
    g.restore(snapshot)
    return g


def _tables_meta() -> dict:
    g = PeerGroup.build(parse_peers(H.PEERS), H.SCHEMA, embedding_dim=16, seeds=H.SEEDS)
    return {"widths": list(g.tables.widths), "seeds": H.SEEDS, "labels": g.labels, "init_std": g.tables.init_std,
            "num_rows": H.SCHEMA.table_rows}


def _run(tmp_path, mode: str, world: int, mutual: str, exchange_every: int = 1) -> list[dict]:
    H.run_ranks(H.engine_worker, world, mode, mutual, exchange_every, STEPS, str(tmp_path))
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _assert_equals_single_process(parts: list[dict], mutual: str, mode: str) -> None:
    ref = H.reference(H.config(mutual, 1, mode), STEPS)
    for p in parts:  # every rank reports the global losses
        torch.testing.assert_close(p["losses"], ref["losses"], **TOL)
    merged = _group_from(merge_snapshots(parts, _tables_meta()))
    for i in range(merged.num_peers):
        torch.testing.assert_close(merged.tables.peer_weight(i), ref["tables"][i], **TOL, msg=f"peer {i} table")
        mine = merged.peer_states()[i]
        for k, v in ref["dense"][i].items():
            if v.is_floating_point():
                torch.testing.assert_close(mine[k], v, **TOL, msg=f"peer {i} {k}")
            else:  # BatchNorm's num_batches_tracked, dropout seed and counter
                assert torch.equal(mine[k], v), (i, k)


def test_data_parallel_equals_one_process_with_the_global_batch(tmp_path):
    parts = _run(tmp_path, "data", 2, "kl")
    assert [p["shards"] for p in parts] == [2, 2] and all(p["own"] == [0, 1, 2] for p in parts)
    _assert_equals_single_process(parts, "kl", "data")
    # the tables really are split: each rank holds about half of the rows the batches touched
    rows = [len(p["snapshot"]["tables"]["rows"]) for p in parts]
    assert min(rows) > 0.3 * sum(rows)
    # and the rows travelled: ids, rows and gradients all-to-all, dense gradients all-reduced
    for p in parts:
        assert {"ids", "rows", "grads", "dense", "batchnorm", "losses"} <= set(p["bytes"])


def test_peer_parallel_equals_one_process_mutual_training(tmp_path):
    parts = _run(tmp_path, "peers", 2, "symkl")
    assert [p["own"] for p in parts] == [[0], [1, 2]]
    _assert_equals_single_process(parts, "symkl", "peers")
    # per step: the all-gather of B logits per peer (padded to the widest group), nothing else big
    B, width = 37, 2
    assert parts[0]["bytes"]["logits"] == STEPS * B * width * 4
    assert "dense" not in parts[0]["bytes"] and "rows" not in parts[0]["bytes"]


def test_peer_groups_times_data_shards_equal_one_process(tmp_path):
    parts = _run(tmp_path, "both", 4, "mse")
    assert [(p["own"], p["shard"]) for p in parts] == [([0], 0), ([0], 1), ([1, 2], 0), ([1, 2], 1)]
    _assert_equals_single_process(parts, "mse", "both")


def test_stale_copies_are_the_owners_state_at_each_refresh(tmp_path):
    parts = _run(tmp_path, "peers", 2, "kl", exchange_every=2)
    assert "logits" not in parts[0]["bytes"]  # no per-step exchange: copies instead
    meta = _tables_meta()
    for me, them in ((parts[0], parts[1]), (parts[1], parts[0])):
        assert sorted(me["copies"]) == [0, 2]  # refreshed at steps 0 and 2 of 4
        for k, copy_snap in me["copies"].items():
            owner_snap = them["own_at"][k]
            as_copy = [{"own": me["others"], "shard": 0, "shards": 1, "snapshot": copy_snap}]
            as_owner = [{"own": them["own"], "shard": 0, "shards": 1, "snapshot": owner_snap}]
            a = merge_snapshots(as_copy, meta, peers=them["own"])
            b = merge_snapshots(as_owner, meta, peers=them["own"])
            assert torch.equal(a["tables"]["rows"], b["tables"]["rows"]), k  # every row the owner updated
            for gi in them["own"]:
                assert torch.equal(a["tables"]["peers"][gi], b["tables"]["peers"][gi]), (k, gi)
                sa, sb = a["peers"][gi], b["peers"][gi]
                assert all(torch.equal(sa[key], sb[key]) for key in sb), (k, gi)
    # training used them: the run differs from exchanging logits every step
    ref = H.reference(H.config("kl", 1, "peers"), STEPS)
    assert not torch.allclose(parts[0]["losses"][2:], ref["losses"][2:])
