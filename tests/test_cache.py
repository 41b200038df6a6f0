"""The binary cache: hits are identical and memory-mapped; stale, damaged or foreign entries are
detected, warned about and rebuilt; the checksum is streamable and catches any one changed byte."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mlfast import _native
from mlfast.io import cache, reader

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets_raw"
CRITEO = DATA / "criteo_kaggle_head10k" / "train_head10000.txt"

pytestmark = pytest.mark.skipif(not CRITEO.exists(), reason="shared/datasets_raw not present")


@pytest.fixture
def source(tmp_path) -> Path:
    """A private, writable copy of a real Criteo sample (the data directory is read-only)."""
    path = tmp_path / "src" / "train.txt"
    path.parent.mkdir()
    shutil.copyfile(CRITEO, path)
    return path


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def entry_of(d) -> Path:
    return Path(d.meta["cache"]["path"])


def assert_same(a, b):
    for x, y in [(a.labels, b.labels), (a.dense, b.dense), (a.dense_missing, b.dense_missing), (a.sparse, b.sparse),
                 (a.field_offsets, b.field_offsets)]:
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)
    assert a.field_names == b.field_names and a.skipped == b.skipped


def test_miss_then_hit_is_identical_and_mapped(source, cache_dir, recwarn):
    plain = reader.read_criteo(source, cache=False)
    first = reader.read_criteo(source, cache_dir=cache_dir)
    second = reader.read_criteo(source, cache_dir=cache_dir, num_threads=1)
    assert first.meta["cache"]["status"] == "miss" and second.meta["cache"]["status"] == "hit"
    assert entry_of(first) == entry_of(second) and entry_of(first).parent == cache_dir
    assert_same(plain, first)
    assert_same(plain, second)
    assert isinstance(second.sparse, np.memmap) and isinstance(second.dense, np.memmap)
    assert second.meta["lines"] == 10000
    second.sparse[0, 0] = -5  # copy-on-write: the cache file is untouched
    assert reader.read_criteo(source, cache_dir=cache_dir).sparse[0, 0] == plain.sparse[0, 0]
    assert not [w for w in recwarn.list if "mlfast" in str(w.message)]


def test_environment_variable_picks_the_directory(source, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFAST_CACHE_DIR", str(tmp_path / "env_cache"))
    d = reader.read_criteo(source)
    assert entry_of(d).parent == tmp_path / "env_cache" and cache.default_cache_dir() == tmp_path / "env_cache"


def test_touching_or_changing_the_source_rebuilds(source, cache_dir):
    reader.read_criteo(source, cache_dir=cache_dir)
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    with pytest.warns(UserWarning, match="stale: the source file changed"):
        d = reader.read_criteo(source, cache_dir=cache_dir)
    assert d.meta["cache"]["status"] == "rebuilt"
    assert reader.read_criteo(source, cache_dir=cache_dir).meta["cache"]["status"] == "hit"
    # New content (one line dropped): the rebuilt entry holds it.
    lines = source.read_bytes().split(b"\n")
    source.write_bytes(b"\n".join(lines[1:]))
    with pytest.warns(UserWarning, match="stale"):
        d = reader.read_criteo(source, cache_dir=cache_dir)
    assert d.num_rows == 9999
    np.testing.assert_array_equal(d.sparse, reader.read_criteo(source, cache=False).sparse)
    assert len([p for p in cache_dir.iterdir()]) == 1  # rebuilt in place, no orphan entries


@pytest.mark.parametrize("damage", ["truncate_sparse", "flip_dense", "flip_last_byte_labels", "flip_missing",
                                    "bad_json", "manifest_checksum", "manifest_shape", "no_manifest", "bad_magic"])
def test_damaged_entry_is_detected_and_rebuilt(source, cache_dir, damage):
    entry = entry_of(reader.read_criteo(source, cache_dir=cache_dir))
    good = reader.read_criteo(source, cache=False)  # not a mapping of the file damaged below
    manifest_path = entry / "manifest.json"
    manifest = json.loads(manifest_path.read_text())

    def flip(name, offset):
        path = entry / name
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x10
        path.write_bytes(bytes(data))

    if damage == "truncate_sparse":
        with open(entry / "sparse.bin", "r+b") as f:
            f.truncate(os.path.getsize(entry / "sparse.bin") - 8)
        why = "truncated or corrupt"
    elif damage == "flip_dense":
        flip("dense.bin", 123_457)
        why = "checksum mismatch in dense.bin"
    elif damage == "flip_last_byte_labels":
        flip("labels.bin", 40_000 - 1)
        why = "checksum mismatch in labels.bin"
    elif damage == "flip_missing":
        flip("dense_missing.bin", 3)
        why = "checksum mismatch in dense_missing.bin"
    elif damage == "bad_json":
        manifest_path.write_text("{not json")
        why = "unreadable manifest"
    elif damage == "manifest_checksum":
        manifest["columns"]["sparse"]["checksum"] = "0" * 16
        manifest_path.write_text(json.dumps(manifest))
        why = "checksum mismatch in sparse.bin"
    elif damage == "manifest_shape":
        manifest["columns"]["sparse"]["shape"] = [10000, 38]
        manifest_path.write_text(json.dumps(manifest))
        why = "expected <i8"
    elif damage == "no_manifest":
        manifest_path.unlink()
        why = "no manifest"
    else:
        manifest["magic"] = "something-else"
        manifest_path.write_text(json.dumps(manifest))
        why = "bad magic"
    with pytest.warns(UserWarning, match=why):
        d = reader.read_criteo(source, cache_dir=cache_dir)
    assert d.meta["cache"]["status"] == "rebuilt"
    assert_same(good, d)
    assert reader.read_criteo(source, cache_dir=cache_dir).meta["cache"]["status"] == "hit"


def test_each_configuration_has_its_own_entry(source, cache_dir):
    variants = [dict(), dict(hash_seed=1), dict(int_buckets=False), dict(hash_buckets=1000), dict(keys=True),
                dict(on_bad_line="skip"), dict(format="train")]
    entries = set()
    for kw in variants:
        d = reader.read_criteo(source, cache_dir=cache_dir, **kw)
        # format="train" is what "auto" found on this file: the same configuration, the same entry.
        assert d.meta["cache"]["status"] == ("hit" if kw == dict(format="train") else "miss"), kw
        entries.add(entry_of(d))
        again = reader.read_criteo(source, cache_dir=cache_dir, **kw)
        assert again.meta["cache"]["status"] == "hit"
        assert_same(d, again)
        assert_same(d, reader.read_criteo(source, cache=False, **kw))
    assert len(entries) == len(variants) - 1
    assert cache.clear_cache(cache_dir) == len(entries) and not list(cache_dir.iterdir())


def test_other_formats_and_empty_columns(tmp_path, cache_dir):
    avazu = DATA / "avazu_head10k" / "test_part_1000_noheader.csv"
    a = reader.read_avazu(avazu, header=False, cache_dir=cache_dir)
    b = reader.read_avazu(avazu, header=False, cache_dir=cache_dir)
    assert b.meta["cache"]["status"] == "hit" and b.dense.shape == (1000, 0)
    assert_same(a, b)
    head = tmp_path / "head.csv"
    head.write_text(",".join(reader.AVAZU_COLUMNS) + "\n")
    for status in ("miss", "hit"):
        d = reader.read_avazu(head, cache_dir=cache_dir)
        assert d.meta["cache"]["status"] == status and d.sparse.shape == (0, 24)


def test_unwritable_cache_dir_falls_back(source, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="without a cache"):
        d = reader.read_criteo(source, cache_dir=blocker / "sub")
    assert d.meta["cache"]["status"] == "disabled" and d.num_rows == 10000


def test_parse_error_leaves_no_entry(tmp_path, cache_dir):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(CRITEO.read_bytes()[:5000].rsplit(b"\n", 1)[0] + b"\nnot a line\n")
    with pytest.raises(reader.ParseError):
        reader.read_criteo(bad, format="train", cache_dir=cache_dir)
    assert not cache_dir.exists() or not list(cache_dir.iterdir())


def test_checksum_streams_and_catches_every_single_byte_change(np_rng):
    data = np_rng.integers(0, 256, size=100_003, dtype=np.uint8)
    whole = _native.checksum(data)
    assert _native.checksum(data, 4) == whole
    s = _native.Checksum()
    cuts = sorted(int(c) for c in np_rng.integers(0, data.size, size=30))
    for a, b in zip([0] + cuts, cuts + [data.size]):
        s.update(data[a:b])
    assert s.digest() == whole and s.nbytes == data.size
    for pos in np_rng.integers(0, data.size, size=300):
        damaged = data.copy()
        damaged[pos] ^= np.uint8(1 << int(np_rng.integers(0, 8)))
        assert _native.checksum(damaged) != whole
    # Swapped words, a shorter length and trailing zeros all change it.
    swapped = data.copy()
    swapped[:8], swapped[8:16] = data[8:16], data[:8]
    assert _native.checksum(swapped) != whole
    assert _native.checksum(data[:-1]) != whole
    assert _native.checksum(np.concatenate([data, np.zeros(5, np.uint8)])) != whole
    big = np_rng.integers(0, 1 << 62, size=5_000_000, dtype=np.int64)  # 40 MB: split across threads
    assert _native.checksum(big, 2) == _native.checksum(big, 1)
