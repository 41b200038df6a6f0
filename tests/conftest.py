"""Shared test fixtures: per-dtype tolerances (kept in this one place), seeded generators, devices.

Random inputs are fresh each run but reproducible: one base seed is drawn per session (or read from
``MLFAST_TEST_SEED``) and printed in the pytest header; each test derives its own seed from it and
its node id, so a failure replays with ``MLFAST_TEST_SEED=<seed> pytest <node id>``.

Import the constants from test modules with ``from conftest import TOLERANCES, DEVICES, assert_close``.
"""
from __future__ import annotations

import os
import random
import zlib

import numpy as np
import pytest
import torch

# Without CUDA, Triton kernels run on CPU tensors through Triton's interpreter, which must be chosen
# before the first `import triton` anywhere in the process (triton.language's own helpers are
# decorated at import). conftest runs before any test module is imported, so this is the one
# reliable place. With CUDA the compiled kernels are tested; export TRITON_INTERPRET=1 (and hide the
# GPU) to test the interpreter path there too.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# (rtol, atol) for comparing a fast path against its reference, by the dtype the fast path ran in.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}

# Devices every parametrized test runs on: the CPU always, CUDA when present.
DEVICES: tuple[str, ...] = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
# Whether Triton kernels can run on CPU tensors in this process (the interpreter was chosen).
TRITON_CPU: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

BASE_SEED: int = int(os.environ.get("MLFAST_TEST_SEED", random.SystemRandom().randrange(2**31)))


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``dict(rtol=..., atol=...)`` for ``dtype``, ready for ``torch.testing.assert_close``."""
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 msg: str = "") -> None:
    """Compare in float64 on the CPU with the tolerance of ``dtype`` (default: ``actual``'s dtype).

    Both sides are upcast so a bf16 result can be checked against a float64 reference directly.
    """
    dtype = dtype or actual.dtype
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(),
                               **tolerance(dtype), msg=(lambda m: f"{msg}: {m}") if msg else None)


def pytest_report_header(config) -> str:
    return f"mlfast test seed: {BASE_SEED} (set MLFAST_TEST_SEED={BASE_SEED} to replay)"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    # The header is hidden under -q: say it again where every run shows it, next to the result.
    terminalreporter.write_line(f"mlfast test seed: {BASE_SEED} (replay: MLFAST_TEST_SEED={BASE_SEED} pytest <test>)")


@pytest.fixture
def seed(request) -> int:
    """This test's seed: the session's base seed mixed with the test's node id."""
    return (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31


@pytest.fixture
def gen(seed) -> torch.Generator:
    """A seeded CPU ``torch.Generator`` (draw on the CPU, then move: same values on every device)."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def np_rng(seed) -> np.random.Generator:
    """A seeded numpy ``Generator``."""
    return np.random.default_rng(seed)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Parametrizes a test over ``DEVICES``."""
    return torch.device(request.param)


@pytest.fixture(params=["cpu", "cuda"])
def kernel_device(request) -> torch.device:
    """Parametrizes a Triton-kernel test over the CPU (under the interpreter) and CUDA, skipping
    whichever this process cannot run."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if request.param == "cpu" and not TRITON_CPU:
        pytest.skip("Triton's interpreter is off in this process (CUDA present): rerun with "
                    "TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES= to test the CPU path")
    return torch.device(request.param)
