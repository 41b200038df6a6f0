"""`mlfast train` on several processes, end to end through torchrun (gloo on the CPU):

* a job killed in the middle (one rank SIGKILLs itself; torchrun ``--max-restarts 1`` restarts
  every rank, which resume from the last complete sharded checkpoint) ends exactly like the
  uninterrupted job: same metrics, same model.pt;
* that run's metrics are the single process's (``--parallel data`` is the same training);
* one process reads the multi-process run: ``mlfast eval`` / ``predict``, and ``load_run`` of the
  sharded best weights alone (a run stopped before model.pt) gives model.pt's predictions;
* resuming with another number of processes is refused with a clear error;
* a rank that dies, or stalls, makes the others exit with an error naming the failed collective,
  within the timeout (no torchrun here: nothing else would stop them).

Every subprocess has a timeout: a hang fails the test instead of blocking CI.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import dist_helpers as H
from mlfast.train import checkpoint as ckpt

ARGS = ["--peers", "deepfm:mlp=32,dcn:mlp=32", "--hash-buckets", "500", "--batch-size", "256", "--epochs", "2",
        "--eval-every", "7", "--checkpoint-every", "3", "--no-cache", "--quiet", "--threads", "1"]
VOLATILE = {"timing", "train_seconds", "samples_per_second", "checkpoint_seconds", "read_seconds", "graph",
            "validate_seconds", "distributed", "fit_total"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from mlfast.io.synth import synth_criteo

    path = tmp_path_factory.mktemp("dist_data") / "train.tsv"
    synth_criteo(str(path), rows=4000, seed=3)
    return path


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                                             "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NUMBA_NUM_THREADS",
                                                             "TORCHELASTIC_RESTART_COUNT")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def torchrun(nproc: int, args: list[str], *, restarts: int = 0, env: dict | None = None,
             timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={restarts}", "-m", "mlfast", "train", *args]
    return subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _outcome(run: Path) -> tuple[dict, dict]:
    return _strip(json.loads((run / "metrics.json").read_text())), ckpt.load_checkpoint(run / "model.pt")["state"]


def test_a_killed_job_resumes_to_the_uninterrupted_result(data, tmp_path):
    whole, killed, single = tmp_path / "whole", tmp_path / "killed", tmp_path / "single"
    r = torchrun(2, [str(data), "--out", str(whole), *ARGS])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 2 processes (--parallel data)" in r.stdout
    r = torchrun(2, [str(data), "--out", str(killed), *ARGS], restarts=1, env=_env(MLFAST_DIST_FAULT="1:8"))
    assert r.returncode == 0, r.stderr[-3000:]
    # rank 1 killed itself; rank 0 said so and stopped; torchrun restarted both. Which of the two failures
    # torchrun logs as the first (rank 1's -9 or rank 0's 1) is a race between their exit times: not checked
    assert "RankFailure" in r.stderr, r.stderr[-3000:]
    assert re.search(r"failed \(exitcode: (-9|1)\) local_rank: [01]", r.stderr), r.stderr[-3000:]
    assert r.stderr.count("data: {") == 2, r.stderr[-3000:]  # each attempt's rank 0 reads the data once
    (m_whole, s_whole), (m_killed, s_killed) = _outcome(whole), _outcome(killed)
    assert m_whole == m_killed
    assert torch.equal(s_whole["tables"]["rows"], s_killed["tables"]["rows"])
    assert torch.equal(s_whole["tables"]["weight"], s_killed["tables"]["weight"])
    for a, b in zip(s_whole["peers"], s_killed["peers"]):
        assert all(torch.equal(a[k], b[k]) for k in a)

    # --parallel data trains what one process trains (fp32: the sums add in another order)
    r = subprocess.run([sys.executable, "-m", "mlfast", "train", str(data), "--out", str(single), *ARGS],
                       env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    m_single = _outcome(single)[0]
    for split in ("valid", "test"):
        for name, m in m_single[split].items():
            assert m_whole[split][name]["auc"] == pytest.approx(m["auc"], abs=2e-4), (split, name)
            assert m_whole[split][name]["logloss"] == pytest.approx(m["logloss"], abs=2e-4), (split, name)

    # one process reads the multi-process run
    from mlfast.api import load_run
    from mlfast.cli import main

    assert main(["predict", str(whole), str(data), "--out", str(tmp_path / "p.csv"), "--device", "cpu"]) == 0
    assert main(["eval", str(whole), str(data), "--device", "cpu"]) == 0
    stopped = tmp_path / "stopped"  # as if the job had died before writing model.pt
    shutil.copytree(whole, stopped)
    (stopped / "model.pt").unlink()
    p_model = load_run(whole, device="cpu").predict_proba(str(data))
    p_shards = load_run(stopped, device="cpu").predict_proba(str(data))
    np.testing.assert_array_equal(p_model, p_shards)  # model.pt holds the best weights: the same ones

    # a different number of processes cannot continue the sharded state
    r = torchrun(1, ["--out", str(whole), "--resume", "--epochs", "3", "--quiet"])
    assert r.returncode == 1
    assert "checkpointed by 2 processes" in r.stderr


def _two_ranks(data: Path, out: Path, **env: str) -> list[subprocess.Popen]:
    port = str(H.free_port())
    procs = []
    for rank in range(2):
        e = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
                 LOCAL_WORLD_SIZE="2", **env)
        procs.append(subprocess.Popen([sys.executable, "-m", "mlfast", "train", str(data), "--out", str(out),
                                       *ARGS, "--batch-size", "64", "--epochs", "3"], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _finish(p: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    t0 = time.monotonic()
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError(f"a surviving rank still ran {timeout} s after its peer failed")
    return p.returncode, err, time.monotonic() - t0


def test_a_dead_rank_makes_the_others_exit_with_an_error(data, tmp_path):
    rank0, rank1 = _two_ranks(data, tmp_path / "run", MLFAST_DIST_FAULT="1:5")
    code1, _, _ = _finish(rank1, 120)
    assert code1 == -signal.SIGKILL
    code0, err0, waited = _finish(rank0, 60)
    assert code0 == 1 and waited < 60
    assert "rank 0/2" in err0 and "failed" in err0 and "Another rank probably died" in err0


def test_a_stalled_rank_makes_the_others_exit_after_the_timeout(data, tmp_path):
    rank0, rank1 = _two_ranks(data, tmp_path / "run", MLFAST_DIST_TIMEOUT="5", MLFAST_DIST_FAULT="1:5:stop")
    try:
        code0, err0, waited = _finish(rank0, 120)
        assert code0 == 1, err0[-2000:]
        assert "rank 0/2" in err0 and "Timed out" in err0
    finally:
        rank1.kill()
        rank1.communicate(timeout=30)
