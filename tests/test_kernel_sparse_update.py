"""The fused backward + sparse optimizer (mlfast.kernels.sparse_update) against the reference.

Every step is compared with ``mlfast.ops.sparse_optim.sparse_update_reference`` run on a packed
copy of the peers' columns (same state and gradients, concatenated per lookup), for sgd / row-wise
adagrad / lazy adam, both paths (deterministic sorted/segmented and atomic), several steps with
state carried, in both layouts: packed and aligned (``peer_offsets(widths, 4)``). The pad columns
of an aligned table and of its adam state hold NaN with a payload; they must keep their exact bits.
Runs on CPU tensors through Triton's interpreter (conftest sets TRITON_INTERPRET=1 where there is
no GPU) and on CUDA when present.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before triton is imported (conftest does it first in pytest)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from conftest import assert_close  # noqa: E402
from test_kernel_embedding import huge_table, layout_of, pad_columns, rows_past_2_31  # noqa: E402

import mlfast.kernels.sparse_update as su  # noqa: E402
from mlfast.kernels.embedding_bag import peer_offsets  # noqa: E402
from mlfast.kernels.sparse_update import sparse_update  # noqa: E402
from mlfast.ops.sparse_optim import SparseOptimConfig, SparseOptimState, sparse_update_reference  # noqa: E402

KINDS = ("sgd", "adagrad", "adam")
PATHS = {"sorted": True, "atomic": False}
LAYOUTS = ("packed", "aligned")
PAD = torch.tensor([0x7FC0BEEF], dtype=torch.int32).view(torch.float32).item()  # a NaN with a payload


@pytest.fixture
def device(kernel_device) -> torch.device:
    return kernel_device


def hyper(cfg: SparseOptimConfig) -> dict:
    """The launcher's scalar keyword arguments for ``cfg``."""
    return dict(kind=cfg.kind, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay)


class Table:
    """A fused table on ``device`` with its optimizer state, in ``layout``: what the launcher takes."""

    def __init__(self, packed: torch.Tensor, widths, cfg: SparseOptimConfig, device, layout="packed",
                 deterministic=True):
        self.widths, self.cfg, self.det = tuple(widths), cfg, deterministic
        V = packed.shape[0]
        wtot, self.col_offsets = layout_of(self.widths, layout)
        self.offs = self.col_offsets or peer_offsets(self.widths)
        self.pad = pad_columns(self.widths, self.offs, wtot).to(device)
        self.cols = (~self.pad).nonzero().flatten()
        self.w = torch.full((V, wtot), PAD, device=device)
        self.w[:, self.cols] = packed.to(device)
        self.step = torch.zeros(1, dtype=torch.int64, device=device)
        self.lr = torch.full((1,), cfg.lr, dtype=torch.float32, device=device)
        self.state = {}
        if cfg.kind == "adagrad":
            self.state["sum_sq"] = torch.zeros(V, len(self.widths), device=device)
        elif cfg.kind == "adam":
            for k in ("exp_avg", "exp_avg_sq"):
                self.state[k] = torch.full((V, wtot), PAD, device=device)
                self.state[k][:, self.cols] = 0.0
        if not deterministic:
            self.state["slots"] = torch.full((V,), -1, dtype=torch.int32, device=device)
        self.pads_before = {k: t[:, self.pad].clone() for k, t in self.tensors().items()}

    def tensors(self) -> dict:
        return {"weight": self.w, **{k: t for k, t in self.state.items() if t.shape == self.w.shape}}

    def update(self, ids, grads, **kw) -> None:
        sparse_update(self.w, ids, grads, self.widths, self.col_offsets, step=self.step, lr=self.lr,
                      deterministic=self.det, **hyper(self.cfg), **self.state, **kw)

    def peers(self, t: torch.Tensor) -> torch.Tensor:
        """The peers' columns of a [V, Wtot] tensor, packed side by side."""
        return t[:, self.cols]

    def check_pads(self) -> None:
        for k, t in self.tensors().items():
            assert torch.equal(t[:, self.pad].view(torch.int32), self.pads_before[k].view(torch.int32)), k


class Pair:
    """The same table and optimizer state twice: fused on ``device``, reference (packed) on the CPU."""

    def __init__(self, weight: torch.Tensor, widths, cfg: SparseOptimConfig, device, deterministic=True,
                 layout="packed"):
        self.t = Table(weight, widths, cfg, device, layout, deterministic)
        self.widths, self.cfg = tuple(widths), cfg
        self.w_ref = weight.cpu().clone()
        self.st_ref = SparseOptimState.create(self.w_ref, cfg, widths)

    def step(self, ids: torch.Tensor, grads: list[torch.Tensor]) -> None:
        dev = self.t.w.device
        self.t.update(ids.to(dev), [g.to(dev) for g in grads])
        N = ids.numel()
        flat = torch.cat([g.cpu().float().reshape(N, w) for g, w in zip(grads, self.widths)], dim=1)
        sparse_update_reference(self.w_ref, ids.cpu().reshape(-1).long(), flat, self.st_ref, self.cfg)

    def check(self) -> None:
        assert int(self.t.step.item()) == self.st_ref.step
        assert_close(self.t.peers(self.t.w), self.w_ref, torch.float32, "weight")
        if self.cfg.kind == "adagrad":
            assert_close(self.t.state["sum_sq"], self.st_ref.sum_sq, torch.float32, "sum_sq")
        if self.cfg.kind == "adam":
            for k in ("exp_avg", "exp_avg_sq"):
                assert_close(self.t.peers(self.t.state[k]), getattr(self.st_ref, k), torch.float32, k)
        self.t.check_pads()
        if not self.t.det:
            assert torch.all(self.t.state["slots"] == -1)  # the scratch is clean for the next step


def _ids(gen, shape, V, dtype=torch.int64):
    ids = torch.randint(0, V, shape, generator=gen)
    flat = ids.view(-1)
    flat[0] = V - 1  # the table's last row, twice
    if flat.numel() > 3:
        flat[-1] = V - 1
        flat[1] = 0
    return ids.to(dtype)


def _grads(gen, shape, widths, scale=1.0):
    return [torch.randn(*shape, w, generator=gen) * scale for w in widths]


# (16,) is the same table in both layouts; sgd's per-piece code runs with four peers elsewhere
UPDATE_CASES = [(ws, kind, layout) for ws in [(17, 16), (16,), (17, 16, 5, 9)] for kind in KINDS for layout in LAYOUTS
                if not (ws == (16,) and layout == "aligned") and not (len(ws) == 4 and kind == "sgd")]


@pytest.mark.parametrize("widths,kind,layout", UPDATE_CASES)
@pytest.mark.parametrize("path", PATHS)
def test_update_matches_reference(device, gen, layout, kind, path, widths):
    V, B, F = 97, 5, 13
    cfg = SparseOptimConfig(kind, lr=0.05, weight_decay=0.01)
    pair = Pair(torch.randn(V, sum(widths), generator=gen), widths, cfg, device, PATHS[path], layout)
    for step in range(2):  # state carried into the second step; int64 then int32 ids
        pair.step(_ids(gen, (B, F), V, torch.int32 if step % 2 else torch.int64), _grads(gen, (B, F), widths, 3.0))
    pair.check()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", PATHS)
def test_single_lookup_and_empty_batch(device, gen, layout, path):
    widths, V = (17, 16), 10
    pair = Pair(torch.randn(V, 33, generator=gen), widths, SparseOptimConfig("adam", lr=0.1), device, PATHS[path],
                layout)
    pair.step(torch.tensor([[V - 1]]), _grads(gen, (1, 1), widths))
    pair.step(torch.zeros(0, 39, dtype=torch.long), _grads(gen, (0, 39), widths))  # t advances, nothing moves
    pair.step(torch.tensor([[3]], dtype=torch.int32), _grads(gen, (1, 1), widths))
    pair.check()
    assert int(pair.t.step.item()) == 3


@pytest.mark.parametrize("path,kind,layout", [("sorted", "adagrad", "packed"), ("sorted", "adam", "aligned"),
                                              ("atomic", "adagrad", "aligned"), ("atomic", "adam", "packed")])
def test_hot_rows_across_many_chunks(device, gen, monkeypatch, path, kind, layout):
    """Runs of one id that span many sorted chunks (small carry steps make the carry loop iterate)."""
    monkeypatch.setattr(su, "SORT_CHUNK", 16)  # tl.dot's smallest tile
    monkeypatch.setattr(su, "CARRY_CHUNKS", 2)
    widths, V, N = (17, 16), 40, 203
    ids = torch.randint(0, V, (N,), generator=gen)
    ids[torch.randperm(N, generator=gen)[:150]] = 7  # one hot row: ~10 chunks, ~5 carry iterations
    ids[torch.randperm(N, generator=gen)[:9]] = V - 1
    pair = Pair(torch.randn(V, 33, generator=gen), widths, SparseOptimConfig(kind, lr=0.01), device, PATHS[path],
                layout)
    for _ in range(2):
        pair.step(ids, _grads(gen, (N,), widths))
        ids = ids[torch.randperm(N, generator=gen)]
    pair.check()


def test_hot_row_default_chunks(device, gen, layout="aligned"):
    """A field with few values (Criteo C9 has 3): ~1000 repeats of one id with the default chunks
    (a run over 33 chunks: the carry loop takes two windows of CARRY_CHUNKS). The production
    layout only: both layouts take several carry windows in test_hot_rows_across_many_chunks."""
    widths, V, N = (17, 16), 50, 1100
    ids = torch.randint(0, V, (N,), generator=gen)
    ids[: N - 60] = 3
    ids = ids[torch.randperm(N, generator=gen)]
    pair = Pair(torch.randn(V, 33, generator=gen), widths, SparseOptimConfig("adam", lr=0.01), device, layout=layout)
    pair.step(ids.int(), _grads(gen, (N,), widths, scale=0.1))
    pair.check()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", PATHS)
def test_gradient_layouts(device, gen, layout, path):
    """Gradients are read in place whatever their strides: expanded (sum().backward() gives a
    stride-0 gradient), column slices of a wider tensor, bf16, or one [N, sum(widths)] tensor."""
    widths, V, B, F = (17, 16, 5), 60, 4, 9
    cfg = SparseOptimConfig("adagrad", lr=0.1, weight_decay=1e-3)
    pair = Pair(torch.randn(V, 38, generator=gen), widths, cfg, device, PATHS[path], layout)
    wide = torch.randn(B, F, 40, generator=gen)
    layouts = [
        [torch.tensor(0.75).expand(B, F, 17), wide[..., 3:19], torch.randn(B, F, 5, generator=gen).bfloat16()],
        [torch.randn(B, F, 17, generator=gen).transpose(0, 1).contiguous().transpose(0, 1),
         torch.randn(B, F, 16, generator=gen), torch.zeros(()).expand(B, F, 5)],
    ]
    for grads in layouts:
        assert not all(g.is_contiguous() for g in grads)
        pair.step(_ids(gen, (B, F), V), grads)
    pair.check()
    one = torch.randn(B * F, 38, generator=gen)  # a single concatenated gradient
    ids = _ids(gen, (B, F), V)
    pair.t.update(ids.to(device), one.to(device))
    sparse_update_reference(pair.w_ref, ids.reshape(-1), one, pair.st_ref, cfg)
    pair.check()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", PATHS)
def test_only_touched_rows_are_written(device, gen, layout, path):
    widths, V = (17, 16), 200
    cfg = SparseOptimConfig("adam", lr=0.1, weight_decay=0.1)
    t = Table(torch.randn(V, 33, generator=gen), widths, cfg, device, layout, PATHS[path])
    for k in ("exp_avg", "exp_avg_sq"):
        t.state[k][:, t.cols] = torch.rand(V, 33, generator=gen).to(device)
    before = {k: v.clone() for k, v in t.tensors().items()}
    ids = torch.randint(0, V // 2, (6, 7), generator=gen).to(device)  # upper half never touched
    t.update(ids, [g.to(device) for g in _grads(gen, (6, 7), widths)])
    touched = torch.zeros(V, dtype=torch.bool, device=device)
    touched[ids.reshape(-1)] = True
    for k, new in t.tensors().items():
        old = before[k]
        assert torch.equal(new[~touched].view(torch.int32), old[~touched].view(torch.int32)), k  # bit for bit
        assert not torch.equal(t.peers(new)[touched], t.peers(old)[touched]), k
    t.check_pads()
    if not PATHS[path]:
        assert torch.all(t.state["slots"] == -1)  # the scratch is clean for the next step


@pytest.mark.parametrize("layout", LAYOUTS)
def test_deterministic_path_is_bit_identical(device, gen, layout):
    widths, V, B, F = (17, 16), 30, 8, 20  # many repeats: 160 lookups of 30 rows
    w0 = torch.randn(V, 33, generator=gen)
    batches = [(_ids(gen, (B, F), V), _grads(gen, (B, F), widths)) for _ in range(2)]
    results = {}
    for name, det, run, dtype in (("sorted", True, 0, torch.int64), ("sorted", True, 1, torch.int32),
                                  ("atomic", False, 0, torch.int32)):
        t = Table(w0, widths, SparseOptimConfig("adam", lr=0.01), device, layout, det)
        for ids, grads in batches:
            t.update(ids.to(dtype).to(device), [g.to(device) for g in grads])
        results[name, run] = t.peers(t.w)
    assert torch.equal(results["sorted", 0], results["sorted", 1])  # int64 and int32 ids sort alike
    assert_close(results["atomic", 0], results["sorted", 0], torch.float32)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("start_step,layout", [(6, "packed"), (20000, "aligned")])
def test_step_and_lr_are_device_state(device, gen, path, start_step, layout):
    """t and lr are read by the kernels from device tensors: a resumed step count (20000 takes the
    exp branch of the in-kernel bias correction) and an lr changed in place are honoured."""
    widths, V = (17, 16), 40
    cfg = SparseOptimConfig("adam", lr=0.1, beta1=0.8, beta2=0.99)
    pair = Pair(torch.randn(V, 33, generator=gen), widths, cfg, device, PATHS[path], layout)
    pair.t.step.fill_(start_step)
    pair.st_ref.step = start_step
    for k, scale in (("exp_avg", torch.randn), ("exp_avg_sq", torch.rand)):
        init = scale(V, 33, generator=gen) * 0.1
        pair.t.state[k][:, pair.t.cols] = init.to(device)
        getattr(pair.st_ref, k).copy_(init)
    pair.step(_ids(gen, (3, 39), V), _grads(gen, (3, 39), widths))
    pair.t.lr.fill_(0.003)
    pair.cfg = SparseOptimConfig("adam", lr=0.003, beta1=0.8, beta2=0.99)
    pair.step(_ids(gen, (3, 39), V), _grads(gen, (3, 39), widths))
    pair.check()


def test_sorted_path_sorts_int32_ids_as_they_come(device, gen, monkeypatch):
    """int32 ids are the sort keys themselves (no conversion); int64 ids of a table under 2^31 rows
    become int32 keys; the atomic path reads the ids in place."""
    sorted_keys = []
    real_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda x, **kw: (sorted_keys.append(x), real_sort(x, **kw))[1])
    t = Table(torch.randn(20, 33, generator=gen), (17, 16), SparseOptimConfig("sgd", lr=0.1), device)
    for dtype in (torch.int32, torch.int64):
        ids = _ids(gen, (3, 5), 20, dtype).to(device)
        t.update(ids, [g.to(device) for g in _grads(gen, (3, 5), (17, 16))])
        assert sorted_keys[-1].dtype == torch.int32
        assert (sorted_keys[-1].data_ptr() == ids.data_ptr()) == (dtype == torch.int32)
    seen = []
    kernel = su._claim_slots_kernel

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **kw: (seen.append(args[0]), kernel[grid](*args, **kw))

    monkeypatch.setattr(su, "_claim_slots_kernel", Spy())
    t = Table(torch.randn(20, 33, generator=gen), (17, 16), SparseOptimConfig("sgd", lr=0.1), device,
              deterministic=False)
    for dtype in (torch.int32, torch.int64):
        ids = _ids(gen, (3, 5), 20, dtype).to(device)
        t.update(ids, [g.to(device) for g in _grads(gen, (3, 5), (17, 16))])
        assert seen[-1].data_ptr() == ids.data_ptr() and seen[-1].dtype == dtype


@pytest.mark.parametrize("path", PATHS)
def test_bounds_check(device, gen, path):
    """Checked mode validates the ids before anything moves: IndexError naming the first offending
    position, and the table, its state and the step are untouched; valid ids update as unchecked."""
    widths, V = (17, 16), 30
    cfg = SparseOptimConfig("adam", lr=0.1, weight_decay=0.1)
    checked = Table(torch.randn(V, 33, generator=gen), widths, cfg, device, "aligned", PATHS[path])
    plain = Table(checked.peers(checked.w).cpu(), widths, cfg, device, "aligned", PATHS[path])
    ids = _ids(gen, (4, 6), V, torch.int32)
    grads = [g.to(device) for g in _grads(gen, (4, 6), widths)]
    checked.update(ids.to(device), grads, bounds_check=True)
    plain.update(ids.to(device), grads)
    assert torch.equal(checked.w.view(torch.int32), plain.w.view(torch.int32))
    before = {k: v.clone() for k, v in checked.tensors().items()}
    for pos, value, dtype in (((1, 2), V, torch.int32), ((3, 0), -5, torch.int64), ((0, 5), 2**40, torch.int64)):
        bad = ids.clone().to(dtype)
        bad[pos] = value
        bad[3, 5] = V + 1  # a later offender
        with pytest.raises(IndexError, match=rf"ids\[{pos[0]}, {pos[1]}\] = {value} is out of range"):
            checked.update(bad.to(device), grads, bounds_check=True)
    assert int(checked.step.item()) == 1
    for k, t in checked.tensors().items():
        assert torch.equal(t.view(torch.int32), before[k].view(torch.int32)), k
    if not PATHS[path]:
        assert torch.all(checked.state["slots"] == -1)


@pytest.mark.parametrize("path", PATHS)
def test_no_host_sync_without_bounds_check(device, gen, path):
    """Lookups and the update of one step never wait for the GPU (CUDA-graph capturable); on the
    CPU there is nothing to check."""
    if device.type != "cuda":
        pytest.skip("host syncs exist only with CUDA")
    from mlfast.kernels.embedding_bag import embedding_bag_forward, embedding_forward

    widths = (17, 16)
    t = Table(torch.randn(50, 33, generator=gen), widths, SparseOptimConfig("adam", lr=0.1), device, "aligned",
              PATHS[path])
    ids = _ids(gen, (6, 7), 50, torch.int32).to(device)
    grads = [g.to(device) for g in _grads(gen, (6, 7), widths)]
    offsets = torch.arange(0, 43, 6, dtype=torch.int32, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        embedding_forward(t.w, ids, widths, t.col_offsets)
        embedding_bag_forward(t.w, ids.reshape(-1), offsets, widths, t.col_offsets, mode="mean")
        t.update(ids, grads)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(t.step.item()) == 1


def test_rejects_bad_inputs(device):
    w = torch.zeros(10, 33, device=device)
    step, lr = torch.zeros(1, dtype=torch.int64, device=device), torch.ones(1, device=device)
    ids = torch.zeros(2, 3, dtype=torch.long, device=device)
    g = [torch.zeros(2, 3, 17, device=device), torch.zeros(2, 3, 16, device=device)]
    adam = dict(kind="adam", step=step, lr=lr, exp_avg=torch.zeros_like(w), exp_avg_sq=torch.zeros_like(w))
    with pytest.raises(ValueError, match="2 peers"):
        sparse_update(w, ids, [torch.zeros(2, 3, 33, device=device)], (17, 16), **adam)
    with pytest.raises(ValueError, match="peer 1"):
        sparse_update(w, ids, [g[0], torch.zeros(2, 4, 16, device=device)], (17, 16), **adam)
    with pytest.raises(ValueError, match=r"needs sum_sq \[10, 2\]"):
        sparse_update(w, ids, g, (17, 16), kind="adagrad", step=step, lr=lr)
    with pytest.raises(ValueError, match=r"exp_avg must be a contiguous float tensor \[10, 33\]"):
        sparse_update(w, ids, g, (17, 16), **{**adam, "exp_avg": torch.zeros(10, 36, device=device)})
    with pytest.raises(ValueError, match="unknown sparse optimizer"):
        sparse_update(w, ids, g, (17, 16), **{**adam, "kind": "rmsprop"})
    with pytest.raises(ValueError, match="needs slots"):
        sparse_update(w, ids, g, (17, 16), **adam, deterministic=False)
    with pytest.raises(ValueError, match="needs slots"):
        sparse_update(w, ids, g, (17, 16), **adam, deterministic=False,
                      slots=torch.full((10,), -1, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match=r"step must be a \[1\] int64"):
        sparse_update(w, ids, g, (17, 16), **{**adam, "step": torch.zeros(1, device=device)})
    assert int(step.item()) == 0  # nothing was applied


@pytest.mark.parametrize("path,kind,ids_dtype,layout", [
    ("sorted", "adagrad", torch.int64, "packed"), ("sorted", "adam", torch.int32, "aligned"),
    ("atomic", "adagrad", torch.int32, "aligned"), ("atomic", "adam", torch.int64, "packed")])
def test_update_index_arithmetic_past_2_31(device, gen, path, kind, ids_dtype, layout):
    """Rows whose element offsets pass 2^31 and 2^32 (see test_kernel_embedding for the virtual
    table), with int64 and int32 ids: the touched rows match the reference run on a compact copy
    of just those rows."""
    widths = (17, 16)
    wtot, col_offsets = layout_of(widths, layout)
    cols = (~pad_columns(widths, col_offsets or peer_offsets(widths), wtot)).nonzero().flatten().to(device)
    V, rows = rows_past_2_31(wtot)
    cfg = SparseOptimConfig(kind, lr=0.1, weight_decay=0.01)
    w = huge_table(V, wtot, device)
    state = {}
    if kind == "adam":
        state["exp_avg"], state["exp_avg_sq"] = huge_table(V, wtot, device), huge_table(V, wtot, device)
    else:
        state["sum_sq"] = huge_table(V, 2, device)
    if not PATHS[path]:
        state["slots"] = huge_table(V, 1, device, torch.int32).view(V)
        state["slots"][rows.to(device)] = -1  # only entries of looked-up rows are ever read
    small = Pair(torch.randn(rows.numel(), 33, generator=gen), widths, cfg, "cpu")
    dev_rows = rows.to(device)
    w[dev_rows[:, None], cols] = small.w_ref.to(device)
    for k in ("sum_sq", "exp_avg", "exp_avg_sq"):
        if k in state:
            state[k][dev_rows] = 0.0
    step, lr = torch.zeros(1, dtype=torch.int64, device=device), torch.full((1,), cfg.lr, device=device)
    for _ in range(2):
        local = torch.randint(0, rows.numel(), (4, 9), generator=gen)
        grads = _grads(gen, (4, 9), widths)
        sparse_update(w, rows[local].to(ids_dtype).to(device), [g.to(device) for g in grads], widths, col_offsets,
                      step=step, lr=lr, deterministic=PATHS[path], **hyper(cfg), **state)
        sparse_update_reference(small.w_ref, local.reshape(-1), torch.cat(grads, -1).reshape(36, 33),
                                small.st_ref, cfg)
    assert_close(w[dev_rows][:, cols], small.w_ref, torch.float32)
    if kind == "adam":
        assert_close(state["exp_avg_sq"][dev_rows][:, cols], small.st_ref.exp_avg_sq, torch.float32)
    else:
        assert_close(state["sum_sq"][dev_rows], small.st_ref.sum_sq, torch.float32)
