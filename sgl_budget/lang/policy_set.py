"""Named policies one server (or one evaluation) routes with; each request picks one by name.

A :class:`PolicySet` is the launch's default policy, the model's own routing
(``stock``, always available) and any number of named extras, each compiled
against the same model spec. A policy's *id* is its index in :attr:`PolicySet.names`;
the engines carry a row -> policy-id map per batch. The name ``default`` always
refers to the policy a request gets when it names none.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import Diagnostic, PolicyError
from ..spec import ModelSpec
from .ir import PolicyIR

REQUEST_KEY = "moe_policy"  # where a request names its policy: custom_params {"moe_policy": NAME}
STOCK = "stock"  # the model's own routing
DEFAULT = "default"  # the launch's --moe-policy file (or stock without one)
RESERVED = (STOCK, DEFAULT)
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}\Z")
NAME_HINT = "a name is 1-64 characters: a letter or _, then letters, digits, _ . -"
STOCK_SOURCE = 'policy "stock" { }\n'


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 64


def shown_name(name) -> str:
    """A requested name as error messages quote it: repr, cut to a readable length (a client may send anything)."""
    return _SHOWN.repr(name)


class UnknownPolicy(ValueError):
    """A request named a policy the server does not serve (the message lists the names it does)."""

    @classmethod
    def of(cls, name, names: Sequence[str]) -> "UnknownPolicy":
        return cls(f"unknown MoE policy {shown_name(name)}: this server serves {', '.join(names)} "
                   f"(choose one with custom_params {{\"{REQUEST_KEY}\": NAME}})")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a policy, or None."""
    if not NAME_RE.match(name):
        return f"invalid policy name {name!r}"
    if name in RESERVED:
        return f"the policy name {name!r} is reserved ({STOCK}: the model's own routing; {DEFAULT}: the --moe-policy file)"
    return None


def request_names(named: Iterable[str]) -> tuple[str, ...]:
    """What a request may ask for in a launch with these named extras, in the order errors list them:
    ``default``, ``stock``, then the named ones."""
    return (DEFAULT, STOCK, *named)


def parse_named(text: str) -> tuple[str, str]:
    """``NAME=PATH`` -> ``(NAME, PATH)``; without ``=`` the path is empty (:func:`load_policy_set` reports it)."""
    name, _, path = text.partition("=")
    return (name.strip(), path.strip()) if path.strip() else (text, "")


def stock_ir(spec: ModelSpec) -> PolicyIR:
    """The model's own routing as a policy (every layer its own top-k, nothing else)."""
    from . import compile_policy

    return compile_policy(STOCK_SOURCE, spec, file="<stock>")


@dataclass(frozen=True)
class PolicySet:
    """Policies by id: ``names[i]`` is compiled as ``irs[i]`` (from ``sources[i]``, None for stock)."""

    names: tuple[str, ...]
    irs: tuple[PolicyIR, ...]
    sources: tuple[str | None, ...]
    default: int

    def __len__(self) -> int:
        return len(self.names)

    @property
    def default_name(self) -> str:
        return self.names[self.default]

    @property
    def request_names(self) -> tuple[str, ...]:
        """What a request may ask for (``default`` included)."""
        return request_names(n for n in self.names if n not in RESERVED)

    def index(self, name: str | None) -> int:
        """The id of the policy ``name`` (None or ``default``: the default); :class:`UnknownPolicy` otherwise."""
        if name is None or name == DEFAULT:
            return self.default
        if isinstance(name, str):
            try:
                return self.names.index(name)
            except ValueError:
                pass
        raise UnknownPolicy.of(name, self.request_names)

    def describe(self) -> str:
        parts = []
        for i, (n, s) in enumerate(zip(self.names, self.sources)):
            parts.append(f"{n}{' (default)' if i == self.default else ''}: {s or 'the model own routing'}")
        return "; ".join(parts)


def load_policy_set(spec: ModelSpec, default_path: str | Path | None = None,
                    named: Sequence[tuple[str, str | Path]] = (),
                    loader: Callable[[str | Path, ModelSpec], PolicyIR] | None = None) -> PolicySet:
    """Compile the default policy (``--moe-policy``), ``stock`` and the named extras against ``spec``.

    Every problem in every file and name is collected into one :class:`PolicyError`: invalid,
    reserved or duplicate names, and each policy's own diagnostics. ``loader`` (default
    :func:`~sgl_budget.lang.load_policy`) lets engines add their own checks per file.
    """
    from . import load_policy

    load = loader or load_policy
    diags: list[Diagnostic] = []
    names: list[str] = []
    irs: list[PolicyIR] = []
    sources: list[str | None] = []

    def add(name: str, path: str | Path) -> None:
        try:
            ir = load(path, spec)
        except PolicyError as e:
            diags.extend(e.diagnostics)
            return
        names.append(name)
        irs.append(ir)
        sources.append(str(path))

    if default_path is not None:
        add(DEFAULT, default_path)
    names.append(STOCK)
    irs.append(stock_ir(spec))
    sources.append(None)
    seen: dict[str, str] = {}
    for name, path in named:
        problem = name_problem(name) if str(path) else f"expected NAME=PATH, got {name!r}"
        if problem is None and name in seen:
            problem = f"the policy name {name!r} is given twice ({seen[name]} and {path})"
        if problem is not None:
            diags.append(Diagnostic(problem, hint=NAME_HINT if "invalid" in problem else
                                    "e.g. --moe-named-policy fast=policies/fast.policy" if not str(path) else
                                    "give each policy its own name",
                                    file=f"--moe-named-policy {name}={path}" if str(path) else f"--moe-named-policy {name}"))
            continue
        seen[name] = str(path)
        add(name, path)
    if diags:
        raise PolicyError.of(diags)
    return PolicySet(tuple(names), tuple(irs), tuple(sources), default=0)
