"""GPU benchmark of the fused embedding kernels: forward lookups and backward + sparse optimizer.

Bandwidth is reported from COUNTED bytes (what the operation must move at minimum), divided by the
measured time, and compared with a measured device-to-device copy (``torch.empty_like(x).copy_(x)``,
bytes read + written) on the same GPU:

* forward:   ids N*8 + rows read N*Wtot*4 + outputs written N*Wtot*out_bytes      (N = B*F lookups)
* backward:  ids N*8 + gradients read N*Wtot*g_bytes
             + per unique row U: weight read+write 2*Wtot*4, plus the optimizer state
               (adam m, v: 4*Wtot*4; adagrad: 2*P*4; sgd: nothing)

The sort, the scratch buffers and the partial-sector waste of 4*Wtot-byte random rows are not
counted: they are the kernels' overhead, and they show up as a lower GB/s.

Variants (P = 2 peers, DeepFM W = 17 + DCN W = 16, F = 39 fields, B = 4096 / 16384,
V = 1.8 M / 35 M rows):

* forward:  ``interleaved`` (one launch over the [V, 33] buffer), ``interleaved_bf16`` (bf16
  outputs), ``separate_1launch`` (one launch over two tables), ``separate_Plaunch`` (one launch per
  table), ``torch`` (``F.embedding`` per table).
* backward: ``sorted`` / ``atomic`` (the two fused paths on the interleaved buffer),
  ``separate_sorted`` (one fused call per peer table), ``torch_dense`` (``F.embedding`` backward +
  dense ``torch.optim.Adam``, fused), ``torch_sparse`` (``nn.Embedding(sparse=True)`` +
  ``torch.optim.SparseAdam``).

Ids follow a Criteo-like shape: 39 fields with sizes growing geometrically from ~30 rows to most of
the table, and inside a field ``id = floor(size * u ** skew)`` for uniform u (skew 3: a few hot rows
per field, as real click logs; skew 1: uniform). Times are the median (p20, p80) of
``triton.testing.do_bench`` (eager launches) and, for the fused paths, of
``do_bench_cudagraph`` (the step as the trainer replays it). Run ``python
bench/test_bench_embedding.py`` on a GPU for the table; under pytest these are pytest-benchmark
cases (``pytest bench/test_bench_embedding.py --benchmark-enable``), skipped without CUDA.
"""
from __future__ import annotations

import argparse
import gc
import json
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlfast.kernels.embedding_bag import embedding_forward, embedding_forward_tables
from mlfast.kernels.sparse_update import DeviceOptimState, sparse_update
from mlfast.ops.sparse_optim import SparseOptimConfig

WIDTHS = (17, 16)
FORWARD_VARIANTS = ("interleaved", "interleaved_bf16", "separate_1launch", "separate_Plaunch", "torch")
BACKWARD_VARIANTS = ("sorted", "atomic", "separate_sorted", "torch_dense", "torch_sparse")
DEVICE = "cuda"  # a module global so that the closures can be dry-run elsewhere
GRAPHABLE = {"interleaved", "interleaved_bf16", "separate_1launch", "separate_Plaunch", "sorted", "atomic",
             "separate_sorted"}


@dataclass(frozen=True)
class Workload:
    V: int = 1_800_000
    B: int = 4096
    F: int = 39
    skew: float = 3.0
    kind: str = "adam"
    seed: int = 0

    @property
    def N(self) -> int:
        return self.B * self.F

    def ids(self, device) -> torch.Tensor:
        """[B, F] int64 global ids (see the module docstring)."""
        sizes = 10 ** np.linspace(1.5, 6.0, self.F)
        sizes = np.maximum(2, (sizes / sizes.sum() * self.V).astype(np.int64))
        sizes[-1] += self.V - sizes.sum()
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        u = np.random.default_rng(self.seed).random((self.B, self.F))
        local = np.minimum(sizes - 1, (sizes * u**self.skew).astype(np.int64))
        return torch.from_numpy(starts + local).to(device)

    def grads(self, device, dtype=torch.float32) -> list[torch.Tensor]:
        g = torch.Generator(device=device).manual_seed(self.seed + 1)
        return [(torch.randn(self.B, self.F, w, generator=g, device=device) * 1e-3).to(dtype) for w in WIDTHS]


def gpu_info() -> dict:
    import triton

    p = torch.cuda.get_device_properties(0)
    return {"gpu": p.name, "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
            "torch": torch.__version__, "triton": triton.__version__}


def _timed(fn: Callable[[], None], graph: bool) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds."""
    import triton.testing as tt

    if graph:
        fn()  # compile and allocate outside the capture
        torch.cuda.synchronize()
        return tuple(tt.do_bench_cudagraph(fn, rep=50, quantiles=[0.5, 0.2, 0.8]))
    return tuple(tt.do_bench(fn, warmup=10, rep=100, quantiles=[0.5, 0.2, 0.8]))


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy (bytes read + written): the ceiling bandwidth is quoted against."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    ms = _timed(lambda: torch.empty_like(x).copy_(x), graph=False)[0]
    del x
    return 2 * nbytes / (ms * 1e-3) / 1e9


def unique_rows(ids: torch.Tensor) -> int:
    return int(torch.unique(ids).numel())


def forward_bytes(wl: Workload, out_bytes: int = 4, launches: int = 1) -> int:
    wtot = sum(WIDTHS)
    return wl.N * 8 * launches + wl.N * wtot * 4 + wl.N * wtot * out_bytes


def backward_bytes(wl: Workload, U: int, grad_bytes: int = 4) -> int:
    wtot, P = sum(WIDTHS), len(WIDTHS)
    state = {"adam": 4 * wtot * 4, "adagrad": 2 * P * 4, "sgd": 0}[wl.kind]
    return wl.N * 8 + wl.N * wtot * grad_bytes + U * (2 * wtot * 4 + state)


def make_forward(variant: str, wl: Workload) -> tuple[Callable[[], None], int]:
    """(closure, counted bytes) for one forward lookup of ``variant``."""
    dev = torch.device(DEVICE)
    ids = wl.ids(dev)
    g = torch.Generator(device=dev).manual_seed(wl.seed + 2)
    if variant.startswith("interleaved"):
        weight = torch.randn(wl.V, sum(WIDTHS), device=dev, generator=g) * 1e-4
        dtype = torch.bfloat16 if variant.endswith("bf16") else None
        return (lambda: embedding_forward(weight, ids, WIDTHS, dtype)), forward_bytes(wl, 2 if dtype else 4)
    tables = [torch.randn(wl.V, w, device=dev, generator=g) * 1e-4 for w in WIDTHS]
    if variant == "separate_1launch":
        return (lambda: embedding_forward_tables(tables, ids)), forward_bytes(wl)
    if variant == "separate_Plaunch":
        return (lambda: [embedding_forward(t, ids, (t.shape[1],)) for t in tables]), forward_bytes(wl, launches=2)
    if variant == "torch":
        return (lambda: [F.embedding(ids, t) for t in tables]), forward_bytes(wl, launches=2)
    raise ValueError(f"unknown forward variant {variant!r}")


def make_backward(variant: str, wl: Workload) -> tuple[Callable[[], None], int]:
    """(closure, counted bytes) for one backward + optimizer step of ``variant``."""
    dev = torch.device(DEVICE)
    ids = wl.ids(dev)
    grads = wl.grads(dev)
    U = unique_rows(ids)
    cfg = SparseOptimConfig(wl.kind, lr=1e-3)
    g = torch.Generator(device=dev).manual_seed(wl.seed + 2)
    if variant in ("sorted", "atomic"):
        weight = torch.randn(wl.V, sum(WIDTHS), device=dev, generator=g) * 1e-4
        st = DeviceOptimState.create(weight, WIDTHS, cfg)
        det = variant == "sorted"
        return (lambda: sparse_update(weight, ids, grads, WIDTHS, st, cfg, det)), backward_bytes(wl, U)
    if variant == "separate_sorted":
        tables = [torch.randn(wl.V, w, device=dev, generator=g) * 1e-4 for w in WIDTHS]
        states = [DeviceOptimState.create(t, (t.shape[1],), cfg) for t in tables]

        def run():
            for t, s, gr in zip(tables, states, grads):
                sparse_update(t, ids, [gr], (t.shape[1],), s, cfg)

        return run, backward_bytes(wl, U)
    if wl.kind != "adam":
        raise ValueError("the torch baselines are adam only")
    sparse = variant == "torch_sparse"
    embs = [torch.nn.Embedding(wl.V, w, sparse=sparse, device=dev) for w in WIDTHS]
    params = [e.weight for e in embs]
    opt = torch.optim.SparseAdam(params, lr=1e-3) if sparse else torch.optim.Adam(params, lr=1e-3, fused=True)
    outs = [e(ids) for e in embs]

    def run():
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(outs, grads, retain_graph=True)
        opt.step()

    return run, backward_bytes(wl, U)


def measure(direction: str, variant: str, wl: Workload, copy_gbs: float, graph: bool = False) -> dict:
    make = make_forward if direction == "forward" else make_backward
    fn, nbytes = make(variant, wl)
    ms, p20, p80 = _timed(fn, graph)
    gbs = nbytes / (ms * 1e-3) / 1e9
    row = {"direction": direction, "variant": variant, "graph": graph, **asdict(wl), "ms": ms, "p20": p20,
           "p80": p80, "counted_mb": nbytes / 1e6, "gb_s": gbs, "frac_of_copy": gbs / copy_gbs}
    del fn
    gc.collect()
    torch.cuda.empty_cache()
    return row


def sweep(Vs=(1_800_000, 35_300_000), Bs=(4096, 16384), kinds=("adam",), skews=(3.0,)) -> list[dict]:
    info = gpu_info()
    copy_gbs = copy_bandwidth()
    rows = []
    for V in Vs:
        for B in Bs:
            for skew in skews:
                for variant in FORWARD_VARIANTS:
                    for graph in (False, True) if variant in GRAPHABLE else (False,):
                        rows.append(measure("forward", variant, Workload(V, B, skew=skew), copy_gbs, graph))
                for kind in kinds:
                    for variant in BACKWARD_VARIANTS:
                        if kind != "adam" and variant.startswith("torch"):
                            continue
                        for graph in (False, True) if variant in GRAPHABLE else (False,):
                            rows.append(measure("backward", variant, Workload(V, B, skew=skew, kind=kind),
                                                copy_gbs, graph))
    for r in rows:
        r.update(info, copy_gb_s=copy_gbs)
    return rows


def format_table(rows: list[dict]) -> str:
    head = "| dir | variant | graph | V | B | kind | skew | ms (p20-p80) | counted MB | GB/s | % of copy |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['direction']} | {r['variant']} | {'y' if r['graph'] else 'n'} | {r['V']:,} | {r['B']} "
                     f"| {r['kind']} | {r['skew']} | {r['ms']:.4f} ({r['p20']:.4f}-{r['p80']:.4f}) "
                     f"| {r['counted_mb']:.1f} | {r['gb_s']:.0f} | {100 * r['frac_of_copy']:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Tuning and an offline compile check

TUNING = {
    "forward": {"FWD_BLOCK": (1024, 2048, 4096), "FWD_WARPS": (4, 8)},
    "backward": {"SORT_CHUNK": (16, 32, 64), "ROWS_PER_PROGRAM": (16, 32, 64), "UPDATE_WARPS": (2, 4, 8)},
}


def tune(wl: Workload = Workload(), graph: bool = True) -> list[dict]:
    """Time the fused variants for each value of each launch constant (one constant at a time, the
    others at their defaults): the table to pick the defaults from on a new GPU."""
    import mlfast.kernels.embedding_bag as eb
    import mlfast.kernels.sparse_update as su

    copy_gbs = copy_bandwidth()
    rows = []
    for direction, consts in TUNING.items():
        mod = eb if direction == "forward" else su
        variants = ("interleaved",) if direction == "forward" else ("sorted", "atomic")
        for name, values in consts.items():
            default = getattr(mod, name)
            try:
                for v in values:
                    setattr(mod, name, v)
                    for variant in variants:
                        unused = {"SORT_CHUNK": "atomic", "ROWS_PER_PROGRAM": "sorted"}.get(name)
                        if variant == unused:  # that constant does not shape this path
                            continue
                        r = measure(direction, variant, wl, copy_gbs, graph)
                        r["variant"] = f"{variant} {name}={v}"
                        rows.append(r)
            finally:
                setattr(mod, name, default)
    return rows


def compile_check(arch: int = 90) -> list[str]:
    """Compile every kernel of every launch the benchmark workloads make, for sm_``arch``, with
    Triton's bundled ptxas: no GPU needed. Returns one line per kernel variant with its registers
    and spills (a spill or a register count that caps occupancy is worth a look before a GPU run)."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction, mangle_type

    import mlfast.kernels.embedding_bag as eb
    import mlfast.kernels.sparse_update as su

    if eb.kernels_interpreted():
        raise RuntimeError("compile_check needs the compiled kernels: unset TRITON_INTERPRET")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    lines, seen = [], set()

    def sig(a):
        return tuple(sig(x) for x in a) if isinstance(a, tuple) else mangle_type(a)

    def fake_run(self, *args, grid, warmup, **kwargs):
        num_warps = kwargs.pop("num_warps", 4)
        signature, consts = {}, {}
        for i, p in enumerate(self.params):
            v = args[i] if i < len(args) else kwargs[p.name]
            signature[p.name] = "constexpr" if p.is_constexpr else sig(v)
            if p.is_constexpr:
                consts[p.name] = v
        key = (self.fn.__name__, repr(signature), repr(consts), num_warps)
        if key in seen:
            return
        seen.add(key)
        c = triton.compile(ASTSource(fn=self, signature=signature, constexprs=consts),
                           target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(c.asm["ptx"])
        err = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
        os.unlink(f.name)
        regs = re.findall(r"Used (\d+) registers", err)
        spills = re.findall(r"(\d+) bytes spill stores", err)
        shown = {k: v for k, v in consts.items() if k in ("KIND", "WTOT", "C", "R", "ROWS", "INTERLEAVED")}
        lines.append(f"{self.fn.__name__:26s} warps={num_warps} regs={','.join(regs)} "
                     f"spill_bytes={','.join(spills)} shared={c.metadata.shared} {shown}")

    saved = (JITFunction.run, eb.kernels_interpreted)
    JITFunction.run, eb.kernels_interpreted = fake_run, (lambda: True)  # launch = compile only
    try:
        w = torch.zeros(64, sum(WIDTHS))
        ids = torch.randint(0, 64, (4, 39))
        eb.embedding_forward(w, ids, WIDTHS)
        eb.embedding_forward(w, ids, WIDTHS, out_dtype=torch.bfloat16)
        eb.embedding_forward_tables([w[:, :17].contiguous(), w[:, 17:].contiguous()], ids)
        eb.embedding_bag_forward(w, ids.reshape(-1), torch.arange(0, 157, 39), WIDTHS)
        for kind in ("sgd", "adagrad", "adam"):
            cfg = SparseOptimConfig(kind, weight_decay=1e-5)
            st = DeviceOptimState.create(w, WIDTHS, cfg)
            for det in (True, False):
                su.sparse_update(w, ids, [torch.zeros(4, 39, 17), torch.zeros(4, 39, 16)], WIDTHS, st, cfg, det)
    finally:
        JITFunction.run, eb.kernels_interpreted = saved
    return lines


# ---------------------------------------------------------------------------------------------
# pytest-benchmark cases (skipped without CUDA)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _bench(benchmark, fn, nbytes, wl, variant):
    def run():
        fn()
        torch.cuda.synchronize()

    run()
    benchmark.extra_info.update({**gpu_info(), **asdict(wl), "variant": variant, "counted_bytes": nbytes})
    benchmark.pedantic(run, rounds=20, iterations=5, warmup_rounds=2)


@needs_cuda
@pytest.mark.parametrize("B", [4096, 16384])
@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_bench_forward(benchmark, variant, B):
    wl = Workload(B=B)
    fn, nbytes = make_forward(variant, wl)
    _bench(benchmark, fn, nbytes, wl, variant)


@needs_cuda
@pytest.mark.parametrize("B", [4096, 16384])
@pytest.mark.parametrize("variant", BACKWARD_VARIANTS)
def test_bench_backward(benchmark, variant, B):
    wl = Workload(B=B)
    fn, nbytes = make_backward(variant, wl)
    _bench(benchmark, fn, nbytes, wl, variant)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="V = 1.8 M and B = 4096 only")
    ap.add_argument("--kinds", default="adam", help="comma-separated sparse optimizers")
    ap.add_argument("--skews", default="3", help="comma-separated id skews (1 = uniform)")
    ap.add_argument("--tune", action="store_true", help="sweep the kernels' launch constants instead")
    ap.add_argument("--compile-only", action="store_true",
                    help="compile every kernel for sm_90 offline and print registers/spills (no GPU)")
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args()
    if a.compile_only:
        print("\n".join(compile_check()))
        return
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    kw = dict(kinds=tuple(a.kinds.split(",")), skews=tuple(float(s) for s in a.skews.split(",")))
    if a.quick:
        kw.update(Vs=(1_800_000,), Bs=(4096,))
    if a.tune:
        rows = tune()
        info, copy_gbs = gpu_info(), copy_bandwidth()
        for r in rows:
            r.update(info, copy_gb_s=copy_gbs)
    else:
        rows = sweep(**kw)
    info = rows[0]
    print(f"{info['gpu']} ({info['sms']} SMs), torch {info['torch']}, triton {info['triton']}, "
          f"copy {info['copy_gb_s']:.0f} GB/s")
    print(format_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
