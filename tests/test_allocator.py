"""The training process's heap settings (mlfast.ops.allocator), each case in a fresh interpreter: they
are process-wide and set once."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="the settings apply to glibc's allocator only")

# Three 24 MiB buffers allocated, written and freed per round, as a step's activations are: with the
# settings applied the rounds after the first reuse the same heap memory, so they fault nothing in.
_PROBE = """
import json, resource, sys
import numpy as np
from mlfast.ops import allocator
first = allocator.tune_malloc()
again = allocator.tune_malloc()
faults = []
for _ in range(6):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    bufs = [np.ones(6 << 20, np.float32) for _ in range(3)]
    del bufs
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"first": first, "again": again, "faults": faults}))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "MLFAST_MALLOC", "GLIBC_TUNABLES"))}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_settings_apply_once_and_freed_buffers_are_reused():
    r = _probe()
    from mlfast.ops.allocator import TOP_PAD, TRIM_THRESHOLD

    assert r["first"] == r["again"]
    assert r["first"]["trim_threshold"] == TRIM_THRESHOLD and r["first"]["top_pad"] == TOP_PAD
    assert r["first"]["mmap_threshold"] >= 32 << 20
    # the first round grows the heap (18,432 pages of 4 KiB, fewer in huge pages); later rounds reuse it
    assert r["faults"][0] > 0 and r["faults"][2:] == [0] * 4, r["faults"]


@glibc
@pytest.mark.parametrize("env", [{"MLFAST_MALLOC": "system"}, {"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}])
def test_the_users_own_settings_are_left_alone(env):
    r = _probe(**env)
    assert r["first"] is None and r["again"] is None
