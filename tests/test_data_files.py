"""Malformed data files (config.json, traces, profiles, similarity files): a clear error naming the field, never a
traceback and never a silent acceptance. One test per class the fuzz run of issue 11 found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sgl_budget.alloc import ProfileError, load_profile
from sgl_budget.cli import main
from sgl_budget.similarity import SimilarityFileError, load_similarity
from sgl_budget.spec import SpecError, load_spec
from sgl_budget.traces import TraceError, load_trace

from conftest import TINY_SOFTMAX

QWEN = {"model_type": "qwen3_moe", "num_hidden_layers": 4, "num_experts": 16, "num_experts_per_tok": 4,
        "hidden_size": 64, "moe_intermediate_size": 32, "norm_topk_prob": True}

PROFILE = """\
format: sgl-budget-profile/1
metric: kl
source: test
model: {name: tiny, num_experts: 16, top_k: 2, moe_layers: [1, 2]}
layers:
  1: {1: 0.5, 2: 0.0}
  2: {1: 0.25, 2: 0.0}
"""


def _config(tmp_path: Path, data: bytes | dict | list) -> Path:
    """Write ``data`` (raw bytes or JSON) as tmp_path/config.json."""
    p = tmp_path / "config.json"
    p.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return p


def _trace(tmp_path: Path, layers: tuple[int, ...] = TINY_SOFTMAX.moe_layers, **meta_over) -> Path:
    """A raw tiny trace file: tensors for ``layers``, metadata overridden by ``meta_over``."""
    tensors = {f"layer.{l}.router_logits": torch.randn(8, 16).half() for l in layers}
    tensors["phase"] = torch.ones(8, dtype=torch.uint8)
    meta = {"format": "sgl-budget-trace/1", "model_spec": TINY_SOFTMAX.to_dict(), "layers": list(layers),
            "sequences": [[0, 4], [4, 8]], "source": "test", "synthetic": True, **meta_over}
    return _with_meta(tmp_path / "t.trace.safetensors", tensors, "sgl_budget.trace", json.dumps(meta))


def _with_meta(path: Path, tensors: dict[str, torch.Tensor], key: str, raw: str) -> Path:
    """Write ``tensors`` to ``path`` with the raw metadata string ``raw`` under ``key``."""
    save_file(tensors, str(path), metadata={key: raw})
    return path


def _spec_dict(**over) -> dict:
    return {**TINY_SOFTMAX.to_dict(), **over}


def _profile(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "p.sens.yaml"
    p.write_text(text)
    return p


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of ``sgl-budget argv``."""
    code = main(argv)
    return code, capsys.readouterr().err


# -- tracebacks ------------------------------------------------------------------

def test_deep_nesting_is_a_clear_error(tmp_path) -> None:
    deep = "[" * 1000 + "]" * 1000
    phase = {"phase": torch.ones(2, dtype=torch.uint8)}
    with pytest.raises(TraceError, match="nested deeper"):
        load_trace(_with_meta(tmp_path / "t.safetensors", phase, "sgl_budget.trace", f'{{"source": {deep}}}'))
    with pytest.raises(ProfileError, match="nest"):
        load_profile(_profile(tmp_path, PROFILE.replace("source: test", "source: " + deep)))
    with pytest.raises(SpecError, match="config.json: nested deeper"):
        load_spec(_config(tmp_path, ('{"x": ' + deep + "}").encode()))
    with pytest.raises(SimilarityFileError, match="nested deeper"):
        load_similarity(_with_meta(tmp_path / "s.safetensors", phase, "sgl_budget.similarity", deep))


def test_trace_lacking_a_moe_layer_fails_trace_info_and_replay_alike(tmp_path, capsys) -> None:
    t = _trace(tmp_path, layers=(1,))
    with pytest.raises(TraceError, match=r"no router logits for MoE layers \[2\]"):
        load_trace(t)
    pol = tmp_path / "p.policy"
    pol.write_text('policy "p" { budget 50% }\n')
    for argv in (["trace", "info", str(t)], ["replay", str(pol), "--trace", str(t)]):
        code, err = _cli(argv, capsys)
        assert code == 2 and "no router logits for MoE layers [2]" in err and "Traceback" not in err


@pytest.mark.parametrize("field,value,fragment", [
    ("num_experts", 16.0, "num_experts must be an integer, not 16.0"),
    ("top_k", 2.5, "top_k must be an integer, not 2.5"),
    ("top_k", True, "top_k must be an integer, not True"),
])
def test_non_integer_counts_are_errors(tmp_path, field, value, fragment) -> None:
    with pytest.raises(TraceError, match=fragment):
        load_trace(_trace(tmp_path, model_spec=_spec_dict(**{field: value})))
    with pytest.raises(ProfileError, match=f"model.{fragment}"):
        load_profile(_profile(tmp_path, PROFILE.replace(f"{field}: {16 if field == 'num_experts' else 2}",
                                                        f"{field}: {json.dumps(value)}")))


def test_zero_dtype_bytes_is_an_error(tmp_path, capsys) -> None:
    t = _trace(tmp_path, model_spec=_spec_dict(dtype_bytes=0))
    code, err = _cli(["trace", "info", str(t)], capsys)
    assert code == 2 and "dtype_bytes must be >= 1, not 0" in err and str(t) in err


@pytest.mark.parametrize("data,fragment", [
    (b'{"model_type": "qwen3_moe\xff"}', "not UTF-8 text (line 1, byte offset 25)"),
    (b"[1, 2, 3]", "a config.json is a JSON object, not a list of 3 items"),
    (json.dumps({**QWEN, "num_experts_per_tok": 1e400}).encode(), "num_experts_per_tok must be an integer, not inf"),
    (json.dumps({**QWEN, "num_hidden_layers": 10 ** 9}).encode(), "num_hidden_layers must be <= 100000"),
])
def test_config_json_errors_name_file_and_field(tmp_path, capsys, data, fragment) -> None:
    cfg = _config(tmp_path, data)
    with pytest.raises(SpecError) as ei:
        load_spec(cfg)
    assert str(ei.value).startswith(f"{cfg}: ") and fragment in str(ei.value)
    pol = tmp_path / "p.policy"
    pol.write_text('policy "p" { budget 50% }\n')
    code, err = _cli(["check", str(pol), "--model-spec", str(cfg)], capsys)
    assert code == 2 and fragment in err and "Traceback" not in err


# -- silent acceptances ---------------------------------------------------------------

def test_float_layer_ids_are_errors(tmp_path) -> None:
    with pytest.raises(TraceError, match=r"'layers' must be a list of integer layer indices, not one holding 1.5"):
        load_trace(_trace(tmp_path, **{"layers": [1.5, 2]}))
    with pytest.raises(TraceError, match="moe_layers must be a list of integer layer indices"):
        load_trace(_trace(tmp_path, model_spec=_spec_dict(moe_layers=[1.0, 2.7])))


def test_booleans_must_be_booleans(tmp_path) -> None:
    with pytest.raises(SpecError, match="norm_topk_prob must be true or false, not 'no'"):
        load_spec(_config(tmp_path, {**QWEN, "norm_topk_prob": "no"}))
    with pytest.raises(TraceError, match="norm_topk_prob must be true or false, not 'no'"):
        load_trace(_trace(tmp_path, model_spec=_spec_dict(norm_topk_prob="no")))


def test_negative_shared_experts_are_an_error(tmp_path) -> None:
    with pytest.raises(TraceError, match="num_shared_experts must be >= 0, not -5"):
        load_trace(_trace(tmp_path, model_spec=_spec_dict(num_shared_experts=-5)))
    with pytest.raises(SpecError, match="n_shared_experts must be >= 0, not -5"):
        load_spec(_config(tmp_path, {"model_type": "deepseek_v2", "num_hidden_layers": 4, "n_routed_experts": 16,
                                     "num_experts_per_tok": 4, "hidden_size": 64, "moe_intermediate_size": 32,
                                     "n_shared_experts": -5}))


def test_profile_k_above_top_k_is_an_error(tmp_path, capsys) -> None:
    p = _profile(tmp_path, PROFILE.replace("{1: 0.5, 2: 0.0}", "{1: 0.5, 2: 0.1, 3: 0.0}")
                 .replace("{1: 0.25, 2: 0.0}", "{1: 0.25, 2: 0.1, 10: 0.0}"))
    with pytest.raises(ProfileError) as ei:
        load_profile(p)
    assert ei.value.line == 6 and "layer 1: k 3 exceeds the profile's model.top_k 2" in ei.value.message
    assert "line 7: layer 2: k 10 exceeds" in ei.value.message  # every problem, not just the first
    code, err = _cli(["allocate", "--profile", str(p), "--budget", "100%"], capsys)
    assert code == 2 and "exceeds the profile's model.top_k" in err


def test_duplicate_yaml_keys_are_errors(tmp_path) -> None:
    with pytest.raises(ProfileError) as ei:
        load_profile(_profile(tmp_path, PROFILE + "  1: {1: 0.9, 2: 0.0}\n"))
    assert ei.value.line == 8 and "duplicate key 1" in ei.value.message
    with pytest.raises(ProfileError, match="duplicate key 2"):
        load_profile(_profile(tmp_path, PROFILE.replace("{1: 0.25, 2: 0.0}", "{1: 0.25, 2: 0.0, 2: 0.1}")))


def test_losses_growing_with_k_warn(tmp_path, capsys) -> None:
    p = _profile(tmp_path, PROFILE.replace("{1: 0.25, 2: 0.0}", "{1: 0.25, 2: 0.5}"))
    prof = load_profile(p)
    assert len(prof.warnings) == 1 and "losses grow with k in layers [2]" in prof.warnings[0]
    code, err = _cli(["allocate", "--profile", str(p), "--budget", "75%"], capsys)
    assert code == 0 and "warning: " in err and "losses grow with k" in err
    assert load_profile(_profile(tmp_path, PROFILE)).warnings == ()


@pytest.mark.parametrize("over,fragment", [
    ({"num_experts_per_tok": 2.5}, "num_experts_per_tok must be an integer, not 2.5"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step must be >= 1, not 0"),
    ({"mlp_only_layers": [0.5]}, "mlp_only_layers must be a list of layer indices"),
])
def test_config_values_are_not_rounded_or_replaced(tmp_path, over, fragment) -> None:
    with pytest.raises(SpecError, match=fragment):
        load_spec(_config(tmp_path, {**QWEN, **over}))


def test_several_config_problems_are_reported_together(tmp_path) -> None:
    with pytest.raises(SpecError) as ei:
        load_spec(_config(tmp_path, {**QWEN, "num_experts": 16.0, "norm_topk_prob": "yes", "hidden_size": -1}))
    msg = str(ei.value)
    assert "num_experts must be an integer" in msg and "norm_topk_prob must be" in msg and "hidden_size must be" in msg


def test_over_long_file_names_are_clear_errors(tmp_path, capsys) -> None:
    long = str(tmp_path / ("x" * 300))
    for loader, error in ((load_trace, TraceError), (load_profile, ProfileError), (load_similarity, SimilarityFileError),
                          (load_spec, SpecError)):
        with pytest.raises(error, match="File name too long|cannot"):
            loader(long)
    code, err = _cli(["trace", "info", long], capsys)
    assert code == 2 and "Traceback" not in err
