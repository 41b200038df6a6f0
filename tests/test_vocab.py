"""Vocabulary mode: counting on the real samples equals a collections.Counter reference; the
numba and cupy counters agree; train-split counting, OOV and persistence through a run."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mlfast.io import hashing
from mlfast.api import apply_vocabulary, fit, load_run, prepare_data
from mlfast.io.reader import read_criteo, read_avazu
from mlfast.io.vocab import Vocabulary, count_keys, count_keys_cupy

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets_raw"
HEAD10K = DATA / "criteo_kaggle_head10k" / "train_head10000.txt"
AVAZU = DATA / "avazu_head10k" / "avazu_train_head10k.csv"
needs_data = pytest.mark.skipif(not HEAD10K.exists(), reason="../shared/datasets_raw not present")


def counter_reference(path: Path, min_count: int, rows: np.ndarray | None = None):
    """Per field (I1..I13 bucketed, C1..C26): the Counter of raw values over ``rows``, the kept
    values ranked by (count desc, hash key asc), and the expected row of every line."""
    lines = [ln.split("\t") for ln in path.read_text().splitlines()]
    use = range(len(lines)) if rows is None else rows
    expected = np.zeros((len(lines), 39), np.int64)
    base = 0
    for f in range(39):
        col = 1 + f
        field_id = col  # I1..I13 -> 1..13, C1..C26 -> 14..39

        def value(text: str):  # the categorical value FuxiCTR counts: the bucket of an integer
            return hashing.fuxictr_int_bucket(int(text)) if f < 13 else text

        def key_of(v) -> int:
            raw = hashing.int_value(v) if f < 13 else hashing.hex_value(v)
            return hashing.hash_key(raw, 0, field_id)

        counts = Counter(value(lines[i][col]) for i in use if lines[i][col] != "")
        kept = sorted((v for v, c in counts.items() if c >= min_count), key=lambda v: (-counts[v], key_of(v)))
        rank = {v: r + 1 for r, v in enumerate(kept)}
        for i, ln in enumerate(lines):
            v = ln[col]
            expected[i, f] = base + (0 if v == "" else rank.get(value(v), len(kept) + 1))
        base += len(kept) + 2
    return expected, base


@needs_data
@pytest.mark.parametrize("min_count", [1, 10])
def test_vocabulary_on_the_kaggle_sample_equals_counter_reference(min_count):
    keys = read_criteo(HEAD10K, keys=True, cache=False)
    vocab = Vocabulary.fit(keys.sparse, keys.field_names, min_count, backend="numba")
    expected, table_rows = counter_reference(HEAD10K, min_count)
    np.testing.assert_array_equal(vocab.transform(keys.sparse), expected)
    assert vocab.field_offsets[-1] == table_rows


@needs_data
def test_counting_only_the_training_split(np_rng):
    keys = read_criteo(HEAD10K, keys=True, cache=False)
    rows = np.sort(np_rng.choice(len(keys), 8000, replace=False))
    vocab = Vocabulary.fit(keys.sparse, keys.field_names, 3, rows=rows, backend="numba")
    expected, _ = counter_reference(HEAD10K, 3, rows)
    np.testing.assert_array_equal(vocab.transform(keys.sparse), expected)


def test_count_keys_matches_numpy_unique(np_rng):
    k = np_rng.integers(0, 50, (3000, 4)).astype(np.int64)
    k[np_rng.random(k.shape) < 0.2] = 0  # missing
    k[:, 3] = -k[:, 3]  # keys are u64 bit patterns: negative int64s are large u64s
    for j, (u, c) in enumerate(count_keys(k)):
        col = k[:, j].view(np.uint64)
        ru, rc = np.unique(col[col != 0], return_counts=True)
        np.testing.assert_array_equal(u, ru)
        np.testing.assert_array_equal(c, rc)


def _cupy_gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.skipif(not _cupy_gpu(), reason="needs cupy and a GPU")
@needs_data
def test_cupy_and_numba_vocabularies_are_equal():
    keys = read_criteo(HEAD10K, keys=True, cache=False)
    a = Vocabulary.fit(keys.sparse, keys.field_names, 2, backend="numba")
    b = Vocabulary.fit(keys.sparse, keys.field_names, 2, backend="cupy")
    for x, y in zip(a.keys + a.rows, b.keys + b.rows):
        np.testing.assert_array_equal(x, y)
    for (u1, c1), (u2, c2) in zip(count_keys(keys.sparse), count_keys_cupy(keys.sparse)):
        np.testing.assert_array_equal(u1, u2)
        np.testing.assert_array_equal(c1, c2)


def test_unseen_and_missing_values(tmp_path):
    keys = np.array([[5, 0], [5, 7], [9, 7], [5, 7]], np.int64)
    v = Vocabulary.fit(keys, ["a", "b"], 2, backend="numba")
    # a: 5 kept (row 1), 9 rare -> OOV (row 2); b: 7 kept; missing -> row 0 of the field
    np.testing.assert_array_equal(v.transform(keys), [[1, 3], [1, 4], [2, 4], [1, 4]])
    np.testing.assert_array_equal(v.transform(np.array([[123, 456]], np.int64)), [[2, 5]])  # never seen
    v.save(tmp_path / "v.npz")
    w = Vocabulary.load(tmp_path / "v.npz")
    np.testing.assert_array_equal(w.transform(keys), v.transform(keys))


@needs_data
def test_vocabulary_run_maps_new_files_identically(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFAST_CACHE_DIR", str(tmp_path / "cache"))
    r = fit(HEAD10K, peers=["fm"], epochs=1, reader={"min_count": 10}, out=tmp_path / "run", progress=False,
            log=lambda *a: None)
    prep = prepare_data(HEAD10K, reader={"min_count": 10})
    pred = load_run(tmp_path / "run")
    again = pred.read(HEAD10K)
    np.testing.assert_array_equal(again.sparse, prep.train_data.sparse)  # same vocabulary, same ids
    assert again.table_rows == r.predictor.schema.table_rows
    p1 = r.predict(HEAD10K)["fm"]
    p2 = pred.predict(HEAD10K)["fm"]
    np.testing.assert_allclose(p1, p2, rtol=1e-6)


@needs_data
def test_avazu_vocabulary_mode_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFAST_CACHE_DIR", str(tmp_path / "cache"))
    r = fit(AVAZU, peers=["deepfm", "dcn"], epochs=1, reader={"min_count": 2}, progress=False, log=lambda *a: None)
    assert r.predictor.schema.field_names[:3] == ("hour", "weekday", "weekend")
    assert 0.55 < r.metrics["test"]["ensemble"]["auc"] < 1.0
