"""A policy names profile and similarity files: their problems are PolicyErrors at the file name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sgl_budget.alloc import Profile, save_profile
from sgl_budget.similarity import save_similarity, synthetic_similarity
from sgl_budget.spec import PRESETS

from conftest import TINY_SOFTMAX

EYE = torch.eye(4)
GOOD_HEAD = "format: sgl-budget-profile/1\nmetric: kl\nmodel: {num_experts: 16, top_k: 4}\n"


def _sim_file(tmp_path, tensors, meta):
    p = tmp_path / "bad.sim.safetensors"
    save_file(tensors, str(p), metadata=None if meta is None else {"sgl_budget.similarity": meta})
    return p


def _good_meta(**over):
    m = {"format": "sgl-budget-similarity/1", "model": {"name": "t", "num_experts": 4, "moe_layers": [1]},
         "method": "x", "source": "test", "synthetic": True}
    m.update(over)
    return json.dumps(m)


EYE = torch.eye(4)
def test_policy_reports_bad_similarity_file_at_its_name(tmp_path) -> None:
    from sgl_budget.errors import PolicyError
    from sgl_budget.lang import compile_policy

    _sim_file(tmp_path, {"layer.1.similarity": EYE * 2}, _good_meta())
    src = 'policy "p" {\n  reroute {\n    similarity "bad.sim.safetensors"\n    primary top 1\n  }\n}\n'
    with pytest.raises(PolicyError) as ei:
        compile_policy(src, TINY_SOFTMAX, file="p.policy", base_dir=tmp_path)
    e = ei.value
    assert "bad similarity file" in e.message and e.line == 3 and e.column == 16


def test_policy_reports_mismatched_similarity_file(tmp_path) -> None:
    from sgl_budget.errors import PolicyError
    from sgl_budget.lang import compile_policy

    save_similarity(synthetic_similarity(TINY_SOFTMAX), tmp_path / "tiny.sim.safetensors")
    src = 'policy "p" { reroute { similarity "tiny.sim.safetensors"; primary top 1 } }'
    with pytest.raises(PolicyError, match="does not fit deepseek-v2-lite"):
        compile_policy(src, PRESETS["deepseek-v2-lite"], base_dir=tmp_path)


def test_policy_reports_bad_profile_with_its_line(tmp_path) -> None:
    from sgl_budget.errors import PolicyError
    from sgl_budget.lang import compile_policy

    (tmp_path / "p.yaml").write_text(GOOD_HEAD + "layers:\n  1: {1: -1}\n")
    src = 'policy "p" {\n  budget 50%\n  layers { allocate dp from "p.yaml" }\n}'
    with pytest.raises(PolicyError) as ei:
        compile_policy(src, TINY_SOFTMAX, file="x.policy", base_dir=tmp_path)
    assert "bad profile (line 5)" in ei.value.message and ei.value.line == 3


def test_dp_policy_plan_matches_allocate(tmp_path) -> None:
    from sgl_budget.lang import compile_policy

    prof = Profile(loss={1: {1: 5.0, 2: 1.0, 3: 0.5, 4: 0.0}, 2: {1: 0.2, 2: 0.1, 3: 0.05, 4: 0.0}},
                   metric="kl", model={"num_experts": 16, "top_k": 4, "moe_layers": [1, 2]}, source="test")
    save_profile(prof, tmp_path / "p.yaml")
    ir = compile_policy('policy "p" { budget 50%; layers { allocate dp from "p.yaml" } }', TINY_SOFTMAX,
                        base_dir=tmp_path)
    lk = ir.layer_k[(0, 0)]
    assert lk.k == {1: 3, 2: 1} and lk.method == "dp" and abs(lk.predicted_loss - 0.7) < 1e-9


ROOT = Path(__file__).resolve().parent.parent


def _bundled_policies() -> list[Path]:
    """Every policy file the package ships (DeepSeek-V2-Lite-shaped and the embedded model's)."""
    root = ROOT / "policies"
    return sorted(root.glob("*.policy")) + sorted(root.glob("brown-moe/**/*.policy"))


def _preserve_critical(path: Path) -> int:
    """The largest ``preserve critical N`` of a bundled policy's reroute blocks (0 without one)."""
    from sgl_budget.lang import load_policy
    from sgl_budget.spec import load_spec

    spec = load_spec(ROOT / "models" / "brown-moe") if "brown-moe" in path.parts else PRESETS["deepseek-v2-lite"]
    ir = load_policy(path, spec)
    return max((r.value.preserve_critical for r in ir.reroute_rules), default=0)


def test_bundled_policies_are_named_after_what_they_run() -> None:
    """SERE's published rule has no pinned critical experts: only a policy named for the extension uses it."""
    for path in _bundled_policies():
        extension = "preserve-critical" in path.stem
        assert (_preserve_critical(path) > 0) == extension, path.name
        header = " ".join(l for l in path.read_text().splitlines() if l.startswith("#"))
        if extension:
            assert "extension" in header and "NOT SERE's published rule" in header, path.name


def _statements(path: Path) -> list[str]:
    """A policy file's non-comment lines, stripped."""
    return [l.strip() for l in path.read_text().splitlines() if l.strip() and not l.startswith("#")]


def test_sere_policy_and_its_extension_differ_only_by_preserve_critical() -> None:
    sere = _statements(ROOT / "policies" / "sere.policy")
    ext = _statements(ROOT / "policies" / "sere-preserve-critical.policy")
    assert [l for l in ext if not l.startswith("preserve critical")] == [
        l.replace('"sere"', '"sere-preserve-critical"') for l in sere]
