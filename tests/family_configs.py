"""Config.json dicts (tiny, with the fields the published files carry) of the families no CPU test builds a checkpoint
of: what `sgl-budget check` and the SGLang launch check are asked about in tests/test_families.py."""

QWEN3_NEXT = {
    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
    "vocab_size": 1024, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "hidden_act": "silu",
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000000,
    "partial_rotary_factor": 0.25, "full_attention_interval": 4,
    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "output_router_logits": False, "router_aux_loss_coef": 0.001,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "attention_bias": False,
}
_Q35_TEXT = {
    "model_type": "qwen3_5_moe_text", "vocab_size": 1024, "hidden_size": 64, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    "full_attention_interval": 4, "attn_output_gate": True,
    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "router_aux_loss_coef": 0.001,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                        "mrope_interleaved": True, "mrope_section": [2, 3, 3]},
    "tie_word_embeddings": False, "dtype": "bfloat16", "attention_bias": False,
}
QWEN3_5_MOE_TEXT = {"architectures": ["Qwen3_5MoeForCausalLM"], **_Q35_TEXT}
QWEN3_5_MOE = {
    "architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
    "text_config": _Q35_TEXT,
    "vision_config": {"model_type": "qwen3_5_moe", "depth": 1, "hidden_size": 32, "intermediate_size": 64,
                      "num_heads": 4, "out_hidden_size": 64, "patch_size": 4, "spatial_merge_size": 1,
                      "temporal_patch_size": 2, "in_channels": 3, "num_position_embeddings": 64},
    "image_token_id": 1000, "video_token_id": 1001, "vision_start_token_id": 1002, "vision_end_token_id": 1003,
    "tie_word_embeddings": False,
}
_L4_TEXT = {
    "model_type": "llama4_text", "vocab_size": 1024, "hidden_size": 64, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
    "intermediate_size": 32, "intermediate_size_mlp": 128, "num_local_experts": 16, "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "use_qk_norm": True, "attention_chunk_size": 8192, "attn_temperature_tuning": True, "floor_scale": 8192,
    "attn_scale": 0.1, "no_rope_layers": [], "router_aux_loss_coef": 0.001, "output_router_logits": False,
    "attention_bias": False, "torch_dtype": "bfloat16", "pad_token_id": 1000, "bos_token_id": 1001,
    "eos_token_id": [1002],
}
LLAMA4 = {
    "architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "text_config": _L4_TEXT,
    "vision_config": {"model_type": "llama4_vision_model", "hidden_size": 32, "num_hidden_layers": 1,
                      "num_attention_heads": 4, "intermediate_size": 64, "image_size": 56, "patch_size": 14,
                      "vision_output_dim": 64, "projector_input_dim": 64, "projector_output_dim": 64,
                      "pixel_shuffle_ratio": 0.5, "rope_theta": 10000},
    "boi_token_index": 1003, "eoi_token_index": 1004, "image_token_index": 1005, "tie_word_embeddings": False,
}
LLAMA4_TEXT = {"architectures": ["Llama4ForCausalLM"], **_L4_TEXT}
_G4_TEXT = {
    "model_type": "gemma4_text", "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 64,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "global_head_dim": 32, "num_global_key_value_heads": 1, "attention_k_eq_v": True,
    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "sliding_window": 64, "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    "final_logit_softcapping": 30.0, "enable_moe_block": True, "num_experts": 16, "top_k_experts": 4,
    "moe_intermediate_size": 32, "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 1024,
    "num_kv_shared_layers": 0, "use_double_wide_mlp": False, "tie_word_embeddings": True,
    "rope_parameters": {"full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
                        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}},
    "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1, "dtype": "bfloat16",
}
GEMMA4_TEXT = {"architectures": ["Gemma4ForCausalLM"], **_G4_TEXT}
DEEPSEEK_V4 = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 1024,
    "hidden_size": 64, "moe_intermediate_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 32, "q_lora_rank": 32, "qk_rope_head_dim": 16,
    "n_routed_experts": 16, "num_experts_per_tok": 4, "n_shared_experts": 1, "scoring_func": "sqrtsoftplus",
    "norm_topk_prob": True, "routed_scaling_factor": 1.5, "num_hash_layers": 1, "topk_method": "noaux_tc",
    "n_group": 1, "topk_group": 1,
    "o_groups": 2, "o_lora_rank": 16, "index_n_heads": 2, "index_head_dim": 16, "index_topk": 8,
    "sliding_window": 16, "hc_mult": 2, "swiglu_limit": 10.0, "num_nextn_predict_layers": 0,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16",
}
KIMI_K2 = {  # published Kimi-K2 config.json shape: model_type kimi_k2, DeepseekV3ForCausalLM
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2",
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
    "norm_topk_prob": True, "routed_scaling_factor": 2.827, "hidden_act": "silu",
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 50000.0, "torch_dtype": "bfloat16",
    "tie_word_embeddings": False, "num_nextn_predict_layers": 0, "attention_bias": False,
}
KIMI_LINEAR = {
    "architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear", "vocab_size": 1024,
    "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16,
    "kv_lora_rank": 16, "q_lora_rank": None, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "mla_use_nope": True,
    "num_experts": 16, "num_experts_per_token": 4, "num_shared_experts": 1, "moe_renormalize": True,
    "moe_router_activation_func": "sigmoid", "routed_scaling_factor": 2.446, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "use_grouped_topk": True, "num_expert_group": 1, "topk_group": 1,
    "linear_attn_config": {"head_dim": 16, "num_heads": 4, "short_conv_kernel_size": 4,
                           "kda_layers": [1, 2, 3], "full_attn_layers": [4]},
    "hidden_act": "silu", "rms_norm_eps": 1e-5, "model_max_length": 4096, "torch_dtype": "bfloat16",
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}

KIMI_K3 = {  # SGLang 0.5.23's KimiK3Config shape: a Kimi Linear text model with latent MoE, and a vision tower
    "architectures": ["KimiK3ForConditionalGeneration"], "model_type": "kimi_k3",
    "text_config": {**{k: v for k, v in KIMI_LINEAR.items() if k != "architectures"},
                    "routed_expert_hidden_size": 32, "hidden_act": "situ", "activation_situ_beta": 4.0},
    "vision_config": {"model_type": "kimi_k3_vision"}, "media_placeholder_token_id": 1000,
}

_A_COMMON = dict(vocab_size=1024, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False, torch_dtype="bfloat16",
                 bos_token_id=0, eos_token_id=1, pad_token_id=2)
_GROUP_A = {
 "glm4_moe": {**_A_COMMON, "model_type": "glm4_moe", "architectures": ["Glm4MoeForCausalLM"],
   "num_hidden_layers": 3, "head_dim": 16, "partial_rotary_factor": 0.5, "attention_bias": True, "use_qk_norm": True,
   "intermediate_size": 128, "moe_intermediate_size": 32, "n_routed_experts": 16, "num_experts_per_tok": 4,
   "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
   "routed_scaling_factor": 2.5, "rope_theta": 1000000, "rope_scaling": None, "num_nextn_predict_layers": 0},
 "glm4_moe_lite": {**_A_COMMON, "model_type": "glm4_moe_lite", "architectures": ["Glm4MoeLiteForCausalLM"],
   "num_attention_heads": 4, "num_key_value_heads": 4,
   "num_hidden_layers": 3, "intermediate_size": 128, "moe_intermediate_size": 32, "n_routed_experts": 16,
   "num_experts_per_tok": 4, "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
   "topk_method": "noaux_tc", "scoring_func": "sigmoid",
   "norm_topk_prob": True, "routed_scaling_factor": 1.8, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 16,
   "qk_nope_head_dim": 16, "v_head_dim": 16, "rope_theta": 1000000, "rope_scaling": None, "rope_interleave": True,
   "attention_bias": False, "num_nextn_predict_layers": 0},
 "gpt_oss": {**_A_COMMON, "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "num_hidden_layers": 2,
   "head_dim": 16, "intermediate_size": 32, "num_local_experts": 16, "num_experts_per_tok": 4, "sliding_window": 128,
   "layer_types": ["sliding_attention", "full_attention"], "attention_bias": True, "swiglu_limit": 7.0,
   "experts_per_token": 4, "router_aux_loss_coef": 0.9, "output_router_logits": False,
   "rope_theta": 150000, "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
   "truncate": False, "original_max_position_embeddings": 4096}, "initial_context_length": 4096},
 "minimax_m2": {**_A_COMMON, "model_type": "minimax_m2", "architectures": ["MiniMaxM2ForCausalLM"], "num_hidden_layers": 2,
   "head_dim": 16, "rotary_dim": 8, "partial_rotary_factor": 0.5, "intermediate_size": 32, "num_local_experts": 16,
   "num_experts_per_tok": 4, "scoring_func": "sigmoid", "use_routing_bias": True, "use_qk_norm": True,
   "qk_norm_type": "per_layer", "rope_theta": 5000000, "shared_intermediate_size": 0, "use_mtp": False},
 "ernie4_5_moe": {**_A_COMMON, "model_type": "ernie4_5_moe", "architectures": ["Ernie4_5_MoeForCausalLM"],
   "num_hidden_layers": 3, "head_dim": 16, "intermediate_size": 128, "moe_intermediate_size": 32, "moe_num_experts": 16,
   "moe_k": 4, "moe_num_shared_experts": 2, "moe_layer_start_index": 1, "moe_layer_end_index": 2, "moe_layer_interval": 1,
   "moe_use_aux_free": True, "moe_norm_min": 1e-12, "use_bias": False, "rope_theta": 500000, "tie_word_embeddings": True},
 "hunyuan_v1_moe": {**_A_COMMON, "model_type": "hunyuan_v1_moe", "architectures": ["HunYuanMoEV1ForCausalLM"],
   "num_hidden_layers": 2, "head_dim": 16, "attention_head_dim": 16, "intermediate_size": 32,
   "moe_intermediate_size": [32, 32], "num_experts": 16, "moe_topk": [4, 4], "num_shared_expert": [1, 1],
   "use_mixed_mlp_moe": True, "use_qk_norm": True, "use_cla": False, "cla_share_factor": 1, "attention_bias": False,
   "mlp_bias": False, "rope_theta": 10000.0,
   "rope_scaling": {"alpha": 1000.0, "beta_fast": 32, "beta_slow": 1, "factor": 1.0, "mscale": 1.0,
                    "mscale_all_dim": 1.0, "type": "dynamic"}},
 "bailing_moe": {**_A_COMMON, "model_type": "bailing_moe", "architectures": ["BailingMoeV2ForCausalLM"],
   "num_hidden_layers": 3, "head_dim": 16, "intermediate_size": 128, "moe_intermediate_size": 32, "num_experts": 16,
   "num_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1,
   "score_function": "sigmoid", "moe_router_enable_expert_bias": True, "norm_topk_prob": True,
   "routed_scaling_factor": 2.5, "router_dtype": "fp32", "use_qk_norm": True, "partial_rotary_factor": 0.5,
   "use_bias": False, "use_qkv_bias": False, "rope_theta": 600000, "rope_scaling": None, "num_nextn_predict_layers": 0},
}

CHECK_ONLY: dict[str, dict] = {
    "qwen3_next": QWEN3_NEXT, "qwen3_5_moe": QWEN3_5_MOE, "qwen3_5_moe_text": QWEN3_5_MOE_TEXT, "llama4": LLAMA4,
    "gemma4": {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", "text_config": _G4_TEXT},
    "deepseek_v4": DEEPSEEK_V4, "kimi_k2": KIMI_K2, "kimi_linear": KIMI_LINEAR, "kimi_k3": KIMI_K3,
    **{k: v for k, v in _GROUP_A.items() if k != "glm4_moe"},
}
