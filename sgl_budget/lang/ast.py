"""The typed syntax tree of a policy file, exactly as written (nothing resolved yet).

The parser builds it; :mod:`sgl_budget.lang.resolve` checks it against a model
spec and turns it into the IR. Every node keeps its :class:`SourceSpan` so any
later error can point at the text that caused it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Union

from ..errors import SourceSpan

BlockKind = Literal["budget", "layers", "tokens", "reroute", "piggyback"]
BLOCK_KINDS: tuple[BlockKind, ...] = ("budget", "layers", "tokens", "reroute", "piggyback")


@dataclass(frozen=True)
class Num:
    """A number literal: its value, its text (to tell 3 from 3.0) and where it is."""

    value: float
    text: str
    span: SourceSpan

    @property
    def is_integer(self) -> bool:
        return math.isfinite(self.value) and not any(c in self.text for c in ".eE") and self.value == int(self.value)


@dataclass(frozen=True)
class Str:
    """A quoted string literal (quotes removed)."""

    value: str
    span: SourceSpan


@dataclass(frozen=True)
class Cond:
    """One condition term: ``decode`` / ``prefill``, or ``batch|tokens <op> N``."""

    span: SourceSpan
    phase: str | None = None
    quantity: str | None = None  # "batch" | "tokens"
    op: str | None = None
    value: Num | None = None


@dataclass(frozen=True)
class LayerItem:
    """``N`` or ``lo..hi`` in a ``layer`` override."""

    lo: Num
    hi: Num | None
    span: SourceSpan


@dataclass(frozen=True)
class LayerOverride:
    """``layer 0..1, 5: k = 6``."""

    items: tuple[LayerItem, ...]
    k: Num  # the value: a layer's k, or its confidence threshold (``rule``)
    span: SourceSpan
    rule: str = "k"  # "k" (layers block) | "top_p" | "min_p" (tokens block)


Value = Union[Num, Str, None]


@dataclass(frozen=True)
class Setting:
    """One statement of a block: a key (``min_k``, ``k>=``, ``allocate dp``...) and its value."""

    key: str
    value: Value
    span: SourceSpan
    extra: LayerOverride | None = None  # only for key == "layer"


@dataclass(frozen=True)
class Block:
    """A ``budget`` statement or a ``layers/tokens/reroute/piggyback`` block."""

    kind: BlockKind
    when: tuple[Cond, ...]
    settings: tuple[Setting, ...]
    span: SourceSpan  # the block's keyword
    percent: bool = False  # budget only: written as a percentage of top-k

    def get(self, key: str) -> Setting | None:
        for s in self.settings:
            if s.key == key:
                return s
        return None


@dataclass(frozen=True)
class PolicyAst:
    """A whole policy file."""

    name: Str
    blocks: tuple[Block, ...] = field(default=())
    file: str = "<policy>"
    text: str = ""

    def of(self, kind: BlockKind) -> list[Block]:
        return [b for b in self.blocks if b.kind == kind]
