"""Parquet and Arrow IPC input: the same table read as CSV (DelimitedSchema) and as Parquet / Arrow
gives identical CTRData arrays; both agree with a plain-Python reference value by value; bad values
follow on_bad_line with errors naming file, row and column; damaged files are CorruptInputError;
the command line trains from a Parquet file, a directory and a glob."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.compute as pc  # noqa: E402
import pyarrow.csv as pa_csv  # noqa: E402
import pyarrow.feather as feather  # noqa: E402
import pyarrow.ipc as ipc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import reference_reader as ref  # noqa: E402
from mlfast import _native  # noqa: E402
from mlfast.io import arrow, reader  # noqa: E402
from mlfast.io.reader import CorruptInputError, DelimitedSchema, ParseError  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets_raw"
TAOBAO = DATA / "taobao_ad_tiny_fuxictr" / "train_sample.csv"
AVAZU = DATA / "avazu_head10k" / "avazu_train_head10k.csv"

pytestmark = pytest.mark.skipif(not TAOBAO.exists(), reason="shared/datasets_raw not present")

SCHEMA = DelimitedSchema(label="clk", numeric=["f64", "f32", "i32"],
                         categorical=["s", "i64", "u8", "b", "big"], sequence=["seq_s", "seq_i"])
WORDS = ["a", "b", "New York, NY", 'say "hi"', "é广𝄞", "x" * 40, "0", "-1", "abc^def"]


def random_table(rng: np.random.Generator, n: int) -> pa.Table:
    """Every column kind with nulls, empties, unicode, quotes and extreme numbers; no bad values."""
    def pick(values, p_null=0.1):
        return [None if rng.random() < p_null else values[int(rng.integers(len(values)))] for _ in range(n)]

    floats = [0.0, -0.0, 1.5, -2.25, 3.9, 1e-7, 1e300, -1e-300, 123456.789, 5e-324, 0.1 + 0.2]
    words = [w for w in WORDS if "^" not in w]  # a CSV cell cannot hold the separator inside a value
    return pa.table({
        "clk": pa.array(rng.integers(0, 2, n), pa.int64()),
        "s": pa.array(pick(WORDS + [""]), pa.string()),
        "ignored": pa.array(pick(["zz", "yy"]), pa.string()),
        "f64": pa.array(pick(floats), pa.float64()),
        "i64": pa.array(pick([0, -1, 7, 2**62, -(2**63), 2**63 - 1, 10**15]), pa.int64()),
        "f32": pa.array(pick([0.1, 3.9, -7.25, 1e-20, 3.4e38, 123456789.0, 0.0]), pa.float32()),
        "u8": pa.array(pick([0, 1, 255, 17]), pa.uint8()),
        "i32": pa.array(pick([0, -5, 2**31 - 1, 42]), pa.int32()),
        "b": pa.array(pick([True, False]), pa.bool_()),
        "big": pa.array(pick([0, 2**64 - 1, 12345]), pa.uint64()),
        "seq_s": pa.array([None if rng.random() < 0.1 else
                           [words[int(rng.integers(len(words)))] for _ in range(int(rng.integers(0, 5)))]
                           for _ in range(n)], pa.list_(pa.string())),
        "seq_i": pa.array([None if rng.random() < 0.1 else [int(x) for x in rng.integers(-5, 10**9, int(rng.integers(0, 4)))]
                           for _ in range(n)], pa.large_list(pa.int64())),
    })


def write_csv(table: pa.Table, path: Path, sep: str = "^") -> Path:
    """The table as CSV (pyarrow's writer), list columns joined by the sequence separator."""
    cols = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            col = pa.array([None if v is None else sep.join("" if x is None else str(x) for x in v)
                            for v in col.to_pylist()], pa.string())
        cols[name] = col
    pa_csv.write_csv(pa.table(cols), path)
    return path


def write_parquet(table: pa.Table, path: Path, **kw) -> Path:
    pq.write_table(table, path, **kw)
    return path


def assert_same_data(a, b):
    for name in ("labels", "dense", "dense_missing", "sparse", "field_offsets"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, (name, x.dtype, y.dtype, x.shape, y.shape)
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.field_names == b.field_names and a.dense_names == b.dense_names
    assert a.skipped == b.skipped
    assert len(a.bags) == len(b.bags)
    for s, (x, y) in enumerate(zip(a.bags, b.bags)):
        np.testing.assert_array_equal(x.offsets, y.offsets, err_msg=f"bag {s} offsets")
        np.testing.assert_array_equal(x.values, y.values, err_msg=f"bag {s} values")


def assert_matches_reference(d, r, buckets=None, keys=False):
    np.testing.assert_array_equal(d.labels, r.label_array())
    np.testing.assert_array_equal(d.dense, r.dense_array())
    np.testing.assert_array_equal(d.dense_missing, r.missing_array())
    one_hot = buckets[:len(r.field_names)] if isinstance(buckets, list) else buckets  # bag fields come last
    np.testing.assert_array_equal(d.sparse, r.key_matrix() if keys else r.sparse(one_hot))
    for bag, (offsets, values) in zip(d.bags, r.bag_arrays(buckets, keys)):
        np.testing.assert_array_equal(bag.offsets, offsets)
        np.testing.assert_array_equal(bag.values, values)
    assert d.skipped == dict(r.skipped)


@pytest.mark.parametrize("options", [{}, {"hash_buckets": 1000}, {"hash_buckets": "list"}, {"hash_seed": "random"},
                                     {"keys": True}])
def test_csv_and_parquet_give_identical_arrays(tmp_path, np_rng, options):
    table = random_table(np_rng, 300)
    opts = dict(options)
    if opts.get("hash_buckets") == "list":
        opts["hash_buckets"] = [int(x) for x in np_rng.integers(1, 5000, 7)]
    if opts.get("hash_seed") == "random":
        opts["hash_seed"] = int(np_rng.integers(0, 2**63))
    csv = reader.read_delimited(write_csv(table, tmp_path / "t.csv"), SCHEMA, cache=False, **opts)
    par = reader.read(write_parquet(table, tmp_path / "t.parquet", row_group_size=97), schema=SCHEMA, cache=False,
                      **opts)
    assert csv.num_rows == par.num_rows == 300 and par.meta["format"] == "parquet"
    assert_same_data(csv, par)
    r = ref.columnar(table, label="clk", numeric=SCHEMA.numeric, categorical=SCHEMA.categorical,
                     sequence=SCHEMA.sequence, seed=opts.get("hash_seed", 0))
    assert_matches_reference(par, r, opts.get("hash_buckets"), opts.get("keys", False))


def test_arrow_ipc_feather_stream_directory_and_glob_equal_parquet(tmp_path, np_rng):
    table = random_table(np_rng, 250)
    want = reader.read(write_parquet(table, tmp_path / "t.parquet"), schema=SCHEMA, cache=False)
    with ipc.new_file(tmp_path / "t.arrow", table.schema) as w:
        for batch in table.to_batches(max_chunksize=60):
            w.write_batch(batch)
    with ipc.new_stream(tmp_path / "t.arrows", table.schema) as w:
        w.write_table(table, max_chunksize=33)
    feather.write_feather(table, tmp_path / "t.feather", compression="zstd")
    for name, fmt in (("t.arrow", "arrow"), ("t.arrows", "arrow-stream"), ("t.feather", "arrow")):
        assert arrow.file_format(tmp_path / name) == fmt
        got = reader.read(tmp_path / name, schema=SCHEMA, cache=False, num_threads=1)
        assert got.meta["format"] == fmt
        assert_same_data(want, got)
    parts = tmp_path / "parts"
    parts.mkdir()
    for k, (a, b) in enumerate([(0, 90), (90, 91), (91, 250)]):
        write_parquet(table.slice(a, b - a), parts / f"part-{k:03d}.parquet")
    (parts / "_SUCCESS").write_bytes(b"")
    (parts / ".part-000.parquet.crc").write_bytes(b"junk")
    for path in (parts, parts / "part-*.parquet"):
        got = reader.read(path, schema=SCHEMA, cache=False)
        assert got.meta["files"] == [str(parts / f"part-{k:03d}.parquet") for k in range(3)]
        assert_same_data(want, got)
    with pytest.raises(FileNotFoundError, match="no file matches"):
        reader.read(tmp_path / "nothing-*.parquet", schema=SCHEMA)
    other = tmp_path / "other"
    other.mkdir()
    write_parquet(table.select(["clk", "s", "f64"]), other / "a.parquet")
    write_parquet(table.select(["clk", "f64", "s"]), other / "b.parquet")
    with pytest.raises(ValueError, match=r"b\.parquet: its columns .* differ"):
        reader.read(other, schema=DelimitedSchema(label="clk", categorical=["s"]), cache=False)


def test_batches_threads_chunks_and_cache(tmp_path, np_rng, monkeypatch):
    monkeypatch.setattr(arrow, "MIN_RANGE_ROWS", 16)  # split small batches across threads
    table = random_table(np_rng, 400)
    path = write_parquet(table, tmp_path / "t.parquet", row_group_size=128)
    want = arrow.read_columnar(path, SCHEMA, cache=False, num_threads=1)
    for batch_rows, threads in ((1, 1), (7, 3), (128, 2), (1000, 4)):
        got = arrow.read_columnar(path, SCHEMA, cache=False, num_threads=threads, batch_rows=batch_rows)
        assert_same_data(want, got)
        chunks = list(arrow.iter_columnar_chunks(path, SCHEMA, batch_rows=batch_rows, num_threads=threads))
        ends = [(c.meta["first_line"], c.meta["end_line"]) for c in chunks]
        assert ends[0][0] == 1 and ends[-1][1] == 401 and all(a[1] == b[0] for a, b in zip(ends, ends[1:]))
        assert all(len(c) <= batch_rows for c in chunks) and len(chunks) >= 400 // batch_rows
        assert sum(len(c) for c in chunks) == 400
        np.testing.assert_array_equal(np.concatenate([c.sparse for c in chunks]), want.sparse)
        np.testing.assert_array_equal(np.concatenate([c.bags[1].values for c in chunks]), want.bags[1].values)
    cache_dir = tmp_path / "cache"
    first = arrow.read_columnar(path, SCHEMA, cache_dir=cache_dir)
    second = arrow.read_columnar(path, SCHEMA, cache_dir=cache_dir)
    assert (first.meta["cache"]["status"], second.meta["cache"]["status"]) == ("miss", "hit")
    assert isinstance(second.sparse, np.memmap) and second.meta["lines"] == 400
    assert_same_data(want, second)


def test_real_samples_converted_to_parquet(tmp_path):
    """The real Taobao and Avazu samples, converted by pyarrow (the sequence split into a list),
    read exactly as the original CSV files are."""
    table = pa_csv.read_csv(TAOBAO)
    seq = pc.split_pattern(table["click_sequence"], "^")
    ints = pa.array([[int(x) for x in v if x] for v in seq.to_pylist()], pa.list_(pa.int64()))
    for name, col in (("list", seq), ("int_list", ints), ("text", table["click_sequence"])):
        t = table.set_column(table.column_names.index("click_sequence"), "click_sequence", col)
        schema = DelimitedSchema(label="clk", numeric=["price", "age_level"],
                                 categorical=["userid", "adgroup_id", "pid", "cate_id", "brand", "pvalue_level",
                                              "new_user_class_level"], sequence=["click_sequence"])
        csv = reader.read_delimited(TAOBAO, schema, cache=False, hash_buckets=5000, hash_seed=3)
        par = reader.read(write_parquet(t, tmp_path / f"taobao_{name}.parquet"), schema=schema, cache=False,
                          hash_buckets=5000, hash_seed=3)
        assert_same_data(csv, par)
    avazu = pa_csv.read_csv(AVAZU, convert_options=pa_csv.ConvertOptions(column_types={"id": pa.string()}))
    names = [c for c in avazu.column_names if c not in ("id", "click")]
    schema = DelimitedSchema(label="click", categorical=names)
    csv = reader.read_delimited(AVAZU, schema, cache=False)
    par = reader.read(write_parquet(avazu, tmp_path / "avazu.parquet", row_group_size=4000), schema=schema,
                      cache=False)
    assert par.num_rows == 9999
    assert_same_data(csv, par)


def test_vocabulary_mode_through_prepare_data(tmp_path, np_rng):
    from mlfast.api import prepare_data

    table = random_table(np_rng, 300)
    csv, par = write_csv(table, tmp_path / "t.csv"), write_parquet(table, tmp_path / "t.parquet")
    opts = {"schema": SCHEMA, "min_count": 2, "cache": False}
    a, b = prepare_data(str(csv), reader=dict(opts)), prepare_data(str(par), reader=dict(opts))
    for split in ("train", "valid", "test"):
        assert_same_data(a.splits[split].data, b.splits[split].data)
    va, vb = a.vocab.to_state(), b.vocab.to_state()
    assert (va["min_count"], va["field_names"], va["num_bags"]) == (vb["min_count"], vb["field_names"], vb["num_bags"])
    for name in ("keys", "rows"):
        assert len(va[name]) == len(vb[name]) == 7
        for x, y in zip(va[name], vb[name]):
            np.testing.assert_array_equal(x, y)


BAD_CASES = [
    # (column, value, reason)
    ("clk", 2, "bad_label"),
    ("clk", None, "bad_label"),
    ("f64", float("nan"), "bad_float"),
    ("f64", float("-inf"), "bad_float"),
    ("f32", float("inf"), "bad_float"),
    ("seq_s", ["a", "", "b"], "bad_sequence"),
    ("seq_s", ["a", None], "bad_sequence"),
]


@pytest.mark.parametrize("column,value,reason", BAD_CASES, ids=[f"{c[0]}-{c[1]}" for c in BAD_CASES])
def test_bad_values_error_or_skip_like_csv(tmp_path, np_rng, column, value, reason):
    table = random_table(np_rng, 40)
    rows = table.to_pylist()
    rows[16][column] = value
    table = pa.Table.from_pylist(rows, schema=table.schema)
    path = write_parquet(table, tmp_path / "bad.parquet", row_group_size=10)
    with pytest.raises(ParseError) as info:
        reader.read(path, schema=SCHEMA, cache=False)
    e = info.value
    assert (e.path, e.line, e.field, e.reason) == (str(path), 17, column, reason)
    msg = str(e)
    assert f"{path}, row 17, column {column}" in msg and f"[{reason}]" in msg
    assert ("got null" in msg) == (value is None)
    skipped = reader.read(path, schema=SCHEMA, cache=False, on_bad_line="skip")
    assert skipped.num_rows == 39 and skipped.skipped == {reason: 1}
    csv = reader.read_delimited(write_csv(table, tmp_path / "bad.csv"), SCHEMA, cache=False, on_bad_line="skip")
    assert_same_data(csv, skipped)
    chunks = list(arrow.iter_columnar_chunks(path, SCHEMA, batch_rows=3, on_bad_line="skip"))
    assert sum(c.skipped.get(reason, 0) for c in chunks) == 1 and sum(len(c) for c in chunks) == 39


def test_random_bad_values_agree_with_reference(tmp_path, np_rng):
    table = random_table(np_rng, 200)
    rows = table.to_pylist()
    bad = {"clk": [3, None], "f64": [float("nan"), float("inf")], "f32": [float("-inf")],
           "seq_s": [["", "x"], ["x", None]], "s": [b"\xff\xfe"]}
    for _ in range(40):
        r = int(np_rng.integers(len(rows)))
        col = list(bad)[int(np_rng.integers(len(bad)))]
        rows[r][col] = bad[col][int(np_rng.integers(len(bad[col])))]
    schema = table.schema.set(table.schema.get_field_index("s"), pa.field("s", pa.binary()))
    table = pa.Table.from_pylist(rows, schema=schema)
    path = write_parquet(table, tmp_path / "bad.parquet", row_group_size=50)
    d = reader.read(path, schema=SCHEMA, cache=False, on_bad_line="skip", hash_seed=5)
    r = ref.columnar(table, label="clk", numeric=SCHEMA.numeric, categorical=SCHEMA.categorical,
                     sequence=SCHEMA.sequence, seed=5, on_bad_line="skip")
    assert sum(d.skipped.values()) > 10
    assert_matches_reference(d, r)
    try:
        ref.columnar(table, label="clk", numeric=SCHEMA.numeric, categorical=SCHEMA.categorical,
                     sequence=SCHEMA.sequence)
        expected = None
    except ref.BadLine as b:
        expected = (b.line, b.field, b.reason)
    with pytest.raises(ParseError) as info:
        reader.read(path, schema=SCHEMA, cache=False)
    assert (info.value.line, info.value.field, info.value.reason) == expected


def test_types_other_than_native_ones(tmp_path):
    """Dictionary, timestamp, float and decimal columns are read as their text (what the CSV holds);
    a type no role can take is refused up front, naming the column."""
    import datetime
    import decimal

    t = pa.table({
        "clk": pa.array([0, 1, 1], pa.int8()),
        "dict": pa.array(["x", None, "y"]).dictionary_encode(),
        "ts": pa.array([datetime.datetime(2017, 5, 6, 1, 2, 3), None, datetime.datetime(2020, 1, 1)],
                       pa.timestamp("s")),
        "fcat": pa.array([1.0, 2.5, None]),
        "dec": pa.array([decimal.Decimal("3.90"), None, decimal.Decimal("-1.25")], pa.decimal128(5, 2)),
        "f16": pa.array(np.array([0.5, 1.5, -2.0], np.float16)),
    })
    schema = DelimitedSchema(label="clk", numeric=["dec", "f16"], categorical=["dict", "ts", "fcat"])
    path = tmp_path / "t.arrow"
    feather.write_feather(t, path)  # Arrow IPC keeps timestamp[s] (Parquet would store it as [ms])
    got = reader.read(path, schema=schema, cache=False, keys=True)
    expect_text = [[b"x", b"2017-05-06 01:02:03", b"1"], [None, None, b"2.5"], [b"y", b"2020-01-01 00:00:00", None]]
    for r, row in enumerate(expect_text):
        for f, text in enumerate(row):
            k = 0 if text is None else ref.hashing.hash_key(ref.hashing.text_value(text), 0, [2, 3, 4][f]) or 1
            assert int(got.sparse[r, f].view(np.uint64)) == k, (r, f)
    np.testing.assert_array_equal(got.dense[:, 0], np.float32([np.log1p(3.9), 0, -np.log1p(1.25)]))
    np.testing.assert_array_equal(got.dense_missing[:, 0], [False, True, False])
    np.testing.assert_array_equal(got.dense[:, 1], np.float32([np.log1p(0.5), np.log1p(1.5), -np.log1p(2.0)]))
    bad = pa.table({"clk": [0], "st": pa.array([{"a": 1}])})
    pq.write_table(bad, tmp_path / "struct.parquet")
    with pytest.raises(ValueError, match="column 'st' is struct.*cannot be a numeric column"):
        reader.read(tmp_path / "struct.parquet", schema=DelimitedSchema(label="clk", numeric=["st"], categorical=[]))
    with pytest.raises(ValueError, match="needs a schema"):
        reader.read(tmp_path / "struct.parquet")


def test_damaged_files_are_corrupt_input(tmp_path, np_rng):
    table = random_table(np_rng, 200)
    good = write_parquet(table, tmp_path / "good.parquet", row_group_size=50).read_bytes()
    cases = {"truncated.parquet": good[: len(good) // 2], "no_footer.parquet": good[:-8],
             "footer_flip.parquet": good[:-6] + bytes([good[-6] ^ 0xFF]) + good[-5:],
             "not_parquet.parquet": b"hello, world\n" * 10}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CorruptInputError) as info:
            reader.read(tmp_path / name, schema=SCHEMA, cache=False)
        assert info.value.path == str(tmp_path / name) and str(tmp_path / name) in str(info.value), name
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(CorruptInputError, match="empty.parquet: empty file"):
        reader.read(tmp_path / "empty.parquet", schema=SCHEMA)


def test_malformed_buffers_never_read_outside(tmp_path):
    """The native parser checks every buffer against length and offset before reading a value."""
    spec = reader._schema_layout("x", ["clk", "s"], DelimitedSchema(label="clk", categorical=["s"]), "parquet",
                                 named=True, where="the columns", hash_buckets=None, hash_seed=0, keys=False,
                                 on_bad_line="error", expected="2 columns", extra={}).spec
    parser = _native.ArrowParser(dict(spec, num_threads=1, block_bytes=1))
    labels = ("int64", 3, 0, None, None, np.zeros(3, np.int64).tobytes(), None)
    good_offsets = np.array([0, 1, 2, 3], np.int32).tobytes()
    ok = parser.parse([labels, ("utf8", 3, 0, None, good_offsets, b"abc", None)], 3, 1)
    assert ok["sparse"].shape == (3, 1)
    bad = {
        "decreasing offsets": ("utf8", 3, 0, None, np.array([0, 2, 1, 3], np.int32).tobytes(), b"abc", None),
        "offset past the data": ("utf8", 3, 0, None, np.array([0, 1, 2, 99], np.int32).tobytes(), b"abc", None),
        "negative offset": ("utf8", 3, 0, None, np.array([-4, 1, 2, 3], np.int32).tobytes(), b"abc", None),
        "short offsets": ("utf8", 3, 0, None, good_offsets[:8], b"abc", None),
        "short validity": ("utf8", 3, 8, b"\xff", np.arange(12, dtype=np.int32).tobytes(), b"abcdefghijk", None),
        "array offset past the end": ("utf8", 3, 1, None, good_offsets, b"abc", None),
    }
    for what, desc in bad.items():
        with pytest.raises(_native.CorruptInput, match="malformed Arrow data in column s"):
            parser.parse([labels, desc], 3, 1)
    with pytest.raises(_native.CorruptInput, match="malformed Arrow data in column clk: data shorter"):
        parser.parse([("int64", 3, 0, None, None, b"\0" * 16, None), ("utf8", 3, 0, None, good_offsets, b"abc", None)],
                     3, 1)
    with pytest.raises(_native.CorruptInput, match="4 values in a batch of 3 rows"):
        parser.parse([labels, ("utf8", 4, 0, None, good_offsets + good_offsets[:4], b"abcd", None)], 3, 1)


def test_without_pyarrow_the_error_names_the_extra(tmp_path, monkeypatch):
    path = write_parquet(pa.table({"clk": [0, 1], "s": ["a", "b"]}), tmp_path / "t.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"pip install 'mlfast\[parquet\]'") as info:
        reader.read(path, schema=DelimitedSchema(label="clk", categorical=["s"]), cache=False)
    assert isinstance(info.value, ValueError)  # the command line reports it as a usage-level error
    assert arrow.file_format(path) == "parquet"  # telling the format needs no pyarrow


def test_cli_trains_from_parquet_file_directory_and_glob(tmp_path, monkeypatch, capsys):
    from mlfast.cli import main

    monkeypatch.setenv("MLFAST_CACHE_DIR", str(tmp_path / "cache"))
    table = pa_csv.read_csv(TAOBAO)
    table = table.set_column(table.column_names.index("click_sequence"), "click_sequence",
                             pc.split_pattern(table["click_sequence"], "^"))
    parts = tmp_path / "parts"
    parts.mkdir()
    write_parquet(table.slice(0, 50), parts / "a.parquet")
    write_parquet(table.slice(50), parts / "b.parquet")
    single = write_parquet(table, tmp_path / "taobao.parquet")
    args = ["--label", "clk", "--categorical", "userid,adgroup_id,pid,brand", "--numeric", "price", "--sequence",
            "click_sequence", "--peers", "deepfm", "--epochs", "1", "--max-steps", "2", "--batch-size", "16",
            "--quiet"]
    for k, data in enumerate([single, parts, parts / "*.parquet"]):
        out = tmp_path / f"run{k}"
        assert main(["train", str(data), *args, "--out", str(out)]) == 0
        config = json.loads((out / "config.json").read_text())
        assert config["data"]["rows"] == {"train": 80, "valid": 10, "test": 10}
        assert json.loads((out / "metrics.json").read_text())["train"]["samples"] == 32
    try:
        rc = main(["train", str(tmp_path / "none-*.parquet"), *args])
    except SystemExit as e:  # argparse-style usage exit
        rc = e.code
    assert rc == 2 and "training file not found" in capsys.readouterr().err


def test_sequence_lists_of_other_types_and_sliced_lists(tmp_path):
    """Float, fixed-size, dictionary and bool lists: each element as its text (as a CSV cell of them
    joined would hold it); a batch sliced out of a list column keeps its rows."""
    t = pa.table({"clk": [0, 1, 1],
                  "lf": pa.array([[1.5, 2.0], None, [3.25]], pa.list_(pa.float64())),
                  "fsl": pa.array([["a", "b"], ["c", "d"], ["e", "f"]], pa.list_(pa.string(), 2)),
                  "ld": pa.array([["x"], ["y", "x"], []]).cast(pa.list_(pa.dictionary(pa.int32(), pa.string()))),
                  "lb": pa.array([[True], [False, True], None], pa.list_(pa.bool_()))})
    feather.write_feather(t, tmp_path / "t.arrow")
    schema = DelimitedSchema(label="clk", categorical=[], sequence=["lf", "fsl", "ld", "lb"])
    got = reader.read(tmp_path / "t.arrow", schema=schema, cache=False, keys=True, batch_rows=2)
    expect = [[["1.5", "2"], None, ["3.25"]], [["a", "b"], ["c", "d"], ["e", "f"]], [["x"], ["y", "x"], None],
              [["true"], ["false", "true"], None]]
    for s, rows in enumerate(expect):
        want = [0 if row is None else ref.hashing.hash_key(ref.hashing.text_value(x), 0, s + 2) or 1
                for row in rows for x in (row or [None])]
        assert got.bags[s].values.view(np.uint64).tolist() == want, s
    sliced = pa.table({"clk": [0, 1, 0, 1], "q": pa.array([["a"], ["b", "c"], [], ["d"]])}).slice(1)
    feather.write_feather(sliced, tmp_path / "s.arrow")
    d = reader.read(tmp_path / "s.arrow", schema=DelimitedSchema(label="clk", categorical=[], sequence=["q"]),
                    cache=False, keys=True, batch_rows=1)
    assert d.bags[0].lengths.tolist() == [2, 1, 1] and d.labels.tolist() == [1.0, 0.0, 1.0]
    empty = tmp_path / "empty.parquet"
    write_parquet(t.slice(0, 0), empty)
    for cache in (False, True):
        e = reader.read(empty, schema=schema, cache=cache, cache_dir=tmp_path / "cache")
        assert e.num_rows == 0 and e.sparse.shape == (0, 0) and len(e.bags) == 4 and e.meta["lines"] == 0
    assert list(arrow.iter_columnar_chunks(empty, schema)) == []
