"""read_delimited under a DelimitedSchema against a csv-module reference (Taobao sample)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import reference_reader as ref
from mlfast import reader

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
