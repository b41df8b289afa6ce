"""The embedded default model (models/brown-moe): loads with the stock transformers class, its shipped
profile / similarity / trace fit it, its bundled policies compile, and the README's main command runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

if os.environ.get("SGL_BUDGET_REQUIRE_SGLANG"):
    import transformers  # noqa: F401
transformers = pytest.importorskip("transformers", reason="install the hf extra: pip install -e '.[hf]'")

from sgl_budget.cli import EMBEDDED_TRACE, bundled_dir, default_model_dir, main  # noqa: E402
from sgl_budget.lang import load_policy  # noqa: E402
from sgl_budget.spec import load_spec  # noqa: E402
from sgl_budget.traces import load_trace  # noqa: E402

MODEL = default_model_dir()
POLICIES = sorted((bundled_dir() / "brown-moe").glob("*.policy"))


def test_checkpoint_is_small_and_stock_loadable() -> None:
    weights = MODEL / "model.safetensors"
    assert weights.stat().st_size < 50 * 2**20
    cfg = json.loads((MODEL / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["num_local_experts"] == 64
    assert cfg["num_experts_per_tok"] == 8 and cfg["num_hidden_layers"] == 8
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, local_files_only=True)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    log = json.loads((MODEL / "train_log.json").read_text())
    assert log["heldout_perplexity_fp32"] > 1 and log["tokens_seen"] > 1_000_000


def test_bundled_policies_compile_for_the_model() -> None:
    spec = load_spec(MODEL)
    assert len(POLICIES) == 28  # 9 methods x 25/50/75% + SERE on the own top-8
    variants = sorted((bundled_dir() / "brown-moe" / "sere-variants").glob("*.policy"))
    assert len(variants) == 4
    for p in POLICIES + variants:
        ir = load_policy(p, spec)
        assert ir.spec.num_experts == 64


def test_shipped_trace_is_recorded_from_the_model() -> None:
    t = load_trace(bundled_dir() / "traces" / EMBEDDED_TRACE)
    assert not t.synthetic and "recorded" in t.source and t.spec.num_experts == 64
    assert int((t.phase == 1).sum()) > 0 and int((t.phase == 0).sum()) > 0


def test_main_command_on_the_embedded_model(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path), "--windows", "16", "--seq-len", "24"]) == 0
    out = capsys.readouterr().out
    assert "full top-k" in out and "uniform-50" in out and "sere-own-k" in out and "recorded trace" in out
    assert (tmp_path / "quality.png").exists() and (tmp_path / "replay.png").exists()
