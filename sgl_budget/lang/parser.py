"""Parse policy text with the Lark grammar into the typed AST; syntax errors become PolicyError.

The grammar ships as ``sgl_budget.grammar/policy.lark`` (``grammar/`` in a
checkout) and is loaded through importlib.resources, so an installed wheel
finds it too.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from functools import lru_cache
from importlib.resources import files

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from ..errors import Diagnostic, LineIndex, PolicyError, SourceSpan, printable
from .ast import Block, Cond, LayerItem, LayerOverride, Num, PolicyAst, Setting, Str

# How each terminal is named in "expected ..." messages.
_FRIENDLY = {
    "NUMBER": "a number", "PERCENT": "a percentage like 50%", "STRING": 'a quoted string like "file"',
    "PHASE": "prefill or decode", "QUANTITY": "batch or tokens", "CMP": "a comparison (>=, <=, ==, >, <)",
    "$END": "end of file",
}
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@lru_cache(maxsize=1)
def grammar_text() -> str:
    return files("sgl_budget.grammar").joinpath("policy.lark").read_text()


@lru_cache(maxsize=1)
def _parser() -> Lark:
    """The LALR parser. Lark's regex-collision analysis (interegular) only warns and costs ~1 s per start,
    so it is skipped here: the grammar's terminals are fixed and tested, and `check` must answer fast."""
    import lark.lexer

    saved = getattr(lark.lexer, "has_interegular", False)
    lark.lexer.has_interegular = False
    try:
        return Lark(grammar_text(), parser="lalr", propagate_positions=True, maybe_placeholders=False)
    finally:
        lark.lexer.has_interegular = saved


_BLOCKS = {"policy", "layers", "tokens", "reroute", "piggyback"}
_NOT_STATEMENTS = {"when", "item", "layer_stmt", "token_stmt", "reroute_stmt", "pig_stmt"}  # `;` placeholders
_WORDCH = re.compile(r"[A-Za-z0-9_]")


def _terminal_text(name: str) -> str:
    if name in _FRIENDLY:
        return _FRIENDLY[name]
    for t in _parser().terminals:
        if t.name == name:
            return f"'{t.pattern.value}'" if t.pattern.type == "str" else name.lower()
    return name.lower()


def _keywords(names: set[str]) -> list[str]:
    """Literal words among the acceptable terminals (for 'did you mean')."""
    out = []
    for t in _parser().terminals:
        if t.name in names and t.pattern.type == "str" and _WORD.fullmatch(t.pattern.value):
            out.append(t.pattern.value)
    if "PHASE" in names:
        out += ["prefill", "decode"]
    if "QUANTITY" in names:
        out += ["batch", "tokens"]
    return sorted(set(out))


def _expected(names: set[str]) -> str:
    shown = sorted({_terminal_text(n) for n in names if n not in ("SEMICOLON",)})
    if len(shown) > 8:
        shown = shown[:8] + ["..."]
    return ", ".join(shown)


class _ToAst(Transformer):
    """Lark tree -> AST nodes (positions become SourceSpans)."""

    def __init__(self, file: str, text: str) -> None:
        super().__init__()
        self.file, self.text = file, text

    def _span(self, meta_or_tok) -> SourceSpan:
        line, col = meta_or_tok.line, meta_or_tok.column
        end_line, end_col = getattr(meta_or_tok, "end_line", line), getattr(meta_or_tok, "end_column", col + 1)
        width = (end_col - col) if end_line == line and end_col else 1
        return SourceSpan.at(self.file, self.text, line, col, width)

    # -- leaves ---------------------------------------------------------------
    def number(self, items):
        (tok,) = items
        return Num(float(tok), str(tok), self._span(tok))

    def _pct(self, tok: Token) -> Num:
        return Num(float(str(tok)[:-1]), str(tok), self._span(tok))

    def _str(self, tok: Token) -> Str:
        value = str(tok)[1:-1]
        for i, ch in enumerate(value):
            if unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cn"):
                name = unicodedata.name(ch, f"U+{ord(ch):04X}")
                span = SourceSpan.at(self.file, self.text, tok.line, tok.column + 1 + i)
                raise PolicyError(f"invisible or control character {printable(ch)} ({name}) in a string", span,
                                  "strings (names, file paths) may hold printable characters only")
        return Str(value, self._span(tok))

    # -- conditions -----------------------------------------------------------
    def cond_phase(self, items):
        (tok,) = items
        return Cond(span=self._span(tok), phase=str(tok))

    def cond_cmp(self, items):
        q, op, num = items
        span = SourceSpan.at(self.file, self.text, q.line, q.column,
                             num.span.column + num.span.width - q.column)
        return Cond(span=span, quantity=str(q), op=str(op), value=num)

    def when(self, items):
        return tuple(items)

    # -- statements -----------------------------------------------------------
    @v_args(meta=True)
    def _setting(self, key, meta, items):
        value = items[0] if items else None
        return Setting(key, value, self._span(meta))

    def k_default(self, meta, items): return self._setting("k=", meta, items)
    def k_min(self, meta, items): return self._setting("k>=", meta, items)
    def k_max(self, meta, items): return self._setting("k<=", meta, items)
    def alloc_uniform(self, meta, items): return self._setting("allocate uniform", meta, items)
    def realloc(self, meta, items): return self._setting("reallocate by score", meta, items)
    def min_k(self, meta, items): return self._setting("min_k", meta, items)
    def top_p(self, meta, items): return self._setting("top_p", meta, items)
    def min_p(self, meta, items): return self._setting("min_p", meta, items)
    def max_k(self, meta, items): return self._setting("max_k", meta, items)
    def pig_max_k(self, meta, items): return self._setting("max_k", meta, items)
    def min_score(self, meta, items): return self._setting("min_score", meta, items)
    def min_similarity(self, meta, items): return self._setting("min_similarity", meta, items)
    def preserve(self, meta, items): return self._setting("preserve critical", meta, items)
    def primary_top(self, meta, items): return self._setting("primary top", meta, items)
    def primary_count(self, meta, items): return self._setting("primary count", meta, items)

    for _name in ("k_default", "k_min", "k_max", "alloc_uniform", "realloc", "min_k", "max_k", "pig_max_k", "top_p",
                  "min_p",
                  "min_score", "min_similarity", "preserve", "primary_top", "primary_count"):
        locals()[_name] = v_args(meta=True)(locals()[_name])
    del _name

    @v_args(meta=True)
    def alloc_dp(self, meta, items):
        return Setting("allocate dp", self._str(items[0]), self._span(meta))

    @v_args(meta=True)
    def top_p_calibrated(self, meta, items):
        return Setting("top_p calibrated", self._str(items[0]), self._span(meta))

    @v_args(meta=True)
    def min_p_calibrated(self, meta, items):
        return Setting("min_p calibrated", self._str(items[0]), self._span(meta))

    def tok_top_p(self, items):
        return ("top_p", items[0])

    def tok_min_p(self, items):
        return ("min_p", items[0])

    @v_args(meta=True)
    def tok_layer(self, meta, items):
        sel, (rule, value) = items
        span = self._span(meta)
        return Setting("layer", value, span, extra=LayerOverride(sel, value, span, rule=rule))

    @v_args(meta=True)
    def similarity(self, meta, items):
        return Setting("similarity", self._str(items[0]), self._span(meta))

    @v_args(meta=True)
    def primary_coverage(self, meta, items):
        return Setting("primary coverage", self._pct(items[0]), self._span(meta))

    @v_args(meta=True)
    def layer_one(self, meta, items):
        return LayerItem(items[0], None, self._span(meta))

    @v_args(meta=True)
    def layer_range(self, meta, items):
        return LayerItem(items[0], items[1], self._span(meta))

    def layer_set(self, items):
        return tuple(items)

    @v_args(meta=True)
    def layer_override(self, meta, items):
        sel, k = items
        span = self._span(meta)
        return Setting("layer", k, span, extra=LayerOverride(sel, k, span))

    # -- blocks ---------------------------------------------------------------
    def pct(self, items):
        return ("pct", self._pct(items[0]))

    def abs(self, items):
        return ("abs", items[0])

    def _block(self, kind, meta, items):
        kw_span = SourceSpan.at(self.file, self.text, meta.line, meta.column, len(kind))
        when = next((i for i in items if isinstance(i, tuple)), ())
        settings = tuple(i for i in items if isinstance(i, Setting))
        return Block(kind=kind, when=when, settings=settings, span=kw_span)

    @v_args(meta=True)
    def budget(self, meta, items):
        (kind, num), rest = items[0], items[1:]
        kw_span = SourceSpan.at(self.file, self.text, meta.line, meta.column, len("budget"))
        when = next((i for i in rest if isinstance(i, tuple)), ())
        return Block(kind="budget", when=when, settings=(Setting("budget", num, num.span),), span=kw_span,
                     percent=kind == "pct")

    @v_args(meta=True)
    def layers(self, meta, items): return self._block("layers", meta, items)

    @v_args(meta=True)
    def tokens(self, meta, items): return self._block("tokens", meta, items)

    @v_args(meta=True)
    def reroute(self, meta, items): return self._block("reroute", meta, items)

    @v_args(meta=True)
    def piggyback(self, meta, items): return self._block("piggyback", meta, items)

    def policy(self, items):
        name, *rest = items
        blocks = tuple(i for i in rest if isinstance(i, Block))
        return PolicyAst(name=self._str(name), blocks=blocks, file=self.file, text=self.text)

    def start(self, items):
        return items[0]

    def __default__(self, data, children, meta):  # ';' placeholders
        return None


def _syntax_error(e: UnexpectedInput, file: str, text: str) -> PolicyError:
    """Turn a Lark error into a PolicyError with a useful message and hint."""
    line, col = max(1, e.line or 1), max(1, e.column or 1)
    if isinstance(e, UnexpectedCharacters):
        lines = text.split("\n")
        src = lines[line - 1] if 0 < line <= len(lines) else ""
        start = min(col - 1, len(src))
        while start > 0 and (src[start - 1].isalnum() or src[start - 1] == "_") and (
                src[start:start + 1].isalnum() or src[start:start + 1] == "_"):
            start -= 1  # a keyword matched a prefix of a longer word ("dpp"): report the whole word
        rest = src[start:]
        word = _WORD.match(rest)
        allowed = set(e.allowed or ())
        if word:
            w = word.group(0)
            span = SourceSpan.at(file, text, line, start + 1, len(w))
            pool = _keywords(allowed) if start == col - 1 else []
            close = difflib.get_close_matches(w, pool or _all_keywords(), n=1, cutoff=0.6)
            if close:
                return PolicyError(f"unknown keyword '{w}'", span, f"did you mean '{close[0]}'?")
            if pool or start != col - 1:
                return PolicyError(f"unknown keyword '{w}'", span, f"expected {_expected(allowed)}")
            return PolicyError(f"unexpected '{w}'", span, f"expected {_expected(allowed)}")
        ch = rest[:1] or "?"
        span = SourceSpan.at(file, text, line, col)
        if ord(ch) > 127 or not ch.isprintable():
            what = "non-ASCII digit" if ch.isdigit() else "non-ASCII character" if ord(ch) > 127 else "control character"
            name = unicodedata.name(ch, f"U+{ord(ch):04X}")
            return PolicyError(f"{what} {printable(ch)!s} ({name}) outside a string", span,
                               "numbers use the ASCII digits 0-9; keywords are ASCII" if ch.isdigit()
                               else "only ASCII text is allowed outside strings and comments")
        if ch == '"':
            return PolicyError("unterminated string", span, 'close the string with " on the same line')
        if ch == "%":
            return PolicyError("a percentage is not allowed here", span,
                               "write a plain number here (only budget and primary coverage take percentages)")
        return PolicyError(f"unexpected character '{ch}'", span,
                           f"expected {_expected(allowed)}" if allowed else "remove it")
    if isinstance(e, UnexpectedToken):
        try:
            allowed = set(e.interactive_parser.accepts())
        except Exception:  # pragma: no cover - accepts() needs the LALR state
            allowed = set(e.expected or ())
        tok = e.token
        if tok.type == "$END":
            if "RBRACE" in allowed:
                hint = "a block or the policy is missing its closing '}'"
            elif "POLICY" in allowed:
                hint = 'a policy file holds one `policy "name" { ... }`'
            else:
                hint = "the file ends in the middle of a statement"
            lines = text.split("\n")
            last = len(lines)
            return PolicyError(f"unexpected end of file; expected {_expected(allowed)}",
                               SourceSpan.at(file, text, last, len(lines[-1]) + 1), hint)
        shown = str(tok)
        hint = f"expected {_expected(allowed)}"
        if tok.type in ("NUMBER", "PERCENT") and "PERCENT" in allowed and "NUMBER" not in allowed:
            hint = "write a percentage here, e.g. 60%"
        elif tok.type == "PERCENT" and "NUMBER" in allowed:
            hint = "a plain number is expected here, not a percentage"
        close = difflib.get_close_matches(shown, _keywords(allowed), n=1, cutoff=0.6) if _WORD.fullmatch(shown) else []
        if close:
            hint = f"did you mean '{close[0]}'?"
        return PolicyError(f"unexpected '{shown}'", SourceSpan.at(file, text, tok.line, tok.column, len(shown)), hint)
    if isinstance(e, UnexpectedEOF):  # pragma: no cover - LALR reports $END as UnexpectedToken
        return PolicyError("unexpected end of file", SourceSpan.at(file, text, line, col))
    return PolicyError(str(e).splitlines()[0], SourceSpan.at(file, text, line, col))


@lru_cache(maxsize=1)
def _all_keywords() -> list[str]:
    return _keywords({t.name for t in _parser().terminals} | {"PHASE", "QUANTITY"})


def _check_separators(tree: Tree, file: str, text: str) -> list[Diagnostic]:
    """Two statements on one line need a `;` between them (the grammar ignores newlines)."""
    out: list[Diagnostic] = []
    for node in tree.iter_subtrees():
        if node.data not in _BLOCKS:
            continue
        stmts = [c for c in node.children if isinstance(c, Tree) and c.data not in _NOT_STATEMENTS and not c.meta.empty]
        for a, b in zip(stmts, stmts[1:]):
            gap = text[a.meta.end_pos:b.meta.start_pos]
            if "\n" in gap or ";" in gap or text[a.meta.end_pos - 1:a.meta.end_pos] in ("}", ";"):
                continue
            span = SourceSpan.at(file, text, b.meta.line, b.meta.column, b.meta.end_column - b.meta.column
                                 if b.meta.end_line == b.meta.line else 1)
            out.append(Diagnostic("two statements on one line without `;`", span,
                                  "statements end at a newline or `;`: add `;` before this one or start a new line",
                                  file))
    return out


def _check_glue(tokens: list[Token], file: str, text: str) -> list[Diagnostic]:
    """Keywords, numbers and words must be separated (``budget50%``, ``allocateuniform`` are errors)."""
    out: list[Diagnostic] = []
    for a, b in zip(tokens, tokens[1:]):
        if a.end_pos != b.start_pos or not (_WORDCH.match(str(a)[-1:]) and _WORDCH.match(str(b)[:1])):
            continue
        span = SourceSpan.at(file, text, b.line, b.column, len(str(b)))
        out.append(Diagnostic(f"'{a}' and '{b}' are glued together", span,
                              f"separate them with a space: `{a} {b}`", file))
    return out


def parse_policy(text: str, file: str = "<policy>") -> PolicyAst:
    """Parse policy source into its AST; raises :class:`PolicyError` on any syntax error (all glue and
    separator problems at once)."""
    if "\x00" in text:
        line, col = LineIndex.of(text).position(text.index("\x00"))
        raise PolicyError("NUL byte in policy text", SourceSpan.at(file, text, line, col), "is this a text file?")
    try:
        ip = _parser().parse_interactive(text)
        tokens = list(ip.iter_parse())  # every token, anonymous keywords included (for the glue check)
        tree: Tree = ip.feed_eof()
    except UnexpectedInput:
        try:  # the plain parse reports errors with the positions the messages are written for
            _parser().parse(text)
        except UnexpectedInput as e:
            raise _syntax_error(e, file, text) from None
        raise  # pragma: no cover - both parsers accept the same language
    problems = _check_glue(tokens, file, text) + _check_separators(tree, file, text)
    if problems:
        raise PolicyError.of(problems)
    try:
        return _ToAst(file, text).transform(tree)
    except VisitError as e:  # transformer errors surface as PolicyError, not tracebacks
        if isinstance(e.orig_exc, PolicyError):
            raise e.orig_exc from None
        raise PolicyError(f"internal error while reading the policy: {e.orig_exc}", file=file) from None
