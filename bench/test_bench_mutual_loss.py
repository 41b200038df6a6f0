"""Fused mutual loss (one Triton launch for loss + gradient) vs the eager reference, on CUDA.

Timed: forward + backward, ``torch.autograd.grad(loss, logits)``, for B in {4096, 16384} and P in
{2, 4}. Each row gives median, p20 and p80 in microseconds, from ``triton.testing.do_bench``
(eager launches, L2 flushed between calls) and, for the fused op, ``do_bench_cudagraph`` (the
trainer replays its step as a CUDA graph, so launch overhead is gone there). The bar for the fused
op is B = 4096, P = 2 at <= 20 us; the eager reference measured 1.41 ms on an H200.

A GPU script prints the table with ``python bench/test_bench_mutual_loss.py`` (``--sweep`` times
launch configurations for tuning the heuristics; ``--device cpu``
under ``TRITON_INTERPRET=1`` only checks that the code runs: interpreter timings mean nothing).
Under pytest (``pytest bench/test_bench_mutual_loss.py --benchmark-enable``) the cases skip
without CUDA.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

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


def time_us(step: Callable[[], torch.Tensor], device: str, graph: bool = False) -> tuple[float, ...]:
    """(median, p20, p80) microseconds per call."""
    if device == "cuda":
        bench = triton.testing.do_bench_cudagraph if graph else triton.testing.do_bench
        return tuple(1e3 * t for t in bench(step, quantiles=list(QUANTILES)))
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    return tuple(1e6 * float(np.quantile(ts, q)) for q in QUANTILES)


def config() -> dict:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (Triton interpreter)"
    return {"gpu": dev, "torch": torch.__version__, "triton": triton.__version__}


def table(device: str = "cuda", kinds: tuple[str, ...] = ("kl",)) -> list[dict]:
    """One row per (kind, B, P, impl, mode): the numbers the module docstring describes."""
    rows = []
    for kind in kinds:
        for B, P in SHAPES:
            z, y, alpha = make_inputs(B, P, device)
            for impl in IMPLS:
                modes = ("eager", "cudagraph") if impl == "fused" and device == "cuda" else ("eager",)
                for mode in modes:
                    step = make_step(impl, z, y, alpha, kind)
                    step()  # compile / warm up outside the timing
                    med, p20, p80 = time_us(step, device, graph=mode == "cudagraph")
                    rows.append({**config(), "kind": kind, "B": B, "P": P, "impl": impl, "mode": mode,
                                 "median_us": med, "p20_us": p20, "p80_us": p80})
    return rows


def sweep(device: str = "cuda", kind: str = "kl") -> list[dict]:
    """Launch configurations of the fused op (rows per block step, programs), for tuning the
    heuristics in ``mlfast.kernels.mutual_loss._launch_config``: forward + backward, eager."""
    rows = []
    for B, P in SHAPES + ((65536, 2), (262144, 2)):
        z, y, alpha = make_inputs(B, P, device)
        for block_b in (256, 512, 1024, 2048, 4096):
            for programs in (1, 4, 16, 64, 256):
                if programs > max(1, B // block_b):
                    continue

                def step():
                    loss = MutualLossFunction.apply(z, y, alpha, kind, block_b, programs)
                    return torch.autograd.grad(loss, z)[0]
                step()
                med, p20, p80 = time_us(step, device)
                rows.append({"B": B, "P": P, "block_b": block_b, "programs": programs,
                             "median_us": med, "p20_us": p20, "p80_us": p80})
                print(f"B={B:>6} P={P} block_b={block_b:>4} programs={programs:>3}: "
                      f"{med:8.1f} us [{p20:.1f}, {p80:.1f}]", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"device: {rows[0]['gpu']}  torch {rows[0]['torch']}  triton {rows[0]['triton']}")
    print(f"{'kind':>6} {'B':>6} {'P':>2} {'impl':>10} {'mode':>10} {'median us':>10} {'p20':>9} "
          f"{'p80':>9} {'vs ref':>7}")
    ref = {(r["kind"], r["B"], r["P"]): r["median_us"] for r in rows if r["impl"] == "reference"}
    for r in rows:
        speedup = ref[(r["kind"], r["B"], r["P"])] / r["median_us"]
        print(f"{r['kind']:>6} {r['B']:>6} {r['P']:>2} {r['impl']:>10} {r['mode']:>10} "
              f"{r['median_us']:10.1f} {r['p20_us']:9.1f} {r['p80_us']:9.1f} {speedup:6.1f}x")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("B, P", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_mutual_loss(benchmark, impl, B, P):
    z, y, alpha = make_inputs(B, P)
    step = make_step(impl, z, y, alpha)
    step()
    med, p20, p80 = time_us(step, "cuda")
    benchmark.extra_info.update(config(), impl=impl, B=B, P=P, kind="kl", do_bench_median_us=med,
                                do_bench_p20_us=p20, do_bench_p80_us=p80)

    def synced():
        step()
        torch.cuda.synchronize()
    benchmark.pedantic(synced, rounds=200, iterations=1, warmup_rounds=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kinds", default="kl", help="comma-separated: kl,symkl,mse")
    parser.add_argument("--sweep", action="store_true", help="time launch configurations instead")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    print(config())
    if args.sweep:
        rows = sweep(args.device)
    else:
        rows = table(args.device, tuple(args.kinds.split(",")))
        print_table(rows)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
