"""Benchmark of the fused embedding kernels: forward lookups and backward + sparse optimizer.

One timing method for every kernel and baseline (``bench_common.time_ms``): CUDA events around each
repetition, the L2 flushed before every repetition (outside the timed region) for both sides, and
each case timed eager and, where the operation can be captured, as a CUDA graph replay (the
trainer's step); rows compare like with like (same ``graph`` flag).

Bandwidth is reported from COUNTED bytes: the traffic the operation cannot avoid once L2 is cold,
the same for every variant of one case (layouts, separate tables, torch):

* forward:   ids N*id_bytes + each distinct row's peer columns once U*sum(W)*4
             + outputs written N*sum(W)*out_bytes                         (N = B*F lookups, U distinct ids)
* backward:  ids N*id_bytes + gradients N*sum(W)*g_bytes
             + per distinct row: weight read + write 2*sum(W)*4, and the optimizer state
               (adam m, v read + write: 4*sum(W)*4; adagrad: 2*P*4; sgd: nothing)

Pad columns, the sort, scratch buffers and the partial-sector waste of random rows are overhead and
show up as a lower GB/s. ``% of copy`` is ``copy_ms / ms`` where ``copy_ms`` is a device copy that
moves exactly the counted bytes, timed the same way at the same size (``bench_common.copy_ms``): it
stays under 100% unless the operation moves its compulsory bytes faster than a plain copy of them.

Variants (DeepFM W = 17 + DCN W = 16, F = 39 fields, B = 4096 / 16384, V = 1.8 M / 35 M rows; each
fused variant in the packed layout, 33-column rows, and the aligned one, 36-column rows with every
peer 16-byte aligned):

* forward:  ``fused`` (one launch over the interleaved buffer), ``fused_bf16`` (bf16 outputs),
  ``separate_1launch`` (one launch over two tables: ``embedding_forward_tables`` below),
  ``separate_Plaunch`` (one fused launch per table), ``torch`` (``F.embedding`` per table).
* backward: ``sorted`` / ``atomic`` (the two fused paths), ``separate_sorted`` (one fused call per
  peer table), ``torch_dense`` (``F.embedding`` backward + dense fused ``torch.optim.Adam``),
  ``torch_sparse`` (``nn.Embedding(sparse=True)`` + ``torch.optim.SparseAdam``, eager only).

Ids follow a Criteo-like shape: 39 fields with sizes growing geometrically from ~30 rows to most of
the table, and inside a field ``id = floor(size * u ** skew)`` for uniform u (skew 3: a few hot rows
per field, as real click logs; skew 1: uniform).

``python bench/test_bench_embedding.py`` prints the table and, with ``--json``, rewrites the JSON
after every case (a run cut short keeps what it measured). ``--device cpu`` runs tiny sizes under the
Triton interpreter: it checks that the plumbing works; its timings mean nothing. Under pytest
(``pytest bench/test_bench_embedding.py --benchmark-enable``) the timing cases skip without CUDA.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

_CPU_RUN = "--device=cpu" in sys.argv or any(a == "--device" and b == "cpu" for a, b in zip(sys.argv, sys.argv[1:]))
if _CPU_RUN or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bench_common import ResultsFile, copy_ms, machine, time_ms  # noqa: E402
from mlfast.kernels.embedding_bag import embedding_forward, peer_offsets, row_width  # noqa: E402
from mlfast.kernels.layout import _row_start, kernels_interpreted  # noqa: E402
from mlfast.kernels.sparse_update import sparse_update  # noqa: E402

WIDTHS = (17, 16)
LAYOUTS = ("packed", "aligned")
FORWARD_VARIANTS = ("fused", "fused_bf16", "separate_1launch", "separate_Plaunch", "torch")
BACKWARD_VARIANTS = ("sorted", "atomic", "separate_sorted", "torch_dense", "torch_sparse")
LAYOUT_VARIANTS = {"fused", "fused_bf16", "sorted", "atomic"}  # timed in both layouts
NOT_GRAPHABLE = {"torch_sparse"}  # SparseAdam coalesces sparse gradients with host syncs
DEVICE = "cuda"  # a module global so that the closures can be dry-run elsewhere


@dataclass(frozen=True)
class Workload:
    V: int = 1_800_000
    B: int = 4096
    F: int = 39
    skew: float = 3.0
    kind: str = "adam"
    ids_dtype: str = "int32"
    seed: int = 0

    @property
    def N(self) -> int:
        return self.B * self.F

    def ids(self, device) -> torch.Tensor:
        """[B, F] global ids (see the module docstring), in ``ids_dtype``."""
        sizes = 10 ** np.linspace(1.5, 6.0, self.F)
        sizes = np.maximum(2, (sizes / sizes.sum() * self.V).astype(np.int64))
        sizes[-1] += self.V - sizes.sum()
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        u = np.random.default_rng(self.seed).random((self.B, self.F))
        local = np.minimum(sizes - 1, (sizes * u**self.skew).astype(np.int64))
        return torch.from_numpy(starts + local).to(getattr(torch, self.ids_dtype)).to(device)

    def grads(self, device, dtype=torch.float32) -> list[torch.Tensor]:
        g = torch.Generator(device=device).manual_seed(self.seed + 1)
        return [(torch.randn(self.B, self.F, w, generator=g, device=device) * 1e-3).to(dtype) for w in WIDTHS]


def gpu_info() -> dict:
    if not torch.cuda.is_available() or DEVICE != "cuda":
        return {"gpu": "cpu (Triton interpreter)", "machine": machine(), "torch": torch.__version__,
                "triton": triton.__version__}
    p = torch.cuda.get_device_properties(0)
    return {"gpu": p.name, "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
            "torch": torch.__version__, "triton": triton.__version__}


# ---------------------------------------------------------------------------------------------
# The separate-tables baseline: P tables [V, W_p] gathered in ONE launch (what the interleaved
# layout is measured against; models that keep their own tables would look up this way)

@triton.jit
def _tables_fwd_kernel(tables, ids_ptr, outs, N, WIDTHS: tl.constexpr, ROWS: tl.constexpr, WPAD: tl.constexpr):
    n = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    inb = n < N
    row = tl.load(ids_ptr + n, mask=inb, other=0)
    d = tl.arange(0, WPAD)
    for p in tl.static_range(len(WIDTHS)):
        m = inb[:, None] & (d < WIDTHS[p])[None, :]
        x = tl.load(tables[p] + _row_start(row, WIDTHS[p], 1)[:, None] + d[None, :], mask=m, other=0.0)
        tl.store(outs[p] + n[:, None] * WIDTHS[p] + d[None, :], x.to(outs[p].dtype.element_ty), mask=m)


def embedding_forward_tables(tables: Sequence[torch.Tensor], ids: torch.Tensor,
                             out_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Look up ``ids`` in P separate tables [V, W_p] in one launch: ``F.embedding`` per table."""
    tables = tuple(t.contiguous() for t in tables)
    flat = ids.reshape(-1)
    ws = tuple(t.shape[1] for t in tables)
    outs = tuple(torch.empty(*ids.shape, w, dtype=out_dtype or tables[0].dtype, device=ids.device) for w in ws)
    if flat.numel():
        rows = 64
        _tables_fwd_kernel[(triton.cdiv(flat.numel(), rows),)](
            tables, flat, outs, flat.numel(), WIDTHS=ws, ROWS=rows, WPAD=triton.next_power_of_2(max(ws)),
            num_warps=4)
    return list(outs)


# ---------------------------------------------------------------------------------------------
# Cases: (closure, counted bytes)

def _table(wl: Workload, layout: str, gen) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    align = 4 if layout == "aligned" else 1
    w = torch.randn(wl.V, row_width(WIDTHS, align), device=DEVICE, generator=gen) * 1e-4
    return w, (peer_offsets(WIDTHS, align) if layout == "aligned" else None)


def forward_bytes(wl: Workload, U: int, out_bytes: int = 4) -> int:
    id_bytes = torch.empty(0, dtype=getattr(torch, wl.ids_dtype)).element_size()
    return wl.N * id_bytes + U * sum(WIDTHS) * 4 + wl.N * sum(WIDTHS) * out_bytes


def backward_bytes(wl: Workload, U: int, grad_bytes: int = 4) -> int:
    id_bytes = torch.empty(0, dtype=getattr(torch, wl.ids_dtype)).element_size()
    wsum, P = sum(WIDTHS), len(WIDTHS)
    state = {"adam": 4 * wsum * 4, "adagrad": 2 * P * 4, "sgd": 0}[wl.kind]
    return wl.N * id_bytes + wl.N * wsum * grad_bytes + U * (2 * wsum * 4 + state)


def make_forward(variant: str, wl: Workload, layout: str = "packed") -> tuple[Callable[[], object], int]:
    dev = torch.device(DEVICE)
    ids = wl.ids(dev)
    U = int(torch.unique(ids).numel())
    g = torch.Generator(device=dev).manual_seed(wl.seed + 2)
    if variant.startswith("fused"):
        weight, offs = _table(wl, layout, g)
        dtype = torch.bfloat16 if variant.endswith("bf16") else None
        return (lambda: embedding_forward(weight, ids, WIDTHS, offs, dtype)), forward_bytes(wl, U, 2 if dtype else 4)
    tables = [torch.randn(wl.V, w, device=dev, generator=g) * 1e-4 for w in WIDTHS]
    if variant == "separate_1launch":
        return (lambda: embedding_forward_tables(tables, ids)), forward_bytes(wl, U)
    if variant == "separate_Plaunch":
        return (lambda: [embedding_forward(t, ids, (t.shape[1],)) for t in tables]), forward_bytes(wl, U)
    if variant == "torch":
        return (lambda: [F.embedding(ids, t) for t in tables]), forward_bytes(wl, U)
    raise ValueError(f"unknown forward variant {variant!r}")


def _state(weight: torch.Tensor, widths, kind: str, atomic: bool) -> dict:
    st = {}
    if kind == "adagrad":
        st["sum_sq"] = torch.zeros(weight.shape[0], len(widths), device=weight.device)
    elif kind == "adam":
        st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(weight), torch.zeros_like(weight)
    if atomic:
        st["slots"] = torch.full((weight.shape[0],), -1, dtype=torch.int32, device=weight.device)
    return st


def make_backward(variant: str, wl: Workload, layout: str = "packed") -> tuple[Callable[[], object], int]:
    dev = torch.device(DEVICE)
    ids = wl.ids(dev)
    grads = wl.grads(dev)
    U = int(torch.unique(ids).numel())
    g = torch.Generator(device=dev).manual_seed(wl.seed + 2)
    lr = torch.full((1,), 1e-3, device=dev)
    if variant in ("sorted", "atomic"):
        weight, offs = _table(wl, layout, g)
        st = _state(weight, WIDTHS, wl.kind, variant == "atomic")
        step = torch.zeros(1, dtype=torch.int64, device=dev)
        return (lambda: sparse_update(weight, ids, grads, WIDTHS, offs, kind=wl.kind, step=step, lr=lr,
                                      deterministic=variant == "sorted", **st)), backward_bytes(wl, U)
    if variant == "separate_sorted":
        tables = [torch.randn(wl.V, w, device=dev, generator=g) * 1e-4 for w in WIDTHS]
        states = [_state(t, (t.shape[1],), wl.kind, False) for t in tables]
        steps = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in tables]

        def run():
            for t, step, st, gr in zip(tables, steps, states, grads):
                sparse_update(t, ids, [gr], (t.shape[1],), kind=wl.kind, step=step, lr=lr, **st)

        return run, backward_bytes(wl, U)
    if wl.kind != "adam":
        raise ValueError("the torch baselines are adam only")
    sparse = variant == "torch_sparse"
    embs = [torch.nn.Embedding(wl.V, w, sparse=sparse, device=dev) for w in WIDTHS]
    params = [e.weight for e in embs]
    if sparse:
        opt = torch.optim.SparseAdam(params, lr=1e-3)
    else:
        cuda = dev.type == "cuda"
        opt = torch.optim.Adam(params, lr=torch.tensor(1e-3, device=dev) if cuda else 1e-3, fused=cuda,
                               capturable=cuda)
    long_ids = ids.long()  # nn.Embedding's sparse backward wants int64

    def run():
        opt.zero_grad(set_to_none=sparse)  # dense: keep the gradient buffers (graph replays reuse them)
        outs = [e(long_ids) for e in embs]
        torch.autograd.backward(outs, grads)
        opt.step()

    return run, backward_bytes(wl, U)


def measure(results: ResultsFile, direction: str, variant: str, wl: Workload, layout: str, graph: bool,
            reps: int, info: dict) -> dict:
    make = make_forward if direction == "forward" else make_backward
    row = {"direction": direction, "variant": variant, "layout": layout, "graph": graph, **asdict(wl), **info}
    try:
        fn, nbytes = make(variant, wl, layout)
        ms, p20, p80 = time_ms(fn, DEVICE, graph=graph, flush=DEVICE == "cuda", reps=reps, warmup=min(reps, 5))
        c_ms = copy_ms(nbytes, DEVICE, graph=graph, flush=DEVICE == "cuda", reps=reps, warmup=min(reps, 5))[0]
        row.update(ms=ms, p20=p20, p80=p80, counted_mb=nbytes / 1e6, gb_s=nbytes / (ms * 1e-3) / 1e9,
                   copy_ms=c_ms, pct_of_copy=100 * c_ms / ms)
        del fn
    except Exception as e:  # one failing case (e.g. a capture a baseline cannot do) must not end the run
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return results.add(row)


def sweep(results: ResultsFile, Vs=(1_800_000, 35_300_000), Bs=(4096, 16384), kinds=("adam",), skews=(3.0,),
          layouts=LAYOUTS, graphs=(False, True), reps: int = 50, ids_dtype: str = "int32") -> list[dict]:
    """Every case, the cheapest first (V = 1.8M, B = 4096), each row written as soon as measured."""
    info = gpu_info()
    for V in Vs:
        for B in Bs:
            for skew in skews:
                wl = Workload(V, B, skew=skew, ids_dtype=ids_dtype)
                for variant in FORWARD_VARIANTS:
                    for layout in layouts if variant in LAYOUT_VARIANTS else ("packed",):
                        for graph in graphs:
                            measure(results, "forward", variant, wl, layout, graph, reps, info)
                for kind in kinds:
                    for variant in BACKWARD_VARIANTS:
                        if kind != "adam" and variant.startswith("torch"):
                            continue
                        for layout in layouts if variant in LAYOUT_VARIANTS else ("packed",):
                            for graph in graphs:
                                if graph and variant in NOT_GRAPHABLE:
                                    continue
                                wlk = Workload(V, B, skew=skew, kind=kind, ids_dtype=ids_dtype)
                                measure(results, "backward", variant, wlk, layout, graph, reps, info)
    return results.rows


def format_table(rows: list[dict]) -> str:
    head = ("| dir | variant | layout | graph | V | B | kind | skew | ms (p20-p80) | counted MB | GB/s "
            "| copy ms | % of copy |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lead = (f"| {r['direction']} | {r['variant']} | {r['layout']} | {'y' if r['graph'] else 'n'} | {r['V']:,} "
                f"| {r['B']} | {r['kind']} | {r['skew']} ")
        if "error" in r:
            lines.append(lead + f"| error: {r['error'][:80]} | | | | |")
        else:
            lines.append(lead + f"| {r['ms']:.4f} ({r['p20']:.4f}-{r['p80']:.4f}) | {r['counted_mb']:.1f} "
                                f"| {r['gb_s']:.0f} | {r['copy_ms']:.4f} | {r['pct_of_copy']:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Tuning: one launch constant at a time, the others at their defaults

TUNING = {
    "forward": {"FWD_BLOCK": (1024, 2048, 4096), "FWD_WARPS": (2, 4, 8)},
    "backward": {"SORT_CHUNK": (16, 32, 64), "SORT_WARPS": (2, 4, 8), "ROWS_PER_PROGRAM": (16, 32, 64),
                 "UPDATE_WARPS": (2, 4, 8)},
}
UNUSED = {"SORT_CHUNK": "atomic", "SORT_WARPS": "atomic", "ROWS_PER_PROGRAM": "sorted", "UPDATE_WARPS": "sorted"}


def tune(results: ResultsFile, wl: Workload = Workload(), layout: str = "aligned", graph: bool = True,
         reps: int = 50) -> list[dict]:
    """Time the fused variants for each value of each launch constant: the table to pick the
    defaults from on a new GPU."""
    import mlfast.kernels.embedding_bag as eb
    import mlfast.kernels.sparse_update as su

    info = gpu_info()
    for direction, consts in TUNING.items():
        mod = eb if direction == "forward" else su
        variants = ("fused",) if direction == "forward" else ("sorted", "atomic")
        for name, values in consts.items():
            default = getattr(mod, name)
            try:
                for v in values:
                    setattr(mod, name, v)
                    for variant in variants:
                        if variant != UNUSED.get(name):
                            measure(results, direction, variant, wl, layout, graph, reps,
                                    {**info, "tuned": f"{name}={v}"})
            finally:
                setattr(mod, name, default)
    return results.rows


# ---------------------------------------------------------------------------------------------
# pytest: the separate-tables baseline against F.embedding (any device), timing cases (CUDA only)

def test_separate_tables_kernel_matches_embedding():
    if not torch.cuda.is_available() and not kernels_interpreted():
        pytest.skip("needs CUDA or the Triton interpreter")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    tables = [torch.randn(50, w, generator=g).to(dev) for w in (17, 16, 5)]
    ids = torch.randint(0, 50, (7, 11), generator=g).int().to(dev)
    for out, t in zip(embedding_forward_tables(tables, ids), tables):
        assert torch.equal(out, F.embedding(ids.long(), t))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _bench(benchmark, fn, nbytes, wl, variant, layout):
    def run():
        fn()
        torch.cuda.synchronize()

    run()
    benchmark.extra_info.update({**gpu_info(), **asdict(wl), "variant": variant, "layout": layout,
                                 "counted_bytes": nbytes})
    benchmark.pedantic(run, rounds=20, iterations=5, warmup_rounds=2)


@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_bench_forward(benchmark, variant, layout):
    if layout == "aligned" and variant not in LAYOUT_VARIANTS:
        pytest.skip("one layout only")
    wl = Workload()
    fn, nbytes = make_forward(variant, wl, layout)
    _bench(benchmark, fn, nbytes, wl, variant, layout)


@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", BACKWARD_VARIANTS)
def test_bench_backward(benchmark, variant, layout):
    if layout == "aligned" and variant not in LAYOUT_VARIANTS:
        pytest.skip("one layout only")
    wl = Workload()
    fn, nbytes = make_backward(variant, wl, layout)
    _bench(benchmark, fn, nbytes, wl, variant, layout)


def main(argv: list[str] | None = None) -> None:
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="Counted bytes, timing method, variants: see the module docstring.")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda, or cpu: tiny sizes under the Triton interpreter (checks the plumbing only)")
    ap.add_argument("--quick", action="store_true", help="V = 1.8 M and B = 4096 only")
    ap.add_argument("--kinds", default="adam", help="comma-separated sparse optimizers (sgd,adagrad,adam)")
    ap.add_argument("--skews", default="3", help="comma-separated id skews (1 = uniform)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated: packed,aligned")
    ap.add_argument("--ids", default="int32", choices=("int32", "int64"), help="dtype of the ids")
    ap.add_argument("--reps", type=int, default=50, help="timed repetitions per case")
    ap.add_argument("--tune", action="store_true", help="sweep the kernels' launch constants instead")
    ap.add_argument("--json", help="write the rows to this file, rewritten after every case")
    a = ap.parse_args(argv)
    DEVICE = a.device
    if DEVICE == "cpu" and not kernels_interpreted():
        raise SystemExit("--device cpu needs the Triton interpreter: set TRITON_INTERPRET=1 before the run")
    results = ResultsFile(a.json)
    kw = dict(kinds=tuple(a.kinds.split(",")), skews=tuple(float(s) for s in a.skews.split(",")),
              layouts=tuple(a.layouts.split(",")), reps=a.reps, ids_dtype=a.ids)
    if a.quick:
        kw.update(Vs=(1_800_000,), Bs=(4096,))
    if DEVICE == "cpu":  # the interpreter runs a few hundred lookups per second
        kw.update(Vs=(2000,), Bs=(8,), graphs=(False,), reps=min(a.reps, 2))
    if a.tune:
        rows = tune(results, Workload(ids_dtype=a.ids) if DEVICE == "cuda" else Workload(2000, 8, ids_dtype=a.ids),
                    graph=DEVICE == "cuda", reps=kw["reps"])
    else:
        rows = sweep(results, **kw)
    info = gpu_info()
    print(f"{info['gpu']}, torch {info['torch']}, triton {info['triton']}")
    print(format_table(rows))


if __name__ == "__main__":
    main()
