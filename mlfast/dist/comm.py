"""Collectives over one process group, with byte counters and errors that name the rank.

Every collective the distributed engine runs goes through a `Comm`: it counts the bytes this rank
puts on the wire per kind of traffic ("ids", "rows", "grads", "dense", "logits", ...), so the
benchmark and the README's projection read the implementation's own numbers, and it turns a
failed collective (a peer process died, the timeout passed) into a `RankFailure` that says which
rank saw it, in which collective and with which ranks.

Bytes sent per rank, by the usual bandwidth-optimal algorithms (what NCCL's ring / tree and gloo's
ring do on the wire, self-copies excluded), for a payload of n bytes and a group of s ranks:

    all_reduce       2 (s - 1) / s * n
    all_gather       (s - 1) * n            (n: this rank's contribution)
    all_to_all       sum of the parts sent to the other ranks
    broadcast        n at the source, 0 elsewhere (as counted: the source's fan-out)

A group of one rank sends nothing and calls nothing.
"""
from __future__ import annotations

import pickle
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.distributed as dist


class RankFailure(RuntimeError):
    """A collective failed on this rank: another rank died, stalled past the timeout, or failed."""


@dataclass
class CommStats:
    """Bytes sent and calls made by this rank, per kind of traffic (shared by a rank's comms)."""

    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # waiting included

    def add(self, kind: str, nbytes: float) -> None:
        self.bytes[kind] += int(nbytes)
        self.calls[kind] += 1

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {"bytes": dict(self.bytes), "calls": dict(self.calls), "seconds": dict(self.seconds)}

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()
        self.seconds.clear()

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Comm:
    """A process group (``ranks``: the global ranks in it, in group order) seen from one member.

    ``index`` is this rank's position in ``ranks``; ``size`` the number of members. Collectives on
    a group of one are no-ops that return their input.
    """

    def __init__(self, name: str, ranks: Sequence[int], group: Any, stats: CommStats, device: torch.device):
        self.name = name
        self.ranks = list(ranks)
        self.group = group
        self.stats = stats
        self.device = device
        self.size = len(self.ranks)
        me = dist.get_rank() if dist.is_initialized() else 0
        self.index = self.ranks.index(me) if me in self.ranks else -1
        self.rank = me

    def __repr__(self) -> str:
        return f"Comm({self.name!r}, ranks={self.ranks})"

    def _fail(self, what: str, exc: BaseException) -> RankFailure:
        world = dist.get_world_size() if dist.is_initialized() else 1
        return RankFailure(
            f"rank {self.rank}/{world}: {what} over the {self.name} group (ranks {self.ranks}) failed: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. Another rank probably died or stalled "
            "past the timeout; its own log says why. Resume with --resume (torchrun --max-restarts does it itself)")

    def _call(self, what: str, fn, *args, kind: str = "", **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, group=self.group, **kwargs)
        except (RuntimeError, dist.DistError, ConnectionError) as exc:  # DistBackendError, gloo/NCCL errors
            raise self._fail(what, exc) from exc
        finally:
            self.stats.seconds[kind or what] += time.perf_counter() - t0

    # tensors ---------------------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor, kind: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In place; returns ``t``."""
        if self.size == 1:
            return t
        self.stats.add(kind, 2 * (self.size - 1) / self.size * _nbytes(t))
        self._call("all_reduce", dist.all_reduce, t, op=op, kind=kind)
        return t

    def all_gather(self, t: torch.Tensor, kind: str) -> torch.Tensor:
        """[size, *t.shape]: every member's ``t`` (all the same shape), in group order."""
        if self.size == 1:
            return t.unsqueeze(0)
        t = t.contiguous()
        out = torch.empty((self.size, *t.shape), dtype=t.dtype, device=t.device)
        self.stats.add(kind, (self.size - 1) * _nbytes(t))
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._call("all_gather", fn, out.view(-1), t.view(-1), kind=kind)
        return out

    def exchange_counts(self, counts: torch.Tensor, kind: str = "counts") -> torch.Tensor:
        """``counts`` [size] (what this rank sends to each member) -> what each member sends here."""
        if self.size == 1:
            return counts.clone()
        out = torch.empty_like(counts)
        self.stats.add(kind, (self.size - 1) / self.size * _nbytes(counts))
        self._call("all_to_all (counts)", dist.all_to_all_single, out, counts.contiguous(), kind=kind)
        return out

    def all_to_all(self, send: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int],
                   kind: str) -> torch.Tensor:
        """Rows ``send[sum(send_counts[:j]) : ...]`` go to member j; returns the rows received
        [sum(recv_counts), *send.shape[1:]], member 0's first."""
        if self.size == 1:
            return send
        send = send.contiguous()
        out = torch.empty((int(sum(recv_counts)), *send.shape[1:]), dtype=send.dtype, device=send.device)
        row = send[0].numel() * send.element_size() if send.shape[0] else 0
        self.stats.add(kind, (sum(send_counts) - send_counts[self.index]) * row)
        self._call("all_to_all", dist.all_to_all_single, out, send, output_split_sizes=list(recv_counts),
                   input_split_sizes=list(send_counts), kind=kind)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            self._call("barrier", dist.barrier)

    # python objects (setup, checkpoints, refreshes: never the hot path) -------------------------
    def broadcast_object(self, obj: Any, src_index: int = 0, kind: str = "objects") -> Any:
        """``obj`` of member ``src_index``, on every member."""
        if self.size == 1:
            return obj
        box = [obj if self.index == src_index else None]
        if self.index == src_index:
            self.stats.add(kind, len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)))
        self._call("broadcast", dist.broadcast_object_list, box, src=self.ranks[src_index], kind=kind)
        return box[0]

    def all_gather_object(self, obj: Any, kind: str = "objects") -> list[Any]:
        """Every member's ``obj``, in group order."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        self.stats.add(kind, (self.size - 1) * len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)))
        self._call("all_gather_object", dist.all_gather_object, out, obj, kind=kind)
        return out

    def gather_object(self, obj: Any, dst_index: int = 0, kind: str = "objects") -> list[Any] | None:
        """Every member's ``obj`` on member ``dst_index`` (in group order); None elsewhere."""
        if self.size == 1:
            return [obj]
        if self.index != dst_index:
            self.stats.add(kind, len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)))
        out: list[Any] | None = [None] * self.size if self.index == dst_index else None
        self._call("gather_object", dist.gather_object, obj, out, dst=self.ranks[dst_index], kind=kind)
        return out

    def any_flag(self, value: int, kind: str = "control") -> int:
        """The largest ``value`` over the members (e.g. a signal number; 0 for none)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self.all_reduce(t, kind, op=dist.ReduceOp.MAX)
        return int(t.item())
