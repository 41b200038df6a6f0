"""A/B of one change inside the training step: ``mlfast bench``'s DeepFM + DCN mutual workload (1.8 M
rows per table, B = 4096, the fused engine, CPU), two settings of one switch alternated in blocks of
steps in ONE process on ONE engine (the same tables, batches and memory), so a shared machine's
drift falls on both sides. Median ms per step with p20 / p80 and the ratio A / B.

    python bench/step_ab.py grads      # the embedding gradients packed into one [N, R] buffer vs read per peer
    python bench/step_ab.py cross      # DCN's cross network: layer by layer vs the closed form
    python bench/step_ab.py linear     # the dense layers: F.linear (BLAS) vs oneDNN's matmul
    python bench/step_ab.py split      # a peer's rows split by two slices vs one split

Switches: ``grads`` (``packed``: the numba update handed one zero-filled [N, R] buffer the peers'
gradients are copied into, the path before the per-peer read; ``per-peer``: today's path) and
``cross`` (``MLFAST_CROSS=reference`` vs ``fast``), ``linear`` (``MLFAST_LINEAR=reference`` vs ``fast``),
``split`` (``slices``: ``split_embedded`` as two slices, the old path; ``split``: today's).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Callable, Iterator

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_common import machine, quantile  # noqa: E402

from mlfast.bench import alternate_blocks  # noqa: E402

B = 4096
_ENGINE: list = []


def engine_step(seed: int = 0) -> Callable[[], object]:
    """One training step of the workload per call (the engine is built once per process)."""
    if not _ENGINE:
        from mlfast.bench import Workload, build, random_batches
        from mlfast.train.graphed import GraphedStep

        engine, schema = build("mlfast", Workload(rows=1_800_000, batch=B), torch.device("cpu"), seed=seed)
        _ENGINE.append((GraphedStep(engine, enabled=False, fallback=True),
                        random_batches(schema, B, 8, torch.device("cpu"), seed), [0]))
    step, batches, k = _ENGINE[0]

    def run():
        k[0] += 1
        return step(batches[k[0] % len(batches)])
    return run


@contextlib.contextmanager
def env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def packed_grads() -> Iterator[None]:
    """The numba update fed one packed, zero-filled [N, R] gradient buffer (the old path)."""
    import mlfast.ops.cpu_sparse as cs
    from mlfast.ops.sparse_optim import packed_offsets

    real = cs.sparse_update

    def packed(weight, ids, grads, state, cfg, threads=None):
        if not isinstance(grads, torch.Tensor):
            N = ids.numel()
            offs = state.col_offsets if state.col_offsets is not None else packed_offsets(state.segments)
            buf = torch.zeros(N, weight.shape[1])
            for g, o, w in zip(grads, offs, state.segments):
                buf[:, o:o + w] = g.reshape(N, w)
            grads = buf
        return real(weight, ids, grads, state, cfg, threads)

    cs.sparse_update = packed
    try:
        yield
    finally:
        cs.sparse_update = real


@contextlib.contextmanager
def sliced_rows() -> Iterator[None]:
    """Each peer's rows split into vectors and first-order weights by two slices (the old path)."""
    from mlfast.models.base import CTRModel

    real = CTRModel.split_embedded

    def sliced(self, emb):
        real(self, emb)  # its checks
        return (emb[..., :-1], emb[..., -1]) if self.uses_linear else (emb, None)

    CTRModel.split_embedded = sliced
    try:
        yield
    finally:
        CTRModel.split_embedded = real


SWITCHES = {
    "grads": {"packed": packed_grads, "per-peer": contextlib.nullcontext},
    "cross": {"reference": lambda: env("MLFAST_CROSS", "reference"), "fast": lambda: env("MLFAST_CROSS", "fast")},
    "linear": {"reference": lambda: env("MLFAST_LINEAR", "reference"), "fast": lambda: env("MLFAST_LINEAR", "fast")},
    "split": {"slices": sliced_rows, "split": contextlib.nullcontext},
}


def ab(switch: str, rounds: int = 12, block: int = 4) -> dict:
    """Alternate the switch's two settings (`mlfast.bench.alternate_blocks`: order flipped every
    round, ``block`` timed steps each after one untimed step); median, p20, p80 ms per step."""
    step = engine_step()
    sides = SWITCHES[switch]

    def run(name: str) -> None:
        with sides[name]():
            step()

    times = alternate_blocks(run, list(sides), rounds, block)
    a, b = list(sides)
    res = {"switch": switch, "machine": machine(), "threads": torch.get_num_threads(), "rounds": rounds,
           "block": block, "sides": {n: {"median_ms": quantile(t, 0.5), "p20_ms": quantile(t, 0.2),
                                         "p80_ms": quantile(t, 0.8)} for n, t in times.items()}}
    res["ratio"] = res["sides"][a]["median_ms"] / res["sides"][b]["median_ms"]
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("switch", choices=sorted(SWITCHES))
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    res = ab(args.switch, args.rounds)
    print(res["machine"], f"| {res['threads']} threads | {args.switch}: ms per step, median [p20, p80]")
    for name, s in res["sides"].items():
        print(f"  {name:>10}: {s['median_ms']:8.1f} [{s['p20_ms']:.1f}, {s['p80_ms']:.1f}]")
    a, b = list(res["sides"])
    print(f"  {a} / {b}: {res['ratio']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
