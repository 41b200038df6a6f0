"""Where each row came from: ``CTRData.lines`` (source line / row) and ``CTRData.ids`` (an id column's
raw text), against a plain-Python reference, through every way of reading, and the CLI's join key.

The reference splits the (decompressed) file into lines itself, numbers them from 1 and keeps a line
when every field passes the grammar of ``reference_reader`` (quoted lines split by ``csv.reader``,
strict); its id is the id column's cell of that line. The random files mix in bad lines of every
kind, blank lines, CRLF endings and a last line without its newline, and are read whole, in
chunks of many sizes, on one to three threads (with ranges small enough to split each block), plain
and gzipped, cached and not.
"""
from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import os
from pathlib import Path

import numpy as np
import pytest

import reference_reader as ref
from mlfast.io import cache as _cache
from mlfast.io import reader
from mlfast.io.data import CTRData, TextColumn

# (threads, chunk_bytes): one thread whole; several threads on blocks split into ranges; tiny chunks
READS = [(1, 64 << 20), (2, 64 << 20), (3, 4096), (2, 700), (1, 333)]


@pytest.fixture(autouse=True)
def _small_ranges(monkeypatch):
    monkeypatch.setattr(reader, "MIN_RANGE_BYTES", 256)  # test-sized blocks still split between threads


def write(path: Path, lines: list[bytes], rng: np.random.Generator, *, gz: bool) -> Path:
    """The lines joined by random \\n / \\r\\n endings; the last one may lack its ending."""
    body = b"".join(x + (b"\r\n" if rng.random() < 0.2 else b"\n") for x in lines)
    if rng.random() < 0.5:
        body = body[:-2] if body.endswith(b"\r\n") else body[:-1]
    path = path.with_suffix(path.suffix + ".gz") if gz else path
    path.write_bytes(gzip.compress(body, compresslevel=1) if gz else body)
    return path


def source_lines(path: Path) -> list[tuple[int, bytes]]:
    """(1-based number, content) of every line of the decompressed file."""
    return ref._lines(ref._read_bytes(path))


def concat_chunks(chunks: list[CTRData]) -> tuple[np.ndarray, list[str] | None]:
    lines = np.concatenate([c.lines for c in chunks])
    ids = None if chunks[0].ids is None else sum((c.ids.tolist() for c in chunks), [])
    return lines, ids


# ------------------------------------------------------------------------------------------------
# Criteo


CRITEO_NAMES = ["label"] + ref.CRITEO_INTS + ref.CRITEO_CATS


def criteo_lines(rng: np.random.Generator, n: int) -> list[bytes]:
    out = []
    for k in range(n):
        cells = [b"%d" % rng.integers(2)]
        cells += [b"" if rng.random() < 0.2 else b"%d" % rng.integers(-3, 10**6) for _ in range(13)]
        cells += [b"" if rng.random() < 0.2 else b"%x" % rng.integers(1, 2**32) for _ in range(26)]
        cells[14] = b"%x" % (k + 1)  # C1: a tag unique to the line
        kind = rng.integers(12)
        if kind == 0:
            cells.pop()  # field_count
        elif kind == 1:
            cells[3] = b"1x"  # bad_integer
        elif kind == 2:
            cells[20] = b"xyz"  # bad_categorical
        elif kind == 3:
            cells[0] = b"2"  # bad_label
        elif kind == 4:
            cells[5] = b"99999999999999999999"  # integer_overflow
        out.append(b"" if kind == 5 else b"\t".join(cells))  # kind 5: a blank line
    return out


def criteo_reference(path: Path, id_column: int) -> tuple[list[int], list[str]]:
    """Lines a Criteo train file keeps, and their id column's text."""
    kept, ids = [], []
    for no, line in source_lines(path):
        cells = line.split(b"\t")
        if not line or len(cells) != 40:
            continue
        try:
            ref.parse_label(cells[0])
            for c in cells[1:14]:
                if c:
                    ref.parse_int(c)
            for c in cells[14:]:
                if c:
                    ref.parse_hex(c)
        except ref.BadValue:
            continue
        kept.append(no)
        ids.append(cells[id_column].decode())
    return kept, ids


@pytest.mark.parametrize("gz", [False, True])
def test_criteo_lines_and_ids_match_the_reference(tmp_path, np_rng, gz):
    path = write(tmp_path / "c.tsv", criteo_lines(np_rng, 1500), np_rng, gz=gz)
    want_lines, want_ids = criteo_reference(path, 14)
    assert 600 < len(want_lines) < 900  # half the lines bad or blank
    rows = ref.criteo(path, fmt="train", on_bad_line="skip")  # the reference reader agrees on the lines kept
    assert len(rows.keys) == len(want_lines)
    for threads, chunk in READS:
        d = reader.read_criteo(path, format="train", on_bad_line="skip", cache=False, num_threads=threads,
                               chunk_bytes=chunk, id_column="C1")
        np.testing.assert_array_equal(d.lines, want_lines, err_msg=f"threads={threads} chunk={chunk}")
        assert d.lines.dtype == np.int64 and d.ids.name == "C1" and d.ids.tolist() == want_ids
        assert d.meta["position"] == "line"
        np.testing.assert_array_equal(d.sparse, rows.sparse())  # row i is line lines[i]'s content
        chunks = list(reader.iter_criteo_chunks(path, format="train", on_bad_line="skip", num_threads=threads,
                                                chunk_bytes=chunk, id_column=14))
        lines, ids = concat_chunks(chunks)
        np.testing.assert_array_equal(lines, want_lines)
        assert ids == want_ids
        for c in chunks:  # each chunk's lines lie within the lines it covered
            assert ((c.lines >= c.meta["first_line"]) & (c.lines < c.meta["end_line"])).all()
    # without an id column: the same lines, no ids
    d = reader.read_criteo(path, format="train", on_bad_line="skip", cache=False, num_threads=2, chunk_bytes=900)
    np.testing.assert_array_equal(d.lines, want_lines)
    assert d.ids is None


def test_lines_without_skipping_count_every_line(tmp_path):
    body = b"\n".join(b"\t".join([b"1"] + [b"%d" % k] * 13 + [b"%x" % (k + 1)] * 26) for k in range(50))
    path = tmp_path / "c.tsv"
    path.write_bytes(b"\xef\xbb\xbf" + body.replace(b"\n", b"\n\n", 3) + b"\n")  # BOM, 3 blank lines
    d = reader.read_criteo(path, cache=False)
    want = [1, 3, 5, 7] + list(range(8, 54))
    np.testing.assert_array_equal(d.lines, want)
    assert d.skipped == {"blank_line": 3}


# ------------------------------------------------------------------------------------------------
# Avazu


def avazu_lines(rng: np.random.Generator, n: int) -> list[bytes]:
    out = [",".join(ref.AVAZU_COLUMNS).encode()]
    words = [b"a1", b"b2", b"", b"c3d", b"ef"]
    for k in range(n):
        cells = [b"%d" % (10**19 + 7919 * k), b"%d" % rng.integers(2), b"141021%02d" % rng.integers(24)]
        cells += [words[rng.integers(len(words))] for _ in range(21)]
        kind = rng.integers(10)
        if kind == 0:
            cells[2] = b"14130100"  # bad_hour
        elif kind == 1:
            cells[7] = b"\xff\xfe"  # invalid_utf8
        elif kind == 2:
            cells.append(b"x")  # field_count
        elif kind == 3:
            cells[1] = b""  # bad_label
        out.append(b"" if kind == 4 else b",".join(cells))
    return out


def avazu_reference(path: Path, id_column: int) -> tuple[list[int], list[str]]:
    kept, ids = [], []
    for no, line in source_lines(path)[1:]:  # after the header
        cells = line.split(b",")
        if not line or len(cells) != 24:
            continue
        try:
            ref.parse_label(cells[1])
            ref.parse_hour(cells[2])
            for c in cells[3:]:
                ref.parse_text(c)
        except ref.BadValue:
            continue
        kept.append(no)
        ids.append(cells[id_column].decode())
    return kept, ids


@pytest.mark.parametrize("gz", [False, True])
def test_avazu_lines_and_ids_match_the_reference(tmp_path, np_rng, gz):
    path = write(tmp_path / "a.csv", avazu_lines(np_rng, 1200), np_rng, gz=gz)
    want_lines, want_ids = avazu_reference(path, 0)
    assert 400 < len(want_lines) < 800 and want_lines[0] >= 2  # half the lines bad or blank
    for threads, chunk in READS:
        d = reader.read_avazu(path, on_bad_line="skip", cache=False, num_threads=threads, chunk_bytes=chunk,
                              id_column="id")
        np.testing.assert_array_equal(d.lines, want_lines, err_msg=f"threads={threads} chunk={chunk}")
        assert d.ids.name == "id" and d.ids.tolist() == want_ids
        chunks = list(reader.iter_avazu_chunks(path, on_bad_line="skip", num_threads=threads, chunk_bytes=chunk,
                                               id_column=0))
        lines, ids = concat_chunks(chunks)
        np.testing.assert_array_equal(lines, want_lines)
        assert ids == want_ids
    # an id column that is a feature column too: its raw text, the features unchanged
    d = reader.read_avazu(path, on_bad_line="skip", cache=False, num_threads=2, id_column="site_id")
    _, want_site = avazu_reference(path, ref.AVAZU_COLUMNS.index("site_id"))
    assert d.ids.tolist() == want_site
    plain = reader.read_avazu(path, on_bad_line="skip", cache=False, num_threads=2)
    np.testing.assert_array_equal(d.sparse, plain.sparse)


# ------------------------------------------------------------------------------------------------
# Delimited, quoted


QUOTED_HEADER = b'clk,price,name,city'


def quoted_lines(rng: np.random.Generator, n: int) -> list[bytes]:
    out = [QUOTED_HEADER]
    names = ['plain', 'New York, NY', 'say "hi"', '"', ',', '', 'caf\u00e9', 'x""y']
    cities = [b"paris", b"", b"rome", b'"quoted, city"']
    for k in range(n):
        name = f"{names[rng.integers(len(names))]}#{k}"
        cells = [b"%d" % rng.integers(2), b"%.3f" % rng.random(), b'"' + name.replace('"', '""').encode() + b'"',
                 cities[rng.integers(len(cities))]]
        if rng.random() < 0.3:
            cells[2] = f"bare{k}".encode()  # unquoted
        kind = rng.integers(12)
        if kind == 0:
            cells[2] = b'"open' + b"%d" % k  # bad_quote: never closed
        elif kind == 1:
            cells[2] = b'"a"b'  # bad_quote: more after the closing quote
        elif kind == 2:
            cells[1] = b"1.2.3"  # bad_float
        elif kind == 3:
            cells[3] = b"\xc3"  # invalid_utf8 (a categorical)
        elif kind == 4:
            cells.pop()  # field_count
        elif kind == 5:
            cells[0] = b"yes"  # bad_label
        out.append(b"" if kind == 6 else b",".join(cells))
    return out


def quoted_reference(path: Path, id_column: int) -> tuple[list[int], list[str]]:
    kept, ids = [], []
    for no, line in source_lines(path)[1:]:
        if not line:
            continue
        try:
            cells = next(csv.reader(io.StringIO(line.decode("utf-8", "surrogateescape")), delimiter=",",
                                    quotechar='"', doublequote=True, strict=True))
        except csv.Error:
            continue
        if len(cells) != 4:
            continue
        b = [c.encode("utf-8", "surrogateescape") for c in cells]
        try:
            ref.parse_label(b[0])
            if b[1]:
                ref.parse_float(b[1])
            ref.parse_text(b[3])
        except ref.BadValue:
            continue
        kept.append(no)
        ids.append(b[id_column].decode("utf-8", "replace"))
    return kept, ids


SCHEMA = reader.DelimitedSchema(label="clk", numeric=["price"], categorical=["city"])


@pytest.mark.parametrize("gz", [False, True])
def test_quoted_delimited_lines_and_ids_match_the_reference(tmp_path, np_rng, gz):
    path = write(tmp_path / "q.csv", quoted_lines(np_rng, 1500), np_rng, gz=gz)
    want_lines, want_ids = quoted_reference(path, 2)
    assert 450 < len(want_lines) < 1000  # over half the lines bad or blank
    assert any("," in x for x in want_ids) and any('"' in x for x in want_ids)  # the cases that matter
    for threads, chunk in READS:
        d = reader.read_delimited(path, SCHEMA, on_bad_line="skip", cache=False, num_threads=threads,
                                  chunk_bytes=chunk, id_column="name")
        np.testing.assert_array_equal(d.lines, want_lines, err_msg=f"threads={threads} chunk={chunk}")
        assert d.ids.tolist() == want_ids
        chunks = list(reader.iter_delimited_chunks(path, SCHEMA, on_bad_line="skip", num_threads=threads,
                                                   chunk_bytes=chunk, id_column="name"))
        lines, ids = concat_chunks(chunks)
        np.testing.assert_array_equal(lines, want_lines)
        assert ids == want_ids
    # the id column is a feature column (city: quoted values unquoted, the empty value empty)
    d = reader.read_delimited(path, SCHEMA, on_bad_line="skip", cache=False, num_threads=3, chunk_bytes=2000,
                              id_column=3)
    assert d.ids.name == "city" and d.ids.tolist() == quoted_reference(path, 3)[1]


def test_lines_and_ids_when_the_output_grows_mid_block(tmp_path):
    """One thread sizes its output from the first MiB's bytes per row: long lines first, then short
    ones, make it stop mid-block, grow the output and go on (lines and ids must carry on too)."""
    lines = [b"clk,pad,name"]
    lines += [b"1,%s,long%d" % (b"p" * 2000, k) for k in range(600)]
    lines += [(b"0,,short%d" % k) if k % 7 else b"bad,,x" for k in range(20000)]
    path = tmp_path / "g.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    s = reader.DelimitedSchema(label="clk", categorical=["name"])
    d = reader.read_delimited(path, s, on_bad_line="skip", cache=False, num_threads=1, id_column="name")
    want = [no for no, line in enumerate(lines[1:], start=2) if not line.startswith(b"bad")]
    np.testing.assert_array_equal(d.lines, want)
    assert d.ids.tolist() == [lines[no - 1].split(b",")[2].decode() for no in want]
    assert d.skipped == {"bad_label": 20000 // 7 + 1}


def test_native_id_column_checks(tmp_path):
    from mlfast import _native

    path = tmp_path / "t.csv"
    path.write_bytes(b"a,b\n1,x\n")
    layout = reader._delimited_layout(str(path), reader.DelimitedSchema(label="a", categorical=["b"]), None, 0,
                                      False, "error")
    spec = dict(layout.spec, num_threads=1, block_bytes=1 << 20)
    for bad in (2, -2):
        with pytest.raises(ValueError, match="id_column"):
            _native.Reader(str(path), dict(spec, id_column=bad))
    d = _native.Reader(str(path), dict(spec, id_column=None)).read_all()
    assert d["lines"].tolist() == [2] and "id_data" not in d
    with pytest.raises(ValueError, match="no id column"):
        _native.ArrowParser(dict(spec, id_column=0))


def test_headerless_and_invalid_utf8_ids(tmp_path):
    path = tmp_path / "h.csv"
    path.write_bytes(b"1,a\xffb,x\n0,\"q,r\",y\nbad\n1,,z\n")
    s = reader.DelimitedSchema(header=False, label=0, categorical=[2])
    d = reader.read_delimited(path, s, on_bad_line="skip", cache=False, id_column=1)
    assert d.lines.tolist() == [1, 2, 4] and d.ids.name == "col1"
    assert d.ids.tolist() == ["a\ufffdb", "q,r", ""]  # invalid UTF-8 replaced; the raw bytes kept
    assert bytes(d.ids.data[:3]) == b"a\xffb"
    assert reader.read_delimited(path, s, on_bad_line="skip", cache=False, id_column="1").ids.tolist()[1] == "q,r"
    with pytest.raises(ValueError, match="without a header"):
        reader.read_delimited(path, s, on_bad_line="skip", cache=False, id_column="col1")
    with pytest.raises(ValueError, match="out of range"):
        reader.read_delimited(path, s, on_bad_line="skip", cache=False, id_column=3)


def test_id_column_errors(tmp_path, np_rng):
    path = write(tmp_path / "a.csv", avazu_lines(np_rng, 20), np_rng, gz=False)
    with pytest.raises(ValueError, match="'nope' is not in the header"):
        reader.read_avazu(path, on_bad_line="skip", cache=False, id_column="nope")
    with pytest.raises(ValueError, match="out of range.*24 columns"):
        reader.read_avazu(path, on_bad_line="skip", cache=False, id_column=24)
    with pytest.raises(TypeError):
        reader.read_avazu(path, on_bad_line="skip", cache=False, id_column=1.5)
    assert reader.read(path, on_bad_line="skip", cache=False, id_column="id").ids.name == "id"  # through read()


# ------------------------------------------------------------------------------------------------
# Cache


def test_cached_lines_and_ids_equal_uncached(tmp_path, np_rng):
    path = write(tmp_path / "q.csv", quoted_lines(np_rng, 800), np_rng, gz=True)
    want_lines, want_ids = quoted_reference(path, 2)
    where = tmp_path / "cache"
    kw = dict(on_bad_line="skip", num_threads=2, chunk_bytes=3000, cache_dir=where)
    miss = reader.read_delimited(path, SCHEMA, id_column="name", **kw)
    hit = reader.read_delimited(path, SCHEMA, id_column="name", **kw)
    assert (miss.meta["cache"]["status"], hit.meta["cache"]["status"]) == ("miss", "hit")
    assert isinstance(hit.lines, np.memmap) and isinstance(hit.ids.data, np.memmap)
    for d in (miss, hit):
        np.testing.assert_array_equal(d.lines, want_lines)
        assert d.ids.tolist() == want_ids
    # without the id column: an entry of its own (the id-less key is as before), the same features
    plain = reader.read_delimited(path, SCHEMA, **kw)
    again = reader.read_delimited(path, SCHEMA, **kw)
    assert plain.meta["cache"]["status"] == "miss" and again.meta["cache"]["status"] == "hit"
    assert plain.meta["cache"]["path"] != hit.meta["cache"]["path"] and again.ids is None
    np.testing.assert_array_equal(again.lines, want_lines)
    np.testing.assert_array_equal(again.sparse, hit.sparse)
    np.testing.assert_array_equal(again.dense, hit.dense)


def test_an_entry_without_lines_is_never_used(tmp_path, monkeypatch):
    """An entry of the previous cache version (no lines.bin) is not loaded: a fresh entry is built."""
    path = tmp_path / "c.tsv"
    path.write_bytes(b"".join(b"\t".join([b"1"] + [b"%d" % k] * 13 + [b"%x" % (k + 1)] * 26) + b"\n"
                              for k in range(30)))
    where = tmp_path / "cache"
    columns = _cache.ctr_columns

    def old_columns(*args, **kw):
        cols = columns(*args, **kw)
        del cols["lines"]
        return cols

    with monkeypatch.context() as m:  # what the previous version wrote
        m.setattr(_cache, "CACHE_VERSION", 2)
        m.setattr(_cache, "ctr_columns", old_columns)
        old = reader.read_criteo(path, cache_dir=where)
        assert reader.read_criteo(path, cache_dir=where).meta["cache"]["status"] == "hit"
    new = reader.read_criteo(path, cache_dir=where)
    assert new.meta["cache"]["status"] == "miss" and new.meta["cache"]["path"] != old.meta["cache"]["path"]
    assert new.lines.tolist() == list(range(1, 31))
    # an entry at the current key without lines.bin (or with a damaged one) is rebuilt
    entry = Path(new.meta["cache"]["path"])
    (entry / "lines.bin").write_bytes(np.arange(30, dtype=np.int64)[::-1].tobytes())
    with pytest.warns(UserWarning, match="checksum mismatch in lines.bin"):
        d = reader.read_criteo(path, cache_dir=where)
    assert d.meta["cache"]["status"] == "rebuilt" and d.lines.tolist() == list(range(1, 31))


def test_cached_id_bytes_are_checked_against_their_lengths(tmp_path, np_rng):
    """An entry whose id bytes disagree with their lengths (all else consistent, checksums included)
    is rebuilt."""
    import json

    path = write(tmp_path / "a.csv", avazu_lines(np_rng, 50), np_rng, gz=False)
    where = tmp_path / "cache"
    d = reader.read_avazu(path, on_bad_line="skip", cache_dir=where, id_column="id")
    want = d.ids.tolist()
    entry = Path(d.meta["cache"]["path"])
    data = np.fromfile(entry / "id_data.bin", np.uint8)[:-1]
    (entry / "id_data.bin").write_bytes(data.tobytes())  # one byte short, the manifest made to match
    m = json.loads((entry / "manifest.json").read_text())
    m["columns"]["id_data"].update(shape=[len(data)], nbytes=len(data),
                                   checksum=f"{_cache._native.checksum(data):016x}")
    m["manifest_sha256"] = _cache._manifest_digest(m)
    (entry / "manifest.json").write_text(json.dumps(m))
    with pytest.warns(UserWarning, match="id_data.bin holds .* bytes, id_lengths say"):
        again = reader.read_avazu(path, on_bad_line="skip", cache_dir=where, id_column="id")
    assert again.meta["cache"]["status"] == "rebuilt" and again.ids.tolist() == want


# ------------------------------------------------------------------------------------------------
# CTRData.take, vocabulary mode, TextColumn


def test_take_carries_lines_and_ids(tmp_path, np_rng):
    path = write(tmp_path / "q.csv", quoted_lines(np_rng, 200), np_rng, gz=False)
    d = reader.read_delimited(path, SCHEMA, on_bad_line="skip", cache=False, id_column="name")
    n = len(d)
    ids = d.ids.tolist()
    for index in (np.array([3, 0, n - 1, 3]), np.array([-1, -n]), slice(2, None, 3), np_rng.random(n) < 0.5):
        t = d.take(index)
        rows = np.arange(n)[index]
        np.testing.assert_array_equal(t.lines, d.lines[rows])
        assert t.ids.tolist() == [ids[i] for i in rows] and t.ids.name == "name"
    with pytest.raises(ValueError, match="lines must be"):
        dataclasses.replace(d, lines=d.lines[:-1])
    with pytest.raises(ValueError, match="ids has"):
        dataclasses.replace(d, ids=d.ids[:-1])


def test_vocabulary_mode_keeps_lines_and_ids(tmp_path, np_rng):
    from mlfast.io.prepare import apply_vocabulary
    from mlfast.io.vocab import Vocabulary

    path = write(tmp_path / "a.csv", avazu_lines(np_rng, 300), np_rng, gz=False)
    want_lines, want_ids = avazu_reference(path, 0)
    d = reader.read_avazu(path, on_bad_line="skip", cache=False, keys=True, id_column="id")
    v = apply_vocabulary(d, Vocabulary.fit(d.sparse, d.field_names, 2))
    assert not v.meta["keys"]
    np.testing.assert_array_equal(v.lines, want_lines)
    assert v.ids.tolist() == want_ids


def test_text_column():
    t = TextColumn.from_strings(["a", "", "b,c", "\u00e9\u00e9"], name="id")
    assert len(t) == 4 and t[-1] == "\u00e9\u00e9" and t[1] == "" and t.offsets.tolist() == [0, 1, 1, 4, 8]
    assert t.take(np.array([3, 3, 0])).tolist() == ["\u00e9\u00e9", "\u00e9\u00e9", "a"]
    assert t[1:3].tolist() == ["", "b,c"] and t.take(np.array([], np.int64)).tolist() == []
    assert np.asarray(t).dtype == object and list(np.asarray(t)) == t.tolist() == list(t)
    both = TextColumn.concat([t, t[:1]])
    assert both.tolist() == t.tolist() + ["a"] and both.name == "id"
    with pytest.raises(IndexError):
        t[4]
    with pytest.raises(ValueError, match="offsets must run"):
        TextColumn(np.array([0, 5]), np.zeros(3, np.uint8))


# ------------------------------------------------------------------------------------------------
# Parquet / Arrow


def _table(rng: np.random.Generator, n: int, start: int):
    import pyarrow as pa

    clk = rng.integers(0, 2, n)
    clk[rng.random(n) < 0.15] = 7  # bad_label: skipped
    price = rng.random(n)
    price[rng.random(n) < 0.1] = np.nan  # bad_float: skipped
    k = np.arange(start, start + n)
    return pa.table({
        "clk": clk, "price": price,
        "city": pa.array([f"c{x % 5}" for x in k]),
        "id_int": pa.array([None if x % 11 == 0 else int(x) * 1000003 for x in k], pa.int64()),
        "id_str": pa.array([f"r{x}, \"q\"" if x % 3 else None for x in k]),
        "id_bool": pa.array([bool(x % 2) for x in k]),
        "id_float": pa.array([x + 0.5 for x in k]),
        "id_dict": pa.array([f"d{x % 4}" for x in k]).dictionary_encode(),
        "hist": pa.array([[1, 2]] * n),
    })


def _id_text(table, name: str) -> list[str]:
    """The categorical rule: text as is, int in decimal, bool true/false, others as Arrow casts to text."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table.column(name)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if not pa.types.is_string(col.type):
        col = pc.cast(col, pa.string())
    return ["" if v is None else v for v in col.to_pylist()]


def _kept(table) -> np.ndarray:
    clk = np.asarray(table.column("clk"))
    return np.flatnonzero(np.isin(clk, [0, 1]) & np.isfinite(np.asarray(table.column("price"))))


PQ_SCHEMA = reader.DelimitedSchema(label="clk", numeric=["price"], categorical=["city"])


@pytest.mark.parametrize("id_name", ["id_int", "id_str", "id_bool", "id_float", "id_dict", "city"])
def test_parquet_rows_and_ids(tmp_path, np_rng, id_name):
    pq = pytest.importorskip("pyarrow.parquet")
    from mlfast.io import arrow

    t = _table(np_rng, 700, 0)
    path = tmp_path / "t.parquet"
    pq.write_table(t, path, row_group_size=150)
    want_rows, want_ids = _kept(t), [_id_text(t, id_name)[i] for i in _kept(t)]
    kw = dict(on_bad_line="skip", num_threads=2, batch_rows=64, id_column=id_name)
    for d in (arrow.read_columnar(path, PQ_SCHEMA, cache=False, **kw),
              arrow.read_columnar(path, PQ_SCHEMA, cache_dir=tmp_path / "c", **kw),
              arrow.read_columnar(path, PQ_SCHEMA, cache_dir=tmp_path / "c", **kw)):
        np.testing.assert_array_equal(d.lines, want_rows)
        assert d.meta["position"] == "row" and d.file_index is None
        assert d.ids.name == id_name and d.ids.tolist() == want_ids
    assert d.meta["cache"]["status"] == "hit"
    chunks = list(arrow.iter_columnar_chunks(path, PQ_SCHEMA, **kw))
    lines, ids = concat_chunks(chunks)
    np.testing.assert_array_equal(lines, want_rows)
    assert ids == want_ids


@pytest.mark.filterwarnings("ignore:.*every data line is bad")  # the one-row file may be all bad
def test_parquet_directory_rows_files_and_ids(tmp_path, np_rng):
    pq = pytest.importorskip("pyarrow.parquet")
    from mlfast.io import arrow

    tables = [_table(np_rng, n, start) for n, start in ((300, 0), (1, 300), (250, 301))]
    (tmp_path / "ds").mkdir()
    for k, t in enumerate(tables):
        pq.write_table(t, tmp_path / "ds" / f"part-{k}.parquet", row_group_size=100)
    want_rows = np.concatenate([_kept(t) for t in tables])
    want_files = np.concatenate([np.full(len(_kept(t)), k) for k, t in enumerate(tables)])
    want_ids = sum(([_id_text(t, "id_str")[i] for i in _kept(t)] for t in tables), [])
    kw = dict(on_bad_line="skip", num_threads=2, batch_rows=64, id_column="id_str")
    for d in (arrow.read_columnar(tmp_path / "ds", PQ_SCHEMA, cache=False, **kw),
              reader.read(tmp_path / "ds", schema=PQ_SCHEMA, cache_dir=tmp_path / "c", **kw),
              reader.read(tmp_path / "ds", schema=PQ_SCHEMA, cache_dir=tmp_path / "c", **kw)):
        np.testing.assert_array_equal(d.lines, want_rows)
        np.testing.assert_array_equal(d.file_index, want_files)
        assert d.ids.tolist() == want_ids and len(d.meta["files"]) == 3
        assert [os.path.basename(f) for f in np.asarray(d.meta["files"])[d.file_index[[0, -1]]]] == \
            ["part-0.parquet", "part-2.parquet"]
    chunks = list(arrow.iter_columnar_chunks(tmp_path / "ds", PQ_SCHEMA, **kw))
    lines, ids = concat_chunks(chunks)
    np.testing.assert_array_equal(lines, want_rows)
    np.testing.assert_array_equal(np.concatenate([c.file_index for c in chunks]), want_files)
    assert ids == want_ids
    with pytest.raises(ValueError, match="cannot be an id column"):
        arrow.read_columnar(tmp_path / "ds", PQ_SCHEMA, cache=False, id_column="hist")


# ------------------------------------------------------------------------------------------------
# The command line


SMALL = ["--peers", "deepfm:mlp=16,dcn:mlp=16", "--hash-buckets", "300", "--batch-size", "100", "--quiet",
         "--no-cache", "--epochs", "1"]


def _log_lines(rng: np.random.Generator, n: int, bad: bool) -> list[bytes]:
    """A delimited log with an id column holding commas and quotes; ``bad``: bad lines mixed in."""
    out = [b"uid,clk,price,city"]
    for k in range(n):
        city = rng.integers(20)
        uid = f'u{k}, "{k % 7}"'.replace('"', '""')
        line = b'"%s",%d,%.2f,c%d' % (uid.encode(), int(rng.random() < 0.2 + 0.03 * city), rng.random(), city)
        if bad and k % 9 == 4:
            out.append(b'"u-bad,1,2.0,c1' if k % 2 else b"")  # bad_quote / blank
        if bad and k % 13 == 6:
            out.append(b'"x",2,1.0,c3')  # bad_label
        out.append(line)
    return out


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_cli_predict_joins_back_by_line_and_by_id(tmp_path, np_rng, monkeypatch):
    from mlfast.cli import main

    monkeypatch.setenv("MLFAST_CACHE_DIR", str(tmp_path / "cache"))
    train = tmp_path / "train.csv"
    train.write_bytes(b"\n".join(_log_lines(np_rng, 400, bad=False)) + b"\n")
    run = tmp_path / "run"
    assert main(["train", str(train), "--label", "clk", "--categorical", "city", "--numeric", "price",
                 "--out", str(run), *SMALL]) == 0
    rng = np.random.default_rng(np_rng.integers(2**31))
    with_bad = _log_lines(rng, 300, bad=True)
    test = tmp_path / "test.csv"
    test.write_bytes(b"\n".join(with_bad) + b"\n")
    clean = tmp_path / "clean.csv"  # the good lines alone: their predictions are what each good line must get
    good = [(no, line) for no, line in enumerate(with_bad[1:], start=2) if line and b'"x"' not in line
            and not line.startswith(b'"u-bad')]
    clean.write_bytes(b"\n".join([with_bad[0]] + [line for _, line in good]) + b"\n")
    assert main(["predict", str(run), str(clean), "--out", str(tmp_path / "clean.pred.csv")]) == 0
    header, ref_rows = _read_csv(tmp_path / "clean.pred.csv")
    assert header == ["line", "deepfm", "dcn", "ensemble"] and len(ref_rows) == 300
    by_content = {line: np.asarray(row[1:], float) for (_, line), row in zip(good, ref_rows)}

    def same(row: list[str], line: bytes) -> None:  # batches differ: equal up to float rounding
        np.testing.assert_allclose(np.asarray(row, float), by_content[line], atol=2e-6)

    # default: the 1-based line number, right although lines were skipped
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(test), "--out", str(out), "--on-bad-line", "skip"]) == 0
    header, rows = _read_csv(out)
    assert header == ["line", "deepfm", "dcn", "ensemble"]
    assert [int(r[0]) for r in rows] == [no for no, _ in good]
    for r in rows:
        same(r[1:], with_bad[int(r[0]) - 1])
    # --id-column: the id column's raw values (CSV-quoted where they hold commas or quotes)
    assert main(["predict", str(run), str(test), "--out", str(out), "--on-bad-line", "skip",
                 "--id-column", "uid"]) == 0
    header, rows = _read_csv(out)
    assert header == ["uid", "deepfm", "dcn", "ensemble"]
    uids = {next(csv.reader([line.decode()]))[0]: line for _, line in good}
    assert [r[0] for r in rows] == list(uids) and '"' in rows[0][0] and "," in rows[0][0]
    for r in rows:
        same(r[1:], uids[r[0]])
    assert main(["predict", str(run), str(test), "--out", str(out), "--id-column", "nope",
                 "--on-bad-line", "skip"]) == 1

    # Parquet input of the same columns: row (0-based) by default, then file for a directory
    pa = pytest.importorskip("pyarrow")
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    table = pcsv.read_csv(clean, convert_options=pcsv.ConvertOptions(column_types={"city": pa.string()}))
    (tmp_path / "ds").mkdir()
    pq.write_table(table.slice(0, 100), tmp_path / "ds" / "a.parquet")
    pq.write_table(table.slice(100), tmp_path / "ds" / "b.parquet")
    assert main(["predict", str(run), str(tmp_path / "ds" / "b.parquet"), "--out", str(out)]) == 0
    header, rows = _read_csv(out)
    assert header == ["row", "deepfm", "dcn", "ensemble"] and [int(r[0]) for r in rows] == list(range(200))
    assert main(["predict", str(run), str(tmp_path / "ds"), "--out", str(out)]) == 0
    header, rows = _read_csv(out)
    assert header == ["file", "row", "deepfm", "dcn", "ensemble"]
    assert [(Path(r[0]).name, int(r[1])) for r in rows] == \
        [("a.parquet", i) for i in range(100)] + [("b.parquet", i) for i in range(200)]
    for r, ref_row in zip(rows, ref_rows):
        np.testing.assert_allclose(np.asarray(r[2:], float), np.asarray(ref_row[1:], float), atol=2e-6)
