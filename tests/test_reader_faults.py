"""Nothing lost, nothing silent: damaged compressed input is always one CorruptInputError that names
the file and where; streaming never drops skip counts; a file of only bad lines says so."""
from __future__ import annotations

import gzip
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

import mlfast
from mlfast.io import reader
from mlfast.io.reader import CorruptInputError, ParseError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets_raw"
CRITEO = DATA / "paddlerec_criteo_tiny" / "part-0.txt"
AVAZU = DATA / "avazu_head10k" / "avazu_train_head10k.csv"
TAOBAO = DATA / "taobao_ad_tiny_fuxictr" / "train_sample.csv"

pytestmark = pytest.mark.skipif(not CRITEO.exists(), reason="shared/datasets_raw not present")


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


@pytest.fixture(scope="module")
def plain():
    return reader.read_criteo(CRITEO, cache=False)


def read_ways(path: Path, cache_dir: Path):
    """Every entry point a damaged file can reach: detection + read, forced format, skip mode,
    chunks, the cache."""
    yield lambda: reader.read(path, cache=False)
    yield lambda: reader.read_criteo(path, format="train", cache=False, num_threads=2)
    yield lambda: reader.read_criteo(path, format="train", on_bad_line="skip", cache=False, num_threads=1)
    yield lambda: list(reader.iter_criteo_chunks(path, format="train", chunk_bytes=4096))
    yield lambda: reader.read_criteo(path, format="train", cache_dir=cache_dir)


def check_corrupt(path: Path, e: CorruptInputError, size: int) -> None:
    assert isinstance(e, ValueError) and e.path == str(path)
    msg = str(e)
    assert msg.startswith(f"{path}: ") and "<fd:" not in msg, msg
    assert ("truncated gzip data" in msg or "corrupt gzip data" in msg or "trailing data" in msg), msg
    assert isinstance(e.offset, int) and 0 <= e.offset <= size, (msg, e.offset)
    assert f"compressed byte {e.offset}" in msg and f"in line {e.line}" in msg
    assert isinstance(e.decompressed, int) and e.line >= 1


def test_every_truncation_is_corrupt_input(tmp_path, np_rng, plain):
    packed = gz(CRITEO.read_bytes())
    cuts = sorted({2, 3, 9, 10, 11, len(packed) - 8, len(packed) - 4, len(packed) - 1}
                  | {int(x) for x in np_rng.integers(12, len(packed) - 8, 25)})
    for cut in cuts:
        path = tmp_path / f"cut{cut}.gz"
        path.write_bytes(packed[:cut])
        for way in read_ways(path, tmp_path / "cache"):
            with pytest.raises(CorruptInputError) as info:
                way()
            check_corrupt(path, info.value, cut)
            assert "truncated gzip data" in str(info.value) and info.value.offset == cut, (cut, str(info.value))
    assert not list((tmp_path / "cache").glob("*/manifest.json"))  # nothing cached from a damaged file


def test_every_byte_flip_is_corrupt_input_or_harmless(tmp_path, np_rng, plain):
    """A changed byte anywhere after the magic is found (CRC-32 and length cover the data), except in
    the header fields gzip does not check (mtime, extra flags, OS, and the FTEXT hint, bit 0 of the
    flags byte 3): those give the same rows. Byte 3's random flip is drawn from bits 1-7 (FTEXT alone
    is checked as harmless at the end: drawing it at random made this test fail one run in 8)."""
    packed = gz(CRITEO.read_bytes())
    header = list(range(2, 10))
    middle = [int(x) for x in np_rng.integers(10, len(packed) - 8, 40)]
    crc, size = list(range(len(packed) - 8, len(packed) - 4)), list(range(len(packed) - 4, len(packed)))
    outcomes = {}
    for pos in header + middle + crc + size:
        data = bytearray(packed)
        data[pos] ^= 1 << int(np_rng.integers(1 if pos == 3 else 0, 8))
        path = tmp_path / f"flip{pos}.gz"
        path.write_bytes(bytes(data))
        for k, way in enumerate(read_ways(path, tmp_path / "cache")):
            try:
                d = way()
            except CorruptInputError as e:
                check_corrupt(path, e, len(packed))
                outcomes[pos] = "corrupt"
                continue
            assert 4 <= pos <= 9, f"byte {pos} changed and {k}: no error"  # mtime, XFL, OS
            d = d if not isinstance(d, list) else d[0]
            np.testing.assert_array_equal(d.sparse[:5], plain.sparse[:5])
            outcomes[pos] = "same"
    assert all(outcomes[p] == "corrupt" for p in [2, 3] + middle + crc + size)
    assert all(outcomes[p] == "same" for p in range(4, 10))
    for pos, what in ((crc[0], "incorrect data check"), (size[0], "incorrect length check")):
        with pytest.raises(CorruptInputError, match=what):
            reader.read_criteo(tmp_path / f"flip{pos}.gz", format="train", cache=False)
    data = bytearray(packed)
    data[3] ^= 1  # FTEXT: "probably text", a hint gzip does not check
    (tmp_path / "ftext.gz").write_bytes(bytes(data))
    d = reader.read_criteo(tmp_path / "ftext.gz", format="train", cache=False)
    np.testing.assert_array_equal(d.sparse, plain.sparse)


def test_garbage_that_fails_to_parse_is_reported_as_corruption(tmp_path):
    """Damage deflate decodes into garbage (found only at the CRC) makes a line fail to parse first:
    the input is still reported as corrupt, with the line that failed."""
    raw = CRITEO.read_bytes()
    data = gz(raw)
    found = None
    for pos in range(200, len(data) - 8, 5):  # a flip deflate decodes to different text, silently
        d = bytearray(data)
        d[pos] ^= 0x04
        try:
            text = zlib.decompressobj(-15).decompress(bytes(d[10:-8]))
        except zlib.error:
            continue
        plain_path = tmp_path / "garbage.txt"
        plain_path.write_bytes(text)
        try:
            reader.read_criteo(plain_path, format="train", cache=False)
        except ParseError as e:
            found, bad_line = d, e.line
            break
    assert found is not None
    path = tmp_path / "garbage.gz"
    path.write_bytes(bytes(found))
    # Small blocks, one thread: the garbage is parsed (and fails) before the CRC at the end is read.
    with pytest.raises(CorruptInputError, match=rf"incorrect data check; line {bad_line} did not parse") as info:
        reader.read_criteo(path, format="train", cache=False, num_threads=1, chunk_bytes=2048)
    check_corrupt(path, info.value, len(found))
    with pytest.raises(CorruptInputError, match="did not parse"):
        list(reader.iter_criteo_chunks(path, format="train", num_threads=2, chunk_bytes=2048))


def test_detection_goes_through_the_native_source(tmp_path):
    """Format detection reads the head through the parser's own gzip source: damage there is the
    same CorruptInputError (never EOFError, zlib.error or gzip.BadGzipFile)."""
    packed = gz(AVAZU.read_bytes()[:20000])
    for name, data in (("head_cut.gz", packed[:12]), ("bad_method.gz", packed[:2] + b"\x09" + packed[3:]),
                       ("bad_flags.gz", packed[:3] + b"\xe0" + packed[4:])):
        path = tmp_path / name
        path.write_bytes(data)
        for fn in (reader.read, reader.read_avazu):
            with pytest.raises(CorruptInputError) as info:
                fn(path, cache=False)
            assert info.value.path == str(path)
    assert mlfast.io.reader.CorruptInputError is CorruptInputError


def test_members_zero_padding_and_trailing_garbage(tmp_path, plain):
    raw = CRITEO.read_bytes()
    cut = raw.index(b"\n", len(raw) // 3) + 1
    two = gz(raw[:cut]) + gz(raw[cut:])
    for name, data in (("members.gz", two), ("padded.gz", two + b"\0" * 5000)):
        (tmp_path / name).write_bytes(data)
        d = reader.read_criteo(tmp_path / name, cache=False)
        np.testing.assert_array_equal(d.sparse, plain.sparse)
    for name, tail in (("garbage.gz", b"hello"), ("zeros_then_garbage.gz", b"\0" * 100 + b"x"),
                       ("half_member.gz", b"\x1f")):
        path = tmp_path / name
        path.write_bytes(two + tail)
        with pytest.raises(CorruptInputError) as info:
            reader.read_criteo(path, cache=False)
        check_corrupt(path, info.value, len(two) + len(tail))
        assert ("trailing data" in str(info.value)) == (name != "half_member.gz")


# ------------------------------------------------------------------------------------------------
# Skip counts through streaming


def criteo_lines(n: int) -> list[bytes]:
    return CRITEO.read_bytes().split(b"\n")[:n]


def damage(line: bytes, how: int) -> bytes:
    cells = line.split(b"\t")
    if how == 0:
        cells[0] = b"2"  # bad_label
    elif how == 1:
        cells[5] = b"x1"  # bad_integer
    elif how == 2:
        cells[20] = b"zz"  # bad_categorical
    else:
        cells = cells[:30]  # field_count
    return b"\t".join(cells)


def test_the_issue_example_counts_add_up(tmp_path):
    good = criteo_lines(5)
    lines = [good[0], damage(good[1], 0), damage(good[2], 0), good[3], damage(good[4], 0)]
    path = tmp_path / "gbbgb.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    whole = reader.read_criteo(path, on_bad_line="skip", cache=False)
    assert whole.skipped == {"bad_label": 3} and whole.num_rows == 2
    for chunk_bytes in (1, 50, 200, 400, 600, 900, 1 << 20):
        chunks = list(reader.iter_criteo_chunks(path, on_bad_line="skip", chunk_bytes=chunk_bytes))
        assert sum(c.skipped.get("bad_label", 0) for c in chunks) == 3, chunk_bytes
        assert sum(len(c) for c in chunks) == 2
        assert all(len(c) > 0 for c in chunks[:-1])  # only the last may be row-less (counts only)


def test_chunked_counts_equal_whole_read_for_every_chunk_size(tmp_path, np_rng, monkeypatch):
    monkeypatch.setattr(reader, "MIN_RANGE_BYTES", 256)
    good = criteo_lines(60)
    lines = []
    for line in good:
        r = np_rng.random()
        lines.append(b"" if r < 0.08 else damage(line, int(np_rng.integers(0, 4))) if r < 0.45 else line)
    lines += [damage(good[0], 0), b"", damage(good[1], 3)]  # a tail with no good line
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    whole = reader.read_criteo(path, format="train", on_bad_line="skip", cache=False)
    assert sum(whole.skipped.values()) >= 3
    sizes = sorted({1, 3, 64, 150, 230, 512, 1000, 4096, 1 << 20} | {int(x) for x in np_rng.integers(2, 20000, 8)})
    for chunk_bytes in sizes:
        for threads in (1, 3):
            chunks = list(reader.iter_criteo_chunks(path, format="train", on_bad_line="skip",
                                                    chunk_bytes=chunk_bytes, num_threads=threads))
            total: dict[str, int] = {}
            for c in chunks:
                for k, v in c.skipped.items():
                    total[k] = total.get(k, 0) + v
            assert total == whole.skipped, (chunk_bytes, threads)
            np.testing.assert_array_equal(np.concatenate([c.sparse for c in chunks]), whole.sparse)
            assert chunks[-1].meta["end_line"] == len(lines) + 1


def test_all_bad_file_says_so(tmp_path):
    bad = [damage(line, k % 4) for k, line in enumerate(criteo_lines(7))]
    path = tmp_path / "allbad.txt"
    path.write_bytes(b"\n".join(bad) + b"\n")
    with pytest.raises(ParseError) as info:
        reader.read_criteo(path, format="train", cache=False)
    assert info.value.line == 1
    expected = {"bad_label": 2, "bad_integer": 2, "bad_categorical": 2, "field_count": 1}
    for cache in (False, True):
        with pytest.warns(UserWarning, match=r"allbad.txt: every data line is bad and was skipped \(7 lines"):
            d = reader.read_criteo(path, format="train", on_bad_line="skip", cache=cache,
                                   cache_dir=tmp_path / "cache")
        assert d.num_rows == 0 and d.skipped == expected and d.sparse.shape == (0, 39)
    with pytest.warns(UserWarning, match="every data line is bad"):
        chunks = list(reader.iter_criteo_chunks(path, format="train", on_bad_line="skip", chunk_bytes=100))
    assert sum(len(c) for c in chunks) == 0 and sum(sum(c.skipped.values()) for c in chunks) == 7
    header_only = tmp_path / "head.csv"
    header_only.write_text(",".join(reader.AVAZU_COLUMNS) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no data lines is not "all bad": nothing to warn about
        assert list(reader.iter_avazu_chunks(header_only)) == []


def test_delimited_and_avazu_chunk_counts(tmp_path):
    lines = TAOBAO.read_bytes().split(b"\n")
    body = [lines[0]] + [ln.replace(b"0,2017", b"7,2017", 1) if k % 3 == 0 else ln for k, ln in enumerate(lines[1:41])]
    body.append(lines[1].replace(b"0,2017", b"9,2017", 1))
    path = tmp_path / "t.csv"
    path.write_bytes(b"\n".join(body) + b"\n")
    schema = reader.DelimitedSchema(label="clk", categorical=["userid"], sequence=["click_sequence"])
    whole = reader.read_delimited(path, schema, on_bad_line="skip", cache=False)
    assert whole.skipped == {"bad_label": 15}
    for chunk_bytes in (1, 100, 333, 2000):
        chunks = list(reader.iter_delimited_chunks(path, schema, on_bad_line="skip", chunk_bytes=chunk_bytes))
        assert sum(c.skipped.get("bad_label", 0) for c in chunks) == 15
        np.testing.assert_array_equal(np.concatenate([c.bags[0].values for c in chunks]), whole.bags[0].values)
    av = AVAZU.read_bytes().split(b"\n")[:30]
    av[-1] = av[-1].replace(b",0,14102100,", b",5,14102100,")
    apath = tmp_path / "a.csv"
    apath.write_bytes(b"\n".join(av) + b"\n")
    whole = reader.read_avazu(apath, on_bad_line="skip", cache=False)
    for chunk_bytes in (1, 500, 5000):
        chunks = list(reader.iter_avazu_chunks(apath, on_bad_line="skip", chunk_bytes=chunk_bytes))
        assert sum(c.skipped.get("bad_label", 0) for c in chunks) == whole.skipped["bad_label"] == 1
