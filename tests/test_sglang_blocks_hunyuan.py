"""Hunyuan (``hunyuan_v1_moe``) through SGLang's own MoE block (``HunYuanSparseMoeBlock``), in this process, on CPU.

SGLang 0.5.23 cannot run Hunyuan whole on CPU (its attention crashes in the first prefill: its QK-norm leaves q
as ``[tokens x heads, head_dim]``, which the padded-extend path cuts to the first ``tokens`` rows), an attention
fault unrelated to routing. The MoE layer is SGLang's ``HunYuanSparseMoeBlock``: a ``ReplicatedLinear`` router,
``TopK(top_k, renormalize=True)`` (the plain softmax top-k with renormalisation), a ``FusedMoE`` (on CPU:
``moe_forward_native``) and a shared ``HunYuanMLP``. Here that block is built as ``HunYuanDecoderLayer`` builds
it (``config``, ``quant_config=None``, ``layer_id``: the decoder layer passes no prefix to it) from the config
object SGLang's ``get_config`` makes of the tiny checkpoint's ``config.json`` (``tests/family_models.py``), runs
with sgl_budget's hooks as a ``--device cpu`` worker that routes with a policy has them (the fixture of
``tests/test_sglang_blocks.py``), and holds the transformers 5.19 ``HunYuanMoEV1Moe`` block's weights, loaded
the way ``HunYuanMoEV1ForCausalLM.load_weights`` loads a per-expert checkpoint (router ``mlp.gate.wg.weight``,
``mlp.experts.{e}.{gate,up,down}_proj.weight``, ``mlp.shared_mlp.{gate,up,down}_proj.weight``), then
``process_weights_after_loading``:

* stock (no policy, and an own-k policy through sgl_budget's reference router): SGLang's block == the
  transformers block;
* uniform 50% and Alloc-T: SGLang's block == the transformers block under
  :func:`sgl_budget.engines.hf.apply_policy`, in the route context SGLang's hook gives a direct block call
  (a decode step at batch = tokens).

transformers sizes Hunyuan's experts and shared MLP with ``intermediate_size``; SGLang sizes the experts with
``moe_intermediate_size`` and the shared MLP with ``intermediate_size * num_shared_expert``. The tiny config keeps
them equal (32, one shared expert), as the published Hunyuan-A13B config does.
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

from family_models import CONFIGS  # noqa: E402
from test_sglang_blocks import (ALLOC_T, UNIFORM_50, check_policy_block, check_stock_block,  # noqa: E402,F401
                                finish_loading, sglang_cpu)

from sgl_budget.engines.hf import moe_blocks, spec_of  # noqa: E402
from sgl_budget.engines.sglang.settings import model_spec_for  # noqa: E402

LAYER = 1
ROUTER_STD = 0.5  # router weights ~ N(0, 0.5): decisive routing, no near-ties
CONFIG = {**CONFIGS["hunyuan_v1_moe"], "torch_dtype": "float32", "dtype": "float32"}  # as family_models writes it


@pytest.fixture(scope="module")
def hunyuan(sglang_cpu, tmp_path_factory):
    from sglang.srt.models.hunyuan import HunYuanSparseMoeBlock, _is_moe
    from sglang.srt.utils.hf_transformers.config import get_config

    directory = tmp_path_factory.mktemp("hunyuan_v1_moe")
    (directory / "config.json").write_text(json.dumps(CONFIG))
    config = get_config(str(directory), trust_remote_code=False)  # the config object SGLang's model receives
    assert config.model_type == "hunyuan_v1_moe" and _is_moe(config)
    # the sizes transformers and SGLang read from different fields agree in this config
    assert config.moe_intermediate_size[LAYER] == config.intermediate_size * config.num_shared_expert[LAYER]
    sgl = HunYuanSparseMoeBlock(config=config, quant_config=None, layer_id=LAYER).eval()  # as HunYuanDecoderLayer
    assert sgl.shared_mlp is not None and sgl.topk.topk_config.top_k == config.moe_topk[LAYER]

    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in CONFIG.items() if k != "architectures"})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    block = moe_blocks(model)[LAYER]
    assert type(block).__name__ == "HunYuanMoEV1Moe"
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (ROUTER_STD if name == "gate.wg.weight" else 0.1))
    _load(sgl, block, config.num_experts)

    spec = model_spec_for(str(directory))  # what the launcher publishes to the workers for this checkpoint
    hf_spec = spec_of(model)
    assert spec.model_type == "hunyuan_v1_moe"
    for field in ("num_experts", "top_k", "moe_layers", "scoring_func", "norm_topk_prob", "grouped",
                  "has_correction_bias", "routed_scaling_factor"):
        assert getattr(spec, field) == getattr(hf_spec, field), field
    return SimpleNamespace(name="hunyuan_v1_moe", sgl=sgl, model=model, block=block, spec=spec, hf_spec=hf_spec,
                           dir=directory)


def _checkpoint(hf) -> dict[str, torch.Tensor]:
    """The transformers block's weights under a Hunyuan checkpoint's per-expert names (relative to the layer)."""
    w = {"mlp.gate.wg.weight": hf.gate.wg.weight}
    gate_w, up_w = hf.experts.gate_up_proj.chunk(2, dim=-2)  # [E, 2I, H]: gate rows first
    for e in range(hf.experts.num_experts):
        w[f"mlp.experts.{e}.gate_proj.weight"] = gate_w[e]
        w[f"mlp.experts.{e}.up_proj.weight"] = up_w[e]
        w[f"mlp.experts.{e}.down_proj.weight"] = hf.experts.down_proj[e]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        w[f"mlp.shared_mlp.{proj}.weight"] = getattr(hf.shared_mlp, proj).weight
    return {k: v.detach() for k, v in w.items()}


def _load(sgl, hf, num_experts: int) -> None:
    """The transformers block's weights into SGLang's block through the branches of
    ``HunYuanMoEV1ForCausalLM.load_weights`` that a MoE layer's weights take (stacked gate/up of the shared MLP,
    the experts' mapping, the router's ``wg.`` rename), then the quant methods' post-loading step."""
    from sglang.srt.layers.moe.fused_moe_triton import FusedMoE
    from sglang.srt.model_loader.weight_utils import default_weight_loader

    params = {f"mlp.{n}": p for n, p in sgl.named_parameters()}
    with torch.no_grad():
        for p in params.values():
            p.fill_(float("nan"))  # every parameter must be written below
    stacked = [(".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1)]
    experts = FusedMoE.make_expert_params_mapping(ckpt_gate_proj_name="gate_proj", ckpt_down_proj_name="down_proj",
                                                  ckpt_up_proj_name="up_proj", num_experts=num_experts)
    loaded = set()
    for name, weight in _checkpoint(hf).items():
        for param_name, weight_name, shard_id in stacked:
            if weight_name in name and "mlp.experts" not in name:
                name = name.replace(weight_name, param_name)
                params[name].weight_loader(params[name], weight, shard_id)
                break
        else:
            for param_name, weight_name, expert_id, shard_id in experts:
                if weight_name in name:
                    name = name.replace(weight_name, param_name)
                    params[name].weight_loader(params[name], weight, name, shard_id=shard_id, expert_id=expert_id)
                    break
            else:
                name = name.replace("wg.", "") if "mlp.gate.wg." in name else name
                getattr(params[name], "weight_loader", default_weight_loader)(params[name], weight)
        loaded.add(name)
    assert loaded == set(params), set(params) ^ loaded
    finish_loading(sgl)


def test_stock_block_equals_transformers(hunyuan) -> None:
    check_stock_block(hunyuan)


@pytest.mark.parametrize("policy", [UNIFORM_50, ALLOC_T], ids=["uniform-50", "alloc-t"])
def test_policy_block_equals_the_adapter(hunyuan, policy) -> None:
    check_policy_block(hunyuan, policy)
