"""The wheel ships everything the package needs at run time: every package, the grammar, kernels, policies, data."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_directory_is_listed() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "sgl_budget").rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
    for mapped in ("sgl_budget.grammar", "sgl_budget.kernels", "sgl_budget.policies"):
        assert mapped in listed and mapped in cfg["package-dir"]


def test_grammar_is_found_through_the_package() -> None:
    from sgl_budget.lang.parser import grammar_text

    assert "policy:" in grammar_text()


def test_wheel_contents(tmp_path) -> None:
    """Build the wheel and check that data files are inside it."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.skip(f"cannot build a wheel here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr, r.stderr  # e.g. a data directory missing from `packages`
    (wheel,) = tmp_path.glob("sgl_budget-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "sgl_budget/grammar/policy.lark" in names
    assert "sgl_budget/kernels/__init__.py" in names
    for p in (ROOT / "policies").glob("*.policy"):
        assert f"sgl_budget/policies/{p.name}" in names
    for sub in ("profiles", "traces"):
        for p in (ROOT / "policies" / sub).glob("*"):
            assert f"sgl_budget/policies/{sub}/{p.name}" in names
    assert any(n.startswith("sgl_budget/replay/") for n in names)
    # CPU serving's sgl_kernel stand-in, and the .pth that makes `sglang serve --help` list the flags
    assert "sgl_budget/engines/sglang/cpu_stand_in/sgl_kernel/__init__.py" in names
    assert "sgl_budget_sglang_serve.pth" in names
    assert any(n.endswith("entry_points.txt") for n in names)
