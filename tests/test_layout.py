"""The architecture the README describes: imports point downwards only, the public names resolve,
and CI runs the README's two commands literally."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def loaded_after(module: str) -> set[str]:
    """The mlfast modules a fresh interpreter has loaded after ``import module``."""
    code = f"import sys, json, {module}; print(json.dumps(sorted(m for m in sys.modules if m.startswith('mlfast'))))"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def within(mods: set[str], *packages: str) -> set[str]:
    return {m for m in mods if any(m == p or m.startswith(p + ".") for p in packages)}


@pytest.mark.parametrize("module, forbidden", [
    ("mlfast.kernels", ("mlfast.models", "mlfast.train", "mlfast.ops", "mlfast.io", "mlfast.api")),
    ("mlfast.kernels.sparse_update", ("mlfast.models", "mlfast.train", "mlfast.ops", "mlfast.io")),
    ("mlfast.io.reader", ("mlfast.models", "mlfast.train", "mlfast.ops", "mlfast.kernels")),
    ("mlfast.ops.embedding", ("mlfast.models", "mlfast.train", "mlfast.io")),
    ("mlfast.models", ("mlfast.train", "mlfast.io", "mlfast.kernels", "mlfast.api")),
    ("mlfast.train.trainer", ("mlfast.api", "mlfast.cli", "mlfast.study", "mlfast.kernels")),
])
def test_imports_point_downwards(module, forbidden):
    assert not within(loaded_after(module), *forbidden)


def test_public_names_resolve():
    import mlfast

    for name in mlfast.__all__:
        assert getattr(mlfast, name) is not None, name


def test_ci_runs_the_readme_commands_literally():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)
    assert len(commands) == 2 and commands[0].endswith("mlfast train") and commands[1].endswith("pytest -q")
    for c in commands:
        assert f'"{c}"' in ci, f"not run literally by .ci/run: {c}"
