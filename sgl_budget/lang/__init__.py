"""The policy language: grammar -> AST (parser) -> IR resolved against a model spec (resolve)."""

from __future__ import annotations

from pathlib import Path

from ..errors import PolicyError
from ..spec import ModelSpec, load_spec
from .ast import PolicyAst
from .ir import PolicyIR, RouteContext
from .parser import parse_policy
from .resolve import resolve

__all__ = ["PolicyAst", "PolicyError", "PolicyIR", "RouteContext", "compile_policy", "load_policy",
           "parse_policy", "resolve"]


def compile_policy(text: str, spec: ModelSpec | str, file: str = "<policy>",
                   base_dir: str | Path = ".") -> PolicyIR:
    """Parse and resolve policy source against a model spec (preset name, config.json or ModelSpec)."""
    spec = spec if isinstance(spec, ModelSpec) else load_spec(spec)
    return resolve(parse_policy(text, file), spec, base_dir)


def load_policy(path: str | Path, spec: ModelSpec | str) -> PolicyIR:
    """Read, parse and resolve a ``.policy`` file; relative file names in it resolve from its directory."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(f"no such policy file: {p}", file=str(p), hint="check the path") from None
    except IsADirectoryError:
        raise PolicyError(f"{p} is a directory, not a policy file", file=str(p)) from None
    except UnicodeDecodeError as e:
        raise PolicyError(f"policy file is not UTF-8 text ({e.reason} at byte {e.start})", file=str(p)) from None
    return compile_policy(text, spec, file=str(p), base_dir=p.parent)
