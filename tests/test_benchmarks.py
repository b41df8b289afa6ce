"""The GPU benchmark's code path, run on CPU (Triton interpreter, tiny widths), and its goal reporting.

The timings of a smoke run mean nothing; what is checked is that every policy row
is produced, routes what it should (unique experts, byte ratios) and that the
layer output matches the pure-torch MoE — so a GPU session only has to run it.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from conftest import ROOT

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytest.importorskip("triton", reason="triton is not installed (it comes with the sglang extra)")


def _bench():
    spec = importlib.util.spec_from_file_location("moe_decode", ROOT / "benchmarks" / "moe_decode.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["moe_decode"] = mod  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("gemm", ["auto", "own"])  # auto: SGLang's kernel where the sglang extra is installed
def test_moe_decode_smoke_run_produces_checked_rows(tmp_path, capsys, gemm) -> None:
    from sgl_budget.spec import PRESETS

    bench = _bench()
    out = tmp_path / "r.json"
    per_request = gemm == "own"  # (one of the two runs also measures the per-request server's routing)
    rows = bench.main(["--smoke", "--shapes", "deepseek-v2-lite", "--batches", "1", "--gemm", gemm,
                       "--json", str(out), "--profile", "1"] + (["--per-request"] if per_request else []))
    printed = capsys.readouterr().out
    assert "SMOKE RUN" in printed and "SYNTHETIC" in printed and "routing triton" in printed
    assert printed.count("| kernel | calls | ms | share |") == 2  # stock and the combined policy profiled
    assert "at 50% budget on deepseek-v2-lite" in printed.split("Goals")[1]
    tagged = [p + bench.PER_REQUEST_TAG for p in bench.PER_REQUEST] if per_request else []
    assert [r.policy for r in rows] == list(bench.POLICIES) + tagged
    by = {r.policy: r for r in rows}
    for p in tagged:  # every row picks the policy: what it routes is the policy's own, only the cost differs
        alone = by[p[: -len(bench.PER_REQUEST_TAG)]]
        assert by[p].unique_experts == alone.unique_experts and by[p].weight_bytes == alone.weight_bytes
        assert f"per-request server, deepseek-v2-lite b1 {p}:" in printed.split("Goals")[1]
    spec = PRESETS["deepseek-v2-lite"]
    assert by["stock top-k"].unique_experts == spec.top_k  # batch 1: one token, its top-k
    assert by["uniform-50"].unique_experts == spec.top_k // 2
    assert by["stock top-k"].speedup == 1.0 and by["stock top-k"].roofline == 1.0
    for r in rows:
        assert r.max_rel_err < 3e-2, r  # bf16 intermediates
        assert r.unique_experts <= spec.top_k
        assert r.roofline == pytest.approx(by["stock top-k"].weight_bytes / r.weight_bytes)
        assert r.layer_ms > 0 and r.overhead_ms > 0
    saved = json.loads(out.read_text())
    assert saved["environment"]["device"].startswith("cpu" if DEVICE == "cpu" else "NVIDIA")
    assert len(saved["rows"]) == len(rows)
    assert saved["environment"]["gemm"].startswith("sgl_budget" if gemm == "own" else ("SGLang", "sgl_budget"))


def test_goals_report_met_and_missed_targets() -> None:
    bench = _bench()

    def row(policy, batch, ms, bytes_, oh_ms=0.01, shape="deepseek-v2-lite"):
        return bench.Row(shape, batch, policy, ms, oh_ms, 1.0, bytes_, 0.0)

    rows = [row("stock top-k", 64, 1.0, 200), row("uniform-50", 64, 0.51, 100, oh_ms=0.051),
            row("stock top-k", 16, 1.0, 200), row("alloc-t-50", 16, 0.8, 100)]
    bench.finish(rows, peak_tbps=None)
    lines = bench.goals(rows)
    assert "1/2 rows" in lines[0] and "alloc-t-50: 1.25x of 2.00x" in lines[0]  # 1.96x of 2x is within 5%
    assert "1/2 rows" in lines[1] and "worst deepseek-v2-lite uniform-50: 10.0%" in lines[1]
    assert "met (best uniform-50 at batch 64: 1.96x" in lines[2]


@pytest.mark.parametrize("source", ["package", "extracted"])
def test_sglang_gemm_backend_matches_the_reference_and_skips_padded_slots(tmp_path, source) -> None:
    """SGLang's own Triton fused-MoE kernel — through sglang's launcher, or extracted verbatim into a file
    (what a GPU machine without sglang runs) — fed by this package's alignment (ids -1 included)."""
    pytest.importorskip("sglang", reason="the sglang extra is not installed")
    from sgl_budget.kernels.grouped_gemm import GemmConfig, moe_reference

    extract = importlib.util.spec_from_file_location("extract", ROOT / "scripts" / "extract_sglang_moe_kernel.py")
    mod = importlib.util.module_from_spec(extract)
    extract.loader.exec_module(mod)
    kernel_file = mod.extract(tmp_path / "sglang_fused_moe.py")
    assert "Apache License 2.0" in kernel_file.read_text()
    label, fused = _bench().sglang_fused_moe(kernel_file, prefer_package=source == "package")
    assert label.startswith("SGLang") and (("extracted" in label) == (source == "extracted"))
    g = torch.Generator().manual_seed(0)
    t, k, e, h, inter = 5, 3, 8, 64, 32
    dtype = torch.float16  # Triton's interpreter gets bf16 tl.dot wrong; on a GPU the benchmark runs bf16
    x = (torch.randn(t, h, generator=g) * 0.5).to(dtype)
    w13 = (torch.randn(e, 2 * inter, h, generator=g) * 0.05).to(dtype)
    w2 = (torch.randn(e, h, inter, generator=g) * 0.05).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(torch.int32)
    ids[torch.rand(t, k, generator=g) < 0.4] = -1
    ids[1] = -1  # a token with no kept slot
    w = torch.rand(t, k, generator=g) * (ids >= 0)
    ref = moe_reference(x.float(), w13.float(), w2.float(), w, ids)
    got = fused(x.to(DEVICE), w13.to(DEVICE), w2.to(DEVICE), w.to(DEVICE), ids.to(DEVICE),
                GemmConfig(16, 32, 32, 4, 2)).float().cpu()
    assert torch.allclose(got, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    assert torch.count_nonzero(got[1]) == 0  # it gets nothing
