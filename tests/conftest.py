"""Shared test fixtures: tiny model specs for each scoring variant, and similarity files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's interpreter on CPU; set before any kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sgl_budget.spec import ModelSpec

ROOT = Path(__file__).resolve().parent.parent

TINY_SOFTMAX = ModelSpec(name="tiny-softmax", num_layers=3, moe_layers=(1, 2), num_experts=16, top_k=4,
                         hidden_size=64, moe_intermediate_size=32, norm_topk_prob=True, model_type="qwen3_moe")
TINY_NORENORM = ModelSpec(name="tiny-norenorm", num_layers=3, moe_layers=(1, 2), num_experts=16, top_k=4,
                          hidden_size=64, moe_intermediate_size=32, norm_topk_prob=False, model_type="deepseek_v2",
                          num_shared_experts=2)
TINY_SIGMOID = ModelSpec(name="tiny-sigmoid", num_layers=3, moe_layers=(1, 2), num_experts=16, top_k=4,
                         hidden_size=64, moe_intermediate_size=32, scoring_func="sigmoid", norm_topk_prob=True,
                         n_group=4, topk_group=2, routed_scaling_factor=2.5, has_correction_bias=True,
                         model_type="deepseek_v3", num_shared_experts=1)
TINY_SPECS = {s.name: s for s in (TINY_SOFTMAX, TINY_NORENORM, TINY_SIGMOID)}


@pytest.fixture(params=sorted(TINY_SPECS))
def tiny_spec(request) -> ModelSpec:
    return TINY_SPECS[request.param]


def write_similarity(spec: ModelSpec, directory: Path, seed: int = 0) -> Path:
    """A synthetic similarity file for ``spec`` in ``directory`` (returns its path)."""
    from sgl_budget.similarity import save_similarity, synthetic_similarity

    path = directory / f"{spec.name}.sim.safetensors"
    if not path.exists():
        save_similarity(synthetic_similarity(spec, seed=seed), path)
    return path


CALIBRATION_POLICIES = ("uniform-50", "alloc-l-50", "alloc-lt-50", "sere-50", "alloc-moe-sere-50")  # every kind


@pytest.fixture(scope="session")
def calibration_server():
    """One stock SGLang server on CPU (fp32) with ``--moe-calibration`` and every bundled kind of brown-moe policy
    by name, shared by the calibration-through-the-server tests (eval, profile, tune, similarity)."""
    pytest.importorskip("sglang", reason="install the sglang extra: pip install -e '.[sglang]'")
    from sgl_budget.cli import bundled_dir, default_model_dir
    from sgl_budget.engines.sglang.server import Server

    brown = bundled_dir() / "brown-moe"
    named = [a for k in CALIBRATION_POLICIES for a in ("--moe-named-policy", f"{k}={brown / f'{k}.policy'}")]
    with Server(default_model_dir(), extra_args=[*named, "--moe-calibration"], env={"TRITON_INTERPRET": None}) as s:
        yield s
