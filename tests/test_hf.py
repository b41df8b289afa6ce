"""The transformers adapter on real transformers MoE classes (tiny random configs, CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("SGL_BUDGET_REQUIRE_SGLANG"):
    import transformers  # noqa: F401  (CI installs it with the sglang extra: it must not skip)
transformers = pytest.importorskip("transformers", reason="install the hf extra: pip install -e '.[hf]'")

from sgl_budget.engines.hf import UnsupportedModel, apply_policy, moe_blocks, spec_of  # noqa: E402
from sgl_budget.engines.hf.adapter import _attr_path, router_of  # noqa: E402
from sgl_budget.families import FAMILIES, family_of  # noqa: E402
from sgl_budget.lang import compile_policy  # noqa: E402

COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, tie_word_embeddings=False)
CONFIGS = {
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**COMMON, head_dim=8, intermediate_size=48,
                                                     moe_intermediate_size=16, num_experts=16,
                                                     num_experts_per_tok=4, norm_topk_prob=True),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                                                     shared_expert_intermediate_size=24, num_experts=16,
                                                     num_experts_per_tok=4, norm_topk_prob=False),
    "olmoe": lambda: transformers.OlmoeConfig(**COMMON, intermediate_size=16, num_experts=16,
                                              num_experts_per_tok=4, norm_topk_prob=False),
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=8,
                                                  num_experts_per_tok=2),
    "deepseek_v2": lambda: transformers.DeepseekV2Config(
        **COMMON, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4,
        n_shared_experts=1, first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=1.5, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4,
        v_head_dim=8, norm_topk_prob=False),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **COMMON, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4,
        n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
        norm_topk_prob=True),
}


def _from_family_config(model_type: str):
    """A transformers config from the family's tiny config.json dict (tests/family_models.py, family_configs.py)."""
    from family_configs import CHECK_ONLY
    from family_models import CONFIGS as BUILT

    cfg = {**CHECK_ONLY, **BUILT}[model_type]
    return lambda: transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})


for _mt in ("qwen3_next", "qwen3_5_moe_text", "glm4_moe", "glm4_moe_lite", "hunyuan_v1_moe", "minimax_m2",
            "ernie4_5_moe", "gpt_oss", "kimi_linear", "deepseek_v4"):
    CONFIGS[_mt] = _from_family_config(_mt)


def _gemma4_text():
    """Gemma 4's text model (model_type gemma4_text: the gemma4 row), what AutoModelForCausalLM loads from its
    language model; the multimodal checkpoint is tested in test_gemma4_multimodal_routes_its_language_model."""
    from family_configs import GEMMA4_TEXT

    return transformers.AutoConfig.for_model(**{k: v for k, v in GEMMA4_TEXT.items() if k != "architectures"})


CONFIGS["gemma4"] = _gemma4_text


def test_every_family_the_adapter_takes_is_tested_here() -> None:
    from sgl_budget.families import FAMILY_LIST

    assert {f.model_type for f in FAMILY_LIST if f.hf_ok} == set(CONFIGS)


def build(name: str):
    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for block in moe_blocks(model).values():  # random routers (some init to zeros) and biases
            router = router_of(model, block)  # block.gate; GPT-OSS: block.router, a linear with a bias
            facts = family_of(model.config.model_type).hf
            _attr_path(router, facts.router_weight).normal_(0, 0.5)  # gate.weight; Hunyuan: wg; Gemma 4: proj
            if facts.router_bias:  # a router bias in the logits (zeros at init)
                router.bias.normal_(0, 0.5)
            if facts.expert_scale:  # Gemma 4's per-expert scale and router input scale (ones at init)
                _attr_path(router, facts.expert_scale).uniform_(0.5, 2.0)
                router.scale.uniform_(0.5, 1.5)
            # the bias lives on the router, on the block (MiniMax-M2) or in the router's moe_statics (ERNIE)
            for owner in (router, block, getattr(router, "moe_statics", None)):
                if getattr(owner, "e_score_correction_bias", None) is not None:
                    owner.e_score_correction_bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_own_k_leaves_logits_unchanged(name: str) -> None:
    model = build(name)
    spec = spec_of(model)
    assert list(spec.moe_layers) == sorted(moe_blocks(model))
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with apply_policy(model, compile_policy(f'policy "own" {{ layers {{ k = {spec.top_k} }} }}', spec)):
            got = model(input_ids=ids).logits
            empty = apply_policy(model, compile_policy('policy "none" { }', spec))
            got2 = model(input_ids=ids).logits
            empty.remove()
        after = model(input_ids=ids).logits
    assert torch.equal(got, want), name
    assert torch.equal(got2, want), name
    assert torch.equal(after, want)  # removing the policy restores the model's own routing


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reduced_budget_changes_logits_and_k(name: str) -> None:
    model = build(name)
    spec = spec_of(model)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    seen = {}
    if spec.top_k != 4:
        pytest.skip("the slot count below is for top-4 models")
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with apply_policy(model, compile_policy(
                'policy "t" { budget 25%; tokens { reallocate by score; min_k 0; max_k 4 } }', spec)):
            for layer, block in moe_blocks(model).items():
                router_of(model, block).register_forward_hook(
                    lambda m, a, out, layer=layer: seen.__setitem__(layer, out))
            got = model(input_ids=ids).logits
    assert not torch.equal(got, want)
    assert set(seen) == set(spec.moe_layers)
    for layer, (logits, weights, idx) in seen.items():
        assert idx.shape == (18, spec.top_k)
        real = idx < spec.num_experts
        assert int(real.sum()) == 18 * 1  # Alloc-T: the layer's 18 x k slots (k = 1 at 25% of top-4)
        assert (weights[~real] == 0).all() and bool((~real).any())  # padding: index num_experts, weight 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_confidence_rule_through_every_family(name: str) -> None:
    """A per-token min-p rule through the real transformers class: tokens get different numbers of experts
    (within min_k..max_k, padding weight 0), and a sequence's logits do not change with its batch."""
    model = build(name)
    spec = spec_of(model)
    ir = compile_policy(f'policy "m" {{ tokens {{ min_p 0.6; min_k 1; max_k {spec.top_k} }} }}', spec)
    ids = torch.randint(0, 97, (3, 7), generator=torch.Generator().manual_seed(4))
    routed = []
    with torch.no_grad():
        want = model(input_ids=ids).logits
        handle = apply_policy(model, ir)
        route = handle.route

        def recording(layer, logits, ctx, bias):
            out = route(layer, logits, ctx, bias)
            routed.append(out)
            return out

        handle.route = recording
        try:
            batch = model(input_ids=ids).logits
            alone = torch.cat([model(input_ids=ids[i:i + 1]).logits for i in range(3)])
        finally:
            handle.remove()
    assert len(routed) == 4 * len(spec.moe_layers)
    n = torch.cat([(o.topk_ids >= 0).sum(-1) for o in routed[:len(spec.moe_layers)]])
    assert n.min() >= 1 and n.max() <= spec.top_k and n.unique().numel() > 1, name
    for o in routed:
        assert (o.topk_weights[o.topk_ids < 0] == 0).all()
    assert not torch.equal(batch, want)
    torch.testing.assert_close(alone, batch, rtol=1e-4, atol=1e-4)


def test_context_from_shapes_and_override() -> None:
    model = build("qwen3_moe")
    spec = spec_of(model)
    ir = compile_policy('policy "d" { layers when decode { k = 1 } }', spec)
    layer = spec.moe_layers[0]
    block = moe_blocks(model)[layer]
    kept = []
    block.gate.register_forward_hook(lambda m, a, out: kept.append(int((out[2] < spec.num_experts).sum())))
    with torch.no_grad(), apply_policy(model, ir) as h:
        model(input_ids=torch.randint(0, 97, (2, 5)))  # prefill: own k
        model(input_ids=torch.randint(0, 97, (4, 1)))  # a decode-shaped step: k = 1
        with h.context("prefill", 4):
            model(input_ids=torch.randint(0, 97, (4, 1)))
    assert kept == [2 * 5 * 4, 4, 4 * 4]


def test_unsupported_family() -> None:
    cfg = transformers.LlamaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=8)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    spec_ir = compile_policy('policy "x" { }', spec_of(build("qwen3_moe")))
    with pytest.raises(UnsupportedModel, match="'llama' is not an MoE family sgl_budget knows"):
        apply_policy(model, spec_ir)


def test_gpt_oss_weights_and_padding_in_float32() -> None:
    """GPT-OSS weighs by a softmax over the chosen experts' logits: in float32 (where bf16's final rounding cannot
    hide it) own-k is bit-exact only under that convention; and its experts, whose eager one-hot cannot take the
    padding index, run sgl_budget's padding-safe forward at decode and prefill sizes alike."""
    import dataclasses

    from sgl_budget.engines.hf import experts

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["gpt_oss"](), dtype=torch.float32).eval()
    with torch.no_grad():
        for block in moe_blocks(model).values():
            block.router.weight.normal_(0, 0.5)
            block.router.bias.normal_(0, 0.5)
    spec = spec_of(model)
    own = compile_policy(f'policy "own" {{ layers {{ k = {spec.top_k} }} }}', spec)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    fam = FAMILIES["gpt_oss"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with apply_policy(model, own):
            assert torch.equal(model(input_ids=ids).logits, want)
        try:  # the renormalised softmax instead: equal up to rounding only
            FAMILIES["gpt_oss"] = dataclasses.replace(fam, hf=dataclasses.replace(
                fam.hf, weights_from_selected_logits=False))
            with apply_policy(model, own):
                assert not torch.equal(model(input_ids=ids).logits, want)
        finally:
            FAMILIES["gpt_oss"] = fam
        block = moe_blocks(model)[0]
        for tokens in (8, experts.DENSE_MAX_TOKENS + 8):  # the dense forward, and the padding-safe loop
            x = torch.randn(tokens, 64)
            top = torch.stack([torch.randperm(16)[:4] for _ in range(tokens)])
            w = torch.softmax(torch.randn(tokens, 4), -1)
            padded, pw = top.clone(), w.clone()
            padded[:, 2:], pw[:, 2:] = 16, 0.0  # two real slots, two padding slots (index num_experts)
            eager = type(block.experts).forward.__wrapped__(block.experts, x, top[:, :2], w[:, :2])
            torch.testing.assert_close(experts.dense_experts_forward(block.experts, x, padded, pw), eager)
            with pytest.raises(RuntimeError, match="num_classes"):  # why: GPT-OSS's own eager forward
                type(block.experts).forward.__wrapped__(block.experts, x, padded, pw)


def test_gemma4_renormalises_over_the_kept_experts_then_scales() -> None:
    """Gemma 4: router and experts on the decoder layer, the router's input normalised and scaled before its
    projection, weights = softmax renormalised over the kept experts, then x per_expert_scale of each slot's expert
    (in float32, as transformers computes it). The multimodal checkpoint routes its language model's layers, and
    recording keeps the router's logits (its projection's output), not the probabilities it returns first."""
    from family_configs import CHECK_ONLY

    from sgl_budget.engines.hf.record import record_trace

    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in CHECK_ONLY["gemma4"].items() if k != "architectures"})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    blocks = moe_blocks(model)  # the decoder layers of model.model.language_model
    assert sorted(blocks) == [0, 1, 2, 3] and all(b is l for b, l in zip(blocks.values(),
                                                                           model.model.language_model.layers))
    with torch.no_grad():
        for layer in blocks.values():
            layer.router.proj.weight.normal_(0, 0.5)
            layer.router.per_expert_scale.uniform_(0.5, 2.0)
            layer.router.scale.uniform_(0.5, 1.5)
    spec = spec_of(model)
    assert spec.has_expert_scale and spec.norm_topk_prob and spec.top_k == 4
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    seen = {}
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with apply_policy(model, compile_policy(f'policy "own" {{ layers {{ k = {spec.top_k} }} }}', spec)):
            assert torch.equal(model(input_ids=ids).logits, want)
        with apply_policy(model, compile_policy('policy "half" { budget 50%; layers { allocate uniform } }', spec)):
            for l, layer in blocks.items():
                layer.router.register_forward_hook(lambda m, a, out, l=l: seen.__setitem__(l, out))
            assert not torch.equal(model(input_ids=ids).logits, want)
        for l, layer in blocks.items():
            layer.router._forward_hooks.clear()
    for l, (probs, weights, idx) in seen.items():
        assert bool((idx[:, :2] < spec.num_experts).all()) and bool((idx[:, 2:] == spec.num_experts).all())
        top = probs.topk(2, dim=-1)  # k = 2 of top-4: the two best, kept slots first, padding last
        assert torch.equal(idx[:, :2], top.indices)
        scale = blocks[l].router.per_expert_scale
        assert torch.equal(weights[:, :2], top.values / top.values.sum(-1, keepdim=True) * scale[top.indices])
        assert (weights[:, 2:] == 0).all()
    trace = record_trace(model, spec, torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4)),
                         batch_size=2, prefill_len=3)
    assert set(trace.router_logits) == set(blocks)
    assert all(bool((x < 0).any()) for x in trace.router_logits.values())  # logits, not softmax probabilities


def test_deepseek_v4_hash_layers_stay_stock_and_routed_layers_are_exact_in_bfloat16() -> None:
    """DeepSeek-V4: the first num_hash_layers layers pick experts from tid2eid[input_ids] (DeepseekV4HashRouter): not
    in the spec's MoE layers, never hooked, their routing the same under any policy. The routed layers score, select and
    weigh in the logits' dtype (DeepseekV4TopKRouter), so the model's own k stays bit for bit in bfloat16 too."""
    model = build("deepseek_v4")
    spec = spec_of(model)
    hashed = model.model.layers[0].mlp
    assert hashed.is_hash and type(hashed.gate).__name__ == "DeepseekV4HashRouter"
    assert spec.moe_layers == (1, 2, 3) and sorted(moe_blocks(model)) == [1, 2, 3]
    assert spec.scoring_func == "sqrtsoftplus" and spec.has_correction_bias and not spec.grouped
    with torch.no_grad():
        hashed.gate.tid2eid.copy_(torch.randint(0, 16, hashed.gate.tid2eid.shape, generator=torch.Generator()
                                                .manual_seed(3)))
        hashed.gate.weight.normal_(0, 0.5)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(4))
    seen = []
    hashed.gate.register_forward_hook(lambda m, a, out: seen.append(out))
    forward = hashed.gate.forward
    with torch.no_grad():
        model(input_ids=ids)
        with apply_policy(model, compile_policy('policy "q" { budget 25%; layers { allocate uniform } }', spec)):
            assert hashed.gate.forward == forward  # the hash router is left as it is
            model(input_ids=ids)
    (_, w0, i0), (_, w1, i1) = seen
    assert torch.equal(i0, hashed.gate.tid2eid[ids.reshape(-1)]) and torch.equal(i0, i1) and torch.equal(w0, w1)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with apply_policy(model, compile_policy(f'policy "own" {{ layers {{ k = {spec.top_k} }} }}', spec)):
            got = model(input_ids=ids).logits
    assert want.dtype == torch.bfloat16 and torch.equal(got, want)
