"""pytest plugin (``pytest11`` entry point ``sgl_budget``): fixtures for unit-testing policies.

* ``load_trace(path=None)`` — a trace file (default: the bundled demo trace);
* ``compile_policy(policy, spec)`` — a ``.policy`` path, a bundled policy name, or policy text;
* ``replay_policy(ir, trace, batch_size=16, phase="decode")`` — a :class:`PolicyCheck` for the
  assertion helpers in :mod:`sgl_budget.testing`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest


def bundled_policy_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("sgl_budget.policies")))


@pytest.fixture
def load_trace() -> Callable:
    from ..traces import load_trace as _load

    def load(path: str | Path | None = None):
        if path is None:
            from ..cli import DEMO_TRACE

            path = bundled_policy_dir() / "traces" / DEMO_TRACE
        return _load(path)

    return load


@pytest.fixture
def compile_policy() -> Callable:
    from ..lang import compile_policy as _compile
    from ..lang import load_policy

    def compile_(policy: str | Path, spec):
        p = Path(policy)
        if str(policy).endswith(".policy") or p.is_file():
            if not p.is_file() and (bundled_policy_dir() / p.name).is_file():
                p = bundled_policy_dir() / p.name  # a bundled policy by file name
            return load_policy(p, spec)
        return _compile(str(policy), spec)

    return compile_


@pytest.fixture
def replay_policy() -> Callable:
    from . import check_policy

    return check_policy
