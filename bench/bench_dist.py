"""Multi-process training throughput and traffic, per ``--parallel`` mode, from the
implementation's own counters (``mlfast.dist.comm.CommStats``), and the projection to GPU clusters.

    python bench/bench_dist.py throughput --json bench/results/dist_cpu.json
    python bench/bench_dist.py bytes --worlds 2,4,8 --batch-sizes 4096,16384 --json bench/results/dist_bytes.json
    python bench/bench_dist.py ids ../shared/datasets_raw/criteo_kaggle_head10k/train_head10000.txt \
        --json bench/results/dist_ids_criteo10k.json
    python bench/bench_dist.py project --bytes bench/results/dist_bytes.json --ids bench/results/dist_ids_criteo10k.json

``throughput``: samples/s of DeepFM + DCN (the default peers and options: MLP 400-400-400,
embedding 16, Criteo's 39 hashed fields, 3.4M table rows) on a generated Criteo-format file, for 1
process (all cores) and for 2 processes (one core each) in each mode, gloo on the CPU, the same
global batch; the median step time over the timed steps (p20 / p80 with it), and each rank's bytes
sent per step by kind, calls per step and host time in collectives.

``bytes``: the same models and data, ``--parallel data`` and ``both`` at each world size, a few
steps each: bytes and collective calls per step and rank (the maximum over ranks). World sizes
beyond the core count run slowly (oversubscribed) but count the same bytes.

``ids``: distinct ids per batch of b shuffled rows of a real log: the all-to-all traffic of a data
shard scales with it, and generated data has far fewer than real Criteo.

``project``: per-step time = compute + communication (no overlap: the implementation does not
overlap them), communication = sum over collectives of (latency + bytes / bandwidth): dense,
BatchNorm and logit bytes and the number of collectives from ``bytes``' counters, the all-to-all
bytes from ``ids``' real distinct-id counts, links as stated in ``LINKS``, GPU compute as stated
in ``LAUNCH_MS`` / ``PEAK_ROWS_PER_S`` (assumptions, not measurements); prints the table that
/work/notes/distributed.md shows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent

PEERS = "deepfm,dcn"


def _data(rows: int, seed: int = 0) -> Path:
    """A generated Criteo-format file (cached in the temp directory), read once into the cache."""
    from mlfast.io.prepare import prepare_data, reader_options
    from mlfast.io.synth import synth_criteo

    path = Path(tempfile.gettempdir()) / f"mlfast_bench_dist_{rows}_{seed}.tsv"
    if not path.exists():
        tmp = path.with_suffix(".partial")
        synth_criteo(str(tmp), rows=rows, seed=seed)
        os.replace(tmp, path)
    prepare_data(str(path), reader=reader_options(), split_seed=0)  # writes the binary cache
    return path


def _worker(spec: dict, out: str) -> None:
    """One rank (started by torchrun, like a user's job) of a timed run."""
    import torch.distributed as dist

    from mlfast.dist.data import ShardedBatchLoader
    from mlfast.dist.engine import DistEngine
    from mlfast.dist.launch import DistContext, init_process_group
    from mlfast.io.batches import BatchLoader
    from mlfast.io.prepare import prepare_data, reader_options
    from mlfast.models import FeatureSchema, parse_peers
    from mlfast.train.config import TrainConfig
    from mlfast.train.trainer import peer_seed

    torch.set_num_threads(spec["threads"])
    device, backend, _ = init_process_group("cpu", "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    prep = prepare_data(spec["data"], reader=reader_options(), split_seed=0)
    split = prep.splits["train"]
    schema = FeatureSchema.from_data(prep.train_data)
    specs = parse_peers(PEERS)
    cfg = TrainConfig(peers=PEERS.split(","), parallel=spec["mode"], exchange_every=spec["k"], cuda_graph=False,
                      progress=False)
    ctx = DistContext.create(spec["mode"], len(specs), device, backend)
    eng = DistEngine(ctx, specs, schema, cfg, device, [peer_seed(0, s.label) for s in specs], cfg.lr,
                     dense_touch=True)
    eng.set_alpha(1.0)
    B = spec["batch_size"]
    loader = BatchLoader(split.data, B, indices=split.indices, shuffle=True, seed=0, min_last=2, prefetch=2)
    topo = ctx.topology
    if topo.shards > 1:
        loader = ShardedBatchLoader(loader, topo.shard, topo.shards)
    def forever():
        e = 0
        while True:
            yield from loader.epoch(e)
            e += 1

    batches = forever()
    times = []
    for k in range(spec["warmup"] + spec["steps"]):
        if k == spec["warmup"]:
            ctx.world.barrier()
            ctx.stats.reset()
        batch = next(batches)
        t0 = time.perf_counter()
        eng.step_index = k
        eng.train_step(batch)
        ctx.world.barrier()  # a step ends when every rank's does
        times.append(time.perf_counter() - t0)
    timed = times[spec["warmup"]:]
    steps = len(timed)
    mine = {"rank": rank, "bytes": {k: v / steps for k, v in ctx.stats.bytes.items()},
            "calls": {k: v / steps for k, v in ctx.stats.calls.items()},
            "seconds": {k: v / steps for k, v in ctx.stats.seconds.items()}}
    every = ctx.world.all_gather_object(mine)
    if rank == 0:
        q = statistics.quantiles(timed, n=5) if len(timed) >= 2 else [timed[0]] * 4
        med = statistics.median(timed)
        kinds = sorted({k for m in every for k in m["bytes"]})
        row = {**{k: spec[k] for k in ("mode", "k", "threads", "batch_size")}, "processes": world,
               "topology": topo.to_dict(), "step_ms_median": 1e3 * med, "step_ms_p20": 1e3 * q[0],
               "step_ms_p80": 1e3 * q[3], "samples_per_s": B / med,
               "bytes_per_step_max": {k: max(m["bytes"].get(k, 0) for m in every) for k in kinds},
               "calls_per_step_max": {k: max(m["calls"].get(k, 0) for m in every) for k in kinds},
               "collective_seconds_per_step_max": {k: max(m["seconds"].get(k, 0) for m in every) for k in kinds},
               "table_rows": schema.table_rows, "dense_params": sum(p.numel() for p in eng.dense_params)}
        Path(out).write_text(json.dumps(row))
    dist.destroy_process_group()


def run_config(data: Path, mode: str, procs: int, threads: int, batch_size: int, steps: int, warmup: int,
               k: int = 1) -> dict:
    """One timed run: ``procs`` ranks started by torch.distributed.run, as a user starts them."""
    import subprocess

    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "row.json")
        spec = {"mode": mode, "k": k, "threads": threads, "batch_size": batch_size, "steps": steps,
                "warmup": warmup, "data": str(data)}
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
               str(Path(__file__).resolve()), "worker", "--spec", json.dumps(spec), "--out", out]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if r.returncode:
            raise RuntimeError(f"{mode} x{procs} failed:\n{r.stderr[-4000:]}")
        return json.loads(Path(out).read_text())


def machine() -> dict:
    from mlfast.ops.cpu_features import cpu_features

    return {"cpu": cpu_features().get("model", platform.processor()), "cores": os.cpu_count(),
            "torch": torch.__version__, "backend": "gloo", "device": "cpu"}


def cmd_throughput(a) -> list[dict]:
    data = _data(a.rows)
    cores = os.cpu_count() or 1
    configs = [("data", 1, cores, 1, "1 process, all cores")]
    for mode in a.modes.split(","):
        if mode == "both":
            configs.append(("both", 4, 1, 1, "4 processes on 2 cores (oversubscribed): 2 peer groups x 2 shards"))
        else:
            configs.append((mode, 2, max(1, cores // 2), 1, f"2 processes, {max(1, cores // 2)} core(s) each"))
    if "peers" in a.modes:
        configs.append(("peers", 2, max(1, cores // 2), a.exchange_every,
                        f"2 processes, copies refreshed every {a.exchange_every} steps"))
    rows = []
    for mode, procs, threads, k, note in configs:
        r = run_config(data, mode, procs, threads, a.batch_size, a.steps, a.warmup, k)
        r["note"] = note
        rows.append(r)
        sent = sum(r["bytes_per_step_max"].values())
        print(f"{mode:6s} x{procs} K={k} ({note}): {r['samples_per_s']:8,.0f} samples/s, step "
              f"{r['step_ms_median']:.0f} ms [p20 {r['step_ms_p20']:.0f}, p80 {r['step_ms_p80']:.0f}], "
              f"{sent / 1e6:.2f} MB sent per rank and step", flush=True)
    return rows


def cmd_bytes(a) -> list[dict]:
    data = _data(a.rows)
    rows = []
    for B in [int(x) for x in a.batch_sizes.split(",")]:
        for W in [int(x) for x in a.worlds.split(",")]:
            for mode in ("data", "both"):
                if mode == "both" and W < 4:
                    continue
                r = run_config(data, mode, W, 1, B, a.steps, a.warmup)
                rows.append(r)
                print(f"B={B} W={W} {mode}: " + ", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in
                                                            r["bytes_per_step_max"].items()), flush=True)
    return rows


def cmd_ids(a) -> list[dict]:
    """Distinct ids (table rows) per batch of b rows of a real file, shuffled rows: what a data
    shard of b rows fetches and updates per step (the all-to-all traffic scales with it)."""
    import numpy as np

    from mlfast.io.prepare import read_file, reader_options

    data = read_file(a.file, reader_options())
    ids = np.asarray(data.sparse)
    rng = np.random.default_rng(0)
    rows = []
    for b in [int(x) for x in a.rows_per_batch.split(",")]:
        if b > len(ids):
            continue
        counts = [len(np.unique(ids[rng.choice(len(ids), b, replace=False)])) for _ in range(a.samples)]
        rows.append({"rows": b, "distinct_ids": float(np.mean(counts)), "lookups": b * ids.shape[1]})
        print(f"{b:6d} rows: {np.mean(counts):9,.0f} distinct ids of {b * ids.shape[1]:,} lookups", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Projection

# Assumed links (per GPU, one direction) and per-collective latencies: H100 SXM NVLink 4 (450 GB/s
# per direction; NCCL reaches ~350 GB/s all-reduce bus bandwidth on 8 GPUs, less for all-to-all) and
# ConnectX-7 NDR InfiniBand, 400 Gb/s = 50 GB/s per port, derated to what NCCL gets. "remote":
# the share of a rank's all-to-all partners behind the slow link (8 of the 15 others on 2 nodes).
LINKS = {
    "1 node, 8 GPUs, NVLink 4": {"gpus": 8, "allreduce_GBps": 350, "alltoall_GBps": 250, "latency_us": 15,
                                 "remote": 1.0},
    "2 nodes, 16 GPUs, 8x400 Gb/s IB each": {"gpus": 16, "allreduce_GBps": 40, "alltoall_GBps": 40,
                                             "latency_us": 30, "remote": 8 / 15},
    "2 nodes, 16 GPUs, 1x400 Gb/s IB each": {"gpus": 16, "allreduce_GBps": 5, "alltoall_GBps": 5,
                                             "latency_us": 30, "remote": 8 / 15},
}
# Assumed GPU compute of the DeepFM + DCN pair (NOT measured in this repository: no GPU yet;
# bench/dist_smoke.sh measures the real rate): an eager step costs LAUNCH_MS of kernel launches for
# the pair (distributed steps run without CUDA graphs: the all-to-all sizes come to the host) plus
# rows / PEAK_ROWS_PER_S; a GPU holding 1/G of the peers pays 1/G of both.
LAUNCH_MS = 1.5
PEAK_ROWS_PER_S = 5.0e6
A2A_KINDS = ("ids", "rows", "grads")


def _widths(peers: str, dim: int = 16, fields: int = 39) -> list[int]:
    """Each peer's table width (embedding columns, + 1 for a first-order term)."""
    from mlfast.models import FeatureSchema, build_model, parse_peers

    schema = FeatureSchema(tuple(range(fields + 1)))
    return [build_model(s, schema, dim).embedding_width for s in parse_peers(peers)]


def project(rows: list[dict], ids: list[dict], link: dict, B: int, mode: str) -> dict | None:
    """Step time and samples/s of ``mode`` on ``link`` at global batch B: traffic from the counters
    (dense, BatchNorm, logits, calls), the all-to-all bytes from real distinct-id counts."""
    W = link["gpus"]
    r = next((x for x in rows if x["processes"] == W and x["batch_size"] == B and x["mode"] == mode), None)
    if r is None:
        return None
    topo = r["topology"]
    G, D = topo["groups"], topo["shards"]
    from mlfast.ops.embedding import TableLayout

    widths = _widths(PEERS)
    per_group = [widths[g * len(widths) // G:(g + 1) * len(widths) // G] for g in range(G)]
    R = max(TableLayout.make(w).row_width for w in per_group)  # floats per row of the widest group
    b = B // D
    have = sorted((x["rows"], x["distinct_ids"]) for x in ids)
    U = float(np.interp(b, [h[0] for h in have], [h[1] for h in have]))  # distinct ids of b real rows
    remote_rows = U * (D - 1) / D
    a2a = {"ids": remote_rows * 4, "rows": remote_rows * R * 4, "grads": remote_rows * R * 4}
    comm = 0.0
    sent = 0.0
    for kind, nbytes in r["bytes_per_step_max"].items():
        calls = r["calls_per_step_max"].get(kind, 0)
        if kind in A2A_KINDS:
            nbytes = a2a[kind]
            t = nbytes * link["remote"] / (link["alltoall_GBps"] * 1e9)
        else:
            t = nbytes / (link["allreduce_GBps"] * 1e9)
        sent += nbytes
        comm += t + calls * link["latency_us"] * 1e-6
    comm += link["latency_us"] * 1e-6  # the trainer's per-step stop-flag all-reduce
    compute = (LAUNCH_MS * 1e-3 + b / PEAK_ROWS_PER_S) / G
    single = LAUNCH_MS * 1e-3 + B / PEAK_ROWS_PER_S
    step = compute + comm
    return {"G": G, "D": D, "U": U, "MB": sent / 1e6, "calls": sum(r["calls_per_step_max"].values()) + 1,
            "compute_ms": 1e3 * compute, "comm_ms": 1e3 * comm, "samples_per_s": B / step,
            "speedup": single / step}


def cmd_project(a) -> None:
    rows = json.loads(Path(a.bytes).read_text())["rows"]
    ids = json.loads(Path(a.ids).read_text())["rows"]
    print(f"assumed: one GPU's eager step of the pair = {LAUNCH_MS} ms + B / {PEAK_ROWS_PER_S:,.0f} rows/s "
          f"(B=4096: {B_rate(4096):,.0f} samples/s, B=16384: {B_rate(16384):,.0f}); no compute/communication "
          "overlap; all-to-all bytes from real Criteo distinct-id counts\n")
    print("| setting | mode (G x D) | B | distinct ids / GPU | MB sent / GPU / step | collectives | compute ms | "
          "comm ms | samples/s | vs 1 GPU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, link in LINKS.items():
        for B in (4096, 16384):
            for mode in ("data", "both"):
                p = project(rows, ids, link, B, mode)
                if p is None:
                    continue
                print(f"| {name} | {mode} ({p['G']}x{p['D']}) | {B} | {p['U']:,.0f} | {p['MB']:.2f} | "
                      f"{p['calls']:.0f} | {p['compute_ms']:.2f} | {p['comm_ms']:.2f} | "
                      f"{p['samples_per_s'] / 1e6:.1f}M | {p['speedup']:.1f}x |")


def B_rate(B: int) -> float:
    return B / (LAUNCH_MS * 1e-3 + B / PEAK_ROWS_PER_S)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--rows", type=int, default=200_000)
    t.add_argument("--batch-size", type=int, default=4096)
    t.add_argument("--steps", type=int, default=8)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--modes", default="data,peers,both")
    t.add_argument("--exchange-every", type=int, default=4)
    t.add_argument("--json")
    b = sub.add_parser("bytes")
    b.add_argument("--rows", type=int, default=200_000)
    b.add_argument("--worlds", default="2,4,8")
    b.add_argument("--batch-sizes", default="4096,16384")
    b.add_argument("--steps", type=int, default=2)
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--json")
    i = sub.add_parser("ids")
    i.add_argument("file", help="a real log (e.g. ../shared/datasets_raw/criteo_kaggle_head10k/train_head10000.txt)")
    i.add_argument("--rows-per-batch", default="256,512,1024,2048,4096,8192")
    i.add_argument("--samples", type=int, default=20)
    i.add_argument("--json")
    w = sub.add_parser("worker", help="(internal) one rank of a timed run, under torchrun")
    w.add_argument("--spec", required=True)
    w.add_argument("--out", required=True)
    p = sub.add_parser("project")
    p.add_argument("--bytes", required=True, help="the JSON written by `bytes`")
    p.add_argument("--ids", required=True, help="the JSON written by `ids` on a real log")
    a = ap.parse_args(argv)
    if a.cmd == "worker":
        _worker(json.loads(a.spec), a.out)
        return
    if a.cmd == "project":
        cmd_project(a)
        return
    rows = {"throughput": cmd_throughput, "bytes": cmd_bytes, "ids": cmd_ids}[a.cmd](a)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
