"""The peers' embedding tables: one owner, one layout, used for training, validation, prediction,
export and checkpoints alike.

``PeerTables`` (the fused engine's) holds P peers' tables interleaved in ONE buffer ``weight``
[V, R] (``mlfast.ops.embedding.TableLayout``: peer p's columns start on a multiple of 4 floats),
with its sparse optimizer state as buffers; ``forward(ids, bags)`` returns each peer's rows and its
backward is one fused optimizer step (``mlfast.ops.embedding``). ``DenseTables`` is the plain-PyTorch
reference and baseline: one ``nn.Parameter`` per peer, trained by a dense optimizer; it exists for
the benchmarks and the tests that compare against it.

Initialisation is a pure function of (peer seed, row, column) (``mlfast.ops.counter_rng``): N(0,
``init_std``) as FuxiCTR's embedding initialiser. So

* a peer starts from the same table whatever group it is in, and in either table kind;
* rows no update has touched never need storing: a checkpoint keeps only the ``updated`` rows and a
  load regenerates the rest. On the CPU ``PeerTables`` goes further and initialises a row when it is
  first looked up (``lazy``): a 3.4M-row hashed table costs neither memory pages nor time for the
  rows a small dataset never reaches.
"""
from __future__ import annotations

from typing import Any, Sequence

import numba as nb
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlfast.ops.backends import Backends, select_backends
from mlfast.ops.counter_rng import normal_rows
from mlfast.ops.embedding import Bags, TableLayout, _check_ids, check_bags, lookup
from mlfast.ops.sparse_optim import SparseOptimConfig
from mlfast.ops.sparse_update import TableOptimState, lazy_zeros, sparse_update

EMBEDDING_INIT_STD = 1e-4  # FuxiCTR's default embedding initialiser: N(0, 1e-4)
_INIT_CHUNK_ROWS = 1 << 20


def init_rows(seed: int, rows: np.ndarray, width: int, std: float = EMBEDDING_INIT_STD) -> torch.Tensor:
    """A peer's initial values [len(rows), width] (float32, CPU) for table rows ``rows``."""
    return torch.from_numpy(normal_rows(seed, rows, width, std))


@nb.njit(cache=True)
def _new_rows(ids, live, out):  # pragma: no cover - numba
    """Rows of ``ids`` not yet live, each once (marked live here); returns how many, or -1 - i
    when ids[i] is outside the table (nothing is marked then)."""
    V = live.shape[0]
    for i in range(ids.shape[0]):
        if ids[i] < 0 or ids[i] >= V:
            return -1 - i
    k = 0
    for i in range(ids.shape[0]):
        r = ids[i]
        if not live[r]:
            live[r] = True
            out[k] = r
            k += 1
    return k


class _TableBase(nn.Module):
    """What both table kinds share: layout, labels, seeds, initialisation, ``updated`` rows."""

    def __init__(self, num_rows: int, widths: Sequence[int], labels: Sequence[str] | None,
                 seeds: Sequence[int] | None, init_std: float, align: int):
        super().__init__()
        self.layout = TableLayout.make(widths, align)
        self.num_rows = int(num_rows)
        if self.num_rows < 1:
            raise ValueError(f"a table needs at least one row, got {num_rows}")
        P = self.layout.num_peers
        self.labels = tuple(labels) if labels is not None else tuple(f"peer{i}" for i in range(P))
        self.seeds = tuple(int(s) for s in seeds) if seeds is not None else tuple(range(P))
        if len(self.labels) != P or len(self.seeds) != P:
            raise ValueError(f"{len(self.labels)} labels and {len(self.seeds)} seeds for {P} peers")
        self.init_std = float(init_std)

    @property
    def widths(self) -> tuple[int, ...]:
        return self.layout.widths

    @property
    def num_peers(self) -> int:
        return self.layout.num_peers

    def peer_index(self, p: int | str) -> int:
        if isinstance(p, str):
            if p not in self.labels:
                raise KeyError(f"no peer labelled {p!r}; labels: {self.labels}")
            return self.labels.index(p)
        if not -self.num_peers <= p < self.num_peers:
            raise IndexError(f"peer {p} out of range for {self.num_peers} peers")
        return p % self.num_peers

    def meta(self) -> dict[str, Any]:
        return {"layout": self.layout.to_dict(), "num_rows": self.num_rows, "labels": list(self.labels),
                "seeds": list(self.seeds), "init_std": self.init_std}


class PeerTables(_TableBase):
    """P peers' embedding tables interleaved in one [V, R] buffer, with a fused sparse optimizer.

    ``optimizer=None`` makes inference-only tables (no optimizer state). ``backends`` chooses the
    lookup / update kernels (``mlfast.ops.backends.select_backends``); ``lr`` may be a [1] tensor
    shared with the dense optimizer. ``dense_touch``: the data will look up most rows (CPU memory
    in huge pages; otherwise a row's memory exists only once it is touched).

    Example::

        >>> t = PeerTables(1000, (17, 16), optimizer=SparseOptimConfig("adam", lr=1e-3))
        >>> e1, e2 = t(torch.randint(0, 1000, (8, 39)))
        >>> e1.shape, e2.shape
        (torch.Size([8, 39, 17]), torch.Size([8, 39, 16]))
        >>> (e1.sum() + 2 * e2.sum()).backward()   # the looked-up rows are updated in place
        >>> t.step_count, int(t.updated.sum()) <= 8 * 39
        (1, True)
    """

    def __init__(self, num_rows: int, widths: Sequence[int], *, labels: Sequence[str] | None = None,
                 seeds: Sequence[int] | None = None, init_std: float = EMBEDDING_INIT_STD,
                 optimizer: SparseOptimConfig | None = None, backends: Backends | None = None,
                 device: str | torch.device | None = None, align: int = 4, lazy: bool | None = None,
                 lr: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, bounds_check: bool = False,
                 dense_touch: bool = False):
        super().__init__(num_rows, widths, labels, seeds, init_std, align)
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.backends = backends or select_backends("auto", device)
        self.cfg = optimizer
        self.out_dtype = out_dtype
        self.bounds_check = bool(bounds_check)
        self.lazy = device.type == "cpu" if lazy is None else bool(lazy)
        if self.lazy and device.type != "cpu":
            raise ValueError("lazy row initialisation runs on the CPU only")
        V, R = self.num_rows, self.layout.row_width
        # lazy_zeros: on the CPU the pages of rows never written are never backed by memory, unless
        # the data will touch most rows anyway (dense_touch): then huge pages, for faster updates
        self.register_buffer("weight", lazy_zeros((V, R), device, huge_pages=dense_touch))
        self.register_buffer("updated", lazy_zeros((V,), device, np.bool_))
        self._live = np.zeros(V, np.bool_) if self.lazy else None
        self.state: TableOptimState | None = None
        if optimizer is not None:
            self.state = TableOptimState.create(V, self.layout, optimizer, device, lr, huge_pages=dense_touch)
            for k, t in self.state.tensors().items():
                self.register_buffer(k, t)
            self.register_buffer("step", self.state.step)
            self.register_buffer("lr", self.state.lr, persistent=False)
        self.anchor = torch.empty(0, device=device, requires_grad=True)
        if not self.lazy:
            self._init_all()

    # initialisation --------------------------------------------------------------------------
    def _row_keys(self, rows: np.ndarray) -> np.ndarray:
        """The counter stream's row for each table row (its own index; a shard's: the global row)."""
        return rows

    @torch.no_grad()
    def _init_rows(self, rows: np.ndarray, peers: Sequence[int] | None = None) -> None:
        """Write the initial values of ``rows`` (all peers, or ``peers``) into the table."""
        if len(rows) == 0:
            return
        rows = np.ascontiguousarray(rows, np.int64)
        keys = self._row_keys(rows)
        block = torch.zeros(len(rows), self.layout.row_width, dtype=torch.float32)
        for p in range(self.num_peers) if peers is None else peers:
            c = self.layout.columns(p)
            normal_rows(self.seeds[p], keys, self.widths[p], self.init_std, out=block.numpy(), col0=c.start)
        idx = torch.from_numpy(rows).to(self.weight.device)
        if peers is None:
            self.weight.index_copy_(0, idx, block.to(self.weight.device))
        else:
            for p in peers:
                c = self.layout.columns(p)
                self.weight[idx, c] = block[:, c].to(self.weight.device)

    def _init_all(self) -> None:
        for start in range(0, self.num_rows, _INIT_CHUNK_ROWS):
            self._init_rows(np.arange(start, min(start + _INIT_CHUNK_ROWS, self.num_rows), dtype=np.int64))

    def materialize(self, ids: torch.Tensor) -> None:
        """Initialise the rows of ``ids`` that are not yet (lazy tables; a no-op otherwise)."""
        if self._live is None or ids.numel() == 0:
            return
        flat = ids.reshape(-1).numpy()
        new = np.empty(len(flat), np.int64)
        k = _new_rows(flat, self._live, new)
        if k < 0:  # checked anyway (it costs nothing here): a wild id must not write outside the bitmap
            i = -1 - k
            raise IndexError(f"id {int(flat[i])} at position {i} is outside the table's rows [0, {self.num_rows})")
        if k:
            self._init_rows(new[:k])

    # properties ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def lookup_backend(self) -> str:
        return self.backends.lookup

    @property
    def step_count(self) -> int:
        """Updates applied so far (reads the device counter: a host sync)."""
        return int(self.state.step.item()) if self.state is not None else 0

    # lookup and update -----------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, bags: Bags = ()) -> list[torch.Tensor]:
        """Each peer's rows [B, F + S, W_p] for one-hot ids [B, F] and S bag fields (``(offsets
        [B+1], values)`` pairs, mean-pooled). With gradients enabled and an optimizer, the backward
        is one optimizer step over every row the batch touched."""
        if self.bounds_check:
            _check_ids(ids, bags, self.num_rows)
        if self._live is not None:
            check_bags(ids, bags)
            self.materialize(ids)
            for _, v in bags:
                self.materialize(v)
        return lookup(self, ids, bags, requires_grad=torch.is_grad_enabled() and self.state is not None)

    @torch.no_grad()
    def apply_gradients(self, ids: torch.Tensor, grads: Sequence[torch.Tensor]) -> None:
        """One optimizer step from the gradients of a lookup of ``ids`` (one tensor per peer with
        [ids.numel(), W_p] elements): what the lookup's backward calls."""
        if self.state is None:
            raise RuntimeError("these tables have no optimizer (inference only)")
        sparse_update(self.weight, self.layout, ids, grads, self.state, self.cfg, self.backends.update,
                      self.backends.deterministic, self.bounds_check)
        self.updated.index_fill_(0, ids.reshape(-1).long(), True)

    def set_lr(self, lr: float) -> None:
        """Learning rate of the next updates (in place on the device: captured graphs follow)."""
        if self.state is not None:
            self.state.lr.fill_(lr)

    # per-peer views ----------------------------------------------------------------------------
    def peer_weight(self, p: int | str) -> torch.Tensor:
        """A contiguous copy of peer ``p``'s whole table [V, W_p] (all rows initialised)."""
        if self._live is not None:
            self.materialize(torch.arange(self.num_rows))
        return self.weight[:, self.layout.columns(self.peer_index(p))].clone()

    @torch.no_grad()
    def set_peer_weight(self, p: int | str, weight: torch.Tensor) -> None:
        """Overwrite peer ``p``'s table with a [V, W_p] table (every row counts as updated)."""
        i = self.peer_index(p)
        if tuple(weight.shape) != (self.num_rows, self.widths[i]):
            raise ValueError(f"peer {p!r} table must be [{self.num_rows}, {self.widths[i]}], got {list(weight.shape)}")
        if self._live is not None:
            self.materialize(torch.arange(self.num_rows))
        self.weight[:, self.layout.columns(i)] = weight.to(self.weight)
        self.updated.fill_(True)

    # compact snapshots: only the rows updates touched ----------------------------------------
    @torch.no_grad()
    def snapshot(self, peers: Sequence[int] | None = None, optimizer_state: bool = True) -> dict[str, Any]:
        """The updated rows (CPU tensors, copies): ``rows`` [T], ``weight`` [T, R] (or, with
        ``peers``, each listed peer's columns [T, W_p]) and the optimizer state of those rows.
        Every other row is its initial value, regenerated by `restore`."""
        rows = torch.nonzero(self.updated).flatten()
        out: dict[str, Any] = {**self.meta(), "rows": rows.cpu()}
        w = self.weight.index_select(0, rows)
        if peers is None:
            out["weight"] = w.cpu()
        else:
            out["peers"] = {int(p): w[:, self.layout.columns(p)].cpu() for p in peers}
        if optimizer_state and self.state is not None:
            out["optimizer"] = {"config": vars(self.cfg).copy(), "step": self.step_count,
                                **{k: t.index_select(0, rows).cpu() for k, t in self.state.tensors().items()}}
        return out

    @torch.no_grad()
    def restore(self, snap: dict[str, Any], peers: Sequence[int] | None = None) -> None:
        """Load a `snapshot` in place (buffers keep their addresses, so captured graphs stay
        valid). With ``peers``, only those peers' columns change: rows updated now but not in the
        snapshot go back to their initial values. Optimizer state is restored when present."""
        if snap["layout"]["widths"] != list(self.widths) or int(snap["num_rows"]) != self.num_rows:
            raise ValueError(f"snapshot of tables {snap['layout']['widths']} x {snap['num_rows']} rows does not fit "
                             f"tables {list(self.widths)} x {self.num_rows} rows")
        if list(snap["seeds"]) != list(self.seeds) or float(snap["init_std"]) != self.init_std:
            raise ValueError("snapshot tables were initialised from other seeds: their untouched rows differ")
        rows = snap["rows"].to(torch.int64)
        src_layout = TableLayout.from_dict(snap["layout"])
        dev_rows = rows.to(self.device)
        now = torch.nonzero(self.updated).flatten()  # rows that may differ from their initial values
        keep = torch.zeros(self.num_rows, dtype=torch.bool, device=self.device)
        keep[dev_rows] = True
        stale = now[~keep[now]].cpu().numpy()  # updated now, initial in the snapshot
        if peers is None:
            if self._live is not None:
                self._live[stale] = False  # initialised again on their next lookup
                self._live[rows.numpy()] = True
            else:
                self._init_rows(stale)
            w = snap["weight"]
            if src_layout != self.layout:
                w = _relayout(w, src_layout, self.layout)
            self.weight.index_copy_(0, dev_rows, w.to(self.weight))
            self.updated[now] = False
            self.updated[dev_rows] = True
        else:
            for p in peers:
                self.restore_peer(int(p), snap, int(p))
        opt = snap.get("optimizer")
        if opt is not None and self.state is not None and peers is None:
            if opt["config"]["kind"] != self.cfg.kind:
                raise ValueError(f"checkpoint optimizer state is {opt['config']['kind']!r}, "
                                 f"these tables use {self.cfg.kind!r}")
            self.state.step.fill_(int(opt["step"]))
            for k, t in self.state.tensors().items():
                if k not in opt:
                    raise ValueError(f"checkpoint has no {k} for the {self.cfg.kind} optimizer")
                t[now] = 0.0  # every other row's state is zero already
                src = opt[k]
                if k != "sum_sq" and src_layout != self.layout:
                    src = _relayout(src, src_layout, self.layout)
                t.index_copy_(0, dev_rows, src.to(t))

    @torch.no_grad()
    def restore_peer(self, dst: int, snap: dict[str, Any], src: int = 0) -> None:
        """Peer ``dst``'s columns from peer ``src`` of a snapshot (e.g. a solo run's model as one
        peer of a group); rows updated now but not in the snapshot go back to their initial values.
        The optimizer state is left as it is."""
        _check_peer_fit(self, dst, snap, src)
        rows = snap["rows"].to(torch.int64)
        dev_rows = rows.to(self.device)
        now = torch.nonzero(self.updated).flatten()
        keep = torch.zeros(self.num_rows, dtype=torch.bool, device=self.device)
        keep[dev_rows] = True
        if self._live is not None:
            self.materialize(dev_rows)
        self._init_rows(now[~keep[now]].cpu().numpy(), [dst])
        self.weight[dev_rows, self.layout.columns(dst)] = _peer_values(snap, src).to(self.weight)
        self.updated[dev_rows] = True


def _peer_values(snap: dict[str, Any], src: int) -> torch.Tensor:
    """Peer ``src``'s columns [T, W] of a snapshot's rows (a full or a per-peer snapshot)."""
    if "weight" in snap:
        return snap["weight"][:, TableLayout.from_dict(snap["layout"]).columns(src)]
    return snap["peers"][src]


def _check_peer_fit(tables: "_TableBase", dst: int, snap: dict[str, Any], src: int) -> None:
    w_src = snap["layout"]["widths"][src]
    if int(snap["num_rows"]) != tables.num_rows or w_src != tables.widths[dst]:
        raise ValueError(f"peer {src} of the snapshot ({snap['num_rows']} rows x {w_src}) does not fit peer {dst} "
                         f"of these tables ({tables.num_rows} x {tables.widths[dst]})")
    if int(snap["seeds"][src]) != tables.seeds[dst] or float(snap["init_std"]) != tables.init_std:
        raise ValueError(f"peer {src} of the snapshot was initialised from seed {snap['seeds'][src]}, peer {dst} of "
                         f"these tables from {tables.seeds[dst]}: their untouched rows differ")


def _relayout(t: torch.Tensor, src: TableLayout, dst: TableLayout) -> torch.Tensor:
    out = torch.zeros(t.shape[0], dst.row_width, dtype=t.dtype)
    for p in range(dst.num_peers):
        out[:, dst.columns(p)] = t[:, src.columns(p)]
    return out


class DenseTables(_TableBase):
    """The plain-PyTorch reference: one ``nn.Parameter`` [V, W_p] per peer, looked up with
    ``F.embedding`` / ``F.embedding_bag`` and trained by a dense optimizer (the FuxiCTR way).

    ``sparse_grad=True`` gives sparse COO gradients (for ``torch.optim.SparseAdam``).
    ``updated`` must be marked by the engine (`mark_updated`): autograd does not say which rows
    a dense optimizer will move.
    """

    def __init__(self, num_rows: int, widths: Sequence[int], *, labels: Sequence[str] | None = None,
                 seeds: Sequence[int] | None = None, init_std: float = EMBEDDING_INIT_STD,
                 device: str | torch.device | None = None, sparse_grad: bool = False):
        super().__init__(num_rows, widths, labels, seeds, init_std, align=1)
        rows = np.arange(self.num_rows, dtype=np.int64)
        self.tables = nn.ParameterList(
            nn.Parameter(init_rows(s, rows, w, self.init_std).to(device)) for s, w in zip(self.seeds, self.widths))
        self.register_buffer("updated", torch.zeros(self.num_rows, dtype=torch.bool, device=device))
        self.sparse_grad = bool(sparse_grad)

    def forward(self, ids: torch.Tensor, bags: Bags = ()) -> list[torch.Tensor]:
        check_bags(ids, bags)
        out = []
        for w in self.tables:
            e = F.embedding(ids, w, sparse=self.sparse_grad)
            if bags:
                pooled = [F.embedding_bag(v, w, o, mode="mean", sparse=self.sparse_grad, include_last_offset=True)
                          for o, v in bags]
                e = torch.cat([e, torch.stack(pooled, 1)], 1)
            out.append(e)
        return out

    @torch.no_grad()
    def mark_updated(self, ids: torch.Tensor, bags: Bags = ()) -> None:
        self.updated.index_fill_(0, ids.reshape(-1).long(), True)
        for _, v in bags:
            self.updated.index_fill_(0, v.long(), True)

    @torch.no_grad()
    def snapshot(self, peers: Sequence[int] | None = None, optimizer_state: bool = False) -> dict[str, Any]:
        """The same format as `PeerTables.snapshot` (packed layout), so runs of either engine
        load into `PeerTables` for prediction."""
        rows = torch.nonzero(self.updated).flatten()
        out: dict[str, Any] = {**self.meta(), "rows": rows.cpu()}
        parts = [w.detach().index_select(0, rows).cpu() for w in self.tables]
        if peers is None:
            out["weight"] = torch.cat(parts, 1)
        else:
            out["peers"] = {int(p): parts[p] for p in peers}
        return out

    @torch.no_grad()
    def restore(self, snap: dict[str, Any], peers: Sequence[int] | None = None) -> None:
        if snap["layout"]["widths"] != list(self.widths) or list(snap["seeds"]) != list(self.seeds):
            raise ValueError("snapshot does not fit these tables (widths or seeds differ)")
        rows = snap["rows"].to(torch.int64).to(self.updated.device)
        for p in range(self.num_peers) if peers is None else [int(p) for p in peers]:
            self.restore_peer(p, snap, p)
        if peers is None:
            self.updated.zero_()
            self.updated[rows] = True

    @torch.no_grad()
    def restore_peer(self, dst: int, snap: dict[str, Any], src: int = 0) -> None:
        _check_peer_fit(self, dst, snap, src)
        rows = snap["rows"].to(torch.int64)
        w = self.tables[dst]
        stale = torch.nonzero(self.updated).flatten().cpu().numpy()
        if len(stale):
            w[torch.from_numpy(stale).to(w.device)] = init_rows(self.seeds[dst], stale, self.widths[dst],
                                                                self.init_std).to(w)
        w[rows.to(w.device)] = _peer_values(snap, src).to(w)
        self.updated[rows.to(self.updated.device)] = True
