"""ReLU + inverted dropout fused into one pass, with masks from a counter-based RNG (Philox4x32-10).

What it computes, for an input x (any shape), rate p and scale s = 1 / (1 - p):

    y = relu(x) * m * s          m = keep(seed, counter, i) in {0, 1} for flat element index i

and in the backward, with g = dL/dy,

    dL/dx = g * m * s * [x > 0] = g * s * [y > 0]

since y > 0 exactly when m = 1 and x > 0 (s >= 1, so no positive x rounds to zero). The backward
therefore needs no mask at all: it reads the output y, which autograd keeps anyway as the next
Linear's input. No float mask, no uint8 mask, no bits: the op saves zero extra bytes.

The mask. ``keep(seed, counter, i)`` is Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random
numbers: as easy as 1, 2, 3", SC 2011; the generator of cuRAND and of torch's own CUDA dropout),
keyed by the 64-bit seed, on the 128-bit counter (group index lo, group index hi, counter lo,
counter hi). Why Philox: it is a keyed bijection of the full 128-bit counter, so no two (counter, i)
pairs under one key can ever share a random word, and different keys give unrelated permutations;
it passes TestU01's BigCrush for every key and counter pattern tried by its authors. A
splitmix/murmur hash of a 64-bit state would be cheaper, but it folds (seed, counter, i) into 64
bits, and over 10^13 mask bits in a long run two calls' ranges would overlap somewhere (birthday
bound). Each Philox call gives four 32-bit words, one per element; an element is kept when its word
is >= round(p * 2^32), so the keep rate is 1 - p to within 2^-32.

Which word an element gets: elements are laid out in blocks of ``BLOCK = 4 * LANES`` consecutive
flat indices; inside block b, element ``b * BLOCK + w * LANES + l`` takes word w of the Philox call
on group ``b * LANES + l``. Consecutive elements thus come from consecutive Philox calls, so the
kernel's loop over l vectorises (AVX-512: 8 or 16 lanes of vpmuludq); the assignment is a pure
function of (seed, counter, i), whatever the thread count or chunking. ``keep_mask_reference``
spells it out in numpy.

Layers: ``_relu_dropout_fwd_kernel`` / ``_relu_dropout_bwd_kernel`` (numba, serial, GIL released)
-> ``relu_dropout_forward`` / ``relu_dropout_backward`` (launchers: split a call over threads) ->
``ReLUDropoutFunction`` (autograd) -> ``relu_dropout`` (functional, picks the implementation) ->
``ReLUDropout`` (the module holding the RNG state as buffers, used by ``models.blocks.MLP``).
The reference path is ``F.dropout(F.relu(x), p)``; ``MLFAST_DROPOUT=reference`` selects it
everywhere for A/B runs, and it is always used for CUDA tensors (the numba kernels are CPU-only) and
for dtypes other than float32, float64 and bfloat16.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, types
from numba.extending import overload
from torch import nn

from mlfast.ops.backends import choose_impl
from mlfast.ops.threads import parallel_for

IMPLS = ("fast", "reference")
ENV_VAR = "MLFAST_DROPOUT"

LANES = 64  # Philox calls per block, vectorised over; a block holds 4 * LANES elements
BLOCK = 4 * LANES
CHUNK = 1 << 16  # elements per work item of the thread runner (~50 us of forward work)

# Philox4x32 constants (Random123's PHILOX_M4x32_0/1 and PHILOX_W32_0/1).
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Reference (numpy): the RNG and the mask, element by element as defined above


def philox4x32_reference(ctr: np.ndarray, key: tuple[int, int], rounds: int = 10) -> np.ndarray:
    """Philox4x32 on counters ``ctr`` [..., 4] (uint32 words) under ``key`` (k0, k1) -> [..., 4].

    Example (Random123's known-answer vector for a zero counter and key)::

        >>> [hex(w) for w in philox4x32_reference(np.zeros(4, np.uint32), (0, 0))]
        ['0x6627e8d5', '0xe169c58d', '0xbc57ac4c', '0x9b00dbd8']
    """
    c = [np.asarray(ctr, np.uint64)[..., j] for j in range(4)]
    k0, k1 = np.uint64(key[0] & _U32), np.uint64(key[1] & _U32)
    m0, m1, w0, w1, lo = (np.uint64(v) for v in (_M0, _M1, _W0, _W1, _U32))
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + w0) & lo, (k1 + w1) & lo
        p0, p1 = m0 * c[0], m1 * c[2]  # 32 x 32 -> 64-bit products: no wrap in uint64
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & lo, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & lo]
    return np.stack(c, axis=-1).astype(np.uint32)


def keep_threshold(p: float) -> int:
    """A Philox word w keeps its element iff w >= this (so P(keep) = 1 - p to within 2^-32)."""
    return min(1 << 32, round(p * 2.0**32))


def keep_mask_reference(seed: int, counter: int, n: int, p: float, start: int = 0) -> np.ndarray:
    """The keep mask (bool [n]) of flat elements start..start+n-1 for ``seed``, ``counter`` and
    rate ``p``.

    Example::

        >>> m = keep_mask_reference(seed=1, counter=0, n=1000, p=0.5)
        >>> m.dtype, 400 < int(m.sum()) < 600
        (dtype('bool'), True)
    """
    i = np.arange(start, start + n, dtype=np.uint64)
    block, r = i // np.uint64(BLOCK), i % np.uint64(BLOCK)
    word, lane = (r // np.uint64(LANES)).astype(np.int64), r % np.uint64(LANES)
    group = block * np.uint64(LANES) + lane
    seed, counter = seed & (2**64 - 1), counter & (2**64 - 1)
    ctr = np.stack([group & np.uint64(_U32), group >> np.uint64(32),
                    np.full(n, counter & _U32, np.uint64), np.full(n, counter >> 32, np.uint64)], axis=-1)
    words = philox4x32_reference(ctr, (seed & _U32, seed >> 32))
    return words[np.arange(n), word].astype(np.uint64) >= np.uint64(keep_threshold(p))


# ---------------------------------------------------------------------------------------------
# Kernels (numba)

_NM0, _NM1, _NW0, _NW1, _NLO, _S32 = (np.uint64(v) for v in (_M0, _M1, _W0, _W1, _U32, 32))


@njit(inline="always")
def _philox_round(c0, c1, c2, c3, k0, k1):
    p0 = _NM0 * c0
    p1 = _NM1 * c2
    return (p1 >> _S32) ^ c1 ^ k0, p1 & _NLO, (p0 >> _S32) ^ c3 ^ k1, p0 & _NLO


@njit(inline="always")
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    # Every word is a uint64 holding 32 bits: the 32 x 32 -> 64 products then compile to vpmuludq.
    c0, c1, c2, c3 = _philox_round(c0, c1, c2, c3, k0, k1)
    for _ in range(9):
        k0 = (k0 + _NW0) & _NLO
        k1 = (k1 + _NW1) & _NLO
        c0, c1, c2, c3 = _philox_round(c0, c1, c2, c3, k0, k1)
    return c0, c1, c2, c3


# Element codecs: how a stored element becomes the compute type and back, chosen by numba at compile
# time from the array's dtype. float32/float64 compute in their own type; bfloat16, passed as its
# uint16 bits (numba has no bfloat16), computes in float32 and rounds to nearest-even on the way
# back, as torch's CPU kernels do, so both paths give the same bits.


def _load(v):
    """The element ``v`` (float, or bfloat16 bits) as a float of the compute type (numba only)."""
    raise NotImplementedError("numba-only helper")


def _store(f, out):
    """``f`` converted to what ``out`` (an array) holds (numba only)."""
    raise NotImplementedError("numba-only helper")


@overload(_load, inline="always")
def _load_impl(v):
    if isinstance(v, types.Integer):  # bfloat16 bits (numba widens the shift, hence the cast)
        return lambda v: np.uint32(np.uint32(v) << np.uint32(16)).view(np.float32)
    return lambda v: v


@overload(_store, inline="always")
def _store_impl(f, out):
    if isinstance(out.dtype, types.Integer):
        def to_bf16(f, out):
            u = np.float32(f).view(np.uint32)
            if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: torch's quiet NaN
                return np.uint16(0x7FC0)
            return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        return to_bf16
    return lambda f, out: f


@njit(nogil=True, cache=True)
def _relu_dropout_fwd_kernel(x, y, group0, k0, k1, c2, c3, threshold, scale):
    # x, y: whole blocks of one chunk (group0: the first block's first Philox group), sliced so
    # that indices start at 0: numba then proves them non-negative, drops its wraparound check,
    # and the loop over l vectorises (vpmuludq on 8 or 16 lanes).
    zero = scale - scale  # typed like scale (scale * 0 would be float64)
    for b in range(x.size // BLOCK):
        base = b * BLOCK
        for l in range(LANES):
            g = group0 + np.uint64(b * LANES + l)
            r0, r1, r2, r3 = _philox4x32_10(g & _NLO, g >> _S32, c2, c3, k0, k1)
            # relu as "0 if v <= 0 else v" keeps NaN, as torch.relu does; a dropped NaN stays NaN
            # (NaN * 0), as in the reference relu(x) * m * s.
            v = _load(x[base + l])
            y[base + l] = _store((zero if v <= 0 else v) * (scale if r0 >= threshold else zero), y)
            v = _load(x[base + LANES + l])
            y[base + LANES + l] = _store((zero if v <= 0 else v) * (scale if r1 >= threshold else zero), y)
            v = _load(x[base + 2 * LANES + l])
            y[base + 2 * LANES + l] = _store((zero if v <= 0 else v) * (scale if r2 >= threshold else zero), y)
            v = _load(x[base + 3 * LANES + l])
            y[base + 3 * LANES + l] = _store((zero if v <= 0 else v) * (scale if r3 >= threshold else zero), y)


@njit(nogil=True, cache=True)
def _relu_dropout_bwd_kernel(g, y, gx, scale):
    zero = scale - scale  # typed like scale (scale * 0 would be float64)
    for i in range(g.size):
        gx[i] = _store(_load(g[i]) * scale if _load(y[i]) > 0 else zero, gx)


# ---------------------------------------------------------------------------------------------
# Launchers

FAST_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _flat_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.reshape(-1)
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def _scale(dtype: torch.dtype, p: float) -> np.floating:
    """1 / (1 - p) in the compute type (float32 for bfloat16), as torch rounds the scalar."""
    return (np.float64 if dtype == torch.float64 else np.float32)(1.0 / (1.0 - p))


def _check_fast(x: torch.Tensor, p: float) -> None:
    if x.device.type != "cpu" or x.dtype not in FAST_DTYPES:
        raise ValueError(f"the numba ReLU+dropout takes CPU tensors of {FAST_DTYPES}, "
                         f"got {x.dtype} on {x.device}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout rate p={p!r} must be in [0, 1)")


def relu_dropout_forward(x: torch.Tensor, p: float, seed: int, counter: int,
                         threads: int | None = None) -> torch.Tensor:
    """y = relu(x) * keep(seed, counter, i) / (1 - p) elementwise (flat index i), as a new tensor.

    ``threads``: at most this many threads (default ``torch.get_num_threads()``); the result is the
    same whatever the count.
    """
    _check_fast(x, p)
    x = x.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = x.numel()
    if n == 0:
        return y
    xf, yf = _flat_numpy(x), _flat_numpy(y)
    seed, counter = seed & (2**64 - 1), counter & (2**64 - 1)
    u = np.uint64
    key = (u(seed & _U32), u(seed >> 32), u(counter & _U32), u(counter >> 32), u(keep_threshold(p)),
           _scale(x.dtype, p))

    def blocks(lo: int, hi: int) -> None:  # whole blocks [lo, hi)
        _relu_dropout_fwd_kernel(xf[lo * BLOCK:hi * BLOCK], yf[lo * BLOCK:hi * BLOCK], u(lo * LANES), *key)

    nb = n // BLOCK
    parallel_for(blocks, nb, max(1, CHUNK // BLOCK), threads)
    if n > nb * BLOCK:  # the last, partial block: the same kernel on a zero-padded copy
        xt, yt = np.zeros(BLOCK, xf.dtype), np.empty(BLOCK, yf.dtype)
        xt[:n - nb * BLOCK] = xf[nb * BLOCK:]
        _relu_dropout_fwd_kernel(xt, yt, u(nb * LANES), *key)
        yf[nb * BLOCK:] = yt[:n - nb * BLOCK]
    return y


def relu_dropout_backward(grad: torch.Tensor, y: torch.Tensor, p: float,
                          threads: int | None = None) -> torch.Tensor:
    """dL/dx = grad / (1 - p) where y > 0, else 0 (``y``: the forward's output)."""
    _check_fast(y, p)
    if grad.shape != y.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} != output shape {tuple(y.shape)}")
    grad, y = grad.to(y.dtype).contiguous(), y.contiguous()
    gx = torch.empty_like(y, memory_format=torch.contiguous_format)
    gf, yf, gxf, scale = _flat_numpy(grad), _flat_numpy(y), _flat_numpy(gx), _scale(y.dtype, p)

    def elements(lo: int, hi: int) -> None:
        _relu_dropout_bwd_kernel(gf[lo:hi], yf[lo:hi], gxf[lo:hi], scale)

    parallel_for(elements, y.numel(), 2 * CHUNK, threads)
    return gx


class ReLUDropoutFunction(torch.autograd.Function):
    """relu + inverted dropout with the Philox mask of (seed, counter); saves only its output."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int, counter: int) -> torch.Tensor:
        y = relu_dropout_forward(x, p, seed, counter)
        ctx.save_for_backward(y)
        ctx.p = p
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (y,) = ctx.saved_tensors
        return relu_dropout_backward(grad, y, ctx.p), None, None, None


# ---------------------------------------------------------------------------------------------
# Dispatch, functional form and module


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """The implementation that runs for ``impl`` ("auto" | "fast" | "reference") on ``x``.

    "auto" reads ``MLFAST_DROPOUT`` (default "fast"); "fast" falls back to "reference" off the CPU
    and for dtypes the numba kernels do not take (e.g. float16).
    """
    impl = choose_impl(impl, ENV_VAR, IMPLS, "dropout")
    if impl == "fast" and (x.device.type != "cpu" or x.dtype not in FAST_DTYPES):
        return "reference"
    return impl


def relu_dropout(x: torch.Tensor, p: float, seed: int, counter: int, training: bool = True,
                 impl: str = "auto") -> torch.Tensor:
    """``dropout(relu(x), p)``: inverted dropout in training, plain relu otherwise or when p = 0.

    The fast path's mask is a pure function of (seed, counter, flat index) (see the module
    docstring); the reference path is ``F.dropout`` on torch's global generator, which ignores
    ``seed`` and ``counter``.

    Example::

        >>> x = torch.ones(2, 1000)
        >>> y = relu_dropout(x, 0.5, seed=1, counter=0)
        >>> sorted(set(y.flatten().tolist())), abs(float((y > 0).float().mean()) - 0.5) < 0.05
        ([0.0, 2.0], True)
        >>> torch.equal(y, relu_dropout(x, 0.5, seed=1, counter=0))
        True
    """
    if not training or p == 0.0:
        return torch.relu(x)
    if resolve_impl(impl, x) == "reference":
        return F.dropout(torch.relu(x), p, training=True)
    return _fast(x, p, int(seed), int(counter))


def _fast(x: torch.Tensor, p: float, seed: int, counter: int) -> torch.Tensor:
    # numba kernels on the tensors' memory must stay opaque to torch.compile (a graph break, not a
    # trace). Decorating with torch.compiler.disable at import would import torch._dynamo (~1 s of
    # every mlfast command's start): nothing can be compiling while it is not loaded, so the
    # disabled wrapper is made only once it is.
    if "torch._dynamo" not in sys.modules:
        return ReLUDropoutFunction.apply(x, p, seed, counter)
    return _compile_safe()(x, p, seed, counter)


_DISABLED = None


def _compile_safe():
    global _DISABLED
    if _DISABLED is None:
        _DISABLED = torch.compiler.disable(lambda x, p, seed, counter: ReLUDropoutFunction.apply(x, p, seed, counter))
    return _DISABLED


class ReLUDropout(nn.Module):
    """ReLU then inverted dropout of rate ``p`` in one pass, with its RNG state as buffers.

    ``seed`` (int64) keys the Philox stream; ``counter`` (int64) picks the call within it and goes
    up by one on every training forward. Both are buffers, so they travel in ``state_dict()``: a
    module restored from a checkpoint continues the exact mask sequence. ``seed=None`` draws the
    seed from torch's global generator (one ``torch.randint``), so models built under
    ``torch.manual_seed(peer_seed)`` give every peer and every layer its own reproducible stream.
    Eval mode, or p = 0, is a plain relu and leaves the counter alone.

    ``impl``: "auto" (``MLFAST_DROPOUT``, default "fast"), "fast" (numba, CPU) or "reference"
    (``F.dropout``, torch's generator; always used on CUDA).

    Example::

        >>> m = ReLUDropout(0.2, seed=7)
        >>> y = m(torch.randn(4, 8)); int(m.counter)
        1
        >>> m2 = ReLUDropout(0.2, seed=0); m2.load_state_dict(m.state_dict())
        <All keys matched successfully>
        >>> x = torch.randn(4, 8); torch.equal(m(x), m2(x))
        True
        >>> torch.equal(m.eval()(x), torch.relu(x))
        True
    """

    def __init__(self, p: float = 0.2, seed: int | None = None, impl: str = "auto"):
        super().__init__()
        if not 0.0 <= p < 1.0:  # also rejects NaN
            raise ValueError(f"dropout rate p={p!r} must be in [0, 1)")
        if impl not in ("auto", *IMPLS):
            raise ValueError(f"dropout impl {impl!r}: expected auto, {', '.join(IMPLS)}")
        self.p = float(p)
        self.impl = impl
        if seed is None:
            seed_t = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)
        else:
            seed_t = torch.tensor(_as_int64(seed), dtype=torch.int64)
        self.register_buffer("seed", seed_t)
        self.register_buffer("counter", torch.zeros((), dtype=torch.int64))

    def reset_seed(self, seed: int) -> None:
        """Restart the mask stream: key it by ``seed`` and set the counter to 0."""
        with torch.no_grad():
            self.seed.fill_(_as_int64(seed))
            self.counter.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return torch.relu(x)
        if resolve_impl(self.impl, x) == "reference":
            y = F.dropout(torch.relu(x), self.p, training=True)
        else:  # CPU buffers: reading them is no device sync
            y = _fast(x, self.p, int(self.seed), int(self.counter))
        with torch.no_grad():
            self.counter.add_(1)
        return y

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checkpoints written before the RNG state existed (plain nn.Dropout) have no seed/counter:
        # they load, keeping this module's own stream.
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for name in ("seed", "counter"):
            if prefix + name not in state_dict and prefix + name in missing_keys:
                missing_keys.remove(prefix + name)

    def extra_repr(self) -> str:
        return f"p={self.p}, impl={self.impl!r}"


def _as_int64(seed: int) -> int:
    """``seed`` folded into int64 (seeds are 64-bit keys; Python ints may be wider or unsigned)."""
    seed = int(seed) & (2**64 - 1)
    return seed - 2**64 if seed >= 2**63 else seed


def warmup() -> None:
    """Compile (or load from numba's cache) the kernels for float32, float64 and bfloat16, so the
    first training step does not pay for it.

    Example::

        >>> warmup()
    """
    for dtype in FAST_DTYPES:
        x = torch.linspace(-1, 1, BLOCK + 3, dtype=dtype)
        y = relu_dropout_forward(x, 0.5, 1, 0)
        relu_dropout_backward(torch.ones_like(y), y, 0.5)


__all__ = ["ReLUDropout", "ReLUDropoutFunction", "relu_dropout", "relu_dropout_forward",
           "relu_dropout_backward", "resolve_impl", "keep_mask_reference", "philox4x32_reference",
           "keep_threshold", "warmup"]
