"""`mlfast.Featurizer`: raw lines and dicts give exactly the arrays the reader (and vocabulary) give
for the same rows in a file, for Criteo (hashed, unlabelled, vocabulary), Avazu and delimited logs
(bags, truncation, quoting); errors are the reader's; and an exported model fed the featurised lines
gives ``mlfast predict``'s probabilities."""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from mlfast.api import load_run
from mlfast.cli import main
from mlfast.featurize import Featurizer
from mlfast.io.prepare import apply_vocabulary, read_file, reader_options
from mlfast.io.reader import CRITEO_CAT_NAMES, CRITEO_INT_NAMES, DelimitedSchema, ParseError
from mlfast.io.vocab import Vocabulary
from mlfast.models import FeatureSchema
from test_export import CRITEO, CRITEO_TEST, DATA, TAOBAO, TAOBAO_CATS, TOLERANCE, trained_run

AVAZU = DATA / "avazu_head10k" / "avazu_train_head10k.csv"
pytestmark = pytest.mark.skipif(not (CRITEO.exists() and TAOBAO.exists() and AVAZU.exists()),
                                reason="../shared/datasets_raw not present")
TAOBAO_SCHEMA = DelimitedSchema(label="clk", categorical=TAOBAO_CATS, numeric=["price"], sequence=["click_sequence"])

CONFIGS = {  # name: (file, reader options)
    "criteo": (CRITEO, dict(hash_buckets=1000)),
    "criteo_test_no_int_buckets": (CRITEO_TEST, dict(hash_buckets=500, hash_seed=7, int_buckets=False)),
    "criteo_vocab": (CRITEO, dict(min_count=2)),
    "avazu": (AVAZU, dict(hash_buckets=1000)),
    "taobao_bags": (TAOBAO / "test_sample.csv", dict(hash_buckets=1000, schema=TAOBAO_SCHEMA)),
    "taobao_bags_vocab_truncated": (TAOBAO / "test_sample.csv",
                                    dict(min_count=1, schema=dataclasses.replace(TAOBAO_SCHEMA, sequence_max_len=2))),
}


def reference(path: Path, opts: dict) -> tuple:
    """(the file read as a run reads it, a Featurizer with that run's configuration)."""
    ropts = reader_options(cache=False, **opts)
    vocab_mode = ropts["min_count"] is not None
    data = read_file(path, ropts, keys=vocab_mode)
    vocab = None
    if vocab_mode:
        vocab = Vocabulary.fit(data.sparse, data.field_names, ropts["min_count"], bags=data.bags)
        data = apply_vocabulary(data, vocab)
    schema = FeatureSchema.from_data(data, use_dense=True)
    return data, Featurizer(ropts, schema, vocab=vocab, train_path=str(path))


def assert_same(got: dict, data, rows: slice = slice(None)) -> None:
    """Every array of ``got`` (a featurize result) equals ``data``'s (rows ``rows``), dtypes included."""
    d = data.take(rows)
    for key in ("sparse", "dense", "dense_missing"):
        want = getattr(d, key)
        assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
        np.testing.assert_array_equal(got[key], want, err_msg=key)
    if d.labels is None:
        assert "labels" not in got
    else:
        assert got["labels"].dtype == np.float32
        np.testing.assert_array_equal(got["labels"], d.labels)
    assert len(got["bags"]) == len(d.bags)
    for s, ((o, v), b) in enumerate(zip(got["bags"], d.bags)):
        np.testing.assert_array_equal(o, b.offsets)
        np.testing.assert_array_equal(v, b.values)
        assert got[f"bag{s}_offsets"] is o and got[f"bag{s}_values"] is v


def file_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lines_give_the_arrays_of_the_file(name):
    path, opts = CONFIGS[name]
    data, fz = reference(path, opts)
    lines = file_lines(path)
    assert_same(fz.featurize_lines(lines), data)  # the file's lines, header included
    if fz.family == "delimited":  # data lines only: the run's header is put in front
        assert_same(fz.featurize_lines([x.decode() + "\r\n" for x in lines[7:20]]), data, slice(6, 19))
    elif fz.family == "criteo":
        assert_same(fz.featurize_lines([x.decode() for x in lines[5:9]]), data, slice(5, 9))


def _criteo_dict(line: bytes, labelled: bool) -> dict:
    names = (["label"] if labelled else []) + list(CRITEO_INT_NAMES) + list(CRITEO_CAT_NAMES)
    row = dict(zip(names, line.decode().split("\t")))
    out: dict = {}
    for k, v in row.items():
        if v == "":
            continue  # absent = missing
        out[k] = int(v) if k in CRITEO_INT_NAMES or k == "label" else v
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dicts_give_the_arrays_of_the_file(name):
    path, opts = CONFIGS[name]
    data, fz = reference(path, opts)
    if fz.family == "criteo":
        rows = [_criteo_dict(x, data.labels is not None) for x in file_lines(path)[:400]]
        keep = slice(0, 400)
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        keep = slice(None)
        if "click_sequence" in rows[0]:  # a list for the sequence column, None for an empty cell
            for r in rows[::2]:
                r["click_sequence"] = r["click_sequence"].split("^") if r["click_sequence"] else None
            for r in rows:
                r["price"] = float(r["price"]) if r["price"] else None
    assert_same(fz.featurize_dicts(rows), data, keep)


def test_quoted_values_numbers_and_columns_given(tmp_path, np_rng):
    """Values holding the delimiter or quotes, floats, and a log without a header, through dicts."""
    path = tmp_path / "log.csv"
    cities = ["New York, NY", 'say "hi"', '"quoted"', "plain", "", "a,b,c"]
    rows = [{"y": int(np_rng.integers(0, 2)), "city": cities[i % len(cities)], "n": float(np_rng.normal() * 100),
             "seq": [int(x) for x in np_rng.integers(0, 50, 1 + i % 3)], "skip": "x"} for i in range(60)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["y", "skip", "city", "n", "seq"])
        for r in rows:
            w.writerow([r["y"], r["skip"], r["city"], repr(r["n"]), "^".join(map(str, r["seq"]))])
    data, fz = reference(path, dict(hash_buckets=97, schema=DelimitedSchema(label="y", categorical=["city"], numeric=["n"],
                                                                            sequence=["seq"])))
    assert fz.columns == ["y", "skip", "city", "n", "seq"]
    assert_same(fz.featurize_dicts(rows), data)
    assert_same(fz.featurize_lines(file_lines(path)[1:]), data)
    # without a header: columns by index, named col<i> or the index itself
    bare = tmp_path / "bare.csv"
    bare.write_bytes(b"\n".join(file_lines(path)[1:]) + b"\n")
    data, fz = reference(bare, dict(hash_buckets=97, schema=DelimitedSchema(header=False, label=0, categorical=[2],
                                                                            numeric=[3], sequence=[4])))
    by_index = [{0: r["y"], "col2": r["city"], 3: r["n"], "col4": r["seq"]} for r in rows]
    assert_same(fz.featurize_dicts(by_index), data)
    # the header of a run whose training file is gone: given, or the first line
    _, fz = reference(path, dict(hash_buckets=97, schema=DelimitedSchema(label="y", categorical=["city"])))
    gone = Featurizer(fz.reader, fz.schema, train_path=str(tmp_path / "gone.csv"))
    with pytest.raises(ValueError, match="pass columns="):
        gone.featurize_dicts(rows[:2])
    assert gone.columns is None
    assert_same(gone.featurize_lines(file_lines(path)[:11]), fz.read(path), slice(0, 10))  # header first
    given = Featurizer(fz.reader, fz.schema, columns=["y", "skip", "city", "n", "seq"])
    assert_same(given.featurize_dicts([{k: v for k, v in r.items() if k != "seq"} for r in rows]), fz.read(path))


def test_errors_are_the_readers_naming_the_given_line():
    data, fz = reference(TAOBAO / "test_sample.csv", dict(hash_buckets=1000, schema=TAOBAO_SCHEMA))
    lines = [x.decode() for x in file_lines(TAOBAO / "test_sample.csv")[1:6]]
    bad = list(lines)
    bad[3] = "7" + bad[3][1:]  # label 7
    with pytest.raises(ParseError) as e:
        fz.featurize_lines(bad)  # the run's header is put in front: not counted
    assert (e.value.path, e.value.line, e.value.field, e.value.reason) == ("<lines>", 4, "clk", "bad_label")
    assert str(e.value).startswith("<lines>, line 4 (lines[3]), field clk: got '7'")
    with pytest.raises(ParseError) as e:
        fz.featurize_dicts([{"clk": 0, "price": "cheap"}])
    assert (e.value.path, e.value.line, e.value.field, e.value.reason) == ("<rows>", 1, "price", "bad_float")
    with pytest.raises(ValueError, match=r"lines\[1\] is blank"):
        fz.featurize_lines([lines[0], "", lines[1]])
    with pytest.raises(ValueError, match=r"lines\[0\] holds a line break"):
        fz.featurize_lines([lines[0] + "\n" + lines[1]])
    with pytest.raises(ValueError, match="row 1: unknown column 'clicks'"):
        fz.featurize_dicts([{"clk": 1}, {"clicks": 1}])
    _, cz = reference(CRITEO, dict(hash_buckets=1000))
    with pytest.raises(ValueError, match="rows 0 and 1 differ: one has 'label'"):
        cz.featurize_dicts([{"label": 1, "C1": "68fd1e64"}, {"C1": "68fd1e64"}])
    with pytest.raises(TypeError, match="row 0, column 'C3': Criteo categorical values are hex strings"):
        cz.featurize_dicts([{"C3": 12}])
    with pytest.raises(ParseError, match=r"<rows>, line 2 \(rows\[1\]\), field I2: got '1.5'") as e:
        cz.featurize_dicts([{"I2": 1}, {"I2": 1.5}])
    assert e.value.reason == "bad_integer"


def test_no_rows():
    for name in ("criteo", "taobao_bags"):
        data, fz = reference(*CONFIGS[name])
        got = fz.featurize_lines([])
        assert got["sparse"].shape == (0, data.sparse.shape[1]) and got["dense"].shape == (0, data.num_dense)
        assert [(o.tolist(), v.tolist()) for o, v in got["bags"]] == [([0], [])] * data.num_bags
        assert fz.featurize_dicts([])["sparse"].shape == (0, data.sparse.shape[1])


@pytest.mark.parametrize("run_name", ["taobao_bags", "criteo_vocab"])
def test_exported_model_on_featurized_lines_is_mlfast_predict(run_name, tmp_path_factory, tmp_path):
    """From a run directory: Featurizer.from_run reads lines as `mlfast predict` reads the file, and
    the exported ONNX model fed them gives the CLI's probabilities (its CSV has 6 digits)."""
    import onnxruntime as ort

    from mlfast.export import export_run

    run = trained_run(run_name, tmp_path_factory.getbasetemp())
    path = TAOBAO / "test_sample.csv" if run_name == "taobao_bags" else CRITEO_TEST
    fz = Featurizer.from_run(run)
    pred = load_run(run)
    lines = file_lines(path)[:500]
    x = fz.featurize_lines(lines)
    assert_same(x, pred.read(path), slice(0, len(x["sparse"])))
    export_run(run, tmp_path / "m.onnx", peer="all", verify=False)
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, fz.model_inputs(x))[0]
    p = pred.predict(path)
    want = np.stack([p[c] for c in [*pred.labels, "ensemble"]], 1)[:len(got)]
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)
    assert main(["predict", str(run), str(path), "--out", str(tmp_path / "p.csv")]) == 0
    cli = np.loadtxt(tmp_path / "p.csv", delimiter=",", skiprows=1)[:len(got), 1:]
    np.testing.assert_allclose(got, cli, rtol=0, atol=TOLERANCE)
    assert len(got) == (100 if run_name == "taobao_bags" else 500)
