"""mlfast: mutual learning for CTR models on raw click logs.

Read raw logs (``read_criteo``, ``read_avazu``, ``read_delimited``), batch them
(``BatchLoader``, ``iter_batches``), generate data (``synth_criteo``), train peers together
(``fit``), and score new data with a finished run (``load_run``). See README.md.
"""
from __future__ import annotations

import importlib
import os as _os
from typing import Any

__version__ = "0.1.0"

# One rank of a torchrun job (mlfast.dist): numba's thread pool gets this rank's share of the cores,
# set before numba starts it. Its idle threads spin; one pool per core and rank made two 1-core
# ranks on a 2-core machine each 3-6x slower than alone.
if "LOCAL_WORLD_SIZE" in _os.environ and "NUMBA_NUM_THREADS" not in _os.environ:
    _os.environ["NUMBA_NUM_THREADS"] = str(max(1, (_os.cpu_count() or 1) // max(1, int(_os.environ["LOCAL_WORLD_SIZE"]
                                                                                   or 1))))

_EXPORTS = {
    "CTRData": "io.data",
    "BagField": "io.data",
    "read": "io.reader",
    "read_criteo": "io.reader",
    "read_avazu": "io.reader",
    "read_delimited": "io.reader",
    "iter_criteo_chunks": "io.reader",
    "iter_read": "io.reader",
    "iter_avazu_chunks": "io.reader",
    "iter_delimited_chunks": "io.reader",
    "release_memory": "io.reader",
    "clear_cache": "io.cache",
    "DelimitedSchema": "io.reader",
    "ParseError": "io.reader",
    "CorruptInputError": "io.reader",
    "read_columnar": "io.arrow",
    "iter_columnar_chunks": "io.arrow",
    "BatchLoader": "io.batches",
    "Batch": "io.batches",
    "iter_batches": "io.batches",
    "split_indices": "io.batches",
    "synth_criteo": "io.synth",
    "SynthReport": "io.synth",
    "criteo_config": "io.synth",
    "Vocabulary": "io.vocab",
    "run_study": "study",
    "TrainConfig": "train.config",
    "MutualTrainer": "train.trainer",
    "fit": "api",
    "load_run": "api",
    "Featurizer": "featurize",
    "export_run": "export",
    "FitResult": "api",
    "Predictor": "api",
    "PeerGroup": "train.group",
    "PeerTables": "train.tables",
    "mutual_loss": "ops.mutual_loss",
    "fused_mutual_loss": "ops.mutual_loss",
    "MutualLoss": "ops.mutual_loss",
    "FeatureSchema": "models",
    "CTRModel": "models",
    "PeerSpec": "models",
    "parse_peer": "models",
    "parse_peers": "models",
    "build_model": "models",
    "MODELS": "models",
    "roc_auc": "train.metrics",
    "logloss": "train.metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy: `import mlfast` stays cheap (no torch / numba import until something needs it).
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mlfast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
