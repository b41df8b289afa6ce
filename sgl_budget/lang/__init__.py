"""The policy language: grammar -> AST (parser) -> IR resolved against a model spec (resolve)."""

from __future__ import annotations

from pathlib import Path

from ..errors import PolicyError, SourceSpan
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
        data = p.read_bytes()
    except FileNotFoundError:
        raise PolicyError(f"no such policy file: {p}", file=str(p), hint="check the path") from None
    except IsADirectoryError:
        raise PolicyError(f"{p} is a directory, not a policy file", file=str(p)) from None
    except OSError as e:
        raise PolicyError(f"cannot read policy file: {e.strerror or e}", file=str(p), hint="check the path") from None
    return compile_policy(decode_policy(data, str(p)), spec, file=str(p), base_dir=p.parent)


def decode_policy(data: bytes, file: str) -> str:
    """UTF-8 policy text; a bad byte is an error at its line:column (not just a byte offset)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        shown = data[line_start:e.start].decode("utf-8", "replace")
        end = data.find(b"\n", e.start)
        src = data[line_start:end if end >= 0 else len(data)].decode("utf-8", "backslashreplace")
        span = SourceSpan(file, line, len(shown) + 1, 1, src)
        raise PolicyError(f"policy file is not UTF-8 text ({e.reason}: byte 0x{data[e.start]:02x} at byte {e.start})",
                          span, "save the file as UTF-8") from None
