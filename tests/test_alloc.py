"""Alloc-L: the exact DP allocation against brute force, and sensitivity-profile files."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from sgl_budget.alloc import Profile, ProfileError, allocate_dp, load_profile, save_profile, synthetic_profile
from sgl_budget.spec import PRESETS

from conftest import ROOT

DSV2 = PRESETS["deepseek-v2-lite"]


# -- DP ----------------------------------------------------------------------

def brute(loss, budget, min_k=1, max_k=None, fixed=None):
    """Best plan by enumeration, with the DP's tie rule: loss, then total, then larger k earlier."""
    fixed = fixed or {}
    layers = sorted(loss)
    opts = [[fixed[l]] if l in fixed else [k for k in loss[l] if k >= min_k and (max_k is None or k <= max_k)]
            for l in layers]
    best = None
    for plan in itertools.product(*opts):
        if sum(plan) > budget:
            continue
        total_loss = 0.0
        for l, k in zip(layers, plan):
            total_loss += loss[l].get(k, 0.0)
        key = (round(total_loss, 12), sum(plan), tuple(-k for k in plan))
        if best is None or key < best[0]:
            best = (key, dict(zip(layers, plan)), total_loss)
    return best


def random_loss(rng: random.Random, ties: bool):
    n_layers, top = rng.randint(2, 5), rng.randint(1, 4)
    loss = {}
    for i in range(n_layers):
        layer = rng.choice([0, 1, 3]) + 2 * i
        if ties:  # small quarter-multiples: exact in binary, many equal sums
            row = {k: rng.choice([0.0, 0.25, 0.5, 1.0]) for k in range(1, top + 1)}
        else:
            row = {k: rng.random() for k in range(1, top + 1)}
        loss[layer] = row
    return loss, top


@pytest.mark.parametrize("seed", range(60))
def test_dp_matches_brute_force(seed):
    rng = random.Random(seed)
    loss, top = random_loss(rng, ties=seed % 2 == 0)
    n = len(loss)
    budget = rng.randint(n, n * top + 2)
    got = allocate_dp(loss, budget)
    _, plan, want = brute(loss, budget)
    assert math.isclose(got.loss, want, abs_tol=1e-12)
    assert got.k == plan
    assert got.total == sum(plan.values()) <= budget


@pytest.mark.parametrize("seed", range(20))
def test_dp_matches_brute_force_with_constraints(seed):
    rng = random.Random(1000 + seed)
    loss, top = random_loss(rng, ties=seed % 2 == 0)
    layers = sorted(loss)
    min_k = rng.randint(1, top)
    max_k = rng.randint(min_k, top)
    fixed = {layers[0]: rng.randint(1, top)} if seed % 3 == 0 else None
    need = sum(min_k for l in layers if not fixed or l not in fixed) + sum((fixed or {}).values())
    budget = rng.randint(need, need + 4)
    got = allocate_dp(loss, budget, min_k=min_k, max_k=max_k, fixed=fixed)
    _, plan, want = brute(loss, budget, min_k, max_k, fixed)
    assert got.k == plan
    assert math.isclose(got.loss, want, abs_tol=1e-12)
    for l, k in got.k.items():
        if fixed and l in fixed:
            assert k == fixed[l]
        else:
            assert min_k <= k <= max_k


def test_dp_ties_are_deterministic():
    loss = {1: {1: 0.0, 2: 0.0}, 2: {1: 0.0, 2: 0.0}}
    # all plans cost 0: the smallest total wins
    assert allocate_dp(loss, 4).k == {1: 1, 2: 1}
    loss = {1: {1: 1.0, 2: 0.0}, 2: {1: 1.0, 2: 0.0}}
    # budget 3: (2,1) and (1,2) both lose 1.0 -> larger k in the earlier layer
    a = allocate_dp(loss, 3)
    assert a.k == {1: 2, 2: 1} and a.total == 3 and a.loss == 1.0


def test_dp_prefers_sensitive_layers():
    loss = {1: {1: 5.0, 2: 0.0}, 2: {1: 0.1, 2: 0.0}}
    assert allocate_dp(loss, 3).k == {1: 2, 2: 1}


def test_dp_large_budget_gives_full_k():
    prof = synthetic_profile(DSV2)
    a = allocate_dp(prof.loss, 10**9)
    assert set(a.k.values()) == {DSV2.top_k} and a.loss == 0.0


def test_dp_on_synthetic_half_budget():
    prof = synthetic_profile(DSV2)
    total = DSV2.num_moe_layers * DSV2.top_k // 2
    a = allocate_dp(prof.loss, total)
    assert a.total <= total and set(a.k) == set(DSV2.moe_layers)
    uniform = sum(prof.loss[l][DSV2.top_k // 2] for l in DSV2.moe_layers)
    assert a.loss <= uniform + 1e-12


def test_dp_infeasible_raises():
    loss = {1: {1: 0.5, 2: 0.0}, 2: {1: 0.5, 2: 0.0}, 3: {1: 0.5, 2: 0.0}}
    with pytest.raises(ValueError, match="budget of 2 activations is below the minimum 3"):
        allocate_dp(loss, 2)
    with pytest.raises(ValueError, match="below the minimum 6"):
        allocate_dp(loss, 5, min_k=2)
    with pytest.raises(ValueError, match=r"layer 1 has no profiled k within \[3, top-k\]"):
        allocate_dp(loss, 9, min_k=3)
    with pytest.raises(ValueError, match=r"no profiled k within \[2, 1\]"):
        allocate_dp(loss, 9, min_k=2, max_k=1)
    with pytest.raises(ValueError, match="not in the profile"):
        allocate_dp(loss, 9, fixed={7: 1})
    with pytest.raises(ValueError, match="below the minimum"):
        allocate_dp(loss, 3, fixed={1: 2})
    with pytest.raises(ValueError, match=">= 0"):
        allocate_dp(loss, 9, fixed={1: -1})


def test_dp_fixed_and_max_k():
    loss = {1: {1: 9.0, 2: 5.0, 3: 0.0}, 2: {1: 1.0, 2: 0.5, 3: 0.0}}
    a = allocate_dp(loss, 6, max_k=2)
    assert a.k == {1: 2, 2: 2} and a.total == 4
    b = allocate_dp(loss, 6, fixed={1: 1})
    assert b.k == {1: 1, 2: 3} and b.loss == 9.0


# -- profiles ------------------------------------------------------------------

GOOD = """\
format: sgl-budget-profile/1
metric: kl
source: "synthetic: test"
model: {name: tiny, num_experts: 16, top_k: 2, moe_layers: [1, 2]}
layers:
  1: {1: 0.5, 2: 0.0}
  2: {1: 0.25, 2: 0.0}
"""


def _write(tmp_path, text, name="p.sens.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_load_good_profile(tmp_path):
    prof = load_profile(_write(tmp_path, GOOD))
    assert prof.loss == {1: {1: 0.5, 2: 0.0}, 2: {1: 0.25, 2: 0.0}}
    assert prof.metric == "kl" and prof.source == "synthetic: test" and prof.model["top_k"] == 2
    assert prof.path.endswith("p.sens.yaml")


def test_round_trip(tmp_path):
    prof = synthetic_profile(DSV2, seed=3)
    out = save_profile(prof, tmp_path / "sub" / "x.yaml", header="SYNTHETIC\nnot measured")
    text = out.read_text()
    assert text.startswith("# SYNTHETIC\n# not measured\n")
    back = load_profile(out)
    assert back.loss == prof.loss and back.metric == prof.metric
    assert back.model == prof.model and back.source == prof.source and back.path == str(out)


BAD = [
    # (yaml text, message fragment, line)
    (GOOD.replace("profile/1", "profile/9"), "unsupported profile format 'sgl-budget-profile/9'", 1),
    (GOOD.replace("format: sgl-budget-profile/1\n", ""), "unsupported profile format None", 1),
    (GOOD.replace("metric: kl\n", ""), "missing key 'metric'", 1),
    (GOOD.split("\nlayers:")[0] + "\n", "missing key 'layers'", 1),
    (GOOD.replace("num_experts: 16, ", ""), "'model' must give at least num_experts and top_k", 4),
    (GOOD.replace("  1: {1: 0.5", "  a: {1: 0.5"), "layer key 'a' is not an integer layer index", 6),
    (GOOD.replace("  2: {1: 0.25", "  2.5: {1: 0.25"), "layer key 2.5 is not an integer", 7),
    (GOOD.replace("{1: 0.25, 2: 0.0}", "{x: 0.25, 2: 0.0}"), "layer 2: k 'x' is not a positive integer", 7),
    (GOOD.replace("{1: 0.25, 2: 0.0}", "{0: 0.25, 2: 0.0}"), "layer 2: k 0 is not a positive integer", 7),
    (GOOD.replace("{1: 0.25,", "{1: -0.25,"), "layer 2, k 1: loss -0.25 must be a finite number >= 0", 7),
    (GOOD.replace("{1: 0.25,", "{1: .nan,"), "loss nan must be a finite number", 7),
    (GOOD.replace("{1: 0.5,", "{1: .inf,"), "loss inf must be a finite number", 6),
    (GOOD.replace("{1: 0.5,", "{1: lots,"), "layer 1, k 1: loss 'lots' must be", 6),
    (GOOD.replace("{1: 0.5,", "{1: true,"), "loss True must be", 6),
    (GOOD.split("\nlayers:")[0] + "\nlayers: {}\n", "'layers' must map each MoE layer", 5),
    (GOOD.replace("  2: {1: 0.25, 2: 0.0}", "  2: {}"), "layer 2 must map k to loss", 7),
    (GOOD.replace("  2: {1: 0.25, 2: 0.0}", "  2: 0.3"), "layer 2 must map k to loss", 7),
    (GOOD.replace("  2: {1: 0.25, 2: 0.0}", "  -1: {1: 0.25}"), "layer key -1 is not an integer", 7),
    ("- just\n- a list\n", "a profile is a YAML mapping", 1),
]


@pytest.mark.parametrize("text,fragment,line", BAD)
def test_malformed_profiles(tmp_path, text, fragment, line):
    p = _write(tmp_path, text)
    with pytest.raises(ProfileError) as ei:
        load_profile(p)
    e = ei.value
    assert fragment in e.message
    assert e.line == line
    assert str(e).startswith(f"{p}:{line}: ") and fragment in str(e)
    assert isinstance(e, ValueError)


def test_yaml_syntax_error_has_line(tmp_path):
    p = _write(tmp_path, GOOD.replace("  2: {1: 0.25, 2: 0.0}", "  2: {1: 0.25, 2: 0.0"))
    with pytest.raises(ProfileError) as ei:
        load_profile(p)
    assert ei.value.message.startswith("not valid YAML")
    assert ei.value.line is not None and ei.value.line >= 7
    assert str(ei.value).startswith(f"{p}:{ei.value.line}: not valid YAML")


def test_missing_file_has_hint(tmp_path):
    with pytest.raises(ProfileError) as ei:
        load_profile(tmp_path / "nope.yaml")
    e = ei.value
    assert e.message == "no such profile file" and e.line is None and e.hint
    assert str(e) == f"{tmp_path / 'nope.yaml'}: no such profile file (hint: {e.hint})"


def test_synthetic_is_deterministic_and_monotone():
    a, b, c = synthetic_profile(DSV2, 0), synthetic_profile(DSV2, 0), synthetic_profile(DSV2, 1)
    assert a == b and a.loss != c.loss
    assert a.source.startswith("synthetic") and a.metric == "kl"
    assert sorted(a.loss) == list(DSV2.moe_layers) and a.check_against(DSV2) == []
    for row in a.loss.values():
        assert sorted(row) == list(range(1, DSV2.top_k + 1))
        vals = [row[k] for k in sorted(row)]
        assert all(x > y for x, y in zip(vals, vals[1:])) and vals[-1] == 0.0
    at1 = [a.loss[l][1] for l in DSV2.moe_layers]
    assert len(set(at1)) == len(at1)  # layers differ
    mid = at1[len(at1) // 2]
    assert at1[0] > mid and at1[-1] > mid  # early and last layers more sensitive


def test_bundled_profile_is_the_synthetic_one():
    path = ROOT / "policies" / "profiles" / "deepseek-v2-lite.synthetic.sens.yaml"
    assert "SYNTHETIC" in path.read_text().splitlines()[0]
    prof = load_profile(path)
    want = synthetic_profile(DSV2, seed=0)
    assert prof.loss == want.loss and prof.source == want.source and prof.check_against(DSV2) == []


def test_check_against_finds_mismatches():
    good = synthetic_profile(DSV2)
    assert good.check_against(PRESETS["deepseek-v2-lite"]) == []
    loss = {l: dict(ks) for l, ks in good.loss.items() if l != 5}
    loss[0] = {1: 0.1}  # layer 0 of DeepSeek-V2-Lite is dense
    loss[7] = {**loss[7], 9: 0.0}
    bad = Profile(loss=loss, metric="kl", model={"name": "x", "num_experts": 128, "top_k": 8}, source="synthetic")
    problems = "\n".join(bad.check_against(DSV2))
    assert "128 experts, the model has 64" in problems
    assert "top-8, the model uses top-6" in problems
    assert "lacks MoE layers [5]" in problems
    assert "layers [0] are not MoE layers of deepseek-v2-lite" in problems
    assert "k values [9] outside 1..6" in problems
    assert len(bad.check_against(DSV2)) == 5
