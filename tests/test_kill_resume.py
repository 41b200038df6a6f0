"""Crash harness: `mlfast train` killed with SIGKILL at random moments and at chosen fault points
(inside checkpoint writes, between model.pt and finished.json), then `--resume`d: the run must end
with exactly the metrics and weights of an uninterrupted run, in the joint and finetune regimes.

CI runs a few kills; for a long campaign run this file as a script:

    python tests/test_kill_resume.py --kills 200 --seed 1
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mlfast.train import checkpoint as ckpt

TIMING_KEYS = {"train_seconds", "samples_per_second", "checkpoint_seconds", "read_seconds", "graph", "timing",
               "validate_seconds"}
FAULTS = ["write-last.pt:3", "write-best.pt:2", "after_model", "before_finished"]


def train_cmd(data: Path, out: Path, regime: str, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "mlfast", "train", str(data), "--out", str(out), "--peers", "deepfm:mlp=32,dcn:mlp=32",
           "--hash-buckets", "500", "--batch-size", "256", "--eval-every", "7", "--checkpoint-every", "3",
           "--patience", "100", "--quiet", "--no-cache", "--regime", regime]
    cmd += ["--epochs", "1", "--finetune-epochs", "1"] if regime == "finetune" else ["--epochs", "2"]
    return cmd + list(extra)


def run(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def outcome(run_dir: Path) -> tuple[dict, dict]:
    metrics = strip_timing(json.loads((run_dir / "metrics.json").read_text()))
    model = ckpt.load_checkpoint(run_dir / "model.pt")["state"]
    return metrics, model


def assert_same(a: tuple[dict, dict], b: tuple[dict, dict], what: str) -> None:
    assert a[0] == b[0], f"{what}: metrics differ"
    ta, tb = a[1]["tables"], b[1]["tables"]
    assert torch.equal(ta["rows"], tb["rows"]) and torch.equal(ta["weight"], tb["weight"]), f"{what}: tables differ"
    for pa, pb in zip(a[1]["peers"], b[1]["peers"]):
        for k in pa:
            assert torch.equal(pa[k], pb[k]), f"{what}: {k} differs"


def kill_and_resume(data: Path, out: Path, regime: str, env: dict, *, delay: float | None = None,
                    fault: str | None = None) -> str:
    """One crash: killed after ``delay`` seconds or at ``fault``, then resumed to the end."""
    cmd = train_cmd(data, out, regime)
    if fault is not None:
        r = run(cmd, {**env, "MLFAST_FAULT_AT": fault})
        how = f"fault {fault}: rc {r.returncode}"
        assert r.returncode in (-signal.SIGKILL, 0), r.stderr[-2000:]
    else:
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        how = f"SIGKILL after {delay:.2f}s: rc {p.returncode}"
    if (out / "config.json").exists():
        r = run(train_cmd(data, out, regime, "--resume"), env)
    else:  # killed before the run directory existed: start again
        r = run(cmd, env)
    assert r.returncode == 0, f"{how}; resume failed: {r.stderr[-3000:]}"
    assert not list(out.rglob(".*.tmp")), "a stale checkpoint temporary survived the resume"
    return how


@pytest.fixture(scope="module")
def crash_data(tmp_path_factory):
    from mlfast.io.synth import synth_criteo

    d = tmp_path_factory.mktemp("crash")
    synth_criteo(d / "train.tsv", rows=4000, seed=5)
    env = {**os.environ, "MLFAST_CACHE_DIR": str(d / "cache"), "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    refs = {}
    for regime in ("joint", "finetune"):
        r = run(train_cmd(d / "train.tsv", d / f"ref-{regime}", regime), env)
        assert r.returncode == 0, r.stderr[-3000:]
        refs[regime] = outcome(d / f"ref-{regime}")
    return d, env, refs


@pytest.mark.slow
@pytest.mark.parametrize("regime", ["joint", "finetune"])
def test_killed_runs_resume_to_the_uninterrupted_result(crash_data, regime, seed, tmp_path):
    d, env, refs = crash_data
    rng = random.Random(seed)
    cases = [dict(fault=f) for f in (FAULTS if regime == "joint" else FAULTS[2:])]
    cases += [dict(delay=rng.uniform(2.0, 6.0))]  # a random moment (imports take ~2 s)
    for k, case in enumerate(cases):
        out = tmp_path / f"run{k}"
        how = kill_and_resume(d / "train.tsv", out, regime, env, **case)
        assert_same(outcome(out), refs[regime], how)


def main(argv=None) -> int:  # pragma: no cover - the long campaign
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default="/tmp/mlfast-kill-campaign")
    a = ap.parse_args(argv)
    from mlfast.io.synth import synth_criteo

    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    synth_criteo(d / "train.tsv", rows=4000, seed=5)
    env = {**os.environ, "MLFAST_CACHE_DIR": str(d / "cache")}
    rng = random.Random(a.seed)
    refs = {}
    for regime in ("joint", "finetune"):
        r = run(train_cmd(d / "train.tsv", d / f"ref-{regime}", regime, "--overwrite"), env)
        assert r.returncode == 0, r.stderr
        refs[regime] = outcome(d / f"ref-{regime}")
    for k in range(a.kills):
        regime = rng.choice(["joint", "finetune"])
        out = d / f"run{k}"
        case = dict(fault=rng.choice(FAULTS)) if rng.random() < 0.3 else dict(delay=rng.uniform(1.5, 12.0))
        how = kill_and_resume(d / "train.tsv", out, regime, env, **case)
        assert_same(outcome(out), refs[regime], how)
        print(f"{k + 1}/{a.kills} {regime}: {how}: resumed to the identical result", flush=True)
        import shutil

        shutil.rmtree(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
