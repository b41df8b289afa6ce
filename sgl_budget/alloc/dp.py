"""Exact Alloc-L allocation: a multiple-choice knapsack solved by dynamic programming.

Choose one k per layer (from the profile's k values within [min_k, max_k]; fixed
layers keep theirs, counted at their profiled loss or 0 when unprofiled) so
that sum(k) <= budget and the summed profile loss is minimal. Infeasible inputs
raise ValueError with a readable message. O(layers x budget x choices). Ties
go to the plan with the smaller total, then to larger k in earlier layers, so
the result is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

INF = float("inf")
MAX_WORK = 20_000_000  # DP cell updates (~10 s of Python); real models need well under 1,000,000


@dataclass(frozen=True)
class Allocation:
    k: dict[int, int]  # layer -> chosen k
    total: int  # sum of k
    loss: float  # summed profile loss


def allocate_dp(loss: dict[int, dict[int, float]], total_budget: int, min_k: int = 1, max_k: int | None = None,
                fixed: dict[int, int] | None = None) -> Allocation:
    """The loss-minimising per-layer k within ``total_budget`` activations (see module docstring)."""
    fixed = dict(fixed or {})
    layers = sorted(loss)
    unknown = [l for l in fixed if l not in loss]
    if unknown:
        raise ValueError(f"fixed layers {unknown} are not in the profile")
    negative = {l: k for l, k in fixed.items() if k < 0}
    if negative:
        raise ValueError(f"fixed k must be >= 0, got {negative}")
    choices: dict[int, list[int]] = {}
    for l in layers:
        if l in fixed:
            choices[l] = [fixed[l]]
            continue
        ks = sorted((k for k in loss[l] if k >= min_k and (max_k is None or k <= max_k)), reverse=True)
        if not ks:
            raise ValueError(f"layer {l} has no profiled k within [{min_k}, {max_k if max_k is not None else 'top-k'}]")
        choices[l] = ks
    fixed_loss = {l: loss[l].get(k, 0.0) for l, k in fixed.items()}
    need = sum(min(choices[l]) for l in layers)
    if need > total_budget:
        raise ValueError(f"the budget of {total_budget} activations is below the minimum {need} "
                         f"({len(layers)} layers at their smallest allowed k)")
    # No plan can use more than every layer at its largest choice; capping keeps the table small.
    budget = min(total_budget, sum(max(choices[l]) for l in layers))
    work = (budget + 1) * sum(len(choices[l]) for l in layers)
    if work > MAX_WORK:  # a bounded answer time beats an exact plan nobody waits for
        raise ValueError(f"the exact allocation needs {work:.3g} steps ({len(layers)} layers, budget {budget}), "
                         f"over the limit of {MAX_WORK:.0e}; is the profile's top-k or layer count right?")
    # best[b] = (loss, total, plan tuple) over processed layers using exactly b activations
    best: list[tuple[float, int, tuple[int, ...]] | None] = [None] * (budget + 1)
    best[0] = (0.0, 0, ())
    for l in layers:
        new: list[tuple[float, int, tuple[int, ...]] | None] = [None] * (budget + 1)
        for b, cur in enumerate(best):
            if cur is None:
                continue
            for k in choices[l]:
                nb = b + k
                if nb > budget:
                    continue
                cost = fixed_loss[l] if l in fixed else loss[l][k]
                cand = (cur[0] + cost, nb, cur[2] + (k,))
                if new[nb] is None or _better(cand, new[nb]):
                    new[nb] = cand
        best = new
    final = min((c for c in best if c is not None), key=_key)
    return Allocation(k=dict(zip(layers, final[2])), total=final[1], loss=final[0])


def _key(c: tuple[float, int, tuple[int, ...]]):
    loss, total, plan = c
    return (round(loss, 12), total, tuple(-k for k in plan))


def _better(a, b) -> bool:
    return _key(a) < _key(b)
