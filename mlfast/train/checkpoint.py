"""Checkpoint files: atomic writes (temp file + rename), written in the background without
stalling training, stale temporaries cleaned, and the RNG state a resume must restore."""
from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

_UMASK = os.umask(0)
os.umask(_UMASK)

CHECKPOINT_FORMAT = "mlfast-checkpoint"
CHECKPOINT_VERSION = 2
TMP_SUFFIX = ".tmp"


_FAULT_COUNTS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL here when ``MLFAST_FAULT_AT`` is ``name`` or ``name:N`` (the
    N-th time this point is reached). The crash tests put kills where timing alone rarely lands:
    inside a checkpoint write, between ``model.pt`` and ``finished.json``. A no-op otherwise."""
    spec = os.environ.get("MLFAST_FAULT_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] >= int(nth or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            fault_point(f"write-{path.name}")
        # Atomic on POSIX: a reader (or a resume after a crash or Ctrl-C) sees the old file or the
        # new one, never half of one. No fsync: it doubled the cost of multi-GB table checkpoints,
        # and ext4 flushes a file replaced by rename before the rename itself.
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` with torch.save, atomically."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    _atomic_write(Path(path), lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable mlfast checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an mlfast checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {state.get('version')} is not supported "
                         f"(this mlfast reads version {CHECKPOINT_VERSION})")
    return state


def write_json(path: str | Path, obj: Any) -> None:
    """Strict JSON (NaN / infinity are refused: an undefined metric must be written as null)."""
    data = json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=False).encode() + b"\n"
    _atomic_write(Path(path), lambda f: f.write(data))


def clean_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Remove the temporaries an interrupted atomic write left behind (``.<name>.<random>.tmp``)
    in ``run_dir`` and its sub-directories; returns what was removed."""
    removed = []
    root = Path(run_dir)
    if not root.is_dir():
        return removed
    for f in root.rglob(f".*{TMP_SUFFIX}"):
        if f.is_file() and not f.is_symlink():
            with contextlib.suppress(OSError):
                f.unlink()
                removed.append(f)
    return removed


class CheckpointWriter:
    """Writes checkpoints on a background thread, one at a time, in submission order.

    ``submit(path, state)`` returns at once: ``state`` must already be a snapshot that later training
    steps cannot change (CPU copies). A later submission for the same path replaces a pending one
    not yet started (only the newest state matters). ``flush()`` waits for everything submitted;
    a failed write is raised there (or by the next ``submit``). ``sync=True`` writes inline.
    """

    def __init__(self, sync: bool = False):
        self.sync = sync
        self._pending: dict[Path, dict[str, Any]] = {}
        self._order: list[Path] = []
        self._cv = threading.Condition()
        self._busy = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.seconds_writing = 0.0
        self.seconds_waiting = 0.0
        self.writes = 0

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint failed: {err}") from err

    def submit(self, path: str | Path, state: dict[str, Any]) -> None:
        path = Path(path)
        if self.sync:
            t0 = time.perf_counter()
            save_checkpoint(path, state)
            self.seconds_writing += time.perf_counter() - t0
            self.writes += 1
            return
        with self._cv:
            self._raise()
            if path not in self._pending:
                self._order.append(path)
            self._pending[path] = state
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mlfast-checkpoint-writer", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._order:
                    self._cv.wait()
                path = self._order.pop(0)
                state = self._pending.pop(path)
                self._busy = True
            t0 = time.perf_counter()
            try:
                save_checkpoint(path, state)
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                with self._cv:
                    self._error = exc
            finally:
                with self._cv:
                    self._busy = False
                    self.seconds_writing += time.perf_counter() - t0
                    self.writes += 1
                    self._cv.notify_all()

    def flush(self) -> None:
        t0 = time.perf_counter()
        with self._cv:
            while self._order or self._busy:
                self._cv.wait()
            self.seconds_waiting += time.perf_counter() - t0
            self._raise()


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
