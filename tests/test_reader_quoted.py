"""Quoted fields in generic delimited logs (DelimitedSchema.quote) against Python's csv module.

The rule (RFC 4180 as pandas and Excel write it, one line at a time): a field whose first byte is
the quote char runs to the matching closing quote, ``""`` inside standing for one quote; the
closing quote must be followed by the delimiter or the line end, else the line is ``bad_quote``
(as is a quote never closed on its line). Other fields are taken as they are. Every line of the
random files below is split twice for the reference, by ``csv.reader`` (quotechar, doublequote,
strict) and by a plain state machine that also says which field a bad quote is in; the two must
agree before the reader is compared with them.
"""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import reference_reader as ref
from mlfast.io import hashing, reader

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets_raw"
TAOBAO = DATA / "taobao_ad_tiny_fuxictr" / "train_sample.csv"

NAMES = ["clk", "price", "city", "skip", "note", "hist"]
KIND = {"clk": "label", "price": "float", "city": "text", "skip": "ignore", "note": "text", "hist": "textseq"}
CATEGORICAL = ["note", "city"]  # not in column order: field order follows the schema
SEQUENCE = ["hist"]


def schema(quote='"', **kw) -> reader.DelimitedSchema:
    return reader.DelimitedSchema(label="clk", numeric=["price"], categorical=CATEGORICAL, sequence=SEQUENCE,
                                  quote=quote, **kw)


# ------------------------------------------------------------------------------------------------
# Reference


def split_line(line: bytes, q: bytes | None, sep: bytes = b",") -> tuple[list[bytes] | None, int]:
    """(cells, -1), or (None, index of the field with a bad quote), byte by byte."""
    if q is None:
        return line.split(sep), -1
    cells: list[bytes] = []
    i, n = 0, len(line)
    while True:
        cur = bytearray()
        if line[i:i + 1] == q:
            i += 1
            while True:
                if i >= n:
                    return None, len(cells)
                c = line[i:i + 1]
                i += 1
                if c != q:
                    cur += c
                elif line[i:i + 1] == q:
                    cur += q
                    i += 1
                else:
                    break
            if i < n and line[i:i + 1] != sep:
                return None, len(cells)
        else:
            while i < n and line[i:i + 1] != sep:
                cur += line[i:i + 1]
                i += 1
        cells.append(bytes(cur))
        if i >= n:
            return cells, -1
        i += 1


def csv_split(line: bytes, q: bytes | None) -> list[bytes] | None:
    text = line.decode("utf-8", "surrogateescape")
    if q is None:
        rows = csv.reader([text], delimiter=",", quoting=csv.QUOTE_NONE)
    else:
        rows = csv.reader([text], delimiter=",", quotechar=q.decode(), doublequote=True, strict=True)
    try:
        return [c.encode("utf-8", "surrogateescape") for c in next(rows)]
    except csv.Error:
        return None


class Expected:
    """What read_delimited must return: per good line its label, dense value, keys and bag keys."""

    def __init__(self, path: Path, q: bytes | None, seed: int = 0, header: bool = True):
        self.labels, self.dense, self.missing, self.keys, self.bags = [], [], [], [], []
        self.skipped: Counter = Counter()
        self.first_bad: tuple[int, str, str] | None = None
        lines = ref._lines(ref._read_bytes(path))
        if header:
            hline = next(i for i, (_, line) in enumerate(lines) if line)
            self.skipped.update({"blank_line": hline})
            lines = lines[hline + 1:]
        for line_no, line in lines:
            if not line:
                self.skipped["blank_line"] += 1
                continue
            cells, bad = split_line(line, q)
            assert cells == csv_split(line, q), (line_no, line)  # the two references agree
            try:
                self._line(line_no, cells, bad, seed)
            except ref.BadLine as e:
                self.skipped[e.reason] += 1
                if self.first_bad is None:
                    self.first_bad = (e.line, e.field, e.reason)

    def _line(self, line_no, cells, bad, seed):
        if cells is None:
            raise ref.BadLine(line_no, NAMES[min(bad, len(NAMES) - 1)], "bad_quote")
        if len(cells) != len(NAMES):
            raise ref._count_error(line_no, NAMES, len(cells))
        row = {}
        for col, (name, cell) in enumerate(zip(NAMES, cells)):  # the first bad column from the left
            try:
                if KIND[name] == "label":
                    row[name] = ref.parse_label(cell)
                elif KIND[name] == "float":
                    row[name] = None if cell == b"" else ref.parse_float(cell)
                elif KIND[name] == "text":
                    row[name] = None if cell == b"" else ref.key(ref.parse_text(cell), seed, col + 1)
                elif KIND[name] == "textseq":
                    if cell == b"":
                        row[name] = [None]
                    else:
                        values = cell.split(b"^")
                        if any(v == b"" for v in values):
                            raise ref.BadValue("bad_sequence")
                        row[name] = [ref.key(ref.parse_text(v), seed, col + 1) for v in values]
            except ref.BadValue as e:
                raise ref.BadLine(line_no, name, e.reason) from None
        self.labels.append(row["clk"])
        x = row["price"]
        self.dense.append(0.0 if x is None else hashing.signed_log1p(x))
        self.missing.append(x is None)
        self.keys.append([row[c] for c in CATEGORICAL])
        self.bags.append(row["hist"])

    def check(self, d, buckets: list[int] | None = None, keys: bool = False):
        n = len(self.labels)
        assert d.num_rows == n and d.field_names == CATEGORICAL + SEQUENCE
        np.testing.assert_array_equal(d.labels, np.asarray(self.labels, np.float32))
        np.testing.assert_array_equal(d.dense[:, 0], np.asarray(self.dense, np.float64).astype(np.float32))
        np.testing.assert_array_equal(d.dense_missing[:, 0], np.asarray(self.missing, bool))
        b = hashing.resolve_buckets(buckets, ["cat"] * 3)
        offsets = hashing.field_offsets_for(b)

        def ident(k, f):
            if keys:
                return 0 if k is None else np.uint64(k or 1).astype(np.int64).item()
            return hashing.row_id(k, f, offsets, b)

        want = np.asarray([[ident(k, f) for f, k in enumerate(row)] for row in self.keys], np.int64)
        np.testing.assert_array_equal(d.sparse, want.reshape(n, 2))
        assert bag_lists(d.bags[0]) == [[ident(k, 2) for k in ks] for ks in self.bags]


def bag_lists(bag) -> list[list[int]]:
    return [bag.values[bag.offsets[i]:bag.offsets[i + 1]].tolist() for i in range(bag.num_rows)]


def concat_lists(chunks) -> list[list[int]]:
    return sum((bag_lists(c.bags[0]) for c in chunks), [])


# ------------------------------------------------------------------------------------------------
# Random quoted files


def quoted(v: bytes, q: bytes) -> bytes:
    return q + v.replace(q, q + q) + q


def cell(rng, v: bytes, q: bytes, p: float = 0.35) -> bytes:
    """v as a CSV writer might put it: quoted when it must be (a delimiter inside, a leading
    quote), else now and then anyway."""
    if b"," in v or v.startswith(q) or rng.random() < p:
        return quoted(v, q)
    return v


def text(rng, q: bytes, seq: bool = False) -> bytes:
    pieces = [b"a", b"bc", b"New York", b" NY", b" ", b"x1", "\u00e9t\u00e9".encode(), b"\xe4\xb8\xad", q, q + q]
    if not seq:
        pieces += [b",", b", ", b"^", b"1^2"]
    out = b"".join(pieces[int(i)] for i in rng.integers(0, len(pieces), size=int(rng.integers(1, 5))))
    return out


def good_line(rng, q: bytes) -> bytes:
    cells = []
    for name in NAMES:
        kind = KIND[name]
        if kind == "label":
            cells.append(cell(rng, b"01"[int(rng.integers(0, 2)):][:1], q, 0.2))
        elif kind == "float":
            v = [b"1.5", b"-2e3", b"0", b"", b".25", b"7", b"1e-3"][int(rng.integers(0, 7))]
            cells.append(cell(rng, v, q))
        elif kind == "textseq":
            k = int(rng.integers(0, 4))
            cells.append(cell(rng, b"^".join(text(rng, q, seq=True) for _ in range(k)), q))
        else:
            empty = rng.random() < 0.1
            cells.append(cell(rng, b"" if empty else text(rng, q), q, 0.2 if empty else 0.35))
    return b",".join(cells)


def damage(rng, line: bytes, q: bytes) -> bytes:
    """One of the ways a line goes bad: mostly quoting, sometimes a value or the field count."""
    kind = int(rng.integers(0, 7))
    cells = line.split(b",")  # raw pieces: may cut a quoted field, which is fine for damage
    if kind == 0:  # a quote opened and never closed, at the start of the line's last piece
        return b",".join(cells[:-1] + [q + cells[-1].replace(q, b"")])
    if kind == 1:  # a quoted field followed by more bytes: "ab"c
        i = int(rng.integers(0, len(cells)))
        return b",".join(cells[:i] + [quoted(b"ab", q) + b"c"] + cells[i + 1:])
    if kind == 2:  # a closing quote followed by a space
        return b",".join([quoted(b"1", q) + b" "] + cells[1:])
    if kind == 3:  # a quote byte dropped in anywhere
        i = int(rng.integers(0, len(line) + 1))
        return line[:i] + q + line[i:]
    if kind == 4:  # a quote byte removed
        i = line.find(q)
        return line if i < 0 else line[:i] + line[i + 1:]
    if kind == 5:  # an empty value in the list
        return b",".join(cells[:-1] + [quoted(b"a^^b", q)])
    return b",".join(cells[:2] + [quoted(b"1.2.3", q)] + cells[2:])[: len(line) + 9]


def write_random(path: Path, rng, q: bytes, n: int, bad_rate: float = 0.0, header: bytes | None = None) -> Path:
    lines = [header if header is not None else b",".join(quoted(x.encode(), q) if rng.random() < 0.5
                                                         else x.encode() for x in NAMES)]
    for _ in range(n):
        line = good_line(rng, q)
        if rng.random() < bad_rate:
            line = damage(rng, line, q)
        elif rng.random() < 0.02:
            line = b""
        if rng.random() < 0.1:
            line += b"\r"
        lines.append(line)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


# ------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("q", ['"', "'"])
def test_random_quoted_file_matches_csv_reference(tmp_path, np_rng, monkeypatch, q):
    monkeypatch.setattr(reader, "MIN_RANGE_BYTES", 2048)
    qb = q.encode()
    path = write_random(tmp_path / "q.csv", np_rng, qb, 3000)
    seed = int(np_rng.integers(0, 1 << 63))
    buckets = [int(b) for b in np_rng.integers(1, 1 << 20, size=3)]
    exp = Expected(path, qb, seed)
    assert not (set(exp.skipped) - {"blank_line"}) and len(exp.labels) > 2900
    s = schema(q)
    for threads, chunk in ((1, 1 << 26), (2, 1 << 26), (1, 5000), (2, 7777)):
        d = reader.read_delimited(path, s, hash_seed=seed, hash_buckets=buckets, cache=False,
                                  num_threads=threads, chunk_bytes=chunk)
        exp.check(d, buckets)
    exp.check(reader.read_delimited(path, s, hash_seed=seed, keys=True, cache=False, num_threads=2), keys=True)
    # streaming: chunks concatenate to the same arrays
    for threads in (1, 2):
        chunks = list(reader.iter_delimited_chunks(path, s, hash_seed=seed, hash_buckets=buckets,
                                                   chunk_bytes=6000, num_threads=threads))
        assert len(chunks) > 10
        assert np.array_equal(np.concatenate([c.sparse for c in chunks]),
                              reader.read_delimited(path, s, hash_seed=seed, hash_buckets=buckets,
                                                    cache=False).sparse)
        merged = reader.read_delimited(path, s, hash_seed=seed, hash_buckets=buckets, cache=False)
        np.testing.assert_array_equal(np.concatenate([c.dense for c in chunks]), merged.dense)
        np.testing.assert_array_equal(np.concatenate([c.labels for c in chunks]), merged.labels)
        assert concat_lists(chunks) == bag_lists(merged.bags[0])
    # cached: a miss then a hit, both the reference's
    for status in ("miss", "hit"):
        c = reader.read_delimited(path, s, hash_seed=seed, hash_buckets=buckets, cache_dir=tmp_path / "cache")
        assert c.meta["cache"]["status"] == status
        exp.check(c, buckets)


@pytest.mark.parametrize("q", ['"', "'"])
def test_random_bad_lines_skipped_and_reported_as_reference(tmp_path, np_rng, monkeypatch, q):
    monkeypatch.setattr(reader, "MIN_RANGE_BYTES", 1024)
    qb = q.encode()
    path = write_random(tmp_path / "bad.csv", np_rng, qb, 2500, bad_rate=0.08)
    seed = int(np_rng.integers(0, 1 << 63))
    exp = Expected(path, qb, seed)
    assert exp.skipped["bad_quote"] > 20 and exp.first_bad is not None
    want_skipped = {k: v for k, v in exp.skipped.items() if k != "blank_line"}
    s = schema(q)
    for threads, chunk in ((1, 1 << 26), (2, 1 << 26), (2, 4000), (1, 3000)):
        d = reader.read_delimited(path, s, hash_seed=seed, cache=False, on_bad_line="skip",
                                  num_threads=threads, chunk_bytes=chunk)
        assert {k: v for k, v in d.skipped.items() if k != "blank_line"} == want_skipped
        exp.check(d)  # bad lines leave nothing behind, bag ids included
        with pytest.raises(reader.ParseError) as e:
            reader.read_delimited(path, s, hash_seed=seed, cache=False, num_threads=threads, chunk_bytes=chunk)
        assert (e.value.line, e.value.field, e.value.reason) == exp.first_bad
    chunks = list(reader.iter_delimited_chunks(path, s, hash_seed=seed, chunk_bytes=5000, num_threads=2,
                                               on_bad_line="skip"))
    assert sum(len(c) for c in chunks) == len(exp.labels)
    assert concat_lists(chunks) == bag_lists(reader.read_delimited(path, s, hash_seed=seed, cache=False,
                                                                   on_bad_line="skip").bags[0])


def test_examples_unquote_to_the_values(tmp_path):
    p = tmp_path / "ex.csv"
    p.write_bytes(b'clk,price,city,skip,note,hist\n'
                  b'1,"2.5","New York, NY","x,y","say ""hi""","1^2"\n'
                  b'0,,plain,a"b,"",\n'
                  b'"1","","""",",",a"",""\r\n')
    d = reader.read_delimited(p, schema(), keys=True, cache=False)
    k = lambda v, col: np.uint64(hashing.hash_key(hashing.text_value(v), 0, col)).astype(np.int64)  # noqa: E731
    assert d.labels.tolist() == [1, 0, 1]
    assert d.dense_missing[:, 0].tolist() == [False, True, True]
    assert d.dense[0, 0] == np.float32(np.log1p(2.5))
    assert d.sparse.tolist() == [[k(b'say "hi"', 5), k(b"New York, NY", 3)],
                                 [0, k(b"plain", 3)],
                                 [k(b'a""', 5), k(b'"', 3)]]
    assert bag_lists(d.bags[0]) == [[k(b"1", 6), k(b"2", 6)], [0], [0]]


def test_long_quoted_lines_and_gzip(tmp_path, np_rng):
    """Cells far longer than a 64-byte window, a block (chunk_bytes) and the scratch's first size."""
    import gzip

    qb = b'"'
    lines = [b",".join(n.encode() for n in NAMES)]
    for i in range(60):
        line = good_line(np_rng, qb)
        if i % 3 == 0:
            big = b'a,""b' * int(np_rng.integers(100, 6000))
            line = b'1,2,"' + big + b'",x,"' + big[:5000] + b'",' + quoted(b"^".join([b"v"] * 50), qb)
        lines.append(line)
    path = tmp_path / "long.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    exp = Expected(path, qb)
    assert len(exp.labels) == 60
    for threads, chunk in ((1, 1000), (2, 3000), (2, 1 << 26)):
        exp.check(reader.read_delimited(path, schema(), cache=False, num_threads=threads, chunk_bytes=chunk))
    gz = tmp_path / "long.csv.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    exp.check(reader.read_delimited(gz, schema(), cache=False, num_threads=2, chunk_bytes=2000))


def test_bad_quotes_name_file_line_and_column(tmp_path):
    p = tmp_path / "bad.csv"
    lines = [b"clk,price,city,skip,note,hist",
             b"1,2,a,b,c,d",
             b'0,1,"ab"c,x,y,z',        # closed, then more bytes
             b'1,3,ok,x,"open,z',       # never closed
             b'1,"4" ,ok,x,y,z',        # a space after the closing quote
             b'0,5,"x""",x,y,z',        # x then a quote: a good line
             b'0,5,ok,x,y,"a""',        # "" then the line's end: never closed
             b'1,6,ok,x,y,"a"b',        # the last field
             b"1,7,fine,x,y,z"]
    p.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(reader.ParseError) as e:
        reader.read_delimited(p, schema(), cache=False)
    assert (e.value.line, e.value.field, e.value.reason) == (3, "city", "bad_quote")
    assert e.value.text == b'"ab"c'
    msg = str(e.value)
    assert str(p) in msg and "line 3" in msg and "field city" in msg and "[bad_quote]" in msg
    assert "quoted field" in msg
    d = reader.read_delimited(p, schema(), cache=False, on_bad_line="skip")
    assert d.skipped == {"bad_quote": 5} and d.num_rows == 3
    assert len(d.bags[0].values) == 3  # the bad lines left no bag ids
    x = np.uint64(hashing.hash_key(hashing.text_value(b'x"'), 0, 3)).astype(np.int64)
    assert reader.read_delimited(p, schema(), keys=True, cache=False, on_bad_line="skip").sparse[1, 1] == x
    for i, (field, text) in enumerate([("note", b'"open,z'), ("price", b'"4" '), ("hist", b'"a""'),
                                       ("hist", b'"a"b')]):
        q = tmp_path / f"one{i}.csv"
        q.write_bytes(b"\n".join([lines[0], lines[1], lines[[3, 4, 6, 7][i]]]) + b"\n")
        with pytest.raises(reader.ParseError) as e:
            reader.read_delimited(q, schema(), cache=False)
        assert (e.value.line, e.value.field, e.value.reason, e.value.text) == (3, field, "bad_quote", text)


def test_field_count_after_unquoting(tmp_path):
    p = tmp_path / "count.csv"
    p.write_bytes(b'clk,price,city,skip,note,hist\n1,2,"a,b",x,y\n1,2,"a,b",x,y,z,w\n1,2,"a,b",x,y,z\n')
    with pytest.raises(reader.ParseError) as e:
        reader.read_delimited(p, schema(), cache=False)
    assert (e.value.line, e.value.field, e.value.reason) == (2, "hist", "field_count")
    assert "found 5 fields" in str(e.value)
    d = reader.read_delimited(p, schema(), cache=False, on_bad_line="skip")
    assert d.skipped == {"field_count": 2} and d.num_rows == 1


def test_quoted_header(tmp_path):
    p = tmp_path / "h.csv"
    p.write_bytes(b'"clk","the ""city""","a,b",price\n1,x,"y,z",2\n')
    s = reader.DelimitedSchema(label="clk", numeric=["price"], categorical=['the "city"', "a,b"])
    d = reader.read_delimited(p, s, keys=True, cache=False)
    assert d.field_names == ['the "city"', "a,b"] and d.dense_names == ["price"]
    want = [np.uint64(hashing.hash_key(hashing.text_value(v), 0, c)).astype(np.int64) for v, c in ((b"x", 2),
                                                                                                     (b"y,z", 3))]
    assert d.sparse.tolist() == [want]
    bad = tmp_path / "badheader.csv"
    bad.write_bytes(b'clk,"price\n1,2\n')
    with pytest.raises(ValueError, match=r"badheader\.csv.*header \(line 1\).*field 2"):
        reader.read_delimited(bad, reader.DelimitedSchema(label="clk"), cache=False)
    # quote=None reads the same header's quotes as bytes
    d = reader.read_delimited(bad, reader.DelimitedSchema(label="clk", categorical=['"price'], quote=None),
                              cache=False)
    assert d.field_names == ['"price']


def test_quote_none_keeps_quotes_as_bytes(tmp_path, np_rng):
    path = write_random(tmp_path / "q.csv", np_rng, b'"', 1500, header=b",".join(n.encode() for n in NAMES))
    exp = Expected(path, None)
    assert exp.skipped["field_count"] > 0  # commas inside quotes now split fields
    d = reader.read_delimited(path, schema(None), cache=False, on_bad_line="skip")
    assert {k: v for k, v in d.skipped.items() if k != "blank_line"} == {
        k: v for k, v in exp.skipped.items() if k != "blank_line"}
    exp.check(d)
    p = tmp_path / "plain.csv"
    p.write_bytes(b'clk,price,city,skip,note,hist\n1,2,"x",y,"",z\n')
    d = reader.read_delimited(p, schema(None), keys=True, cache=False)
    k = lambda v, col: np.uint64(hashing.hash_key(hashing.text_value(v), 0, col)).astype(np.int64)  # noqa: E731
    assert d.sparse.tolist() == [[k(b'""', 5), k(b'"x"', 3)]]


def test_quote_is_part_of_the_cache_key(tmp_path):
    p = tmp_path / "c.csv"
    p.write_bytes(b'clk,price,city,skip,note,hist\n1,2,"x",y,n,z\n0,,"a,b",y,n,z\n')
    a = reader.read_delimited(p, schema('"'), cache_dir=tmp_path, on_bad_line="skip")
    b = reader.read_delimited(p, schema(None), cache_dir=tmp_path, on_bad_line="skip")
    assert a.meta["cache"]["status"] == b.meta["cache"]["status"] == "miss"
    assert a.num_rows == 2 and b.num_rows == 1 and b.skipped == {"field_count": 1}
    assert a.meta["reader"]["quote"] == '"' and b.meta["reader"]["quote"] is None
    assert reader.read_delimited(p, schema(""), cache_dir=tmp_path, on_bad_line="skip").meta["cache"]["status"] == "hit"


@pytest.mark.parametrize("quote,match", [("ab", "quote"), ("\n", "quote"), (",", "quote"), ("^", "quote"),
                                         ("\u00e9", "quote"), (1, "quote")])
def test_quote_must_be_one_ascii_character(tmp_path, quote, match):
    p = tmp_path / "v.csv"
    p.write_bytes(b"clk,a\n1,x\n")
    with pytest.raises(ValueError, match=match):
        reader.read_delimited(p, reader.DelimitedSchema(label="clk", categorical=["a"], quote=quote), cache=False)


def test_criteo_and_avazu_layouts_never_quote():
    for layout in (reader._criteo_layout("train", True, None, 0, False, "error"),
                   reader._avazu_layout("train", True, None, 0, False, "error")):
        assert "quote" not in layout.spec and "quote" not in layout.config


@pytest.mark.skipif(not TAOBAO.exists(), reason="shared/datasets_raw not present")
def test_taobao_reads_the_same_with_and_without_quoting(tmp_path):
    header = TAOBAO.read_text().split("\n")[0].split(",")
    cats = [c for c in header if c not in ("clk", "price", "click_sequence")]
    out = []
    for quote in ('"', None):
        s = reader.DelimitedSchema(label="clk", numeric=["price"], categorical=cats, sequence=["click_sequence"],
                                   quote=quote)
        out.append(reader.read_delimited(TAOBAO, s, cache=False))
    a, b = out
    assert a.num_rows == b.num_rows == 100
    for name in ("labels", "dense", "dense_missing", "sparse"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert bag_lists(a.bags[0]) == bag_lists(b.bags[0])


def test_a_run_stored_before_quoting_reads_quotes_as_bytes(tmp_path):
    from mlfast import api

    p = tmp_path / "old.csv"
    p.write_bytes(b'clk,a\n1,"x"\n')
    old = {"delimiter": ",", "header": True, "label": "clk", "numeric": [], "categorical": ["a"],
           "numeric_transform": "log", "sequence": [], "sequence_separator": "^", "sequence_max_len": None}
    k = lambda v: np.uint64(hashing.hash_key(hashing.text_value(v), 0, 2)).astype(np.int64)  # noqa: E731
    d = api.read_file(p, api.reader_options(schema=old, cache=False), keys=True)
    assert d.sparse.tolist() == [[k(b'"x"')]]
    d = api.read_file(p, api.reader_options(schema={**old, "quote": '"'}, cache=False), keys=True)
    assert d.sparse.tolist() == [[k(b"x")]]


def test_cli_quote_options():
    import argparse

    from mlfast import cli

    p = argparse.ArgumentParser()
    cli._add_reader_args(p)
    def quote(*args):
        return cli._reader_options(p.parse_args(["--categorical", "a", *args]))["schema"]["quote"]

    assert quote() == '"' and quote("--quote", "'") == "'"
    assert quote("--quote", "") is None and quote("--no-quote") is None
    with pytest.raises(cli.UsageError):
        quote("--no-quote", "--quote", "'")
