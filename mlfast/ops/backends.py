"""The one dispatch table: which implementation runs each op (lookup, sparse update, mutual loss).

``select_backends(kernels, device, deterministic)`` maps the user's choice (``--kernels``) to one
backend per op:

| ``kernels``  | lookup  | update    | loss      | where                                              |
|--------------|---------|-----------|-----------|----------------------------------------------------|
| ``auto``     | triton  | triton    | triton    | CUDA tensors                                       |
| ``auto``     | torch   | numba     | reference | CPU tensors                                        |
| ``triton``   | triton  | triton    | triton    | CUDA, or CPU under ``TRITON_INTERPRET=1`` (tests)  |
| ``numba``    | torch   | numba     | reference | CPU only                                           |
| ``reference``| torch   | reference | reference | anywhere: plain PyTorch                            |

``deterministic`` selects the Triton update's sorted, bit-reproducible path; otherwise its atomic
path (no sort of the ids; fp32 atomics add in an arbitrary order). The numba and reference updates
are deterministic either way. Triton is imported only when a Triton backend is chosen.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

KERNELS = ("auto", "triton", "numba", "reference")


@dataclass(frozen=True)
class Backends:
    lookup: str  # "triton" | "torch"
    update: str  # "triton" | "numba" | "reference"
    loss: str  # "triton" | "reference"
    deterministic: bool = True

    def to_dict(self) -> dict:
        return {"lookup": self.lookup, "update": self.update, "loss": self.loss, "deterministic": self.deterministic}


def triton_runs_on_cpu() -> bool:
    """Whether Triton kernels can run on CPU tensors in this process (the interpreter is on)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select_backends(kernels: str = "auto", device: str | torch.device = "cpu", deterministic: bool = False) -> Backends:
    """The backends of each op for ``kernels`` on ``device`` (see the module docstring).

    Example::

        >>> select_backends("auto", "cpu")
        Backends(lookup='torch', update='numba', loss='reference', deterministic=False)
    """
    dev = torch.device(device)
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r}: expected one of {', '.join(KERNELS)}")
    if kernels == "auto":
        kernels = "triton" if dev.type == "cuda" else "numba"
    if kernels == "triton":
        if dev.type != "cuda" and not triton_runs_on_cpu():
            raise ValueError("the Triton kernels need a CUDA device, or TRITON_INTERPRET=1 set before Triton is "
                             "first imported to run them on the CPU (slowly, for tests); use --kernels numba")
        return Backends("triton", "triton", "triton", deterministic)
    if kernels == "numba":
        if dev.type != "cpu":
            raise ValueError(f"--kernels numba runs on the CPU, not {dev}")
        return Backends("torch", "numba", "reference", deterministic)
    return Backends("torch", "reference", "reference", deterministic)


def choose_impl(impl: str, env_var: str, impls: tuple[str, ...], what: str) -> str:
    """``impl`` checked against ``impls``; "auto" reads ``env_var`` (default: the first of ``impls``).
    The one switch of mlfast's own ops (dropout, cross network) between their fast path and their
    reference, for A/B runs.

    Example::

        >>> choose_impl("auto", "MLFAST_NO_SUCH_VAR", ("fast", "reference"), "dropout")
        'fast'
    """
    if impl == "auto":
        impl = os.environ.get(env_var, "") or impls[0]
        if impl not in impls:
            raise ValueError(f"environment variable {env_var}={impl!r}: expected one of {', '.join(impls)}")
    elif impl not in impls:
        raise ValueError(f"{what} impl {impl!r}: expected auto, {', '.join(impls)}")
    return impl
