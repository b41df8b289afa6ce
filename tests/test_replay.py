"""Replay metrics checked by hand on small traces, and the policy-testing helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sgl_budget.lang import compile_policy
from sgl_budget.replay import plot_report, replay
from sgl_budget.testing import assert_mass_retained, assert_unique_reduction, assert_within_budget, check_policy
from sgl_budget.traces import decode_index, synthetic_trace

from conftest import TINY_NORENORM, TINY_SIGMOID


def test_stock_metrics_by_hand() -> None:
    spec = TINY_NORENORM
    trace = synthetic_trace(spec, num_sequences=8, seq_len=6, seed=2)
    ir = compile_policy('policy "k2" { layers { k = 2 } }', spec)
    rep = replay([ir], trace, batch_size=4)
    idx = decode_index(trace, 4)
    nb = idx.shape[0]
    assert rep.num_batches == nb == 10 and rep.num_tokens == 40  # 2 groups x 5 decode steps
    for l in spec.moe_layers:
        x = trace.router_logits[l].float()[idx]  # [N, B, E]
        p = torch.softmax(x, -1)
        top = p.topk(spec.top_k, dim=-1)
        uniq = sum(len(set(top.indices[n].flatten().tolist())) for n in range(nb)) / nb
        assert rep.stock.layers[l].unique == pytest.approx(uniq)
        assert rep.stock.layers[l].routing_mass == pytest.approx(float(top.values.sum(-1).mean()), rel=1e-5)
        assert rep.stock.layers[l].activations == spec.top_k
        top2 = p.topk(2, dim=-1)
        pol = rep.policies[0].layers[l]
        assert pol.activations == 2
        assert pol.routing_mass == pytest.approx(float(top2.values.sum(-1).mean()), rel=1e-5)
        assert pol.unique == pytest.approx(sum(len(set(top2.indices[n].flatten().tolist())) for n in range(nb)) / nb)
    # estimated decode time: unique-expert bytes plus the shared experts every layer reads
    eb, sb = spec.expert_bytes, spec.shared_expert_bytes
    pol, st = rep.policies[0], rep.stock
    want = sum(pol.layers[l].unique * eb + sb for l in spec.moe_layers) / sum(
        st.layers[l].unique * eb + sb for l in spec.moe_layers)
    assert rep.time_ratio(pol) == pytest.approx(want)
    assert 0 < want < 1
    d = rep.to_dict()
    assert d["policies"][0]["activations_ratio"] == pytest.approx(2 / 4)
    # one definition of mass retained (fraction of stock's routing mass) in the report, its JSON and the helper
    want_mass = rep.policies[0].mean("routing_mass") / rep.stock.mean("routing_mass")
    assert rep.mass_retained(rep.stock) == 1.0 and rep.mass_retained(rep.policies[0]) == pytest.approx(want_mass)
    assert d["stock"]["mass_retained"] == 1.0 and d["policies"][0]["mass_retained"] == pytest.approx(want_mass)
    assert check_policy(ir, trace, batch_size=4).mass_retained == pytest.approx(want_mass)


def test_sigmoid_model_replay_uses_correction_bias() -> None:
    spec = TINY_SIGMOID
    trace = synthetic_trace(spec, num_sequences=4, seq_len=4, seed=1)
    ir = compile_policy('policy "stock" { }', spec)
    rep = replay([ir], trace, batch_size=4)
    for l in spec.moe_layers:
        assert rep.policies[0].layers[l] == rep.stock.layers[l]


def test_plot(tmp_path) -> None:
    spec = TINY_NORENORM
    trace = synthetic_trace(spec, num_sequences=4, seq_len=4)
    rep = replay([compile_policy('policy "k1" { layers { k = 1 } }', spec)], trace, batch_size=2)
    out = plot_report(rep, tmp_path / "p.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_policy_check_helpers() -> None:
    spec = TINY_NORENORM
    trace = synthetic_trace(spec, num_sequences=16, seq_len=8, seed=4)
    half = check_policy(compile_policy('policy "h" { budget 50% }', spec), trace, batch_size=8)
    assert_within_budget(half)
    assert_unique_reduction(half, at_least=0.05)
    assert_mass_retained(half, at_least=0.5)
    with pytest.raises(AssertionError, match="below 0.99") as err:
        assert_mass_retained(half, at_least=0.99)
    msg = str(err.value)  # one quantity throughout the message: fractions of stock's routing mass
    assert f"mass retained {half.mass_retained:.4f} (of stock top-k's routing mass)" in msg and "of stock's" in msg
    assert f"{half.routing_mass:.4f}" not in msg
    stock = check_policy(compile_policy('policy "s" { }', spec), trace, batch_size=8)
    with pytest.raises(AssertionError, match="cuts unique experts per batch by 0.00%"):
        assert_unique_reduction(stock, at_least=0.1)
    # the compiler already rejects plans above budget, so feed the helper a report whose routing overspent
    import dataclasses

    bad = dataclasses.replace(half.result.layers[1], activations=3.5)
    half.result.layers[1] = bad
    with pytest.raises(AssertionError, match="exceed its budget of 2"):
        assert_within_budget(half)


def test_plot_styles_are_distinct_for_every_bundled_policy() -> None:
    """17 series (stock + 16 brown-moe policies) get 16 distinct colour+marker+line-style combinations."""
    from sgl_budget.replay.plot import family, series_styles

    root = Path(__file__).resolve().parent.parent / "policies" / "brown-moe"
    names = [p.stem for p in sorted(root.glob("*.policy"))]
    styles = series_styles(names)
    combos = {(s["color"], s["marker"], s["linestyle"]) for s in styles.values()}
    assert len(names) >= 16 and len(combos) == len(names)
    assert styles["uniform-25"]["color"] == styles["uniform-75"]["color"] != styles["sere-25"]["color"]
    assert family("alloc-moe-sere-50") == "alloc-moe-sere" and family("sere-own-k") == "sere-own-k"
    many = series_styles([f"family{i}-{b}" for i in range(14) for b in (25, 50, 75)])  # more families than colours
    assert len({(s["color"], s["marker"], s["linestyle"]) for s in many.values()}) == 42
