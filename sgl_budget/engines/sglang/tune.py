"""``sgl-budget tune --server``: search the policies the language offers, measured by the serving engine, and
keep the cheapest one that meets a quality bound.

Candidates, at each budget: uniform k; Alloc-L (the DP plan of the engine's own sensitivity profile, written
as inline per-layer k); Alloc-L+T (token reallocation on top); and, in decode, piggybacking and — where the
server loaded a SERE similarity file at launch — Alloc-L+T with SERE re-routing. Each candidate travels as
policy text (calibration mode compiles it on the server against the served model), so the whole search runs
where the model runs. The Pareto front is over experts per token, distinct experts per decode batch and the
quality measure (perplexity rise over stock, or KL to stock).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...alloc import allocate_dp
from ...quality import EvalResult
from .calibrate import Target, evaluate_server

DEFAULT_BUDGETS = (25.0, 37.5, 50.0, 62.5, 75.0)


@dataclass(frozen=True)
class Candidate:
    name: str
    method: str  # uniform | alloc-l | alloc-lt | alloc-l-piggyback | alloc-lt-sere
    budget_pct: float
    text: str  # the policy body (inside `policy "NAME" { ... }`)


@dataclass
class Bound:
    """The quality bound: a relative perplexity rise over stock (``ppl``) or a KL to stock (``kl``)."""

    kind: str  # "ppl" | "kl"
    value: float

    def measure(self, r: EvalResult, stock: EvalResult) -> float:
        return r.perplexity / stock.perplexity - 1 if self.kind == "ppl" else r.kl_to_full

    def describe(self) -> str:
        return (f"perplexity at most {100 * self.value:g}% above stock" if self.kind == "ppl"
                else f"KL to stock at most {self.value:g} nats/token")


def policy_text(name: str, body: str) -> str:
    return f'policy "{name}" {{\n{body}}}\n'


def _pct(p: float) -> str:
    return f"{p:g}".replace(".", "p")


def candidates(spec, profile_loss: dict[int, dict[int, float]], budgets: Sequence[float], mode: str,
               similarity: str | None) -> list[Candidate]:
    """The search space: every method at every budget (decode-only rules only when measuring decode)."""
    out = []
    layers = sorted(profile_loss)
    for pct in budgets:
        total = int(pct / 100 * spec.top_k * len(layers) + 1e-9)
        if total < len(layers):
            continue  # below one expert per layer
        ks = allocate_dp(profile_loss, total).k
        plan = "".join(f"    layer {l}: k = {ks[l]}\n" for l in layers)
        budget = f"  budget {pct:g}%\n"
        alloc_l = f"{budget}  layers {{\n{plan}  }}\n"
        tokens = f"  tokens {{\n    reallocate by score\n    min_k 1\n    max_k {spec.top_k}\n  }}\n"
        out.append(Candidate(f"uniform-{_pct(pct)}", "uniform", pct, f"{budget}  layers {{ allocate uniform }}\n"))
        out.append(Candidate(f"alloc-l-{_pct(pct)}", "alloc-l", pct, alloc_l))
        out.append(Candidate(f"alloc-lt-{_pct(pct)}", "alloc-lt", pct, alloc_l + tokens))
        if mode == "decode":
            pig = f"  piggyback when decode {{\n    max_k {spec.top_k}\n    min_score 0.01\n  }}\n"
            out.append(Candidate(f"alloc-l-piggyback-{_pct(pct)}", "alloc-l-piggyback", pct, alloc_l + pig))
            if similarity:
                sere = (f'  reroute when decode {{\n    similarity "{similarity}"\n    primary top 1\n'
                        f"    min_similarity 0.0\n  }}\n")
                out.append(Candidate(f"alloc-lt-sere-{_pct(pct)}", "alloc-lt-sere", pct, alloc_l + tokens + sere))
    return out


def pareto(results: Sequence[EvalResult], quality: Sequence[float]) -> list[int]:
    """Indices of the results no other result beats on experts per token, distinct experts per batch and
    quality at once (lower is better in all three)."""
    keys = [(r.activations_per_token, r.unique_per_batch, q) for r, q in zip(results, quality)]
    front = []
    for i, a in enumerate(keys):
        dominated = any(all(bj <= aj for aj, bj in zip(a, b)) and b != a for b in keys)
        if not dominated:
            front.append(i)
    return front


@dataclass
class TuneResult:
    stock: EvalResult
    candidates: list[Candidate]
    results: list[EvalResult]
    quality: list[float]
    front: list[int]
    chosen: int | None  # index into candidates/results, None: nothing meets the bound
    bound: Bound


def tune(client, spec, windows, profile_loss, bound: Bound, budgets: Sequence[float] = DEFAULT_BUDGETS,
         batch_size: int = 16, mode: str = "decode", top_n: int = 32, similarity: str | None = None,
         progress=None, show_progress: bool = False) -> TuneResult:
    """Measure every candidate on ``windows`` through the server and choose the cheapest that meets ``bound``."""
    cands = candidates(spec, profile_loss, budgets, mode, similarity)
    targets = [Target(c.name, text=policy_text(c.name, c.text), budget=c.budget_pct / 100 * spec.top_k)
               for c in cands]
    results = evaluate_server(client, targets, windows, batch_size=batch_size, mode=mode, top_n=top_n,
                              progress=progress, show_progress=show_progress)
    stock, rest = results[0], results[1:]
    quality = [bound.measure(r, stock) for r in rest]
    ok = [i for i, q in enumerate(quality) if q <= bound.value]
    chosen = min(ok, key=lambda i: (rest[i].activations_per_token, rest[i].unique_per_batch, quality[i])) \
        if ok else None
    return TuneResult(stock, cands, rest, quality, pareto(rest, quality), chosen, bound)
