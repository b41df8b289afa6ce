"""CPU serving mode's parts: the pure-torch sgl_kernel op against SGLang's own Triton kernel, when the stand-in
is activated (and when not), its error for ops it lacks, and the `sglang serve --help` hook."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sgl_budget.engines.sglang import cpu
from sgl_budget.engines.sglang.cpu_ops import MissingCpuOp, assign_req_to_token_pool_cpu, missing_op
from sgl_budget.engines.sglang.serve_help import wanted


def _case(seed: int, bs: int, pool_len: int = 64, rows: int = 12):
    g = torch.Generator().manual_seed(seed)
    req_pool_indices = torch.randperm(rows, generator=g)[:bs].to(torch.int64)
    start = torch.randint(0, pool_len // 2, (bs,), generator=g)
    lens = torch.randint(0, pool_len // 2, (bs,), generator=g)
    lens[0] = 0  # an empty run
    end = start + lens
    out_cache_loc = torch.randint(0, 10_000, (int(lens.sum()) + 3,), generator=g)  # trailing unused entries
    req_to_token = torch.full((rows, pool_len), -7, dtype=torch.int32)
    return req_pool_indices, req_to_token, start, end, out_cache_loc


def _loop_reference(req_pool_indices, req_to_token, start, end, out_cache_loc):
    out, pos = req_to_token.clone(), 0
    for r, s, e in zip(req_pool_indices.tolist(), start.tolist(), end.tolist()):
        out[r, s:e] = out_cache_loc[pos: pos + e - s].to(out.dtype)
        pos += e - s
    return out


@pytest.mark.parametrize("seed,bs", [(0, 1), (1, 3), (2, 7), (3, 12)])
def test_assign_req_to_token_pool_matches_a_loop(seed, bs) -> None:
    args = _case(seed, bs)
    expected = _loop_reference(*args)
    req_pool_indices, req_to_token, start, end, out_cache_loc = args
    assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start, end, out_cache_loc, req_to_token.shape[1])
    assert torch.equal(req_to_token, expected)


@pytest.mark.parametrize("seed,bs", [(0, 1), (1, 3), (2, 7)])
def test_assign_req_to_token_pool_matches_sglangs_triton_kernel(seed, bs) -> None:
    """The stand-in against the kernel SGLang runs on GPUs (in Triton's interpreter here)."""
    if os.environ.get("SGL_BUDGET_REQUIRE_SGLANG"):
        import sglang  # noqa: F401
    pytest.importorskip("sglang")
    from sglang.srt.mem_cache.allocation import assign_req_to_token_pool
    from sglang.srt.utils import next_power_of_2

    req_pool_indices, req_to_token, start, end, out_cache_loc = _case(seed, bs)
    theirs = req_to_token.clone()
    assign_req_to_token_pool[(bs,)](req_pool_indices, theirs, start, end, out_cache_loc, theirs.shape[1],
                                    next_power_of_2(bs))
    ours = req_to_token.clone()
    assign_req_to_token_pool_cpu(req_pool_indices, ours, start, end, out_cache_loc, ours.shape[1])
    assert torch.equal(ours, theirs)


def test_missing_op_names_itself() -> None:
    op = missing_op("copy_all_layer_kv_cache_cpu")
    with pytest.raises(MissingCpuOp, match=r"sgl_kernel\.copy_all_layer_kv_cache_cpu is not available.*--device cpu"):
        op(1, 2)


def _fresh(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("SGLANG_USE_CPU_ENGINE", "OMP_NUM_THREADS")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=300)


def test_prepare_does_nothing_without_device_cpu() -> None:
    r = _fresh("""
import os, sys
from sgl_budget.engines.sglang import cpu
s = cpu.prepare({})
s2 = cpu.prepare({"device": "cuda", "tp_size": 4})
assert not s.active and not s.overrides and not s2.active and not s2.overrides
assert "SGLANG_USE_CPU_ENGINE" not in os.environ and "OMP_NUM_THREADS" not in os.environ
assert str(cpu.STAND_IN_DIR) not in sys.path and "sgl_kernel" not in sys.modules
print("ok")
""")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_prepare_never_acts_on_a_cuda_machine(monkeypatch) -> None:
    monkeypatch.setattr(cpu, "cuda_available", lambda: True)
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE", raising=False)
    state = cpu.prepare({"device": "cpu"})
    assert not state.active and not state.overrides and "SGLANG_USE_CPU_ENGINE" not in os.environ


def test_prepare_on_a_cpu_machine_keeps_user_settings() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the CPU mode stays off (tested above)")
    r = _fresh("""
import os, sys
from sgl_budget.engines.sglang import cpu
s = cpu.prepare({"device": "cpu", "max_total_tokens": 1024, "sleep_on_idle": True})
assert s.active and s.overrides == {}, s.overrides        # the user's --max-total-tokens / --sleep-on-idle win
assert os.environ["OMP_NUM_THREADS"] == "3"               # the user's thread count wins
assert os.environ["SGLANG_USE_CPU_ENGINE"] == "1"
print("stand_in", s.stand_in)
if s.stand_in:
    import sgl_kernel
    assert sgl_kernel.SGL_BUDGET_STAND_IN and sys.path[0] == str(cpu.STAND_IN_DIR)
    from sgl_kernel import assign_req_to_token_pool_cpu, copy_all_layer_kv_cache_cpu  # as SGLang imports them
    try:
        copy_all_layer_kv_cache_cpu()
    except NotImplementedError as e:
        assert "copy_all_layer_kv_cache_cpu" in str(e)
    else:
        raise AssertionError("a missing op must fail when called")
print("ok")
""", {"OMP_NUM_THREADS": "3"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_prepare_defaults() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = _fresh("""
import os
from sgl_budget.engines.sglang import cpu
s = cpu.prepare({"device": "cpu", "sleep_on_idle": False, "tp_size": 1})
assert s.overrides == {"max_total_tokens": cpu.DEFAULT_MAX_TOTAL_TOKENS, "sleep_on_idle": True}, s.overrides
assert os.environ["OMP_NUM_THREADS"] == str(cpu.default_threads())
assert len(s.changes) >= 4 - (not s.stand_in)
print("ok")
""")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("argv,expected", [
    (["/venv/bin/sglang", "serve", "--help"], True),
    (["/venv/bin/sglang", "serve", "--model-path", "m", "-h"], True),
    (["/venv/bin/sglang", "serve", "--model-path", "m"], False),
    (["/venv/bin/sglang", "version"], False),
    (["python", "serve", "--help"], False),
    (["sglang"], False),
])
def test_serve_help_hook_only_for_that_command_line(argv, expected) -> None:
    assert wanted(argv) is expected


def test_thread_binding_splits_the_cores() -> None:
    n = len(os.sched_getaffinity(0))
    assert cpu.thread_binding(1).split("|") == [",".join(map(str, sorted(os.sched_getaffinity(0))))]
    if n >= 2:
        parts = cpu.thread_binding(2).split("|")
        assert len(parts) == 2 and not set(parts[0].split(",")) & set(parts[1].split(","))
    with pytest.raises(ValueError, match="ranks"):
        cpu.thread_binding(n + 1)
