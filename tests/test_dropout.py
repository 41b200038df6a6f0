"""Fused ReLU + dropout (``mlfast.ops.dropout``): the Philox stream, the numba kernels against the
plain formula ``relu(x) * m / (1 - p)`` with the same mask m, the mask's statistics, the RNG state
(seeding, determinism, checkpoints) and the MLP that uses it.

Statistical checks use bounds of 5 standard deviations: a false failure is a 1-in-10^6 event, while
a broken mask (wrong rate, a repeated or shifted stream) misses them by orders of magnitude.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from mlfast.models.blocks import MLP
from mlfast.ops import dropout as D
from mlfast.ops.dropout import (BLOCK, LANES, ReLUDropout, keep_mask_reference, philox4x32_reference,
                                relu_dropout, relu_dropout_backward, relu_dropout_forward)

FAST_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
Z = 5.0  # standard deviations allowed in the statistical checks


@pytest.fixture(autouse=True, scope="module")
def _compiled():
    D.warmup()


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(D.ENV_VAR, raising=False)


def draw_key(gen: torch.Generator) -> tuple[int, int]:
    """A random (seed, counter): full-range int64 seed, counter past 2^32 half the time."""
    seed = int(torch.randint(-(2**63), 2**63 - 1, (), generator=gen))
    counter = int(torch.randint(0, 2**40, (), generator=gen))
    return seed, counter


def mask_of(seed: int, counter: int, shape: tuple[int, ...], p: float, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(keep_mask_reference(seed, counter, math.prod(shape), p)).reshape(shape).to(dtype)


def reference(x: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """relu(x) * m / (1 - p), the scale as a Python float as F.dropout applies it."""
    return torch.relu(x) * mask * (1.0 / (1.0 - p))


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# ---------------------------------------------------------------------------------------------
# The generator


def test_philox_reference_matches_random123_known_answers():
    # Random123's kat_vectors, "philox4x32 10": counter, key -> output.
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, want in cases:
        assert philox4x32_reference(np.array(ctr, np.uint32), key).tolist() == list(want)


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_keep_threshold(p):
    t = D.keep_threshold(p)
    assert abs((1 - t / 2**32) - (1 - p)) <= 2**-32


# ---------------------------------------------------------------------------------------------
# Kernels against the formula with the same mask


@pytest.mark.parametrize("dtype", FAST_DTYPES)
@pytest.mark.parametrize("shape", [(41, 401), (4096, 40), (3, BLOCK), (7,), (2, 3, 50)])
def test_forward_equals_formula(shape, dtype, gen):
    seed, counter = draw_key(gen)
    p = 0.3
    x = torch.randn(shape, generator=gen).to(dtype)
    y = relu_dropout_forward(x, p, seed, counter)
    ref = reference(x, mask_of(seed, counter, shape, p, dtype), p)
    assert y.shape == x.shape and y.dtype == dtype
    # Same float operations in the same order (bf16: float32 math, round to nearest even): bitwise.
    assert torch.equal(y, ref)
    assert 0 < int((y != 0).sum()) < x.numel() or x.numel() < 20


@pytest.mark.parametrize("dtype", FAST_DTYPES)
def test_gradient_equals_autograd_of_formula(dtype, gen):
    seed, counter = draw_key(gen)
    p = 0.2
    x = torch.randn(41, 401, generator=gen).to(dtype)
    x[0, :5] = 0.0  # relu's kink: the gradient there is 0 in both
    grad_out = torch.randn(41, 401, generator=gen).to(dtype)  # grad_output != 1
    xf = x.clone().requires_grad_(True)
    y = relu_dropout(xf, p, seed, counter, impl="fast")
    y.backward(grad_out)
    xr = x.clone().requires_grad_(True)
    ref = reference(xr, mask_of(seed, counter, x.shape, p, dtype), p)
    ref.backward(grad_out)
    assert torch.equal(y.detach(), ref.detach())
    assert torch.equal(xf.grad, xr.grad)
    assert (xf.grad != 0).sum() > 0.5 * x.numel() * (1 - p) * 0.9  # about half the inputs > 0, kept


def test_flat_index_past_2_to_32(gen):
    """Group indices whose high word is non-zero (tensors past 2^34 elements), through the block
    kernel directly: a dropped high word would repeat the masks of the first 2^34 elements."""
    seed, counter = draw_key(gen)
    p = 0.5
    group0 = 2**32 - 2 * LANES  # 4 blocks: 2 below the high word's first step, 2 above
    x = torch.rand(4 * BLOCK, generator=gen) + 0.5
    y = torch.empty_like(x)
    u = np.uint64
    D._relu_dropout_fwd_kernel(x.numpy(), y.numpy(), u(group0), u(seed & D._U32), u((seed >> 32) & D._U32),
                  u(counter & D._U32), u(counter >> 32), u(D.keep_threshold(p)), np.float32(2.0))
    want = torch.from_numpy(keep_mask_reference(seed, counter, x.numel(), p, start=group0 * 4))
    assert torch.equal(y != 0, want)
    wrapped = torch.from_numpy(keep_mask_reference(seed, counter, 2 * BLOCK, p, start=0))
    assert not torch.equal(want[2 * BLOCK:], wrapped)  # group 2^32 is not group 0 again


def test_empty_and_p_zero(gen):
    for shape in [(0, 400), (0,)]:
        x = torch.empty(shape, requires_grad=True)
        y = relu_dropout(x, 0.2, 1, 0, impl="fast")
        y.sum().backward()
        assert y.shape == shape and x.grad.shape == shape
    m = ReLUDropout(0.2, seed=1)
    assert m(torch.empty(0, 7)).shape == (0, 7) and int(m.counter) == 1
    x = torch.randn(5, 9, generator=gen)
    assert torch.equal(relu_dropout(x, 0.0, 1, 0), torch.relu(x))
    m0 = ReLUDropout(0.0)
    assert torch.equal(m0(x), torch.relu(x)) and int(m0.counter) == 0


def test_noncontiguous_input(gen):
    seed, counter = draw_key(gen)
    x = torch.randn(401, 41, generator=gen).t()  # [41, 401], not contiguous
    y = relu_dropout_forward(x, 0.25, seed, counter)
    assert torch.equal(y, reference(x, mask_of(seed, counter, (41, 401), 0.25), 0.25))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"p=1.0 must be in \[0, 1\)"):
        ReLUDropout(1.0)
    with pytest.raises(ValueError, match=r"impl 'numba'"):
        ReLUDropout(0.2, impl="numba")
    with pytest.raises(ValueError, match="CPU tensors"):
        relu_dropout_forward(torch.ones(3, dtype=torch.float16), 0.2, 1, 0)
    with pytest.raises(ValueError, match=r"grad shape \(2,\) != output shape \(3,\)"):
        relu_dropout_backward(torch.ones(2), torch.ones(3), 0.2)


# ---------------------------------------------------------------------------------------------
# The mask's statistics


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_keep_rate_within_binomial_bound(p, gen):
    seed, counter = draw_key(gen)
    n = 4096 * 400
    y = relu_dropout_forward(torch.ones(4096, 400), p, seed, counter)
    kept = int((y != 0).sum())
    q = 1 - p
    assert abs(kept - n * q) <= Z * math.sqrt(n * p * q), (kept, n * q)
    # Inverted dropout: kept elements are scaled by exactly 1 / (1 - p), so E[y] = relu(x).
    assert torch.equal(y[y != 0], torch.full((kept,), 1.0 / q, dtype=torch.float32))
    assert abs(float(y.double().mean()) - 1.0) <= Z * math.sqrt(p / q / n)


def test_masks_independent_across_steps_peers_and_positions(gen):
    seed, counter = draw_key(gen)
    p, shape = 0.5, (4096, 100)
    n = math.prod(shape)
    ones = torch.ones(shape)
    bound = Z / math.sqrt(n)  # sd of a sample correlation of independent sequences ~ 1/sqrt(n)
    m = relu_dropout_forward(ones, p, seed, counter) != 0
    others = {
        "next step": relu_dropout_forward(ones, p, seed, counter + 1),
        "step + 2^32": relu_dropout_forward(ones, p, seed, counter + 2**32),
        "other seed": relu_dropout_forward(ones, p, seed ^ 1, counter),
        "other seed, next step": relu_dropout_forward(ones, p, seed + 1, counter + 1),
    }
    for name, o in others.items():
        assert abs(corr(m, o != 0)) < bound, name
    # Within one mask: neighbours, the same lane's other words, the next block, the next row.
    flat = m.flatten()
    for lag in (1, LANES, BLOCK, shape[1]):
        assert abs(corr(flat[:-lag], flat[lag:])) < Z / math.sqrt(n - lag), lag


def test_module_streams_differ_between_peers_layers_and_steps(gen):
    """Seeds drawn from torch's generator at construction: reproducible under the same peer seed,
    distinct across peer seeds and across the MLPs of one model; each call moves the counter."""
    peer_seeds = [int(s) for s in torch.randint(0, 2**62, (2,), generator=gen)]

    def build(peer_seed: int) -> list[MLP]:
        torch.manual_seed(peer_seed)
        return [MLP(12, (16, 8), output_dim=None), MLP(12, (16, 8), output_dim=1)]

    a, a2, b = build(peer_seeds[0]), build(peer_seeds[0]), build(peer_seeds[1])
    seeds = [int(m.dropout.seed) for m in a + b]
    assert [int(m.dropout.seed) for m in a2] == seeds[:2]
    assert len(set(seeds)) == 4
    # The masks themselves: the three hidden-layer calls of one step, and the next step.
    m = ReLUDropout(0.5, seed=seeds[0])
    ones = torch.ones(512, 64)
    masks = [m(ones) != 0 for _ in range(4)]
    assert int(m.counter) == 4
    for i in range(4):
        for j in range(i):
            assert abs(corr(masks[i], masks[j])) < Z / math.sqrt(ones.numel())


def test_trainer_peers_get_distinct_reproducible_streams():
    """As the trainer builds peers (``torch.manual_seed(peer_seed(seed, label))`` then
    ``build_model``): every dropout module of every peer has its own seed, and a rebuild (a resumed
    or repeated run) gives the same ones. dcnv2 stacked_parallel holds two MLPs."""
    from mlfast.models import FeatureSchema, build_model
    from mlfast.train.trainer import peer_seed

    schema = FeatureSchema((0, 4, 9, 15))
    specs = {"deepfm": "deepfm", "dcn": "dcn", "dcn_2": "dcn", "dcnv2": "dcnv2:structure=stacked_parallel"}

    def seeds(run_seed: int) -> list[int]:
        out = []
        for label, spec in specs.items():
            torch.manual_seed(peer_seed(run_seed, label))
            model = build_model(spec, schema, embedding_dim=4)
            out += [int(m.seed) for m in model.modules() if isinstance(m, ReLUDropout)]
        return out

    first = seeds(0)
    assert len(first) == 5 and len(set(first)) == 5
    assert seeds(0) == first
    assert set(seeds(1)).isdisjoint(first)


def test_seed_draw_leaves_the_mlp_init_unchanged(gen):
    """The seed is drawn after the Linear layers: the same peer seed gives the same initial weights
    with or without dropout (the draw only shifts what is built after the MLP)."""
    s = int(torch.randint(0, 2**62, (), generator=gen))
    torch.manual_seed(s)
    with_dropout = MLP(10, (8, 6), output_dim=1, dropout=0.2).state_dict()
    torch.manual_seed(s)
    without = MLP(10, (8, 6), output_dim=1, dropout=0.0).state_dict()
    assert set(with_dropout) - set(without) == {"dropout.seed", "dropout.counter"}
    for k, v in without.items():
        assert torch.equal(with_dropout[k], v), k


# ---------------------------------------------------------------------------------------------
# Determinism and checkpoints


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_key_same_mask_any_thread_count(dtype, gen, monkeypatch):
    """The mask is a function of (seed, counter, index) only: 1, 2 or 3 threads, chunks of any
    size (down to one block, so every thread takes many), torch's thread setting as the default."""
    seed, counter = draw_key(gen)
    x = torch.randn(1000, 333, generator=gen).to(dtype)
    g = torch.randn(1000, 333, generator=gen).to(dtype)
    y1 = relu_dropout_forward(x, 0.2, seed, counter, threads=1)
    g1 = relu_dropout_backward(g, y1, 0.2, threads=1)
    monkeypatch.setattr(D, "CHUNK", BLOCK)
    for threads in (2, 3):
        y = relu_dropout_forward(x, 0.2, seed, counter, threads=threads)
        assert torch.equal(y, y1) and torch.equal(relu_dropout_backward(g, y, 0.2, threads=threads), g1)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.equal(relu_dropout_forward(x, 0.2, seed, counter), y1)
    finally:
        torch.set_num_threads(before)


def test_worker_exception_reaches_the_caller():
    calls = []

    def fn(lo, hi):
        calls.append(lo)
        if lo == 3:
            raise RuntimeError("chunk 3 failed")

    with pytest.raises(RuntimeError, match="chunk 3 failed"):
        D.parallel_for(fn, 8, 1, threads=2)
    seen = []
    D.parallel_for(lambda lo, hi: seen.append((lo, hi)), 10, 3, threads=2)
    assert sorted(seen) == [(0, 3), (3, 6), (6, 9), (9, 10)]  # each piece once


def test_state_dict_round_trip_continues_the_sequence(gen):
    seed, _ = draw_key(gen)
    a = ReLUDropout(0.2, seed=seed)
    xs = [torch.randn(64, 33, generator=gen) for _ in range(6)]
    for x in xs[:3]:
        a(x)
    b = ReLUDropout(0.2, seed=seed + 12345)
    b.load_state_dict(a.state_dict())
    assert int(b.seed) == seed and int(b.counter) == 3
    for x in xs[3:]:
        assert torch.equal(a(x), b(x))
    # ... and is not merely the same mask every step
    assert not torch.equal(a(xs[0]) != 0, a(xs[0]) != 0)
    b.reset_seed(seed)
    assert int(b.counter) == 0
    c = ReLUDropout(0.2, seed=seed)
    for x in xs:
        assert torch.equal(b(x), c(x))


def test_mlp_resume_is_exact(gen):
    """A training MLP saved mid-run and restored into a fresh one: identical outputs and gradients
    afterwards (the mask stream is in the state_dict, not in torch's global generator)."""
    torch.manual_seed(int(torch.randint(0, 2**62, (), generator=gen)))
    a = MLP(20, (32, 16), output_dim=1, dropout=0.3)
    xs = [torch.randn(50, 20, generator=gen) for _ in range(4)]
    a(xs[0]).sum().backward()
    b = MLP(20, (32, 16), output_dim=1, dropout=0.3)
    b.load_state_dict(a.state_dict())
    torch.manual_seed(0)  # torch's generator plays no part
    for x in xs[1:]:
        for m in (a, b):
            m.zero_grad()
        ya, yb = a(x), b(x)
        ya.sum().backward()
        yb.sum().backward()
        assert torch.equal(ya, yb)
        for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(pa.grad, pb.grad), k


def test_checkpoint_without_rng_state_still_loads(gen):
    m = MLP(6, (5,), output_dim=1, dropout=0.2)
    old = {k: v for k, v in m.state_dict().items() if not k.startswith("dropout.")}  # nn.Dropout era
    fresh = MLP(6, (5,), output_dim=1, dropout=0.2)
    seed = int(fresh.dropout.seed)
    fresh.load_state_dict(old)  # strict
    assert int(fresh.dropout.seed) == seed
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict({**old, "dropout.bogus": torch.zeros(())})


# ---------------------------------------------------------------------------------------------
# Modes and implementations


def test_train_and_eval_scaling(gen):
    m = ReLUDropout(0.25, seed=3)
    x = torch.randn(300, 40, generator=gen)
    y = m(x)
    kept = y != 0
    assert torch.equal(y[kept], x[kept] * (1 / 0.75)) and (x[kept] > 0).all()
    assert int(m.counter) == 1
    m.eval()
    assert torch.equal(m(x), torch.relu(x)) and int(m.counter) == 1
    with torch.no_grad():  # training mode without a graph still drops
        assert (m.train()(x) == 0).sum() > (x <= 0).sum()


def test_reference_impl_and_environment_switch(monkeypatch, gen):
    x = torch.randn(200, 50, generator=gen)
    ref = ReLUDropout(0.2, seed=5, impl="reference")
    torch.manual_seed(11)
    got = ref(x)
    torch.manual_seed(11)
    assert torch.equal(got, F.dropout(torch.relu(x), 0.2, training=True))
    assert int(ref.counter) == 1  # the counter moves on either path
    fast = ReLUDropout(0.2, seed=5)
    want_fast = relu_dropout_forward(x, 0.2, 5, 0)
    assert torch.equal(fast(x), want_fast)
    monkeypatch.setenv(D.ENV_VAR, "reference")
    auto = ReLUDropout(0.2, seed=5)
    torch.manual_seed(11)
    assert torch.equal(auto(x), got)
    assert torch.equal(ReLUDropout(0.2, seed=5, impl="fast")(x), want_fast)  # explicit wins
    monkeypatch.setenv(D.ENV_VAR, "turbo")
    with pytest.raises(ValueError, match=r"MLFAST_DROPOUT='turbo'"):
        auto(x)


def test_fast_falls_back_to_reference_off_its_dtypes_and_devices():
    assert D.resolve_impl("fast", torch.ones(2)) == "fast"
    assert D.resolve_impl("fast", torch.ones(2, dtype=torch.float16)) == "reference"
    assert D.resolve_impl("fast", torch.ones(2, device="meta")) == "reference"
    assert D.resolve_impl("reference", torch.ones(2)) == "reference"
    h = torch.randn(30, 20).half()
    torch.manual_seed(1)
    y = ReLUDropout(0.5, seed=1)(h)
    torch.manual_seed(1)
    assert y.dtype == torch.float16 and torch.equal(y, F.dropout(torch.relu(h), 0.5, training=True))


# ---------------------------------------------------------------------------------------------
# The MLP: a training step against its formula with the masks of counters c, c+1, c+2


def mlp_reference(mlp: MLP, x: torch.Tensor, seed: int, counter: int, p: float) -> torch.Tensor:
    for i, (lin, bn) in enumerate(zip(mlp.linears, mlp.norms)):
        h = bn(lin(x))
        x = reference(h, mask_of(seed, counter + i, tuple(h.shape), p, h.dtype), p)
    return mlp.out(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_training_step_matches_formula(dtype, gen):
    torch.manual_seed(int(torch.randint(0, 2**62, (), generator=gen)))
    p = 0.2
    fast = MLP(39 * 4, (64, 64, 32), output_dim=1, dropout=p)
    ref = MLP(39 * 4, (64, 64, 32), output_dim=1, dropout=p)
    ref.load_state_dict(fast.state_dict())
    seed, counter = int(fast.dropout.seed), int(fast.dropout.counter)
    x = torch.randn(257, 39 * 4, generator=gen)
    g = torch.randn(257, 1, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = fast(x)
        y_ref = mlp_reference(ref, x, seed, counter, p)
    assert y.dtype == y_ref.dtype == dtype
    y.backward(g.to(dtype))
    y_ref.backward(g.to(dtype))
    assert int(fast.dropout.counter) == counter + 3
    # Every op but the fused one is the same torch call on the same input: bitwise equal.
    assert torch.equal(y, y_ref)
    for (k, pf), pr in zip(fast.named_parameters(), ref.parameters()):
        assert pf.grad is not None and pr.grad.abs().sum() > 0, k
        assert_close(pf.grad, pr.grad, dtype=torch.float32, msg=k)
