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

import pytest

if os.environ.get("SGL_BUDGET_REQUIRE_SGLANG"):
    import sglang  # noqa: F401  (CI: a missing sglang is a failure, not a skip)
    import transformers  # noqa: F401
pytest.importorskip("sglang", reason="install the sglang extra: pip install -e '.[sglang]'")
transformers = pytest.importorskip("transformers", reason="install the hf extra: pip install -e '.[hf]'")

from family_models import CONFIGS  # noqa: E402
from test_sglang_blocks import (ALLOC_T, UNIFORM_50, block_family, check_policy_block,  # noqa: E402,F401
                                check_stock_block, hf_model, load_per_expert, randomise, sglang_cpu)

LAYER = 1
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

    model, block = hf_model(CONFIG, LAYER)
    assert type(block).__name__ == "HunYuanMoEV1Moe"
    randomise(block.named_parameters(), router="gate.wg.weight")  # router weights ~ N(0, 0.5): decisive routing
    _load(sgl, block, config.num_experts)

    family = block_family("hunyuan_v1_moe", sgl, model, block, directory)
    assert family.spec.model_type == "hunyuan_v1_moe"
    return family


def _load(sgl, hf, num_experts: int) -> None:
    """The transformers block's weights into SGLang's block through the branches of
    ``HunYuanMoEV1ForCausalLM.load_weights`` that a MoE layer's weights take (stacked gate/up of the shared MLP,
    the experts' mapping, the router's ``wg.`` rename), from a Hunyuan checkpoint's per-expert names (relative to
    the layer), then the quant methods' post-loading step."""

    def rename(name: str) -> str:
        return name.replace("wg.", "") if "mlp.gate.wg." in name else name

    load_per_expert(sgl, hf, {"mlp.gate.wg.weight": hf.gate.wg.weight}, ("gate_proj", "up_proj", "down_proj"),
                    experts="mlp.experts", shared="mlp.shared_mlp", num_experts=num_experts, prefix="mlp.",
                    unstacked="mlp.experts", rename=rename)


def test_stock_block_equals_transformers(hunyuan) -> None:
    check_stock_block(hunyuan)


@pytest.mark.parametrize("policy", [UNIFORM_50, ALLOC_T], ids=["uniform-50", "alloc-t"])
def test_policy_block_equals_the_adapter(hunyuan, policy) -> None:
    check_policy_block(hunyuan, policy)
