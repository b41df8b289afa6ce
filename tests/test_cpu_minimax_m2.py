"""MiniMax-M2 on SGLang's CPU engine: the pure-torch stand-in for its QK-norm's Triton kernels.

SGLang 0.5.23's ``MiniMaxM2QKRMSNorm`` (``srt/models/minimax_m2.py``; ``use_qk_norm`` is true in every
published MiniMax-M2 config) normalises q and k with two Triton launchers, ``rms_sumsq_serial`` and
``rms_apply_serial``, that ``assert x.is_cuda``: on the CPU engine the first forward failed. sgl_budget's
CPU mode hooks in a torch version (``cpu_minimax``). Checked here:

* the stand-in's semantics: one RMS norm over all heads' q (and one over all k heads) per token, as
  transformers 5.19's ``MiniMaxM2Attention`` does, and the attention-TP split (``tp_world``);
* the stand-in against SGLang's Triton kernels, run by Triton's interpreter;
* that the hook reaches the call site (``MiniMaxM2QKRMSNorm._forward_naive``), only in CPU-mode workers.

Served end to end (stock SGLang on CPU == transformers, token for token): the family serving tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sgl_budget.engines.sglang import cpu_minimax

ROOT = Path(__file__).resolve().parent.parent


def _need_sglang() -> None:
    if os.environ.get("SGL_BUDGET_REQUIRE_SGLANG"):
        import sglang  # noqa: F401
    pytest.importorskip("sglang", reason="install the sglang extra: pip install -e '.[sglang]'")


def _inputs(b: int, d1: int, d2: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, d1, generator=g) * 3).to(dtype)
    k = (torch.randn(b, d2, generator=g) * 0.5).to(dtype)
    wq = (1 + 0.3 * torch.randn(d1, generator=g)).to(dtype)
    wk = (1 + 0.3 * torch.randn(d2, generator=g)).to(dtype)
    return q, k, wq, wk


def _transformers_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers 5.19's ``MiniMaxM2RMSNorm.forward`` (applied to ``q_proj``'s whole output, all heads)."""
    from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2RMSNorm

    norm = MiniMaxM2RMSNorm(x.shape[-1], eps).to(w.dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
        return norm(x)


def test_stand_in_is_one_rms_norm_over_all_heads_like_transformers() -> None:
    eps = 1e-6
    q, k, wq, wk = _inputs(5, 64, 32, torch.float32, 0)  # 4 heads x 16 and 2 kv heads x 16
    keep = [t.clone() for t in (q, k, wq, wk)]
    sum_sq = cpu_minimax.rms_sumsq_serial(q, k)
    assert sum_sq.dtype == torch.float32 and tuple(sum_sq.shape) == (12,)  # 2 * 5 rounded up to a multiple of 4
    torch.testing.assert_close(sum_sq[:5], q.double().pow(2).sum(1).float())
    torch.testing.assert_close(sum_sq[5:10], k.double().pow(2).sum(1).float())
    assert not sum_sq[10:].any()
    q2, k2 = cpu_minimax.rms_apply_serial(q, k, wq, wk, sum_sq, 1, eps)
    assert all(torch.equal(a, b) for a, b in zip(keep, (q, k, wq, wk)))  # out of place
    # what transformers computes (float32): equal up to the order of the fp32 sum of squares
    torch.testing.assert_close(q2, _transformers_rmsnorm(q, wq, eps), rtol=3e-7, atol=1e-6)
    torch.testing.assert_close(k2, _transformers_rmsnorm(k, wk, eps), rtol=3e-7, atol=1e-6)
    # not a per-head norm: the heads of one token share one scale
    per_head = _transformers_rmsnorm(q.view(5, 4, 16), wq.view(4, 16)[0], eps).view(5, 64)
    assert not torch.allclose(q2, per_head, atol=1e-3)
    # half precision: fp32 arithmetic, one rounding on the store
    qb, kb, wqb, wkb = (t.to(torch.bfloat16) for t in (q, k, wq, wk))
    qb2, kb2 = cpu_minimax.rms_apply_serial(qb, kb, wqb, wkb, cpu_minimax.rms_sumsq_serial(qb, kb), 1, eps)
    assert qb2.dtype == kb2.dtype == torch.bfloat16
    inv = torch.rsqrt(qb.float().pow(2).sum(1, keepdim=True) / 64 + eps)
    assert torch.equal(qb2, (qb.float() * inv * wqb.float()).to(torch.bfloat16))
    with pytest.raises(ValueError, match="rows"):
        cpu_minimax.rms_sumsq_serial(q, k[:3])
    with pytest.raises(ValueError, match="weight"):
        cpu_minimax.rms_apply_serial(q, k, wq[:16], wk, sum_sq, 1, eps)


def test_stand_in_splits_over_attention_tp_ranks() -> None:
    """Each rank holds half of the heads: its sums of squares, all-reduced (added), and ``tp_world=2`` give
    the full-width norm."""
    eps = 1e-6
    q, k, wq, wk = _inputs(3, 64, 32, torch.float32, 1)
    full_q, full_k = cpu_minimax.rms_apply_serial(q, k, wq, wk, cpu_minimax.rms_sumsq_serial(q, k), 1, eps)
    halves = [(q[:, r * 32:(r + 1) * 32], k[:, r * 16:(r + 1) * 16], wq[r * 32:(r + 1) * 32], wk[r * 16:(r + 1) * 16])
              for r in range(2)]
    reduced = sum(cpu_minimax.rms_sumsq_serial(hq.contiguous(), hk.contiguous()) for hq, hk, _, _ in halves)
    parts = [cpu_minimax.rms_apply_serial(hq.contiguous(), hk.contiguous(), hwq, hwk, reduced, 2, eps)
             for hq, hk, hwq, hwk in halves]
    torch.testing.assert_close(torch.cat([p[0] for p in parts], 1), full_q, rtol=3e-7, atol=1e-6)
    torch.testing.assert_close(torch.cat([p[1] for p in parts], 1), full_k, rtol=3e-7, atol=1e-6)


# -- against SGLang's kernels ---------------------------------------------------------------------------------


def _triton_qk_norm(q, k, wq, wk, tp_world: int, eps: float):
    """SGLang's two launchers, minus their ``assert x.is_cuda`` (the interpreter runs on CPU tensors): the same
    grid, block sizes and arguments as ``rms_sumsq_serial`` / ``rms_apply_serial``."""
    import triton

    from sglang.srt.models import minimax_m2 as mm

    b, d1 = q.shape
    d2 = k.shape[1]
    bs1, bs2 = triton.next_power_of_2(d1), triton.next_power_of_2(d2)
    sum_sq = torch.zeros((2 * b + 3) // 4 * 4, dtype=torch.float32)  # theirs: torch.empty
    mm.rmsnorm_sumsq_kernel_serial[(b,)](q, k, q.stride(0), k.stride(0), sum_sq, b, d1, d2, bs1, bs2)
    out1, out2 = torch.empty_like(q), torch.empty_like(k)
    mm.rmsnorm_apply_kernel_serial[(b,)](q, k, wq, wk, sum_sq, out1, out2, b, d1, d2, q.stride(0), k.stride(0),
                                         tp_world, eps, bs1, bs2)
    return sum_sq, out1, out2


def _bf16_truncated(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 by truncation: how Triton's interpreter stores bf16 (a GPU rounds to nearest)."""
    return (x.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,d1,d2,tp_world", [(1, 64, 32, 1), (5, 64, 32, 1), (7, 96, 48, 1), (4, 48, 16, 2),
                                              (3, 6144, 1024, 1)])  # the last: MiniMax-M2's 48 x 128 / 8 x 128
def test_stand_in_matches_sglangs_triton_kernels(b, d1, d2, tp_world, dtype) -> None:
    """Against the kernels SGLang runs (Triton's interpreter here: TRITON_INTERPRET=1 from conftest).

    The sums of squares agree up to the order of the fp32 reduction (numpy's pairwise sum in the interpreter,
    torch's vectorised one here, a GPU's tree anyway): observed within 2e-7 relative (one or two fp32 ulps).
    Given the same sums, the normalised q and k are bit-for-bit equal in every dtype (bf16: compared with the
    interpreter's truncating store); from our own sums, within one ulp of the output dtype.
    """
    _need_sglang()
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1 before triton is imported) or a GPU")
    eps = 1e-6
    q, k, wq, wk = _inputs(b, d1, d2, dtype, b * d1 + d2)
    their_sum_sq, their_q, their_k = _triton_qk_norm(q, k, wq, wk, tp_world, eps)
    sum_sq = cpu_minimax.rms_sumsq_serial(q, k)
    assert sum_sq.shape == their_sum_sq.shape and sum_sq.dtype == torch.float32
    torch.testing.assert_close(sum_sq[:2 * b], their_sum_sq[:2 * b], rtol=3e-7, atol=0)
    full_q, full_k = cpu_minimax.rms_apply_serial(q, k, wq, wk, sum_sq, tp_world, eps)
    ulp = {torch.float32: 2.4e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(full_q.float(), their_q.float(), rtol=ulp, atol=ulp)
    torch.testing.assert_close(full_k.float(), their_k.float(), rtol=ulp, atol=ulp)
    # applied to the same sums (theirs), so that only the apply step is compared
    our_q, our_k = cpu_minimax.rms_apply_serial(q, k, wq, wk, their_sum_sq, tp_world, eps)
    assert our_q.dtype == their_q.dtype == dtype and our_k.dtype == their_k.dtype == dtype
    if dtype == torch.bfloat16:  # compare before the interpreter's truncating store
        inv = torch.rsqrt(their_sum_sq / d1 / tp_world + eps)[:b, None]
        our_q = _bf16_truncated(q.float() * inv * wq.float())
        inv = torch.rsqrt(their_sum_sq[b:2 * b] / d2 / tp_world + eps)[:, None]
        our_k = _bf16_truncated(k.float() * inv * wk.float())
    assert torch.equal(our_q, their_q) and torch.equal(our_k, their_k)


# -- the hook ---------------------------------------------------------------------------------------------------

HOOK_CHECK = r"""
import os, sys, types, torch
from sgl_budget.engines.sglang.cpu import install_stand_in, register_worker_hooks
install_stand_in()  # as a CPU-mode launch does: PyPI's sgl_kernel is the CUDA build
early = sys.argv[1] == "early"
q, k = torch.randn(3, 64), torch.randn(3, 32)
wq, wk = torch.rand(64) + 0.5, torch.rand(32) + 0.5
if early:
    import sglang.srt.models.minimax_m2 as m
    try:
        m.rms_sumsq_serial(q, k)
        print("kernel ran on cpu")
    except AssertionError:
        print("kernel asserts cuda")
from sglang.srt.plugins.hook_registry import HookRegistry
print("registered", register_worker_hooks())
HookRegistry.apply_hooks()
if not early:
    import sglang.srt.models.minimax_m2 as m
from sgl_budget.engines.sglang import cpu_minimax
# the call site itself: MiniMaxM2QKRMSNorm._forward_naive (what the CPU engine without AMX runs), one rank
norm = types.SimpleNamespace(_q_norm=types.SimpleNamespace(weight=wq), _k_norm=types.SimpleNamespace(weight=wk),
                             _world_size=1, _eps=1e-6)
got = m.MiniMaxM2QKRMSNorm._forward_naive(norm, q, k)
want = cpu_minimax.rms_apply_serial(q, k, wq, wk, cpu_minimax.rms_sumsq_serial(q, k), 1, 1e-6)
print("stand-in", all(torch.equal(a, b) for a, b in zip(got, want)))
"""


@pytest.mark.parametrize("order", ["early", "late"])  # minimax_m2 imported before / after the hooks are applied
def test_hook_reaches_minimax_m2_qk_norm_in_cpu_mode(order) -> None:
    _need_sglang()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the kernels must not run at all
    env.update(SGLANG_USE_CPU_ENGINE="1", SGLBUDGET_CPU_SERVING="1")
    r = subprocess.run([sys.executable, "-c", HOOK_CHECK, order], capture_output=True, text=True, env=env,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "registered True" in r.stdout and "stand-in True" in r.stdout, r.stdout + r.stderr[-3000:]
    if order == "early":  # what the hook is for
        assert "kernel asserts cuda" in r.stdout, r.stdout


def test_no_hook_outside_cpu_mode(monkeypatch) -> None:
    from sgl_budget.engines.sglang.cpu import ENV_ACTIVE, register_worker_hooks

    monkeypatch.delenv(ENV_ACTIVE, raising=False)
    monkeypatch.setattr(cpu_minimax, "register", lambda: pytest.fail("registered outside CPU mode"))
    assert register_worker_hooks() is False


def test_hook_leaves_other_devices_to_sglang() -> None:
    calls = []

    def original(*args, **kwargs):
        calls.append((args, kwargs))
        return "sglang"

    q, k, wq, wk = (t.to("meta") for t in _inputs(2, 8, 4, torch.float32, 0))
    s = torch.empty(4, device="meta")
    assert cpu_minimax.sumsq_around(original, q, k) == "sglang"
    assert cpu_minimax.apply_around(original, q, k, wq, wk, s, 1, 1e-6) == "sglang"
    assert len(calls) == 2
    q, k, wq, wk = _inputs(2, 8, 4, torch.float32, 0)
    assert cpu_minimax.sumsq_around(original, q, k).shape == (4,) and len(calls) == 2
