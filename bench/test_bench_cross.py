"""DCN's cross network on the CPU: the closed form (``mlfast.ops.cross``) vs the layer-by-layer reference.

Timed round-robin in one process (``bench_common.time_round_robin``), median with p20 / p80 of wall
time per call and the process CPU time, ratios between medians:

* ``op``: forward + backward of the 3-layer cross network on x_0 [4096, 624] (DCN on 39 fields of
  dim 16, the benchmark workload): ``reference`` (layer by layer) and ``fast`` (closed form), both
  torch ops under autograd.
* ``step``: one training step of ``mlfast bench``'s DeepFM + DCN mutual workload (1.8 M rows per
  table, B = 4096, the fused engine) with ``MLFAST_CROSS=reference`` and ``fast``: what the op is
  worth in the whole step.

``python bench/test_bench_cross.py`` prints the table; under pytest these are pytest-benchmark cases.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_common import machine, print_rows, round_robin_rows  # noqa: E402
from step_ab import SWITCHES, engine_step  # noqa: E402

from mlfast.ops import cross  # noqa: E402

B, D, L = 4096, 39 * 16, 3
METHODS = ("reference", "fast")


def op_step(method: str, seed: int = 0) -> Callable[[], object]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, D, generator=g).requires_grad_()
    w = (torch.randn(L, D, generator=g) / D**0.5).requires_grad_()
    b = torch.zeros(L, D).requires_grad_()
    grad = torch.randn(B, D, generator=g)

    def step():
        x0.grad = w.grad = b.grad = None
        cross.cross_network(x0, w, b, impl=method).backward(grad)
    return step


def step_step(method: str, seed: int = 0) -> Callable[[], object]:
    """A training step of the benchmark's mutual workload with the cross network's ``method``
    (one engine shared by both methods: the same tables and batches; see bench/step_ab.py)."""
    run = engine_step(seed)

    def step():
        with SWITCHES["cross"][method]():
            run()
    return step


def table(rounds: int, whats: tuple[str, ...] = ("op", "step")) -> list[dict]:
    return [row for what in whats
            for row in round_robin_rows({m: (op_step if what == "op" else step_step)(m) for m in METHODS}, rounds,
                                        "reference", what=what)]


@pytest.mark.parametrize("method", METHODS)
def test_bench_cross_op(benchmark, method):
    benchmark.extra_info.update(machine=machine(), what="op", method=method, B=B, D=D, layers=L)
    benchmark.pedantic(op_step(method), rounds=30, iterations=1, warmup_rounds=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--what", default="op,step")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    print(machine(), f"| torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"ms per call, wall median [p20, p80] and process CPU median over {args.rounds} round-robin rounds; "
          f"ratio = median / reference's")
    rows = table(args.rounds, tuple(args.what.split(",")))
    print_rows(rows, [("what", 5), ("method", 10)])
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
