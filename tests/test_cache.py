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
    elif damage == "manifest_checksum":  # a consistent (re-signed) manifest that lies about a column
        manifest["columns"]["sparse"]["checksum"] = "0" * 16
        manifest["manifest_sha256"] = cache._manifest_digest(manifest)
        manifest_path.write_text(json.dumps(manifest))
        why = "checksum mismatch in sparse.bin"
    elif damage == "manifest_shape":
        manifest["columns"]["sparse"]["shape"] = [10000, 38]
        manifest["manifest_sha256"] = cache._manifest_digest(manifest)
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


# ------------------------------------------------------------------------------------------------
# Regressions: a stale source, an edited manifest, a symlinked column (each was a hit before)


def test_rewritten_in_place_with_mtime_restored_is_stale(source, cache_dir):
    """rsync --inplace -t / touch -r: same size, same inode, mtime put back; only ctime and the
    content say it changed."""
    first = reader.read_criteo(source, cache_dir=cache_dir)
    st = source.stat()
    data = bytearray(source.read_bytes())
    flips = [i for i, line_start in enumerate(data) if i == 0 or data[i - 1] == ord("\n")][:50]
    for i in flips:  # flip the labels of the first 50 lines in place: same size
        data[i] = ord("1") if data[i] == ord("0") else ord("0")
    with open(source, "r+b") as f:
        f.write(bytes(data))
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = source.stat()
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    with pytest.warns(UserWarning, match=r"stale: the source file changed \(ctime_ns, fingerprint differ\)"):
        d = reader.read_criteo(source, cache_dir=cache_dir)
    assert d.meta["cache"]["status"] == "rebuilt"
    np.testing.assert_array_equal(d.labels[:50], 1 - np.asarray(first.labels[:50]))
    np.testing.assert_array_equal(d.labels, reader.read_criteo(source, cache=False).labels)


def test_content_fingerprint_is_compared(source, cache_dir):
    """Were ctime to lie (a restored backup, a file system without it), the sampled content still
    tells: a manifest whose fingerprint differs (everything else equal) is stale."""
    entry = entry_of(reader.read_criteo(source, cache_dir=cache_dir))
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["source"]["fingerprint"] = manifest["source"]["fingerprint"][:-1] + "0"
    manifest["manifest_sha256"] = cache._manifest_digest(manifest)
    (entry / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=r"stale: the source file changed \(fingerprint differ\)"):
        assert reader.read_criteo(source, cache_dir=cache_dir).meta["cache"]["status"] == "rebuilt"


def test_fingerprint_samples_first_last_and_spread_blocks(tmp_path, np_rng):
    small = tmp_path / "small.bin"
    data = np_rng.integers(0, 256, 300_000, dtype=np.uint8)  # < 8 blocks: every byte is covered
    small.write_bytes(data.tobytes())
    base = cache.fingerprint(small)
    for pos in np_rng.integers(0, data.size, 20):
        changed = data.copy()
        changed[pos] ^= 1
        small.write_bytes(changed.tobytes())
        assert cache.fingerprint(small) != base, pos
    big = tmp_path / "big.bin"
    big_data = np_rng.integers(0, 256, 3_000_000, dtype=np.uint8)
    big.write_bytes(big_data.tobytes())
    base = cache.fingerprint(big)
    assert len(base.split(":")[1]) == 16 * cache.FINGERPRINT_BLOCKS
    span = big_data.size - cache.FINGERPRINT_BYTES
    for pos in (0, big_data.size - 1, span * 3 // 7 + 5):  # first block, last block, a middle one
        changed = big_data.copy()
        changed[pos] ^= 1
        big.write_bytes(changed.tobytes())
        assert cache.fingerprint(big) != base, pos


@pytest.mark.parametrize("edit", ["skipped", "lines", "rows"])
def test_edited_manifest_is_rejected(source, cache_dir, edit):
    entry = entry_of(reader.read_criteo(source, cache_dir=cache_dir, on_bad_line="skip"))
    path = entry / "manifest.json"
    manifest = json.loads(path.read_text())
    if edit == "skipped":
        manifest["extra"]["skipped"] = {"bad_label": 12}
    elif edit == "lines":
        manifest["extra"]["lines"] = 5
    else:
        manifest["rows"] = 9999
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    with pytest.warns(UserWarning, match="manifest checksum mismatch"):
        d = reader.read_criteo(source, cache_dir=cache_dir, on_bad_line="skip")
    assert d.meta["cache"]["status"] == "rebuilt" and d.skipped == {} and d.meta["lines"] == 10000


@pytest.mark.parametrize("what", ["bin_symlink", "manifest_symlink", "bin_fifo", "extra_file"])
def test_only_regular_files_inside_the_entry(source, cache_dir, tmp_path, what):
    entry = entry_of(reader.read_criteo(source, cache_dir=cache_dir))
    good = reader.read_criteo(source, cache=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if what == "bin_symlink":  # the very same bytes, but through a link: still refused
        shutil.copyfile(entry / "sparse.bin", elsewhere / "sparse.bin")
        (entry / "sparse.bin").unlink()
        (entry / "sparse.bin").symlink_to(elsewhere / "sparse.bin")
        why = "sparse.bin is a symlink"
    elif what == "manifest_symlink":
        shutil.copyfile(entry / "manifest.json", elsewhere / "manifest.json")
        (entry / "manifest.json").unlink()
        (entry / "manifest.json").symlink_to(elsewhere / "manifest.json")
        why = "manifest.json is a symlink"
    elif what == "bin_fifo":
        (entry / "labels.bin").unlink()
        os.mkfifo(entry / "labels.bin")
        why = "labels.bin is not a regular file"
    else:
        (entry / "notes.txt").write_text("x")
        why = "unexpected 'notes.txt'"
    with pytest.warns(UserWarning, match=why):
        d = reader.read_criteo(source, cache_dir=cache_dir)
    assert d.meta["cache"]["status"] == "rebuilt"
    assert_same(good, d)
    assert not (entry / "sparse.bin").is_symlink() and (elsewhere.exists())
    assert reader.read_criteo(source, cache_dir=cache_dir).meta["cache"]["status"] == "hit"
