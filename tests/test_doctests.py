"""Every docstring example in ``mlfast`` and ``kernels`` runs and shows what it says (they had
rotted: two failed before this test existed). Examples read the shared samples by a path relative
to the repository root, so each module's examples run from there."""
from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> list[str]:
    names = []
    for pkg in ("mlfast", "kernels"):
        names.append(pkg)
        for info in pkgutil.walk_packages([str(ROOT / pkg)], prefix=f"{pkg}."):
            if info.name.split(".")[-1] != "__main__":
                names.append(info.name)
    return sorted(names)


def _with_examples() -> list[str]:
    """Modules whose source has an example (cheap to tell without importing them all)."""
    out = []
    for name in _modules():
        parts = name.split(".")
        path = ROOT.joinpath(*parts)
        src = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        if src.is_file() and ">>> " in src.read_text():
            out.append(name)
    return out


@pytest.mark.parametrize("name", _with_examples())
def test_examples_run(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    if name.startswith("kernels") and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton examples use CPU tensors: they run under TRITON_INTERPRET=1")
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, name, module=module) if t.examples]
    assert tests, f"{name} has '>>> ' in its source but no example doctest finds"
    for t in tests:
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
