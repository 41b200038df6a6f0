"""Sharded checkpoints of a multi-process run, and their merge into single-process snapshots.

Layout, under the run directory (which every rank must see: a shared filesystem on several nodes,
as torch.distributed.checkpoint assumes too)::

    dist/last/step-000000120/rank-00000-of-00004.pt     each rank's own state at step 120
    dist/best/step-000000084/rank-00003-of-00004.pt     each rank's share of the best weights

Each rank writes its own file atomically (temp file + rename, in the background like a single
process's ``last.pt``). A step counts once every rank's file of it exists: resume (and
``load_run``) use the latest complete step, so a job killed in the middle of writing falls back to
the previous one, never to a mix. A rank deletes its own files of steps older than the latest
complete one; two steps are on disk at most.

A rank's file holds its tables' rows (local numbering: global row = local * D + shard) with their
optimizer state, its peers' dense weights and Adam state, its stale copies, the progress, its own
RNG state and its share of the best weights. `merge_snapshots` turns the shards of a group
snapshot back into the single-process format (``PeerGroup.snapshot``), which is how ``model.pt``
is written and how ``mlfast predict`` / ``eval`` / ``load_run`` read a run that stopped before it.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mlfast.ops.embedding import TableLayout
from mlfast.train import checkpoint as ckpt
from mlfast.train.tables import init_rows

DIST_DIR = "dist"
_NAME = re.compile(r"^rank-(\d+)-of-(\d+)\.pt$")
_STEP = re.compile(r"^step-(\d+)$")


class ShardedStore:
    """``<run>/dist/<name>/step-<S>/rank-<r>-of-<W>.pt`` for one rank."""

    def __init__(self, run: str | Path, name: str, rank: int, world_size: int):
        self.root = Path(run) / DIST_DIR / name
        self.rank, self.world_size = int(rank), int(world_size)

    def path(self, step: int, rank: int | None = None) -> Path:
        r = self.rank if rank is None else rank
        return self.root / f"step-{step:09d}" / f"rank-{r:05d}-of-{self.world_size:05d}.pt"

    def _steps(self) -> dict[int, dict[int, set[int]]]:
        """{step: {world size: ranks present}}."""
        out: dict[int, dict[int, set[int]]] = {}
        if not self.root.is_dir():
            return out
        for d in self.root.iterdir():
            m = _STEP.match(d.name)
            if not m or not d.is_dir():
                continue
            for f in d.iterdir():
                n = _NAME.match(f.name)
                if n:
                    out.setdefault(int(m.group(1)), {}).setdefault(int(n.group(2)), set()).add(int(n.group(1)))
        return out

    def latest(self) -> int | None:
        """The latest step every rank of this world size finished writing."""
        done = [s for s, by in self._steps().items() if len(by.get(self.world_size, ())) == self.world_size]
        return max(done) if done else None

    def world_sizes(self) -> set[int]:
        """World sizes that wrote complete steps here."""
        return {w for by in self._steps().values() for w, ranks in by.items() if len(ranks) == w}

    def collect_garbage(self) -> None:
        """Delete this rank's files of steps before the latest complete one."""
        latest = self.latest()
        if latest is None:
            return
        for step in self._steps():
            if step < latest:
                with contextlib.suppress(OSError):
                    self.path(step).unlink()
                with contextlib.suppress(OSError):
                    self.path(step).parent.rmdir()  # the last rank to clean up removes the directory


def latest_complete(run: str | Path, name: str) -> tuple[int, int] | None:
    """(step, world size) of the latest complete step of ``dist/<name>`` in ``run`` (any world size)."""
    best = None
    for w in ShardedStore(run, name, 0, 1).world_sizes():
        s = ShardedStore(run, name, 0, w).latest()
        if s is not None and (best is None or s > best[0]):
            best = (s, w)
    return best


def load_shards(run: str | Path, name: str) -> list[dict[str, Any]] | None:
    """Every rank's file of the latest complete step of ``dist/<name>``, in rank order."""
    found = latest_complete(run, name)
    if found is None:
        return None
    step, world = found
    store = ShardedStore(run, name, 0, world)
    return [ckpt.load_checkpoint(store.path(step, r)) for r in range(world)]


# ---------------------------------------------------------------------------------------------
# Merging shards into the single-process snapshot format

def _peer_values(tables: dict[str, Any], li: int) -> torch.Tensor:
    if "weight" in tables:
        return tables["weight"][:, TableLayout.from_dict(tables["layout"]).columns(li)]
    return tables["peers"][li]


def _peer_parts(shards: Sequence[dict[str, Any]], gi: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | None:
    """Peer ``gi``'s (global rows, values [T, W]) from the shard snapshots holding it, and one of
    their tables' metadata; None if no shard holds it. ``shards``: {"own", "shard", "shards",
    "snapshot"} per rank."""
    rows, vals, meta, li = [], [], None, None
    for s in shards:
        if gi not in s["own"] or s["snapshot"] is None:
            continue
        li = s["own"].index(gi)
        t = s["snapshot"]["tables"]
        if "weight" not in t and li not in t.get("peers", {}):
            continue
        rows.append(t["rows"].long() * int(s["shards"]) + int(s["shard"]))
        vals.append(_peer_values(t, li))
        meta = {"layout": t["layout"], "seeds": t["seeds"], "labels": t["labels"], "init_std": t["init_std"],
                "global_rows": t.get("global_rows", t["num_rows"]), "li": li, "dense": None}
        if s["snapshot"]["peers"][li] is not None:
            meta["dense"] = s["snapshot"]["peers"][li]
    if meta is None:
        return None
    r, v = torch.cat(rows), torch.cat(vals)
    order = torch.argsort(r)
    return r[order], v[order], meta


def merge_snapshots(shards: Sequence[dict[str, Any]], tables: dict[str, Any],
                    peers: Sequence[int] | None = None) -> dict[str, Any]:
    """One single-process group snapshot (``PeerGroup.snapshot`` format, every peer's columns,
    global rows) from the ranks' snapshots of their peers' shards, or, with ``peers``, a per-peer
    snapshot of those peers only (the format of ``snapshot(peers=...)``).

    Each entry of ``shards``: ``{"own": [global peer indices], "shard": d, "shards": D,
    "snapshot": that rank's group snapshot}``. ``tables``: every peer's ``widths``, ``seeds``,
    ``labels``, and ``init_std``, ``num_rows`` (global) (`DistTrainer.global_tables`). Rows one
    peer group updated and another did not get the other group's initial values (from their seeds).
    """
    widths, seeds, labels = list(tables["widths"]), [int(x) for x in tables["seeds"]], list(tables["labels"])
    init_std, num_rows = float(tables["init_std"]), int(tables["num_rows"])
    P = len(widths)
    wanted = list(range(P)) if peers is None else [int(p) for p in peers]
    parts: dict[int, tuple] = {}
    for gi in wanted:
        got = _peer_parts(shards, gi)
        if got is None:
            raise ValueError(f"no shard holds peer {gi} ({labels[gi]})")
        parts[gi] = got
    layout = TableLayout.make(widths)
    rows = torch.unique(torch.cat([parts[gi][0] for gi in wanted])) if wanted else torch.zeros(0, dtype=torch.int64)
    meta = {"layout": layout.to_dict(), "num_rows": num_rows, "labels": labels, "seeds": seeds,
            "init_std": init_std, "rows": rows}
    dense = [parts[i][2]["dense"] if i in parts else None for i in range(P)]
    if peers is not None:
        vals = {gi: _fill(rows, parts[gi][0], parts[gi][1], seeds[gi], widths[gi], init_std) for gi in wanted}
        return {"tables": {**meta, "peers": vals}, "peers": dense}
    weight = torch.zeros(len(rows), layout.row_width, dtype=torch.float32)
    for gi in wanted:
        weight[:, layout.columns(gi)] = _fill(rows, parts[gi][0], parts[gi][1], seeds[gi], widths[gi], init_std)
    return {"tables": {**meta, "weight": weight}, "peers": dense}


def _fill(rows: torch.Tensor, have: torch.Tensor, values: torch.Tensor, seed: int, width: int,
          std: float) -> torch.Tensor:
    """Values [len(rows), width]: ``values`` at ``have``, the initial values elsewhere."""
    out = torch.empty(len(rows), width, dtype=torch.float32)
    pos = torch.searchsorted(rows, have)
    mask = torch.ones(len(rows), dtype=torch.bool)
    mask[pos] = False
    missing = rows[mask].numpy()
    if len(missing):
        out[mask] = init_rows(seed, np.ascontiguousarray(missing, np.int64), width, std)
    out[pos] = values.float()
    return out


def local_part(snap: dict[str, Any], own: Sequence[int], shard: int, shards: int) -> dict[str, Any]:
    """The part of a single-process group snapshot (all peers' columns, global rows) that a rank
    holding peers ``own`` and data shard ``shard`` of ``shards`` loads (its group's `restore`)."""
    t = snap["tables"]
    layout = TableLayout.from_dict(t["layout"])
    rows = t["rows"].long()
    mine = rows % shards == shard
    widths = [layout.widths[i] for i in own]
    sub = TableLayout.make(widths)
    src = t["weight"][mine] if "weight" in t else None
    weight = torch.zeros(int(mine.sum()), sub.row_width, dtype=torch.float32)
    for li, gi in enumerate(own):
        weight[:, sub.columns(li)] = src[:, layout.columns(gi)] if src is not None else t["peers"][gi][mine]
    from mlfast.dist.sharded_tables import local_rows

    tables = {"layout": sub.to_dict(), "num_rows": local_rows(int(t["num_rows"]), shard, shards),
              "labels": [t["labels"][i] for i in own], "seeds": [t["seeds"][i] for i in own],
              "init_std": t["init_std"], "rows": torch.div(rows[mine], shards, rounding_mode="floor"),
              "weight": weight, "shard": shard, "shards": shards, "global_rows": int(t["num_rows"])}
    return {"tables": tables, "peers": [snap["peers"][i] for i in own]}


# ---------------------------------------------------------------------------------------------
# A stopped multi-process run, read by one process

def load_sharded_run(run: str | Path) -> dict[str, Any] | None:
    """The run's latest complete sharded best weights (else its last state) as a checkpoint
    ``mlfast.api.inference_group`` reads (``best`` or ``state``), or None if it has none."""
    for name in ("best", "last"):
        states = load_shards(run, name)
        if states is None:
            continue
        first = states[0]
        P = int(first["topology"]["num_peers"])
        tables = first["global_tables"]
        meta = {k: v for k, v in first.items() if k not in ("state", "optimizer", "rng", "best", "copies", "exchange",
                                                            "progress", "rank")}
        if name == "last":
            parts = [{"own": s["own"], "shard": s["shard"], "shards": s["topology"]["shards"], "snapshot": s["state"]}
                     for s in states]
            return {**meta, "state": merge_snapshots(parts, tables)}
        best = []
        for gi in range(P):
            parts = [{"own": s["own"], "shard": s["shard"], "shards": s["topology"]["shards"],
                      "snapshot": s["best"][gi]} for s in states if s["best"][gi] is not None]
            best.append(merge_snapshots(parts, tables, peers=[gi]) if parts else None)
        return {**meta, "best": best}
    return None
