"""What the CPU can do: its model name and the vector / matrix extensions the fast paths care about.

On Linux the answer comes from ``/proc/cpuinfo`` (the kernel's view: a flag the hypervisor hides,
such as AMX in many VMs, is reported absent, which is what matters since the instructions would
fault). Elsewhere it falls back to ``platform.processor()`` and torch's own dispatch level
(``torch.backends.cpu.get_cpu_capability()``), which can tell AVX2 and AVX-512 but not BF16 or AMX,
so those read False there.
"""
from __future__ import annotations

import functools
import platform

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def parse_cpuinfo(text: str) -> dict:
    """``{"model": str, <flag>: bool for each of FLAGS}`` from the text of ``/proc/cpuinfo``.

    Reads the first processor's ``model name`` and ``flags`` lines (x86; "Features" on ARM, which
    has none of these flags). A missing line gives ``model=""`` and every flag False.

    Example::

        >>> parse_cpuinfo("model name\\t: Xeon\\nflags\\t\\t: fpu avx2 avx512f\\n")["avx512f"]
        True
    """
    model, flags = "", set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return {"model": model, **{f: f in flags for f in FLAGS}}


def _fallback() -> dict:
    feats = {"model": platform.processor() or platform.machine(), **{f: False for f in FLAGS}}
    try:
        import torch

        level = torch.backends.cpu.get_cpu_capability()  # "DEFAULT" | "AVX2" | "AVX512" | ...
    except (ImportError, AttributeError, RuntimeError):
        return feats
    feats["avx2"] = level in ("AVX2", "AVX512")
    feats["avx512f"] = level == "AVX512"
    return feats


@functools.lru_cache(maxsize=1)
def cpu_features() -> dict:
    """This machine's ``{"model": str, "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}``
    (bools), read once per process.

    Example::

        >>> sorted(cpu_features())
        ['amx_bf16', 'amx_tile', 'avx2', 'avx512_bf16', 'avx512f', 'model']
    """
    try:
        with open("/proc/cpuinfo") as f:
            feats = parse_cpuinfo(f.read())
    except OSError:
        return _fallback()
    if not feats["model"]:
        feats["model"] = platform.processor() or platform.machine()
    return feats


def bf16_supported(features: dict | None = None) -> bool:
    """Whether the CPU computes in bfloat16 natively (AVX512-BF16 or AMX-BF16), i.e. whether bf16
    autocast on the CPU can be faster than float32 rather than an emulation.

    Example::

        >>> bf16_supported({"avx512_bf16": False, "amx_bf16": True})
        True
    """
    f = cpu_features() if features is None else features
    return bool(f.get("avx512_bf16") or f.get("amx_bf16"))
