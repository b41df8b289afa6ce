"""Small helpers the data-file loaders share: safe value descriptions, strict types, bounded JSON parsing.

Every loader (model spec, trace, profile, similarity file) must turn any input into either a
value or its own error type with a clear message: these helpers never raise anything else and
never recurse into user data, so deep nesting or huge numbers cannot escape as tracebacks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from numbers import Integral, Real
from typing import Any

MAX_DEPTH = 32  # no sgl_budget metadata nests deeper than 3; anything deeper is not ours


def describe(v: Any, width: int = 40) -> str:
    """A short, safe rendering of a user value for a message (no recursion, no huge output)."""
    if isinstance(v, bool) or v is None:
        return repr(v)
    if isinstance(v, Integral):
        return repr(int(v)) if abs(int(v)).bit_length() <= 64 else "a huge integer"
    if isinstance(v, (Real, str)):
        r = repr(float(v) if isinstance(v, Real) else v)
        return r if len(r) <= width else r[:width - 4] + "...'"
    if isinstance(v, dict):
        return f"an object with {len(v)} keys"
    if isinstance(v, (list, tuple)):
        return f"a list of {len(v)} items"
    return f"a {type(v).__name__}"


def is_int(v: Any) -> bool:
    """True for real integers (including numpy's), never for bool or float (2.5, 64.0 and true are not counts)."""
    return isinstance(v, Integral) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """True for finite int or float values (not bool, NaN or infinity)."""
    if isinstance(v, bool) or not isinstance(v, Real):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an int beyond float range
        return False


def int_problem(name: str, v: Any, lo: int, hi: int | None = None) -> str | None:
    """Why ``v`` is not an integer in [lo, hi] (None when it is)."""
    if not is_int(v):
        return f"{name} must be an integer, not {describe(v)}"
    if v < lo:
        return f"{name} must be >= {lo}, not {describe(v)}"
    if hi is not None and v > hi:
        return f"{name} must be <= {hi}, not {describe(v)}"
    return None


def missing_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file (None when it can); never raises, even for over-long names."""
    try:
        return None if path.is_file() else "no such file"
    except OSError as e:
        return f"cannot open it ({e.strerror or e})"


def decode_utf8(data: bytes) -> str:
    """``data`` as text; raises ValueError naming the line and byte of the first non-UTF-8 byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"not UTF-8 text (line {line}, byte offset {e.start})") from None


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, walked iteratively (stops early past ``limit``)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_json(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON; any failure (syntax, deep nesting, 5,000-digit numbers, duplicate keys) is a ValueError."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"key {describe(k)} appears twice in one object")
            out[k] = v
        return out

    try:
        value = json.loads(text, object_pairs_hook=no_duplicates)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except ValueError as e:  # e.g. integers over Python's digit limit
        raise ValueError(f"not valid JSON: {str(e)[:120]}") from None
    if _depth(value, max_depth) > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels")
    return value
