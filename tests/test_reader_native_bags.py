"""Multi-hot "textseq" columns of the native reader (mlfast._native.Reader driven directly).

A textseq cell is a list of texts joined by the bag separator (FuxiCTR's Taobao click_sequence:
``170301^573514``). Each value is hashed as a ``text`` value of the column's bag field; an empty
cell is a bag of one id, the field's missing row; an empty value inside a cell is bad_sequence.
The reader emits ``bag_lengths`` [N, S] and ``bag_values`` (per bag field, all rows' ids in row
order). Everything is checked against a plain-Python reference built on mlfast.io.hashing.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import reference_reader as ref
from mlfast import _native
from mlfast.io import hashing

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets_raw"
TAOBAO = DATA / "taobao_ad_tiny_fuxictr" / "train_sample.csv"

NO_BAG_KEYS = {"labels", "dense", "dense_missing", "sparse", "lines", "skipped", "first_line", "end_line",
               "input_bytes"}


# ------------------------------------------------------------------------------------------------
# Spec and reading


def make_spec(columns: list[tuple], buckets: list[int], *, num_bags: int, field_ids: list[int] | None = None,
              delimiter: str = ",", header: bool = False, keys: bool = False, skip: bool = False, seed: int = 0,
              num_threads: int = 1, block_bytes: int = 1 << 20, min_range_bytes: int = 256 << 10,
              vector_hash: bool = True, **extra) -> dict:
    """A spec dict as mlfast.io.reader builds it: one-hot fields first, then the bag fields."""
    offsets = np.zeros(len(buckets) + 1, np.int64) if keys else hashing.field_offsets_for(buckets)
    spec = {
        "delimiter": delimiter,
        "header": header,
        "columns": columns,
        "num_dense": 0,
        "has_label": any(c[0] == "label" for c in columns),
        "field_ids": field_ids if field_ids is not None else [101 + f for f in range(len(buckets))],
        "buckets": list(buckets),
        "offsets": [int(x) for x in offsets],
        "seed": seed,
        "keys": keys,
        "skip_bad": skip,
        "num_threads": num_threads,
        "block_bytes": block_bytes,
        "min_range_bytes": min_range_bytes,
        "vector_hash": vector_hash,
        "num_bags": num_bags,
        **extra,
    }
    return spec


def check_chunk(d: dict, num_bags: int) -> None:
    """A chunk's own invariants: each bag's values are its lengths' sum, every bag has an id."""
    assert d["bag_lengths"].dtype == np.int64 and d["bag_lengths"].shape == (d["sparse"].shape[0], num_bags)
    assert len(d["bag_values"]) == num_bags
    for s, values in enumerate(d["bag_values"]):
        assert values.dtype == np.int64 and values.ndim == 1
        assert len(values) == int(d["bag_lengths"][:, s].sum())
    assert (d["bag_lengths"] >= 1).all()


def read_native(path: Path, spec: dict, *, stream: bool = False) -> dict:
    """read_all(), or every next_chunk() joined (checking that the chunks follow each other)."""
    reader = _native.Reader(str(path), spec)
    S = spec["num_bags"]
    if not stream:
        d = reader.read_all()
        check_chunk(d, S)
        return d
    chunks = []
    while (d := reader.next_chunk()) is not None:
        check_chunk(d, S)
        if chunks:
            assert d["first_line"] == chunks[-1]["end_line"]
        chunks.append(d)
    assert len(chunks) > 1, "the test meant to read several chunks"
    skipped: Counter = Counter()
    for c in chunks:
        skipped.update(c["skipped"])
    return {
        "labels": np.concatenate([c["labels"] for c in chunks]),
        "sparse": np.concatenate([c["sparse"] for c in chunks]),
        "bag_lengths": np.concatenate([c["bag_lengths"] for c in chunks]),
        "bag_values": [np.concatenate([c["bag_values"][s] for c in chunks]) for s in range(S)],
        "skipped": dict(skipped),
    }


# ------------------------------------------------------------------------------------------------
# The reference


def reference(data: bytes, spec: dict) -> dict:
    """What the reader must return for `data` under `spec` (labels, text, textseq and ignore
    columns); raises reference_reader.BadLine in error mode."""
    columns, S = spec["columns"], spec["num_bags"]
    F = len(spec["field_ids"]) - S
    delim, sep = spec["delimiter"].encode(), spec.get("bag_separator", "^").encode()
    keys, seed = spec["keys"], spec["seed"]
    offsets, buckets = np.asarray(spec["offsets"], np.int64), spec["buckets"]
    names = [c[1] for c in columns]

    def ident(f: int, value: int | None) -> int:  # value None = missing
        if keys:
            return 0 if value is None else (ref.key(value, seed, spec["field_ids"][f]) or 1)
        key = None if value is None else ref.key(value, seed, spec["field_ids"][f])
        return hashing.row_id(key, f, offsets, buckets)

    def bag(cell: bytes) -> list[int | None]:
        if not cell:
            return [None]
        values = []
        for token in cell.split(sep):
            if not token:
                raise ref.BadValue("bad_sequence")
            values.append(ref.parse_text(token))
        return values

    labels, sparse, lengths = [], [], []
    bags: list[list[int]] = [[] for _ in range(S)]
    skipped: Counter = Counter()
    header = spec["header"]
    for no, line in ref._lines(data):
        if not line:
            skipped["blank_line"] += 1
            continue
        if header:
            header = False
            continue
        cells = line.split(delim)
        try:
            if len(cells) != len(columns):
                raise ref._count_error(no, names, len(cells))
            label, row, row_bags = None, [0] * F, [[] for _ in range(S)]
            for (kind, name, _, f, _), cell in zip(columns, cells):
                try:
                    if kind == "label":
                        label = ref.parse_label(cell)
                    elif kind == "text":
                        row[f] = ident(f, ref.parse_text(cell) if cell else None)
                    elif kind == "textseq":
                        row_bags[f - F] = [ident(f, v) for v in bag(cell)]
                    else:
                        assert kind == "ignore", kind
                except ref.BadValue as e:
                    raise ref.BadLine(no, name, e.reason) from None
        except ref.BadLine as e:
            if not spec["skip_bad"]:
                raise
            skipped[e.reason] += 1
            continue
        labels.append(label)
        sparse.append(row)
        lengths.append([len(b) for b in row_bags])
        for s in range(S):
            bags[s].extend(row_bags[s])

    def ids(values) -> np.ndarray:  # keys are uint64 bit patterns, shown as int64
        return np.asarray(values, np.uint64).view(np.int64) if keys else np.asarray(values, np.int64)

    return {
        "labels": np.asarray(labels, np.float32) if spec["has_label"] else None,
        "sparse": ids(sparse).reshape(len(sparse), F),
        "bag_lengths": np.asarray(lengths, np.int64).reshape(len(lengths), S),
        "bag_values": [ids(b) for b in bags],
        "skipped": dict(skipped),
    }


def assert_same(got: dict, want: dict) -> None:
    if want["labels"] is None:
        assert got["labels"] is None
    else:
        np.testing.assert_array_equal(got["labels"], want["labels"])
    np.testing.assert_array_equal(got["sparse"], want["sparse"])
    np.testing.assert_array_equal(got["bag_lengths"], want["bag_lengths"])
    assert len(got["bag_values"]) == len(want["bag_values"])
    for g, w in zip(got["bag_values"], want["bag_values"]):
        np.testing.assert_array_equal(g, w)
    assert got["skipped"] == want["skipped"]


# ------------------------------------------------------------------------------------------------
# FuxiCTR's Taobao sample


def taobao_spec(buckets: list[int], **kw) -> dict:
    """label clk, one-hot userid / cate_id / brand, bag click_sequence; the rest ignored."""
    header = TAOBAO.read_text().split("\n", 1)[0].split(",")
    one_hot = {"userid": 0, "cate_id": 1, "brand": 2}
    columns = []
    for name in header:
        if name == "clk":
            columns.append(("label", name, -1, -1, False))
        elif name in one_hot:
            columns.append(("text", name, -1, one_hot[name], False))
        elif name == "click_sequence":
            columns.append(("textseq", name, -1, 3, False))
        else:
            columns.append(("ignore", name, -1, -1, False))
    return make_spec(columns, buckets, num_bags=1, header=True, **kw)


@pytest.mark.skipif(not TAOBAO.exists(), reason="shared/datasets_raw not present")
@pytest.mark.parametrize("buckets", [[1 << 17] * 4, [1000, 997, 1 << 10, 12345]], ids=["pow2", "odd"])
@pytest.mark.parametrize("vector_hash", [True, False])
def test_taobao_click_sequence(buckets, vector_hash):
    spec = taobao_spec(buckets, vector_hash=vector_hash)
    got = read_native(TAOBAO, spec)
    want = reference(TAOBAO.read_bytes(), spec)
    assert_same(got, want)
    assert set(got) == NO_BAG_KEYS | {"bag_lengths", "bag_values"}

    # Spelled out for the file's own rows: the lengths are the '^'-separated counts and an empty
    # cell is the bag field's missing row alone.
    cells = [line.rsplit(",", 1)[1] for line in TAOBAO.read_text().splitlines()[1:]]
    assert got["bag_lengths"][:, 0].tolist() == [len(c.split("^")) if c else 1 for c in cells]
    starts = np.concatenate([[0], np.cumsum(got["bag_lengths"][:, 0])])
    missing = spec["offsets"][3]
    for r, cell in enumerate(cells):
        bag = got["bag_values"][0][starts[r]:starts[r + 1]].tolist()
        if not cell:
            assert bag == [missing]
        else:
            key = [hashing.hash_key(hashing.text_value(t), 0, spec["field_ids"][3]) for t in cell.split("^")]
            assert bag == [missing + 1 + k % buckets[3] for k in key]
    assert 0 < sum(not c for c in cells) < len(cells)  # the sample has both


# ------------------------------------------------------------------------------------------------
# Generated files

TOKENS = ["170301", "573514", "a", "bb", "ccc", "é", "日本", "🙂x", "x y", "0"] + [f"item{i}" for i in range(40)]
GEN_COLUMNS = [("label", "y", -1, -1, False), ("text", "user", -1, 0, False), ("textseq", "hist", -1, 2, False),
               ("text", "item", -1, 1, False), ("ignore", "note", -1, -1, False), ("textseq", "tags", -1, 3, False)]
GEN_BUCKETS = [1 << 12, 1000, 1 << 14, 777]


def bag_cell(rng: np.random.Generator, max_len: int, sep: str = "^") -> str:
    n = int(rng.integers(0, max_len + 1))
    return sep.join(TOKENS[int(i)] for i in rng.integers(0, len(TOKENS), size=n))


def generated_lines(rng: np.random.Generator, n: int, sep: str = "^") -> list[str]:
    """Rows of GEN_COLUMNS (tab-separated) in stretches of long lines (bags of up to 20 values)
    and of short ones (mostly empty cells): the per-row byte estimate the reader sizes its output
    with is then far off at each change, so it also fills its output and resumes mid-block."""
    lines = []
    for i in range(n):
        long = (i // 150) % 2 == 0
        cells = [str(int(rng.integers(0, 2))), f"u{int(rng.integers(0, 50))}" if rng.random() < 0.9 else "",
                 bag_cell(rng, 20 if long else 1, sep), f"i{int(rng.integers(0, 500))}",
                 "x" * int(rng.integers(0, 30 if long else 2)), bag_cell(rng, 20 if long else 1, sep)]
        lines.append("\t".join(cells))
    return lines


def write(tmp_path: Path, lines: list, name: str = "bags.tsv") -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join((x.encode() if isinstance(x, str) else x) + b"\n" for x in lines))
    return path


SPLITS = {  # (num_threads, block_bytes, min_range_bytes, stream)
    "one_thread": (1, 1 << 20, 256 << 10, False),
    "one_thread_tiny_blocks": (1, 4096, 512, False),
    "two_threads_tiny_blocks": (2, 4096, 512, False),
    "one_thread_streamed": (1, 4096, 512, True),
    "two_threads_streamed": (2, 8192, 256, True),
}


@pytest.mark.parametrize("split", SPLITS)
def test_generated_bags_match_reference(tmp_path, np_rng, split):
    threads, block, min_range, stream = SPLITS[split]
    path = write(tmp_path, generated_lines(np_rng, 3000))
    spec = make_spec(GEN_COLUMNS, GEN_BUCKETS, num_bags=2, delimiter="\t", num_threads=threads, block_bytes=block,
                     min_range_bytes=min_range)
    want = reference(path.read_bytes(), spec)
    assert len(want["sparse"]) == 3000 and (want["bag_lengths"] > 1).any()
    assert_same(read_native(path, spec, stream=stream), want)


def test_other_separator_and_crlf(tmp_path, np_rng):
    lines = [x + "\r" for x in generated_lines(np_rng, 400, sep="|")]
    path = write(tmp_path, lines)
    spec = make_spec(GEN_COLUMNS, GEN_BUCKETS, num_bags=2, delimiter="\t", bag_separator="|")
    want = reference(path.read_bytes(), spec)
    assert_same(read_native(path, spec), want)
    # '^' is an ordinary byte of a value under another separator.
    path = write(tmp_path, ["1\tu\ta^b|c\ti\t\t^"], "caret.tsv")
    got = read_native(path, spec)
    assert got["bag_lengths"].tolist() == [[2, 1]]
    assert_same(got, reference(path.read_bytes(), spec))


# ------------------------------------------------------------------------------------------------
# Bad lines

BAD = [  # (line, column, reason) with GEN_COLUMNS; the good bag cells before a bad one are not empty
    ("0\tu1\ta^^b\ti1\t\tccc", "hist", "bad_sequence"),
    ("0\tu1\tbb^\ti1\t\tccc", "hist", "bad_sequence"),
    ("0\tu1\t^bb\ti1\t\tccc", "hist", "bad_sequence"),
    ("0\tu1\tbb^a\ti1\t\tccc^a^^", "tags", "bad_sequence"),  # after another bag column's values
    ("1\tu1\ta^bb^ccc\ti1\t\ta^b\xffc", "tags", "invalid_utf8"),
    ("1\tu1\ta^bb\ti\xff\t\ta^b", "item", "invalid_utf8"),  # a bad one-hot field after a bag
    ("1\tu1\ta^bb^\xff\ti1\t\ta", "hist", "invalid_utf8"),  # the first problem from the left counts
    ("1\tu1\ta^bb\ti1\t\ta^b\tsurplus", "tags", "field_count"),
    ("1\tu1\ta^bb\ti1", "note", "field_count"),
    ("2\tu1\ta^bb\ti1\t\ta^b", "y", "bad_label"),
    ("2\tu1\ta^bb\ti1\t\t^", "y", "bad_label"),  # not the bad bag right of it
    ("1\tu1\ta^bb\ti\xff\t\ta^^b", "item", "invalid_utf8"),
]


def encode(line: str) -> bytes:
    """A BAD line's bytes: ASCII, and \\xff for a byte that is not UTF-8."""
    return line.encode("latin-1")


@pytest.mark.parametrize("bad", BAD, ids=[f"{b[1]}-{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_line_error_names_line_field_and_reason(tmp_path, np_rng, bad):
    text, column, reason = bad
    lines = generated_lines(np_rng, 40)
    lines.insert(17, encode(text))
    path = write(tmp_path, lines)
    spec = make_spec(GEN_COLUMNS, GEN_BUCKETS, num_bags=2, delimiter="\t")
    with pytest.raises(ref.BadLine) as want:
        reference(path.read_bytes(), spec)
    assert (want.value.line, want.value.field, want.value.reason) == (18, column, reason)
    with pytest.raises(_native.ParseFailure) as got:
        read_native(path, spec)
    line, field, why, shown = got.value.args[:4]
    assert (line, field, why) == (18, column, reason)
    if reason != "field_count":
        assert shown == encode(text).split(b"\t")[[c[1] for c in GEN_COLUMNS].index(column)]


@pytest.mark.parametrize("split", ["one_thread", "two_threads_tiny_blocks", "two_threads_streamed"])
def test_bad_lines_skipped_leave_no_values(tmp_path, np_rng, split):
    threads, block, min_range, stream = SPLITS[split]
    lines = generated_lines(np_rng, 2000)
    # Bad lines everywhere, also first and last, so they fall at range and block edges too.
    where = sorted(np_rng.choice(len(lines), size=300, replace=False).tolist() + [0, len(lines)])
    for k, at in enumerate(reversed(where)):
        lines.insert(at, encode(BAD[k % len(BAD)][0]))
    path = write(tmp_path, lines)
    spec = make_spec(GEN_COLUMNS, GEN_BUCKETS, num_bags=2, delimiter="\t", skip=True, num_threads=threads,
                     block_bytes=block, min_range_bytes=min_range)
    want = reference(path.read_bytes(), spec)
    assert len(want["sparse"]) == 2000 and sum(want["skipped"].values()) == 302
    assert set(want["skipped"]) == {b[2] for b in BAD}
    assert_same(read_native(path, spec, stream=stream), want)


def test_bad_bag_values_are_not_kept(tmp_path):
    """The good values of a dropped line's earlier bag column (and those of the bad column before
    its bad value) are absent: the bags hold exactly the kept rows' values."""
    lines = ["1\tu\tkeep1\ti\t\tkeep2",
             "1\tu\tdrop1^drop2\ti\t\tdrop3^^x",
             "1\tu\tdrop4\ti\xff\t\tdrop5",
             "1\tu\tdrop6^drop7\ti\t\tdrop8^\xff",
             "0\tu\tkeep3^keep4\ti\t\t"]
    path = write(tmp_path, [encode(x) for x in lines])
    spec = make_spec(GEN_COLUMNS, GEN_BUCKETS, num_bags=2, delimiter="\t", skip=True)
    got = read_native(path, spec)
    assert got["skipped"] == {"bad_sequence": 1, "invalid_utf8": 2}
    assert got["bag_lengths"].tolist() == [[1, 1], [2, 1]]

    def row(f, token):
        return hashing.row_id(hashing.hash_key(hashing.text_value(token), 0, spec["field_ids"][f]), f,
                              np.asarray(spec["offsets"]), GEN_BUCKETS)

    assert got["bag_values"][0].tolist() == [row(2, "keep1"), row(2, "keep3"), row(2, "keep4")]
    assert got["bag_values"][1].tolist() == [row(3, "keep2"), spec["offsets"][3]]


# ------------------------------------------------------------------------------------------------
# Keys, no bags, spec checks


@pytest.mark.parametrize("threads", [1, 2])
def test_keys_mode(tmp_path, np_rng, threads):
    path = write(tmp_path, generated_lines(np_rng, 1500))
    spec = make_spec(GEN_COLUMNS, GEN_BUCKETS, num_bags=2, delimiter="\t", keys=True, seed=12345,
                     num_threads=threads, block_bytes=4096, min_range_bytes=512)
    got = read_native(path, spec)
    want = reference(path.read_bytes(), spec)
    assert_same(got, want)
    assert (got["bag_values"][0] == 0).any()  # an empty cell: the missing key


def test_no_bags_output_is_unchanged(tmp_path, np_rng):
    """num_bags = 0 (or absent): no bag keys, and the same rows as before."""
    columns = [c if c[0] != "textseq" else ("ignore", c[1], -1, -1, False) for c in GEN_COLUMNS]
    path = write(tmp_path, generated_lines(np_rng, 500))
    spec = make_spec(columns, GEN_BUCKETS[:2], num_bags=0, delimiter="\t")
    got = _native.Reader(str(path), spec).read_all()
    assert set(got) == NO_BAG_KEYS
    del spec["num_bags"]
    again = _native.Reader(str(path), spec).read_all()
    assert set(again) == NO_BAG_KEYS
    np.testing.assert_array_equal(got["sparse"], again["sparse"])
    want = reference(path.read_bytes(), dict(spec, num_bags=0))
    np.testing.assert_array_equal(got["sparse"], want["sparse"])
    np.testing.assert_array_equal(got["labels"], want["labels"])
    # The separator only matters with bags: '^' may then be the delimiter.
    caret = write(tmp_path, ["1^u^a^i^^b"], "caret.csv")
    assert _native.Reader(str(caret), dict(spec, delimiter="^")).read_all()["sparse"].shape == (1, 2)


@pytest.mark.parametrize("change, message", [
    ({"columns": [c if c[1] != "tags" else ("textseq", "tags", -1, 1, False) for c in GEN_COLUMNS]},
     "must be a bag field"),
    ({"columns": [c if c[1] != "tags" else ("text", "tags", -1, 3, False) for c in GEN_COLUMNS]},
     "only a textseq column"),
    ({"columns": [c if c[1] != "tags" else ("textseq", "tags", -1, 2, False) for c in GEN_COLUMNS]},
     "exactly one textseq column"),
    ({"num_bags": 5}, "num_bags"),
    ({"num_bags": -1}, "num_bags"),
    ({"bag_separator": "\t"}, "delimiter"),
    ({"bag_separator": "\n"}, "line break"),
    ({"bag_separator": "\r"}, "line break"),
    ({"bag_separator": "^^"}, "one byte"),
    ({"bag_separator": ""}, "one byte"),
])
def test_bad_specs(tmp_path, change, message):
    path = write(tmp_path, ["1\tu\ta\ti\t\tb"])
    spec = dict(make_spec(GEN_COLUMNS, GEN_BUCKETS, num_bags=2, delimiter="\t"), **change)
    with pytest.raises(ValueError, match=message):
        _native.Reader(str(path), spec)
