"""One CPU training step of two peers' embeddings: backward + optimizer update, numba vs torch.

Timed: the embedding backward + optimizer update of one step (the forward lookup is the same
``F.embedding`` gather for every method and is timed apart). At B = 4096, F = 39, peer widths 16
and 17 (one table of W = 33 with segments for numba, one ``nn.Embedding`` per peer for torch, as
FuxiCTR builds them), adam with lr 1e-3:

* ``numba``:        ``mlfast.ops.cpu_sparse.sparse_update`` on the looked-up rows' gradients (one
                    contiguous [N, W_p] tensor per peer, read in place)
* ``torch_dense``:  ``nn.Embedding`` + dense ``torch.optim.Adam`` over the tables (FuxiCTR's way)
* ``torch_sparse``: ``nn.Embedding(sparse=True)`` + ``torch.optim.SparseAdam``

Ids are synthetic and Criteo-shaped: 39 fields whose sizes grow geometrically from ~30 rows to most
of the table, and inside a field ``id = floor(size * u ** skew)`` for uniform u, so ``skew`` 3 gives
a few hot rows per field (about 40 % of the looked-up rows unique at V = 1.8 M) and ``skew`` 1 is
uniform. Run ``python bench/test_bench_cpu_sparse.py`` for the table; under pytest these are
pytest-benchmark cases (``pytest bench/test_bench_cpu_sparse.py --benchmark-enable``).
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from typing import Callable

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlfast.ops.cpu_sparse import sparse_update, warmup
from mlfast.ops.sparse_optim import SparseOptimConfig, SparseOptimState

METHODS = ("numba", "torch_sparse", "torch_dense")
WIDTHS = (16, 17)


@dataclass(frozen=True)
class Workload:
    V: int = 1_800_000
    B: int = 4096
    F: int = 39
    skew: float = 3.0
    kind: str = "adam"
    seed: int = 0

    def ids(self) -> torch.Tensor:
        """[B, F] int64 global row ids (see the module docstring)."""
        sizes = 10 ** np.linspace(1.5, 6, self.F)
        sizes = np.maximum(2, (sizes / sizes.sum() * self.V).astype(np.int64))
        sizes[-1] += self.V - sizes.sum()
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        u = np.random.default_rng(self.seed).random((self.B, self.F))
        local = np.minimum(sizes - 1, (sizes * u**self.skew).astype(np.int64))
        return torch.from_numpy(offsets + local)

    def grads(self) -> torch.Tensor:
        """[B, F, W] float32: what the peers' backward would hand the embedding."""
        g = torch.Generator().manual_seed(self.seed + 1)
        return torch.randn(self.B, self.F, sum(WIDTHS), generator=g) * 1e-3


def make_step(method: str, wl: Workload) -> tuple[Callable[[], None], Callable[[], None]]:
    """(lookup, backward_update) closures for one step of ``method`` on ``wl``; the tables and the
    optimizer state live inside. Call ``lookup`` before each ``backward_update``: torch's backward
    needs the graph its forward built."""
    ids, grads = wl.ids(), wl.grads()
    init = torch.Generator().manual_seed(wl.seed + 2)
    if method == "numba":
        cfg = SparseOptimConfig(wl.kind, lr=1e-3)
        weight = torch.randn(wl.V, sum(WIDTHS), generator=init) * 1e-4
        state = SparseOptimState.create(weight, cfg, WIDTHS)
        # one contiguous gradient per peer, as the lookup's backward receives them and hands them on
        flat_ids = ids.reshape(-1)
        flat_grads = [g.reshape(-1, w).contiguous() for g, w in zip(grads.split(WIDTHS, dim=-1), WIDTHS)]

        def lookup():
            F.embedding(ids, weight)  # what the peers' forward reads (no graph needed)

        def backward_update():
            sparse_update(weight, flat_ids, flat_grads, state, cfg)
        return lookup, backward_update

    sparse = method == "torch_sparse"
    if wl.kind != "adam":
        raise ValueError(f"torch baselines are adam only, got {wl.kind!r}")
    tables = [torch.nn.Embedding(wl.V, w, sparse=sparse) for w in WIDTHS]
    for t in tables:
        torch.nn.init.normal_(t.weight, std=1e-4, generator=init)
    params = [t.weight for t in tables]
    opt = torch.optim.SparseAdam(params, lr=1e-3) if sparse else torch.optim.Adam(params, lr=1e-3)
    peer_grads = grads.split(WIDTHS, dim=-1)
    outs: list[torch.Tensor] = []

    def lookup():
        outs[:] = [t(ids) for t in tables]

    def backward_update():
        torch.autograd.backward(outs, peer_grads)
        opt.step()
        opt.zero_grad()
    return lookup, backward_update


def time_step(lookup: Callable[[], None], backward_update: Callable[[], None], rounds: int,
              warmup_rounds: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seconds per step, ``rounds`` steps after ``warmup_rounds``: (lookup wall, backward + update
    wall, backward + update CPU time of the process, all threads: less skewed than wall time when
    other jobs share the cores)."""
    for _ in range(warmup_rounds):
        lookup()
        backward_update()
    t_lookup, t_update, cpu_update = np.empty(rounds), np.empty(rounds), np.empty(rounds)
    for i in range(rounds):
        t0 = time.perf_counter()
        lookup()
        t1, c1 = time.perf_counter(), time.process_time()
        backward_update()
        t_update[i], t_lookup[i] = time.perf_counter() - t1, t1 - t0
        cpu_update[i] = time.process_time() - c1
    return t_lookup, t_update, cpu_update


def _machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "numba_threads": numba.get_num_threads(),
            "torch": torch.__version__, "numba": numba.__version__}


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    warmup()  # JIT (or cache load) stays out of the timings


@pytest.mark.parametrize("V", [1_800_000, 200_000])
@pytest.mark.parametrize("method", METHODS)
def test_bench_backward_update(benchmark, method, V):
    """Embedding backward + optimizer update (the lookup runs untimed in setup)."""
    wl = Workload(V=V)
    lookup, backward_update = make_step(method, wl)
    lookup()
    backward_update()
    benchmark.extra_info.update(_machine(), method=method, V=V, B=wl.B, F=wl.F, widths=WIDTHS,
                                kind=wl.kind, skew=wl.skew)
    benchmark.pedantic(backward_update, setup=lookup, rounds=5 if method == "torch_dense" else 20,
                       iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_bench_numba_kinds(benchmark, kind):
    wl = Workload(kind=kind)
    _, backward_update = make_step("numba", wl)
    benchmark.extra_info.update(_machine(), method="numba", V=wl.V, kind=kind, skew=wl.skew)
    benchmark.pedantic(backward_update, rounds=20, iterations=1, warmup_rounds=2)


def _row(V, skew, kind, unique, method, t, base, cpu=None):
    med = float(np.median(t))
    ratio = f"{med / base:6.1f}" if base else ""
    cpu = f"{np.median(cpu):8.2f}" if cpu is not None else ""
    return (f"{V:>9} {skew:>4} {kind:>7} {unique:>7} {method:>13} {med:8.2f} "
            f"{np.percentile(t, 20):8.2f} {np.percentile(t, 80):8.2f} {ratio:>6} {cpu:>8}")


def main() -> None:
    warmup()
    print(f"machine: {_machine()}")
    print(f"B=4096 F=39 widths={WIDTHS}: ms per step of embedding backward + optimizer update, median "
          f"[p20, p80] wall; ratio = method / numba (wall medians); cpu = median process CPU ms (all "
          f"threads); lookup = the forward F.embedding, untimed above")
    print(f"{'V':>9} {'skew':>4} {'kind':>7} {'unique':>7} {'method':>13} {'median':>8} {'p20':>8} "
          f"{'p80':>8} {'ratio':>6} {'cpu':>8}")
    for V in (1_800_000, 200_000):
        for skew in (3.0, 1.0):
            wl = Workload(V=V, skew=skew)
            unique = int(torch.unique(wl.ids()).numel())
            base = lookups = None
            for method in METHODS:
                steps = make_step(method, wl)
                t_lookup, t, cpu = time_step(*steps, rounds=5 if method == "torch_dense" else 20)
                del steps
                base = base or float(np.median(t)) * 1e3
                lookups = t_lookup if lookups is None else lookups
                print(_row(V, skew, wl.kind, unique, method, t * 1e3, base, cpu * 1e3))
            print(_row(V, skew, "", "", "(lookup)", lookups * 1e3, None))
    for kind in ("sgd", "adagrad"):
        wl = Workload(kind=kind)
        _, t, cpu = time_step(*make_step("numba", wl), rounds=20)
        print(_row(wl.V, wl.skew, kind, "", "numba", t * 1e3, None, cpu * 1e3))


if __name__ == "__main__":
    main()
