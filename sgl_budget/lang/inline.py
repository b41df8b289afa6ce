"""Policy text that arrives in a request (a server's calibration mode): compiled against the served model, naming
only files the server already loaded at launch.

A request can never make the server open a path it sends: :func:`launch_files` lists the data files
(similarity tables, Alloc-L profiles, calibration traces) the launch's own policies name, and :func:`compile_request_policy`
resolves a request's text with exactly those (by the name a launch policy gives them, or their absolute path).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from ..spec import ModelSpec
from .ast import Str
from .ir import PolicyIR
from .limits import check_engine
from .parser import parse_policy
from .resolve import resolve

REQUEST_FILE = "<request>"  # the file name diagnostics give policy text from a request
MAX_REQUEST_POLICY_CHARS = 65536  # longer policy text in a request is refused before parsing


def named_files(text: str, file: str) -> list[str]:
    """The file names a policy's text gives (``similarity "..."``, ``allocate dp from "..."``,
    ``top_p calibrated from "..."``)."""
    ast = parse_policy(text, file)
    names = [s.value.value for b in ast.of("reroute") for s in b.settings
             if s.key == "similarity" and isinstance(s.value, Str)]
    names += [s.value.value for b in ast.of("layers") for s in b.settings
              if s.key == "allocate dp" and isinstance(s.value, Str)]
    names += [s.value.value for b in ast.of("tokens") for s in b.settings
              if s.key.endswith(" calibrated") and isinstance(s.value, Str)]
    return names


def launch_files(policy_paths: Iterable[str | Path]) -> dict[str, str]:
    """``{name: absolute path}`` of every data file the launch's policy files name (each by its name as written
    and by its absolute path); the policies are already validated, so each file exists."""
    out: dict[str, str] = {}
    for p in policy_paths:
        path = Path(p).resolve()
        for name in named_files(path.read_text(encoding="utf-8"), str(path)):
            full = str(Path(name) if Path(name).is_absolute() else (path.parent / name).resolve())
            out.setdefault(name, full)  # the first launch policy to name it decides (names are relative)
            out[full] = full
    return out


def compile_request_policy(text: str, spec: ModelSpec, allowed_files: Mapping[str, str],
                           engine: str = "sglang", engine_top_k: int | None = None) -> PolicyIR:
    """Compile policy text sent in a request for ``spec`` and check that ``engine`` can serve it; raises
    :class:`~sgl_budget.errors.PolicyError` (every problem, file ``<request>``)."""
    from ..errors import PolicyError

    if len(text) > MAX_REQUEST_POLICY_CHARS:
        raise PolicyError(f"the request's policy text is {len(text)} characters; at most "
                          f"{MAX_REQUEST_POLICY_CHARS} are accepted", file=REQUEST_FILE,
                          hint="send a shorter policy, or launch the server with it (--moe-named-policy)")
    ast = parse_policy(text, REQUEST_FILE)
    ir = resolve(ast, spec, ".", allowed_files={k: Path(v) for k, v in allowed_files.items()})
    return check_engine(ir, engine, engine_top_k, file=REQUEST_FILE)
