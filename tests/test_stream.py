"""Streaming from disk (mlfast.io.stream, ``--stream``): every row once per epoch, the rows the
in-memory reader reads, exact mid-epoch resume, several files, splits by blocks, clear refusals,
training through the API and the CLI, and a run under a hard memory limit that the in-memory path
cannot meet (data larger than memory).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mlfast.io.reader import read, read_on_disk
from mlfast.io.stream import DiskDataset, StreamLoader, block_rows_for, expand_paths, open_dataset, split_blocks

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets_raw"
KAGGLE = SHARED / "criteo_kaggle_head10k" / "train_head10000.txt"
PADDLE = [SHARED / "paddlerec_criteo_tiny" / "part-0.txt", SHARED / "paddlerec_criteo_tiny" / "dnn_sample_train.txt"]
TAOBAO = SHARED / "taobao_ad_tiny_fuxictr" / "train_sample.csv"
AVAZU = SHARED / "avazu_head10k" / "avazu_train_head10k.csv"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("MLFAST_CACHE_DIR", str(d))
    return d


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory):
    cache = tmp_path_factory.mktemp("stream_cache")
    return open_dataset(KAGGLE, {"cache": True}, cache_dir=cache), read(KAGGLE, cache=False)


def _indices(batches) -> np.ndarray:
    return np.concatenate([b.index.numpy() for b in batches]) if batches else np.zeros(0, np.int64)


def test_the_rows_read_from_disk_are_the_rows_read_into_memory(kaggle):
    ds, mem = kaggle
    assert len(ds) == mem.num_rows and ds.header.num_rows == 0
    np.testing.assert_array_equal(ds.header.field_offsets, mem.field_offsets)
    blocks = np.array([7, 3, 999, 0])
    got, rows = ds.read_blocks(blocks)
    want = np.concatenate([np.arange(b * ds.block_rows, min((b + 1) * ds.block_rows, len(ds))) for b in blocks])
    np.testing.assert_array_equal(rows, want)
    for name in ("sparse", "dense", "dense_missing", "labels", "lines"):
        np.testing.assert_array_equal(getattr(got, name), getattr(mem, name)[want], err_msg=name)


@pytest.mark.parametrize("batch_size,window_rows,shuffle,min_last", [
    (512, 2048, True, 1), (100, 130, True, 2), (4096, 100_000, True, 1), (333, 1000, False, 1), (7, 10, True, 2),
    (10_000, 50, True, 1)])
def test_every_row_once_per_epoch_in_batches_of_the_batch_size(kaggle, np_rng, batch_size, window_rows, shuffle,
                                                                min_last):
    ds, mem = kaggle
    blocks = np.sort(np_rng.choice(ds.num_blocks, ds.num_blocks * 3 // 4, replace=False))
    loader = StreamLoader(ds, blocks, batch_size, shuffle=shuffle, seed=5, window_rows=window_rows, min_last=min_last,
                          prefetch=int(np_rng.integers(0, 2)))
    rows = int(ds.block_lengths[blocks].sum())
    batches = list(loader.epoch(1))
    sizes = [len(b) for b in batches]
    assert len(batches) == len(loader)
    assert all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size
    idx = _indices(batches)
    expect = np.concatenate([np.arange(ds.block_start[b], ds.block_start[b] + ds.block_lengths[b]) for b in blocks])
    dropped = rows - len(idx)
    assert dropped == (rows % batch_size if 0 < rows % batch_size < min_last else 0)
    assert len(np.unique(idx)) == len(idx) and np.isin(idx, expect).all()
    if not shuffle:
        np.testing.assert_array_equal(idx, expect)
    b = batches[len(batches) // 2]  # the tensors hold those rows
    np.testing.assert_array_equal(b.sparse.numpy(), mem.sparse[b.index.numpy()])
    np.testing.assert_array_equal(b.labels.numpy(), mem.labels[b.index.numpy()])
    np.testing.assert_array_equal(b.dense.numpy(), mem.dense[b.index.numpy()])


def test_orders_are_seeded_per_epoch_and_shuffled_across_blocks(kaggle):
    ds, _ = kaggle
    a = _indices(StreamLoader(ds, None, 256, shuffle=True, seed=1, window_rows=640).epoch(0))
    assert np.array_equal(a, _indices(StreamLoader(ds, None, 256, shuffle=True, seed=1, window_rows=640).epoch(0)))
    assert not np.array_equal(a, _indices(StreamLoader(ds, None, 256, shuffle=True, seed=1, window_rows=640).epoch(1)))
    assert not np.array_equal(a, _indices(StreamLoader(ds, None, 256, shuffle=True, seed=2, window_rows=640).epoch(0)))
    # the first batch mixes rows of several blocks, far apart in the file
    first = a[:256] // ds.block_rows
    assert len(np.unique(first)) > 20 and first.max() - first.min() > ds.num_blocks // 4


@pytest.mark.parametrize("window_rows", [70, 1000, 100_000])
def test_resuming_mid_epoch_yields_exactly_the_rest_of_the_epoch(kaggle, np_rng, window_rows):
    ds, _ = kaggle
    loader = StreamLoader(ds, None, 96, shuffle=True, seed=3, window_rows=window_rows, min_last=2)
    whole = list(loader.epoch(2))
    for start in {0, 1, len(whole) - 1, len(whole), *np_rng.integers(0, len(whole), 4).tolist()}:
        tail = list(loader.epoch(2, start_batch=start))
        assert len(tail) == len(whole) - start
        for x, y in zip(tail, whole[start:]):
            assert torch.equal(x.index, y.index) and torch.equal(x.sparse, y.sparse)
    with pytest.raises(ValueError, match="start_batch"):
        loader.epoch(0, start_batch=len(whole) + 1)


def test_a_dataset_of_several_files_numbers_rows_across_them(cache, tmp_path):
    ds = open_dataset([PADDLE[0], PADDLE[1]], {"cache": True})
    a, b = read(PADDLE[0], cache=False), read(PADDLE[1], cache=False)
    assert len(ds) == a.num_rows + b.num_rows and ds.files == [str(p) for p in PADDLE]
    idx = _indices(StreamLoader(ds, None, 16, shuffle=True, seed=0, window_rows=40).epoch(0))
    assert sorted(idx.tolist()) == list(range(len(ds)))
    data, rows = ds.read_blocks(np.arange(ds.num_blocks))
    np.testing.assert_array_equal(data.sparse, np.concatenate([a.sparse, b.sparse]))
    # a directory and a glob name the same files, in name order
    d = tmp_path / "days"
    d.mkdir()
    for i, p in enumerate(PADDLE):
        (d / f"day_{i}").write_bytes(p.read_bytes())
    (d / "_SUCCESS").write_text("")
    assert expand_paths(d) == [str(d / "day_0"), str(d / "day_1")] == expand_paths(str(d / "day_*"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_paths(str(d / "nope_*"))


def test_files_of_another_layout_are_refused(cache):
    with pytest.raises(ValueError, match="another layout"):
        DiskDataset([read_on_disk(KAGGLE), read_on_disk(PADDLE[0], hash_buckets=100)], "x")


def test_block_split_is_disjoint_covers_every_block_and_is_seeded(kaggle):
    ds, _ = kaggle
    tr, va, te = split_blocks(ds, (8, 1, 1), seed=4)
    assert (len(tr), len(va), len(te)) == (800, 100, 100)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(ds.num_blocks))
    assert np.array_equal(tr, split_blocks(ds, (8, 1, 1), seed=4)[0])
    assert not np.array_equal(tr, split_blocks(ds, (8, 1, 1), seed=5)[0])
    assert block_rows_for(10_000) == 10 and block_rows_for(50_000_000) == 4096 and block_rows_for(3) == 1


def test_inputs_that_cannot_stream_are_refused_with_the_reason(cache):
    from mlfast.io.prepare import prepare_data

    with pytest.raises(ValueError, match="vocabulary mode"):
        prepare_data(str(KAGGLE), reader={"stream": True, "min_count": 2})
    with pytest.raises(ValueError, match="bag .sequence. fields"):
        read_on_disk(TAOBAO, format="delimited", schema=_taobao_schema())
    with pytest.raises(ValueError, match="cache=False"):
        read_on_disk(KAGGLE, cache=False)
    with pytest.raises(ValueError, match="reads files from disk"):
        prepare_data(read(KAGGLE, cache=False), reader={"stream": True})


def _taobao_schema():
    from mlfast.io.reader import DelimitedSchema

    return DelimitedSchema(label="clk", categorical=["userid", "adgroup_id"], sequence=["click_sequence"])


def test_avazu_streams_too(cache):
    ds = open_dataset(AVAZU, {"cache": True})
    mem = read(AVAZU, cache=False)
    data, rows = ds.read_blocks(np.arange(ds.num_blocks))
    np.testing.assert_array_equal(data.sparse, mem.sparse)


@pytest.mark.slow
def test_fit_streams_and_resumes_to_the_uninterrupted_result(cache, tmp_path):
    import mlfast

    kw = dict(peers=["deepfm:mlp=32", "lr"], reader={"stream": True, "window_rows": 1500, "hash_buckets": 2000},
              batch_size=256, epochs=2, seed=1, progress=False)
    whole = mlfast.fit(str(KAGGLE), out=tmp_path / "whole", **kw)
    assert whole.metrics["valid"]["deepfm"]["auc"] > 0.65
    data = json.loads((tmp_path / "whole" / "config.json").read_text())["data"]
    assert data["stream"]["block_rows"] == 10 and data["split"]["by"] == "blocks"
    part = mlfast.fit(str(KAGGLE), out=tmp_path / "part", max_steps=40, **kw)  # stops mid-epoch 2
    assert part.metrics["train"]["stopped"] == "max_steps"
    done = mlfast.fit(str(KAGGLE), out=tmp_path / "part", resume=True, max_steps=None, **kw)
    for split in ("valid", "test"):
        assert done.metrics[split] == whole.metrics[split]


def test_the_command_line_trains_from_a_directory_of_files(cache, tmp_path):
    d = tmp_path / "days"
    d.mkdir()
    for i in range(3):
        (d / f"day_{i}").write_bytes(KAGGLE.read_bytes() if i == 0 else PADDLE[i - 1].read_bytes())
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "mlfast", "train", str(d), "--stream", "--peers", "lr", "--epochs", "1",
                        "--hash-buckets", "1000", "--out", str(out), "--quiet"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "MLFAST_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["reader"]["stream"] is True and len(cfg["data"]["stream"]["files"]) == 3
    assert cfg["data"]["rows"]["train"] + cfg["data"]["rows"]["valid"] + cfg["data"]["rows"]["test"] == 10_200


@pytest.mark.slow
@pytest.mark.parametrize("lanes,batch_size,window_rows", [(2, 256, 2048), (3, 100, 700), (4, 512, 100_000),
                                                          (8, 64, 10)])
def test_lanes_give_full_batches_of_distinct_rows_and_each_shard_reads_only_its_lanes(kaggle, np_rng, lanes,
                                                                                     batch_size, window_rows):
    from mlfast.dist.data import ShardedStreamLoader
    from mlfast.io.batches import shard_bounds

    ds, mem = kaggle
    blocks = np.sort(np_rng.choice(ds.num_blocks, ds.num_blocks * 3 // 4, replace=False))
    loader = StreamLoader(ds, blocks, batch_size, shuffle=True, seed=4, window_rows=window_rows, lanes=lanes,
                          prefetch=int(np_rng.integers(0, 2)))
    rows = int(ds.block_lengths[blocks].sum())
    expect = np.concatenate([np.arange(ds.block_start[b], ds.block_start[b] + ds.block_lengths[b]) for b in blocks])
    for epoch in (0, 1):
        batches = list(loader.epoch(epoch))
        assert len(batches) == len(loader) and all(len(b) == batch_size for b in batches)
        idx = _indices(batches)
        assert len(np.unique(idx)) == len(idx) and np.isin(idx, expect).all()
        assert rows - len(idx) == loader.left_out < lanes * (ds.block_rows + batch_size)
        b = batches[-1]
        np.testing.assert_array_equal(b.sparse.numpy(), mem.sparse[b.index.numpy()])
    # a data shard's batches are its slice of each global batch, read from its own lanes' blocks only
    full = list(loader.epoch(1))
    for shards in [d for d in (1, 2, lanes) if lanes % d == 0]:
        read = {}
        for shard in range(shards):
            seen: list[int] = []
            real = ds.read_blocks
            ds.read_blocks = lambda bl, _s=seen, _r=real: (_s.extend(np.asarray(bl).tolist()), _r(bl))[1]
            try:
                mine = list(ShardedStreamLoader(loader, shard, shards).epoch(1))
            finally:
                del ds.read_blocks
            read[shard] = set(seen)
            assert len(mine) == len(full)
            for got, whole in zip(mine, full):
                lo, hi = shard_bounds(batch_size, shard, shards)
                assert (got.offset, got.global_size) == (lo, batch_size)
                np.testing.assert_array_equal(got.index.numpy(), whole.index.numpy()[lo:hi])
                np.testing.assert_array_equal(got.sparse.numpy(), whole.sparse.numpy()[lo:hi])
        assert sum(len(v) for v in read.values()) == len(set().union(*read.values()))  # no block read twice
        if shards > 1:
            share = lanes // shards * -(-len(blocks) // lanes)  # its lanes' blocks, not every block
            assert max(len(v) for v in read.values()) <= share
    # exact resume inside a lane stream
    k = len(full) // 2
    np.testing.assert_array_equal(_indices(list(loader.epoch(1, start_batch=k))), _indices(full[k:]))


@pytest.mark.parametrize("shards,batch_size", [(2, 1000), (3, 555), (4, 10_000)])  # 555: uneven counts, padded
def test_evaluation_shards_read_their_own_range_of_blocks(kaggle, np_rng, shards, batch_size):
    from mlfast.dist.data import ShardedStreamLoader

    ds, mem = kaggle
    blocks = np.sort(np_rng.choice(ds.num_blocks, ds.num_blocks // 2, replace=False))
    loader = StreamLoader(ds, blocks, batch_size, window_rows=3000)
    whole = _indices(list(loader.epoch(0)))
    pieces, read = [], []
    lens = set()
    for shard in range(shards):
        seen: list[int] = []
        real = ds.read_blocks
        ds.read_blocks = lambda bl, _s=seen, _r=real: (_s.extend(np.asarray(bl).tolist()), _r(bl))[1]
        try:
            sl = ShardedStreamLoader(loader, shard, shards)
            batches = list(sl.epoch(0))
        finally:
            del ds.read_blocks
        lens.add((len(sl), len(batches)))
        got = _indices(batches)
        assert len(got) == sl.rows_by_shard()[shard]
        k = len(batches) // 2  # exact resume, padding included
        np.testing.assert_array_equal(_indices(list(sl.epoch(0, start_batch=k))), _indices(batches[k:]))
        for b in batches:  # where its rows sit among the shards' rows of that step
            assert 0 <= b.offset and b.offset + len(b) <= b.global_size
            np.testing.assert_array_equal(b.sparse.numpy(), mem.sparse[b.index.numpy()])
        pieces.append(got)
        read.append(set(seen))
    assert len(lens) == 1 and len(set(next(iter(lens)))) == 1  # every shard runs as many batches
    np.testing.assert_array_equal(np.concatenate(pieces), whole)  # every row once, in file order by shard
    assert sum(map(len, read)) == len(set().union(*read)) == len(blocks)  # each block read by one shard


def test_lanes_are_refused_where_they_cannot_work(kaggle):
    from mlfast.dist.data import ShardedStreamLoader

    ds, _ = kaggle
    with pytest.raises(ValueError, match="evaluation reads one stream"):
        StreamLoader(ds, None, 100, shuffle=False, lanes=2)
    with pytest.raises(ValueError, match="lanes must be in"):
        StreamLoader(ds, None, 4, shuffle=True, lanes=5)
    with pytest.raises(ValueError, match="multiple of the number of data shards"):
        ShardedStreamLoader(StreamLoader(ds, None, 100, shuffle=True, lanes=3), 0, 2)
    with pytest.raises(ValueError, match="too few rows"):
        StreamLoader(ds, np.arange(4), 512, shuffle=True, lanes=4)


def test_data_parallel_streaming_trains_what_one_process_trains(tmp_path):
    """2 processes read a lane each (the default); one process with --stream-lanes 2 trains on the
    same batches. With --stream-lanes 1 both processes read every window and cut each batch: the
    single process's default run."""
    from mlfast.io.synth import synth_criteo

    data = tmp_path / "train.tsv"
    synth_criteo(str(data), rows=4000, seed=3)
    args = [str(data), "--stream", "--window-rows", "700", "--peers", "deepfm:mlp=32,lr", "--hash-buckets", "500",
            "--batch-size", "256", "--epochs", "1", "--quiet", "--threads", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                                             "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT")}
    env.update(OMP_NUM_THREADS="1", MLFAST_CACHE_DIR=str(tmp_path / "cache"))
    outs = {}
    for name, extra in (("1p_lanes2", ["--stream-lanes", "2"]), ("2p", ["--nproc", "2"]), ("1p", []),
                        ("2p_lanes1", ["--nproc", "2", "--stream-lanes", "1"])):
        out = tmp_path / name
        r = subprocess.run([sys.executable, "-m", "mlfast", "train", *args, "--out", str(out), *extra],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[name] = json.loads((out / "metrics.json").read_text())
        log = (out / "train.log").read_text()
        assert ("2 lanes of 128 rows per batch" in log) == (name in ("1p_lanes2", "2p")), (name, log[-2000:])
    assert outs["2p"]["train"]["distributed"]["shards"] == 2
    assert outs["2p"]["train"]["samples"] == outs["1p_lanes2"]["train"]["samples"] < outs["1p"]["train"]["samples"]
    for one, two in (("1p_lanes2", "2p"), ("1p", "2p_lanes1")):
        for split in ("valid", "test"):
            for name, m in outs[one][split].items():  # fp32: the ranks' sums add in another order
                assert outs[two][split][name]["auc"] == pytest.approx(m["auc"], abs=2e-4), (one, split, name)
                assert outs[two][split][name]["logloss"] == pytest.approx(m["logloss"], abs=2e-4), (one, split, name)


def test_ranks_score_their_own_part_of_a_streamed_validation_file(tmp_path):
    """A validation file of 32,800 rows (1,025 blocks of 32): rank 0 scores its 512 blocks, 16,384
    rows (4 batches of the CPU's evaluation size 4,096, then an empty one to keep in step with rank
    1), rank 1 its 513 blocks, 16,416 rows (5 batches); the metrics are one process's."""
    from mlfast.api import eval_batch_size

    assert eval_batch_size("cpu") == 4096  # what the row counts above assume
    from mlfast.io.synth import synth_criteo

    train, valid = tmp_path / "train.tsv", tmp_path / "valid.tsv"
    synth_criteo(str(train), rows=3000, seed=3)
    synth_criteo(str(valid), rows=32_800, seed=4)
    args = [str(train), "--valid", str(valid), "--stream", "--peers", "lr", "--hash-buckets", "500",
            "--batch-size", "256", "--epochs", "1", "--quiet", "--threads", "1", "--eval-every", "5"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                                             "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT")}
    env.update(OMP_NUM_THREADS="1", MLFAST_CACHE_DIR=str(tmp_path / "cache"))
    outs = {}
    for name, extra in (("one", ["--stream-lanes", "2"]), ("two", ["--nproc", "2"])):
        r = subprocess.run([sys.executable, "-m", "mlfast", "train", *args, "--out", str(tmp_path / name), *extra],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    for peer, m in outs["one"]["valid"].items():
        assert outs["two"]["valid"][peer]["auc"] == pytest.approx(m["auc"], abs=2e-4), peer
        assert outs["two"]["valid"][peer]["logloss"] == pytest.approx(m["logloss"], abs=2e-4), peer


# ------------------------------------------------------------------------------------ out of core
CAP_MB = 1700  # a streamed run of this file peaked at 1469 MiB of address space (parse included)
ROWS = 4_800_000  # 1.74 GiB of cached columns: more than the cap


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and /proc/self/status are Linux's")
def test_training_on_data_larger_than_the_memory_limit(tmp_path):
    """A file whose arrays exceed a hard address-space limit (RLIMIT_AS, which counts every mapping
    and allocation): the in-memory path cannot even map them; --stream parses, trains a whole epoch
    and evaluates under the limit."""
    from mlfast.io.synth import synth_criteo

    data = tmp_path / "big.tsv"
    synth_criteo(str(data), rows=ROWS, seed=0)
    env = {**os.environ, "MLFAST_CACHE_DIR": str(tmp_path / "cache"), "MALLOC_ARENA_MAX": "2"}
    args = ["--peers", "lr", "--hash-buckets", "1000", "--epochs", "1", "--batch-size", "4096", "--quiet",
            "--window-rows", "65536", "--threads", "2"]
    probe = ("import re, resource, sys; from mlfast.cli import main; rc = main(sys.argv[1:]); "
             "s = open('/proc/self/status').read(); "
             "print('PEAK', *(re.search(k + r':\\s+(\\d+)', s).group(1) for k in ('VmPeak', 'VmHWM'))); sys.exit(rc)")

    def run(*extra: str) -> subprocess.CompletedProcess:
        cap = CAP_MB << 20
        return subprocess.run([sys.executable, "-c", probe, "train", str(data), *args, *extra],
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)),
                              capture_output=True, text=True, timeout=900, env=env)

    streamed = run("--stream", "--out", str(tmp_path / "streamed"))
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    cache_bytes = sum(f.stat().st_size for f in (tmp_path / "cache").rglob("*.bin"))
    assert cache_bytes > CAP_MB << 20  # the data is larger than the limit
    peak_kb, hwm_kb = (int(x) for x in streamed.stdout.split("PEAK")[1].split())
    metrics = json.loads((tmp_path / "streamed" / "metrics.json").read_text())
    assert metrics["train"]["stopped"] == "completed" and metrics["train"]["samples"] >= 0.79 * ROWS
    assert metrics["valid"]["lr"]["auc"] > 0.7
    print(f"\nout of core: {cache_bytes / 2**30:.2f} GiB of cached columns, limit {CAP_MB} MiB; streamed run: "
          f"peak address space {peak_kb / 1024:.0f} MiB, peak RSS {hwm_kb / 1024:.0f} MiB")
    in_memory = run("--out", str(tmp_path / "in_memory"))  # the same data mapped into memory
    assert in_memory.returncode != 0 and "memory" in in_memory.stderr.lower(), in_memory.stderr[-2000:]
