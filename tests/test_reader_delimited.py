"""read_delimited under a DelimitedSchema against a csv-module reference (Taobao sample)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import reference_reader as ref
from mlfast.io import reader

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets_raw" / "taobao_ad_tiny_fuxictr"
FILES = [DATA / "train_sample.csv", DATA / "test_sample.csv"]
HEADER = FILES[0].read_text().split("\n")[0].split(",") if FILES[0].exists() else []
CATEGORICAL = [c for c in HEADER if c not in ("clk", "price")]

pytestmark = pytest.mark.skipif(not FILES[0].exists(), reason="shared/datasets_raw not present")


def assert_matches(d, r: ref.Parsed, buckets=None):
    assert d.field_names == r.field_names and d.dense_names == r.dense_names
    assert d.meta["field_ids"] == r.field_ids
    np.testing.assert_array_equal(d.labels, r.label_array())
    np.testing.assert_array_equal(d.dense, r.dense_array())
    np.testing.assert_array_equal(d.dense_missing, r.missing_array())
    np.testing.assert_array_equal(d.sparse, r.sparse(buckets))


@pytest.mark.parametrize("path", FILES, ids=["train", "test"])
@pytest.mark.parametrize("transform", ["log", "none"])
def test_taobao_matches_csv_reference(path, transform, np_rng):
    seed = int(np_rng.integers(0, 1 << 63))
    buckets = [int(b) for b in np_rng.integers(1, 1 << 30, size=len(CATEGORICAL))]
    schema = reader.DelimitedSchema(label="clk", numeric=["price"], categorical=CATEGORICAL,
                                    numeric_transform=transform)
    d = reader.read_delimited(path, schema, hash_buckets=buckets, hash_seed=seed, cache=False)
    r = ref.delimited(path, delimiter=",", header=True, label="clk", numeric=["price"], categorical=CATEGORICAL,
                      transform=transform, seed=seed)
    assert_matches(d, r, buckets)
    assert d.num_rows == 100 and d.dense.shape == (100, 1)
    # Empty cells (pvalue_level, new_user_class_level) are missing: the field's first row.
    col = CATEGORICAL.index("pvalue_level")
    empty = [row.split(",")[HEADER.index("pvalue_level")] == "" for row in path.read_text().split("\n")[1:101]]
    assert any(empty)
    assert (d.sparse[np.asarray(empty), col] == d.field_offsets[col]).all()


def test_click_sequence_is_one_text_value():
    schema = reader.DelimitedSchema(label="clk", categorical=["click_sequence"])
    d = reader.read_delimited(FILES[0], schema, keys=True, cache=False)
    text = FILES[0].read_text().split("\n")[1].split(",")[-1]
    assert "^" in text
    want = ref.hashing.hash_key(ref.hashing.text_value(text), 0, HEADER.index("click_sequence") + 1)
    assert int(d.sparse[0, 0].astype(np.uint64)) == want


def test_columns_by_index_without_header(tmp_path):
    body = FILES[0].read_bytes().split(b"\n", 1)[1]
    path = tmp_path / "nohead.csv"
    path.write_bytes(body)
    idx = [HEADER.index(c) for c in CATEGORICAL]
    d = reader.read_delimited(path, reader.DelimitedSchema(header=False, label=0, numeric=[9], categorical=idx),
                              cache=False)
    named = reader.read_delimited(FILES[0], reader.DelimitedSchema(label="clk", numeric=["price"],
                                                                   categorical=CATEGORICAL), cache=False)
    np.testing.assert_array_equal(d.sparse, named.sparse)  # field ids are column numbers either way
    np.testing.assert_array_equal(d.dense, named.dense)
    assert d.field_names == [f"col{i}" for i in idx]


def test_tab_delimited_and_order_of_fields(tmp_path):
    path = tmp_path / "log.tsv"
    path.write_text("y\tb\ta\tx\n1\tq\tp\t2.5\n0\t\tp\t-1e3\n")
    schema = reader.DelimitedSchema(delimiter="\t", label="y", numeric=["x"], categorical=["a", "b"])
    d = reader.read_delimited(path, schema, cache=False)
    r = ref.delimited(path, delimiter="\t", header=True, label="y", numeric=["x"], categorical=["a", "b"])
    assert_matches(d, r)
    assert d.field_names == ["a", "b"] and d.meta["field_ids"] == [3, 2]
    assert d.dense[:, 0].tolist() == [np.float32(np.log1p(2.5)), np.float32(-np.log1p(1000.0))]
    assert int(d.sparse[1, 1]) == int(d.field_offsets[1])  # empty b: missing


@pytest.mark.parametrize("schema,match", [
    (reader.DelimitedSchema(label="nope"), "not in the header"),
    (reader.DelimitedSchema(label="clk", categorical=["clk"]), "both label and categorical"),
    (reader.DelimitedSchema(label=99), "out of range"),
    (reader.DelimitedSchema(delimiter="ab"), "one ASCII character"),
    (reader.DelimitedSchema(delimiter="\n"), "line break"),
    (reader.DelimitedSchema(numeric=["price"], numeric_transform="sqrt"), "numeric_transform"),
    (reader.DelimitedSchema(header=False, label="clk"), "0-based index"),
])
def test_schema_errors(schema, match):
    with pytest.raises(ValueError, match=match):
        reader.read_delimited(FILES[0], schema, cache=False)


# ---------------------------------------------------------------------------------------------
# Multi-hot sequence columns (FuxiCTR's click_sequence, values separated by '^')

def sequence_reference(path, column: str, sep: str, seed: int, base: int, buckets: int, keys: bool = False):
    """Per row, the ids of ``column``'s values as the hashing module defines them (csv module,
    plain Python): an empty cell is the field's missing row (key 0 with keys=True)."""
    import csv

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    col = rows[0].index(column)
    out = []
    for r in rows[1:]:
        if r[col] == "":
            out.append([0 if keys else base])
            continue
        ks = [ref.key(ref.parse_text(v.encode()), seed, col + 1) for v in r[col].split(sep)]
        out.append([(k or 1) - (1 << 64) * ((k or 1) >= 1 << 63) if keys else base + 1 + k % buckets for k in ks])
    return out


def bag_lists(bag):
    return [bag.values[bag.offsets[i]:bag.offsets[i + 1]].tolist() for i in range(bag.num_rows)]


@pytest.mark.parametrize("path", FILES, ids=["train", "test"])
def test_taobao_click_sequence_as_a_bag_field(path, np_rng, tmp_path):
    seed = int(np_rng.integers(0, 1 << 63))
    cats = [c for c in CATEGORICAL if c != "click_sequence"]
    schema = reader.DelimitedSchema(label="clk", numeric=["price"], categorical=cats, sequence=["click_sequence"])
    d = reader.read_delimited(path, schema, hash_seed=seed, hash_buckets=1000, cache=False)
    r = ref.delimited(path, delimiter=",", header=True, label="clk", numeric=["price"], categorical=cats, seed=seed)
    # the one-hot part is what it is without the bag column
    np.testing.assert_array_equal(d.labels, r.label_array())
    np.testing.assert_array_equal(d.dense, r.dense_array())
    np.testing.assert_array_equal(d.sparse, r.sparse([1000] * len(cats)))
    assert d.field_names == cats + ["click_sequence"] and d.num_bags == 1 and d.num_fields == len(cats) + 1
    assert len(d.field_offsets) == len(cats) + 2 and d.table_rows == 1001 * (len(cats) + 1)
    expected = sequence_reference(path, "click_sequence", "^", seed, int(d.field_offsets[-2]), 1000)
    assert bag_lists(d.bags[0]) == expected
    assert max(len(x) for x in expected) > 1 and any(x == [int(d.field_offsets[-2])] for x in expected)
    # keys mode (vocabularies), streaming chunks and the cache give the same bags
    k = reader.read_delimited(path, schema, hash_seed=seed, keys=True, cache=False)
    assert bag_lists(k.bags[0]) == sequence_reference(path, "click_sequence", "^", seed, 0, 0, keys=True)
    chunks = list(reader.iter_delimited_chunks(path, schema, hash_seed=seed, hash_buckets=1000, chunk_bytes=2000))
    assert len(chunks) > 1 and sum((bag_lists(c.bags[0]) for c in chunks), []) == expected
    for status in ("miss", "hit"):
        c = reader.read_delimited(path, schema, hash_seed=seed, hash_buckets=1000, cache_dir=tmp_path)
        assert c.meta["cache"]["status"] == status and bag_lists(c.bags[0]) == expected


def test_bad_sequences_name_file_line_and_column(tmp_path):
    p = tmp_path / "seq.csv"
    p.write_text("clk,user,hist\n1,a,x^y\n0,b,x^^y\n1,c,\n0,d,^x\n1,e,z\n")
    schema = reader.DelimitedSchema(label="clk", categorical=["user"], sequence=["hist"])
    with pytest.raises(reader.ParseError) as e:
        reader.read_delimited(p, schema, cache=False)
    assert (e.value.line, e.value.field, e.value.reason) == (3, "hist", "bad_sequence")
    assert str(p) in str(e.value) and "line 3" in str(e.value)
    d = reader.read_delimited(p, schema, cache=False, on_bad_line="skip")
    assert d.skipped == {"bad_sequence": 2} and d.num_rows == 3 and [len(x) for x in bag_lists(d.bags[0])] == [2, 1, 1]
    with pytest.raises(ValueError, match="sequence_separator"):
        reader.read_delimited(p, reader.DelimitedSchema(label="clk", sequence=["hist"], sequence_separator=","))
    with pytest.raises(ValueError, match="both categorical and sequence"):
        reader.read_delimited(p, reader.DelimitedSchema(label="clk", categorical=["hist"], sequence=["hist"]))


def test_sequence_max_len_keeps_each_lists_last_values(tmp_path):
    path = FILES[0]
    full = reader.DelimitedSchema(label="clk", categorical=["userid"], sequence=["click_sequence"])
    short = reader.DelimitedSchema(label="clk", categorical=["userid"], sequence=["click_sequence"],
                                   sequence_max_len=1)
    expected = [x[-1:] for x in bag_lists(reader.read_delimited(path, full, cache=False).bags[0])]
    for status in ("miss", "hit"):  # the cache holds the parsed lists; the cut applies on top
        d = reader.read_delimited(path, short, cache_dir=tmp_path)
        assert d.meta["cache"]["status"] == status and bag_lists(d.bags[0]) == expected
    with pytest.raises(ValueError, match="sequence_max_len"):
        reader.read_delimited(path, reader.DelimitedSchema(label="clk", sequence=["click_sequence"],
                                                           sequence_max_len=0))
