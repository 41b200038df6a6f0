"""Bad input: every rejected case names file, line, field and the offending text, or is skipped
and counted; random byte damage agrees with the reference line for line; nothing crashes."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

import reference_reader as ref
from mlfast.io import reader

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets_raw"
CRITEO = DATA / "paddlerec_criteo_tiny" / "part-0.txt"
AVAZU = DATA / "avazu_head10k" / "avazu_train_head10k.csv"
TAOBAO = DATA / "taobao_ad_tiny_fuxictr" / "train_sample.csv"

pytestmark = pytest.mark.skipif(not CRITEO.exists(), reason="shared/datasets_raw not present")

# Column index in a 40-field Criteo train line: label 0, I1..I13 = 1..13, C1..C26 = 14..39.
I = {f"I{i}": i for i in range(1, 14)}
C = {f"C{j}": 13 + j for j in range(1, 27)}


def good_lines(path: Path, n: int) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:n]


def with_field(line: bytes, index: int, value: bytes, sep: bytes = b"\t") -> bytes:
    cells = line.split(sep)
    cells[index] = value
    return sep.join(cells)


def write(tmp_path: Path, lines: list[bytes], name: str = "bad.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


CRITEO_CASES = [
    # (case, column, new bytes, reason, shown text)
    ("label_2", 0, b"2", "bad_label", "'2'"),
    ("label_empty", 0, b"", "bad_label", "''"),
    ("label_float", 0, b"1.0", "bad_label", "'1.0'"),
    ("int_letters", I["I3"], b"12a", "bad_integer", "'12a'"),
    ("int_sign_only", I["I3"], b"-", "bad_integer", "'-'"),
    ("int_decimal", I["I5"], b"1.5", "bad_integer", "'1.5'"),
    ("int_space", I["I5"], b" 15", "bad_integer", "' 15'"),
    ("int_overflow", I["I5"], b"9223372036854775808", "integer_overflow", "'9223372036854775808'"),
    ("int_underflow", I["I5"], b"-9223372036854775809", "integer_overflow", "'-9223372036854775809'"),
    ("int_24_digits", I["I13"], b"123456789012345678901234", "integer_overflow", "'123456789012345678901234'"),
    ("int_long_then_letter", I["I13"], b"12345678901234567890123x", "bad_integer", "'12345678901234567890123x'"),
    ("hex_not_hex", C["C7"], b"zz12", "bad_categorical", "'zz12'"),
    ("hex_over_long", C["C7"], b"123456789", "bad_categorical", "'123456789'"),
    ("hex_prefix", C["C7"], b"0x12", "bad_categorical", "'0x12'"),
    ("hex_non_utf8", C["C3"], b"\xff\xfe", "bad_categorical", r"'\xff\xfe'"),
    ("int_non_utf8", I["I2"], b"\xc3\x28", "bad_integer", r"'\xc3('"),
    ("hex_nul", C["C1"], b"ab\x00d", "bad_categorical", r"'ab\x00d'"),
    ("hex_inner_cr", C["C26"], b"ab\rcd", "bad_categorical", r"'ab\rcd'"),
]
EXPECTED_WORDS = {"bad_label": "0 or 1", "bad_integer": "an integer", "integer_overflow": "int64 range",
                  "bad_categorical": "1-8 hex digits", "bad_float": "finite decimal", "bad_hour": "YYMMDDHH",
                  "invalid_utf8": "UTF-8"}


def field_name(column: int) -> str:
    return "label" if column == 0 else f"I{column}" if column <= 13 else f"C{column - 13}"


@pytest.mark.parametrize("case,column,value,reason,shown", CRITEO_CASES, ids=[c[0] for c in CRITEO_CASES])
def test_criteo_bad_field(tmp_path, case, column, value, reason, shown):
    lines = good_lines(CRITEO, 5)
    lines[2] = with_field(lines[2], column, value)
    path = write(tmp_path, lines)
    with pytest.raises(reader.ParseError) as info:
        reader.read_criteo(path, format="train", cache=False)
    e = info.value
    name = field_name(column)
    assert (e.path, e.line, e.field, e.reason, e.text) == (str(path), 3, name, reason, value)
    msg = str(e)
    assert str(path) in msg and "line 3" in msg and f"field {name}" in msg and f"[{reason}]" in msg
    assert shown in msg and EXPECTED_WORDS[reason] in msg
    assert isinstance(e, ValueError)

    d = reader.read_criteo(path, format="train", on_bad_line="skip", cache=False)
    assert d.num_rows == 4 and d.skipped == {reason: 1}
    good = reader.read_criteo(write(tmp_path, lines[:2] + lines[3:], "good.txt"), cache=False)
    np.testing.assert_array_equal(d.sparse, good.sparse)
    np.testing.assert_array_equal(d.dense, good.dense)
    r = ref.criteo(path, fmt="train", on_bad_line="skip")
    assert dict(r.skipped) == d.skipped
    np.testing.assert_array_equal(d.sparse, r.sparse())


@pytest.mark.parametrize("value", [b"9223372036854775807", b"-9223372036854775808", b"+5", b"-0", b"007",
                                   b"0000000000000000000000000042", b"-12345678"])
def test_criteo_integer_edges_are_valid(tmp_path, value):
    lines = good_lines(CRITEO, 3)
    lines[1] = with_field(with_field(lines[1], I["I4"], value), C["C9"], b"AbCdEf12")
    path = write(tmp_path, lines)
    d = reader.read_criteo(path, cache=False)
    r = ref.criteo(path)
    np.testing.assert_array_equal(d.sparse, r.sparse())
    np.testing.assert_array_equal(d.dense, r.dense_array())
    assert d.dense[1, 3] == np.float32(ref.hashing.signed_log1p(int(value)))


@pytest.mark.parametrize("cells,found,field,where", [
    (39, 39, "C26", "field C26"),  # the last field missing
    (41, 41, "C26", "after field C26"),  # one extra
    (1, 1, "I1", "field I1"),  # one field: everything from I1 on is missing
])
def test_criteo_field_count(tmp_path, cells, found, field, where):
    lines = good_lines(CRITEO, 4)
    parts = lines[1].split(b"\t")
    lines[1] = b"\t".join((parts + [b"extra"])[:cells])
    path = write(tmp_path, lines)
    with pytest.raises(reader.ParseError) as info:
        reader.read_criteo(path, format="train", cache=False)
    e = info.value
    assert (e.line, e.field, e.reason) == (2, field, "field_count")
    assert f"line 2, {where}: found {found} fields, expected 40 tab-separated fields" in str(e)
    d = reader.read_criteo(path, format="train", on_bad_line="skip", cache=False)
    assert d.num_rows == 3 and d.skipped == {"field_count": 1}


def test_field_count_wins_over_a_bad_field(tmp_path):
    lines = good_lines(CRITEO, 3)
    lines[1] = with_field(lines[1], C["C1"], b"zz").rsplit(b"\t", 1)[0]  # bad C1 and a field short
    path = write(tmp_path, lines)
    with pytest.raises(reader.ParseError) as info:
        reader.read_criteo(path, format="train", cache=False)
    assert (info.value.line, info.value.reason) == (2, "field_count")


def test_first_bad_line_in_a_later_block_on_many_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "MIN_RANGE_BYTES", 1024)
    lines = good_lines(CRITEO, 100) * 20  # 2000 lines, ~480 KB
    lines[1899] = with_field(lines[1899], C["C2"], b"nothex")
    lines[1732] = with_field(lines[1732], I["I7"], b"7e3")
    path = write(tmp_path, lines)
    for threads, chunk in ((1, 1 << 26), (4, 50_000), (3, 7_777)):
        with pytest.raises(reader.ParseError) as info:
            reader.read_criteo(path, cache=False, num_threads=threads, chunk_bytes=chunk)
        assert (info.value.line, info.value.field, info.value.reason) == (1733, "I7", "bad_integer")
        d = reader.read_criteo(path, cache=False, num_threads=threads, chunk_bytes=chunk, on_bad_line="skip")
        assert d.num_rows == 1998 and d.skipped == {"bad_integer": 1, "bad_categorical": 1}
    chunks = list(reader.iter_criteo_chunks(path, chunk_bytes=30_000, on_bad_line="skip", num_threads=2))
    assert sum(len(c) for c in chunks) == 1998
    assert sum(sum(c.skipped.values()) for c in chunks) == 2


def test_random_damage_agrees_with_reference(tmp_path, np_rng, monkeypatch):
    monkeypatch.setattr(reader, "MIN_RANGE_BYTES", 512)
    base = bytearray(b"\n".join(good_lines(CRITEO, 60)) + b"\n")
    alphabet = np.frombuffer(b"\t\n\r0123456789abcdefABCDEF-+x. \x00\xff\xc3", np.uint8)
    reasons = set()
    for trial in range(40):
        data = bytearray(base)
        if trial == 0:  # labels are 1 byte in ~200 per line: random damage alone misses them ~2% of runs
            data[0] = ord("2")
        else:
            for pos in np_rng.integers(0, len(data), size=int(np_rng.integers(1, 40))):
                data[pos] = int(np_rng.choice(alphabet))
        path = tmp_path / f"damaged{trial}.txt"
        path.write_bytes(bytes(data))
        r = ref.criteo(path, fmt="train", on_bad_line="skip")
        d = reader.read_criteo(path, format="train", on_bad_line="skip", cache=False,
                               num_threads=int(np_rng.integers(1, 4)))
        assert d.skipped == dict(r.skipped), trial
        reasons |= set(d.skipped)
        np.testing.assert_array_equal(d.sparse, r.sparse())
        np.testing.assert_array_equal(d.dense, r.dense_array())
        np.testing.assert_array_equal(d.labels, r.label_array())
        try:
            ref.criteo(path, fmt="train")
            expected = None
        except ref.BadLine as bad:
            expected = (bad.line, bad.field, bad.reason)
        try:
            reader.read_criteo(path, format="train", cache=False)
            got = None
        except reader.ParseError as e:
            got = (e.line, e.field, e.reason)
        assert got == expected, trial
    # The damage reached every kind of check a Criteo line has.
    assert {"field_count", "bad_integer", "bad_categorical", "bad_label"} <= reasons


AVAZU_CASES = [
    # (case, column name, new bytes, reason)
    ("site_id_non_utf8", "site_id", b"1fbe\xff01fe", "invalid_utf8"),
    ("overlong_utf8", "app_id", b"\xc0\xaf", "invalid_utf8"),
    ("surrogate_utf8", "device_model", b"\xed\xa0\x80", "invalid_utf8"),
    ("hour_7_digits", "hour", b"1410210", "bad_hour"),
    ("hour_feb_30", "hour", b"14023000", "bad_hour"),
    ("hour_24", "hour", b"14102124", "bad_hour"),
    ("hour_letters", "hour", b"1410z100", "bad_hour"),
    ("hour_empty", "hour", b"", "bad_hour"),
    ("click_2", "click", b"2", "bad_label"),
]


@pytest.mark.parametrize("case,column,value,reason", AVAZU_CASES, ids=[c[0] for c in AVAZU_CASES])
def test_avazu_bad_field(tmp_path, case, column, value, reason):
    lines = good_lines(AVAZU, 6)
    lines[4] = with_field(lines[4], ref.AVAZU_COLUMNS.index(column), value, b",")
    path = write(tmp_path, lines, "bad.csv")
    with pytest.raises(reader.ParseError) as info:
        reader.read_avazu(path, cache=False)
    e = info.value
    assert (e.line, e.field, e.reason) == (5, column, reason)
    assert f"line 5, field {column}" in str(e) and EXPECTED_WORDS[reason] in str(e)
    d = reader.read_avazu(path, on_bad_line="skip", cache=False)
    assert d.num_rows == 4 and d.skipped == {reason: 1}


def test_avazu_valid_text_is_any_utf8(tmp_path):
    lines = good_lines(AVAZU, 4)
    lines[2] = with_field(lines[2], ref.AVAZU_COLUMNS.index("site_id"), "广告€𝄞".encode(), b",")
    path = write(tmp_path, lines, "utf8.csv")
    d = reader.read_avazu(path, cache=False)
    np.testing.assert_array_equal(d.sparse, ref.avazu(path).sparse())


@pytest.mark.parametrize("value,reason", [(b"abc", "bad_float"), (b"1e999", "bad_float"), (b"nan", "bad_float"),
                                          (b"inf", "bad_float"), (b"1.2.3", "bad_float"), (b" 1", "bad_float"),
                                          (b"1_000", "bad_float"), (b"0x1p3", "bad_float")])
def test_delimited_bad_float(tmp_path, value, reason):
    lines = good_lines(TAOBAO, 5)
    lines[3] = with_field(lines[3], 9, value, b",")  # price
    path = write(tmp_path, lines, "bad.csv")
    schema = reader.DelimitedSchema(label="clk", numeric=["price"], categorical=["userid"])
    with pytest.raises(reader.ParseError) as info:
        reader.read_delimited(path, schema, cache=False)
    assert (info.value.line, info.value.field, info.value.reason) == (4, "price", reason)
    d = reader.read_delimited(path, schema, on_bad_line="skip", cache=False)
    assert d.num_rows == 3 and d.skipped == {reason: 1}


def test_missing_file_directory_empty_and_blank(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        reader.read_criteo(tmp_path / "nope.txt", cache=False)
    with pytest.raises(IsADirectoryError, match=re.escape(str(tmp_path))):
        reader.read_criteo(tmp_path, cache=False)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    for fn in (reader.read_criteo, reader.read_avazu, reader.read):
        with pytest.raises(ValueError, match="empty.txt: empty file"):
            fn(empty, cache=False)
    with pytest.raises(ValueError, match="empty.txt: empty file"):
        list(reader.iter_criteo_chunks(empty))
    blank = tmp_path / "blank.txt"
    blank.write_bytes(b"\n\r\n\n")
    with pytest.raises(ValueError, match="blank.txt: no data lines"):
        reader.read_criteo(blank, cache=False)
    # Forced format: blank lines are never an error, just counted.
    d = reader.read_criteo(blank, format="train", cache=False)
    assert d.num_rows == 0 and d.skipped == {"blank_line": 3} and d.sparse.shape == (0, 39)


def test_avazu_without_header_needs_header_false(tmp_path):
    nohead = DATA / "avazu_head10k" / "test_part_1000_noheader.csv"
    with pytest.raises(ValueError, match="header=False"):
        reader.read_avazu(nohead, cache=False)


def test_huge_field_is_reported_truncated(tmp_path):
    lines = good_lines(CRITEO, 3)
    lines[1] = with_field(lines[1], C["C5"], b"f" * 1_000_000)
    path = write(tmp_path, lines)
    with pytest.raises(reader.ParseError) as info:
        reader.read_criteo(path, cache=False, chunk_bytes=4096)
    e = info.value
    assert (e.line, e.field, e.reason) == (2, "C5", "bad_categorical")
    assert len(e.text) == 200 and len(str(e)) < 600


def test_unreadable_file_is_an_os_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = tmp_path / "locked.txt"
    path.write_bytes(CRITEO.read_bytes())
    path.chmod(0)
    with pytest.raises(PermissionError):
        reader.read_criteo(path, format="train", cache=False)
