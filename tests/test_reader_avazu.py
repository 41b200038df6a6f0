"""The native Avazu reader against a csv-module reference on the real Avazu sample."""
from __future__ import annotations

import datetime
import functools
import gzip
from pathlib import Path

import numpy as np
import pytest

import reference_reader as ref
from conftest import BASE_SEED
from mlfast.io import hashing, reader

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets_raw" / "avazu_head10k"
TRAIN = DATA / "avazu_train_head10k.csv"
NOHEADER = DATA / "test_part_1000_noheader.csv"
HASH_SEED = (BASE_SEED * 0x2545F491 + 99) % (1 << 64)

pytestmark = pytest.mark.skipif(not TRAIN.exists(), reason="shared/datasets_raw not present")


@functools.lru_cache(maxsize=None)
def reference(path: Path, seed: int = 0, header: bool = True) -> ref.Parsed:
    return ref.avazu(path, header=header, seed=seed)


def assert_matches(d, r: ref.Parsed, buckets=None, keys=False):
    assert d.field_names == r.field_names
    assert d.meta["field_ids"] == r.field_ids
    np.testing.assert_array_equal(d.labels, r.label_array())
    assert d.dense.shape == (len(r.keys), 0) and d.dense_missing.shape == (len(r.keys), 0)
    np.testing.assert_array_equal(d.sparse, r.key_matrix() if keys else r.sparse(buckets))


def test_train_sample_defaults():
    d = reader.read_avazu(TRAIN, cache=False, num_threads=1)
    assert d.meta["format"] == "avazu-train" and d.num_rows == 9999 and d.num_fields == 24
    assert d.field_names[:3] == ["hour", "weekday", "weekend"]
    assert d.meta["field_ids"][:4] == [101, 102, 103, 4]
    assert_matches(d, reference(TRAIN))
    assert float(d.labels.sum()) == 1706.0  # the sample's documented click count


def test_train_sample_seed_buckets_threads(np_rng, monkeypatch):
    monkeypatch.setattr(reader, "MIN_RANGE_BYTES", 4096)
    buckets = [int(b) for b in np_rng.integers(1, 1 << 36, size=24)]
    d = reader.read_avazu(TRAIN, hash_buckets=buckets, hash_seed=HASH_SEED, cache=False, num_threads=4)
    assert_matches(d, reference(TRAIN, HASH_SEED), buckets)


def test_keys_and_hour_features():
    d = reader.read_avazu(TRAIN, keys=True, hash_seed=HASH_SEED, cache=False)
    assert_matches(d, reference(TRAIN, HASH_SEED), keys=True)
    # Every row is hour 14102100: 2014-10-21 00h, a Tuesday.
    assert datetime.date(2014, 10, 21).weekday() == 1
    want = [hashing.hash_key(v, HASH_SEED, fid) for v, fid in ((0, 101), (1, 102), (0, 103))]
    assert (d.sparse[:, :3].view(np.uint64) == np.asarray(want, np.uint64)).all()


def test_file_without_header():
    d = reader.read_avazu(NOHEADER, header=False, cache=False)
    assert d.meta["format"] == "avazu-train" and d.num_rows == 1000
    assert_matches(d, reference(NOHEADER, 0, False))
    assert reader.read(NOHEADER, cache=False).meta["format"] == "avazu-train"  # 24 comma fields


def test_test_format_has_no_label_and_same_ids(tmp_path):
    lines = TRAIN.read_bytes().split(b"\n")[:2001]
    drop_click = [b",".join(c for i, c in enumerate(line.split(b",")) if i != 1) for line in lines]
    path = tmp_path / "test.csv"
    path.write_bytes(b"\n".join(drop_click) + b"\n")
    d = reader.read_avazu(path, cache=False)
    train = reader.read_avazu(TRAIN, cache=False)
    assert d.meta["format"] == "avazu-test" and d.labels is None
    assert d.field_names == train.field_names
    np.testing.assert_array_equal(d.sparse, train.sparse[:2000])  # field ids follow the train layout


def test_header_survives_chunking_gzip_and_crlf(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "MIN_RANGE_BYTES", 2048)
    whole = reader.read_avazu(TRAIN, cache=False)
    raw = TRAIN.read_bytes()
    crlf = tmp_path / "crlf.csv.gz"
    crlf.write_bytes(gzip.compress(b"\n\r\n" + raw.replace(b"\n", b"\r\n"), compresslevel=1))
    for path in (TRAIN, crlf):
        for chunk_bytes in (1_000, 65_536):
            chunks = list(reader.iter_avazu_chunks(path, chunk_bytes=chunk_bytes, num_threads=3))
            np.testing.assert_array_equal(np.concatenate([c.sparse for c in chunks]), whole.sparse)
            np.testing.assert_array_equal(np.concatenate([c.labels for c in chunks]), whole.labels)
    d = reader.read_avazu(crlf, cache=False)
    np.testing.assert_array_equal(d.sparse, whole.sparse)
    assert d.skipped == {"blank_line": 2}


def test_header_only_file_has_no_rows(tmp_path):
    path = tmp_path / "head.csv"
    path.write_bytes(TRAIN.read_bytes().split(b"\n")[0] + b"\n")
    d = reader.read_avazu(path, cache=False)
    assert d.num_rows == 0 and d.sparse.shape == (0, 24) and d.labels.shape == (0,)
