"""Who does what: P peers and a world of W ranks laid out as G peer groups x D data shards.

``--parallel``:

* ``data``:  G = 1, D = W. Every rank holds all peers; each takes a slice of every global batch;
  the embedding rows are sharded over the D ranks.
* ``peers``: G = W, D = 1 (needs P >= W). Peers are spread over the ranks (contiguous, balanced:
  P = 3 on 2 ranks gives peers {0, 1} and {2}); every rank reads every batch whole.
* ``both``:  G = the largest divisor of W that is <= P, D = W / G (4 ranks, 2 peers: 2 x 2).

Rank r is peer group ``r // D``, data shard ``r % D``. The *data group* of a rank is its peer
group's D ranks (they all-reduce dense gradients, synchronise BatchNorm and shard the tables); its
*peer group* is the G ranks with the same data shard (they exchange logits).

Example::

    >>> t = Topology.make("both", world_size=4, rank=3, num_peers=2)
    >>> (t.groups, t.shards, t.group, t.shard, t.own_peers, t.data_ranks, t.peer_ranks)
    (2, 2, 1, 1, [1], [2, 3], [1, 3])
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from mlfast.train.config import PARALLEL as PARALLEL_MODES


@dataclass(frozen=True)
class Topology:
    mode: str
    world_size: int
    rank: int
    num_peers: int
    groups: int  # G: peer groups
    shards: int  # D: data shards

    @classmethod
    def make(cls, mode: str, world_size: int, rank: int, num_peers: int) -> "Topology":
        if mode not in PARALLEL_MODES:
            raise ValueError(f"parallel={mode!r}: expected one of {'|'.join(PARALLEL_MODES)}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of a world of {world_size}")
        if num_peers < 1:
            raise ValueError("no peers")
        if mode == "data":
            G = 1
        elif mode == "peers":
            if num_peers < world_size:
                raise ValueError(f"parallel=peers: {world_size} processes need at least {world_size} peers, got "
                                 f"{num_peers} (use --parallel both or data)")
            G = world_size
        else:
            G = max(g for g in range(1, world_size + 1) if world_size % g == 0 and g <= num_peers)
        return cls(mode, world_size, rank, num_peers, G, world_size // G)

    @property
    def group(self) -> int:
        return self.rank // self.shards

    @property
    def shard(self) -> int:
        return self.rank % self.shards

    def peers_of(self, g: int) -> list[int]:
        """The peers of group ``g``: a contiguous, balanced range of 0..P-1."""
        P, G = self.num_peers, self.groups
        return list(range(g * P // G, (g + 1) * P // G))

    @property
    def own_peers(self) -> list[int]:
        return self.peers_of(self.group)

    @property
    def max_peers_per_group(self) -> int:
        return max(len(self.peers_of(g)) for g in range(self.groups))

    @property
    def data_ranks(self) -> list[int]:
        return [self.group * self.shards + d for d in range(self.shards)]

    @property
    def peer_ranks(self) -> list[int]:
        return [g * self.shards + self.shard for g in range(self.groups)]

    def rank_of(self, group: int, shard: int) -> int:
        return group * self.shards + shard

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("rank")
        return d

    def describe(self) -> str:
        return (f"{self.world_size} processes, --parallel {self.mode}: {self.groups} peer group(s) x {self.shards} "
                f"data shard(s); " + "; ".join(f"group {g}: peers {self.peers_of(g)}" for g in range(self.groups)))


