"""Ling / Bailing-MoE (``bailing_moe``) through SGLang's own MoE block (``BailingMoESparseMoeBlock``), in this
process, on CPU, without a transformers reference (transformers 5.19 has no Bailing-MoE class).

The block is built as ``BailingMoEBlock`` builds it for a sparse decoder layer, from a config object holding the
tiny ``config.json`` of ``tests/family_configs.py`` (the published Ling-2.0 field names: ``num_experts``,
``num_experts_per_tok``, ``num_shared_experts``, ``n_group`` / ``topk_group``, ``score_function``,
``moe_router_enable_expert_bias``, ``norm_topk_prob``, ``routed_scaling_factor``, ``router_dtype``,
``first_k_dense_replace``): a ``BailingMoEGate`` router with ``gate.expert_bias`` as the correction bias,
``TopK(use_grouped_topk=True, num_expert_group, topk_group, correction_bias, scoring_func='sigmoid',
renormalize=norm_topk_prob)``, a ``FusedMoE`` (on CPU: ``moe_forward_native``) and a shared ``BailingMoEMLP``. It runs
with sgl_budget's hooks as a ``--device cpu`` worker that routes with a policy has them (the fixture of
``tests/test_sglang_blocks.py``), and is checked:

* own-k through sgl_budget's reference router (the stock fast path off) picks SGLang's own ``select_experts``'
  experts, with bit for bit the weights of SGLang's ``biased_grouped_topk_impl`` run eagerly (the stock path runs it
  ``torch.compile``-d, which rounds differently by at most an ulp: weights and output agree to float32 rounding);
* under uniform 50% and Alloc-T, the plugin's routing equals sgl_budget's reference routing
  (:class:`~sgl_budget.routing.LayerRouter` under :func:`~sgl_budget.engines.sglang.routing.sglang_conventions`)
  of the same router logits, in the route context SGLang's hook gives a direct block call, and the block output
  equals its experts and shared MLP combined in plain torch with those weights (a computation independent of
  SGLang's runner; the same combination reproduces SGLang's stock block from SGLang's own routing).

The blocks use ``routed_scaling_factor`` 1: SGLang 0.5.23 applies that factor in its GPU MoE runners
(``fused_experts``' combine), never on CPU (``moe_forward_native``), so with the published 2.5 SGLang's CPU block is
its experts combined with the unscaled weights — :func:`test_cpu_path_leaves_out_the_routed_scaling_factor` pins
that down.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

if os.environ.get("SGL_BUDGET_REQUIRE_SGLANG"):
    import sglang  # noqa: F401  (CI: a missing sglang is a failure, not a skip)
pytest.importorskip("sglang", reason="install the sglang extra: pip install -e '.[sglang]'")
pytest.importorskip("transformers", reason="install the hf extra: pip install -e '.[hf]'")

from family_configs import CHECK_ONLY  # noqa: E402
from test_sglang_blocks import (ALLOC_T, TOKENS, UNIFORM_50, _use, _x, finish_loading, randomise,  # noqa: E402,F401
                                sglang_cpu)

from sgl_budget.engines.sglang.context import route_context  # noqa: E402
from sgl_budget.engines.sglang.routing import sglang_conventions  # noqa: E402
from sgl_budget.engines.sglang.settings import model_spec_for  # noqa: E402
from sgl_budget.lang import compile_policy  # noqa: E402
from sgl_budget.routing import LayerRouter  # noqa: E402

LAYER = 1  # the first sparse layer (first_k_dense_replace 1)
CONFIG = {**CHECK_ONLY["bailing_moe"], "routed_scaling_factor": 1.0, "torch_dtype": "float32"}


def _build(directory, cfg: dict) -> SimpleNamespace:
    from sglang.srt.models.bailing_moe import BailingMoEBlock, BailingMoESparseMoeBlock
    from transformers import PretrainedConfig

    (directory / "config.json").write_text(json.dumps(cfg))
    config = PretrainedConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    assert BailingMoEBlock._is_layer_sparse(config, LAYER, is_nextn=False)
    sgl = BailingMoESparseMoeBlock(layer_id=LAYER, config=config, quant_config=None, alt_stream=None,
                                   prefix=f"model.layers.{LAYER}.mlp").eval()
    tc = sgl.topk.topk_config
    assert tc.use_grouped_topk and tc.correction_bias is not None and tc.renormalize
    assert tc.scoring_func == "sigmoid" and tc.custom_routing_function is None
    assert (tc.num_expert_group, tc.topk_group, tc.top_k) == (cfg["n_group"], cfg["topk_group"], 4)
    assert sgl.gate.weight.dtype == torch.float32  # router_dtype fp32
    g = randomise(sgl.named_parameters(), router="gate.weight")  # router weights ~ N(0, 0.5): decisive routing
    with torch.no_grad():
        sgl.gate.expert_bias.copy_(torch.randn(16, generator=g) * 0.1)
    finish_loading(sgl)
    spec = model_spec_for(str(directory))  # the spec the launcher publishes to the workers
    assert spec.model_type == "bailing_moe" and spec.is_moe_layer(LAYER) and not spec.is_moe_layer(0)
    assert (spec.num_experts, spec.top_k, spec.n_group, spec.topk_group) == (16, 4, 4, 2)
    assert spec.scoring_func == "sigmoid" and spec.has_correction_bias and spec.norm_topk_prob
    return SimpleNamespace(name="bailing_moe", sgl=sgl, spec=spec, dir=directory)


@pytest.fixture(scope="module")
def ling(sglang_cpu, tmp_path_factory):
    return _build(tmp_path_factory.mktemp("bailing_moe"), CONFIG)


def _run(family, x: torch.Tensor):
    """SGLang's block on ``x`` ``[1, T, H]``: its output ``[T, H]``, the TopK output and the router logits."""
    seen, logits = [], []
    hooks = [family.sgl.topk.register_forward_hook(lambda m, a, out: seen.append(out)),
             family.sgl.gate.register_forward_hook(lambda m, a, out: logits.append(out))]
    try:
        with torch.no_grad():
            out = family.sgl(x.reshape(-1, x.shape[-1]))
    finally:
        for h in hooks:
            h.remove()
    (topk_out,), (router_logits,) = seen, logits
    return out, topk_out, router_logits


def _combine(family, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The block's output computed in plain torch from its own weights: sum over kept slots of
    weight x expert(x) (SiLU(gate) * up, then down), plus the shared MLP."""
    sgl = family.sgl
    h = x.reshape(-1, x.shape[-1])
    w13, w2 = sgl.experts.w13_weight, sgl.experts.w2_weight  # [E, 2I, H] (gate rows first), [E, H, I]
    inter = w2.shape[-1]
    out = torch.zeros_like(h)
    with torch.no_grad():
        for t in range(h.shape[0]):
            for w, e in zip(weights[t].tolist(), ids[t].tolist()):
                if w == 0 or e < 0:
                    continue
                gu = w13[e] @ h[t]
                out[t] += w * (w2[e] @ (torch.nn.functional.silu(gu[:inter]) * gu[inter:]))
        out += sgl.shared_experts(h)
    return out


def _reference(family, policy: str, router_logits: torch.Tensor):
    """sgl_budget's reference routing of these logits under SGLang's conventions for this block's TopK."""
    tc = family.sgl.topk.topk_config
    router = LayerRouter(compile_policy(policy, family.spec), LAYER, sglang_conventions(tc))
    return router(router_logits, route_context(router_logits.shape[0], None), correction_bias=tc.correction_bias)


def _same_routing(got_w, got_ids, want_w, want_ids, what: str) -> None:
    """Equal (token, expert) -> weight maps (slot order aside), padded slots (weight 0) left out."""
    for t in range(got_ids.shape[0]):
        g = {int(e): float(w) for e, w in zip(got_ids[t], got_w[t]) if w > 0}
        r = {int(e): float(w) for e, w in zip(want_ids[t], want_w[t]) if w > 0}
        assert g == r, f"{what}, token {t}: {g} != {r}"


def test_own_k_is_sglang_routing(ling) -> None:
    """Own-k through sgl_budget's reference router (stock fast path off) picks SGLang's experts, in SGLang's slot
    order, with bit for bit the weights of SGLang's ``biased_grouped_topk_impl`` run eagerly; the stock path runs that
    function ``torch.compile``-d (inductor on CPU), whose fused sigmoid / renormalisation rounds differently by at most
    an ulp, so against stock the weights and the block output agree to float32 rounding."""
    from sglang.srt.layers.moe import topk as T

    x = _x(1, TOKENS, 2)
    _use(ling, None)  # no policy: the hook hands every call to SGLang's own select_experts
    stock, stock_topk, logits = _run(ling, x)
    assert int((stock_topk.topk_weights > 0).sum()) == TOKENS * 4
    _use(ling, 'policy "own-k" { layers { k = 4 } }', stock_fast_path=False)
    own, own_topk, own_logits = _run(ling, x)
    assert torch.equal(own_logits, logits)
    assert torch.equal(own_topk.topk_ids, stock_topk.topk_ids)
    tc = ling.sgl.topk.topk_config
    compiled = T.biased_grouped_topk_impl
    eager = getattr(compiled, "_torchdynamo_orig_callable", None) or compiled.__wrapped__
    w, ids = eager(x.reshape(-1, x.shape[-1]), logits, tc.correction_bias, 4, True, tc.num_expert_group, tc.topk_group)
    assert torch.equal(ids, own_topk.topk_ids) and torch.equal(w, own_topk.topk_weights)
    torch.testing.assert_close(own_topk.topk_weights, stock_topk.topk_weights, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(own, stock, rtol=1e-6, atol=1e-6)
    # the plain-torch combination reproduces SGLang's CPU block from its own routing (unscaled weights)
    torch.testing.assert_close(_combine(ling, x, stock_topk.topk_weights, stock_topk.topk_ids), stock,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", [UNIFORM_50, ALLOC_T], ids=["uniform-50", "alloc-t"])
def test_policy_block_equals_the_reference_routing(ling, policy) -> None:
    from sgl_budget.engines.sglang.native_moe import native_path_skips_minus_one

    x = _x(1, TOKENS, 3)
    _use(ling, None)
    stock, _, _ = _run(ling, x)
    _use(ling, policy)
    got, topk_out, logits = _run(ling, x)
    want_w, want_ids = _reference(ling, policy, logits)
    kept = topk_out.topk_weights > 0
    assert int(kept.sum()) == int((want_w > 0).sum()) == TOKENS * 4 // 2  # 50% of the model's top-k
    padded = topk_out.topk_ids[~kept]  # -1 where the native MoE path skips it (no AMX), else an unused expert
    assert bool((padded == -1).all() if native_path_skips_minus_one() else (padded >= 0).all())
    _same_routing(topk_out.topk_weights, topk_out.topk_ids, want_w, want_ids, f"bailing_moe {policy}")
    want = _combine(ling, x, want_w, want_ids)
    assert not torch.allclose(want, stock, rtol=1e-3, atol=1e-3)  # the policy really changes the output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cpu_path_leaves_out_the_routed_scaling_factor(sglang_cpu, tmp_path) -> None:
    """With the published routed_scaling_factor (2.5) SGLang's CPU block is its experts combined with the unscaled
    weights: SGLang leaves the factor to its MoE runner (``moe_runner_config``, applied by the GPU runners' combine),
    which ``moe_forward_native`` never applies. sgl_budget's SGLang routing follows SGLang (TopK does not scale:
    ``apply_routed_scaling_factor_on_output`` False), so a policy is scaled exactly where stock routing is."""
    k = _build(tmp_path, {**CONFIG, "routed_scaling_factor": 2.5})
    assert k.spec.routed_scaling_factor == 2.5
    assert k.sgl.experts.moe_runner_config.routed_scaling_factor == 2.5
    assert not k.sgl.topk.topk_config.apply_routed_scaling_factor_on_output
    assert not sglang_conventions(k.sgl.topk.topk_config).apply_routed_scaling
    x = _x(1, TOKENS, 2)
    _use(k, None)
    got, topk_out, _ = _run(k, x)
    w, ids = topk_out.topk_weights, topk_out.topk_ids
    assert torch.allclose(w.sum(-1), torch.ones(TOKENS), atol=1e-5)  # renormalised, not scaled
    torch.testing.assert_close(got, _combine(k, x, w, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, _combine(k, x, w * 2.5, ids), rtol=1e-3, atol=1e-3)
