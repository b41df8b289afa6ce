"""Gemma 4 (MoE) through SGLang's own MoE layer (``Gemma4Router`` + ``Gemma4MoE``), in this process, on CPU.

SGLang 0.5.23 cannot run Gemma 4 whole on CPU (its launch check refuses the torch_native attention backend,
the only one the CPU engine has without AMX), but the MoE part of a decoder layer is SGLang's: ``Gemma4Router``
(an RMS norm without weight, the learned ``scale`` and hidden_size**-0.5, then ``proj``) feeding
``Gemma4MoE`` — ``TopK`` with Gemma 4's own routing function (top-k of the raw logits, softmax of the chosen
logits, times ``per_expert_scale``) and a ``FusedMoE`` with GELU-tanh, which on CPU runs ``moe_forward_native``.
Here the router and the MoE of one layer run on the same input (the decoder layer feeds the router the residual
and the experts its ``pre_feedforward_layernorm_2``; both engines do so, so the MoE part is compared alone) with
sgl_budget's hooks as a ``--device cpu`` worker that routes with a policy has them (the fixture of
``tests/test_sglang_blocks.py``; among them :mod:`sgl_budget.engines.sglang.cpu_gemma4`, which restores the
router's input scale that SGLang's CPU norm drops), with the transformers 5.19 layer's router and experts loaded
the way ``Gemma4ForCausalLM.load_weights`` loads a bf16 checkpoint, and is checked against that layer's
``router`` + ``experts``:

* stock (no policy, and an own-k policy through sgl_budget's reference router under SGLang's conventions, which
  is SGLang's routing function bit for bit): SGLang == transformers (which ranks the float32 softmax and
  renormalises it: equal up to float32 rounding);
* uniform 50% and Alloc-T: SGLang == transformers under :func:`sgl_budget.engines.hf.apply_policy`
  (renormalised over the kept experts, then the per-expert scale of each slot's expert).
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

from family_configs import GEMMA4_TEXT  # noqa: E402
from test_sglang_blocks import (ALLOC_T, TOKENS, UNIFORM_50, WeightLoading, _use, block_family,  # noqa: E402,F401
                                check_policy_block, check_stock_block, hf_model, randomise, sglang_cpu)

LAYER = 1
CONFIG = {**GEMMA4_TEXT, "torch_dtype": "float32", "dtype": "float32"}


class _SGLangMoE(torch.nn.Module):
    """SGLang's MoE part of a Gemma 4 decoder layer: ``moe(x, router(x))`` (its ``_next_stream`` MoE branch)."""

    def __init__(self, router, moe) -> None:
        super().__init__()
        self.router, self.moe = router, moe

    @property
    def topk(self):
        return self.moe.topk

    def forward(self, x: torch.Tensor, forward_batch=None) -> torch.Tensor:
        return self.moe(x, self.router(x))


class _HFMoE(torch.nn.Module):
    """transformers' MoE part of a Gemma 4 decoder layer: ``experts(x, *router(x)[1:])`` on ``[B, S, H]``."""

    def __init__(self, layer) -> None:
        super().__init__()
        self.router, self.experts = layer.router, layer.experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        _, weights, ids = self.router(flat)
        return self.experts(flat, ids, weights).reshape(x.shape)


@pytest.fixture(scope="module")
def gemma4(sglang_cpu, tmp_path_factory):
    from sglang.srt.models.gemma4_causal import Gemma4MoE, Gemma4Router

    # SGLang's CPU norm drops the router's fused input scale; sgl_budget's CPU stand-in (cpu_gemma4) restores it
    assert hasattr(Gemma4Router.forward, "__wrapped__"), "Gemma4Router.forward is not hooked"
    config = transformers.AutoConfig.for_model(**{k: v for k, v in CONFIG.items() if k != "architectures"})
    prefix = f"model.layers.{LAYER}"
    sgl = _SGLangMoE(Gemma4Router(config, quant_config=None, prefix=f"{prefix}.router"),
                     Gemma4MoE(hidden_size=config.hidden_size, layer_id=LAYER, config=config, quant_config=None,
                               prefix=f"{prefix}.moe", reduce_results=False)).eval()
    model, layer = hf_model(CONFIG, LAYER)  # the decoder layer: its router and experts
    randomise([*layer.router.named_parameters(prefix="router"), *layer.experts.named_parameters()],
              router="router", ones=("router.scale", "router.per_expert_scale"))  # decisive routing, no near-ties
    _load(sgl, layer)
    directory = tmp_path_factory.mktemp("gemma4")
    (directory / "config.json").write_text(json.dumps(CONFIG))
    family = block_family("gemma4", sgl, model, _HFMoE(layer), directory, layer=layer)
    assert family.spec.has_expert_scale and family.hf_spec.has_expert_scale
    return family


def _load(sgl: _SGLangMoE, layer) -> None:
    """The transformers layer's router and experts into SGLang's as ``Gemma4ForCausalLM.load_weights`` loads a
    bf16 checkpoint of them (``router.per_expert_scale`` -> ``moe.per_expert_scale``, the fused ``experts.*``
    chunked per expert into ``moe.experts.w13_weight`` / ``w2_weight``), then the post-loading step."""
    load = WeightLoading(sgl)
    load("router.proj.weight", layer.router.proj.weight)
    load("router.scale", layer.router.scale)
    load("moe.per_expert_scale", layer.router.per_expert_scale)
    for e in range(layer.experts.num_experts):
        for chunk, shard in zip(layer.experts.gate_up_proj[e].chunk(2, dim=0), ("w1", "w3")):
            load("moe.experts.w13_weight", chunk, "moe.experts.w13_weight", shard, e)
        load("moe.experts.w2_weight", layer.experts.down_proj[e], "moe.experts.w2_weight", "w2", e)
    load.finish()


def test_stock_block_equals_transformers(gemma4) -> None:
    got, own = check_stock_block(gemma4)
    # under SGLang's conventions (Gemma 4's routing function found on its TopK) the reference router is SGLang's
    # routing, bit for bit
    assert torch.equal(own, got)


@pytest.mark.parametrize("policy", [UNIFORM_50, ALLOC_T], ids=["uniform-50", "alloc-t"])
def test_policy_block_equals_the_adapter(gemma4, policy) -> None:
    check_policy_block(gemma4, policy)


def test_routing_function_is_recognised_and_scaled(gemma4) -> None:
    """sgl_budget finds Gemma 4's per-expert scale on SGLang's TopK (the routing function's closure, loaded in place),
    routes its rule, and multiplies the scale in after renormalising over the kept experts."""
    from sgl_budget.engines.sglang.routing import expert_scale_of, sglang_conventions

    cfg = gemma4.sgl.topk.topk_config
    assert expert_scale_of(cfg) is gemma4.sgl.moe.per_expert_scale
    assert sglang_conventions(cfg).weights_from_selected_logits
    _use(gemma4, UNIFORM_50)
    x = torch.randn(TOKENS, 64, generator=torch.Generator().manual_seed(5))
    seen = []
    hook = gemma4.sgl.topk.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            logits = gemma4.sgl.router(x)
            gemma4.sgl(x)
    finally:
        hook.remove()
    (out,) = seen
    kept = out.topk_weights > 0
    assert bool((kept.sum(-1) == 2).all())  # k = 2 of top-4
    top = torch.topk(logits, 2, dim=-1)
    want = torch.softmax(top.values, dim=-1) * gemma4.sgl.moe.per_expert_scale[top.indices]
    got_ids = out.topk_ids[:, :2].long()
    assert torch.equal(got_ids, top.indices)
    torch.testing.assert_close(out.topk_weights[:, :2], want, rtol=1e-6, atol=1e-7)
