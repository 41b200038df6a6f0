"""The fused backward + sparse optimizer (mlfast.kernels.sparse_update) against the reference.

Every step is compared with ``mlfast.ops.sparse_optim.sparse_update_reference`` on the same table,
state and gradients (concatenated per lookup), for sgd / row-wise adagrad / lazy adam, both paths
(deterministic sorted/segmented and atomic), several steps with state carried. Runs on CPU tensors
through Triton's interpreter (conftest sets TRITON_INTERPRET=1 where there is no GPU) and on CUDA
when present.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before triton is imported (conftest does it first in pytest)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from conftest import assert_close  # noqa: E402
from test_kernel_embedding import huge_table, rows_past_2_31  # noqa: E402

import mlfast.kernels.sparse_update as su  # noqa: E402
from mlfast.kernels.sparse_update import DeviceOptimState, sparse_update  # noqa: E402
from mlfast.ops.sparse_optim import SparseOptimConfig, SparseOptimState, sparse_update_reference  # noqa: E402

KINDS = ("sgd", "adagrad", "adam")
PATHS = {"sorted": True, "atomic": False}


@pytest.fixture
def device(kernel_device) -> torch.device:
    return kernel_device


class Pair:
    """The same table and optimizer state twice: fused on ``device``, reference on the CPU."""

    def __init__(self, weight: torch.Tensor, widths, cfg: SparseOptimConfig, device, deterministic=True):
        self.widths, self.cfg, self.det = tuple(widths), cfg, deterministic
        self.w = weight.to(device).clone()
        self.st = DeviceOptimState.create(self.w, widths, cfg)
        self.w_ref = weight.cpu().clone()
        self.st_ref = SparseOptimState.create(self.w_ref, cfg, widths)

    def step(self, ids: torch.Tensor, grads: list[torch.Tensor]) -> None:
        dev = self.w.device
        sparse_update(self.w, ids.to(dev), [g.to(dev) for g in grads], self.widths, self.st, self.cfg, self.det)
        N = ids.numel()
        flat = torch.cat([g.cpu().float().reshape(N, w) for g, w in zip(grads, self.widths)], dim=1)
        sparse_update_reference(self.w_ref, ids.cpu().reshape(-1), flat, self.st_ref, self.cfg)

    def check(self) -> None:
        assert int(self.st.step.item()) == self.st_ref.step
        assert_close(self.w, self.w_ref, torch.float32, "weight")
        for k in ("sum_sq", "exp_avg", "exp_avg_sq"):
            if getattr(self.st_ref, k) is not None:
                assert_close(getattr(self.st, k), getattr(self.st_ref, k), torch.float32, k)


def _ids(gen, shape, V):
    ids = torch.randint(0, V, shape, generator=gen)
    flat = ids.view(-1)
    flat[0] = V - 1  # the table's last row, twice
    if flat.numel() > 3:
        flat[-1] = V - 1
        flat[1] = 0
    return ids


def _grads(gen, shape, widths, scale=1.0):
    return [torch.randn(*shape, w, generator=gen) * scale for w in widths]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("widths", [(17, 16), (16,), (17, 16, 5, 9)])
def test_update_matches_reference(device, gen, kind, path, widths):
    V, B, F = 97, 5, 13
    cfg = SparseOptimConfig(kind, lr=0.05, weight_decay=0.01)
    pair = Pair(torch.randn(V, sum(widths), generator=gen), widths, cfg, device, PATHS[path])
    for _ in range(3):
        pair.step(_ids(gen, (B, F), V), _grads(gen, (B, F), widths, scale=3.0))
    pair.check()


@pytest.mark.parametrize("path", PATHS)
def test_single_lookup_and_empty_batch(device, gen, path):
    widths, V = (17, 16), 10
    pair = Pair(torch.randn(V, 33, generator=gen), widths, SparseOptimConfig("adam", lr=0.1), device, PATHS[path])
    pair.step(torch.tensor([[V - 1]]), _grads(gen, (1, 1), widths))
    pair.step(torch.zeros(0, 39, dtype=torch.long), _grads(gen, (0, 39), widths))  # t advances, nothing moves
    pair.step(torch.tensor([[3]]), _grads(gen, (1, 1), widths))
    pair.check()
    assert int(pair.st.step.item()) == 3


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["adagrad", "adam"])
def test_hot_rows_across_many_chunks(device, gen, monkeypatch, path, kind):
    """Runs of one id that span many sorted chunks (small chunks make the carry loop iterate)."""
    monkeypatch.setattr(su, "SORT_CHUNK", 16)  # tl.dot's smallest tile
    monkeypatch.setattr(su, "CARRY_CHUNKS", 2)
    widths, V, N = (17, 16), 40, 403
    ids = torch.randint(0, V, (N,), generator=gen)
    ids[torch.randperm(N, generator=gen)[:300]] = 7  # one hot row: ~19 chunks, ~9 carry iterations
    ids[torch.randperm(N, generator=gen)[:9]] = V - 1
    pair = Pair(torch.randn(V, 33, generator=gen), widths, SparseOptimConfig(kind, lr=0.01), device, PATHS[path])
    for _ in range(2):
        pair.step(ids, _grads(gen, (N,), widths))
        ids = ids[torch.randperm(N, generator=gen)]
    pair.check()


def test_hot_row_default_chunks(device, gen):
    """A field with few values (Criteo C9 has 3): ~2000 repeats of one id in the default layout."""
    widths, V, N = (17, 16), 50, 2100
    ids = torch.randint(0, V, (N,), generator=gen)
    ids[: N - 60] = 3
    ids = ids[torch.randperm(N, generator=gen)]
    pair = Pair(torch.randn(V, 33, generator=gen), widths, SparseOptimConfig("adam", lr=0.01), device)
    pair.step(ids, _grads(gen, (N,), widths, scale=0.1))
    pair.check()


@pytest.mark.parametrize("path", PATHS)
def test_gradient_layouts(device, gen, path):
    """Gradients are read in place whatever their strides: expanded (sum().backward() gives a
    stride-0 gradient), column slices of a wider tensor, bf16, or one [N, Wtot] tensor."""
    widths, V, B, F = (17, 16, 5), 60, 4, 9
    cfg = SparseOptimConfig("adagrad", lr=0.1, weight_decay=1e-3)
    pair = Pair(torch.randn(V, 38, generator=gen), widths, cfg, device, PATHS[path])
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
    sparse_update(pair.w, ids.to(device), one.to(device), widths, pair.st, cfg, PATHS[path])
    sparse_update_reference(pair.w_ref, ids.reshape(-1), one, pair.st_ref, cfg)
    pair.check()


@pytest.mark.parametrize("path", PATHS)
def test_only_touched_rows_are_written(device, gen, path):
    widths, V = (17, 16), 200
    cfg = SparseOptimConfig("adam", lr=0.1, weight_decay=0.1)
    w = torch.randn(V, 33, generator=gen).to(device)
    st = DeviceOptimState.create(w, widths, cfg)
    st.exp_avg.copy_(torch.randn(V, 33, generator=gen))
    st.exp_avg_sq.copy_(torch.rand(V, 33, generator=gen))
    before = [w.clone(), st.exp_avg.clone(), st.exp_avg_sq.clone()]
    ids = torch.randint(0, V // 2, (6, 7), generator=gen).to(device)  # upper half never touched
    sparse_update(w, ids, [g.to(device) for g in _grads(gen, (6, 7), widths)], widths, st, cfg, PATHS[path])
    touched = torch.zeros(V, dtype=torch.bool, device=device)
    touched[ids.reshape(-1)] = True
    for new, old in zip([w, st.exp_avg, st.exp_avg_sq], before):
        assert torch.equal(new[~touched], old[~touched])  # bit for bit: never rewritten
        assert not torch.equal(new[touched], old[touched])
    if not PATHS[path]:
        assert torch.all(st.slots == -1)  # the scratch is clean for the next step


def test_deterministic_path_is_bit_identical(device, gen):
    widths, V, B, F = (17, 16), 30, 16, 39  # many repeats: 624 lookups of 30 rows
    w0 = torch.randn(V, 33, generator=gen)
    batches = [(_ids(gen, (B, F), V), _grads(gen, (B, F), widths)) for _ in range(2)]
    results = {}
    for name, det, run in (("sorted", True, 0), ("sorted", True, 1), ("atomic", False, 0)):
        cfg = SparseOptimConfig("adam", lr=0.01)
        w = w0.clone().to(device)
        st = DeviceOptimState.create(w, widths, cfg)
        for ids, grads in batches:
            sparse_update(w, ids.to(device), [g.to(device) for g in grads], widths, st, cfg, det)
        results[name, run] = w
    assert torch.equal(results["sorted", 0], results["sorted", 1])
    assert_close(results["atomic", 0], results["sorted", 0], torch.float32)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("start_step", [6, 20000])
def test_step_and_lr_are_device_state(device, gen, path, start_step):
    """t and lr are read by the kernels from device tensors: a resumed step count (20000 takes the
    exp branch of the in-kernel bias correction) and an lr changed in place are honoured."""
    widths, V = (17, 16), 40
    cfg = SparseOptimConfig("adam", lr=0.1, beta1=0.8, beta2=0.99)
    pair = Pair(torch.randn(V, 33, generator=gen), widths, cfg, device, PATHS[path])
    pair.st.step.fill_(start_step)
    pair.st_ref.step = start_step
    pair.st.exp_avg.copy_(torch.randn(V, 33, generator=gen) * 0.1)
    pair.st_ref.exp_avg.copy_(pair.st.exp_avg)
    pair.st.exp_avg_sq.copy_(torch.rand(V, 33, generator=gen) * 0.1)
    pair.st_ref.exp_avg_sq.copy_(pair.st.exp_avg_sq)
    pair.step(_ids(gen, (3, 39), V), _grads(gen, (3, 39), widths))
    pair.st.lr.fill_(0.003)
    pair.cfg = SparseOptimConfig("adam", lr=0.003, beta1=0.8, beta2=0.99)
    pair.step(_ids(gen, (3, 39), V), _grads(gen, (3, 39), widths))
    pair.check()


def test_rejects_bad_inputs(device):
    w = torch.zeros(10, 33, device=device)
    cfg = SparseOptimConfig("adam")
    st = DeviceOptimState.create(w, (17, 16), cfg)
    ids = torch.zeros(2, 3, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="2 peers"):
        sparse_update(w, ids, [torch.zeros(2, 3, 33, device=device)], (17, 16), st, cfg)
    with pytest.raises(ValueError, match="peer 1"):
        sparse_update(w, ids, [torch.zeros(2, 3, 17, device=device), torch.zeros(2, 4, 16, device=device)],
                      (17, 16), st, cfg)
    with pytest.raises(ValueError, match="no adagrad buffers"):
        sparse_update(w, ids, [torch.zeros(2, 3, 17, device=device), torch.zeros(2, 3, 16, device=device)],
                      (17, 16), st, SparseOptimConfig("adagrad"))
    assert int(st.step.item()) == 0  # nothing was applied


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["adagrad", "adam"])
def test_update_index_arithmetic_past_2_31(device, gen, path, kind):
    """Rows whose element offsets pass 2^31 and 2^32 (see test_kernel_embedding for the virtual
    table): the touched rows match the reference run on a compact copy of just those rows."""
    widths = (17, 16)
    V, rows = rows_past_2_31(33)
    cfg = SparseOptimConfig(kind, lr=0.1, weight_decay=0.01)
    w = huge_table(V, 33, device)
    st = DeviceOptimState(step=torch.zeros(1, dtype=torch.int64, device=device),
                          lr=torch.full((1,), cfg.lr, device=device))
    if kind == "adam":
        st.exp_avg, st.exp_avg_sq = huge_table(V, 33, device), huge_table(V, 33, device)
    else:
        st.sum_sq = huge_table(V, 2, device)
    if not PATHS[path]:
        st.slots = huge_table(V, 1, device, torch.int32).view(V)
        st.slots[rows.to(device)] = -1  # only entries of looked-up rows are ever read
    small = Pair(torch.randn(rows.numel(), 33, generator=gen), widths, cfg, "cpu")
    dev_rows = rows.to(device)
    w[dev_rows] = small.w_ref.to(device)
    for k in ("sum_sq", "exp_avg", "exp_avg_sq"):
        if getattr(st, k) is not None:
            getattr(st, k)[dev_rows] = 0.0
    for _ in range(2):
        local = torch.randint(0, rows.numel(), (4, 9), generator=gen)
        grads = _grads(gen, (4, 9), widths)
        sparse_update(w, rows[local].to(device), [g.to(device) for g in grads], widths, st, cfg, PATHS[path])
        sparse_update_reference(small.w_ref, local.reshape(-1), torch.cat(grads, -1).reshape(36, 33),
                                small.st_ref, cfg)
    assert_close(w[dev_rows], small.w_ref, torch.float32)
    if kind == "adam":
        assert_close(st.exp_avg_sq[dev_rows], small.st_ref.exp_avg_sq, torch.float32)
    else:
        assert_close(st.sum_sq[dev_rows], small.st_ref.sum_sq, torch.float32)
