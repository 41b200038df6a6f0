"""The C++ hash, bucket reduction, integer features and field grammar against their definitions
(mlfast/hashing.py and tests/reference_reader.py), on random values."""
from __future__ import annotations

import numpy as np
import pytest

import reference_reader as ref
from mlfast import _native
from mlfast.io import hashing

U64 = (1 << 64) - 1
EDGE_U64 = [0, 1, 2, 0xFFFFFFFF, 1 << 32, (1 << 63) - 1, 1 << 63, U64, hashing.GOLDEN64, 0xDEADBEEF]


def random_u64(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 1 << 64, size=n, dtype=np.uint64, endpoint=False)


@pytest.mark.parametrize("seed_kind", ["zero", "small", "random", "max"])
def test_hash_keys_match_definition(np_rng, seed_kind):
    seed = {"zero": 0, "small": 7, "random": int(random_u64(np_rng, 1)[0]), "max": U64}[seed_kind]
    values = np.concatenate([np.asarray(EDGE_U64, np.uint64), random_u64(np_rng, 300)])
    # Criteo ids 1..39, Avazu columns and hour fields, and arbitrary large ids.
    field_ids = list(range(1, 40)) + [101, 102, 103] + [int(x) for x in np_rng.integers(0, 1 << 62, size=5)]
    for fid in field_ids:
        got = _native.hash_keys(values, seed, fid)
        want = [hashing.hash_key(int(v), seed, fid) for v in values]
        assert got.tolist() == want, (seed, fid)


def test_bucket_reduction_is_exact_modulo(np_rng):
    keys = np.concatenate([np.asarray(EDGE_U64, np.uint64), random_u64(np_rng, 2000)])
    buckets = [1, 2, 3, 7, 1000, 1 << 17, 1000003, (1 << 31) - 1, 1 << 31, (1 << 33) + 1, (1 << 40) - 1,
               (1 << 62) - 57, (1 << 63) - 1, U64] + [int(x) for x in np_rng.integers(1, 1 << 63, size=40)]
    for b in buckets:
        # hash_keys with buckets reduces the same keys the reader does; check against Python's %.
        got = _native.hash_keys(keys, 5, 14, b)
        want = [hashing.hash_key(int(k), 5, 14) % b for k in keys]
        assert got.tolist() == want, b


def test_text_hash_matches_fnv1a(np_rng):
    texts = ["", "a", "1fbe01fe", "广告", "x" * 1000, "\x00", "a,b"] + [
        bytes(np_rng.integers(32, 127, size=int(np_rng.integers(0, 40)), dtype=np.uint8)).decode() for _ in range(200)]
    for fid in (6, 24, 19):
        got = _native.hash_text(texts, 99, fid)
        assert got.tolist() == [hashing.hash_key(hashing.text_value(t), 99, fid) for t in texts]


def test_fnv1a_known_vectors():
    # Published FNV-1a 64 test vectors (pin the definition itself, not just agreement).
    assert hashing.fnv1a64(b"") == 0xCBF29CE484222325
    assert hashing.fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert hashing.fnv1a64(b"foobar") == 0x85944171F73967E8


def test_integer_features_match_definition(np_rng):
    table = _native.INT_TABLE_SIZE
    xs = [0, 1, 2, 3, 4, 20, 21, -1, -2, -3, -4, table - 1, table, table + 1, (1 << 63) - 1, -(1 << 63),
          -(1 << 63) + 1, 1 << 53, (1 << 53) + 1]
    xs += [int(v) for v in np_rng.integers(0, table, size=3000)]
    xs += [int(v) for v in np_rng.integers(-(1 << 63), (1 << 63) - 1, size=3000)]
    xs += [int(v) for v in np.exp(np_rng.uniform(0, 43, size=3000)).astype(np.int64)]
    dense, bucket = _native.int_features(np.asarray(xs, np.int64))
    assert bucket.tolist() == [hashing.fuxictr_int_bucket(x) for x in xs]
    np.testing.assert_array_equal(dense, np.asarray([hashing.signed_log1p(x) for x in xs], np.float64).astype(np.float32))


def _reference_value(kind: str, b: bytes):
    parse = {"int": ref.parse_int, "hex": ref.parse_hex, "float": ref.parse_float, "hour": ref.parse_hour,
             "label": ref.parse_label, "text": ref.parse_text}[kind]
    try:
        return None, parse(b)
    except ref.BadValue as e:
        return e.reason, None


@pytest.mark.parametrize("kind,alphabet,max_len", [
    ("int", b"0123456789+-a ", 24),
    ("hex", b"0123456789abcdefABCDEFgxz-", 11),
    ("float", b"0123456789+-.eE nai", 12),
    ("hour", b"0123456789", 9),
    ("label", b"01.2", 3),
    ("text", b"ab\x80\xbf\xc2\xdf\xe0\xed\xa0\xf0\xf4\x90\x8f\xff", 6),
])
def test_field_grammar_matches_reference(np_rng, kind, alphabet, max_len):
    pool = np.frombuffer(alphabet, np.uint8)
    samples = [bytes(np_rng.choice(pool, size=int(np_rng.integers(0 if kind != "hex" else 1, max_len + 1))))
               for _ in range(4000)]
    if kind == "float":
        samples += [b"1e-400", b"-1e-400", b"5e-324", b"1e308", b"1.8e308", b"0.000", b".5", b"5.", b"-.5e+3"]
    if kind == "hour":
        samples += [b"00010100", b"00022900", b"01022900", b"99123123", b"14102100", b"14022900", b"16022923"]
    if kind == "int":
        samples += [b"9223372036854775807", b"9223372036854775808", b"-9223372036854775808", b"00000000000000000000001"]
    for b in samples:
        reason, value = _native.parse_value(kind, b)
        want_reason, want = _reference_value(kind, b)
        assert reason == want_reason, b
        if kind == "text" and want is not None:
            want = hashing.fnv1a64(b)
        if kind == "float" and want is not None:
            assert value == want and np.signbit(value) == np.signbit(want), b
        else:
            assert value == (list(want) if isinstance(want, tuple) else want) or value == want, b


def test_every_hour_of_the_century():
    import datetime

    day, end = datetime.date(2000, 1, 1), datetime.date(2099, 12, 31)
    while day <= end:
        hh = day.toordinal() % 24
        text = f"{day:%y%m%d}{hh:02d}".encode()
        assert _native.parse_value("hour", text) == (None, (hh, day.weekday(), int(day.weekday() >= 5))), text
        day += datetime.timedelta(days=1)


def test_decimal_floats_round_like_python(np_rng):
    for _ in range(5000):
        digits = "".join(np_rng.choice(list("0123456789"), size=int(np_rng.integers(1, 26))))
        point = int(np_rng.integers(0, len(digits) + 1))
        mantissa = digits[:point] + "." + digits[point:] if np_rng.random() < 0.7 else digits
        exp = f"e{int(np_rng.integers(-340, 320))}" if np_rng.random() < 0.6 else ""
        text = ("-" if np_rng.random() < 0.3 else "") + mantissa + exp
        reason, value = _native.parse_value("float", text.encode())
        want = float(text)
        if want in (float("inf"), float("-inf")):
            assert reason == "bad_float", text
        else:
            assert reason is None and value == want and np.signbit(value) == np.signbit(want), text
