"""Alloc-L DP against brute force, profile YAML validation, similarity files."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from safetensors.torch import save_file

from sgl_budget.alloc import Profile, ProfileError, allocate_dp, load_profile, save_profile, synthetic_profile
from sgl_budget.similarity import (
    SimilarityFileError, SimilarityTable, derive_critical, load_similarity, save_similarity, synthetic_similarity,
)
from sgl_budget.spec import PRESETS

from conftest import TINY_SOFTMAX


def brute_force(loss, budget, min_k=1, max_k=None, fixed=None):
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
            total_loss += loss[l][k]
        key = (round(total_loss, 12), sum(plan), tuple(-k for k in plan))
        if best is None or key < best[0]:
            best = (key, plan, total_loss)
    return best


@pytest.mark.parametrize("seed", range(60))
def test_dp_equals_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    n_layers, top = rng.randint(2, 5), rng.randint(2, 4)
    ties = seed % 3 == 0
    loss = {l: {k: (rng.choice([0.0, 0.5, 1.0]) if ties else rng.random()) for k in range(1, top + 1)}
            for l in range(n_layers)}
    min_k = rng.choice([1, 1, 2]) if top > 2 else 1
    max_k = rng.choice([None, top - 1]) if top > min_k else None
    fixed = {0: rng.randint(min_k, max_k or top)} if seed % 4 == 1 else None
    budget = rng.randint(n_layers * min_k, n_layers * top)
    ref = brute_force(loss, budget, min_k, max_k, fixed)
    if ref is None:
        with pytest.raises(ValueError):
            allocate_dp(loss, budget, min_k, max_k, fixed)
        return
    got = allocate_dp(loss, budget, min_k, max_k, fixed)
    assert tuple(got.k[l] for l in sorted(loss)) == ref[1]
    assert abs(got.loss - ref[2]) < 1e-9 and got.total == sum(ref[1]) <= budget


def test_dp_infeasible_message() -> None:
    with pytest.raises(ValueError, match="below the minimum 6"):
        allocate_dp({1: {2: 0.0, 3: 0.0}, 2: {2: 0.0, 3: 0.0}, 3: {2: 0.0, 3: 0.0}}, 5)
    with pytest.raises(ValueError, match="no profiled k"):
        allocate_dp({1: {1: 0.1}}, 5, min_k=2)


def test_dp_prefers_sensitive_layers() -> None:
    loss = {1: {1: 10.0, 2: 0.0}, 2: {1: 0.1, 2: 0.0}}
    assert allocate_dp(loss, 3).k == {1: 2, 2: 1}


def test_profile_round_trip(tmp_path) -> None:
    prof = synthetic_profile(PRESETS["deepseek-v2-lite"], seed=2)
    p = save_profile(prof, tmp_path / "p.yaml", header="SYNTHETIC test profile")
    assert p.read_text().startswith("# SYNTHETIC test profile\n")
    got = load_profile(p)
    assert got.loss == prof.loss and got.metric == "kl" and got.source.startswith("synthetic")
    assert got.check_against(PRESETS["deepseek-v2-lite"]) == []


def test_synthetic_profile_deterministic_and_monotone() -> None:
    spec = PRESETS["qwen3-30b-a3b"]
    a, b = synthetic_profile(spec, seed=1), synthetic_profile(spec, seed=1)
    assert a.loss == b.loss
    for row in a.loss.values():
        vals = [row[k] for k in sorted(row)]
        assert vals == sorted(vals, reverse=True) and vals[-1] == 0.0


def test_profile_check_against_finds_mismatches() -> None:
    prof = synthetic_profile(TINY_SOFTMAX)
    problems = prof.check_against(PRESETS["deepseek-v2-lite"])
    assert any("16 experts" in p for p in problems) and any("lacks MoE layers" in p for p in problems)


GOOD_HEAD = "format: sgl-budget-profile/1\nmetric: kl\nmodel: {num_experts: 16, top_k: 4}\n"
BAD_PROFILES = [
    ("format: other\n", "unsupported profile format 'other'", 1),
    ("format: sgl-budget-profile/1\nmetric: kl\n", "missing key 'model'", 1),
    (GOOD_HEAD + "layers: {}\n", "'layers' must map", 4),
    (GOOD_HEAD + "layers:\n  1: {1: -0.5}\n", "loss -0.5 must be a finite number >= 0", 5),
    (GOOD_HEAD + "layers:\n  1: {1: .nan}\n", "must be a finite number", 5),
    (GOOD_HEAD + "layers:\n  1: {1: 0.1}\n  x: {1: 0.1}\n", "layer key 'x' is not an integer", 6),
    (GOOD_HEAD + "layers:\n  1: {0: 0.1}\n", "k 0 is not a positive integer", 5),
    (GOOD_HEAD + "layers:\n  1: [0.1, 0.2]\n", "layer 1 must map k to loss", 5),
    (GOOD_HEAD + "layers:\n  1: {1: 0.1\n", "not valid YAML", None),
    ("- just\n- a list\n", "a profile is a YAML mapping", 1),
    ("format: sgl-budget-profile/1\nmetric: kl\nmodel: 3\nlayers: {1: {1: 0.0}}\n", "'model' must give", 3),
    (GOOD_HEAD + "layers:\n  1: {1: abc}\n", "loss 'abc' must be a finite number", 5),
]


@pytest.mark.parametrize("text,message,line", BAD_PROFILES, ids=[b[1][:30] for b in BAD_PROFILES])
def test_malformed_profile(tmp_path, text, message, line) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ProfileError) as ei:
        load_profile(p)
    assert message in ei.value.message
    if line is not None:
        assert ei.value.line == line
    assert str(p) in str(ei.value)


def test_missing_profile(tmp_path) -> None:
    with pytest.raises(ProfileError, match="no such profile file"):
        load_profile(tmp_path / "none.yaml")


# -- similarity ----------------------------------------------------------------

def test_similarity_round_trip_and_critical(tmp_path) -> None:
    table = synthetic_similarity(TINY_SOFTMAX, seed=5)
    got = load_similarity(save_similarity(table, tmp_path / "s.safetensors"))
    assert got.synthetic and got.method == "synthetic-cosine" and got.check_against(TINY_SOFTMAX) == []
    for l, m in table.matrices.items():
        assert torch.equal(got.matrices[l], m) and torch.equal(got.critical[l], table.critical[l])
        assert torch.equal(m, m.T) and float(m.min()) >= 0 and torch.equal(m.diagonal(), torch.ones(16))


def test_derived_critical_ranking() -> None:
    m = torch.tensor([[1.0, 0.9, 0.2, 0.1], [0.9, 1.0, 0.3, 0.2], [0.2, 0.3, 1.0, 0.4], [0.1, 0.2, 0.4, 1.0]])
    # best similarity to another expert: e0 .9, e1 .9, e2 .4, e3 .4 -> least replaceable first, ties by index
    assert derive_critical(m).tolist() == [2, 3, 0, 1]


def test_similarity_check_against() -> None:
    table = synthetic_similarity(TINY_SOFTMAX)
    problems = table.check_against(PRESETS["deepseek-v2-lite"])
    assert any("16 experts" in p for p in problems) and any("lacks MoE layers" in p for p in problems)


def _sim_file(tmp_path, tensors, meta):
    p = tmp_path / "bad.sim.safetensors"
    save_file(tensors, str(p), metadata=None if meta is None else {"sgl_budget.similarity": meta})
    return p


def _good_meta(**over):
    m = {"format": "sgl-budget-similarity/1", "model": {"name": "t", "num_experts": 4, "moe_layers": [1]},
         "method": "x", "source": "test", "synthetic": True}
    m.update(over)
    return json.dumps(m)


EYE = torch.eye(4)
BAD_SIM = [
    ({"layer.1.similarity": EYE}, None, "no 'sgl_budget.similarity' metadata"),
    ({"layer.1.similarity": EYE}, "{", "metadata is not valid JSON"),
    ({"layer.1.similarity": EYE}, _good_meta(format="v0"), "unsupported format 'v0'"),
    ({"layer.1.similarity": EYE}, _good_meta(model={"name": "t"}), "must give num_experts and moe_layers"),
    ({}, _good_meta(), "no layer.1.similarity"),
    ({"layer.1.similarity": torch.eye(3)}, _good_meta(), "expected [4, 4]"),
    ({"layer.1.similarity": EYE * float("nan")}, _good_meta(), "NaN or infinite"),
    ({"layer.1.similarity": EYE * 2}, _good_meta(), "values outside [0, 1]"),
    ({"layer.1.similarity": torch.zeros(4, 4)}, _good_meta(), "1 on its diagonal"),
    ({"layer.1.similarity": EYE, "layer.1.critical": torch.tensor([0, 0, 1, 2])}, _good_meta(),
     "must be a permutation"),
    ({"layer.1.similarity": EYE, "layer.2.similarity": EYE.clone()}, _good_meta(), "unexpected tensors"),
]


@pytest.mark.parametrize("tensors,meta,message", BAD_SIM, ids=[b[2][:30] for b in BAD_SIM])
def test_malformed_similarity(tmp_path, tensors, meta, message) -> None:
    p = _sim_file(tmp_path, tensors, meta)
    with pytest.raises(SimilarityFileError) as ei:
        load_similarity(p)
    assert message in ei.value.message and str(p) in str(ei.value)


def test_policy_reports_bad_similarity_file_at_its_name(tmp_path) -> None:
    from sgl_budget.errors import PolicyError
    from sgl_budget.lang import compile_policy

    _sim_file(tmp_path, {"layer.1.similarity": EYE * 2}, _good_meta())
    src = 'policy "p" {\n  reroute {\n    similarity "bad.sim.safetensors"\n    primary top 1\n  }\n}\n'
    with pytest.raises(PolicyError) as ei:
        compile_policy(src, TINY_SOFTMAX, file="p.policy", base_dir=tmp_path)
    e = ei.value
    assert "bad similarity file" in e.message and e.line == 3 and e.column == 16


def test_policy_reports_mismatched_similarity_file(tmp_path) -> None:
    from sgl_budget.errors import PolicyError
    from sgl_budget.lang import compile_policy

    save_similarity(synthetic_similarity(TINY_SOFTMAX), tmp_path / "tiny.sim.safetensors")
    src = 'policy "p" { reroute { similarity "tiny.sim.safetensors"; primary top 1 } }'
    with pytest.raises(PolicyError, match="does not fit deepseek-v2-lite"):
        compile_policy(src, PRESETS["deepseek-v2-lite"], base_dir=tmp_path)


def test_policy_reports_bad_profile_with_its_line(tmp_path) -> None:
    from sgl_budget.errors import PolicyError
    from sgl_budget.lang import compile_policy

    (tmp_path / "p.yaml").write_text(GOOD_HEAD + "layers:\n  1: {1: -1}\n")
    src = 'policy "p" {\n  budget 50%\n  layers { allocate dp from "p.yaml" }\n}'
    with pytest.raises(PolicyError) as ei:
        compile_policy(src, TINY_SOFTMAX, file="x.policy", base_dir=tmp_path)
    assert "bad profile (line 5)" in ei.value.message and ei.value.line == 3


def test_dp_policy_plan_matches_allocate(tmp_path) -> None:
    from sgl_budget.lang import compile_policy

    prof = Profile(loss={1: {1: 5.0, 2: 1.0, 3: 0.5, 4: 0.0}, 2: {1: 0.2, 2: 0.1, 3: 0.05, 4: 0.0}},
                   metric="kl", model={"num_experts": 16, "top_k": 4, "moe_layers": [1, 2]}, source="test")
    save_profile(prof, tmp_path / "p.yaml")
    ir = compile_policy('policy "p" { budget 50%; layers { allocate dp from "p.yaml" } }', TINY_SOFTMAX,
                        base_dir=tmp_path)
    lk = ir.layer_k[(0, 0)]
    assert lk.k == {1: 3, 2: 1} and lk.method == "dp" and abs(lk.predicted_loss - 0.7) < 1e-9
