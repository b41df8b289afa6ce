"""DeepSeek-V4 (``deepseek_v4``) through SGLang's own MoE block, in this process, on CPU.

SGLang 0.5.23 builds DeepSeek-V4's MoE layers as ``DeepseekV2MoE(..., is_deepseek_v4=True)``
(``DeepseekV4DecoderLayerBase``): a ``MoEGate`` router with ``gate.e_score_correction_bias``, a
``TopK(scoring_func='sqrtsoftplus', use_grouped_topk=False, correction_bias, renormalize=norm_topk_prob)`` for the
routed layers and a ``HashTopK`` (experts from ``tid2eid[input_ids]``, never ``select_experts``) for the first
``num_hash_layers`` layers, a ``FusedMoE`` (on CPU: ``moe_forward_native``) and a shared ``DeepseekV2MLP``; on CPU the
block multiplies the routed output by ``routed_scaling_factor`` after the experts (``forward_normal``). Here that block
is built from the config object SGLang's ``get_config`` makes of the tiny ``config.json``
(``tests/family_configs.py``), runs with sgl_budget's hooks as a ``--device cpu`` worker that routes with a policy has
them (the fixture of ``tests/test_sglang_blocks.py``), and holds the transformers 5.19 ``DeepseekV4SparseMoeBlock``'s
weights, loaded by the checkpoint names ``DeepseekV4ForCausalLM.load_weights`` maps them to (``mlp.gate.weight``,
``mlp.gate.e_score_correction_bias``, ``mlp.topk.tid2eid``, ``mlp.experts.{e}.{gate,up,down}_proj.weight``,
``mlp.shared_experts.{gate,up,down}_proj.weight``), then ``process_weights_after_loading``:

* a routed layer, stock (no policy, and an own-k policy through sgl_budget's reference router): SGLang's block ==
  the transformers block (``DeepseekV4TopKRouter``: sqrt(softplus(logits)) + bias, torch.topk(sorted=False), the
  unbiased scores renormalised by sum + 1e-20, x routed_scaling_factor);
* uniform 50% and Alloc-T: SGLang's block == the transformers block under :func:`sgl_budget.engines.hf.apply_policy`;
* a hash layer (not in the spec's MoE layers) with a policy installed: SGLang's block == the transformers block, stock.

Two CPU stand-ins, neither in the routing: SGLang's shared MLP computes its clamped SwiGLU (``swiglu_limit``) with a
CUDA JIT kernel (``silu_and_mul_clamp``), so the test drops its limit (plain SiLU-and-mul), and the hash layer's
``HashTopK`` runs its torch path (``SGLANG_OPT_USE_FUSED_HASH_TOPK=0``; the fused ``hash_topk`` is a CUDA JIT kernel);
:func:`_limit_never_binds` checks that no activation reaches the limit, so the limit changes nothing here.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

if os.environ.get("SGL_BUDGET_REQUIRE_SGLANG"):
    import sglang  # noqa: F401  (CI: a missing sglang is a failure, not a skip)
    import transformers  # noqa: F401
pytest.importorskip("sglang", reason="install the sglang extra: pip install -e '.[sglang]'")
transformers = pytest.importorskip("transformers", reason="install the hf extra: pip install -e '.[hf]'")

from family_configs import DEEPSEEK_V4  # noqa: E402
from test_sglang_blocks import (ALLOC_T, SPEC_FIELDS, TOKENS, UNIFORM_50, _close, _sglang, _use,  # noqa: E402,F401
                                _x, block_family, check_policy_block, check_stock_block, hf_model, load_per_expert,
                                randomise, sglang_cpu)

ROUTED, HASHED = 1, 0  # num_hash_layers 1: layer 0 picks experts by token id, layers 1.. route
CONFIG = {**DEEPSEEK_V4, "torch_dtype": "float32", "dtype": "float32"}


def _build(directory, layer: int):
    from sglang.srt.models.deepseek_v2 import DeepseekV2MoE
    from sglang.srt.utils.hf_transformers.config import get_config

    (directory / "config.json").write_text(json.dumps(CONFIG))
    config = get_config(str(directory), trust_remote_code=False)  # the config object SGLang's model receives
    assert config.model_type == "deepseek_v4" and config.num_hash_layers == 1
    sgl = DeepseekV2MoE(config=config, layer_id=layer, quant_config=None, prefix=f"model.layers.{layer}.mlp",
                        is_deepseek_v4=True).eval()
    sgl.shared_experts.swiglu_limit = None  # stand-in: the clamped SwiGLU is a CUDA JIT kernel (see the docstring)
    assert sgl.num_fused_shared_experts == 0 and sgl.shared_experts is not None
    model, block = hf_model(CONFIG, layer) if layer == ROUTED else _hf_hash_model()
    g = randomise(block.named_parameters(), router="gate.weight")  # router weights ~ N(0, 0.5): decisive routing
    router = {"mlp.gate.weight": block.gate.weight}
    with torch.no_grad():
        if layer == ROUTED:
            tc = sgl.topk.topk_config
            assert type(sgl.topk).__name__ == "TopK" and not tc.use_grouped_topk and tc.renormalize
            assert tc.scoring_func == "sqrtsoftplus" and tc.correction_bias is not None and tc.top_k == 4
            assert not tc.apply_routed_scaling_factor_on_output  # the CPU block scales after the experts
            block.gate.e_score_correction_bias.copy_(torch.randn(16, generator=g) * 0.1)  # a buffer (zeros at init)
            router["mlp.gate.e_score_correction_bias"] = block.gate.e_score_correction_bias
        else:
            assert type(sgl.topk).__name__ == "HashTopK" and sgl.gate.e_score_correction_bias is None
            # distinct experts per token id, as a real table holds them (SGLang's moe_forward_native counts each once)
            table = torch.rand(block.gate.tid2eid.shape[0], 16, generator=g).argsort(dim=-1)[:, :4]
            block.gate.tid2eid.copy_(table)
            router["mlp.topk.tid2eid"] = block.gate.tid2eid.to(torch.int32)
    load_per_expert(sgl, block, router, ("gate_proj", "up_proj", "down_proj"), experts="mlp.experts",
                    shared="mlp.shared_experts", prefix="mlp.", unstacked="mlp.experts.")
    return model, block, sgl


def _hf_hash_model():
    model, _ = hf_model(CONFIG, ROUTED)
    block = model.model.layers[HASHED].mlp
    assert block.is_hash and type(block.gate).__name__ == "DeepseekV4HashRouter"
    return model, block


@pytest.fixture(scope="module")
def dsv4(sglang_cpu, tmp_path_factory):
    directory = tmp_path_factory.mktemp("deepseek_v4")
    model, block, sgl = _build(directory, ROUTED)
    family = block_family("deepseek_v4", sgl, model, block, directory)
    assert family.spec.moe_layers == (1, 2, 3) and family.spec.scoring_func == "sqrtsoftplus"
    assert family.spec.routed_scaling_factor == 1.5 and not family.spec.grouped
    return family


def _limit_never_binds(block, x: torch.Tensor) -> None:
    """No gate / up activation of the shared MLP or of any expert reaches swiglu_limit on ``x`` (so SGLang's CPU
    paths, which drop the clamp, compute what transformers' clamped SwiGLU does)."""
    limit = block.shared_experts.limit
    h = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        acts = [block.shared_experts.gate_proj(h), block.shared_experts.up_proj(h),
                torch.einsum("th,eih->eti", h, block.experts.gate_up_proj)]
    assert max(float(a.abs().max()) for a in acts) < limit


def test_stock_block_equals_transformers(dsv4) -> None:
    _limit_never_binds(dsv4.block, _x(1, TOKENS, 2))
    check_stock_block(dsv4)


@pytest.mark.parametrize("policy", [UNIFORM_50, ALLOC_T], ids=["uniform-50", "alloc-t"])
def test_policy_block_equals_the_adapter(dsv4, policy) -> None:
    _limit_never_binds(dsv4.block, _x(1, TOKENS, 3))
    check_policy_block(dsv4, policy)


def test_hash_layer_stays_stock_under_a_policy(dsv4, tmp_path, monkeypatch) -> None:
    """Layer 0 routes by token id (HashTopK: SGLang never calls select_experts there; the adapter leaves it): with a
    policy installed in both engines its output is the stock transformers block's, all top-k experts per token."""
    monkeypatch.setenv("SGLANG_OPT_USE_FUSED_HASH_TOPK", "0")  # the torch path (the fused kernel is CUDA JIT)
    model, block, sgl = _build(tmp_path, HASHED)
    assert not dsv4.spec.is_moe_layer(HASHED)
    x = _x(1, TOKENS, 5)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, TOKENS), generator=torch.Generator().manual_seed(6))
    _limit_never_binds(block, x)
    routed = []
    hook = block.gate.register_forward_hook(lambda m, a, out: routed.append(out))
    try:
        with torch.no_grad():
            want = block(x, input_ids=ids)
            with apply_policy(model, compile_policy(UNIFORM_50, dsv4.hf_spec)):
                under_policy = block(x, input_ids=ids)
    finally:
        hook.remove()
    (_, w0, i0), (_, w1, i1) = routed  # the adapter leaves the hash router alone: the same experts and weights
    assert torch.equal(i0, i1) and torch.equal(w0, w1)
    # (a padding policy runs transformers' eager experts: the same sums, maybe in another order)
    _close(under_policy, want, "deepseek_v4 hash layer under the adapter")
    _use(dsv4, UNIFORM_50)  # the routed layers' policy, in this process's plugin state
    from sgl_budget.engines.sglang import plugin

    routing, calls = plugin._STATE["routing"], []
    monkeypatch.setattr(routing, "select_experts", lambda *a, **k: calls.append(k) or pytest.fail("select_experts"))
    seen = []
    hook = sgl.topk.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            got = sgl(x.reshape(TOKENS, -1), input_ids_global=ids.reshape(-1))
    finally:
        hook.remove()
    (out,) = seen
    assert not calls and not routing.routers  # sgl_budget's select_experts hook never saw the hash layer
    assert torch.equal(out.topk_ids.long(), block.gate.tid2eid[ids.reshape(-1)])
    assert int((out.topk_weights > 0).sum()) == TOKENS * dsv4.spec.top_k
    _close(got.reshape(x.shape), want, "deepseek_v4 hash layer under a policy")


from sgl_budget.engines.hf import apply_policy  # noqa: E402
from sgl_budget.lang import compile_policy  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_own_k_routing_is_select_experts_bit_for_bit(dsv4, dtype) -> None:
    """The routed layers' TopK through SGLang's own select_experts on its CPU path (torch-native: sqrt(softplus) in the
    logits' dtype, + the float32 bias, torch.topk(sorted=False), weights / (float32 sum + 1e-20)) == sgl_budget's
    reference router of the model's own k under sglang_conventions, weights and ids bit for bit; and 50% of k keeps
    the best-scoring half of those experts, renormalised the same way."""
    from sglang.srt.layers.moe import topk as T

    from sgl_budget.engines.sglang.routing import sglang_conventions
    from sgl_budget.lang.ir import RouteContext
    from sgl_budget.routing import LayerRouter

    _use(dsv4, None)  # no policy: the hook hands select_experts to SGLang's own
    tc = dsv4.sgl.topk.topk_config
    logits = (torch.randn(64, 16, generator=torch.Generator().manual_seed(7)) * 2).to(dtype)
    saved, tc.torch_native = tc.torch_native, True  # what TopK.forward_native sets on CPU
    try:
        out = T.select_experts(torch.zeros(64, 64, dtype=dtype), logits, tc, layer_id=ROUTED)
    finally:
        tc.torch_native = saved
    conv = sglang_conventions(tc)
    assert conv.scores_in_logit_dtype and conv.renorm_sum_fp32 and not conv.sorted_selection
    assert not conv.apply_routed_scaling  # the CPU block scales after the experts
    ctx = RouteContext("decode", 64, 64)
    own = LayerRouter(compile_policy('policy "own" { layers { k = 4 } }', dsv4.spec), ROUTED, conv)
    w, ids = own(logits, ctx, correction_bias=tc.correction_bias)
    assert torch.equal(ids.to(out.topk_ids.dtype), out.topk_ids) and torch.equal(w, out.topk_weights)
    half = LayerRouter(compile_policy(UNIFORM_50, dsv4.spec), ROUTED, conv)
    hw, hids = half(logits, ctx, correction_bias=tc.correction_bias)
    scores = torch.nn.functional.softplus(logits).sqrt()
    best = (scores.float() + tc.correction_bias).topk(2, dim=-1).indices
    assert torch.equal(hids[:, :2].sort(dim=-1).values, best.sort(dim=-1).values) and bool((hids[:, 2:] == -1).all())
    raw = scores.gather(1, hids[:, :2].long())
    torch.testing.assert_close(hw[:, :2], raw / (raw.sum(-1, keepdim=True, dtype=torch.float32) + 1e-20), rtol=0,
                               atol=0)
