"""Per-token confidence rules (top_p / min_p): language, reference routing against an independent transcription,
batch independence, calibration to a budget from a trace, composition with Alloc-L / SERE / piggybacking, explain."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY_SIGMOID, TINY_SOFTMAX, TINY_SPECS, write_similarity
from sgl_budget.errors import PolicyError
from sgl_budget.lang import compile_policy, load_policy
from sgl_budget.lang.ir import RouteContext
from sgl_budget.routing import LayerRouter, compile_routers
from sgl_budget.routing.scoring import score_experts
from sgl_budget.spec import PRESETS, load_spec
from sgl_budget.traces import load_trace
from sgl_budget.traces.synthetic import synthetic_trace

BROWN = ROOT / "models" / "brown-moe"
CALIB = ROOT / "policies" / "traces" / "brown-moe.calib.trace.safetensors"
DSV2 = PRESETS["deepseek-v2-lite"]


def P(body: str) -> str:
    return 'policy "t" {\n' + body + "\n}\n"


def _bias(spec, seed: int = 0):
    return torch.randn(spec.num_experts, generator=torch.Generator().manual_seed(seed)) * 0.1 \
        if spec.has_correction_bias else None


def transcribed(spec, logits: torch.Tensor, bias, kind: str, t: float, min_k: int, max_k: int) -> list[list[int]]:
    """Each token's kept experts, written out per token in plain Python from the rule's definition (ranking by
    selection score with lower index first on ties, gate mass over the token's eligible experts)."""
    gs = score_experts(spec, logits.unsqueeze(0), bias)
    scores, select = gs.scores[0].tolist(), gs.select[0].tolist()
    eligible = gs.eligible[0].tolist() if gs.eligible is not None else [[True] * spec.num_experts] * len(scores)
    out = []
    for s, sel, el in zip(scores, select, eligible):
        order = sorted((e for e in range(spec.num_experts) if el[e]), key=lambda e: (-sel[e], e))
        z = torch.tensor([s[e] for e in range(spec.num_experts) if el[e]], dtype=torch.float32).sum()
        k, acc = min_k, torch.tensor(0.0)
        for r, e in enumerate(order[:max_k]):
            if r >= min_k:
                if kind == "top_p":
                    k += bool(acc < torch.tensor(t, dtype=torch.float32) * z)
                else:
                    k += bool(torch.tensor(s[e]) >= torch.tensor(t, dtype=torch.float32) * torch.tensor(s[order[0]]))
            acc = acc + torch.tensor(s[e], dtype=torch.float32)
        out.append(order[:min(k, len(order))])
    return out


@pytest.mark.parametrize("spec_name", sorted(TINY_SPECS))
@pytest.mark.parametrize("kind,t,min_k,max_k", [("top_p", 0.6, 1, 4), ("top_p", 0.9, 2, 6), ("min_p", 0.3, 1, 4),
                                                ("min_p", 0.05, 2, 5), ("top_p", 1.0, 1, 3)])
def test_reference_equals_the_rule_written_out(spec_name, kind, t, min_k, max_k) -> None:
    spec = TINY_SPECS[spec_name]
    if max_k > (spec.topk_group * spec.num_experts // spec.n_group if spec.grouped else spec.num_experts):
        pytest.skip("max_k above the eligible experts")
    ir = compile_policy(P(f"  tokens {{ {kind} {t}; min_k {min_k}; max_k {max_k} }}"), spec)
    layer = spec.moe_layers[0]
    logits = torch.randn(29, spec.num_experts, generator=torch.Generator().manual_seed(3)) * 2
    bias = _bias(spec)
    router = LayerRouter(ir, layer)
    out = router(logits, RouteContext("decode", 29, 29), correction_bias=bias)
    staged = router.details(logits, RouteContext("decode", 29, 29), correction_bias=bias)  # the stages' path
    assert torch.equal(out.topk_ids, staged.topk_ids) and torch.equal(out.topk_weights, staged.topk_weights)
    want = transcribed(spec, logits, bias, kind, t, min_k, max_k)
    for i, experts in enumerate(want):
        got = out.topk_ids[i].tolist()
        assert got[:len(experts)] == experts and all(x == -1 for x in got[len(experts):]), (i, got, experts)
        w = out.topk_weights[i]
        assert torch.all(w[len(experts):] == 0) and torch.all(w[:len(experts)] > 0)
        if spec.norm_topk_prob:
            assert abs(w.sum().item() - spec.routed_scaling_factor) < 1e-5


@pytest.mark.parametrize("text", ["tokens { top_p 0.7; min_k 1; max_k 4 }", "tokens { min_p 0.2; max_k 4 }",
                                  "tokens when decode { min_p 0.25 }\n  tokens { top_p 0.8 }"])
def test_a_token_routes_the_same_alone_and_in_any_batch(text) -> None:
    """Per-token rules depend on the token alone: routed alone, inside a batch, or among padded rows."""
    for spec in (TINY_SOFTMAX, TINY_SIGMOID):
        ir = compile_policy(P("  " + text), spec)
        router = LayerRouter(ir, spec.moe_layers[-1])
        logits = torch.randn(16, spec.num_experts, generator=torch.Generator().manual_seed(1)) * 2
        bias = _bias(spec)
        batch = router(logits, RouteContext("decode", 16, 16), correction_bias=bias,
                       row_mask=torch.arange(16) < 12)
        for i in range(12):
            alone = router(logits[i:i + 1], RouteContext("decode", 1, 1), correction_bias=bias)
            assert torch.equal(alone.topk_ids[0], batch.topk_ids[i])
            assert torch.equal(alone.topk_weights[0], batch.topk_weights[i])


def test_alloc_t_by_contrast_depends_on_the_batch() -> None:
    """What the README says: Alloc-T shares a batch's slots, so a token's experts change with its batch."""
    spec = TINY_SOFTMAX
    ir = compile_policy(P("  budget 50%\n  layers { allocate uniform }\n  tokens { reallocate by score; max_k 4 }"),
                        spec)
    router = LayerRouter(ir, spec.moe_layers[0])
    logits = torch.randn(16, spec.num_experts, generator=torch.Generator().manual_seed(1)) * 2
    batch = router(logits, RouteContext("decode", 16, 16))
    alone = [router(logits[i:i + 1], RouteContext("decode", 1, 1)).topk_ids[0] for i in range(16)]
    assert any(not torch.equal(a, b) for a, b in zip(alone, batch.topk_ids))


def test_layer_overrides_and_conditions() -> None:
    ir = compile_policy(P("  tokens when decode {\n    min_p 0.3\n    layer 2..3: top_p 0.5\n    layer 5: min_p 0.1\n"
                          "    max_k 6\n  }"), DSV2)
    plans = ir.plans(RouteContext("decode", 4, 4))
    assert (plans[1].adaptive.kind, plans[1].adaptive.threshold) == ("min_p", pytest.approx(0.3))
    assert (plans[2].adaptive.kind, plans[3].adaptive.kind) == ("top_p", "top_p")
    assert plans[5].adaptive.threshold == pytest.approx(0.1) and plans[5].adaptive.max_k == 6
    assert all(p.adaptive is None for p in ir.plans(RouteContext("prefill", 1, 9)).values())
    assert plans[1].routed().mean is None and (plans[1].routed().lo, plans[1].routed().hi) == (1, 6)


def test_composes_with_sere_and_piggyback(tmp_path) -> None:
    """SERE re-routing and piggybacking run after the per-token rule, on the slots it kept."""
    spec = TINY_SOFTMAX
    sim = write_similarity(spec, tmp_path)
    ir = compile_policy(P(f'  tokens {{ top_p 0.6; max_k 4 }}\n  reroute {{ similarity "{sim.name}"; primary top 1 }}\n'
                          "  piggyback { max_k 4 }"), spec, base_dir=tmp_path)
    plan = ir.plan(spec.moe_layers[0], RouteContext("decode", 8, 8))
    assert plan.adaptive is not None and plan.reroute is not None and plan.piggyback is not None
    logits = torch.randn(8, spec.num_experts, generator=torch.Generator().manual_seed(2)) * 2
    d = LayerRouter(ir, spec.moe_layers[0]).details(logits, RouteContext("decode", 8, 8))
    kept = LayerRouter(compile_policy(P("  tokens { top_p 0.6; max_k 4 }"), spec), spec.moe_layers[0])(
        logits, RouteContext("decode", 8, 8))
    primaries = d.primary[0] if d.primary.dim() > 1 else d.primary
    for i in range(8):  # every slot the token holds after SERE is a primary, or was piggybacked on one
        held = [e for e in d.topk_ids[i].tolist() if e >= 0]
        assert held and all(bool(primaries[e]) for e in held)
        assert len(held) <= 4 and (kept.topk_ids[i] >= 0).sum() >= 1


def test_calibrated_threshold_gives_the_layer_plan_mean_on_its_trace(tmp_path) -> None:
    """`top_p calibrated from` picks per layer the threshold whose mean on the trace is the layer's k: replaying
    the trace gives exactly the reported mean, within one token's step of the target."""
    spec = load_spec(BROWN)
    trace = load_trace(CALIB)
    for kind in ("top_p", "min_p"):
        for body in ("layers { allocate uniform }",
                     'layers { allocate dp from "profiles/brown-moe.sens.yaml"; k >= 1 }'):
            shutil.copy(CALIB, tmp_path / "calib.trace.safetensors")
            (tmp_path / "profiles").mkdir(exist_ok=True)
            shutil.copy(ROOT / "policies" / "brown-moe" / "profiles" / "brown-moe.sens.yaml", tmp_path / "profiles")
            ir = compile_policy(P(f'  budget 25%\n  {body}\n  tokens {{ {kind} calibrated from '
                                  f'"calib.trace.safetensors"; max_k 8 }}'), spec, base_dir=tmp_path)
            for l, router in compile_routers(ir).items():
                plan = router.plan(RouteContext())
                ad = plan.adaptive
                assert ad.target == plan.k and ad.calibrated_mean is not None
                out = router(trace.router_logits[l].float(), RouteContext("prefill", 1, trace.num_tokens))
                mean = (out.topk_ids >= 0).sum(-1).double().mean().item()
                assert mean == pytest.approx(ad.calibrated_mean, abs=1e-9)
                assert abs(mean - plan.k) <= 2.0 / trace.num_tokens, (kind, l, mean, plan.k)
            assert "calibrated" in ir.plans(RouteContext())[0].adaptive.describe()


def test_calibration_against_a_grouped_biased_model(tmp_path) -> None:
    """Calibration scores the trace as the model routes (sigmoid + correction bias + group limit)."""
    spec = TINY_SIGMOID
    trace_path = tmp_path / "t.safetensors"
    from sgl_budget.traces import write_trace

    write_trace(synthetic_trace(spec, num_sequences=8, seq_len=32, seed=0), trace_path, dtype=torch.float32)
    ir = compile_policy(P('  budget 50%\n  layers { allocate uniform }\n  tokens { min_p calibrated from '
                          '"t.safetensors"; max_k 4 }'), spec, base_dir=tmp_path)
    trace = load_trace(trace_path)
    for l, router in compile_routers(ir).items():
        out = router(trace.router_logits[l], RouteContext("prefill", 1, trace.num_tokens),
                     correction_bias=trace.correction_bias[l])
        mean = (out.topk_ids >= 0).sum(-1).double().mean().item()
        assert mean == pytest.approx(router.plan(RouteContext()).adaptive.calibrated_mean)
        assert abs(mean - 2) <= 1.0 / trace.num_tokens + 1e-9


# -- errors: every one with file:line:column, a caret and a hint --------------------------------------------

ERRORS = [
    ("  tokens { }", "needs `reallocate by score` or a per-token rule", 2, 3),
    ("  tokens { reallocate by score; top_p 0.9 }", "either reallocates by score (Alloc-T) or keeps", 2, 33),
    ("  tokens { top_p 0.9; min_p 0.2 }", "a second per-token rule `min_p`", 2, 23),
    ("  tokens { top_p 0 }", "top_p 0 is out of range", 2, 18),
    ("  tokens { top_p 1.5 }", "top_p 1.5 is out of range", 2, 18),
    ("  tokens { min_p -0.1 }", "min_p -0.1 is out of range", 2, 18),
    ("  tokens { min_p 0.2; min_k 0 }", "min_k 0 is out of range", 2, 29),
    ("  tokens { min_p 0.2; min_k 4; max_k 2 }", "min_k 4 is above max_k 2", 2, 23),
    ("  tokens { top_p 0.9; layer 0: top_p 0.5 }", "layer 0 is not an MoE layer", 2, 29),
    ("  tokens { top_p 0.9; layer 1..3: top_p 0.5; layer 2: min_p 0.1 }", "layer 2's rule is set twice", 2, 46),
    ("  tokens { top_p 0.9; layer 1: top_p 2 }", "top_p 2 is out of range", 2, 38),
    ("  budget 50%\n  tokens { top_p 0.9 }", "may route up to max_k = 6 experts per token at layer 1, above the plan's "
     "k = 3", 3, 12),
    ("  budget 50%\n  tokens { top_p 0.9; max_k 5 }", "may route up to max_k = 5", 3, 29),
    ('  tokens { top_p calibrated from "missing.safetensors" }', "calibration trace not found: missing.safetensors",
     2, 34),
    ('  budget 50%\n  tokens { min_p calibrated from "t.safetensors"; min_k 4 }', "layer 1's k = 3 lies outside "
     "min_k..max_k = 4..6", 3, 12),
]


@pytest.mark.parametrize("body,message,line,column", ERRORS, ids=[e[1][:40] for e in ERRORS])
def test_bad_rules_are_policy_errors(body, message, line, column, tmp_path) -> None:
    from sgl_budget.traces import write_trace

    write_trace(synthetic_trace(DSV2, num_sequences=2, seq_len=8, seed=0), tmp_path / "t.safetensors")
    text = P(body)
    with pytest.raises(PolicyError) as ei:
        compile_policy(text, DSV2, file="bad.policy", base_dir=tmp_path)
    err = ei.value
    d = next((d for d in err.diagnostics if message in d.message), None)
    assert d is not None, err.format()
    assert (d.line, d.column) == (line, column), err.format()
    assert d.hint and "^" in d.format() and d.format().startswith(f"bad.policy:{line}:")


def test_every_error_of_a_block_is_reported() -> None:
    with pytest.raises(PolicyError) as ei:
        compile_policy(P("  tokens { top_p 7; min_k 0; max_k 99 }"), DSV2)
    msgs = [d.message for d in ei.value.diagnostics]
    assert len(msgs) == 3 and any("top_p 7" in m for m in msgs) and any("max_k 99" in m for m in msgs)


def test_trace_of_another_model_is_refused_at_its_name(tmp_path) -> None:
    from sgl_budget.traces import write_trace

    write_trace(synthetic_trace(TINY_SOFTMAX, num_sequences=2, seq_len=8, seed=0), tmp_path / "t.safetensors")
    with pytest.raises(PolicyError, match="calibration trace does not fit deepseek-v2-lite: it has 16 experts"):
        compile_policy(P('  tokens { top_p calibrated from "t.safetensors" }'), DSV2, base_dir=tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a trace")
    with pytest.raises(PolicyError, match="bad calibration trace"):
        compile_policy(P('  tokens { top_p calibrated from "junk.safetensors" }'), DSV2, base_dir=tmp_path)


def test_sglang_width_limit_names_the_rule() -> None:
    """A rule may route past the model's top-k only where the engine allows it (one source of truth)."""
    from sgl_budget.lang.limits import engine_problems

    ir = compile_policy(P("  tokens { top_p 0.9; max_k 8 }"), DSV2)
    problems = engine_problems(ir, "sglang")
    assert problems and "tokens max_k 8" in problems[0].message
    assert engine_problems(ir, "hf") == []


def test_explain_shows_thresholds_and_means(capsys) -> None:
    from sgl_budget.cli import main

    path = ROOT / "policies" / "brown-moe" / "alloc-l-top-p-50.policy"
    assert main(["explain", str(path), "--model-spec", str(BROWN), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    sit = got["situations"][0]
    assert sit["experts_per_token"]["exact"] is False
    assert sit["experts_per_token"]["mean"] == pytest.approx(4.0, abs=0.01)
    layers = sit["layers"]
    assert {v["adaptive"]["rule"] for v in layers.values()} == {"top_p"}
    assert all(abs(v["adaptive"]["calibrated_mean"] - v["k"]) < 0.01 for v in layers.values())
    assert len({v["k"] for v in layers.values()}) > 1  # Alloc-L's per-layer targets
    assert main(["explain", str(ROOT / "policies" / "ser-min-p.policy"), "--model-spec", "deepseek-v2-lite"]) == 0
    out = capsys.readouterr().out
    assert "data-dependent" in out and "min_p 0.3" in out


def test_bundled_rules_check() -> None:
    for name in ("top-p-half", "ser-min-p"):
        ir = load_policy(ROOT / "policies" / f"{name}.policy", DSV2)
        assert all(p.adaptive is not None for p in ir.plans(RouteContext()).values())


def test_explain_with_a_trace_gives_the_distribution(capsys) -> None:
    """`explain --trace`: per layer, the experts per token a calibrated rule routes on other tokens (held-out
    text: near, not exactly, the calibrated mean); a batch-level policy is sent to replay; a foreign trace is a
    one-line error."""
    from sgl_budget.cli import main

    test = ROOT / "policies" / "traces" / "brown-moe.test.trace.safetensors"
    path = ROOT / "policies" / "brown-moe" / "min-p-25.policy"
    assert main(["explain", str(path), "--model-spec", str(BROWN), "--json", "--trace", str(test)]) == 0
    got = json.loads(capsys.readouterr().out)
    layers = got["situations"][0]["on_trace"]
    assert set(layers) == {str(l) for l in range(8)}
    for v in layers.values():
        assert sum(v["histogram"]) == load_trace(test).num_tokens and 1 <= v["min"] <= v["median"] <= v["max"] <= 8
        assert abs(v["mean"] - 2.0) < 0.4 and v["p90"] > v["p10"]  # per token: spread around the target
    assert main(["explain", str(ROOT / "policies" / "brown-moe" / "alloc-lt-50.policy"), "--model-spec", str(BROWN),
                 "--trace", str(test)]) == 0
    assert "sgl-budget replay" in capsys.readouterr().out
    code = main(["explain", str(path), "--model-spec", str(BROWN), "--trace",
                 str(ROOT / "policies" / "traces" / "deepseek-v2-lite.synthetic.trace.safetensors")])
    assert code != 0 and "does not hold router logits" in capsys.readouterr().err


def test_replay_measures_a_confidence_rule_on_the_held_out_trace(capsys) -> None:
    """Replay routes the rule per token: on held-out traffic the mean is near (not at) the calibrated 4, and
    decode batches route the same whatever their size (per token)."""
    from sgl_budget.cli import main

    test = ROOT / "policies" / "traces" / "brown-moe.test.trace.safetensors"
    means = []
    for batch in (4, 16):
        assert main(["replay", str(ROOT / "policies" / "brown-moe" / "top-p-50.policy"), "--trace", str(test),
                     "--batch-size", str(batch), "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        row = got["policies"][0]
        means.append(row["mean"]["activations"])
        assert got["num_tokens"] > 1000 and abs(row["mean"]["activations"] - 4.0) < 0.3
    assert means[0] == pytest.approx(means[1], abs=1e-9)
