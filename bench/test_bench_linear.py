"""Dense layers on the CPU: oneDNN's matmul (``mlfast.ops.linear``) vs torch's BLAS path (``F.linear``).

Timed round-robin in one process (``bench_common.time_round_robin``), median with p20 / p80 of wall
time per call and the process CPU time, ratios between medians, at the MLP shapes of the benchmark
workload (B = 4096; 39 fields x dim 16 = 624 inputs; 400-wide hidden layers):

* ``fwd``, ``dx``, ``dw``: one product each, the layer's forward x W^T, its input gradient g W and
  its weight gradient g^T x: ``reference`` as autograd computes them for ``F.linear`` (torch.mm /
  addmm), ``fast`` as ``mlfast.ops.linear`` does (oneDNN, the transposed operands passed as views).
* ``layer``: forward + backward of one layer under autograd, ``F.linear`` against ``Linear``.

The whole training step is A/B'd by ``python bench/step_ab.py linear``.
``python bench/test_bench_linear.py`` prints the table; under pytest these are pytest-benchmark cases.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from bench_common import machine, print_rows, round_robin_rows  # noqa: E402

from mlfast.ops import linear as lin  # noqa: E402

B = 4096
SHAPES = ((624, 400), (400, 400))  # (in, out): the first hidden layer, the others
WHATS = ("fwd", "dx", "dw", "layer")
METHODS = ("reference", "fast")


def case(what: str, method: str, n_in: int, n_out: int, seed: int = 0) -> Callable[[], object]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n_in, generator=g)
    w = torch.randn(n_out, n_in, generator=g) / n_in**0.5
    grad = torch.randn(B, n_out, generator=g)
    fast = method == "fast"
    if what == "fwd":
        return (lambda: lin._mm(x, w)) if fast else (lambda: F.linear(x, w))
    if what == "dx":
        return (lambda: lin._mm(grad, w.t())) if fast else (lambda: grad @ w)
    if what == "dw":
        return (lambda: lin._mm(grad.t(), x.t())) if fast else (lambda: grad.t() @ x)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

    def layer():
        xg.grad = wg.grad = None
        lin.linear(xg, wg, impl=method).backward(grad)
    return layer


def table(rounds: int, whats: tuple[str, ...] = WHATS) -> list[dict]:
    return [row for n_in, n_out in SHAPES for what in whats
            for row in round_robin_rows({m: case(what, m, n_in, n_out) for m in METHODS}, rounds, "reference",
                                        shape=f"[{B}, {n_in}] -> {n_out}", what=what)]


@pytest.mark.skipif(not lin.onednn_available(), reason="this torch has no oneDNN matmul op")
@pytest.mark.parametrize("what", WHATS)
@pytest.mark.parametrize("method", METHODS)
def test_bench_linear(benchmark, what, method):
    n_in, n_out = SHAPES[1]
    benchmark.extra_info.update(machine=machine(), what=what, method=method, B=B, n_in=n_in, n_out=n_out)
    benchmark.pedantic(case(what, method, n_in, n_out), rounds=20, iterations=1, warmup_rounds=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--what", default=",".join(WHATS))
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    print(machine(), f"| torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"ms per call, wall median [p20, p80] and process CPU median over {args.rounds} round-robin rounds; "
          f"ratio = median / reference's")
    rows = table(args.rounds, tuple(args.what.split(",")))
    print_rows(rows, [("shape", 20), ("what", 6), ("method", 10)])
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
