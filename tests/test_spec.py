"""Model specs from Hugging Face config.json files match the presets (numbers from the published configs)."""

from __future__ import annotations

import json

import pytest

from sgl_budget.spec import PRESETS, ModelSpec, SpecError, load_spec

# The routing-relevant fields of the published config.json files.
CONFIGS = {
    "deepseek-v2-lite": {
        "model_type": "deepseek_v2", "num_hidden_layers": 27, "n_routed_experts": 64, "num_experts_per_tok": 6,
        "hidden_size": 2048, "moe_intermediate_size": 1408, "n_shared_experts": 2, "first_k_dense_replace": 1,
        "moe_layer_freq": 1, "topk_method": "greedy", "n_group": 1, "topk_group": 1, "scoring_func": "softmax",
        "norm_topk_prob": False, "routed_scaling_factor": 1.0},
    "deepseek-v3": {
        "model_type": "deepseek_v3", "num_hidden_layers": 61, "n_routed_experts": 256, "num_experts_per_tok": 8,
        "hidden_size": 7168, "moe_intermediate_size": 2048, "n_shared_experts": 1, "first_k_dense_replace": 3,
        "moe_layer_freq": 1, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "scoring_func": "sigmoid",
        "norm_topk_prob": True, "routed_scaling_factor": 2.5},
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe", "num_hidden_layers": 48, "num_experts": 128, "num_experts_per_tok": 8,
        "hidden_size": 2048, "moe_intermediate_size": 768, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "norm_topk_prob": True},
    "qwen1.5-moe-a2.7b": {
        "model_type": "qwen2_moe", "num_hidden_layers": 24, "num_experts": 60, "num_experts_per_tok": 4,
        "hidden_size": 2048, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
        "decoder_sparse_step": 1, "norm_topk_prob": False},
    "mixtral-8x7b": {
        "model_type": "mixtral", "num_hidden_layers": 32, "num_local_experts": 8, "num_experts_per_tok": 2,
        "hidden_size": 4096, "intermediate_size": 14336},
    "olmoe-1b-7b": {
        "model_type": "olmoe", "num_hidden_layers": 16, "num_experts": 64, "num_experts_per_tok": 8,
        "hidden_size": 2048, "intermediate_size": 1024, "norm_topk_prob": False},
}
ROUTING_FIELDS = ("num_layers", "moe_layers", "num_experts", "top_k", "hidden_size", "moe_intermediate_size",
                  "num_shared_experts", "scoring_func", "norm_topk_prob", "n_group", "topk_group",
                  "routed_scaling_factor", "has_correction_bias")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_matches_preset(tmp_path, name: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS[name]))
    spec = load_spec(tmp_path)
    preset = PRESETS[name]
    for f in ROUTING_FIELDS:
        assert getattr(spec, f) == getattr(preset, f), f
    assert spec.shared_expert_bytes == preset.shared_expert_bytes or name == "deepseek-v3"


def test_deepseek_v2_full_is_grouped_without_bias() -> None:
    cfg = {**CONFIGS["deepseek-v2-lite"], "n_routed_experts": 160, "topk_method": "group_limited_greedy",
           "n_group": 8, "topk_group": 3, "routed_scaling_factor": 16.0, "num_hidden_layers": 60}
    spec = ModelSpec.from_hf_config(cfg, name="dsv2")
    assert spec.grouped and spec.topk_group == 3 and not spec.has_correction_bias
    assert spec.moe_layers[0] == 1 and spec.routed_scaling_factor == 16.0


def test_round_trip_and_errors(tmp_path) -> None:
    s = PRESETS["deepseek-v3"]
    assert ModelSpec.from_dict(s.to_dict()) == s
    with pytest.raises(SpecError, match="unknown model spec fields"):
        ModelSpec.from_dict({**s.to_dict(), "bogus": 1})
    with pytest.raises(SpecError, match="not an MoE config"):
        ModelSpec.from_hf_config({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8})
    with pytest.raises(SpecError, match="lacks or garbles"):
        ModelSpec.from_hf_config({**CONFIGS["mixtral-8x7b"], "intermediate_size": None})
    with pytest.raises(SpecError, match="top_k must lie"):
        ModelSpec(name="x", num_layers=1, moe_layers=(0,), num_experts=4, top_k=5, hidden_size=8,
                  moe_intermediate_size=8)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        load_spec(tmp_path)
    with pytest.raises(SpecError, match="unknown model spec"):
        load_spec("no-such-model")
