"""PolicyError: one compiler-style diagnostic (file:line:col, source line, caret, hint).

Every problem with a policy — syntax, unknown keyword, out-of-range number,
a layer the model lacks, a bad profile or similarity file — is reported as a
PolicyError pointing at the place in the policy source that caused it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceSpan:
    """A place in a source file: 1-based line and column, and how many columns it covers."""

    file: str
    line: int
    column: int
    width: int = 1
    source_line: str = ""

    @classmethod
    def at(cls, file: str, text: str, line: int, column: int, width: int = 1) -> "SourceSpan":
        """Span for (line, column) in ``text``, with the source line filled in."""
        lines = text.split("\n")  # the parser counts only \n as a line break (not \x1e, \u2028...)
        src = lines[line - 1].rstrip("\r") if 1 <= line <= len(lines) else ""
        return cls(file=file, line=line, column=max(1, column), width=max(1, width), source_line=src)


class PolicyError(Exception):
    """A bad policy (or a bad file a policy names). ``str(e)`` is the full diagnostic."""

    def __init__(self, message: str, span: SourceSpan | None = None, hint: str | None = None,
                 file: str | None = None) -> None:
        self.message = message
        self.span = span
        self.hint = hint
        self.file = span.file if span else file
        super().__init__(self.format())

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def column(self) -> int | None:
        return self.span.column if self.span else None

    def format(self) -> str:
        """rustc/clang-style text: location, message, source line, caret, help."""
        if self.span is None:
            head = f"{self.file}: error: {self.message}" if self.file else f"error: {self.message}"
            return head + (f"\n  = help: {self.hint}" if self.hint else "")
        s = self.span
        gutter = str(s.line)
        pad = " " * len(gutter)
        src = s.source_line.replace("\t", " ")
        width = max(1, min(s.width, max(1, len(src) - s.column + 1)))
        caret = " " * (s.column - 1) + "^" + "~" * (width - 1)
        out = [
            f"{s.file}:{s.line}:{s.column}: error: {self.message}",
            f"{pad} |",
            f"{gutter} | {src}",
            f"{pad} | {caret}",
        ]
        if self.hint:
            out.append(f"{pad} = help: {self.hint}")
        return "\n".join(out)
