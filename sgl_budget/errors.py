"""PolicyError: compiler-style diagnostics (file:line:col, source line, caret, hint), one or many.

Every problem with a policy — syntax, unknown keyword, out-of-range number,
a layer the model lacks, a bad profile or similarity file — is reported as a
:class:`Diagnostic` pointing at the place in the policy source that caused it.
A :class:`PolicyError` carries every independent diagnostic of a file, sorted by
position; its ``message``/``span``/``hint`` are the first one's, so callers that
handle a single error keep working.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable


@dataclass(frozen=True)
class LineIndex:
    """Line-start offsets of a text, so line lookups are O(log n) instead of re-splitting (near-linear checks)."""

    text: str
    starts: tuple[int, ...]

    @classmethod
    def of(cls, text: str) -> "LineIndex":
        starts = [0]
        i = text.find("\n")
        while i >= 0:
            starts.append(i + 1)
            i = text.find("\n", i + 1)
        return cls(text, tuple(starts))

    def line(self, n: int) -> str:
        """The 1-based line ``n`` without its newline ('' when out of range)."""
        if not 1 <= n <= len(self.starts):
            return ""
        end = self.starts[n] - 1 if n < len(self.starts) else len(self.text)
        return self.text[self.starts[n - 1]:end]

    def position(self, offset: int) -> tuple[int, int]:
        """1-based (line, column) of a character offset."""
        i = bisect.bisect_right(self.starts, offset) - 1
        return i + 1, offset - self.starts[i] + 1

    @property
    def num_lines(self) -> int:
        return len(self.starts)


_INDEX_CACHE: dict[int, LineIndex] = {}


def _index(text: str) -> LineIndex:
    """The cached line index of ``text`` (keyed by identity: one parse reuses one index)."""
    got = _INDEX_CACHE.get(id(text))
    if got is None or got.text is not text:
        if len(_INDEX_CACHE) > 8:
            _INDEX_CACHE.clear()
        got = _INDEX_CACHE[id(text)] = LineIndex.of(text)
    return got


def printable(s: str) -> str:
    """``s`` with control, bidi and other invisible characters escaped, so no terminal escape reaches the user."""
    out = []
    for ch in s:
        o = ord(ch)
        if ch == "\t" or (0x20 <= o < 0x7F) or (o >= 0xA0 and ch.isprintable() and not _is_bidi(o)):
            out.append(ch)
        else:
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
    return "".join(out)


def _is_bidi(o: int) -> bool:
    return 0x202A <= o <= 0x202E or 0x2066 <= o <= 0x2069 or o in (0x200E, 0x200F, 0x061C)


@dataclass(frozen=True)
class SourceSpan:
    """A place in a source file: 1-based line and column, and how many columns it covers.

    The source line is looked up only when a diagnostic is printed (``text_line``), so
    building a span is O(log n) however long the line: checking stays near-linear.
    """

    file: str
    line: int
    column: int
    width: int = 1
    source_line: str = ""
    index: LineIndex | None = field(default=None, compare=False, repr=False)

    @classmethod
    def at(cls, file: str, text: str, line: int, column: int, width: int = 1) -> "SourceSpan":
        """Span for (line, column) in ``text`` (the parser counts only \\n as a line break)."""
        return cls(file=file, line=line, column=max(1, column), width=max(1, width), index=_index(text))

    @property
    def text_line(self) -> str:
        """The source line the span points into."""
        if self.source_line or self.index is None:
            return self.source_line
        return self.index.line(self.line).rstrip("\r")


@dataclass(frozen=True)
class Diagnostic:
    """One error: message, where (may be None for whole-file problems), and how to fix it."""

    message: str
    span: SourceSpan | None = None
    hint: str | None = None
    file: str | None = None

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def column(self) -> int | None:
        return self.span.column if self.span else None

    @property
    def where(self) -> str | None:
        return self.span.file if self.span else self.file

    def sort_key(self) -> tuple[int, int]:
        return (self.line or 0, self.column or 0)

    def format(self) -> str:
        """rustc/clang-style text: location, message, source line, caret, help (control characters escaped)."""
        msg, hint = printable(self.message), printable(self.hint) if self.hint else None
        if self.span is None:
            head = f"{printable(self.file)}: error: {msg}" if self.file else f"error: {msg}"
            return head + (f"\n  = help: {hint}" if hint else "")
        s = self.span
        gutter = str(s.line)
        pad = " " * len(gutter)
        raw = s.text_line.replace("\t", " ")
        src = printable(raw)
        col = len(printable(raw[: s.column - 1])) + 1  # escapes widen the line: move the caret with them
        width = max(1, min(s.width, max(1, len(src) - col + 1)))
        caret = " " * (col - 1) + "^" + "~" * (width - 1)
        out = [f"{printable(s.file)}:{s.line}:{s.column}: error: {msg}", f"{pad} |", f"{gutter} | {src}",
               f"{pad} | {caret}"]
        if hint:
            out.append(f"{pad} = help: {hint}")
        return "\n".join(out)

    def gcc(self) -> str:
        """One line for editors: ``file:line:col: error: msg`` (hint appended in brackets)."""
        where = printable(self.where or "<policy>")
        if self.span is not None:
            where += f":{self.span.line}:{self.span.column}"
        hint = f" [help: {printable(self.hint)}]" if self.hint else ""
        return f"{where}: error: {printable(self.message)}{hint}"

    def to_dict(self) -> dict:
        return {"file": self.where, "line": self.line, "column": self.column, "message": self.message,
                "hint": self.hint}


class PolicyError(Exception):
    """A bad policy (or a bad file a policy names). ``str(e)`` is the full diagnostic text of every error."""

    def __init__(self, message: str, span: SourceSpan | None = None, hint: str | None = None,
                 file: str | None = None, diagnostics: Iterable[Diagnostic] | None = None) -> None:
        diags = sorted(diagnostics, key=Diagnostic.sort_key) if diagnostics else [
            Diagnostic(message, span, hint, span.file if span else file)]
        self.diagnostics: list[Diagnostic] = diags
        first = diags[0]
        self.message, self.span, self.hint = first.message, first.span, first.hint
        self.file = first.where
        super().__init__(self.format())

    @classmethod
    def of(cls, diagnostics: Iterable[Diagnostic]) -> "PolicyError":
        """One error carrying several diagnostics (sorted by position)."""
        d = list(diagnostics)
        return cls(d[0].message, diagnostics=d)

    @property
    def line(self) -> int | None:
        return self.diagnostics[0].line

    @property
    def column(self) -> int | None:
        return self.diagnostics[0].column

    def format(self) -> str:
        """Every diagnostic rustc-style, then ``N errors`` when there is more than one."""
        parts = [d.format() for d in self.diagnostics]
        if len(parts) > 1:
            parts.append(f"error: aborting due to {len(parts)} errors")
        return "\n\n".join(parts)

    def gcc(self) -> str:
        return "\n".join(d.gcc() for d in self.diagnostics)

    def to_list(self) -> list[dict]:
        return [d.to_dict() for d in self.diagnostics]
