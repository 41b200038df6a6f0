"""The peers' embedding tables interleaved in one buffer, with the sparse optimizer fused into autograd.

``PeerTables`` holds ``weight`` [V, Wtot] (peer p owns columns ``off_p : off_p + W_p``), the
optimizer configuration and its device state. ``lookup(ids)`` returns each peer's rows [B, F, W_p]
through ``PeerLookupFunction``; the backward of that function applies the optimizer step to the
looked-up rows in place and returns no gradient for the table, so no dense [V, Wtot] gradient
ever exists and the trainer's dense optimizer never sees the table. ``lookup_bags(indices,
offsets)`` does the same for multi-hot bags (sum / mean pooling, per-sample weights) through
``PeerBagFunction``: its backward hands bag member i the gradient of its bag times its scale,

    dL/dw[indices[i]] += s_i * dL/dout_p[bag(i)],   s_i = per_sample_weights[i] | 1/|bag| (mean) | 1,

and applies the same fused optimizer step to the member rows (repeats summed, as for one-hot).
``lookup_fields(ids, bags)`` is what a model with one-hot AND multi-hot fields reads: rows
[B, F + S, W_p] (the S bags pooled, appended after the F one-hot fields) through
``PeerFieldsFunction``, whose backward applies ONE optimizer step to all rows the batch touched.

Backends (``backend=``): ``"triton"`` (the fused kernels of ``embedding_bag`` / ``sparse_update``;
the default on CUDA; CPU tensors need the Triton interpreter), ``"cpu"`` (torch gather forward,
``mlfast.ops.cpu_sparse.sparse_update`` backward; the default on the CPU) and ``"reference"`` (torch
gather, ``mlfast.ops.sparse_optim.sparse_update_reference``).

Use one lookup (``lookup``, ``lookup_bags`` or ``lookup_fields``) per training step: each
backward is one optimizer step (the step counter t
advances once per backward, as a dense optimizer's ``step()``).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from mlfast.models.base import EMBEDDING_INIT_STD
from mlfast.ops.sparse_optim import SparseOptimConfig, SparseOptimState, sparse_update_reference

from mlfast.kernels.embedding_bag import _check_widths, check_bags, embedding_bag_forward, embedding_forward, peer_offsets
from mlfast.kernels.sparse_update import DeviceOptimState, sparse_update

__all__ = ["PeerTables", "PeerLookupFunction", "PeerBagFunction", "PeerFieldsFunction", "BACKENDS"]

BACKENDS = ("triton", "cpu", "reference")


def _cpu_sparse_update():
    """``mlfast.ops.cpu_sparse.sparse_update`` (numba) when installed, else the plain reference."""
    try:
        from mlfast.ops.cpu_sparse import sparse_update as fn
    except ImportError:
        return sparse_update_reference
    return fn


class PeerLookupFunction(torch.autograd.Function):
    """ids [*] -> P tensors [*, W_p]; backward = the fused sparse optimizer step, no table gradient.

    ``anchor`` is an empty tensor that requires grad: it makes autograd record this node (the
    table itself is a plain buffer, not a parameter) and receives no gradient.
    """

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, ids: torch.Tensor, tables: "PeerTables"):
        ctx.tables = tables
        ctx.save_for_backward(ids)
        ctx.set_materialize_grads(False)  # an unused peer's None gradient becomes a stride-0 zero
        return tuple(tables._gather(ids))

    @staticmethod
    def backward(ctx, *grads):
        (ids,) = ctx.saved_tensors
        tables: PeerTables = ctx.tables
        full = []
        for g, w in zip(grads, tables.widths):
            full.append(_no_grad(ids.numel(), w, ids.device).view(*ids.shape, w) if g is None else g)
        tables.apply_gradients(ids, full)
        return None, None, None


def _bag_members(offsets: torch.Tensor, nnz: int, per_sample_weights: torch.Tensor | None,
                 mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each bag member's bag [nnz] and scale s_i [nnz] (None when every s_i is 1).

    ``output_size`` is the host-known nnz, so no device-to-host sync happens here."""
    counts = offsets[1:] - offsets[:-1]
    bag_of = torch.repeat_interleave(torch.arange(counts.numel(), device=offsets.device), counts, output_size=nnz)
    if per_sample_weights is not None:
        return bag_of, per_sample_weights.float()
    if mode == "mean":
        return bag_of, (1.0 / counts.clamp(min=1).float()).index_select(0, bag_of)
    return bag_of, None


def _member_grads(g_bags: torch.Tensor, bag_of: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Each bag member's gradient [nnz, W]: its bag's gradient times its scale."""
    gm = g_bags.float().index_select(0, bag_of)
    return gm * scale[:, None] if scale is not None else gm


def _no_grad(rows: int, width: int, device) -> torch.Tensor:
    """The zero gradient of a peer whose output was not used (stride 0: no memory)."""
    return torch.zeros((), dtype=torch.float32, device=device).expand(rows, width)


class PeerBagFunction(torch.autograd.Function):
    """(indices [nnz], offsets [n_bags + 1]) -> P pooled tensors [n_bags, W_p]; backward = the fused
    sparse optimizer step on the member rows, no table gradient (``per_sample_weights`` are
    constants: they get no gradient)."""

    @staticmethod
    def forward(ctx, anchor, indices, offsets, per_sample_weights, tables: "PeerTables", mode: str):
        ctx.tables, ctx.mode = tables, mode
        ctx.save_for_backward(indices, offsets, per_sample_weights)
        ctx.set_materialize_grads(False)
        return tuple(tables._gather_bags(indices, offsets, per_sample_weights, mode))

    @staticmethod
    def backward(ctx, *grads):
        indices, offsets, psw = ctx.saved_tensors
        tables: PeerTables = ctx.tables
        bag_of, scale = _bag_members(offsets, indices.numel(), psw, ctx.mode)
        member = [_no_grad(indices.numel(), w, indices.device) if g is None else _member_grads(g, bag_of, scale)
                  for g, w in zip(grads, tables.widths)]
        tables.apply_gradients(indices, member)
        return None, None, None, None, None, None


def merge_bag_fields(bags: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """S bag fields of B rows each (``(offsets [B+1], ids)`` pairs) as one list of S*B bags, field
    by field: (indices [nnz], offsets [S*B + 1]). Runs on the device, no host sync."""
    indices = torch.cat([v for _, v in bags]) if len(bags) > 1 else bags[0][1]
    parts, base = [], None
    for k, (o, _) in enumerate(bags):
        o = o if base is None else o + base
        parts.append(o if k == len(bags) - 1 else o[:-1])
        base = o[-1:]
    return indices, (torch.cat(parts) if len(parts) > 1 else parts[0])


class PeerFieldsFunction(torch.autograd.Function):
    """(ids [B, F], S bag fields merged by `merge_bag_fields`) -> P tensors [B, F + S, W_p];
    backward = ONE fused optimizer step on the one-hot rows and the bag members together."""

    @staticmethod
    def forward(ctx, anchor, ids, indices, offsets, tables: "PeerTables", mode: str):
        ctx.tables, ctx.mode = tables, mode
        ctx.save_for_backward(ids, indices, offsets)
        ctx.set_materialize_grads(False)
        return tuple(tables._gather_fields(ids, indices, offsets, mode))

    @staticmethod
    def backward(ctx, *grads):
        ids, indices, offsets = ctx.saved_tensors
        tables: PeerTables = ctx.tables
        B, F = ids.shape
        S = (offsets.numel() - 1) // max(B, 1)
        bag_of, scale = _bag_members(offsets, indices.numel(), None, ctx.mode)
        all_ids = torch.cat([ids.reshape(-1), indices])
        full = []
        for g, w in zip(grads, tables.widths):
            if g is None:
                full.append(_no_grad(all_ids.numel(), w, ids.device))
                continue
            per_bag = g[:, F:].transpose(0, 1).reshape(S * B, w)  # bag k = field k // B, row k % B
            full.append(torch.cat([g[:, :F].reshape(B * F, w).float(), _member_grads(per_bag, bag_of, scale)]))
        tables.apply_gradients(all_ids, full)
        return None, None, None, None, None, None


def _compact_rows(t: torch.Tensor | None):
    """``t`` [V, ...], or ``{"rows", "values", "shape"}`` holding only its nonzero rows when fewer
    than half of the rows are nonzero (the rest are zero by construction)."""
    if t is None:
        return None
    nz = torch.nonzero((t.reshape(t.shape[0], -1) != 0).any(1)).flatten()
    if 2 * nz.numel() >= t.shape[0]:
        return t
    return {"rows": nz, "values": t.index_select(0, nz), "shape": list(t.shape)}


def _load_rows(out: torch.Tensor, src, name: str) -> None:
    """Copy a tensor or a `_compact_rows` dict into ``out`` in place."""
    if isinstance(src, dict):
        if list(src["shape"]) != list(out.shape):
            raise ValueError(f"checkpoint {name} has shape {tuple(src['shape'])}, these tables {tuple(out.shape)}")
        out.zero_()
        out.index_copy_(0, src["rows"].to(out.device), src["values"].to(out.device, out.dtype))
    else:
        out.copy_(src)


class PeerTables:
    """P peers' embedding tables interleaved in one [V, sum(widths)] buffer, with a fused optimizer.

    Example::

        >>> import torch
        >>> from mlfast.ops.sparse_optim import SparseOptimConfig
        >>> deepfm, dcn = torch.randn(1000, 17), torch.randn(1000, 16)
        >>> t = PeerTables.from_peer_weights([deepfm, dcn], SparseOptimConfig("adam", lr=1e-3))
        >>> e1, e2 = t.lookup(torch.randint(0, 1000, (8, 39)))
        >>> e1.shape, e2.shape
        (torch.Size([8, 39, 17]), torch.Size([8, 39, 16]))
        >>> (e1.sum() + 2 * e2.sum()).backward()   # rows updated in place, t.step_count == 1
        >>> torch.equal(t.peer_weight(1), dcn)
        False
    """

    def __init__(self, weight: torch.Tensor, widths: Sequence[int], cfg: SparseOptimConfig | None = None,
                 labels: Sequence[str] | None = None, backend: str | None = None,
                 deterministic: bool = True, out_dtype: torch.dtype | None = None):
        if weight.ndim != 2 or not weight.is_contiguous() or weight.dtype != torch.float32:
            raise ValueError(f"weight must be a contiguous float32 [V, Wtot] table, got {weight.dtype} "
                             f"{tuple(weight.shape)}{'' if weight.is_contiguous() else ' (not contiguous)'}")
        self.weight = weight.detach()
        self.widths = _check_widths(widths, weight.shape[1])
        self.offsets = peer_offsets(self.widths)
        self.labels = tuple(labels) if labels is not None else tuple(f"peer{i}" for i in range(len(self.widths)))
        if len(self.labels) != len(self.widths):
            raise ValueError(f"{len(self.labels)} labels for {len(self.widths)} peers")
        self.cfg = cfg or SparseOptimConfig()
        backend = backend or ("triton" if weight.is_cuda else "cpu")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        self.backend = backend
        self.deterministic = bool(deterministic)
        self.out_dtype = out_dtype
        self.state = DeviceOptimState.create(self.weight, self.widths, self.cfg)
        self._anchor = torch.empty(0, device=weight.device, requires_grad=True)

    # construction ----------------------------------------------------------------------------
    @classmethod
    def from_peer_weights(cls, weights: Sequence[torch.Tensor], cfg: SparseOptimConfig | None = None,
                          labels: Sequence[str] | None = None, **kwargs) -> "PeerTables":
        """Interleave each model's own table [V, W_p] (copied) into one buffer.

        Example::

            >>> t = PeerTables.from_peer_weights([torch.zeros(10, 17), torch.ones(10, 16)])
            >>> t.weight.shape, t.widths
            (torch.Size([10, 33]), (17, 16))
        """
        weights = [w.detach() for w in weights]
        if not weights:
            raise ValueError("no peer tables given")
        V, dev = weights[0].shape[0], weights[0].device
        for i, w in enumerate(weights):
            if w.ndim != 2 or w.shape[0] != V or w.device != dev:
                raise ValueError(f"peer table {i} must be [V={V}, W] on {dev}, got {tuple(w.shape)} on {w.device}")
        weight = torch.cat([w.float() for w in weights], dim=1).contiguous()
        return cls(weight, [w.shape[1] for w in weights], cfg, labels, **kwargs)

    @classmethod
    def create(cls, num_rows: int, widths: Sequence[int], cfg: SparseOptimConfig | None = None,
               device=None, init_std: float = EMBEDDING_INIT_STD, generator: torch.Generator | None = None,
               **kwargs) -> "PeerTables":
        """Fresh tables, N(0, init_std) as the models' own initialiser.

        Example::

            >>> PeerTables.create(100, (17, 16)).weight.shape
            torch.Size([100, 33])
        """
        ws = _check_widths(widths)
        w = torch.randn(num_rows, sum(ws), generator=generator) * init_std
        return cls(w.to(device) if device is not None else w, ws, cfg, **kwargs)

    # properties ------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return self.weight.shape[0]

    @property
    def num_peers(self) -> int:
        return len(self.widths)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def step_count(self) -> int:
        """Updates applied so far (reads the device counter: a host sync)."""
        return int(self.state.step.item())

    def _peer_index(self, p: int | str) -> int:
        if isinstance(p, str):
            if p not in self.labels:
                raise KeyError(f"no peer labelled {p!r}; labels: {self.labels}")
            return self.labels.index(p)
        if not -self.num_peers <= p < self.num_peers:
            raise IndexError(f"peer {p} out of range for {self.num_peers} peers")
        return p % self.num_peers

    def _columns(self, p: int | str) -> slice:
        i = self._peer_index(p)
        return slice(self.offsets[i], self.offsets[i] + self.widths[i])

    # lookup and update -----------------------------------------------------------------------
    def _gather(self, ids: torch.Tensor) -> list[torch.Tensor]:
        if self.backend == "triton":
            return embedding_forward(self.weight, ids, self.widths, self.out_dtype)
        rows = self.weight.index_select(0, ids.reshape(-1)).view(*ids.shape, -1)
        dtype = self.out_dtype or self.weight.dtype
        return [rows[..., c].contiguous().to(dtype) for c in map(self._columns, range(self.num_peers))]

    def _gather_bags(self, indices, offsets, per_sample_weights, mode) -> list[torch.Tensor]:
        if self.backend == "triton":
            return embedding_bag_forward(self.weight, indices, offsets, self.widths, per_sample_weights, mode,
                                         self.out_dtype)
        bag_of, scale = _bag_members(offsets, indices.numel(), per_sample_weights, mode)
        rows = self.weight.index_select(0, indices)
        if scale is not None:
            rows = rows * scale[:, None]
        pooled = torch.zeros(offsets.numel() - 1, self.weight.shape[1], dtype=torch.float32, device=self.device)
        pooled.index_add_(0, bag_of, rows)
        dtype = self.out_dtype or self.weight.dtype
        return [pooled[:, c].contiguous().to(dtype) for c in map(self._columns, range(self.num_peers))]

    def _gather_fields(self, ids, indices, offsets, mode) -> list[torch.Tensor]:
        B = ids.shape[0]
        onehot = self._gather(ids)
        pooled = self._gather_bags(indices, offsets, None, mode)
        return [torch.cat([e, p.view(-1, B, p.shape[-1]).transpose(0, 1)], 1) for e, p in zip(onehot, pooled)]

    def lookup_fields(self, ids: torch.Tensor, bags: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
                      mode: str = "mean", requires_grad: bool | None = None) -> list[torch.Tensor]:
        """Each peer's rows [B, F + S, W_p] for one-hot ids [B, F] and S bag fields (each an
        ``(offsets [B+1], ids)`` pair, pooled by ``mode``): what a model's ``forward_embedded``
        reads. Its backward is one optimizer step over every row the batch touched. Without bags
        this is `lookup`.

        Example::

            >>> t = PeerTables.create(100, (17, 16))
            >>> hist = (torch.tensor([0, 2, 3]), torch.tensor([50, 51, 52]))   # 2 rows: [50, 51], [52]
            >>> [e.shape for e in t.lookup_fields(torch.tensor([[1, 9], [2, 8]]), [hist])]
            [torch.Size([2, 3, 17]), torch.Size([2, 3, 16])]
        """
        if not bags:
            return self.lookup(ids, requires_grad)
        if ids.ndim != 2:
            raise ValueError(f"ids must be [B, F] with bag fields, got {tuple(ids.shape)}")
        B = ids.shape[0]
        for o, _ in bags:
            if o.shape != (B + 1,):
                raise ValueError(f"each bag field needs offsets [B+1={B + 1}], got {tuple(o.shape)}")
        indices, offsets = merge_bag_fields(bags)
        check_bags(self.weight, indices, offsets, self.widths, None, mode, kernels=self.backend == "triton")
        if requires_grad is None:
            requires_grad = torch.is_grad_enabled()
        if not requires_grad:
            with torch.no_grad():
                return self._gather_fields(ids, indices, offsets, mode)
        return list(PeerFieldsFunction.apply(self._anchor, ids, indices, offsets, self, mode))

    def lookup_bags(self, indices: torch.Tensor, offsets: torch.Tensor,
                    per_sample_weights: torch.Tensor | None = None, mode: str = "sum",
                    requires_grad: bool | None = None) -> list[torch.Tensor]:
        """Each peer's pooled multi-hot lookup ``[n_bags, W_p]`` in one pass: bag j is
        ``indices[offsets[j]:offsets[j+1]]`` (``offsets`` [n_bags + 1], as ``nn.EmbeddingBag`` with
        ``include_last_offset=True``), summed (``mode="sum"``, optionally weighted by
        ``per_sample_weights``) or averaged (``"mean"``); empty bags give zeros.

        As with `lookup`, the backward of the outputs applies one optimizer step to the member rows.

        Example::

            >>> t = PeerTables.create(100, (17, 16), SparseOptimConfig("sgd", lr=0.1))
            >>> a, b = t.lookup_bags(torch.tensor([4, 7, 7]), torch.tensor([0, 2, 2, 3]), mode="mean")
            >>> a.shape, b.shape
            (torch.Size([3, 17]), torch.Size([3, 16]))
        """
        check_bags(self.weight, indices, offsets, self.widths, per_sample_weights, mode,
                   kernels=self.backend == "triton")
        if requires_grad is None:
            requires_grad = torch.is_grad_enabled()
        if not requires_grad:
            with torch.no_grad():
                return self._gather_bags(indices, offsets, per_sample_weights, mode)
        return list(PeerBagFunction.apply(self._anchor, indices, offsets, per_sample_weights, self, mode))

    def lookup(self, ids: torch.Tensor, requires_grad: bool | None = None) -> list[torch.Tensor]:
        """Each peer's rows ``[*ids.shape, W_p]`` for global ids (int64), in one pass.

        With gradients enabled (default: ``torch.is_grad_enabled()``), the backward of the outputs
        applies the optimizer step to the looked-up rows. ``requires_grad=False`` only reads.
        """
        if requires_grad is None:
            requires_grad = torch.is_grad_enabled()
        if not requires_grad:
            with torch.no_grad():
                return self._gather(ids)
        return list(PeerLookupFunction.apply(self._anchor, ids, self))

    @torch.no_grad()
    def apply_gradients(self, ids: torch.Tensor, grads: Sequence[torch.Tensor]) -> None:
        """One optimizer step from the gradients of a lookup of ``ids`` (one tensor per peer,
        [*ids.shape, W_p]); what ``lookup``'s backward calls."""
        if self.backend == "triton":
            sparse_update(self.weight, ids, grads, self.widths, self.state, self.cfg, self.deterministic)
            return
        N = ids.numel()
        flat = torch.cat([g.reshape(N, w).float() for g, w in zip(grads, self.widths)], dim=1)
        ref = SparseOptimState(step=int(self.state.step.item()), sum_sq=self.state.sum_sq,
                               exp_avg=self.state.exp_avg, exp_avg_sq=self.state.exp_avg_sq,
                               segments=self.widths)
        cfg = dataclasses.replace(self.cfg, lr=float(self.state.lr.item()))
        fn = _cpu_sparse_update() if self.backend == "cpu" else sparse_update_reference
        fn(self.weight, ids.reshape(-1), flat, ref, cfg)
        self.state.step.fill_(ref.step)

    def set_lr(self, lr: float) -> None:
        """Learning rate of the next updates (in place on the device: captured graphs follow)."""
        self.state.lr.fill_(lr)

    # per-model tables ------------------------------------------------------------------------
    def peer_weight(self, p: int | str) -> torch.Tensor:
        """A contiguous copy of peer ``p``'s own table [V, W_p] (index or label)."""
        return self.weight[:, self._columns(p)].clone()

    @torch.no_grad()
    def set_peer_weight(self, p: int | str, weight: torch.Tensor) -> None:
        """Overwrite peer ``p``'s table with a model's own [V, W_p] table (its optimizer state stays)."""
        cols = self._columns(p)
        expected = (self.num_rows, cols.stop - cols.start)
        if tuple(weight.shape) != expected:
            raise ValueError(f"peer {p!r} table must be {list(expected)}, got {list(weight.shape)}")
        self.weight[:, cols].copy_(weight)

    # checkpoints -----------------------------------------------------------------------------
    def state_dict(self, weight: bool = True, compact: bool = False) -> dict:
        """Table, layout, optimizer configuration and state (tensors are not copied).

        ``weight=False`` leaves the table out (a checkpoint that already holds every peer's weights
        need not store them twice). ``compact=True`` stores each optimizer-state tensor as its
        nonzero rows when they are under half of the table: rows no update ever touched hold zero
        state, and on data that touches a small part of a hashed table (a sample, an early
        checkpoint) that is most of it. `load_state_dict` reads every form.
        """
        enc = _compact_rows if compact else (lambda t: t)
        d = {
            "widths": list(self.widths), "labels": list(self.labels),
            "optimizer": dataclasses.asdict(self.cfg), "step": self.step_count,
            "lr": float(self.state.lr.item()), "sum_sq": enc(self.state.sum_sq),
            "exp_avg": enc(self.state.exp_avg), "exp_avg_sq": enc(self.state.exp_avg_sq),
        }
        if weight:
            d["weight"] = self.weight
        return d

    @torch.no_grad()
    def load_state_dict(self, d: dict) -> None:
        """Restore in place (buffers keep their addresses, so a captured CUDA graph stays valid).
        Without a ``weight`` entry the table is left as it is (set it with `set_peer_weight`)."""
        if tuple(d["widths"]) != self.widths:
            raise ValueError(f"checkpoint tables have widths {tuple(d['widths'])}, these have {self.widths}")
        if d["optimizer"]["kind"] != self.cfg.kind:
            raise ValueError(f"checkpoint optimizer state is {d['optimizer']['kind']!r}, "
                             f"these tables use {self.cfg.kind!r}")
        if d.get("weight") is not None:
            self.weight.copy_(d["weight"])
        self.state.step.fill_(int(d["step"]))
        self.state.lr.fill_(float(d["lr"]))
        for k in ("sum_sq", "exp_avg", "exp_avg_sq"):
            cur = getattr(self.state, k)
            if cur is not None:
                if d.get(k) is None:
                    raise ValueError(f"checkpoint has no {k} for the {self.cfg.kind} optimizer")
                _load_rows(cur, d[k], k)

    def to(self, device) -> "PeerTables":
        """Move the table and its state to ``device`` (in place; returns self)."""
        device = torch.device(device)
        self.weight = self.weight.to(device)
        for f in dataclasses.fields(self.state):
            t = getattr(self.state, f.name)
            if t is not None:
                setattr(self.state, f.name, t.to(device))
        self._anchor = torch.empty(0, device=device, requires_grad=True)
        return self
