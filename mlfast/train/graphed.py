"""``GraphedStep``: any engine's training step captured in a CUDA graph and replayed.

A step's kernels are recorded once per input signature (the shape and dtype of every tensor of the
batch: ids, dense features, labels) and replayed for every later batch of that signature after
copying the batch into the graph's static input buffers. The first batch of a signature is trained
eagerly on a side stream (it warms up the allocator, lazily created optimizer state and kernel
compilation, as capture requires), then the step is recorded: capture runs nothing, so no batch is
trained twice.

A graph holds the addresses of every tensor the step touched, so anything that replaces tensors
(loading optimizer or model state, changing the engine's configuration) must call `reset`; the
trainer does after every load. Batches with multi-hot bags change size from batch to batch and run
eagerly. A failed capture is an error unless ``fallback=True``; what happened (graphs captured,
replays, eager steps and why, failures) is in `stats`, which the trainer records in the run's
metadata and the benchmark in its rows.
"""
from __future__ import annotations

from typing import Any

import torch

from mlfast.io.batches import Batch

MAX_GRAPHS = 4  # signatures kept: the full batch and a ragged last one, with room to spare


def signature(batch: Batch) -> tuple:
    def sig(t):
        return None if t is None else (tuple(t.shape), t.dtype)

    return sig(batch.sparse), sig(batch.dense), sig(batch.labels)


class GraphedStep:
    """Callable like ``engine.train_step``; replays CUDA graphs where it can (see module doc).

    ``enabled=False`` (or a CPU engine) makes it a plain pass-through that still counts steps.
    """

    def __init__(self, engine: Any, enabled: bool = True, fallback: bool = False, max_graphs: int = MAX_GRAPHS):
        self.engine = engine
        self.enabled = bool(enabled) and getattr(engine, "device", torch.device("cpu")).type == "cuda"
        self.fallback = bool(fallback)
        self.max_graphs = int(max_graphs)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, Any]]] = {}
        self.stats: dict[str, Any] = {"enabled": self.enabled, "captures": 0, "replays": 0, "eager_steps": 0,
                                      "eager_reasons": {}, "failures": []}

    def reset(self) -> None:
        """Forget every captured graph (call after any state load)."""
        self._graphs.clear()

    def _eager(self, batch: Batch, reason: str) -> torch.Tensor:
        self.stats["eager_steps"] += 1
        self.stats["eager_reasons"][reason] = self.stats["eager_reasons"].get(reason, 0) + 1
        return self.engine.train_step(batch)

    def __call__(self, batch: Batch) -> torch.Tensor:
        if not self.enabled:
            return self._eager(batch, "disabled")
        if batch.bags:
            return self._eager(batch, "bags (size varies)")
        key = signature(batch)
        hit = self._graphs.get(key)
        if hit is not None:
            graph, static = hit
            static["sparse"].copy_(batch.sparse, non_blocking=True)
            if batch.dense is not None:
                static["dense"].copy_(batch.dense, non_blocking=True)
            static["labels"].copy_(batch.labels, non_blocking=True)
            graph.replay()
            self.stats["replays"] += 1
            return static["out"].clone()
        if len(self._graphs) >= self.max_graphs:
            return self._eager(batch, "too many signatures")
        return self._capture(key, batch)

    def _capture(self, key: tuple, batch: Batch) -> torch.Tensor:
        static = {"sparse": batch.sparse.clone(), "dense": None if batch.dense is None else batch.dense.clone(),
                  "labels": batch.labels.clone()}
        sb = Batch(sparse=static["sparse"], dense=static["dense"], labels=static["labels"], index=batch.index)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.engine.train_step(sb)  # trains this batch (once) and warms everything up
        torch.cuda.current_stream().wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static["out"] = self.engine.train_step(sb)
        except Exception as exc:  # pragma: no cover - depends on the CUDA stack
            msg = f"{type(exc).__name__}: {exc}"
            self.stats["failures"].append(msg)
            if not self.fallback:
                raise RuntimeError(f"CUDA graph capture of the training step failed ({msg}); rerun with "
                                   "--graph-fallback to train eagerly, or --no-cuda-graph") from exc
            self.enabled = False
            return out
        self._graphs[key] = (graph, static)
        self.stats["captures"] += 1
        return out
