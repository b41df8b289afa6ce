"""One record per MoE family (sgl_budget.families): every tool reads it, so `check` and the server agree on all.

For every family row (and a model type no row knows, and a config that is not MoE at all), a config.json
shaped like the family's published one is put in a model directory, and the same policy is checked twice:

* by ``sgl-budget check POLICY --model-spec DIR`` (the CLI a user runs before launching), and
* by the SGLang launch check itself (``plugin.apply_settings``: what ``--moe-policy`` runs in the launcher
  before any worker starts).

Both must accept, or both refuse with the same reason; a refusal names the family and why.
"""

from __future__ import annotations

import json
import os

import pytest
from family_configs import CHECK_ONLY
from family_models import CONFIGS

from sgl_budget.cli import main
from sgl_budget.engines.sglang.plugin import apply_settings
from sgl_budget.engines.sglang.settings import Settings
from sgl_budget.families import ALIASES, FAMILIES, FAMILY_LIST, family_of, hf_refusal, sglang_refusal
from sgl_budget.spec import _READERS, ModelSpec, SpecError

ALL_CONFIGS = {**CHECK_ONLY, **CONFIGS}
OTHER = {
    "unknown-moe": {"model_type": "acme_moe", "num_hidden_layers": 2, "num_experts": 8, "num_experts_per_tok": 2,
                    "hidden_size": 16, "moe_intermediate_size": 8},
    "dense-llama": {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8},
}
POLICY = 'policy "half" {\n  budget 50%\n  layers { allocate uniform }\n}\n'


def test_every_family_has_a_config_and_a_reader() -> None:
    assert set(FAMILIES) <= set(ALL_CONFIGS), "a family row needs a config in family_models / family_configs"
    for fam in FAMILY_LIST:
        assert fam.config in _READERS, fam.model_type
        assert (fam.hf is None) == bool(fam.hf_refusal), f"{fam.model_type}: an hf refusal iff no hf facts"
        assert fam.cpu == "served" or fam.cpu_note or fam.sglang_refusal, f"{fam.model_type}: say why not served"
        assert fam.examples
    assert all(a not in FAMILIES and t in FAMILIES for a, t in ALIASES.items())


@pytest.fixture
def restore_env():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _check_cli(model_dir, policy, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = main(["check", str(policy), "--model-spec", str(model_dir)])
    except SystemExit as e:
        rc = int(e.code or 0)
    out = capsys.readouterr()
    return rc, out.out + out.err


def _launch_check(model_dir, policy) -> tuple[bool, str]:
    try:
        apply_settings(Settings(policy=str(policy)), str(model_dir), exit_on_error=False)
    except Exception as e:  # PolicyError / SpecError: what the launcher prints before exiting with status 2
        return False, str(e)
    return True, ""


@pytest.mark.parametrize("name", sorted(ALL_CONFIGS) + sorted(OTHER))
def test_check_and_the_server_agree(name, tmp_path, capsys, restore_env) -> None:
    cfg = {**ALL_CONFIGS, **OTHER}[name]
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    policy = tmp_path / "half.policy"
    policy.write_text(POLICY)
    rc, said = _check_cli(d, policy, capsys)
    served, why = _launch_check(d, policy)
    assert (rc == 0) == served, f"{name}: check exit {rc} ({said.strip()[-300:]}) but the launch check says " \
                                f"{'ok' if served else why}"
    fam = family_of(cfg.get("text_config", cfg).get("model_type", cfg["model_type"]))
    if served:
        assert "servable by SGLang (--moe-policy)" in said
        assert fam is not None and fam.sglang_ok, name
    else:
        assert rc == 2 and "Traceback" not in said
        reason = why.split(": ", 1)[-1][:60]  # the launcher's reason (after the model path) is what check says
        assert reason in said, f"{name}: check said {said!r}, the server {why!r}"
        if fam is not None:  # a known family's refusal names it and says why
            assert fam.label in said and (fam.sglang_refusal[:40] in said or "is not an MoE" in said), said
        else:
            assert "not an MoE" in said, said


def test_refusals_read_the_family_rows() -> None:
    for fam in FAMILY_LIST:
        refusal = sglang_refusal(fam.model_type)
        assert (refusal is None) == fam.sglang_ok
        if refusal:
            assert fam.sglang_refusal in refusal and fam.label in refusal
        assert (hf_refusal(fam.model_type) is None) == fam.hf_ok
    assert "not an MoE family sgl_budget knows" in sglang_refusal("acme_moe")


EXPECTED = {  # the routing facts each reader must get from the published config shapes
    "glm4_moe": dict(moe_layers=(1, 2), scoring_func="sigmoid", has_correction_bias=True, n_group=4, topk_group=2,
                     routed_scaling_factor=2.5, norm_topk_prob=True, num_shared_experts=1),
    "glm4_moe_lite": dict(moe_layers=(1, 2), scoring_func="sigmoid", has_correction_bias=True,
                          routed_scaling_factor=1.8, num_shared_experts=1),
    "qwen3_next": dict(norm_topk_prob=True, num_shared_experts=1, scoring_func="softmax"),
    "qwen3_5_moe": dict(model_type="qwen3_5_moe_text", norm_topk_prob=True, num_shared_experts=1),
    "kimi_k2": dict(moe_layers=(1, 2, 3), scoring_func="sigmoid", has_correction_bias=True, n_group=1,
                    routed_scaling_factor=2.827),
    # its own key names: num_experts_per_token, moe_renormalize, num_expert_group, num_shared_experts
    "kimi_linear": dict(moe_layers=(1, 2, 3), num_experts=16, top_k=4, scoring_func="sigmoid",
                        has_correction_bias=True, n_group=1, norm_topk_prob=True, routed_scaling_factor=2.446,
                        num_shared_experts=1, shared_expert_intermediate_size=32),
    # Ling 2.0's keys: num_shared_experts, score_function, moe_router_enable_expert_bias, n_group / topk_group
    "bailing_moe": dict(moe_layers=(1, 2), num_experts=16, top_k=4, scoring_func="sigmoid", has_correction_bias=True,
                        n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, num_shared_experts=1,
                        shared_expert_intermediate_size=32, moe_intermediate_size=32),
    "deepseek_v3": dict(moe_layers=(1, 2), scoring_func="sigmoid", has_correction_bias=True, n_group=4),
    # num_hash_layers 1: layer 0 routes by token id (no policy can change it), layers 1..3 by sqrt(softplus) + bias,
    # ungrouped whatever n_group says
    "deepseek_v4": dict(moe_layers=(1, 2, 3), num_layers=4, num_experts=16, top_k=4, scoring_func="sqrtsoftplus",
                        has_correction_bias=True, n_group=1, norm_topk_prob=True, routed_scaling_factor=1.5,
                        num_shared_experts=1, shared_expert_intermediate_size=32, moe_intermediate_size=32),
    # the multimodal config's text model: every layer MoE (enable_moe_block), its dense MLP counted as a shared
    # expert, softmax renormalised, then the per-expert scale
    "gemma4": dict(model_type="gemma4_text", moe_layers=(0, 1, 2, 3), num_experts=16, top_k=4,
                   scoring_func="softmax", norm_topk_prob=True, has_expert_scale=True, has_correction_bias=False,
                   num_shared_experts=1, shared_expert_intermediate_size=64, moe_intermediate_size=32),
    "deepseek_v2": dict(moe_layers=(1, 2), scoring_func="softmax", has_correction_bias=False, norm_topk_prob=False),
    "gpt_oss": dict(norm_topk_prob=True, scoring_func="softmax"),
    "minimax_m2": dict(scoring_func="sigmoid", has_correction_bias=True, norm_topk_prob=True),
    "qwen2_moe": dict(num_shared_experts=1, shared_expert_intermediate_size=64, norm_topk_prob=False),
    "ernie4_5_moe": dict(moe_layers=(1, 2), num_experts=16, top_k=4, scoring_func="softmax", has_correction_bias=True,
                         norm_topk_prob=True, n_group=1, num_shared_experts=2, shared_expert_intermediate_size=64),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_readers_get_the_routing_facts(name) -> None:
    spec = ModelSpec.from_hf_config(ALL_CONFIGS[name])
    for field, want in EXPECTED[name].items():
        assert getattr(spec, field) == want, (name, field)


def test_kimi_linear_reader_edges() -> None:
    """MoE layers by SGLang's rule unless only transformers' mlp_layer_types is there; disagreeing ones and Kimi K3's
    text model (a kimi_linear config SGLang builds KimiK3MoE for) are refused."""
    cfg = {k: v for k, v in ALL_CONFIGS["kimi_linear"].items() if k != "first_k_dense_replace"}
    assert ModelSpec.from_hf_config(cfg).moe_layers == (0, 1, 2, 3)  # SGLang's default: no dense first layer
    typed = {**cfg, "mlp_layer_types": ["dense", "dense", "sparse", "sparse"]}  # a transformers config's to_dict
    assert ModelSpec.from_hf_config(typed).moe_layers == (2, 3)
    with pytest.raises(SpecError, match="SGLang's rule"):
        ModelSpec.from_hf_config({**typed, "first_k_dense_replace": 1})
    for k3 in ({**cfg, "architectures": ["KimiK3LinearForCausalLM"]}, {**cfg, "routed_expert_hidden_size": 32},
               ALL_CONFIGS["kimi_k3"]):
        with pytest.raises(SpecError, match=r"'kimi_k3' \(Kimi K3\) is not supported"):
            ModelSpec.from_hf_config(k3)


def test_deepseek_v4_reader_edges() -> None:
    """Hash layers from num_hash_layers (SGLang's key) or mlp_layer_types (a transformers config's to_dict); configs
    whose engines would route differently are refused: neither key (SGLang hashes no layer, transformers the first 3),
    the two disagreeing, norm_topk_prob false, a topk_method without the correction bias, another scoring rule."""
    cfg = {k: v for k, v in ALL_CONFIGS["deepseek_v4"].items() if k != "num_hash_layers"}
    assert ModelSpec.from_hf_config({**cfg, "num_hash_layers": 3}).moe_layers == (3,)
    assert ModelSpec.from_hf_config({**cfg, "num_hash_layers": 0, "n_group": 8, "topk_group": 4}).moe_layers == \
        (0, 1, 2, 3)
    typed = {**cfg, "mlp_layer_types": ["hash_moe", "hash_moe", "moe", "moe"]}
    assert ModelSpec.from_hf_config(typed).moe_layers == (2, 3)
    assert ModelSpec.from_hf_config({**typed, "num_hash_layers": 2}).moe_layers == (2, 3)
    for bad, why in ((cfg, "num_hash_layers .or mlp_layer_types. is missing"),
                     ({**typed, "num_hash_layers": 1}, "SGLang's rule"),
                     ({**cfg, "num_hash_layers": 1, "norm_topk_prob": False}, "always renormalises"),
                     ({**cfg, "num_hash_layers": 1, "topk_method": "greedy"}, "no correction bias"),
                     ({**cfg, "num_hash_layers": 1, "scoring_func": "softmax"}, "sqrtsoftplus"),
                     ({**cfg, "num_hash_layers": 4}, "no MoE layers")):
        with pytest.raises(SpecError, match=why):
            ModelSpec.from_hf_config(bad)


def test_bailing_reader_edges() -> None:
    """Ling 1.x shapes (softmax, no bias, no groups), shared experts of their own size, and the configs SGLang
    rejects or sgl_budget cannot describe (a score function against the bias, bad groups, multimodal routers)."""
    cfg = ALL_CONFIGS["bailing_moe"]
    plain = {k: v for k, v in cfg.items() if k not in ("score_function", "moe_router_enable_expert_bias", "n_group",
                                                         "topk_group")}
    s = ModelSpec.from_hf_config(plain)
    assert (s.scoring_func, s.has_correction_bias, s.grouped) == ("softmax", False, False)
    s = ModelSpec.from_hf_config({**cfg, "num_shared_experts": 2, "moe_shared_expert_intermediate_size": 48})
    assert (s.num_shared_experts, s.shared_expert_intermediate_size) == (2, 96)
    assert ModelSpec.from_hf_config({**cfg, "num_shared_experts": None}).num_shared_experts == 0
    for bad, why in (({**cfg, "score_function": "softmax"}, "softmax without a bias"),
                     ({**cfg, "topk_group": 5}, "topk_group <= n_group"),
                     ({**cfg, "router_type": "MultiRouter"}, "multimodal routing"),
                     ({**cfg, "multi_gate": True}, "multimodal routing")):
        with pytest.raises(SpecError, match=why):
            ModelSpec.from_hf_config(bad)


def test_unsupported_families_cannot_be_described() -> None:
    for fam in FAMILY_LIST:
        if fam.config == "unsupported":
            cfg = ALL_CONFIGS[fam.model_type]
            with pytest.raises(SpecError, match="is not supported by --moe-policy"):
                ModelSpec.from_hf_config(cfg)


def test_readme_support_matrix_is_generated_from_the_records() -> None:
    """The README's table is `sgl-budget families`' output (regenerate: scripts/support_matrix.py)."""
    from pathlib import Path

    from sgl_budget.families import support_markdown

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- families:start -->\n", 1)[1].split("<!-- families:end -->", 1)[0]
    assert block == support_markdown(), "README.md's support matrix is stale: run python scripts/support_matrix.py"
