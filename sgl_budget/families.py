"""MoE model families: one record per ``model_type``, the single source of truth every tool reads.

What tells one MoE family from another for routing is a handful of facts — how its
config.json names things, its scoring rule, the epsilon its reference code adds when it
renormalises, how its transformers router computes, whether SGLang serves it through
``select_experts`` — and whether each engine supports it at all. They live here, once:
the spec reader (:mod:`sgl_budget.spec`), the scoring rule (:mod:`sgl_budget.routing.scoring`),
``sgl-budget check``, the SGLang launch check and the transformers adapter all read these
records, so no two tools can disagree about a family. Adding a family is adding a row here
(and its tests: ``tests/test_families.py`` and the end-to-end family servers).

Nothing here imports an engine or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ConfigReader = Literal["qwen", "qwen_renorm", "qwen_always_renorm", "deepseek", "all_layers", "glm4", "minimax_m2",
                       "hunyuan", "ernie", "kimi_linear", "gemma4", "deepseek_v4", "bailing", "unsupported"]
CpuStatus = Literal["served", "in-process", "no"]


@dataclass(frozen=True)
class HfFacts:
    """How the family's transformers 5.19 router computes (so the adapter reproduces it bit for bit)."""

    logits_fp32: bool = False  # router logits computed in float32 (DeepSeek-V3-style routers)
    cast_back: bool = True  # routing weights cast back to the logits' dtype before the experts
    sorted_selection: bool = True  # torch.topk(sorted=True) in the plain top-k selection
    router_weight: str = "weight"  # the router's weight, as an attribute path under the MoE block's router
    router: str = "gate"  # the router module's attribute on the MoE block (GPT-OSS: ``router``)
    router_bias: str = ""  # the router's linear bias (added to the logits), as an attribute path under the router
    weights_from_selected_logits: bool = False  # weights = softmax over the chosen experts' logits (GPT-OSS)
    experts_skip_padding: bool = True  # the eager experts skip index num_experts (GPT-OSS's one-hot cannot take it)
    correction_bias: str = "gate.e_score_correction_bias"  # its attribute path under the MoE block
    weights_to_hidden_dtype: bool = False  # cast_back casts to the hidden states' dtype, not the logits' (ERNIE)
    renorm_clamp: str = ""  # config attribute: the renormalisation divides by clamp(sum, min=it) (ERNIE: moe_norm_min)
    scores_in_logit_dtype: bool = False  # gate scores, selection and weights in the logits' dtype, not float32 (DeepSeek-V4)
    # a block attribute that, when true, marks an MoE block no policy routes (DeepSeek-V4's ``is_hash``: experts from a
    # token-id table); the adapter leaves such blocks alone (the spec's moe_layers leave them out)
    stock_block: str = ""
    # Gemma 4: the router and the experts are attributes of the decoder layer itself (``layer.router``,
    # ``layer.experts``), not of an MoE block; the router RMS-normalises its input (no weight), multiplies by
    # ``router.scale`` and hidden_size**-0.5, then projects (``router.proj``); its first output is softmax(logits) in
    # float32, not the logits (recording hooks the projection instead); the weights are then multiplied by
    # ``router.per_expert_scale`` of each slot's expert (``expert_scale``: its attribute path under the router)
    moe_on_layer: bool = False
    router_input_norm: bool = False
    router_returns_probs: bool = False
    expert_scale: str = ""


@dataclass(frozen=True)
class Family:
    """The routing facts of one MoE family (one ``model_type``) and what each engine does with it."""

    model_type: str
    label: str  # what users call it
    examples: tuple[str, ...]  # public checkpoints of this family
    config: ConfigReader  # which config.json reader builds its ModelSpec (sgl_budget.spec)
    renorm_eps: float = 0.0  # what the family's reference code adds to the renormalisation denominator
    hf: HfFacts | None = HfFacts()  # None: the transformers adapter refuses it (hf_refusal says why)
    hf_refusal: str = ""
    sglang_refusal: str = ""  # non-empty: --moe-policy (and `check`) refuse this family, for this reason
    sglang_never_ties: bool = False  # SGLang's class never ties lm_head to embed_tokens (checkpoint warning)
    cpu: CpuStatus = "served"  # served end to end on CPU in CI | tested through SGLang's class in-process | no
    cpu_note: str = ""  # what CPU serving needs or why it is not served on CPU
    notes: str = ""

    @property
    def sglang_ok(self) -> bool:
        return not self.sglang_refusal

    @property
    def hf_ok(self) -> bool:
        return self.hf is not None


_MLA_ON_CPU = "CPU serving supplies a pure-torch MLA attention path (SGLang's torch-native backend fails on MLA)"
_SAME_AS_QWEN2 = ("the whole model cannot run on SGLang 0.5.23's CPU engine without the CPU build of sgl_kernel (its "
                  "Gated DeltaNet attention needs sgl_kernel CPU ops); SGLang's own MoE block of this family "
                  "(Qwen2MoeSparseMoeBlock, built from SGLang's config class) is tested in-process on CPU: stock and "
                  "policy outputs equal the transformers block's (tests/test_sglang_blocks.py)")
_NOT_READ = "sgl_budget does not read this family's config yet"

FAMILY_LIST: tuple[Family, ...] = (
    Family("qwen3_moe", "Qwen3-MoE", ("Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-235B-A22B"), "qwen",
           sglang_never_ties=True),
    Family("qwen2_moe", "Qwen2-MoE / Qwen1.5-MoE", ("Qwen/Qwen1.5-MoE-A2.7B", "Qwen/Qwen2-57B-A14B"), "qwen",
           sglang_never_ties=True,
           cpu_note="SGLang's shared-expert gate is a Triton kernel; CPU serving supplies a pure-torch stand-in"),
    Family("qwen3_next", "Qwen3-Next", ("Qwen/Qwen3-Next-80B-A3B-Instruct",), "qwen_renorm", cpu="in-process",
           cpu_note=_SAME_AS_QWEN2),
    Family("qwen3_5_moe", "Qwen3.5-MoE", ("Qwen/Qwen3.5-397B-A17B", "Qwen/Qwen3.6-35B-A3B"), "qwen_always_renorm",
           cpu="in-process", cpu_note=_SAME_AS_QWEN2, hf=None,
           hf_refusal="the adapter routes the text model: AutoModelForCausalLM loads it as qwen3_5_moe_text",
           notes="the multimodal config's text_config has model_type qwen3_5_moe_text (its own row)"),
    Family("qwen3_5_moe_text", "Qwen3.5-MoE (text model)", ("Qwen/Qwen3.5-397B-A17B",), "qwen_always_renorm",
           cpu="in-process", cpu_note=_SAME_AS_QWEN2),
    Family("olmoe", "OLMoE", ("allenai/OLMoE-1B-7B-0924",), "qwen", sglang_never_ties=True),
    Family("mixtral", "Mixtral", ("mistralai/Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x22B-v0.1"), "all_layers",
           hf=HfFacts(cast_back=False), sglang_never_ties=True),
    Family("deepseek_v2", "DeepSeek-V2", ("deepseek-ai/DeepSeek-V2-Lite", "deepseek-ai/DeepSeek-V2.5"), "deepseek",
           renorm_eps=1e-20, hf=HfFacts(logits_fp32=True, cast_back=False, sorted_selection=False),
           cpu_note=_MLA_ON_CPU),
    Family("deepseek_v3", "DeepSeek-V3 / R1", ("deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-R1"), "deepseek",
           renorm_eps=1e-20, hf=HfFacts(logits_fp32=True, cast_back=False, sorted_selection=False),
           cpu_note=_MLA_ON_CPU),
    Family("kimi_k2", "Kimi K2", ("moonshotai/Kimi-K2-Instruct", "moonshotai/Kimi-K2-Thinking"), "deepseek",
           renorm_eps=1e-20, hf=None,
           hf_refusal="transformers 5.19 has no kimi_k2 class (Kimi K2 is DeepSeek-V3's architecture: load it as "
                      "deepseek_v3)",
           cpu_note="the checkpoint (published config.json shape: model_type kimi_k2, auto_map to the "
                    "configuration_deepseek.py it ships) is served with --trust-remote-code through SGLang's "
                    "DeepseekV3ForCausalLM; SGLang 0.5.23 reads that config with its own kimi_k2 alias of "
                    "transformers' DeepseekV3Config, with or without the flag; the transformers reference loads the "
                    "same weights as deepseek_v3 (config.json's model_type rewritten); " + _MLA_ON_CPU),
    Family("glm4_moe", "GLM-4.5 / 4.6 / 4.7", ("zai-org/GLM-4.5", "zai-org/GLM-4.5-Air", "zai-org/GLM-4.6"), "glm4",
           renorm_eps=1e-20, hf=HfFacts(logits_fp32=True, cast_back=False, sorted_selection=False)),
    Family("glm4_moe_lite", "GLM-4.7-Flash", ("zai-org/GLM-4.7-Flash",), "glm4", renorm_eps=1e-20,
           hf=HfFacts(logits_fp32=True, cast_back=False, sorted_selection=False), cpu_note=_MLA_ON_CPU),
    Family("gpt_oss", "GPT-OSS", ("openai/gpt-oss-20b", "openai/gpt-oss-120b"), "all_layers",
           hf=HfFacts(router="router", router_bias="bias", weights_from_selected_logits=True,
                      experts_skip_padding=False),
           cpu="in-process",
           cpu_note="the whole model cannot run on SGLang 0.5.23's CPU engine: GPT-OSS needs attention with sliding "
                    "windows and sinks, so its launch check refuses --attention-backend torch_native (it wants triton, "
                    "trtllm_mha, fa3, fa4, ascend, intel_amx, intel_xpu or aiter), and without AMX the CPU engine "
                    "falls back to torch_native anyway; SGLang's own MoE block (GptOssSparseMoeBlock: router linear "
                    "with bias, softmax TopK with renormalisation, FusedMoE with biases and the clamped SwiGLU on "
                    "moe_forward_native) is tested in-process on CPU: "
                    "stock and policy outputs equal the transformers block's (tests/test_sglang_blocks_gpt_oss.py)",
           notes="on GPU SGLang 0.5.23 picks the triton_kernel MoE runner for bf16 GPT-OSS, whose routing is fused "
                 "into the kernel (select_experts is never called): a worker routing with --moe-policy stops when the "
                 "layer binds that runner, with an error that asks for --moe-runner-backend triton; transformers "
                 "weighs by a softmax over the chosen experts' logits (the adapter reproduces it bit for bit), SGLang "
                 "by the renormalised softmax (equal up to rounding); the published checkpoints are MXFP4, whose MoE "
                 "runners sgl_budget has not tested (its tests use unquantized weights)"),
    Family("minimax_m2", "MiniMax-M2", ("MiniMaxAI/MiniMax-M2", "MiniMaxAI/MiniMax-M2.1"), "minimax_m2",
           hf=HfFacts(cast_back=False, sorted_selection=False, correction_bias="e_score_correction_bias"),
           cpu_note="its QK-norm is a CUDA-only Triton kernel in SGLang 0.5.23; CPU serving supplies a pure-torch "
                    "stand-in (one RMS norm over all heads, as transformers computes it)"),
    Family("ernie4_5_moe", "ERNIE-4.5-MoE", ("baidu/ERNIE-4.5-21B-A3B-PT", "baidu/ERNIE-4.5-300B-A47B-PT"),
           "ernie", hf=HfFacts(logits_fp32=True, correction_bias="gate.moe_statics.e_score_correction_bias",
                               weights_to_hidden_dtype=True, renorm_clamp="moe_norm_min"),
           cpu="served",
           notes="weights are the softmax of the chosen experts, chosen by softmax + correction bias "
                 "(moe_statics.e_score_correction_bias), always renormalised: transformers divides by clamp(sum, "
                 "min=moe_norm_min), SGLang by sum + 1e-20, and each engine's policies do as it does; SGLang 0.5.23's "
                 "GPU top-k for this TopK (fused_topk's softmax kernel) drops the bias, so stock routing on CUDA is "
                 "plain softmax top-k, and --moe-policy on CUDA ranks by the unbiased softmax too (own-k == stock "
                 "there; routing traces recorded there keep the bias, which replay applies); its torch-native and CPU "
                 "paths apply the bias; MoE layers follow SGLang's rule (start + every interval), transformers' "
                 "differs for moe_layer_interval > 1 (the adapter then refuses)"),
    Family("hunyuan_v1_moe", "Hunyuan-A13B", ("tencent/Hunyuan-A13B-Instruct",), "hunyuan",
           hf=HfFacts(logits_fp32=True, router_weight="wg.weight"), cpu="in-process",
           cpu_note="with --device cpu, SGLang 0.5.23's Hunyuan attention crashes in its first prefill (its QK-norm "
                    "leaves q as [tokens x heads, head_dim], which the padded-extend path cuts to the first `tokens` "
                    "rows: \"shape '[-1, 4, 16]' is invalid\"), stock or not; its TopK is the plain softmax top-k "
                    "with renormalisation that the qwen3_moe test serves. SGLang's own MoE block "
                    "(HunYuanSparseMoeBlock) is tested in-process on CPU: stock and policy outputs equal the "
                    "transformers block's (tests/test_sglang_blocks_hunyuan.py)",
           notes="per-layer moe_topk / moe_intermediate_size / num_shared_expert lists must be uniform (they are in "
                 "Hunyuan-A13B); transformers 5.19 sizes its experts and shared MLP with intermediate_size, SGLang with "
                 "moe_intermediate_size and num_shared_expert (equal in the published config)"),
    Family("bailing_moe", "Ling (Bailing-MoE)", ("inclusionAI/Ling-mini-2.0", "inclusionAI/Ling-flash-2.0"),
           "bailing", renorm_eps=1e-20, hf=None,
           hf_refusal="transformers 5.19 has no Bailing-MoE class (remote code only)",
           cpu="in-process",
           cpu_note="not served whole in CI (transformers 5.19 has no Bailing-MoE config class: its config.json "
                    "loads only as remote code); SGLang's own MoE block (BailingMoESparseMoeBlock: BailingMoEGate "
                    "router in router_dtype, TopK(use_grouped_topk, correction_bias=gate.expert_bias) - sigmoid + "
                    "bias, grouped top-k, renormalised - FusedMoE on moe_forward_native, shared BailingMoEMLP) is "
                    "tested in-process on CPU without a transformers reference: own-k through sgl_budget's router "
                    "picks SGLang's experts with bit for bit the weights of SGLang's biased_grouped_topk_impl run "
                    "eagerly (stock runs it torch.compile-d, within an ulp), and under policies the block equals "
                    "its experts combined with sgl_budget's reference routing of the same router logits "
                    "(tests/test_sglang_blocks_bailing.py)",
           notes="SGLang reads first_k_dense_replace (MoE layers from it on), num_experts / num_experts_per_tok, "
                 "num_shared_experts (moe_shared_expert_intermediate_size, else moe_intermediate_size), "
                 "moe_router_enable_expert_bias (the correction bias), score_function (else sigmoid with the bias, "
                 "softmax without), n_group / topk_group (grouped when set), norm_topk_prob and "
                 "routed_scaling_factor; SGLang 0.5.23 applies routed_scaling_factor in its GPU MoE runners "
                 "(fused_experts' combine), but its CPU paths (moe_forward_native, the AMX fused_experts_cpu) never "
                 "do, stock or with a policy; multimodal routers (multi_gate / MultiRouter) are refused"),
    Family("llama4", "Llama 4", ("meta-llama/Llama-4-Scout-17B-16E", "meta-llama/Llama-4-Maverick-17B-128E"),
           "unsupported", hf=None,
           hf_refusal="top-1 routing whose weight scales the expert's input; nothing for a budget to reduce",
           sglang_refusal="top-1 routing (one expert per token, its sigmoid weight applied to the input through a "
                          "custom routing function): a budget has no expert slots to reduce", cpu="no"),
    Family("gemma4", "Gemma 4 (MoE)", ("google/gemma-4-26b-a4b",), "gemma4",
           hf=HfFacts(cast_back=False, router="router", router_weight="proj.weight", moe_on_layer=True,
                      router_input_norm=True, router_returns_probs=True, expert_scale="per_expert_scale"),
           cpu="in-process",
           cpu_note="the whole model cannot run on SGLang 0.5.23's CPU engine: its launch check for Gemma 4 refuses "
                    "--attention-backend torch_native (it wants trtllm_mha, triton, fa4, ascend, intel_xpu, intel_amx "
                    "or aiter; unset, it picks triton), and without AMX the CPU engine has only torch_native; SGLang's "
                    "own MoE layer (Gemma4Router: RMS norm without weight "
                    "x scale x hidden_size^-0.5, then the projection; Gemma4MoE: TopK with Gemma 4's routing "
                    "function, FusedMoE with GELU-tanh on moe_forward_native) is tested in-process on CPU: stock and "
                    "policy outputs equal the transformers layer's router + experts "
                    "(tests/test_sglang_blocks_gemma4.py)",
           notes="the router and experts sit on the decoder layer, beside a dense MLP that runs every step (counted as "
                 "a shared expert); weights = softmax over the chosen experts, times the layer's learned "
                 "per_expert_scale of each slot's expert, applied after the renormalisation (under a policy: over the "
                 "kept experts, then the scale, by the expert a slot finally uses). transformers ranks the float32 "
                 "softmax and renormalises it (no epsilon); SGLang ranks the raw logits and takes the softmax of the "
                 "chosen logits in their dtype on CPU (float32 in its CUDA kernel), times the scale in that dtype; "
                 "each engine's policies do as it does (own-k is bit for bit each engine's routing). The "
                 "multimodal checkpoint's language model (model.language_model.layers) is what the adapter routes"),
    Family("deepseek_v4", "DeepSeek-V4", ("deepseek-ai/DeepSeek-V4-Flash",), "deepseek_v4", renorm_eps=1e-20,
           hf=HfFacts(sorted_selection=False, scores_in_logit_dtype=True, stock_block="is_hash"),
           cpu="in-process",
           cpu_note="not served whole on CPU: on a machine without CUDA SGLang 0.5.23's DeepSeek-V4 MoE block alone "
                    "calls CUDA JIT kernels (the shared MLP's clamped SwiGLU silu_and_mul_clamp; the hash layers' fused "
                    "hash_topk while SGLANG_OPT_USE_FUSED_HASH_TOPK is on, its default); SGLang's own MoE block "
                    "(DeepseekV2MoE built with is_deepseek_v4: MoEGate router, TopK(scoring_func='sqrtsoftplus', "
                    "use_grouped_topk=False, correction_bias) on its torch-native path, FusedMoE on "
                    "moe_forward_native, the shared MLP with a pure-torch SwiGLU stand-in) is tested in-process on "
                    "CPU: stock and policy outputs equal the transformers block's, and a hash layer stays stock "
                    "(tests/test_sglang_blocks_deepseek_v4.py)",
           notes="routed layers select with sqrt(softplus(logits)) + e_score_correction_bias, ungrouped (n_group is "
                 "ignored by both engines), weigh by the unbiased scores renormalised (sum + 1e-20) times "
                 "routed_scaling_factor; SGLang's CPU path scores in the logits' dtype and sums in float32, "
                 "transformers scores, sums and weighs in the logits' dtype, and each engine's policies do as it "
                 "does; the first num_hash_layers layers pick experts from a frozen token-id table (SGLang's "
                 "HashTopK, which never calls select_experts; transformers' DeepseekV4HashRouter): they are not "
                 "policy-routed (left out of the spec's MoE layers, so check, explain, replay and both engines "
                 "leave them stock); a config without num_hash_layers / mlp_layer_types is refused (SGLang 0.5.23 "
                 "then hashes no layer, transformers 5.19 the first 3), and so is DeepSeek-V4.1 "
                 "(sqrtsoftplus_log1p routing)"),
    Family("kimi_linear", "Kimi Linear", ("moonshotai/Kimi-Linear-48B-A3B-Instruct",), "kimi_linear",
           renorm_eps=1e-20, hf=HfFacts(logits_fp32=True, cast_back=False, sorted_selection=False),
           cpu="in-process",
           cpu_note="the whole model cannot run on SGLang 0.5.23's CPU engine: its Kimi Delta Attention backend "
                    "(kda_backend.py) always runs the Triton causal_conv1d_fn in prefill and, with --device cpu, "
                    "needs the CPU build of sgl_kernel (causal_conv1d_update_cpu); SGLang's own MoE block (KimiMoE: ReplicatedLinear router, "
                    "TopK(use_grouped_topk=True, correction_bias) - sigmoid + bias, grouped top-k, renormalised - "
                    "FusedMoE on moe_forward_native, shared KimiMLP) is tested in-process on CPU: stock and policy "
                    "outputs equal the transformers block's (tests/test_sglang_blocks_kimi_linear.py)",
           notes="its config names the routing fields num_experts / num_experts_per_token / moe_renormalize / "
                 "num_expert_group / num_shared_experts (read as such); both engines always route DeepSeek-V3-style "
                 "(sigmoid + e_score_correction_bias, grouped top-k, sum + 1e-20 renormalisation, "
                 "routed_scaling_factor) whatever use_grouped_topk / topk_method / moe_router_activation_func say; "
                 "SGLang 0.5.23 applies routed_scaling_factor in its GPU MoE runners (fused_experts' combine), but "
                 "its CPU paths (moe_forward_native, the AMX fused_experts_cpu) never do, stock or with a policy; "
                 "checkpoints of Kimi K3's text model (KimiK3LinearForCausalLM, or routed_expert_hidden_size set) "
                 "are refused as Kimi K3"),
    Family("kimi_k3", "Kimi K3", ("(SGLang 0.5.23's KimiK3ForConditionalGeneration; no public checkpoint named)",),
           "unsupported", hf=None, hf_refusal="transformers 5.19 has no Kimi K3 class",
           sglang_refusal="SGLang 0.5.23's KimiK3MoE (a Kimi Linear text model with latent MoE: routed experts run in "
                          "routed_expert_hidden_size, SiTU activation) routes on CUDA through a fused MoE front "
                          "(SGLANG_K3_FUSED_FRONT, on by default: router gate merged with the latent down-projection, "
                          "sigmoid + bias top-k emitted by a kernel as a precomputed TopK output) that never calls "
                          "select_experts, and transformers has no class to verify its routing against",
           cpu="no"),
)

FAMILIES: dict[str, Family] = {f.model_type: f for f in FAMILY_LIST}


# the text model's model_type inside a multimodal config (its text_config) -> the family's row
ALIASES = {"llama4_text": "llama4", "gemma4_text": "gemma4", "kimi_k25": "kimi_k2"}


def family_of(model_type: str) -> Family | None:
    """The family record of ``model_type`` (None: not a family sgl_budget knows)."""
    return FAMILIES.get(ALIASES.get(model_type, model_type))


def known_types() -> str:
    return ", ".join(FAMILIES)


def sglang_refusal(model_type: str) -> str | None:
    """Why ``--moe-policy`` cannot serve this model type (None: it can). The server's launch check and
    ``sgl-budget check`` both call this, so they agree on every family."""
    fam = family_of(model_type)
    if fam is None:
        return (f"model type {model_type!r} is not an MoE family sgl_budget knows "
                f"(known: {known_types()})")
    if fam.sglang_refusal:
        return f"model type {model_type!r} ({fam.label}) is not supported by --moe-policy: {fam.sglang_refusal}"
    return None


def hf_refusal(model_type: str) -> str | None:
    """Why the transformers adapter cannot route this model type (None: it can)."""
    fam = family_of(model_type)
    if fam is None:
        return (f"model type {model_type!r} is not an MoE family sgl_budget knows "
                f"(known: {known_types()})")
    if fam.hf is None:
        return f"model type {model_type!r} ({fam.label}) is not supported by the transformers adapter: {fam.hf_refusal}"
    return None


def engine_refusal(engine: str, model_type: str) -> str | None:
    """:func:`sglang_refusal` or :func:`hf_refusal` by engine name (``sglang`` / ``hf``)."""
    return sglang_refusal(model_type) if engine == "sglang" else hf_refusal(model_type)


def _cell(ok: bool, why: str) -> str:
    return "yes" if ok else f"no: {why}" if why else "no"


def support_rows() -> list[dict[str, str]]:
    """The support matrix, one row per family, from the records above (the README's table is this, rendered)."""
    rows = []
    for f in FAMILY_LIST:
        cpu = {"served": "yes", "in-process": "in-process (SGLang's model class)", "no": "no"}[f.cpu]
        rows.append({
            "family": f.label, "model_type": f.model_type, "examples": ", ".join(f.examples),
            "check / --moe-policy": _cell(f.sglang_ok, f.sglang_refusal),
            "served end to end on CPU in CI": cpu if f.sglang_ok else "no",
            "transformers adapter": _cell(f.hf_ok, f.hf_refusal),
            "notes": "; ".join(n for n in (f.cpu_note if f.sglang_ok else "", f.notes) if n),
        })
    return rows


def support_markdown() -> str:
    """:func:`support_rows` as a Markdown table."""
    rows = support_rows()
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r[h].replace("|", "\\|") for h in head]
        cells[1] = f"`{cells[1]}`"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
