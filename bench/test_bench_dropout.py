"""Dropout on the CPU: the fused numba ReLU + dropout vs ``F.dropout``, alone and inside the MLP.

Timed, at p = 0.2, in float32 and in bfloat16 (the op on bf16 tensors; the MLP under
``torch.autocast("cpu", dtype=torch.bfloat16)``):

* ``mask``: one hidden activation x [4096, 400] through
  - ``F.dropout``           ``F.dropout(x, p)``: torch's mask + scaling (no ReLU)
  - ``rand+compare``        ``torch.rand_like(x) >= p``: the mask alone, as a bool tensor
  - ``relu+F.dropout``      ``F.dropout(torch.relu(x), p)``: the reference path's forward
  - ``fast``                ``relu_dropout_forward``: ReLU, Philox mask and scaling in one pass
* ``op``: forward + backward of ReLU + dropout on that x (``reference`` = the two torch ops under
  autograd, ``fast`` = ``ReLUDropoutFunction``).
* ``mlp``: forward + backward of DeepFM's MLP, input 39 * 16 = 624, hidden 400-400-400 with
  BatchNorm, output 1, B = 4096, with dropout ``reference`` (F.dropout), ``fast``, or ``none``
  (dropout = 0: the bound dropout can at best reach).

Methods are timed round-robin (one call of each per round) in one process, so load from other jobs
on a shared machine spreads over all of them; each row is the median with p20 / p80 of wall time
per call after warm-up (and the process CPU time), and ratios are taken between medians. Run ``python
bench/test_bench_dropout.py`` for the table; under pytest these are pytest-benchmark cases
(``pytest bench/test_bench_dropout.py --benchmark-enable``).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import numba
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from bench_common import machine, print_rows, round_robin_rows  # noqa: E402

from mlfast.models.blocks import MLP  # noqa: E402
from mlfast.ops import dropout as D  # noqa: E402
from mlfast.ops.cpu_features import bf16_supported, cpu_features  # noqa: E402

P = 0.2
B, IN, HIDDEN = 4096, 39 * 16, (400, 400, 400)
PRECISIONS = ("fp32", "bf16")
MASK_METHODS = ("F.dropout", "rand+compare", "relu+F.dropout", "fast")
OP_METHODS = ("reference", "fast")
MLP_METHODS = ("reference", "fast", "none")


def _dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def mask_step(method: str, precision: str, seed: int = 0) -> Callable[[], object]:
    """One forward of ``method`` on a fresh [B, 400] activation of ``precision``."""
    x = torch.randn(B, HIDDEN[0], generator=torch.Generator().manual_seed(seed)).to(_dtype(precision))
    counter = iter(range(1 << 62))
    steps = {
        "F.dropout": lambda: F.dropout(x, P, training=True),
        "rand+compare": lambda: torch.rand_like(x) >= P,
        "relu+F.dropout": lambda: F.dropout(torch.relu(x), P, training=True),
        "fast": lambda: D.relu_dropout_forward(x, P, 1234, next(counter)),
    }
    return steps[method]


def op_step(method: str, precision: str, seed: int = 0) -> Callable[[], object]:
    """One forward + backward of ReLU + dropout (``reference`` or ``fast``) on [B, 400]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, HIDDEN[0], generator=g).to(_dtype(precision)).requires_grad_(True)
    grad = torch.randn(B, HIDDEN[0], generator=g).to(_dtype(precision))
    module = D.ReLUDropout(P, seed=1234, impl=method)

    def step():
        x.grad = None
        module(x).backward(grad)
    return step


def mlp_step(method: str, precision: str, seed: int = 0) -> Callable[[], object]:
    """One training forward + backward of the MLP with dropout ``method`` (``none``: p = 0)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mlp = MLP(IN, HIDDEN, output_dim=1, dropout=0.0 if method == "none" else P).train()
    if mlp.dropout is not None:
        mlp.dropout.impl = method
    x = torch.randn(B, IN, generator=g)
    grad = torch.randn(B, 1, generator=g)
    bf16 = precision == "bf16"

    def step():
        for p in mlp.parameters():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = mlp(x)
        out.backward(grad.to(out.dtype))
    return step


def config() -> dict:
    f = cpu_features()
    return {"machine": machine(), "avx512_bf16": f["avx512_bf16"], "amx_bf16": f["amx_bf16"],
            "bf16_supported": bf16_supported(), "torch_threads": torch.get_num_threads(),
            "numba_threads": numba.get_num_threads(), "torch": torch.__version__, "numba": numba.__version__}


def table(rounds: int = 30, precisions: tuple[str, ...] = PRECISIONS) -> list[dict]:
    groups = (("mask", MASK_METHODS, mask_step, "relu+F.dropout"), ("op", OP_METHODS, op_step, "reference"),
              ("mlp", MLP_METHODS, mlp_step, "reference"))
    return [row for precision in precisions for what, methods, make, base in groups
            for row in round_robin_rows({m: make(m, precision) for m in methods}, rounds, base, what=what,
                                        precision=precision)]



@pytest.fixture(scope="module", autouse=True)
def _compiled():
    D.warmup()  # JIT (or cache load) stays out of the timings


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", MASK_METHODS)
def test_bench_mask(benchmark, method, precision):
    benchmark.extra_info.update(config(), what="mask", method=method, precision=precision, B=B, p=P)
    benchmark.pedantic(mask_step(method, precision), rounds=30, iterations=1, warmup_rounds=3)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", MLP_METHODS)
def test_bench_mlp(benchmark, method, precision):
    benchmark.extra_info.update(config(), what="mlp", method=method, precision=precision, B=B,
                                input=IN, hidden=HIDDEN, p=P)
    benchmark.pedantic(mlp_step(method, precision), rounds=10, iterations=1, warmup_rounds=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (the fused op follows it)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    D.warmup()
    print(config())
    print(f"B={B} input={IN} hidden={HIDDEN} p={P}: ms per call, wall median [p20, p80] and process CPU "
          f"median over {args.rounds} round-robin rounds; ratio = median / the baseline's median "
          f"(mask: relu+F.dropout, op and mlp: reference)")
    rows = table(args.rounds, tuple(args.precisions.split(",")))
    print_rows(rows, [("what", 5), ("precision", 9), ("method", 15)])
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"config": config(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
