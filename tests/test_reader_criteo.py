"""The native Criteo reader against the plain-Python reference, on real Criteo samples.

Every field of every row is compared: labels, dense values (bit-exact float32), missing masks and
sparse ids (or raw keys), across int_buckets, bucket lists, seeds, thread counts, chunking, gzip
and line-ending variants.
"""
from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np
import pytest

import reference_reader as ref
from conftest import BASE_SEED
from mlfast.io import hashing, reader

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets_raw"
FILES = [
    "criteo_kaggle_head10k/train_head10000.txt",
    "criteo_kaggle_head10k/test_head10000_nolabel.txt",
    "paddlerec_criteo_tiny/dnn_sample_train.txt",
    "paddlerec_criteo_tiny/part-0.txt",
]
SMALL = "paddlerec_criteo_tiny/part-0.txt"
# One random hash seed per session (replayable through MLFAST_TEST_SEED), shared by all tests so
# the slow reference parse runs once per file.
HASH_SEED = (BASE_SEED * 0x9E3779B1 + 12345) % (1 << 64)

pytestmark = pytest.mark.skipif(not (DATA / FILES[0]).exists(), reason="shared/datasets_raw not present")


@functools.lru_cache(maxsize=None)
def reference(name: str, seed: int = 0, int_buckets: bool = True) -> ref.Parsed:
    if not int_buckets and name in FILES[:2]:
        # C1..C26 hash the same with or without the integer fields; reuse the full parse.
        full = reference(name, seed, True)
        return ref.Parsed(full.field_names[13:], full.field_ids[13:], full.kinds[13:], full.dense_names,
                          full.labels, full.dense, full.dense_missing, [k[13:] for k in full.keys], full.skipped)
    return ref.criteo(DATA / name, int_buckets=int_buckets, seed=seed)


def assert_matches(d, r: ref.Parsed, buckets=None, keys: bool = False) -> None:
    assert d.field_names == r.field_names
    assert d.dense_names == r.dense_names
    if r.labels is None:
        assert d.labels is None
    else:
        np.testing.assert_array_equal(d.labels, r.label_array())
    np.testing.assert_array_equal(d.dense, r.dense_array())
    np.testing.assert_array_equal(d.dense_missing, r.missing_array())
    if keys:
        np.testing.assert_array_equal(d.sparse, r.key_matrix())
        np.testing.assert_array_equal(d.field_offsets, np.zeros(len(r.field_names) + 1, np.int64))
    else:
        np.testing.assert_array_equal(d.sparse, r.sparse(buckets))
        b = hashing.resolve_buckets(buckets, r.kinds)
        np.testing.assert_array_equal(d.field_offsets, hashing.field_offsets_for(b))
    assert d.skipped == dict(r.skipped)


@pytest.fixture
def split_small(monkeypatch):
    """Let a few KiB get a thread of their own, so small samples exercise the range split."""
    monkeypatch.setattr(reader, "MIN_RANGE_BYTES", 1024)


@pytest.mark.parametrize("name", FILES)
def test_defaults_one_thread(name):
    d = reader.read_criteo(DATA / name, cache=False, num_threads=1)
    assert_matches(d, reference(name))
    assert d.meta["format"] == ("criteo-test" if "test" in name else "criteo-train")
    assert d.meta["cache"]["status"] == "disabled"


@pytest.mark.parametrize("name", FILES)
def test_no_int_buckets_many_threads(name, split_small):
    d = reader.read_criteo(DATA / name, int_buckets=False, cache=False, num_threads=5)
    assert d.num_fields == 26
    assert_matches(d, reference(name, 0, False))


@pytest.mark.parametrize("name", FILES)
def test_bucket_list_and_seed(name, np_rng, split_small):
    # Powers of two, odd sizes up to 2^40 and 1 (one bucket): the mask and the division-free
    # remainder paths both run.
    buckets = [int(x) for x in np_rng.integers(1, 1 << 40, size=39)]
    buckets[:6] = [1, 2, 1 << 17, 3, (1 << 40) - 1, 1000003]
    d = reader.read_criteo(DATA / name, hash_buckets=buckets, hash_seed=HASH_SEED, cache=False, num_threads=2)
    assert_matches(d, reference(name, HASH_SEED), buckets)


@pytest.mark.parametrize("name", FILES)
def test_keys(name, split_small):
    d = reader.read_criteo(DATA / name, keys=True, hash_seed=HASH_SEED, cache=False, num_threads=3)
    assert d.meta["keys"] is True
    assert_matches(d, reference(name, HASH_SEED), keys=True)


def test_one_bucket_count_for_all_fields():
    d = reader.read_criteo(DATA / FILES[0], hash_buckets=1000003, cache=False)
    assert_matches(d, reference(FILES[0]), 1000003)


@pytest.mark.parametrize("odd", [True, False], ids=["odd_buckets", "pow2_buckets"])
def test_offsets_past_2_31(odd):
    # 39 fields of ~2^33 rows: the last fields' ids sit near 39 * 2^33 > 2^38, far past int32.
    # Odd sizes take the scalar hash, powers of two the vector one (on CPUs that have it).
    buckets = [(1 << 33) + (2 * f + 1 if odd else 0) for f in range(39)]
    d = reader.read_criteo(DATA / FILES[0], hash_buckets=buckets, cache=False, num_threads=2)
    assert int(d.field_offsets[-1]) > 1 << 38
    assert int(d.sparse[:, -1].max()) > 1 << 31
    assert_matches(d, reference(FILES[0]), buckets)


def test_threads_and_blocks_agree(split_small):
    one = reader.read_criteo(DATA / FILES[0], cache=False, num_threads=1)
    many = reader.read_criteo(DATA / FILES[0], cache=False, num_threads=7, chunk_bytes=100_000)
    for a, b in [(one.labels, many.labels), (one.dense, many.dense), (one.dense_missing, many.dense_missing),
                 (one.sparse, many.sparse)]:
        np.testing.assert_array_equal(a, b)


def test_arrays_are_native_buffers_not_copies():
    d = reader.read_criteo(DATA / SMALL, cache=False)
    for arr in (d.dense, d.dense_missing, d.sparse):
        assert not arr.flags.owndata and type(arr.base).__name__ == "PyCapsule"
        assert arr.flags.c_contiguous and arr.flags.writeable
    assert d.sparse.dtype == np.int64 and d.dense.dtype == np.float32 and d.dense_missing.dtype == np.bool_


@pytest.mark.parametrize("name,chunk_bytes", [(SMALL, 1), (SMALL, 777), (FILES[0], 50_000)])
def test_chunks_concatenate_to_the_whole(name, chunk_bytes, split_small):
    whole = reader.read_criteo(DATA / name, cache=False)
    chunks = list(reader.iter_criteo_chunks(DATA / name, chunk_bytes=chunk_bytes, num_threads=3))
    if chunk_bytes == 1:
        # A block grows (doubling) until it holds a whole line, so it ends up with one or two.
        assert max(len(c) for c in chunks) <= 2 and len(chunks) >= whole.num_rows // 2
    assert [c.meta["chunk"] for c in chunks] == list(range(len(chunks)))
    assert chunks[0].meta["first_line"] == 1 and chunks[-1].meta["end_line"] == whole.num_rows + 1
    for a, b in zip(chunks, chunks[1:]):
        assert a.meta["end_line"] == b.meta["first_line"]
    np.testing.assert_array_equal(np.concatenate([c.labels for c in chunks]), whole.labels)
    np.testing.assert_array_equal(np.concatenate([c.dense for c in chunks]), whole.dense)
    np.testing.assert_array_equal(np.concatenate([c.dense_missing for c in chunks]), whole.dense_missing)
    np.testing.assert_array_equal(np.concatenate([c.sparse for c in chunks]), whole.sparse)
    np.testing.assert_array_equal(chunks[0].field_offsets, whole.field_offsets)


def test_gzip_equals_plain(tmp_path, split_small):
    raw = (DATA / FILES[0]).read_bytes()
    plain = reader.read_criteo(DATA / FILES[0], cache=False)
    gz = tmp_path / "train.txt.gz"
    gz.write_bytes(gzip.compress(raw, compresslevel=1))
    # Two concatenated members split mid-line, and no .gz suffix: content decides.
    multi = tmp_path / "train_multi"
    cut = len(raw) // 3 + 17
    multi.write_bytes(gzip.compress(raw[:cut], compresslevel=1) + gzip.compress(raw[cut:], compresslevel=1))
    for path in (gz, multi):
        for threads, chunk in ((1, 1 << 26), (3, 300_000)):
            d = reader.read_criteo(path, cache=False, num_threads=threads, chunk_bytes=chunk)
            np.testing.assert_array_equal(d.sparse, plain.sparse)
            np.testing.assert_array_equal(d.dense, plain.dense)
            np.testing.assert_array_equal(d.labels, plain.labels)


def test_gzip_damage_is_an_error(tmp_path):
    packed = gzip.compress((DATA / SMALL).read_bytes())
    cut = tmp_path / "cut.gz"
    cut.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ValueError, match=r"cut\.gz: truncated gzip"):
        reader.read_criteo(cut, format="train", cache=False)
    bad = bytearray(packed)
    bad[len(bad) // 2: len(bad) // 2 + 8] = b"\x00\xff" * 4
    broken = tmp_path / "broken.gz"
    broken.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match=r"broken\.gz: (corrupt|truncated) gzip"):
        reader.read_criteo(broken, format="train", cache=False)


def test_line_endings_blank_lines_and_bom(tmp_path, np_rng, split_small):
    lines = (DATA / SMALL).read_bytes().split(b"\n")[:-1]
    out, blanks = [], 0
    for line in lines:
        if np_rng.random() < 0.2:
            out.append(b"" if np_rng.random() < 0.5 else b"\r")
            blanks += 1
        out.append(line + b"\r")
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(out))  # BOM, CRLF, no final newline
    plain = reader.read_criteo(DATA / SMALL, cache=False)
    for threads in (1, 4):
        d = reader.read_criteo(path, cache=False, num_threads=threads)
        np.testing.assert_array_equal(d.sparse, plain.sparse)
        np.testing.assert_array_equal(d.dense, plain.dense)
        np.testing.assert_array_equal(d.labels, plain.labels)
        assert d.skipped == ({"blank_line": blanks} if blanks else {})
        assert d.meta["lines"] == len(out)
    assert_matches(reader.read_criteo(path, cache=False), ref.criteo(path))


def test_format_auto_and_forced(tmp_path):
    train = reader.read_criteo(DATA / SMALL, format="train", cache=False)
    assert train.labels is not None and train.meta["format"] == "criteo-train"
    with pytest.raises(reader.ParseError) as e:
        reader.read_criteo(DATA / SMALL, format="test", cache=False)
    assert (e.value.line, e.value.reason, e.value.field) == (1, "field_count", "C26")
    odd = tmp_path / "odd.txt"
    odd.write_bytes(b"1\t2\t3\n")
    with pytest.raises(ValueError, match=r"odd\.txt: line 1 has 3 tab-separated fields"):
        reader.read_criteo(odd, cache=False)


def test_read_dispatches_by_content(tmp_path):
    d = reader.read(DATA / FILES[1], cache=False)
    assert d.meta["format"] == "criteo-test" and d.labels is None
    assert reader.read(DATA / SMALL, format="train", cache=False).meta["format"] == "criteo-train"
    assert reader.read(DATA / SMALL, format="criteo-train", int_buckets=False, cache=False).num_fields == 26
    avazu = DATA.parent / "datasets_raw" / "avazu_head10k" / "avazu_train_head10k.csv"
    assert reader.read(avazu, int_buckets=True, cache=False).meta["format"] == "avazu-train"  # ignored there
    with pytest.raises(ValueError, match="format must be"):
        reader.read(DATA / SMALL, format="orc", cache=False)
    with pytest.raises(ValueError, match="part-0.txt: not a Parquet or Arrow IPC file"):
        reader.read(DATA / SMALL, format="parquet", cache=False)
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="DelimitedSchema"):
        reader.read(other, cache=False)
    d = reader.read(other, format="delimited", schema=reader.DelimitedSchema(label="a", categorical=["b"]), cache=False)
    assert d.labels.tolist() == [1.0] and d.field_names == ["b"]


@pytest.mark.parametrize("keys", [False, True])
def test_vector_and_scalar_hash_agree(monkeypatch, keys):
    # Power-of-two buckets (and keys) take the AVX-512 hash where the CPU has it; the scalar
    # loop is the reference. Both must give the reference's ids.
    name = FILES[0]
    buckets = [1 << (f % 30 + 1) for f in range(39)]
    monkeypatch.setattr(reader, "VECTOR_HASH", False)
    scalar = reader.read_criteo(DATA / name, hash_buckets=buckets, keys=keys, hash_seed=HASH_SEED, cache=False)
    monkeypatch.setattr(reader, "VECTOR_HASH", True)
    vector = reader.read_criteo(DATA / name, hash_buckets=buckets, keys=keys, hash_seed=HASH_SEED, cache=False)
    np.testing.assert_array_equal(scalar.sparse, vector.sparse)
    assert_matches(vector, reference(name, HASH_SEED), buckets, keys=keys)
