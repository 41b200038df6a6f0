"""mlfast: mutual learning for CTR models on raw click logs.

Read raw logs (``read_criteo``, ``read_avazu``, ``read_delimited``), batch them
(``BatchLoader``, ``iter_batches``), generate data (``synth_criteo``), train peers together
(``fit``), and score new data with a finished run (``load_run``). See README.md.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CTRData": "data",
    "BagField": "data",
    "read": "reader",
    "read_criteo": "reader",
    "read_avazu": "reader",
    "read_delimited": "reader",
    "iter_criteo_chunks": "reader",
    "iter_avazu_chunks": "reader",
    "iter_delimited_chunks": "reader",
    "release_memory": "reader",
    "clear_cache": "cache",
    "DelimitedSchema": "reader",
    "ParseError": "reader",
    "BatchLoader": "batches",
    "Batch": "batches",
    "iter_batches": "batches",
    "split_indices": "batches",
    "synth_criteo": "synth",
    "SynthReport": "synth",
    "criteo_config": "synth",
    "Vocabulary": "vocab",
    "run_study": "study",
    "TrainConfig": "config",
    "MutualTrainer": "trainer",
    "fit": "api",
    "load_run": "api",
    "FitResult": "api",
    "Predictor": "api",
    "mutual_loss": "losses",
    "fused_mutual_loss": "losses",
    "MutualLoss": "losses",
    "FeatureSchema": "models",
    "CTRModel": "models",
    "PeerSpec": "models",
    "parse_peer": "models",
    "parse_peers": "models",
    "build_model": "models",
    "MODELS": "models",
    "roc_auc": "metrics",
    "logloss": "metrics",
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
