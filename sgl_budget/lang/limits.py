"""What each supported engine can serve, checked on a resolved policy (no engine is imported here).

The core never imports an engine; the engines (and ``sgl-budget check``) call
:func:`engine_problems` so that the checker and the launcher refuse the same
policies with the same words.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import Diagnostic, PolicyError
from ..spec import ModelSpec
from .ir import PolicyIR

ENGINES = ("sglang", "hf")
DEFAULT_ENGINE = "sglang"


@dataclass(frozen=True)
class EngineLimits:
    """The widest per-token routing an engine runs (None: no limit beyond the model's experts)."""

    name: str
    label: str
    max_width: int | None  # experts per token a layer may route; None = unbounded


def limits_for(engine: str, top_k: int, engine_top_k: int | None = None) -> EngineLimits:
    """Limits of ``engine`` for a model of ``top_k`` (SGLang sizes its MoE runners for the model's top-k)."""
    if engine == "sglang":
        return EngineLimits("sglang", "SGLang (--moe-policy)", engine_top_k or top_k)
    if engine == "hf":
        return EngineLimits("hf", "the transformers adapter", None)
    raise ValueError(f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})")


def max_k_hint(engine: str, top_k: int) -> str:
    """How a user may route more experts per token than a layer's k, in words the engine accepts."""
    if engine == "sglang":
        return (f"SGLang serves at most top-{top_k} experts per token; "
                "`tokens { max_k N }` above that works only in replay and the transformers adapter")
    return "tokens may take more with `tokens { max_k N }`"


def engine_problems(ir: PolicyIR, engine: str = DEFAULT_ENGINE, engine_top_k: int | None = None,
                    file: str | None = None) -> list[Diagnostic]:
    """Every statement of ``ir`` that ``engine`` cannot serve (empty: servable)."""
    lim = limits_for(engine, ir.spec.top_k, engine_top_k)
    if lim.max_width is None:
        return []
    limit = lim.max_width
    too_wide = {l: w for l, w in ir.widths.items() if w > limit}
    if not too_wide:
        return []
    out: list[Diagnostic] = []
    for kind, rules in (("tokens", ir.token_rules), ("piggyback", ir.piggyback_rules)):
        for r in rules:
            if r.value.max_k > limit:
                out.append(Diagnostic(
                    f"{kind} max_k {r.value.max_k} routes up to {r.value.max_k} experts per token; "
                    f"SGLang's MoE runners are sized for the model's top-{limit}", r.value.max_k_span or r.span,
                    f"keep max_k <= {limit} to serve with SGLang (replay and the transformers adapter allow "
                    f"more: check with `--engine hf`)", file or ir.source))
    if not out:
        layer, width = next(iter(too_wide.items()))
        out.append(Diagnostic(f"this policy routes up to {width} experts per token (layer {layer}); SGLang's MoE "
                              f"runners are sized for the model's top-{limit}", None,
                              f"keep every layer's width <= {limit} when serving with SGLang", file or ir.source))
    return out


def check_engine(ir: PolicyIR, engine: str = DEFAULT_ENGINE, engine_top_k: int | None = None,
                 file: str | None = None) -> PolicyIR:
    """``ir`` if ``engine`` can serve it; otherwise a :class:`PolicyError` with every reason."""
    problems = engine_problems(ir, engine, engine_top_k, file)
    if problems:
        raise PolicyError.of(problems)
    return ir


def load_for_engine(path: str | Path, spec: ModelSpec, engine: str = DEFAULT_ENGINE,
                    engine_top_k: int | None = None) -> PolicyIR:
    """Compile the policy file ``path`` for ``spec`` and check that ``engine`` can serve it: what ``sgl-budget
    check`` and the server's launch check run on every file (a :class:`PolicyError` with every reason)."""
    from . import load_policy

    return check_engine(load_policy(path, spec), engine, engine_top_k, file=str(path))
