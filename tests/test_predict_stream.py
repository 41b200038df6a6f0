"""`mlfast predict` / `eval` and the Predictor read a file of any size chunk by chunk
(``Predictor.read_chunks`` / ``predict_chunks`` / ``predict_file``, ``mlfast.io.reader.iter_read``):
the same predictions, join keys and skip counts as reading the file whole (the reference: ``read``,
then ``predict_proba`` and ``write_predictions_csv``), for chunks far smaller than the file; an
error midway leaves no output file behind.
"""
from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest

from mlfast.api import load_run, prediction_keys, write_predictions_csv
from mlfast.cli import main
from mlfast.io import reader
from mlfast.io.reader import ParseError

SMALL = ["--peers", "deepfm:mlp=16,dcn:mlp=16", "--hash-buckets", "300", "--batch-size", "200", "--quiet",
         "--epochs", "1", "--no-cache"]
CHUNK = 8192  # bytes of text: about 40 Criteo lines per chunk


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from mlfast.io.synth import synth_criteo

    base = tmp_path_factory.mktemp("predict_stream")
    train = base / "train.tsv"
    synth_criteo(train, rows=2000, seed=5)
    assert main(["train", str(train), "--out", str(base / "run"), *SMALL]) == 0
    return base, load_run(base / "run", device="cpu")


def _with_bad_lines(src: Path, dst: Path, rng: np.random.Generator, *, gz: bool = False) -> Path:
    """``src``'s lines with bad ones mixed in (a short line, a bad integer, a blank line), after the
    first (the format is told from it)."""
    lines = src.read_bytes().splitlines()
    out = []
    for k, line in enumerate(lines):
        r = rng.random() if k else 1.0
        if r < 0.03:
            out.append(b"1\t2\t3")
        elif r < 0.06:
            cells = line.split(b"\t")
            cells[2] = b"x1"
            out.append(b"\t".join(cells))
        elif r < 0.08:
            out.append(b"")
        out.append(line)
    body = b"\n".join(out) + b"\n"
    dst.write_bytes(gzip.compress(body, compresslevel=1) if gz else body)
    return dst


def _csv(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], np.asarray(rows[1:], float).reshape(len(rows) - 1, len(rows[0]))


@pytest.mark.parametrize("gz", [False, True])
def test_predict_file_in_chunks_is_the_whole_read(trained, tmp_path, np_rng, gz):
    base, pred = trained
    from mlfast.io.synth import synth_criteo

    clean = tmp_path / "clean.tsv"
    synth_criteo(clean, rows=1500, seed=int(np_rng.integers(1000)))
    path = _with_bad_lines(clean, tmp_path / ("test.tsv.gz" if gz else "test.tsv"), np_rng, gz=gz)
    assert sum(1 for _ in pred.read_chunks(path, chunk_bytes=CHUNK, on_bad_line="skip")) > 20

    whole = pred.read(path, on_bad_line="skip", cache=False)
    write_predictions_csv(pred.predict(whole), tmp_path / "ref.csv", ids=prediction_keys(whole))
    r = pred.predict_file(path, tmp_path / "p.csv", chunk_bytes=CHUNK, on_bad_line="skip")
    assert r["rows"] == len(whole) == 1500
    assert r["skipped"] == {k: v for k, v in whole.skipped.items() if v}
    assert r["skipped"]["field_count"] > 0 and r["skipped"]["bad_integer"] > 0
    (h_ref, ref), (h, got) = _csv(tmp_path / "ref.csv"), _csv(tmp_path / "p.csv")
    assert h == h_ref == ["line", "deepfm", "dcn", "ensemble"]
    np.testing.assert_array_equal(got[:, 0], ref[:, 0])  # the source line numbers, gaps where lines were bad
    np.testing.assert_allclose(got[:, 1:], ref[:, 1:], rtol=0, atol=2e-6)  # other batches: float rounding
    assert not (tmp_path / "p.csv.tmp").exists()

    # evaluation in chunks: the metrics of every row's label and probability (those probabilities
    # are the chunked ones: other batches than a whole read's round differently, and AUC can move by
    # the few pairs whose order that flips)
    from mlfast.train.metrics import peer_metrics

    got_m = pred.evaluate(path, chunk_bytes=CHUNK, on_bad_line="skip")
    exact = peer_metrics(whole.labels, np.concatenate([p for _, p in pred.predict_chunks(
        path, chunk_bytes=CHUNK, on_bad_line="skip")]), pred.labels)
    assert got_m == exact
    for name, m in pred.evaluate(whole).items():  # 1500 rows: one flipped pair moves AUC by ~3e-6
        assert got_m[name]["auc"] == pytest.approx(m["auc"], abs=2e-5)
        assert got_m[name]["logloss"] == pytest.approx(m["logloss"], abs=1e-6)


def test_iter_read_chunks_concatenate_to_read(tmp_path, np_rng):
    from mlfast.io.synth import synth_criteo

    clean = tmp_path / "c.tsv"
    synth_criteo(clean, rows=700, seed=1)
    path = _with_bad_lines(clean, tmp_path / "b.tsv", np_rng)
    whole = reader.read(path, on_bad_line="skip", cache=False, hash_buckets=1000)
    chunks = list(reader.iter_read(path, on_bad_line="skip", cache=True, hash_buckets=1000, chunk_bytes=4096))
    assert len(chunks) > 5
    np.testing.assert_array_equal(np.concatenate([c.sparse for c in chunks]), whole.sparse)
    np.testing.assert_array_equal(np.concatenate([c.lines for c in chunks]), whole.lines)
    total: dict[str, int] = {}
    for c in chunks:
        for k, v in c.skipped.items():
            total[k] = total.get(k, 0) + int(v)
    assert {k: v for k, v in total.items() if v} == {k: v for k, v in whole.skipped.items() if v}


def test_a_bad_line_midway_leaves_no_output(trained, tmp_path):
    base, pred = trained
    lines = (base / "train.tsv").read_bytes().splitlines()
    lines[1500] = b"1\t2\t3"
    path = tmp_path / "bad.tsv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "p.csv"
    with pytest.raises(ParseError, match=r"bad\.tsv.*line 1501"):
        pred.predict_file(path, out, chunk_bytes=CHUNK)
    assert not out.exists() and not (tmp_path / "p.csv.tmp").exists()
    assert main(["predict", str(base / "run"), str(path), "--out", str(out)]) == 1
    assert not out.exists()


def test_unlabelled_file_predicts_and_refuses_eval(trained, tmp_path):
    base, pred = trained
    from mlfast.io.synth import synth_criteo

    path = tmp_path / "t.tsv"
    synth_criteo(path, rows=300, seed=9, test_format=True)
    r = pred.predict_file(path, tmp_path / "p.csv", chunk_bytes=CHUNK)
    header, got = _csv(tmp_path / "p.csv")
    assert r["rows"] == 300 and header[0] == "line" and list(got[:, 0]) == list(range(1, 301))
    with pytest.raises(ValueError, match="has no labels"):
        pred.evaluate(path)
    assert main(["eval", str(base / "run"), str(path)]) == 1


def test_a_file_of_bad_lines_writes_the_header_and_counts(trained, tmp_path):
    _, pred = trained
    path = tmp_path / "bad.tsv"
    path.write_bytes((b"x" + b"\t" * 39 + b"\n") * 50)  # 40 fields, each label bad
    with pytest.warns(UserWarning, match="every data line is bad"):
        r = pred.predict_file(path, tmp_path / "p.csv", chunk_bytes=64, on_bad_line="skip")
    assert r["rows"] == 0 and r["skipped"] == {"bad_label": 50}
    assert (tmp_path / "p.csv").read_text() == "line,deepfm,dcn,ensemble\n"
    with pytest.raises(ValueError, match="no rows"), pytest.warns(UserWarning, match="every data line is bad"):
        pred.evaluate(path, on_bad_line="skip")
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        pred.predict_file(empty, tmp_path / "q.csv")
    assert not (tmp_path / "q.csv").exists() and not (tmp_path / "q.csv.tmp").exists()
