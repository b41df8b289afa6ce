"""Tiny random-weight checkpoints of every MoE family, shaped like the published config.json files.

``CONFIGS[model_type]`` holds the fields the real checkpoints carry (DeepSeek's ``moe_layer_freq``,
``scoring_func``, ``topk_method`` and YaRN ``rope_scaling``; Qwen's ``decoder_sparse_step`` ...) at a
tiny size: hidden 64, 16 routed experts, top-4, the embedded model's tokenizer (vocab 8192).
:func:`build` writes a checkpoint directory that transformers 5.19 and SGLang 0.5.23 both load.
The routers' weights are scaled up so that routing is decisive (random init gives near-uniform
router logits, where a policy changes little and fp32 noise could flip near-ties).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "models" / "brown-moe"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")

_COMMON = {"vocab_size": 8192, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 1024, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
           "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "hidden_act": "silu"}
_YARN = {"type": "yarn", "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
_MLA = {"kv_lora_rank": 32, "q_lora_rank": None, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16,
        "rope_theta": 10000.0, "rope_scaling": _YARN, "num_key_value_heads": 4}

CONFIGS: dict[str, dict] = {
    "qwen3_moe": {**_COMMON, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                  "num_hidden_layers": 3, "num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 32,
                  "intermediate_size": 128, "head_dim": 16, "norm_topk_prob": True, "decoder_sparse_step": 1,
                  "mlp_only_layers": []},
    "qwen2_moe": {**_COMMON, "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
                  "num_hidden_layers": 3, "num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64, "intermediate_size": 128, "norm_topk_prob": False,
                  "decoder_sparse_step": 1, "mlp_only_layers": [], "qkv_bias": True,
                  "initializer_range": 0.1, "_router_scale": 3.0},
    "olmoe": {**_COMMON, "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "num_hidden_layers": 3,
              "num_experts": 16, "num_experts_per_tok": 4, "intermediate_size": 32, "norm_topk_prob": False,
              "num_key_value_heads": 4,  # SGLang's q/k norms span all heads: kv heads == heads
              "initializer_range": 0.1, "_router_scale": 3.0},
    "mixtral": {**_COMMON, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_hidden_layers": 3,
                "num_local_experts": 16, "num_experts_per_tok": 4, "intermediate_size": 32},
    "deepseek_v2": {**_COMMON, **_MLA, "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
                    "num_hidden_layers": 3, "n_routed_experts": 16, "num_experts_per_tok": 4,
                    "moe_intermediate_size": 32, "intermediate_size": 128, "n_shared_experts": 2,
                    "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "greedy", "n_group": 1,
                    "topk_group": 1, "scoring_func": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 1.0,
                    "initializer_range": 0.1, "_router_scale": 3.0},
    "deepseek_v3": {**_COMMON, **_MLA, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
                    "num_hidden_layers": 3, "n_routed_experts": 16, "num_experts_per_tok": 4,
                    "moe_intermediate_size": 32, "intermediate_size": 128, "n_shared_experts": 1,
                    "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "noaux_tc", "n_group": 4,
                    "topk_group": 2, "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5},
    "glm4_moe": {**_COMMON, "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "num_hidden_layers": 3,
                 "head_dim": 16, "partial_rotary_factor": 0.5, "attention_bias": True, "use_qk_norm": True,
                 "intermediate_size": 128, "moe_intermediate_size": 32, "n_routed_experts": 16,
                 "num_experts_per_tok": 4, "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 4,
                 "topk_group": 2, "norm_topk_prob": True, "routed_scaling_factor": 2.5, "rope_theta": 1000000.0,
                 "num_nextn_predict_layers": 0},
    "glm4_moe_lite": {**_COMMON, **_MLA, "architectures": ["Glm4MoeLiteForCausalLM"], "model_type": "glm4_moe_lite",
                      "num_hidden_layers": 3, "intermediate_size": 128, "moe_intermediate_size": 32,
                      "n_routed_experts": 16, "num_experts_per_tok": 4, "n_shared_experts": 1,
                      "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc",
                      "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 1.8,
                      "q_lora_rank": 32, "rope_interleave": True, "attention_bias": False,
                      "num_nextn_predict_layers": 0},
    "hunyuan_v1_moe": {**_COMMON, "architectures": ["HunYuanMoEV1ForCausalLM"], "model_type": "hunyuan_v1_moe",
                       "num_hidden_layers": 3, "head_dim": 16, "attention_head_dim": 16, "intermediate_size": 32,
                       "moe_intermediate_size": [32, 32, 32], "num_experts": 16, "moe_topk": [4, 4, 4],
                       "num_shared_expert": [1, 1, 1], "use_mixed_mlp_moe": True, "use_qk_norm": True,
                       "use_cla": False, "cla_share_factor": 1, "attention_bias": False, "mlp_bias": False,
                       "rope_theta": 10000.0, "rope_scaling": None},
    "minimax_m2": {**_COMMON, "architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2",
                   "num_hidden_layers": 2, "head_dim": 16, "rotary_dim": 8, "partial_rotary_factor": 0.5,
                   "intermediate_size": 32, "num_local_experts": 16, "num_experts_per_tok": 4,
                   "scoring_func": "sigmoid", "use_routing_bias": True, "use_qk_norm": True,
                   "qk_norm_type": "per_layer", "rope_theta": 5000000.0, "shared_intermediate_size": 0,
                   "use_mtp": False},
    # ERNIE-4.5-21B-A3B-PT's fields; its config ties the embeddings, and SGLang's Ernie4_5 class ties lm_head then
    "ernie4_5_moe": {**_COMMON, "architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe",
                     "num_hidden_layers": 3, "head_dim": 16, "intermediate_size": 128, "moe_intermediate_size": 32,
                     "moe_num_experts": 16, "moe_k": 4, "moe_num_shared_experts": 2, "moe_layer_start_index": 1,
                     "moe_layer_end_index": 2, "moe_layer_interval": 1, "moe_use_aux_free": True,
                     "moe_norm_min": 1e-12, "use_bias": False, "rope_theta": 500000.0, "tie_word_embeddings": True,
                     "initializer_range": 0.1, "_router_scale": 3.0},  # tied: 0.02 just repeats the last token
}
# Kimi K2 (moonshotai/Kimi-K2-Instruct's config.json): DeepSeek-V3's architecture under model_type "kimi_k2", which
# transformers 5.19 does not know; the checkpoint ships its config class (auto_map; SGLang 0.5.23 reads the config
# with its own kimi_k2 alias of transformers' DeepseekV3Config instead, with or without --trust-remote-code).
# Routing is DeepSeek-V3's with one group (n_group 1, topk_group 1) and routed_scaling_factor 2.827; 384 experts
# top-8 scaled down to 16 top-4; q_lora_rank set and YaRN with beta_fast = beta_slow = 1 as published.
KIMI_AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
CONFIGS["kimi_k2"] = {
    **_COMMON, **_MLA, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "auto_map": KIMI_AUTO_MAP,
    "num_hidden_layers": 4, "n_routed_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 32,
    "intermediate_size": 128, "n_shared_experts": 1, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1, "scoring_func": "sigmoid", "norm_topk_prob": True,
    "routed_scaling_factor": 2.827, "q_lora_rank": 32, "rope_theta": 50000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 1.0,
                     "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    "num_nextn_predict_layers": 0, "ep_size": 1, "aux_loss_alpha": 0.001, "seq_aux": True, "use_cache": True,
    "pretraining_tp": 1, "initializer_range": 0.02, "attention_bias": False,
}
# families whose checkpoints carry their own config class (model_type unknown to transformers): the class
# transformers builds the weights with, the code file shipped beside config.json, and the launch flag users pass
REMOTE_CODE = {"kimi_k2": ("deepseek_v3", "configuration_deepseek.py")}
SERVER_ARGS = {"kimi_k2": ("--trust-remote-code",)}
ROUTER_SCALE = 30.0  # router weights x this: decisive routing (init std 0.02 gives near-uniform logits)


def build(model_type: str, directory: Path, seed: int = 0) -> Path:
    """A tiny random-weight checkpoint of ``model_type`` in ``directory`` (reused when already built)."""
    import torch
    import transformers

    out = Path(directory)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(CONFIGS[model_type])
    router_scale = cfg.pop("_router_scale", ROUTER_SCALE)  # no-renorm families: spread routing (weights matter)
    remote = REMOTE_CODE.get(model_type)
    hf_fields = {k: v for k, v in cfg.items() if k not in ("architectures", "auto_map")}
    if remote:
        hf_fields["model_type"] = remote[0]
    hf_cfg = transformers.AutoConfig.for_model(**hf_fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    _scale_routers(model, seed, router_scale)
    model.save_pretrained(out, safe_serialization=True)
    written = json.loads((out / "config.json").read_text())
    written.update({k: v for k, v in cfg.items() if k not in written or k == "rope_scaling"})
    written["architectures"] = cfg["architectures"]
    written["dtype"] = written["torch_dtype"] = "float32"
    if remote:  # the published shape: its own fields only, and the config class it names beside it
        written = {**cfg, "torch_dtype": "float32"}
        (out / remote[1]).write_text((ROOT / "tests" / "remote_code" / remote[1]).read_text())
    (out / "config.json").write_text(json.dumps(written, indent=2))
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER / name, out / name)
    return out


def reference_dir(model_type: str, model_dir: Path, directory: Path) -> Path:
    """Where transformers loads the checkpoint from: ``model_dir`` itself, or for a remote-code family a copy
    whose config.json names the transformers class it is (Kimi K2: model_type deepseek_v3, no auto_map; the
    weights are linked, not copied)."""
    remote = REMOTE_CODE.get(model_type)
    if not remote:
        return Path(model_dir)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(model_dir).iterdir():
        if f.name not in ("config.json", remote[1]) and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg.pop("auto_map", None)
    cfg["model_type"] = remote[0]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def _scale_routers(model, seed: int, scale: float = ROUTER_SCALE) -> None:
    """Scale router weights up and give correction biases nonzero values (both seeded)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight", "gate.wg.weight")) and p.dim() == 2 and p.shape[0] > 1:
                if not p.any():  # a router transformers initialises to zeros (ERNIE): the others' init std
                    p.copy_(torch.randn(p.shape, generator=g) * model.config.initializer_range)
                p.mul_(scale)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.2)
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.2)
