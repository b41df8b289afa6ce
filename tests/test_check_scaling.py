"""`sgl-budget check` stays near-linear in the number of conditioned blocks (issue 17, item 6).

The situation analysis used to try every block of a kind at every representative context (a 42 KB
policy of `layers when prefill and tokens == N` blocks took 28-85 s of CPU). It now finds each
context's first matching block from per-region tables (``RuleIndex``) and keeps one context per cell
(``context_matches``). The property tests hold both against the plain definition: try the blocks in
order at every representative context.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_budget.errors import PolicyError
from sgl_budget.lang import compile_policy
from sgl_budget.lang.ir import (
    Condition, Interval, PolicyIR, RouteContext, Rule, RuleIndex, context_matches, representative_contexts,
)
from sgl_budget.spec import PRESETS

SPEC = PRESETS["deepseek-v2-lite"]

FAMILIES = {
    "prefill-tokens-eq": lambda i: f"  layers when prefill and tokens == {17 + 2 * i} {{ k = 3 }}",
    "batch-ge": lambda i: f"  layers when batch >= {100_000 - 3 * i} {{ k = 3 }}",
    "decode-batch-lt": lambda i: f"  layers when decode and batch < {i + 2} {{ k = 3 }}",
    "tokens-le": lambda i: f"  layers when tokens <= {10 + 3 * i} {{ k = 2 }}",
}


def family_policy(family: str, n: int) -> str:
    """``n`` blocks of one family among budget, tokens (Alloc-T) and piggyback blocks with conditions of their own."""
    lines = ['policy "many" {', "  budget 50% when decode", "  budget 3.0"]
    lines += [FAMILIES[family](i) for i in range(n)]
    lines += ["  layers { k = 3 }"]
    lines += [f"  tokens when prefill and tokens == {18 + 2 * i} {{ reallocate by score; max_k 6 }}"
              for i in range(n // 8)]
    lines += [f"  piggyback when decode and batch == {i + 1} {{ max_k 6 }}" for i in range(n // 8)]
    return "\n".join(lines + ["}"]) + "\n"


def shadowed_policy(n: int) -> str:
    """An unconditional layers block first: each of the ``n`` conditioned ones after it is reported."""
    lines = ['policy "shadowed" {', "  budget 50%", "  layers { k = 3 }"]
    lines += [f"  layers when prefill and tokens == {17 + 2 * i} {{ k = 2 }}" for i in range(n)]
    return "\n".join(lines + ["}"]) + "\n"


def check_cpu(text: str, runs: int = 3) -> float:
    """Least CPU time of ``runs`` checks of ``text`` (a PolicyError is a completed check too)."""
    best = float("inf")
    for _ in range(runs):
        t = time.process_time()
        try:
            compile_policy(text, SPEC, file="many.policy")
        except PolicyError:
            pass
        best = min(best, time.process_time() - t)
    return best


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_check_is_near_linear_in_conditioned_blocks(family: str) -> None:
    check_cpu(family_policy(family, 20), runs=1)  # warm the parser
    small_text, big_text = family_policy(family, 150), family_policy(family, 600)
    assert len(big_text) > 30_000
    small, big = check_cpu(small_text), check_cpu(big_text)
    # 4x the blocks: about 4-5x the time here (the quadratic analysis took 16x); 0.25 s of CPU here
    assert big < 6.0 * small + 0.05, f"4x the blocks took {big / max(small, 1e-9):.1f}x the CPU time (quadratic?)"
    assert big < 5.0, f"{len(big_text)} bytes took {big:.2f}s of CPU"


def test_shadowed_blocks_are_reported_in_near_linear_time() -> None:
    check_cpu(shadowed_policy(20), runs=1)
    with pytest.raises(PolicyError) as ei:
        compile_policy(shadowed_policy(600), SPEC, file="many.policy")
    assert len(ei.value.diagnostics) == 600
    assert all("never applies: the layers block(s) on line 3 match first" in d.message for d in ei.value.diagnostics)
    small, big = check_cpu(shadowed_policy(150)), check_cpu(shadowed_policy(600))
    assert big < 6.0 * small + 0.05, f"4x the blocks took {big / max(small, 1e-9):.1f}x the CPU time (quadratic?)"
    assert big < 5.0, f"600 shadowed blocks took {big:.2f}s of CPU"


def test_issue_policy_mixing_batch_and_token_bounds_checks_fast() -> None:
    """The 44 KB policy of the issue's reproduction (85 s of CPU before). Bounding prefill by batch in
    some blocks and by tokens in others makes every (batch region, token region) pair a combination
    of its own, each checked against its budget; that many are inherent, but each costs O(log n)."""
    n = 170
    lines = ['policy "many" {']
    lines += [f"  budget {50 + i % 50}% when prefill and tokens == {4000 + i}" for i in range(n // 2)]
    lines += [f"  budget {50 + i % 50}% when decode and batch < {i + 2}" for i in range(n // 4)]
    lines += ["  budget 50%"]
    lines += [f"  layers when prefill and tokens == {17 + 3 * i} {{ k = 3 }}" for i in range(n)]
    lines += [f"  layers when batch >= {5000 - 7 * i} {{ k = 3 }}" for i in range(n)]
    lines += [f"  layers when decode and batch < {i + 2} {{ k = 3 }}" for i in range(n)]
    lines += [f"  layers when tokens <= {10000 + 5 * i} {{ k = 2 }}" for i in range(n)]
    lines += ["  layers { k = 3 }"]
    lines += [f"  tokens when prefill and tokens == {20 + 3 * i} {{ reallocate by score; min_k 1; max_k 6 }}"
              for i in range(n // 2)]
    lines += [f"  piggyback when decode and batch == {i + 1} {{ max_k 6 }}" for i in range(n // 4)]
    text = "\n".join(lines + ["}"]) + "\n"
    assert len(text) > 42_000
    took = check_cpu(text, runs=1)
    assert took < 10.0, f"{len(text)} bytes took {took:.2f}s of CPU"


# -- the new first match against the definition ----------------------------------------------------

def brute_first(conditions: list[Condition], ctx: RouteContext) -> int:
    """The definition: the first condition, in order, that holds (-1: none)."""
    return next((i for i, c in enumerate(conditions) if c.holds(ctx)), -1)


def brute_match(kinds: list[list[Condition]], ctx: RouteContext) -> tuple[int, ...]:
    return tuple(brute_first(conds, ctx) for conds in kinds)


@st.composite
def intervals(draw) -> Interval:
    """Bounded, open-ended, single points, empty (a condition that was itself an error) and `>= 0`."""
    lo = draw(st.integers(0, 14))
    hi = draw(st.one_of(st.none(), st.integers(lo - 1, 16)))
    return draw(st.sampled_from([Interval(), Interval(), Interval(lo, hi), Interval(lo, hi), Interval(max(lo, 1), lo)]))


conditions = st.builds(Condition, st.sampled_from([None, None, "prefill", "decode"]), intervals(), intervals())
kinds_strategy = st.lists(st.lists(conditions, max_size=12), min_size=5, max_size=5)


def policy_of(kinds: list[list[Condition]]) -> PolicyIR:
    rules = [tuple(Rule(c, None) for c in conds) for conds in kinds]
    return PolicyIR(name="p", spec=SPEC, source="p.policy", budget_rules=rules[0], layer_rules=rules[1],
                    token_rules=rules[2], reroute_rules=rules[3], piggyback_rules=rules[4])


@settings(max_examples=150, deadline=None)
@given(kinds_strategy, st.lists(st.tuples(st.sampled_from(["prefill", "decode"]), st.integers(1, 20),
                                          st.integers(1, 24)), min_size=1, max_size=20))
def test_rule_index_matches_trying_every_rule(kinds, points) -> None:
    index = RuleIndex(kinds)
    ir = policy_of(kinds)
    for phase, b, t in points:
        ctx = RouteContext(phase=phase, batch_size=b, num_tokens=t)
        want = brute_match(kinds, ctx)
        assert index.match(ctx) == want, (ctx, kinds)
        assert ir.match(ctx) == want


@settings(max_examples=150, deadline=None)
@given(kinds_strategy)
def test_context_matches_agree_with_every_representative_context(kinds) -> None:
    ir = policy_of(kinds)
    everything = [c for conds in kinds for c in conds]
    brute = {ctx: brute_match(kinds, ctx) for ctx in representative_contexts(everything)}
    got = context_matches(ir)
    kept = list(got.items())
    assert all(brute[ctx] == m for ctx, m in kept)  # every kept context is representative, with its match
    assert got.combinations() == set(brute.values())
    first: dict[tuple, RouteContext] = {}
    for ctx, m in brute.items():
        first.setdefault(m, ctx)
    assert list(got.first().items()) == list(first.items())  # the same first context, in the same order
    for c in everything:  # where each condition holds, and which rules match first there
        where = list(got.where(c))
        assert all(c.holds(ctx) for ctx, _ in where)
        assert {m for _, m in where} == {m for ctx, m in brute.items() if c.holds(ctx)}
