"""Fused mutual loss (one Triton launch for loss + gradient) vs the eager reference, on CUDA.

Timed: forward + backward, ``torch.autograd.grad(loss, logits)``, for B in {4096, 16384} and P in
{2, 4}. Both implementations are timed with the same method (``bench_common.time_ms``): CUDA events
around each repetition, the L2 flushed before each repetition for both, and each of them eager AND
as a CUDA graph replay (the trainer replays its step as a graph, so launch overhead is gone there);
the ``vs ref`` column compares rows of the same mode only. Each row gives median, p20 and p80 in
microseconds. The bar for the fused op is B = 4096, P = 2 at <= 20 us; the eager reference measured
1.41 ms on an H200.

A GPU script prints the table with ``python bench/test_bench_mutual_loss.py`` (``--sweep`` times
launch configurations for tuning the heuristics; ``--json`` rewrites the file after every case, so a
run cut short keeps what it measured; ``--device cpu`` runs under ``TRITON_INTERPRET=1`` and only
checks that the code runs: interpreter timings mean nothing). Under pytest
(``pytest bench/test_bench_mutual_loss.py --benchmark-enable``) the cases skip without CUDA.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import pytest
import torch

if "--device=cpu" in sys.argv or any(a == "--device" and b == "cpu" for a, b in zip(sys.argv, sys.argv[1:])) \
        or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

triton = pytest.importorskip("triton")

from bench_common import ResultsFile, time_ms  # noqa: E402
from mlfast.kernels.mutual_loss import MutualLossFunction  # noqa: E402
from mlfast.ops.mutual_loss import mutual_loss  # noqa: E402

SHAPES = ((4096, 2), (4096, 4), (16384, 2), (16384, 4))
IMPLS = ("fused", "reference")
QUANTILES = (0.5, 0.2, 0.8)


def make_inputs(B: int, P: int, device: str = "cuda", seed: int = 0):
    """Logits [B, P] (requires grad), labels [B] and a 1-element alpha tensor, all on ``device``."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, P, generator=g) * 2).to(device).requires_grad_(True)
    y = torch.randint(0, 2, (B,), generator=g).float().to(device)
    return z, y, torch.tensor([0.5], device=device)


def make_step(impl: str, z, y, alpha, kind: str = "kl") -> Callable[[], torch.Tensor]:
    """One forward + backward of ``impl``, returning dL/dz."""
    if impl == "fused":
        return lambda: torch.autograd.grad(MutualLossFunction.apply(z, y, alpha, kind), z)[0]
    if impl == "reference":
        return lambda: torch.autograd.grad(mutual_loss(z, y, alpha, kind), z)[0]
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")


def time_us(step: Callable[[], torch.Tensor], device: str, graph: bool = False, reps: int = 100) -> tuple[float, ...]:
    """(median, p20, p80) microseconds per call, L2 flushed before each call on CUDA."""
    return tuple(1e3 * t for t in time_ms(step, device, graph=graph, flush=device == "cuda", reps=reps,
                                          warmup=min(reps, 10)))


def config() -> dict:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (Triton interpreter)"
    return {"gpu": dev, "torch": torch.__version__, "triton": triton.__version__}


def table(device: str = "cuda", kinds: tuple[str, ...] = ("kl",), results: ResultsFile | None = None,
          shapes=SHAPES, reps: int = 100) -> list[dict]:
    """One row per (kind, B, P, impl, mode): the numbers the module docstring describes."""
    results = results or ResultsFile(None)
    modes = ("eager", "cudagraph") if device == "cuda" else ("eager",)
    for kind in kinds:
        for B, P in shapes:
            z, y, alpha = make_inputs(B, P, device)
            for impl in IMPLS:
                for mode in modes:
                    row = {**config(), "kind": kind, "B": B, "P": P, "impl": impl, "mode": mode}
                    try:
                        med, p20, p80 = time_us(make_step(impl, z, y, alpha, kind), device, mode == "cudagraph", reps)
                        row.update(median_us=med, p20_us=p20, p80_us=p80)
                    except Exception as e:  # e.g. a capture that fails: record it, go on
                        row["error"] = f"{type(e).__name__}: {e}"[:300]
                    results.add(row)
    return results.rows


def sweep(device: str = "cuda", kind: str = "kl", results: ResultsFile | None = None, reps: int = 100) -> list[dict]:
    """Launch configurations of the fused op (rows per block step, programs), for tuning the
    heuristics in ``mlfast.kernels.mutual_loss._launch_config``: forward + backward, eager."""
    results = results or ResultsFile(None)
    shapes = SHAPES + ((65536, 2), (262144, 2)) if device == "cuda" else ((64, 2),)
    for B, P in shapes:
        z, y, alpha = make_inputs(B, P, device)
        for block_b in (256, 512, 1024, 2048, 4096):
            for programs in (1, 4, 16, 64, 256):
                if programs > max(1, B // block_b):
                    continue

                def step():
                    loss = MutualLossFunction.apply(z, y, alpha, kind, block_b, programs)
                    return torch.autograd.grad(loss, z)[0]
                med, p20, p80 = time_us(step, device, reps=reps)
                results.add({**config(), "B": B, "P": P, "block_b": block_b, "programs": programs,
                             "median_us": med, "p20_us": p20, "p80_us": p80})
                print(f"B={B:>6} P={P} block_b={block_b:>4} programs={programs:>3}: "
                      f"{med:8.1f} us [{p20:.1f}, {p80:.1f}]", flush=True)
    return results.rows


def print_table(rows: list[dict]) -> None:
    print(f"device: {rows[0]['gpu']}  torch {rows[0]['torch']}  triton {rows[0]['triton']}")
    print(f"{'kind':>6} {'B':>6} {'P':>2} {'impl':>10} {'mode':>10} {'median us':>10} {'p20':>9} "
          f"{'p80':>9} {'vs ref':>7}")
    ref = {(r["kind"], r["B"], r["P"], r["mode"]): r.get("median_us") for r in rows if r["impl"] == "reference"}
    for r in rows:
        if "error" in r:
            print(f"{r['kind']:>6} {r['B']:>6} {r['P']:>2} {r['impl']:>10} {r['mode']:>10} error: {r['error'][:60]}")
            continue
        base = ref.get((r["kind"], r["B"], r["P"], r["mode"]))  # the same mode only
        speedup = f"{base / r['median_us']:6.1f}x" if base else "      -"
        print(f"{r['kind']:>6} {r['B']:>6} {r['P']:>2} {r['impl']:>10} {r['mode']:>10} "
              f"{r['median_us']:10.1f} {r['p20_us']:9.1f} {r['p80_us']:9.1f} {speedup}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("B, P", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_mutual_loss(benchmark, impl, B, P):
    z, y, alpha = make_inputs(B, P)
    step = make_step(impl, z, y, alpha)
    step()
    med, p20, p80 = time_us(step, "cuda")
    benchmark.extra_info.update(config(), impl=impl, B=B, P=P, kind="kl", flushed_median_us=med,
                                flushed_p20_us=p20, flushed_p80_us=p80)

    def synced():
        step()
        torch.cuda.synchronize()
    benchmark.pedantic(synced, rounds=200, iterations=1, warmup_rounds=10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda, or cpu: tiny sizes under the Triton interpreter (checks the plumbing only)")
    parser.add_argument("--kinds", default="kl", help="comma-separated: kl,symkl,mse")
    parser.add_argument("--sweep", action="store_true", help="time launch configurations instead")
    parser.add_argument("--reps", type=int, default=100, help="timed repetitions per case")
    parser.add_argument("--json", help="write the rows to this file, rewritten after every case")
    args = parser.parse_args(argv)
    print(config())
    results = ResultsFile(args.json)
    reps = args.reps if args.device == "cuda" else min(args.reps, 3)
    if args.sweep:
        sweep(args.device, results=results, reps=reps)
    else:
        shapes = SHAPES if args.device == "cuda" else ((41, 2), (41, 4))
        print_table(table(args.device, tuple(args.kinds.split(",")), results, shapes, reps))


if __name__ == "__main__":
    main()
