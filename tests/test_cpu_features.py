"""CPU feature detection (``mlfast.ops.cpu_features``): /proc/cpuinfo parsing on sample texts, and
this machine's answer against its own /proc/cpuinfo."""
from __future__ import annotations

import os

import pytest

from mlfast.ops import cpu_features as cf

SAPPHIRE_RAPIDS = """\
processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
bugs\t\t: spectre_v1

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu
"""

ZEN3 = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma bmi2
"""

GRAVITON = """\
processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid bf16 i8mm
CPU implementer\t: 0x41
"""


def test_parse_sample_cpuinfo_texts():
    spr = cf.parse_cpuinfo(SAPPHIRE_RAPIDS)
    assert spr == {"model": "Intel(R) Xeon(R) Platinum 8480+", "avx2": True, "avx512f": True,
                   "avx512_bf16": True, "amx_bf16": True, "amx_tile": True}  # first processor's flags
    assert cf.bf16_supported(spr)
    zen = cf.parse_cpuinfo(ZEN3)
    assert zen == {"model": "AMD EPYC 7B13", "avx2": True, "avx512f": False, "avx512_bf16": False,
                   "amx_bf16": False, "amx_tile": False}
    assert not cf.bf16_supported(zen)
    arm = cf.parse_cpuinfo(GRAVITON)  # ARM's bf16 is not an x86 flag: none of ours
    assert arm["model"] == "" and not any(arm[f] for f in cf.FLAGS)
    assert cf.parse_cpuinfo("") == {"model": "", **{f: False for f in cf.FLAGS}}
    # Names are matched whole: "avx512f" is not "avx512fp16", "amx_bf16" is not "amx_bf16x".
    assert not cf.parse_cpuinfo("flags : avx512fp16 amx_bf16x")["avx512f"]
    assert cf.bf16_supported({"avx512_bf16": False, "amx_bf16": True})


def test_this_machine_matches_its_cpuinfo():
    feats = cf.cpu_features()
    assert set(feats) == {"model", *cf.FLAGS}
    assert isinstance(feats["model"], str) and feats["model"]
    assert all(isinstance(feats[f], bool) for f in cf.FLAGS)
    assert cf.bf16_supported() == (feats["avx512_bf16"] or feats["amx_bf16"])
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo")
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    assert {f: feats[f] for f in cf.FLAGS} == {f: f in flags for f in cf.FLAGS}


def test_fallback_without_procfs(monkeypatch):
    """Where /proc/cpuinfo cannot be read, torch's dispatch level gives AVX2 / AVX-512 and the
    BF16 / AMX flags read False."""
    import builtins

    import torch

    real_open = builtins.open

    def no_procfs(path, *a, **k):
        if str(path) == "/proc/cpuinfo":
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_procfs)
    cf.cpu_features.cache_clear()
    try:
        feats = cf.cpu_features()
    finally:
        cf.cpu_features.cache_clear()
    level = torch.backends.cpu.get_cpu_capability()
    assert feats["avx512f"] == (level == "AVX512")
    assert feats["avx2"] == (level in ("AVX2", "AVX512"))
    assert not (feats["avx512_bf16"] or feats["amx_bf16"] or feats["amx_tile"])
    assert feats["model"]
