"""Similarity files: round trip, derived critical ranking, validation, synthetic tables, spec checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sgl_budget.similarity import (
    FORMAT, META_KEY, SimilarityFileError, SimilarityTable, derive_critical, load_similarity, save_similarity,
    synthetic_similarity,
)
from sgl_budget.spec import PRESETS, ModelSpec

from conftest import ROOT, TINY_SOFTMAX

BUNDLED = ROOT / "policies" / "profiles" / "deepseek-v2-lite.synthetic.sim.safetensors"


def _table(matrices: dict[int, torch.Tensor], critical: dict[int, torch.Tensor] | None = None) -> SimilarityTable:
    e = next(iter(matrices.values())).shape[0]
    return SimilarityTable(matrices=matrices, critical=critical or {},
                           model={"name": "t", "num_experts": e, "moe_layers": sorted(matrices)},
                           method="hand", source="test", synthetic=False)


# -- round trip ------------------------------------------------------------------

def test_round_trip_keeps_everything(tmp_path) -> None:
    table = synthetic_similarity(TINY_SOFTMAX, seed=3)
    path = save_similarity(table, tmp_path / "sub" / "t.sim.safetensors")
    got = load_similarity(path)
    assert sorted(got.matrices) == [1, 2] and got.num_experts == 16 and got.path == str(path)
    assert (got.method, got.source, got.synthetic) == (table.method, table.source, True)
    assert got.model == table.model
    for l in table.matrices:
        assert got.matrices[l].dtype == torch.float32 and torch.equal(got.matrices[l], table.matrices[l])
        assert got.critical[l].dtype == torch.int64 and torch.equal(got.critical[l], table.critical[l])


def test_saved_file_layout(tmp_path) -> None:
    path = save_similarity(synthetic_similarity(TINY_SOFTMAX), tmp_path / "t.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
        assert sorted(f.keys()) == ["layer.1.critical", "layer.1.similarity", "layer.2.critical",
                                    "layer.2.similarity"]
        assert f.get_tensor("layer.1.similarity").dtype == torch.float32
    assert meta["format"] == FORMAT and meta["model"]["moe_layers"] == [1, 2] and meta["synthetic"] is True


def test_stored_critical_is_kept_and_missing_one_derived(tmp_path) -> None:
    m = torch.tensor([[1.0, 0.8, 0.1], [0.8, 1.0, 0.2], [0.1, 0.2, 1.0]])
    table = _table({4: m, 7: m.clone()}, critical={4: torch.tensor([1, 0, 2])})
    got = load_similarity(save_similarity(table, tmp_path / "c.safetensors"))
    assert got.critical[4].tolist() == [1, 0, 2]
    assert got.critical[7].tolist() == [2, 0, 1] and got.critical[7].dtype == torch.int64


# -- derived critical ranking ----------------------------------------------------

def test_derived_critical_hand_made() -> None:
    m = torch.tensor([[1.0, 0.3, 0.5, 0.2],
                      [0.3, 1.0, 0.1, 0.7],
                      [0.5, 0.1, 1.0, 0.4],
                      [0.2, 0.7, 0.4, 1.0]])
    # best off-diagonal: e0 .5, e1 .7, e2 .5, e3 .7 -> ascending, ties by index; the diagonal never counts
    assert derive_critical(m).tolist() == [0, 2, 1, 3]


def test_derived_critical_all_tied_is_index_order() -> None:
    assert derive_critical(torch.ones(5, 5)).tolist() == [0, 1, 2, 3, 4]


# -- malformed files -------------------------------------------------------------

def _meta(**over) -> str:
    m = {"format": FORMAT, "model": {"name": "t", "num_experts": 4, "moe_layers": [1]},
         "method": "x", "source": "test", "synthetic": False}
    m.update(over)
    return json.dumps(m)


def _model(**over) -> dict:
    return {"name": "t", "num_experts": 4, "moe_layers": [1], **over}


EYE = torch.eye(4)
OK = {"layer.1.similarity": EYE}
NEAR = EYE.clone()
NEAR[0, 1] = NEAR[1, 0] = 1 + 1e-3
MALFORMED = [
    (OK, None, "no 'sgl_budget.similarity' metadata"),
    (OK, "not json", "metadata is not valid JSON"),
    (OK, "[1, 2]", "unsupported format None"),
    (OK, _meta(format="sgl-budget-similarity/0"), "unsupported format 'sgl-budget-similarity/0'"),
    (OK, _meta(model={"name": "t", "moe_layers": [1]}), "must give num_experts and moe_layers"),
    (OK, _meta(model=_model(num_experts="4")), "num_experts must be a positive integer"),
    (OK, _meta(model=_model(moe_layers=[])), "moe_layers must be a non-empty list"),
    (OK, _meta(model=_model(moe_layers=[1, 1])), "lists a layer twice"),
    ({"layer.2.similarity": EYE}, _meta(), "metadata lists layer 1 but there is no layer.1.similarity"),
    ({"layer.1.similarity": torch.ones(4, 3)}, _meta(), "expected [4, 4] (it is not square)"),
    ({"layer.1.similarity": torch.ones(4)}, _meta(), "it is not square"),
    ({"layer.1.similarity": torch.eye(3)}, _meta(), "expected [4, 4] (metadata num_experts is 4)"),
    ({"layer.1.similarity": EYE.bool()}, _meta(), "has dtype torch.bool"),
    ({"layer.1.similarity": EYE * float("inf")}, _meta(), "NaN or infinite"),
    ({"layer.1.similarity": EYE - 0.5}, _meta(), "values outside [0, 1]"),
    ({"layer.1.similarity": NEAR}, _meta(), "values outside [0, 1]"),
    ({"layer.1.similarity": EYE * 0.999}, _meta(), "1 on its diagonal"),
    ({**OK, "layer.1.critical": torch.tensor([0, 1, 2, 4])}, _meta(), "permutation of 0..3"),
    ({**OK, "layer.1.critical": torch.tensor([0, 1, 2])}, _meta(), "permutation of 0..3"),
    ({**OK, "layer.1.critical": torch.tensor([0.0, 1.0, 2.0, 3.0])}, _meta(), "critical has dtype torch.float32"),
    ({**OK, "layer.3.similarity": EYE.clone()}, _meta(), "unexpected tensors ['layer.3.similarity']"),
    ({**OK, "layer.1.critcal": torch.arange(4)}, _meta(), "unexpected tensors ['layer.1.critcal']"),
]


@pytest.mark.parametrize("tensors,meta,message", MALFORMED, ids=[f"{i}-{c[2][:28]}" for i, c in enumerate(MALFORMED)])
def test_malformed_file(tmp_path, tensors, meta, message) -> None:
    p = tmp_path / "bad.sim.safetensors"
    save_file(tensors, str(p), metadata=None if meta is None else {META_KEY: meta})
    with pytest.raises(SimilarityFileError) as ei:
        load_similarity(p)
    err = ei.value
    assert message in err.message, err.message
    assert err.path == str(p) and str(err).startswith(f"{p}: {err.message}")
    assert isinstance(err, ValueError)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(SimilarityFileError, match="no such file"):
        load_similarity(tmp_path / "none.safetensors")
    with pytest.raises(SimilarityFileError, match="no such file"):  # a directory is not a file
        load_similarity(tmp_path)


@pytest.mark.parametrize("content", [b"", b"garbage bytes, not a header", b"\x08" + b"\x00" * 7 + b"{notjson"])
def test_not_safetensors(tmp_path, content) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes(content)
    with pytest.raises(SimilarityFileError, match="not a safetensors file"):
        load_similarity(p)


def test_error_str_with_and_without_hint() -> None:
    e = SimilarityFileError("broken", "a/b.safetensors", "fix it")
    assert (e.message, e.path, e.hint) == ("broken", "a/b.safetensors", "fix it")
    assert str(e) == "a/b.safetensors: broken (hint: fix it)"
    assert str(SimilarityFileError("broken", Path("c"))) == "c: broken"


def test_range_error_carries_hint(tmp_path) -> None:
    p = tmp_path / "r.safetensors"
    save_file({"layer.1.similarity": EYE * 2}, str(p), metadata={META_KEY: _meta()})
    with pytest.raises(SimilarityFileError) as ei:
        load_similarity(p)
    assert ei.value.hint and "(cos + 1) / 2" in str(ei.value)


def test_tolerances_accept_rounding_and_clamp(tmp_path) -> None:
    m = EYE.clone()
    m[0, 1] = m[1, 0] = 1 + 5e-6
    m[2, 3] = m[3, 2] = -5e-6
    m[3, 3] = 1 - 5e-5
    p = tmp_path / "ok.safetensors"
    save_file({"layer.1.similarity": m}, str(p), metadata={META_KEY: _meta()})
    got = load_similarity(p).matrices[1]
    assert float(got.min()) >= 0.0 and float(got.max()) <= 1.0


# -- synthetic tables ------------------------------------------------------------

def test_synthetic_is_deterministic_and_seeded() -> None:
    a, b = synthetic_similarity(TINY_SOFTMAX, seed=7), synthetic_similarity(TINY_SOFTMAX, seed=7)
    c = synthetic_similarity(TINY_SOFTMAX, seed=8)
    assert all(torch.equal(a.matrices[l], b.matrices[l]) for l in a.matrices)
    assert all(torch.equal(a.critical[l], b.critical[l]) for l in a.matrices)
    assert not all(torch.equal(a.matrices[l], c.matrices[l]) for l in a.matrices)
    assert not torch.equal(a.matrices[1], a.matrices[2])  # layers differ


@pytest.mark.parametrize("name", ["deepseek-v2-lite", "mixtral-8x7b", "qwen1.5-moe-a2.7b"])
def test_synthetic_shape_symmetry_range(name) -> None:
    spec = PRESETS[name]
    t = synthetic_similarity(spec, seed=0)
    assert t.synthetic and t.method == "synthetic-cosine" and t.source.startswith("SYNTHETIC")
    assert sorted(t.matrices) == list(spec.moe_layers) and t.check_against(spec) == []
    e = spec.num_experts
    for l, m in t.matrices.items():
        assert m.shape == (e, e) and m.dtype == torch.float32
        assert torch.equal(m, m.T) and torch.equal(m.diagonal(), torch.ones(e))
        assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0
        assert torch.equal(torch.sort(t.critical[l]).values, torch.arange(e))
        assert torch.equal(t.critical[l], derive_critical(m))


def test_synthetic_has_cluster_structure() -> None:
    m = synthetic_similarity(PRESETS["deepseek-v2-lite"], seed=0).matrices[1]
    off = m - torch.eye(64) * 2
    best = off.max(dim=1).values
    # every expert has a near neighbour (its cluster) well above the typical pair
    assert float(best.median()) > float(m.median()) + 0.15


def test_bundled_file_matches_generator() -> None:
    spec = PRESETS["deepseek-v2-lite"]
    got = load_similarity(BUNDLED)
    assert got.synthetic and got.source.startswith("SYNTHETIC") and got.check_against(spec) == []
    want = synthetic_similarity(spec, seed=0)
    for l in spec.moe_layers:
        assert torch.equal(got.matrices[l], want.matrices[l]) and torch.equal(got.critical[l], want.critical[l])


# -- check_against ---------------------------------------------------------------

def test_check_against_expert_count() -> None:
    problems = synthetic_similarity(TINY_SOFTMAX).check_against(PRESETS["mixtral-8x7b"])
    assert any("16 experts per layer, the model 8" in p for p in problems)


def test_check_against_missing_and_extra_layers() -> None:
    spec = ModelSpec(name="m", num_layers=4, moe_layers=(1, 2, 3), num_experts=4, top_k=1, hidden_size=8,
                     moe_intermediate_size=8)
    table = _table({0: EYE, 1: EYE, 2: EYE})
    problems = table.check_against(spec)
    assert len(problems) == 2
    assert "lacks MoE layers [3]" in problems[0] and "its layers [0] are not MoE layers of m" in problems[1]
    assert _table({1: EYE, 2: EYE, 3: EYE}).check_against(spec) == []


def test_check_against_truncates_long_lists() -> None:
    table = _table({1: EYE})
    spec = ModelSpec(name="big", num_layers=20, moe_layers=tuple(range(20)), num_experts=4, top_k=1,
                     hidden_size=8, moe_intermediate_size=8)
    (problem,) = table.check_against(spec)
    assert "lacks MoE layers [0, 2, 3, 4, 5, 6, 7, 8]..." in problem
