"""Policy mixes: the rows of every batch split between policies in fixed proportions (``eval`` / ``replay --mix``).

Syntax of one mix (``--mix``)::

    PART[,PART...]          PART = [NAME=]POLICY[:FRACTION]   or   stock[:FRACTION]

* ``POLICY`` is a ``.policy`` file; ``NAME`` defaults to the file name without ``.policy``;
  ``stock`` (the model's own routing) needs no file;
* ``FRACTION`` is the share of each batch's rows, in (0, 1]; parts without one share what
  the others leave equally; all shares must sum to 1 (within 1e-6);
* example: ``fast=policies/brown-moe/uniform-25.policy:0.5,stock:0.5``.

Rows are assigned deterministically: row ``b`` of a batch of ``B`` rows goes to the first part
whose cumulative share exceeds ``(b + 0.5) / B`` (parts in the order given; a part whose share
is under half a row of a small batch may get no row of it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..spec import ModelSpec
from .ir import PolicyIR
from .policy_set import NAME_HINT, STOCK, PolicySet, load_policy_set, name_problem

TOLERANCE = 1e-6
MIX_SYNTAX = "[NAME=]POLICY[:FRACTION] or stock[:FRACTION], comma-separated"


class MixError(ValueError):
    """A malformed ``--mix`` (the message says what is wrong and shows the syntax)."""


@dataclass(frozen=True)
class MixPart:
    name: str
    path: str | None  # None: stock
    fraction: float


def _part(text: str) -> tuple[str, str | None, float | None]:
    body, colon, frac_text = text.rpartition(":")
    if not colon:
        body, frac_text = text, ""
    frac = None
    if colon:
        try:
            frac = float(frac_text)
        except ValueError:
            raise MixError(f"bad fraction {frac_text!r} in {text!r} (a number in (0, 1])") from None
        if not 0 < frac <= 1:
            raise MixError(f"the fraction {frac_text} in {text!r} must lie in (0, 1]")
    name, eq, path = body.partition("=")
    name, path = name.strip(), path.strip()
    if not eq:
        if body.strip() == STOCK:
            return STOCK, None, frac
        path = body.strip()
        name = Path(path).name.removesuffix(".policy")
    if not path:
        raise MixError(f"no policy file in {text!r} (expected {MIX_SYNTAX})")
    problem = name_problem(name)
    if problem is not None:
        raise MixError(f"{problem} in {text!r} ({NAME_HINT}; name a file NAME=PATH)")
    return name, path, frac


def parse_mix(text: str) -> tuple[MixPart, ...]:
    """The parts of one mix spec; :class:`MixError` says what is wrong."""
    raw = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in raw):
        raise MixError(f"empty part in mix {text!r} (expected {MIX_SYNTAX})")
    parts = [_part(p) for p in raw]
    names = [n for n, _, _ in parts]
    for n in names:
        if names.count(n) > 1:
            raise MixError(f"the name {n!r} is given twice in mix {text!r} (give each policy its own NAME=)")
    given = sum(f for _, _, f in parts if f is not None)
    rest = [i for i, (_, _, f) in enumerate(parts) if f is None]
    share = (1.0 - given) / len(rest) if rest else 0.0
    if rest and share <= TOLERANCE:
        raise MixError(f"the fractions in mix {text!r} leave nothing for {', '.join(names[i] for i in rest)}")
    out = tuple(MixPart(n, p, share if f is None else f) for n, p, f in parts)
    total = sum(p.fraction for p in out)
    if abs(total - 1.0) > TOLERANCE:
        raise MixError(f"the fractions in mix {text!r} sum to {total:g}, not 1")
    return out


def assign_rows(fractions: Sequence[float], rows: int) -> list[int]:
    """Part index of each of ``rows`` rows: row b -> first part whose cumulative share exceeds (b + 0.5) / rows."""
    out, cum, i = [], 0.0, 0
    bounds = []
    for f in fractions:
        cum += f
        bounds.append(cum)
    bounds[-1] = max(bounds[-1], 1.0 + TOLERANCE)
    for b in range(rows):
        x = (b + 0.5) / rows
        while bounds[i] <= x:
            i += 1
        out.append(i)
    return out


@dataclass(frozen=True)
class PolicyMix:
    """A parsed mix compiled for one model: :attr:`policies` holds its policies, :attr:`ids` each part's id."""

    parts: tuple[MixPart, ...]
    policies: PolicySet
    ids: tuple[int, ...]

    @property
    def label(self) -> str:
        return "mix(" + ",".join(f"{p.name}:{p.fraction:g}" for p in self.parts) + ")"

    def rows(self, n: int) -> list[int]:
        """Policy id (in :attr:`policies`) of each of the ``n`` rows of a batch."""
        return [self.ids[i] for i in assign_rows([p.fraction for p in self.parts], n)]

    def describe(self) -> str:
        return ", ".join(f"{p.name} ({p.path or 'the model own routing'}): {p.fraction:g}" for p in self.parts)


def load_mix(text: str, spec: ModelSpec,
             loader: Callable[[str | Path, ModelSpec], PolicyIR] | None = None) -> PolicyMix:
    """Parse ``text`` and compile its policies against ``spec`` (:class:`MixError` or PolicyError)."""
    parts = parse_mix(text)
    policies = load_policy_set(spec, None, [(p.name, p.path) for p in parts if p.path is not None], loader=loader)
    return PolicyMix(parts, policies, tuple(policies.index(p.name) for p in parts))
