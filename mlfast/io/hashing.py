"""Feature hashing: the documented, seeded 64-bit hash of (field, value) every reader uses.

This pure-Python module is the *definition*; the C++ reader (``csrc/``) implements the same
arithmetic and the tests check that both agree bit for bit.

For a field with stable id ``field_id`` (Criteo: I1..I13 -> 1..13, C1..C26 -> 14..39; other
formats: the 1-based column number in the input) and a seed::

    salt(seed, field_id) = fmix64(seed XOR (field_id * 0x9E3779B97F4A7C15 mod 2^64))
    key(value)           = fmix64(value_u64 XOR salt)                     # 64-bit, pre-modulo
    row                  = field_offsets[f] + 1 + key % buckets[f]        # row 0 of a field = missing

where ``fmix64`` is MurmurHash3's 64-bit finaliser and ``value_u64`` is

* Criteo categoricals (1-8 hex digits): the hex number, ``int(text, 16)``;
* integers (e.g. FuxiCTR-bucketed I1..I13): the integer's two's-complement 64-bit pattern;
* any other text (Avazu, generic logs): ``fnv1a64(utf-8 bytes)``.

The 64-bit ``key`` is also what vocabulary mode counts, so hashing and vocabularies share one
definition of "the same value".
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN64 = 0x9E3779B97F4A7C15
FNV_OFFSET64 = 0xCBF29CE484222325
FNV_PRIME64 = 0x100000001B3

# Default buckets per field kind (the row 0 reserved for "missing" comes on top).
DEFAULT_CATEGORICAL_BUCKETS = 1 << 17
DEFAULT_INTEGER_BUCKETS = 1 << 10


def fmix64(k: int) -> int:
    """MurmurHash3's 64-bit finaliser (a bijection on 64-bit integers)."""
    k &= MASK64
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & MASK64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & MASK64
    k ^= k >> 33
    return k


def fnv1a64(data: bytes) -> int:
    """64-bit FNV-1a of a byte string: the value of a non-hex categorical."""
    h = FNV_OFFSET64
    for b in data:
        h ^= b
        h = (h * FNV_PRIME64) & MASK64
    return h


def field_salt(seed: int, field_id: int) -> int:
    return fmix64((seed & MASK64) ^ ((field_id * GOLDEN64) & MASK64))


def hash_key(value_u64: int, seed: int, field_id: int) -> int:
    """The 64-bit key of a value in a field (before the bucket modulo)."""
    return fmix64((value_u64 & MASK64) ^ field_salt(seed, field_id))


def hex_value(text: str) -> int:
    return int(text, 16)


def int_value(x: int) -> int:
    return x & MASK64


def text_value(text: str | bytes) -> int:
    return fnv1a64(text.encode("utf-8") if isinstance(text, str) else text)


def fuxictr_int_bucket(x: int) -> int:
    """FuxiCTR's Criteo integer bucketing: floor(log(x)^2) for x > 2, else x."""
    return int(math.floor(math.log(x) ** 2)) if x > 2 else x


def signed_log1p(x: float) -> float:
    """Dense transform of a Criteo integer: log(1+x) for x >= 0 and -log(1-x) for x < 0.

    Monotone, 0 at 0, and keeps negative values (I2 can be -1, -2, -3) apart from 0.
    """
    return math.log1p(x) if x >= 0 else -math.log1p(-x)


def resolve_buckets(buckets: int | Sequence[int] | None, kinds: Sequence[str]) -> list[int]:
    """Per-field bucket counts from one number, a list, or None (per-kind defaults).

    ``kinds`` holds "int" or "cat" per output field.
    """
    if buckets is None:
        out = [DEFAULT_INTEGER_BUCKETS if k == "int" else DEFAULT_CATEGORICAL_BUCKETS for k in kinds]
    elif isinstance(buckets, (int, np.integer)):
        out = [int(buckets)] * len(kinds)
    else:
        out = [int(b) for b in buckets]
        if len(out) != len(kinds):
            raise ValueError(f"hash_buckets has {len(out)} entries, expected one per field ({len(kinds)})")
    for i, b in enumerate(out):
        if b < 1:
            raise ValueError(f"hash_buckets[{i}] must be >= 1, got {b}")
    return out


def field_offsets_for(buckets: Sequence[int]) -> np.ndarray:
    """[F+1] int64 offsets of a flat table where field f has buckets[f] + 1 rows (row 0 = missing)."""
    sizes = np.asarray(buckets, dtype=np.int64) + 1
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def row_id(key: int | None, field: int, offsets: np.ndarray, buckets: Sequence[int]) -> int:
    """Global row of a 64-bit key (None = missing) in output field ``field``."""
    base = int(offsets[field])
    return base if key is None else base + 1 + key % int(buckets[field])
