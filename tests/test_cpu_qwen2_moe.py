"""Qwen2-MoE on SGLang's CPU engine (issue 17): the pure-torch stand-in for ``fused_gate_sigmoid_mul_add``.

SGLang 0.5.23's ``Qwen2MoeSparseMoeBlock`` (also the MoE block of Qwen3-Next and Qwen3.5) adds its gated
shared expert with a Triton kernel on every backend; on a CPU without a Triton driver the first forward
crashed ("0 active drivers"). sgl_budget's CPU mode hooks in a torch version (``cpu_qwen2``). Checked here:

* the stand-in against SGLang's Triton kernel, run by Triton's interpreter;
* that the hook reaches ``qwen2_moe``'s own imported binding, only in CPU-mode workers;
* end to end (the stock launcher serving qwen2_moe with policies): tests/test_serving_families.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sgl_budget.engines.sglang import cpu_qwen2

ROOT = Path(__file__).resolve().parent.parent


def _need_sglang() -> None:
    if os.environ.get("SGL_BUDGET_REQUIRE_SGLANG"):
        import sglang  # noqa: F401
    pytest.importorskip("sglang", reason="install the sglang extra: pip install -e '.[sglang]'")


def _inputs(n: int, h: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    hs, s, f = (torch.randn(n, h, generator=g).to(dtype) for _ in range(3))
    w = (torch.randn(h, generator=g) * 0.1).to(dtype)
    return hs, w, s, f


def test_stand_in_is_gate_times_shared_plus_routed_in_place() -> None:
    hs, w, s, f = _inputs(5, 64, torch.float32, 0)
    keep = [t.clone() for t in (hs, w, s)]
    out = f.clone()
    assert cpu_qwen2.fused_gate_sigmoid_mul_add(hs, w, s, out) is None
    expected = torch.sigmoid(hs.double() @ w.double()).unsqueeze(1) * s.double() + f.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(keep, (hs, w, s)))  # only the output is written
    torch.testing.assert_close(cpu_qwen2.fused_gate_sigmoid_mul(hs, w, s).double(), expected - f.double(),
                               rtol=1e-6, atol=1e-6)
    # half precision: computed in fp32, rounded once when stored
    hs16, w16, s16, f16 = (t.to(torch.bfloat16) for t in (hs, w, s, f))
    out16 = f16.clone()
    cpu_qwen2.fused_gate_sigmoid_mul_add(hs16, w16, s16, out16)
    fp32 = torch.sigmoid((hs16.float() * w16.float()).sum(1, keepdim=True)) * s16.float() + f16.float()
    assert out16.dtype == torch.bfloat16 and torch.equal(out16, fp32.to(torch.bfloat16))
    with pytest.raises(ValueError, match="gate_weight"):
        cpu_qwen2.fused_gate_sigmoid_mul_add(hs, w[:10], s, f.clone())


def _bf16_truncated(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 by truncation: how Triton's interpreter stores bf16 (a GPU rounds to nearest)."""
    return (x.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,h", [(1, 64), (5, 64), (7, 100), (3, 2560)])
def test_stand_in_matches_sglangs_triton_kernel(n, h, dtype) -> None:
    """Against the kernel SGLang runs (Triton's interpreter here: TRITON_INTERPRET=1 from conftest).

    Equal up to the order of the fp32 dot-product reduction and the sigmoid's last bit (which differ between
    the interpreter — numpy — a GPU and torch anyway): observed bit-for-bit equal for fp32/fp16 at width 64,
    at most one fp32 ulp apart elsewhere.
    """
    _need_sglang()
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1 before triton is imported) or a GPU")
    from sglang.kernels.ops.elementwise import elementwise as ew

    hs, w, s, f = _inputs(n, h, dtype, n * h)
    theirs, ours = f.clone(), f.clone()
    ew.fused_gate_sigmoid_mul_add(hs, w, s, theirs)
    cpu_qwen2.fused_gate_sigmoid_mul_add(hs, w, s, ours)
    their_gated = ew.fused_gate_sigmoid_mul(hs, w, s)
    our_gated = cpu_qwen2.fused_gate_sigmoid_mul(hs, w, s)
    assert ours.dtype == theirs.dtype == dtype and our_gated.dtype == their_gated.dtype == dtype
    if dtype == torch.bfloat16:  # compare before the interpreter's truncating store
        exact = cpu_qwen2._gated(hs, w, s)
        ours, our_gated = _bf16_truncated(exact + f.float()), _bf16_truncated(exact)
    tol = {torch.float32: 3e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(our_gated.float(), their_gated.float(), rtol=tol, atol=tol)


# -- the hook ---------------------------------------------------------------------------------------------------

HOOK_CHECK = r"""
import os, sys, torch
from sgl_budget.engines.sglang.cpu import install_stand_in, register_worker_hooks
install_stand_in()  # as a CPU-mode launch does: PyPI's sgl_kernel is the CUDA build
early = sys.argv[1] == "early"
if early:
    import sglang.srt.models.qwen2_moe as m
from sglang.srt.plugins.hook_registry import HookRegistry
print("registered", register_worker_hooks())
HookRegistry.apply_hooks()
if not early:
    import sglang.srt.models.qwen2_moe as m
from sgl_budget.engines.sglang import cpu_qwen2
h, s, f = torch.randn(3, 64), torch.randn(3, 64), torch.randn(3, 64)
w = torch.randn(64)
a, b = f.clone(), f.clone()
m.fused_gate_sigmoid_mul_add(h, w, s, a)
cpu_qwen2.fused_gate_sigmoid_mul_add(h, w, s, b)
print("stand-in", torch.equal(a, b) and torch.equal(m.fused_gate_sigmoid_mul(h, w, s),
                                                    cpu_qwen2.fused_gate_sigmoid_mul(h, w, s)))
"""


@pytest.mark.parametrize("order", ["early", "late"])  # qwen2_moe imported before / after the hooks are applied
def test_hook_reaches_qwen2_moe_in_cpu_mode(order) -> None:
    _need_sglang()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the kernel must not run at all
    env.update(SGLANG_USE_CPU_ENGINE="1", SGLBUDGET_CPU_SERVING="1")
    r = subprocess.run([sys.executable, "-c", HOOK_CHECK, order], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "registered True" in r.stdout and "stand-in True" in r.stdout, r.stdout + r.stderr[-3000:]


def test_no_hook_outside_cpu_mode(monkeypatch) -> None:
    from sgl_budget.engines.sglang.cpu import ENV_ACTIVE, register_worker_hooks

    monkeypatch.delenv(ENV_ACTIVE, raising=False)
    monkeypatch.setattr(cpu_qwen2, "register", lambda: pytest.fail("registered outside CPU mode"))
    assert register_worker_hooks() is False


# -- end to end -------------------------------------------------------------------------------------------------

# Served end to end (stock == transformers, policy == adapter, Alloc-T batch): tests/test_serving_families.py
