"""GPT-OSS through SGLang's own MoE block (``GptOssSparseMoeBlock``), in this process, on CPU (issue 17).

SGLang 0.5.23 cannot run GPT-OSS whole on CPU (its model override asserts an attention backend with
sliding windows and sinks, and torch_native is not one of them), but the MoE layer is SGLang's
``GptOssSparseMoeBlock``: a router linear with a bias, ``TopK(top_k, renormalize=True)`` (softmax) and a
``FusedMoE`` with biases and GPT-OSS's clamped SwiGLU (``gemm1_alpha``, ``gemm1_clamp_limit``), which on CPU
runs SGLang's ``moe_forward_native`` (its GPT-OSS branch: per-expert biases and
``swiglu_gpt_oss_sigmoid_alpha``). Here that block runs with sgl_budget's hooks as a ``--device cpu`` worker
that routes with a policy has them (the fixture of ``tests/test_sglang_blocks.py``), with the transformers
5.19 block's weights loaded the way ``GptOssForCausalLM.load_weights`` loads a bf16 checkpoint
(``make_expert_params_mapping_fused``, the experts' fused weight loader, ``process_weights_after_loading``):

* stock (no policy, and an own-k policy through sgl_budget's reference router under SGLang's conventions):
  SGLang's block == the transformers block (transformers weighs by a softmax over the chosen logits,
  SGLang by the renormalised softmax: equal up to float32 rounding);
* uniform 50% and Alloc-T: SGLang's block == the transformers block under
  :func:`sgl_budget.engines.hf.apply_policy` (whose padding runs sgl_budget's padding-safe experts forward:
  GPT-OSS's eager experts cannot take the padding index).
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

from family_configs import CHECK_ONLY  # noqa: E402
from test_sglang_blocks import (ALLOC_T, UNIFORM_50, _use, block_family, check_policy_block,  # noqa: E402,F401
                                check_stock_block, hf_model, load_checkpoint, randomise, sglang_cpu)

LAYER = 1
CONFIG = {**CHECK_ONLY["gpt_oss"], "torch_dtype": "float32", "dtype": "float32"}  # as family_models writes it


@pytest.fixture(scope="module")
def gpt_oss(sglang_cpu, tmp_path_factory):
    from sglang.srt.models.gpt_oss import GptOssSparseMoeBlock

    config = transformers.AutoConfig.for_model(**{k: v for k, v in CONFIG.items() if k != "architectures"})
    sgl = GptOssSparseMoeBlock(layer_id=LAYER, config=config, quant_config=None,
                               prefix=f"model.layers.{LAYER}.mlp").eval()
    model, block = hf_model(CONFIG, LAYER)
    randomise(block.named_parameters(), router="router")  # decisive routing, no near-ties
    _load(sgl, block)
    directory = tmp_path_factory.mktemp("gpt_oss")
    (directory / "config.json").write_text(json.dumps(CONFIG))
    return block_family("gpt_oss", sgl, model, block, directory)


def _load(sgl, hf) -> None:
    """The transformers block's weights into SGLang's block as ``GptOssForCausalLM.load_weights`` loads a bf16
    checkpoint of them (transformers' parameter names; the experts' weights, not their biases, transposed), then the
    quant method's post-loading step."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    mapping = FusedMoE.make_expert_params_mapping_fused(
        ckpt_gate_up_proj_name="gate_up_proj", ckpt_down_proj_name="down_proj",
        ckpt_gate_up_proj_bias_name="gate_up_proj_bias", ckpt_down_proj_bias_name="down_proj_bias")
    checkpoint = {name: w.detach().transpose(-2, -1) if name.startswith("experts.") and "bias" not in name
                  else w.detach() for name, w in hf.named_parameters()}  # router.weight, router.bias, experts.*
    load_checkpoint(sgl, checkpoint, experts=mapping)


def _sglang(family, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """SGLang's block on ``x`` flattened to tokens: the output ``[B, S, H]`` and the routed (token, expert) pairs."""
    seen = []
    hook = family.sgl.topk.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            out = family.sgl(x.reshape(-1, x.shape[-1]))
    finally:
        hook.remove()
    (topk_out,) = seen
    return out.reshape(x.shape), int((topk_out.topk_weights > 0).sum())


def test_stock_block_equals_transformers(gpt_oss) -> None:
    got, own = check_stock_block(gpt_oss, _sglang)
    # under SGLang's conventions (from its TopK config) the reference router is SGLang's select_experts, bit for bit
    assert torch.equal(own, got)


@pytest.mark.parametrize("policy", [UNIFORM_50, ALLOC_T], ids=["uniform-50", "alloc-t"])
def test_policy_block_equals_the_adapter(gpt_oss, policy) -> None:
    check_policy_block(gpt_oss, policy, _sglang)


def test_fused_routing_runner_is_refused_with_a_hint(gpt_oss) -> None:
    """On GPU SGLang picks the triton_kernel runner for bf16 GPT-OSS (routing fused: select_experts never runs);
    a worker that routes with a policy refuses it when the TopK binds, naming the runner to choose instead."""
    from sglang.srt.layers.moe.topk import TopK
    from sglang.srt.layers.moe.utils import MoeRunnerBackend

    _use(gpt_oss, UNIFORM_50)
    with pytest.raises(RuntimeError, match=r"layer 0 uses the triton_kernel runner with TRITON_KERNEL routing "
                                           r".*--moe-runner-backend triton\."):
        TopK(top_k=4, renormalize=True, layer_id=0).bind_runner_backend(MoeRunnerBackend.TRITON_KERNELS)
    TopK(top_k=4, renormalize=True, layer_id=0).bind_runner_backend(MoeRunnerBackend.TRITON)  # standard output
