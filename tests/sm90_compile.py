"""Compiles sgl_budget's Triton kernels for sm_90 (H100/H200) on a machine without a GPU; run as a script.

Triton's interpreter (how CI runs the kernels) accepts code that the GPU compiler
rejects — e.g. a plain Python global read inside a @triton.jit function — so CI
also compiles every kernel through Triton's real pipeline (TTIR -> TTGIR -> LLVM ->
PTX -> ptxas cubin) for an sm_90 target. A stand-in driver reports that target and
turns each launch into a compile-only warm-up: nothing runs. Prints one JSON line
per compiled kernel variant, then ``{"done": N}``. Arguments: a folder holding
``sim.safetensors`` for the policy case, and optionally SGLang's extracted kernel file.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # before triton and the kernels are imported

import torch  # noqa: E402
from triton.backends import DriverBase  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import jit as _jit  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

ARCH = int(os.environ.get("SGL_BUDGET_COMPILE_ARCH", "90"))


class CompileOnlyDriver(DriverBase):
    """An NVIDIA "device" of compute capability ``ARCH`` that never runs anything."""

    @classmethod
    def is_active(cls):
        return True

    def map_python_to_cpp_type(self, ty):
        return ty

    def get_current_target(self):
        return GPUTarget("cuda", ARCH, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_interface(self):
        return torch.cuda

    def get_empty_cache_for_benchmark(self):
        raise NotImplementedError

    def clear_cache(self, cache):
        pass


driver.set_active(CompileOnlyDriver())
_run = _jit.JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    md = kernel.metadata
    ptx = kernel.asm.get("ptx", "")
    print(json.dumps({"kernel": self.fn.__name__, "num_warps": md.num_warps, "shared": md.shared,
                      "target": f"sm_{ARCH}" if f".target sm_{ARCH}" in ptx else "?",
                      "cubin": len(kernel.asm.get("cubin", b""))}), flush=True)
    return kernel


_jit.JITFunction.run = _compile_only


def main() -> None:
    from sgl_budget.kernels.adaptive import adaptive_topk
    from sgl_budget.kernels.alloc_t import alloc_t
    from sgl_budget.kernels.backend import compile_kernel_routers
    from sgl_budget.kernels.fused_topk import fused_topk
    from sgl_budget.kernels.grouped_gemm import GemmConfig, fused_moe
    from sgl_budget.kernels.moe_align import moe_align
    from sgl_budget.kernels.piggyback import piggyback
    from sgl_budget.kernels.sere import sere_reroute
    from sgl_budget.lang import compile_policy
    from sgl_budget.lang.ir import RouteContext
    from sgl_budget.spec import PRESETS

    n = 0
    softmax = dict(sigmoid=False)
    grouped = dict(sigmoid=True, correction_bias=torch.zeros(256), n_group=8, topk_group=4, scale=2.5)
    for t, e, k, kw in [(64, 64, 6, softmax), (256, 128, 8, softmax), (64, 256, 8, grouped)]:
        x = torch.empty(t, e)
        fused_topk(x, k // 2, k, **kw)
        alloc_t(x, k // 2, 1, k, k, **kw)
        piggyback(x, torch.empty(t, k, dtype=torch.int32), torch.empty(t, k), k, 0.01, k, **kw)
        sere_reroute(torch.empty(t, k, dtype=torch.int32), torch.empty(t, k), torch.empty(e, e),
                     torch.zeros(e, dtype=torch.int32), "top", 1, 0.5, k)
        moe_align(torch.empty(t, k, dtype=torch.int32), e, 16)
        # confidence routing: top-p on the softmax shapes, min-p with a row mask on the grouped one
        rule = ("min_p", 0.2, 2) if kw is grouped else ("top_p", 0.9, 1)
        adaptive_topk(x, *rule, k, k, row_mask=torch.ones(t, dtype=torch.bool) if kw is grouped else None, **kw)
        n += 6
    for cfg in (GemmConfig(), GemmConfig(16, 128, 128, 8, 4)):
        fused_moe(torch.empty(16, 256, dtype=torch.bfloat16), torch.empty(8, 128, 256, dtype=torch.bfloat16),
                  torch.empty(8, 256, 64, dtype=torch.bfloat16), torch.empty(16, 4), torch.zeros(16, 4,
                  dtype=torch.int32), cfg)
        n += 1
    # the backend's glue: a policy with every stage, as KernelRouter launches it
    spec = PRESETS["deepseek-v2-lite"]
    ir = compile_policy('policy "all" { budget 50%; tokens { reallocate by score; min_k 1 } '
                        'reroute { similarity "sim.safetensors"; primary top 1 } piggyback { max_k 6 } }',
                        spec, base_dir=sys.argv[1])
    router = compile_kernel_routers(ir, backend="triton")[spec.moe_layers[0]]
    router(torch.empty(64, spec.num_experts), RouteContext("decode", 64), row_mask=torch.ones(64, dtype=torch.bool))
    n += 1
    # and a confidence rule as the selection stage before SERE (its raw-score variant)
    ir = compile_policy('policy "ad" { tokens { top_p 0.8; min_k 1; max_k 6 } '
                        'reroute { similarity "sim.safetensors"; primary top 1 } }', spec, base_dir=sys.argv[1])
    router = compile_kernel_routers(ir, backend="triton")[spec.moe_layers[0]]
    router(torch.empty(64, spec.num_experts), RouteContext("decode", 64), row_mask=torch.ones(64, dtype=torch.bool))
    n += 1
    # SGLang's fused_moe_kernel as the benchmark launches it from an extracted file (the device has no sglang)
    if len(sys.argv) > 2:
        import importlib.util
        from pathlib import Path

        spec_b = importlib.util.spec_from_file_location("moe_decode", Path(__file__).parent.parent / "benchmarks"
                                                        / "moe_decode.py")
        bench = importlib.util.module_from_spec(spec_b)
        sys.modules["moe_decode"] = bench
        spec_b.loader.exec_module(bench)
        _, fused = bench.sglang_fused_moe(Path(sys.argv[2]), prefer_package=False)
        fused(torch.empty(16, 256, dtype=torch.bfloat16), torch.empty(8, 128, 256, dtype=torch.bfloat16),
              torch.empty(8, 256, 64, dtype=torch.bfloat16), torch.empty(16, 4), torch.zeros(16, 4, dtype=torch.int32),
              GemmConfig(16, 64, 128, 4, 4))
        n += 1
    print(json.dumps({"done": n}), flush=True)


if __name__ == "__main__":
    main()
