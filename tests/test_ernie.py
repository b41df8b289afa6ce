"""ERNIE-4.5-MoE's routing facts: its config reader, the clamp renormalisation, and the bias an engine may drop."""

from __future__ import annotations

import pytest
import torch
from family_models import CONFIGS

from sgl_budget.lang import compile_policy
from sgl_budget.lang.ir import RouteContext
from sgl_budget.routing import Conventions, LayerRouter
from sgl_budget.routing.scoring import finalize_weights, score_experts
from sgl_budget.spec import ModelSpec, SpecError

ERNIE = CONFIGS["ernie4_5_moe"]


def _spec(**over) -> ModelSpec:
    return ModelSpec.from_hf_config({k: v for k, v in {**ERNIE, **over}.items() if v is not None})


def test_reader_keys_aliases_and_layers() -> None:
    spec = _spec()
    assert (spec.num_experts, spec.top_k, spec.moe_layers) == (16, 4, (1, 2))
    assert (spec.scoring_func, spec.has_correction_bias, spec.norm_topk_prob, spec.grouped) == \
        ("softmax", True, True, False)
    assert (spec.num_shared_experts, spec.shared_expert_intermediate_size) == (2, 64)
    # transformers' attribute_map names: num_experts / num_experts_per_tok
    alias = _spec(moe_num_experts=None, moe_k=None, num_experts=16, num_experts_per_tok=4)
    assert alias == spec
    # an end index of -1 is the last layer (transformers' __post_init__); SGLang's rule for the interval
    assert _spec(moe_layer_end_index=-1, num_hidden_layers=5).moe_layers == (1, 2, 3, 4)
    assert _spec(moe_layer_end_index=None, num_hidden_layers=6, moe_layer_interval=2).moe_layers == (1, 3, 5)
    assert _spec(moe_layer_start_index=2, moe_layer_end_index=-1, num_hidden_layers=5).moe_layers == (2, 3, 4)
    with pytest.raises(SpecError, match="needs num_hidden_layers, moe_num_experts/num_experts, moe_k/"):
        _spec(moe_k=None)


def test_clamp_renormalisation_only_where_set() -> None:
    spec = _spec()
    raw = torch.tensor([[0.2, 0.1, 0.05, 0.05], [1e-14, 1e-14, 0.0, 0.0]])
    clamp = finalize_weights(spec, raw, None, Conventions(renorm_clamp_min=1e-12))
    assert torch.equal(clamp, raw / torch.clamp(raw.sum(-1, keepdim=True), min=1e-12))
    plain = finalize_weights(spec, raw, None, Conventions(renorm_eps=1e-20))
    assert torch.equal(plain, raw / (raw.sum(-1, keepdim=True) + 1e-20))
    assert not torch.equal(clamp[1], plain[1])  # a sum below the clamp: the two rules differ


def test_the_bias_selects_unless_the_engine_drops_it() -> None:
    spec = _spec()
    g = torch.Generator().manual_seed(0)
    logits, bias = torch.randn(9, 16, generator=g), torch.rand(16, generator=g) * 0.3
    gs = score_experts(spec, logits, bias)
    assert torch.equal(gs.scores, torch.softmax(logits, -1)) and torch.equal(gs.select, gs.scores + bias)
    dropped = score_experts(spec, logits, bias, Conventions(ignore_correction_bias=True))
    assert torch.equal(dropped.select, dropped.scores)
    with pytest.raises(ValueError, match="correction_bias"):
        score_experts(spec, logits, None)  # the model's own rule needs it
    ir = compile_policy('policy "own" { layers { k = 4 } }', spec)
    w, ids = LayerRouter(ir, 1, Conventions(ignore_correction_bias=True))(logits, correction_bias=bias)
    top = torch.topk(torch.softmax(logits, -1), 4)
    assert torch.equal(ids.long(), top.indices) and torch.equal(w, top.values / top.values.sum(-1, keepdim=True))


def test_kernels_leave_a_clamp_convention_to_the_reference() -> None:
    pytest.importorskip("triton")
    from kernels.backend import KernelRouter

    spec = _spec()
    ir = compile_policy('policy "k2" { layers { k = 2 } }', spec)
    x = torch.randn(5, 16)
    r = KernelRouter(ir, 1, Conventions(renorm_clamp_min=1e-12), backend="triton")
    plan = r.plan(RouteContext("decode", 5, 5))
    assert not r.kernel_applies(plan, x)  # the kernels add an epsilon; the reference clamps
    assert KernelRouter(ir, 1, Conventions(renorm_eps=1e-20), backend="triton").kernel_applies(plan, x)
