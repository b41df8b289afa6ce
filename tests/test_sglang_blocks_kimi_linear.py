"""Kimi Linear (``kimi_linear``) through SGLang's own MoE block (``KimiMoE``), in this process, on CPU.

SGLang 0.5.23 cannot run Kimi Linear whole on CPU: its Kimi Delta Attention layers need the fla Triton kernels.
The MoE layer is SGLang's ``KimiMoE``: a ``ReplicatedLinear`` router with ``gate.e_score_correction_bias``,
``TopK(use_grouped_topk=True, num_expert_group, topk_group, correction_bias, renormalize=moe_renormalize)`` — sigmoid
+ bias, grouped top-k, renormalised by ``sum + 1e-20`` (SGLang's ``biased_grouped_topk``) — a ``FusedMoE`` (on CPU:
``moe_forward_native``) and a shared ``KimiMLP``. Here that block is built as ``KimiDecoderLayer`` builds it from
the config object SGLang's ``get_config`` makes of the tiny ``config.json`` (``tests/family_configs.py``), runs with
sgl_budget's hooks as a ``--device cpu`` worker that routes with a policy has them (the fixture of
``tests/test_sglang_blocks.py``), and holds the transformers 5.19 ``KimiLinearMoE`` block's weights, loaded the way
``KimiLinearForCausalLM.load_weights`` loads a checkpoint (router ``gate.weight`` and ``gate.e_score_correction_bias``,
``experts.{e}.w1/w3/w2.weight``, ``shared_experts.{gate,up,down}_proj.weight``), then ``process_weights_after_loading``:

* stock (no policy, and an own-k policy through sgl_budget's reference router): SGLang's block == the
  transformers block (``KimiLinearTopkRouter``: float32 logits, sigmoid + bias, the same group rule, sum + 1e-20);
* uniform 50% and Alloc-T: SGLang's block == the transformers block under
  :func:`sgl_budget.engines.hf.apply_policy`, in the route context SGLang's hook gives a direct block call.

The blocks use 4 groups keeping 2 (the published config has one group) so the group limit is exercised, and
``routed_scaling_factor`` 1: SGLang 0.5.23 applies that factor in its GPU MoE runners (``fused_experts``' combine),
never on CPU (``moe_forward_native``), so with the published 2.446 SGLang's CPU block differs from transformers by
exactly the factor on the routed part — :func:`test_cpu_path_leaves_out_the_routed_scaling_factor` pins that down.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

if os.environ.get("SGL_BUDGET_REQUIRE_SGLANG"):
    import sglang  # noqa: F401  (CI: a missing sglang is a failure, not a skip)
    import transformers  # noqa: F401
pytest.importorskip("sglang", reason="install the sglang extra: pip install -e '.[sglang]'")
transformers = pytest.importorskip("transformers", reason="install the hf extra: pip install -e '.[hf]'")

from family_configs import KIMI_LINEAR  # noqa: E402
from test_sglang_blocks import (ALLOC_T, SPEC_FIELDS, TOKENS, UNIFORM_50, _close, _sglang, _use,  # noqa: E402,F401
                                _x, block_family, check_policy_block, check_stock_block, hf_model, load_per_expert,
                                randomise, sglang_cpu)

LAYER = 1  # a Kimi Delta Attention layer's MoE block (layer 0 is dense: first_k_dense_replace 1)
CONFIG = {**KIMI_LINEAR, "num_expert_group": 4, "topk_group": 2, "routed_scaling_factor": 1.0,
          "torch_dtype": "float32", "dtype": "float32"}


def _build(sglang_cpu, directory, cfg: dict) -> SimpleNamespace:
    from sglang.srt.models.kimi_linear import KimiMoE, _is_sparse_layer
    from sglang.srt.utils.hf_transformers.config import get_config

    (directory / "config.json").write_text(json.dumps(cfg))
    config = get_config(str(directory), trust_remote_code=False)  # the config object SGLang's model receives
    assert config.model_type == "kimi_linear" and _is_sparse_layer(config, LAYER)
    sgl = KimiMoE(config=config, quant_config=None, layer_idx=LAYER, prefix=f"model.layers.{LAYER}.mlp").eval()
    tc = sgl.topk.topk_config
    assert tc.use_grouped_topk and tc.correction_bias is not None and tc.renormalize
    assert (tc.num_expert_group, tc.topk_group, tc.top_k) == (cfg["num_expert_group"], cfg["topk_group"], 4)

    model, block = hf_model(cfg, LAYER)
    assert type(block).__name__ == "KimiLinearMoE"
    g = randomise(block.named_parameters(), router="gate.weight")  # router weights ~ N(0, 0.5): decisive routing
    with torch.no_grad():
        block.gate.e_score_correction_bias.copy_(torch.randn(16, generator=g) * 0.1)  # a buffer (zeros at init)
    _load(sgl, block)

    family = block_family("kimi_linear", sgl, model, block, directory, SPEC_FIELDS + ("n_group", "topk_group"))
    assert family.spec.model_type == "kimi_linear"
    return family


@pytest.fixture(scope="module")
def kimi(sglang_cpu, tmp_path_factory):
    return _build(sglang_cpu, tmp_path_factory.mktemp("kimi_linear"), CONFIG)


def _load(sgl, hf) -> None:
    """The transformers block's weights into SGLang's block through the branches of
    ``KimiLinearForCausalLM.load_weights`` that a MoE layer's weights take (the shared MLP's stacked gate/up, the
    experts' w1/w3/w2 mapping, the router and its bias by the default loader), from a Kimi Linear checkpoint's names
    (relative to the MoE block), then the post-loading step."""
    router = {"gate.weight": hf.gate.weight, "gate.e_score_correction_bias": hf.gate.e_score_correction_bias}
    load_per_expert(sgl, hf, router, ("w1", "w3", "w2"), experts="experts", shared="shared_experts")


def test_stock_block_equals_transformers(kimi) -> None:
    check_stock_block(kimi)


@pytest.mark.parametrize("policy", [UNIFORM_50, ALLOC_T], ids=["uniform-50", "alloc-t"])
def test_policy_block_equals_the_adapter(kimi, policy) -> None:
    check_policy_block(kimi, policy)


def test_cpu_path_leaves_out_the_routed_scaling_factor(sglang_cpu, tmp_path) -> None:
    """With the published routed_scaling_factor (2.446) SGLang's CPU block equals the transformers block whose router
    scales by 1: SGLang leaves the factor to its MoE runner (``moe_runner_config``, applied by the GPU runners'
    combine), which ``moe_forward_native`` never applies. sgl_budget's SGLang routing follows SGLang (TopK does not
    scale: ``apply_routed_scaling_factor_on_output`` False), so a policy is scaled exactly where stock routing is."""
    k = _build(sglang_cpu, tmp_path, {**CONFIG, "routed_scaling_factor": 2.446})
    assert k.spec.routed_scaling_factor == 2.446
    assert k.sgl.experts.moe_runner_config.routed_scaling_factor == 2.446
    assert not k.sgl.topk.topk_config.apply_routed_scaling_factor_on_output
    x = _x(1, TOKENS, 2)
    _use(k, None)  # stock: the hook hands the call to SGLang's own select_experts
    got, _ = _sglang(k, x)
    with torch.no_grad():
        scaled = k.block(x)
        k.block.gate.routed_scaling_factor = 1.0
        try:
            unscaled = k.block(x)
        finally:
            k.block.gate.routed_scaling_factor = 2.446
    _close(got, unscaled, "kimi_linear CPU block, published scaling factor")
    assert not torch.allclose(got, scaled, rtol=1e-3, atol=1e-3)
