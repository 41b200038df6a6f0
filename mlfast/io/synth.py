"""Synthetic Criteo-format click logs whose labels come from a known (hidden) model.

``synth_criteo`` writes a raw Criteo TSV (label, I1..I13, C1..C26; 39 fields without the label
in test format; gzip when the path ends in ``.gz``) that looks like the real thing (8-hex
categoricals with Zipf frequencies, heavy-tailed counts, I2 sometimes negative, correlated missing
values, ~25% clicks, ~240-byte lines), and whose labels are Bernoulli draws from a hidden model.
Because the model is known, the best any learner can do on the file is known too: the report
carries the Bayes AUC / logloss of the true probabilities against the sampled labels.

Each categorical draws a Zipf-distributed *head* of frequent values plus (for the huge fields) a
uniform *tail* over up to millions of values that a few hundred thousand rows see about once, like
the singletons of real logs. The hidden model, with ``r_f`` the rank of categorical ``f``'s value
(0 = most frequent) and ``x_j`` the integer ``I(j+1)``::

    logit = bias
          + sum_f  (w_f[r_f]            if C_f present else m_f)          first order
          + sum_{(a, b, s) in pairs}  s * <V_a[r_a], V_b[r_b]>            FM-style interactions
          + sum_{(j, c)} c * tanh(z_j)                                    dense, nonlinear
          + sum_{(j, l, c)} c * tanh(z_j) * tanh(z_l)                     dense interactions
    z_j   = (bucket_root(x_j) - bucket_root(median_j)) / sigma_j      (0 when x_j is missing)
    P(click) = sigmoid(logit)

``w_f[r] ~ N(0, 1) * g(p_r)`` and ``V_f[r] ~ N(0, I_k / k) * sqrt(g(p_r))`` (the latter for the
``latent_ranks`` most frequent values only), with ``g(p) = p / (p + frequency_scale)`` of the
value's frequency ``p_r``: signal sits on values frequent enough to be learned, tail values weigh
nothing. ``bucket_root`` reads an integer through FuxiCTR's bucket ``floor(log(x)^2)``, so a model
fed the bucket or the raw value sees all of the dense signal. Each of the three parts is scaled to
a configured standard deviation and ``bias`` solved for ``positive_rate``, both on the first
``PILOT_ROWS`` rows, which keeps the Bayes AUC near 0.79-0.80 whatever the seed. The logit is a
function of the written line alone (ranks are recovered from the hex, see ``rank_of_hex``), so the
Bayes figures are the ceiling for any model of the file.

How learnable it is (``/tmp`` scratch check, 80/10/10 split, ids with >= 10 train occurrences,
DeepFM dim 16 + MLP 200-200, Adam 1e-3, best epoch on validation): on 200k rows DeepFM reaches
the test split's Bayes AUC minus ~0.018, logistic regression minus ~0.047; on 1M rows DeepFM is
within 0.009.

Every random number is a hash of (seed, stream, global row index), so the bytes depend only on the
seed and the config: not on the chunk size, the thread count or how many rows are written (the
first N rows of a longer file are the N-row file). Bytes are reproducible on one platform; another
libm could, in principle, round an ``exp`` differently and move one sampled integer.

Example::

    >>> from mlfast.io.synth import synth_criteo
    >>> rep = synth_criteo("/tmp/synth_example.tsv", 100_000, seed=1)
    >>> round(rep.positive_rate, 2), round(rep.text_bytes / rep.rows), 0.75 < rep.bayes_auc < 0.82
    (0.25, 243, True)
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
import numba as nb
import numpy as np

from mlfast.io.hashing import fmix64 as _fmix64

GENERATOR_VERSION = 1
NUM_INT = 13
NUM_CAT = 26
PILOT_ROWS = 1 << 16  # rows the bias is calibrated on (fixed: the bias must not depend on `rows`)
AUC_BINS = 1 << 20  # logit histogram for the streamed Bayes AUC (error below ~1e-5, see _auc_from_hist)
AUC_LOGIT_RANGE = 16.0

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1
_GOLDEN = 0x9E3779B97F4A7C15

# Random streams: each (stream, row) pair gets its own hash-derived uniform.
_S_MISSING = 1_000  # + missing group (shared by every field of the group: they go missing together)
_S_CAT = 2_000  # + categorical field
_S_NORMAL_A = 3_000  # + integer field (two uniforms per Box-Muller draw)
_S_NORMAL_B = 3_100
_S_ZERO = 3_200
_S_NEG = 3_300
_S_LABEL = 4_000
_S_HEX = 5_000  # + categorical field: per-field hex salt
_S_MODEL = 6_000  # numpy seed of the hidden model's weights


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CatFieldSpec:
    """One categorical column of ``cardinality`` values: a Zipf head, P(rank r) ~ (r + 1) ** -zipf
    over the ``head`` most frequent values (all of them when ``head`` is 0), and a long tail holding
    probability ``tail`` spread evenly over the other ``cardinality - head`` values (ids a few
    hundred thousand rows see about once, like the singletons of real logs)."""

    cardinality: int
    zipf: float
    missing: float  # probability the field is empty
    group: int = -1  # fields with the same group id >= 0 share the uniform that decides "missing"
    head: int = 0
    tail: float = 0.0

    @property
    def head_size(self) -> int:
        """Values drawn from the Zipf head (all of them when there is no tail)."""
        return self.head if 0 < self.head < self.cardinality and self.tail > 0.0 else self.cardinality

    @property
    def tail_mass(self) -> float:
        return self.tail if self.head_size < self.cardinality else 0.0

    def head_pmf(self) -> np.ndarray:
        """P(rank r) for the head ranks r < head_size, given the field is present."""
        return (1.0 - self.tail_mass) * zipf_pmf(self.head_size, self.zipf)


@dataclass(frozen=True)
class IntFieldSpec:
    """One integer column: 0 with prob ``zero``, negative (-1/-2/-3) with prob ``negative``, else a
    discretised log-normal count with the given median and 90th percentile."""

    missing: float
    zero: float
    median: float
    p90: float
    negative: float = 0.0
    group: int = -1


@dataclass(frozen=True)
class HiddenModelSpec:
    """The hidden model's shape and strength. The three ``*_std`` are the standard deviations each
    part of the logit is scaled to on the pilot rows, so the Bayes AUC hardly depends on the seed;
    per-field / per-term numbers are relative weights within a part."""

    positive_rate: float = 0.25
    first_order_std: float = 0.85
    interaction_std: float = 0.85
    dense_std: float = 0.5
    first_order: tuple[float, ...] = ()  # relative scale per categorical field; empty = all 1
    missing_scale: float = 0.5  # std of the weight of "missing", relative to a frequent value's
    frequency_scale: float = 1e-2  # a value of frequency p gets weight scale p / (p + frequency_scale)
    latent_dim: int = 2
    latent_ranks: int = 5  # values (most frequent first) per field that have a latent vector
    pairs: tuple[tuple[int, int, float], ...] = ()  # (cat field a, cat field b, weight), 0-based
    dense: tuple[tuple[int, float], ...] = ()  # (int field j, weight of tanh(z_j))
    dense_pairs: tuple[tuple[int, int, float], ...] = ()  # (j, l, weight of tanh(z_j) tanh(z_l))


@dataclass(frozen=True)
class SynthConfig:
    cats: tuple[CatFieldSpec, ...]
    ints: tuple[IntFieldSpec, ...]
    hidden: HiddenModelSpec

    def __post_init__(self) -> None:
        if len(self.cats) != NUM_CAT or len(self.ints) != NUM_INT:
            raise ValueError(f"Criteo layout needs {NUM_INT} int and {NUM_CAT} categorical specs, "
                             f"got {len(self.ints)} and {len(self.cats)}")
        for i, c in enumerate(self.cats):
            if not (1 <= c.cardinality < 1 << 32) or not (0.0 <= c.missing < 1.0):
                raise ValueError(f"C{i + 1}: cardinality must be in [1, 2^32) and missing in [0, 1), got {c}")
        for i, s in enumerate(self.ints):
            if not (0.0 <= s.missing < 1.0) or s.zero + s.negative > 1.0 or s.median < 1 or s.p90 < s.median:
                raise ValueError(f"I{i + 1}: invalid spec {s}")
        h = self.hidden
        if h.first_order and len(h.first_order) != NUM_CAT:
            raise ValueError(f"hidden.first_order needs {NUM_CAT} entries, got {len(h.first_order)}")
        for a, b, _ in h.pairs:
            if not (0 <= a < NUM_CAT and 0 <= b < NUM_CAT and a != b):
                raise ValueError(f"hidden.pairs: bad categorical pair ({a}, {b})")
        for j, *_ in h.dense:
            if not 0 <= j < NUM_INT:
                raise ValueError(f"hidden.dense: bad int field {j}")
        for j, l, _ in h.dense_pairs:
            if not (0 <= j < NUM_INT and 0 <= l < NUM_INT):
                raise ValueError(f"hidden.dense_pairs: bad int pair ({j}, {l})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SynthConfig":
        h = dict(d["hidden"])
        for k in ("first_order", "pairs", "dense", "dense_pairs"):
            h[k] = tuple(tuple(x) if isinstance(x, list) else x for x in h[k])
        return cls(tuple(CatFieldSpec(**c) for c in d["cats"]), tuple(IntFieldSpec(**i) for i in d["ints"]),
                   HiddenModelSpec(**h))


def criteo_config() -> SynthConfig:
    """The default: marginals fitted to the first 10k lines of Criteo Kaggle ``train.txt``.

    Missing rates, which fields go missing together (I1/I10, C19/C20/C25/C26,
    C3/C4/C12/C16/C21/C24, I5/I7/I9/I11, I3/I4/I13), the integers' zero rates, medians and 90th
    percentiles, the share of negative I2, the top-value frequency of every categorical and the
    full data set's cardinalities are the real ones. What is not: each categorical's frequent values
    are a short Zipf head (3-40 values, each seen >= ~0.5% of the time) and the rest a thin uniform
    tail (<= 10% of rows) over up to millions of values, where real fields have long Zipf tails.
    That keeps 200k rows enough to learn what the hidden model uses (and C7/C11/C13/C15, whose
    real top values hold only 1-2% each, come out about twice as concentrated).
    """
    A, B, C, D, E = 0, 1, 2, 3, 4  # missing groups
    cats = (
        CatFieldSpec(1_460, 1.58, 0.0, head=15, tail=0.005),
        CatFieldSpec(583, 0.47, 0.0, head=20, tail=0.01),
        CatFieldSpec(10_131_227, 0.04, 0.036, C, head=20, tail=0.1),
        CatFieldSpec(2_202_608, 0.25, 0.036, C, head=20, tail=0.08),
        CatFieldSpec(305, 2.12, 0.0, head=12, tail=0.005),
        CatFieldSpec(24, 1.71, 0.133),
        CatFieldSpec(1_000_000, 0.0, 0.0, head=40, tail=0.07),
        CatFieldSpec(633, 1.83, 0.0, head=12, tail=0.005),
        CatFieldSpec(3, 3.31, 0.0),
        CatFieldSpec(2_000_000, 0.97, 0.0, head=15, tail=0.05),
        CatFieldSpec(1_000_000, 0.0, 0.0, head=25, tail=0.05),
        CatFieldSpec(8_351_593, 0.04, 0.036, C, head=20, tail=0.1),
        CatFieldSpec(1_000_000, 0.0, 0.0, head=25, tail=0.03),
        CatFieldSpec(27, 1.28, 0.0),
        CatFieldSpec(1_000_000, 0.0, 0.0, head=25, tail=0.05),
        CatFieldSpec(5_461_306, 0.04, 0.036, C, head=20, tail=0.1),
        CatFieldSpec(10, 1.28, 0.0),
        CatFieldSpec(1_000_000, 0.12, 0.0, head=25, tail=0.03),
        CatFieldSpec(2_173, 1.88, 0.45, B, head=12, tail=0.01),
        CatFieldSpec(4, 0.51, 0.45, B),
        CatFieldSpec(7_046_547, 0.04, 0.036, C, head=20, tail=0.1),
        CatFieldSpec(18, 1.67, 0.818),
        CatFieldSpec(15, 1.43, 0.0),
        CatFieldSpec(1_000_000, 0.25, 0.036, C, head=20, tail=0.07),
        CatFieldSpec(105, 1.15, 0.45, B, head=20, tail=0.01),
        CatFieldSpec(1_000_000, 0.28, 0.45, B, head=20, tail=0.07),
    )
    ints = (
        IntFieldSpec(0.448, 0.475, 3, 15, group=A), IntFieldSpec(0.0, 0.179, 14, 318, negative=0.098),
        IntFieldSpec(0.204, 0.008, 7, 52, group=E), IntFieldSpec(0.198, 0.071, 5, 21, group=E),
        IntFieldSpec(0.049, 0.017, 2836, 33113, group=D), IntFieldSpec(0.251, 0.063, 48, 358),
        IntFieldSpec(0.049, 0.253, 5, 39, group=D), IntFieldSpec(0.001, 0.118, 10, 37),
        IntFieldSpec(0.049, 0.032, 45, 318, group=D), IntFieldSpec(0.448, 0.502, 1, 2, group=A),
        IntFieldSpec(0.049, 0.265, 2, 7, group=D), IntFieldSpec(0.773, 0.736, 1, 7),
        IntFieldSpec(0.198, 0.062, 6, 28, group=E),
    )
    hidden = HiddenModelSpec(
        # interactions among fields whose top values are frequent enough to be learned from ~200k rows
        pairs=((0, 13, 1.0), (4, 7, 1.0), (5, 16, 1.0), (7, 22, 1.0), (8, 13, 1.0), (13, 16, 1.0),
               (16, 22, 1.0), (0, 5, 1.0)),
        dense=((0, 1.0), (2, -0.8), (5, 0.8), (10, 0.8), (12, -0.8)),
        dense_pairs=((0, 5, 1.6), (2, 10, -1.6), (7, 12, 1.4)),
    )
    return SynthConfig(cats, ints, hidden)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
@dataclass
class SynthReport:
    """What ``synth_criteo`` wrote. ``probs``/``labels`` are only filled with ``return_probs=True``."""

    path: str
    rows: int
    seed: int
    positive_rate: float  # of the sampled labels (also in test format, where they are not written)
    bayes_auc: float  # AUC of the hidden model's true probabilities against the sampled labels
    bayes_logloss: float
    seconds: float
    bytes: int  # size on disk (compressed for .gz)
    text_bytes: int  # uncompressed TSV bytes
    test_format: bool = False
    bias: float = 0.0
    probs: np.ndarray | None = field(default=None, repr=False)  # [rows] float64, P(click)
    labels: np.ndarray | None = field(default=None, repr=False)  # [rows] int8 sampled labels

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("probs"), d.pop("labels")
        return d


# ---------------------------------------------------------------------------------------------
# Hashing helpers (plain Python: also the reference for the hex mapping)
# ---------------------------------------------------------------------------------------------
_M32A, _M32B = 0x85EBCA6B, 0xC2B2AE35
_M32A_INV, _M32B_INV = pow(_M32A, -1, 1 << 32), pow(_M32B, -1, 1 << 32)


def _fmix32(h: int) -> int:
    h &= _MASK32
    h ^= h >> 16
    h = (h * _M32A) & _MASK32
    h ^= h >> 13
    h = (h * _M32B) & _MASK32
    h ^= h >> 16
    return h


def _fmix32_inv(h: int) -> int:
    h ^= h >> 16
    h = (h * _M32B_INV) & _MASK32
    h ^= (h >> 13) ^ (h >> 26)
    h = (h * _M32A_INV) & _MASK32
    h ^= h >> 16
    return h


def _stream_key(seed: int, stream: int) -> int:
    return _fmix64(_fmix64((seed & _MASK64) ^ 0x6D6C666173742D73) ^ ((stream * _GOLDEN) & _MASK64))


def _hex_salt(seed: int, cat_field: int) -> int:
    return _stream_key(seed, _S_HEX + cat_field) & _MASK32


def hex_of(cat_field: int, rank: int, seed: int = 0) -> str:
    """The 8-hex text of value ``rank`` (0 = most frequent) of categorical ``cat_field`` (0-based).

    A bijection per (field, seed): distinct ranks never share a hex string.

        >>> rank_of_hex(2, hex_of(2, 12345, seed=7), seed=7)
        12345
    """
    return f"{_fmix32(rank ^ _hex_salt(seed, cat_field)):08x}"


def rank_of_hex(cat_field: int, text: str | bytes, seed: int = 0) -> int:
    """Inverse of ``hex_of``: the Zipf rank behind a categorical's hex text (may be >= cardinality
    for hex strings this generator did not write)."""
    return _fmix32_inv(int(text, 16)) ^ _hex_salt(seed, cat_field)


def ranks_of_hex_values(cat_field: int, values: np.ndarray, seed: int = 0) -> np.ndarray:
    """Vectorised ``rank_of_hex`` for already-parsed hex numbers (``int(text, 16)``) -> int64 ranks.

        >>> int(ranks_of_hex_values(0, np.array([int(hex_of(0, 99), 16)]))[0])
        99
    """
    h = np.asarray(values).astype(np.uint32)
    h ^= h >> np.uint32(16)
    h *= np.uint32(_M32B_INV)
    h ^= (h >> np.uint32(13)) ^ (h >> np.uint32(26))
    h *= np.uint32(_M32A_INV)
    h ^= h >> np.uint32(16)
    return (h ^ np.uint32(_hex_salt(seed, cat_field))).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Hidden model: parameters, numpy reference
# ---------------------------------------------------------------------------------------------
def bucket_root(x: np.ndarray) -> np.ndarray:
    """sign(b) * sqrt(|b|) of FuxiCTR's integer bucket b = floor(log(x)^2) (x > 2), else b = x.

    The hidden model reads integers only through this (about log x, but constant on each bucket),
    so a model fed the bucket or the raw value sees all the dense signal there is.

        >>> bucket_root(np.array([0, 1, 3, 2, -2, 1000])).round(3).tolist()
        [0.0, 1.0, 1.0, 1.414, -1.414, 6.856]
    """
    x = np.asarray(x, np.int64)
    b = np.where(x > 2, np.floor(np.log(np.maximum(x, 3).astype(np.float64)) ** 2), x.astype(np.float64))
    return np.sign(b) * np.sqrt(np.abs(b))


def zipf_pmf(cardinality: int, exponent: float) -> np.ndarray:
    """P(rank r) = (r + 1) ** -exponent / H, r = 0..cardinality-1."""
    w = np.arange(1, cardinality + 1, dtype=np.float64) ** -exponent
    return w / w.sum()


def _alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias table: sample j = floor(u * n), keep j if frac < prob[j] else alias[j]."""
    n = len(p)
    prob = np.empty(n, np.float64)
    alias = np.arange(n, dtype=np.int64)
    _alias_fill(p * n, prob, alias)
    return prob, alias


@nb.njit(cache=True)
def _alias_fill(scaled, prob, alias):  # pragma: no cover - numba
    n = scaled.shape[0]
    small = np.empty(n, np.int64)
    large = np.empty(n, np.int64)
    ns = 0
    nl = 0
    for i in range(n):
        if scaled[i] < 1.0:
            small[ns] = i
            ns += 1
        else:
            large[nl] = i
            nl += 1
    while ns > 0 and nl > 0:
        ns -= 1
        s = small[ns]
        l = large[nl - 1]
        prob[s] = scaled[s]
        alias[s] = l
        scaled[l] = (scaled[l] + scaled[s]) - 1.0
        if scaled[l] < 1.0:
            nl -= 1
            small[ns] = l
            ns += 1
    for i in range(nl):
        prob[large[i]] = 1.0
    for i in range(ns):  # rounding leftovers
        prob[small[i]] = 1.0


class HiddenModel:
    """The generator's tables for one (config, seed): value samplers, hidden weights, bias.

    ``logits`` is the plain-numpy reference of the hidden model; the generator computes the same
    numbers in a numba kernel.

        >>> m = HiddenModel(criteo_config(), seed=0)
        >>> ranks = np.zeros((1, 26), np.int64); ints = np.ones((1, 13), np.int64)
        >>> m.probabilities(ranks, ints, np.ones((1, 13), bool)).shape
        (1,)
    """

    def __init__(self, config: SynthConfig | None = None, seed: int = 0):
        self.config = cfg = config or criteo_config()
        self.seed = int(seed)
        h = cfg.hidden
        cards = np.array([c.cardinality for c in cfg.cats], np.int64)
        heads = np.array([c.head_size for c in cfg.cats], np.int64)
        self.cards = cards
        self.tail_mass = np.array([c.tail_mass for c in cfg.cats], np.float64)
        # per-value tables cover the head only: tail values are sampled uniformly and weigh nothing
        self.head_off = np.concatenate([[0], np.cumsum(heads)]).astype(np.int64)
        n_all = int(self.head_off[-1])
        self.alias_prob = np.empty(n_all, np.float64)
        self.alias_idx = np.empty(n_all, np.int64)
        for f, c in enumerate(cfg.cats):
            lo, hi = self.head_off[f], self.head_off[f + 1]
            self.alias_prob[lo:hi], self.alias_idx[lo:hi] = _alias_table(zipf_pmf(c.head_size, c.zipf))
        self.cat_missing = np.array([c.missing for c in cfg.cats], np.float64)
        self.hex_salt = np.array([_hex_salt(seed, f) for f in range(NUM_CAT)], np.uint32)

        ints = cfg.ints
        self.int_missing = np.array([s.missing for s in ints], np.float64)
        self.int_zero = np.array([s.zero for s in ints], np.float64)
        self.int_neg = np.array([s.negative for s in ints], np.float64)
        self.int_mu = np.log(np.array([s.median for s in ints], np.float64))
        self.int_sigma = np.maximum(
            (np.log(np.array([s.p90 for s in ints], np.float64)) - self.int_mu) / 1.2815515655446004, 1e-3)
        # z_j standardises the bucket root around the count's median, in units of its log-normal sigma.
        self.z_center = bucket_root(np.array([s.median for s in ints], np.int64))

        def groups(specs, base):
            return np.array([_stream_key(seed, _S_MISSING + (s.group if s.group >= 0 else base + i))
                             for i, s in enumerate(specs)], np.uint64)

        self.key_cat_missing = groups(cfg.cats, 100)
        self.key_int_missing = groups(cfg.ints, 200)
        self.key_cat = np.array([_stream_key(seed, _S_CAT + f) for f in range(NUM_CAT)], np.uint64)
        self.key_int = np.array([[_stream_key(seed, s + j) for s in (_S_NORMAL_A, _S_NORMAL_B, _S_ZERO, _S_NEG)]
                                 for j in range(NUM_INT)], np.uint64)
        self.key_label = np.uint64(_stream_key(seed, _S_LABEL))

        # Hidden weights from a seeded numpy generator (bit-stable across numpy versions).
        rng = np.random.default_rng([self.seed, _S_MODEL])
        fo = np.array(h.first_order if h.first_order else (1.0,) * NUM_CAT, np.float64)
        self.w1 = np.empty(n_all, np.float64)
        for f in range(NUM_CAT):
            lo, hi = self.head_off[f], self.head_off[f + 1]
            self.w1[lo:hi] = rng.standard_normal(hi - lo) * fo[f] * self._gate(f, hi - lo)
        self.w_missing = rng.standard_normal(NUM_CAT) * fo * h.missing_scale
        k = int(h.latent_dim)
        nlat = np.minimum(heads, h.latent_ranks)
        self.lat_off = np.concatenate([[0], np.cumsum(nlat)]).astype(np.int64)
        self.latent = np.empty((int(self.lat_off[-1]), k), np.float64)
        for f in range(NUM_CAT):
            lo, hi = self.lat_off[f], self.lat_off[f + 1]
            self.latent[lo:hi] = (rng.standard_normal((hi - lo, k)) / math.sqrt(k)
                                  * np.sqrt(self._gate(f, hi - lo))[:, None])
        self.pairs = np.array([(a, b) for a, b, _ in h.pairs], np.int64).reshape(-1, 2)
        self.pair_scale = np.array([s for *_, s in h.pairs], np.float64)
        self.dense_idx = np.array([j for j, _ in h.dense], np.int64)
        self.dense_coef = np.array([c for _, c in h.dense], np.float64)
        self.dense_pairs = np.array([(j, l) for j, l, _ in h.dense_pairs], np.int64).reshape(-1, 2)
        self.dense_pair_coef = np.array([c for *_, c in h.dense_pairs], np.float64)
        self.bias = 0.0
        self._calibrate()

    def _gate(self, f: int, n: int) -> np.ndarray:
        """Weight scale of the ``n`` most frequent values of field ``f``: rare values carry little
        signal, so what the hidden model uses can be learned from a few hundred thousand rows."""
        p = self.config.cats[f].head_pmf()[:n] * (1.0 - self.config.cats[f].missing)
        return p / (p + self.config.hidden.frequency_scale)

    def _calibrate(self) -> None:
        """Scale the logit's three parts to their target std and solve the bias, on the first
        ``PILOT_ROWS`` rows (fixed rows: nothing here depends on how many rows are written)."""
        h = self.config.hidden
        ranks, ints, present, _, _ = self.generate(0, PILOT_ROWS)
        first, inter, dense = self.components(ranks, ints, present)
        scales = []
        for part, target in ((first, h.first_order_std), (inter, h.interaction_std), (dense, h.dense_std)):
            sd = float(np.std(part))
            scales.append(target / sd if sd > 0 else 0.0)
        self.w1 *= scales[0]
        self.w_missing *= scales[0]
        self.pair_scale *= scales[1]
        self.dense_coef *= scales[2]
        self.dense_pair_coef *= scales[2]
        logit = first * scales[0] + inter * scales[1] + dense * scales[2]
        lo, hi = -20.0, 20.0
        for _ in range(100):  # bisection: deterministic, and mean(sigmoid(l + b)) is monotone in b
            mid = 0.5 * (lo + hi)
            if np.mean(1.0 / (1.0 + np.exp(-(logit + mid)))) < h.positive_rate:
                lo = mid
            else:
                hi = mid
        self.bias = 0.5 * (lo + hi)

    # -- reference ---------------------------------------------------------------------------
    def components(self, ranks: np.ndarray, ints: np.ndarray, int_present: np.ndarray):
        """The logit's three parts per row (first order, interactions, dense), without the bias.
        ``ranks`` [N, 26] int64 Zipf ranks (-1 = missing; ranks beyond a field's cardinality count
        as unseen values with weight 0), ``ints`` [N, 13] int64, ``int_present`` [N, 13] bool."""
        ranks = np.asarray(ranks, np.int64)
        ints = np.asarray(ints, np.int64)
        present_c = ranks >= 0
        n = ranks.shape[0]
        first = np.zeros(n, np.float64)
        for f in range(NUM_CAT):
            nh = self.head_off[f + 1] - self.head_off[f]
            r = ranks[:, f]
            known = present_c[:, f] & (r < nh)
            first += np.where(known, self.w1[self.head_off[f] + np.where(known, r, 0)], 0.0)
            first += np.where(present_c[:, f], 0.0, self.w_missing[f])
        k = self.latent.shape[1]

        def lat(f):
            nl = self.lat_off[f + 1] - self.lat_off[f]
            r = ranks[:, f]
            ok = present_c[:, f] & (r < nl)
            v = self.latent[self.lat_off[f] + np.where(ok, r, 0)]
            return np.where(ok[:, None], v, np.zeros(k))

        inter = np.zeros(n, np.float64)
        for (a, b), s in zip(self.pairs, self.pair_scale):
            inter += s * np.sum(lat(a) * lat(b), axis=1)
        z = np.where(int_present, (bucket_root(ints) - self.z_center) / self.int_sigma, 0.0)
        t = np.tanh(z)
        dense = np.zeros(n, np.float64)
        for j, c in zip(self.dense_idx, self.dense_coef):
            dense += c * t[:, j]
        for (j, l), c in zip(self.dense_pairs, self.dense_pair_coef):
            dense += c * t[:, j] * t[:, l]
        return first, inter, dense

    def logits(self, ranks: np.ndarray, ints: np.ndarray, int_present: np.ndarray) -> np.ndarray:
        """Hidden logit per row (arguments as in ``components``)."""
        first, inter, dense = self.components(ranks, ints, int_present)
        return self.bias + first + inter + dense

    def probabilities(self, ranks: np.ndarray, ints: np.ndarray, int_present: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits(ranks, ints, int_present)))

    # -- fast path ---------------------------------------------------------------------------
    def generate(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``start .. start+n-1``: (ranks [n,26], ints [n,13], int_present [n,13], logit [n],
        labels [n] int8)."""
        ranks = np.empty((n, NUM_CAT), np.int64)
        ints = np.empty((n, NUM_INT), np.int64)
        present = np.empty((n, NUM_INT), np.bool_)
        logit = np.empty(n, np.float64)
        labels = np.empty(n, np.int8)
        _generate_rows(
            np.int64(start), self.key_cat_missing, self.cat_missing, self.key_cat, self.cards, self.tail_mass, self.head_off,
            self.alias_prob, self.alias_idx, self.key_int_missing, self.int_missing, self.key_int,
            self.int_zero, self.int_neg, self.int_mu, self.int_sigma, self.key_label, self.bias,
            self.w1, self.w_missing, self.lat_off, self.latent, self.pairs, self.pair_scale,
            self.z_center, self.dense_idx, self.dense_coef, self.dense_pairs, self.dense_pair_coef,
            ranks, ints, present, logit, labels)
        return ranks, ints, present, logit, labels


# ---------------------------------------------------------------------------------------------
# numba kernels
# ---------------------------------------------------------------------------------------------
_U33 = np.uint64(33)
_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_GOLD = np.uint64(_GOLDEN)
_ONE = np.uint64(1)
_SH11 = np.uint64(11)
_INV53 = 1.0 / 9007199254740992.0


@nb.njit(cache=True, inline="always")
def _unit(key, row):
    """Uniform in [0, 1) from (stream key, row): a bijective mix of the row under the key."""
    z = key + (np.uint64(row) + _ONE) * _GOLD
    z = (z ^ (z >> _U33)) * _C1
    z = (z ^ (z >> _U33)) * _C2
    z = z ^ (z >> _U33)
    return np.float64(z >> _SH11) * _INV53


@nb.njit(cache=True, inline="always")
def _fmix32_nb(h):
    h = np.uint32(h)
    h ^= h >> np.uint32(16)
    h = np.uint32(h * np.uint32(0x85EBCA6B))
    h ^= h >> np.uint32(13)
    h = np.uint32(h * np.uint32(0xC2B2AE35))
    h ^= h >> np.uint32(16)
    return h


@nb.njit(cache=True, parallel=True)
def _generate_rows(start, key_cmiss, cmiss, key_cat, cards, tail, head_off, alias_prob, alias_idx,
                   key_imiss, imiss, key_int, izero, ineg, imu, isigma, key_label, bias,
                   w1, w_missing, lat_off, latent, pairs, pair_scale,
                   z_center, dense_idx, dense_coef, dense_pairs, dense_pair_coef,
                   ranks, ints, present, logit, labels):  # pragma: no cover - numba
    n = ranks.shape[0]
    ncat = ranks.shape[1]
    nint = ints.shape[1]
    k = latent.shape[1]
    for i in nb.prange(n):
        row = start + i
        acc = bias
        for f in range(ncat):
            if _unit(key_cmiss[f], row) < cmiss[f]:
                ranks[i, f] = -1
                acc += w_missing[f]
                continue
            nh = head_off[f + 1] - head_off[f]
            u = _unit(key_cat[f], row)
            if u < tail[f]:  # uniform over the tail ranks nh .. card-1, no weight
                nt = cards[f] - nh
                ranks[i, f] = nh + min(np.int64(u / tail[f] * nt), nt - 1)
                continue
            x = (u - tail[f]) / (1.0 - tail[f]) * nh
            j = min(np.int64(x), nh - 1)
            frac = x - j
            r = j if frac < alias_prob[head_off[f] + j] else alias_idx[head_off[f] + j]
            ranks[i, f] = r
            acc += w1[head_off[f] + r]
        for p in range(pairs.shape[0]):
            a = pairs[p, 0]
            b = pairs[p, 1]
            ra = ranks[i, a]
            rb = ranks[i, b]
            if ra < 0 or rb < 0 or ra >= lat_off[a + 1] - lat_off[a] or rb >= lat_off[b + 1] - lat_off[b]:
                continue
            s = 0.0
            for d in range(k):
                s += latent[lat_off[a] + ra, d] * latent[lat_off[b] + rb, d]
            acc += pair_scale[p] * s
        for j in range(nint):
            if _unit(key_imiss[j], row) < imiss[j]:
                present[i, j] = False
                ints[i, j] = 0
                continue
            present[i, j] = True
            un = _unit(key_int[j, 3], row)
            if un < ineg[j]:
                v = un / ineg[j]
                ints[i, j] = -1 if v < 0.8 else (-2 if v < 0.95 else -3)
            elif _unit(key_int[j, 2], row) < izero[j]:
                ints[i, j] = 0
            else:
                u1 = 1.0 - _unit(key_int[j, 0], row)  # (0, 1]: log is finite
                u2 = _unit(key_int[j, 1], row)
                g = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
                val = math.floor(math.exp(imu[j] + isigma[j] * g))
                ints[i, j] = np.int64(min(max(val, 1.0), 2147483647.0))
        for q in range(dense_idx.shape[0]):
            j = dense_idx[q]
            if present[i, j]:
                acc += dense_coef[q] * math.tanh((_bucket_root_nb(ints[i, j]) - z_center[j]) / isigma[j])
        for q in range(dense_pairs.shape[0]):
            j = dense_pairs[q, 0]
            l = dense_pairs[q, 1]
            if present[i, j] and present[i, l]:
                tj = math.tanh((_bucket_root_nb(ints[i, j]) - z_center[j]) / isigma[j])
                tl = math.tanh((_bucket_root_nb(ints[i, l]) - z_center[l]) / isigma[l])
                acc += dense_pair_coef[q] * tj * tl
        logit[i] = acc
        labels[i] = 1 if _unit(key_label, row) * (1.0 + math.exp(-acc)) < 1.0 else 0


@nb.njit(cache=True, inline="always")
def _bucket_root_nb(x):
    b = math.floor(math.log(x) ** 2) if x > 2 else float(x)
    return math.sqrt(b) if b >= 0 else -math.sqrt(-b)


@nb.njit(cache=True, inline="always")
def _int_len(v):
    n = 1
    if v < 0:
        n = 2
        v = -v
    while v >= 10:
        v //= 10
        n += 1
    return n


@nb.njit(cache=True, parallel=True)
def _line_lengths(ints, present, ranks, with_label, out):  # pragma: no cover - numba
    for i in nb.prange(ints.shape[0]):
        n = 38 + (2 if with_label else 0)  # 38 tabs between 39 fields (+ label and its tab) ...
        n += 1  # ... and the newline
        for j in range(ints.shape[1]):
            if present[i, j]:
                n += _int_len(ints[i, j])
        for f in range(ranks.shape[1]):
            if ranks[i, f] >= 0:
                n += 8
        out[i] = n


_HEX = np.frombuffer(b"0123456789abcdef", np.uint8).copy()


@nb.njit(cache=True, parallel=True)
def _format_rows(ints, present, ranks, labels, with_label, salts, hexd, offsets, buf):  # pragma: no cover
    for i in nb.prange(ints.shape[0]):
        p = offsets[i]
        if with_label:
            buf[p] = 48 + labels[i]
            buf[p + 1] = 9
            p += 2
        for j in range(ints.shape[1]):
            if present[i, j]:
                v = ints[i, j]
                if v < 0:
                    buf[p] = 45  # '-'
                    p += 1
                    v = -v
                m = _int_len(v)
                for d in range(m - 1, -1, -1):
                    buf[p + d] = 48 + v % 10
                    v //= 10
                p += m
            buf[p] = 9
            p += 1
        nc = ranks.shape[1]
        for f in range(nc):
            r = ranks[i, f]
            if r >= 0:
                h = _fmix32_nb(np.uint32(r) ^ salts[f])
                for d in range(8):
                    buf[p + 7 - d] = hexd[(h >> np.uint32(4 * d)) & np.uint32(15)]
                p += 8
            buf[p] = 9 if f < nc - 1 else 10
            p += 1


@nb.njit(cache=True)
def _accumulate(logit, labels, hist_pos, hist_neg, acc, lo, inv_width):  # pragma: no cover - numba
    """Serial on purpose: the running sums see rows in file order, whatever the chunking."""
    nb_ = hist_pos.shape[0]
    for i in range(logit.shape[0]):
        x = logit[i]
        y = labels[i]
        loss = max(x, 0.0) + math.log1p(math.exp(-abs(x))) - y * x  # -log likelihood, stable
        t = loss - acc[1]  # Kahan
        s = acc[0] + t
        acc[1] = (s - acc[0]) - t
        acc[0] = s
        b = np.int64((x - lo) * inv_width)
        b = min(max(b, 0), nb_ - 1)
        if y:
            hist_pos[b] += 1
        else:
            hist_neg[b] += 1


def _auc_from_hist(hist_pos: np.ndarray, hist_neg: np.ndarray) -> float:
    """AUC of binned scores, pairs in one bin counted 1/2. With 2^20 bins of 3e-5 logit units the
    binning moves the AUC by at most half the probability that a positive and a negative share a bin
    (~1e-5 for Criteo-like logit densities)."""
    pos = hist_pos.astype(np.float64)
    neg = hist_neg.astype(np.float64)
    neg_below = np.cumsum(neg) - neg
    npos, nneg = pos.sum(), neg.sum()
    if npos == 0 or nneg == 0:
        return float("nan")
    return float((np.sum(pos * neg_below) + 0.5 * np.sum(pos * neg)) / (npos * nneg))


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def synth_criteo(
    path: str | os.PathLike,
    rows: int,
    seed: int = 0,
    *,
    test_format: bool = False,
    config: SynthConfig | None = None,
    chunk_rows: int = 100_000,
    return_probs: bool = False,
    gzip_level: int = 6,
    sidecar: bool = True,
) -> SynthReport:
    """Write ``rows`` Criteo-format lines to ``path`` (gzip if it ends in ``.gz``) and a
    ``<path>.synth.json`` sidecar (report + config); return the report.

    Memory is bounded by ``chunk_rows`` (the Bayes AUC is streamed through a logit histogram)
    unless ``return_probs`` asks for the per-row probabilities and labels.

        >>> rep = synth_criteo("/tmp/synth_doc.tsv.gz", 5_000, seed=3, return_probs=True)
        >>> rep.probs.shape, rep.text_bytes > rep.bytes
        ((5000,), True)
    """
    if rows < 0 or chunk_rows < 1:
        raise ValueError(f"rows must be >= 0 and chunk_rows >= 1, got rows={rows}, chunk_rows={chunk_rows}")
    t0 = time.perf_counter()
    path = Path(path)
    model = HiddenModel(config, seed)
    with_label = not test_format
    hist_pos = np.zeros(AUC_BINS, np.int64)
    hist_neg = np.zeros(AUC_BINS, np.int64)
    acc = np.zeros(2, np.float64)
    lo, inv_width = -AUC_LOGIT_RANGE, AUC_BINS / (2.0 * AUC_LOGIT_RANGE)
    probs = np.empty(rows, np.float64) if return_probs else None
    labels_all = np.empty(rows, np.int8) if return_probs else None
    n_pos = 0
    text_bytes = 0
    raw = open(path, "wb")
    # mtime=0 and no file name in the header: the same rows give the same .gz bytes.
    out = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=gzip_level, mtime=0) \
        if path.suffix == ".gz" else raw
    try:
        for start in range(0, rows, chunk_rows):
            n = min(chunk_rows, rows - start)
            ranks, ints, present, logit, labels = model.generate(start, n)
            lengths = np.empty(n, np.int64)
            _line_lengths(ints, present, ranks, with_label, lengths)
            offsets = np.zeros(n, np.int64)
            np.cumsum(lengths[:-1], out=offsets[1:])
            buf = np.empty(int(lengths.sum()), np.uint8)
            _format_rows(ints, present, ranks, labels, with_label, model.hex_salt, _HEX, offsets, buf)
            out.write(memoryview(buf))
            text_bytes += buf.size
            _accumulate(logit, labels, hist_pos, hist_neg, acc, lo, inv_width)
            n_pos += int(labels.sum(dtype=np.int64))
            if return_probs:
                probs[start:start + n] = 1.0 / (1.0 + np.exp(-logit))
                labels_all[start:start + n] = labels
    finally:
        if out is not raw:
            out.close()
        raw.close()
    rep = SynthReport(
        path=str(path), rows=int(rows), seed=int(seed),
        positive_rate=n_pos / rows if rows else float("nan"),
        bayes_auc=_auc_from_hist(hist_pos, hist_neg),
        bayes_logloss=float(acc[0] / rows) if rows else float("nan"),
        seconds=0.0, bytes=path.stat().st_size, text_bytes=int(text_bytes), test_format=bool(test_format),
        bias=float(model.bias), probs=probs, labels=labels_all,
    )
    rep.seconds = time.perf_counter() - t0
    if sidecar:
        write_sidecar(rep, model.config)
    return rep


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".synth.json")


def write_sidecar(report: SynthReport, config: SynthConfig) -> Path:
    p = sidecar_path(report.path)
    doc = {"generator": "mlfast.io.synth.synth_criteo", "version": GENERATOR_VERSION,
           "report": report.to_dict(), "config": config.to_dict()}
    p.write_text(json.dumps(doc, indent=1) + "\n")
    return p


def read_sidecar(path: str | os.PathLike) -> tuple[SynthReport, SynthConfig]:
    """The report and config stored next to a generated file (``path`` is the data file).

        >>> rep, cfg = read_sidecar("/tmp/synth_example.tsv")  # doctest: +SKIP
    """
    doc = json.loads(sidecar_path(path).read_text())
    return SynthReport(**doc["report"]), SynthConfig.from_dict(doc["config"])


__all__ = [
    "CatFieldSpec", "IntFieldSpec", "HiddenModelSpec", "SynthConfig", "SynthReport", "HiddenModel",
    "criteo_config", "synth_criteo", "hex_of", "rank_of_hex", "ranks_of_hex_values", "zipf_pmf", "read_sidecar",
    "write_sidecar", "sidecar_path", "bucket_root",
]
