"""CPU serving mode: the stock SGLang server on a machine without a GPU, for trying policies (laptops, CI).

SGLang 0.5.23 serves on CPU with its own switch (``SGLANG_USE_CPU_ENGINE=1``: torch-native
attention, PyTorch sampling and the native MoE path where the CPU has no AMX), but its CPU
engine imports ops from ``sgl_kernel``, whose PyPI wheel is the CUDA build. When a launch asks
for ``--device cpu`` (and only then), :func:`prepare` runs in the launcher before SGLang
resolves its arguments and:

* refuses nothing and changes nothing on a machine where CUDA is available;
* sets ``SGLANG_USE_CPU_ENGINE=1`` unless the user set it (``--device cpu`` needs it);
* if the real ``sgl_kernel`` cannot be imported here, puts sgl_budget's pure-torch stand-in
  (:mod:`.cpu_ops`) first on ``sys.path`` — spawned workers inherit ``sys.path`` — and says so;
* sets ``OMP_NUM_THREADS`` if unset (the workers read it when torch starts), a bounded KV
  cache (``--max-total-tokens``) if unset, since the default reserves memory for a GPU-sized pool,
  and ``--sleep-on-idle`` (an idle scheduler otherwise spins a whole core, which on a 2-core
  machine halves what every other process gets).

Every choice is logged; an explicit user setting always wins.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger("sgl_budget")

STAND_IN_DIR = Path(__file__).resolve().parent / "cpu_stand_in"
# Launch options whose CPU code calls sgl_kernel ops the stand-in lacks: refused before any worker starts.
NEEDS_REAL_SGL_KERNEL = {
    "speculative_algorithm": "speculative decoding (sgl_kernel's CPU draft/verify ops, e.g. verify_tree_greedy_cpu)",
    "enable_hierarchical_cache": "the hierarchical KV cache (sgl_kernel.copy_all_layer_kv_cache_cpu)",
}
ENV_ACTIVE = "SGLBUDGET_CPU_SERVING"  # set by prepare(); tells the workers that this launch is in CPU mode
DEFAULT_MAX_TOTAL_TOKENS = 65536


@dataclass
class CpuServing:
    """What :func:`prepare` did (for the log and for tests)."""

    active: bool = False
    stand_in: bool = False
    changes: list[str] = field(default_factory=list)
    overrides: dict[str, object] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)  # features this launch asked for that cannot run


def default_threads() -> int:
    """Intra-op threads for the model worker: the cores left after the tokenizer/detokenizer/HTTP processes.

    On 2 cores, 2 threads were 5–40x slower than 1 for this engine's small ops (the other processes
    compete for the second core); more cores give the worker all but one.
    """
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, n - 1) if n > 2 else 1


def real_sgl_kernel_loads() -> bool:
    """Whether the installed ``sgl_kernel`` imports here (a CPU build does; PyPI's CUDA build does not)."""
    if "sgl_kernel" in sys.modules:
        return not getattr(sys.modules["sgl_kernel"], "SGL_BUDGET_STAND_IN", False)
    try:
        importlib.import_module("sgl_kernel")
        return True
    except Exception:  # OSError (libcuda.so.1), ImportError, RuntimeError: all mean "cannot load here"
        for name in [m for m in sys.modules if m == "sgl_kernel" or m.startswith("sgl_kernel.")]:
            del sys.modules[name]
        return False


def install_stand_in() -> None:
    """Make ``import sgl_kernel`` find the stand-in in this process and in every worker it spawns."""
    path = str(STAND_IN_DIR)
    if path not in sys.path:
        sys.path.insert(0, path)
    importlib.invalidate_caches()


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a dependency
        return False


def numa_nodes() -> int:
    return max(1, len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))))


def thread_binding(ranks: int) -> str:
    """``SGLANG_CPU_OMP_THREADS_BIND`` giving each of ``ranks`` workers its own share of this process's cores."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if ranks > len(cores):
        raise ValueError(f"{ranks} ranks (tp x dp x pp) need at least {ranks} CPU cores; this machine gives {len(cores)}")
    share = len(cores) // ranks
    return "|".join(",".join(map(str, cores[r * share:(r + 1) * share])) for r in range(ranks))


def prepare(args: Mapping[str, Any]) -> CpuServing:
    """Set up CPU serving for a launch with these server arguments (``device``, ``max_total_tokens``,
    ``sleep_on_idle``, ``tp_size``, ``dp_size``, ``pp_size``); ``state.overrides`` are values to use instead."""
    state = CpuServing()
    if args.get("device") != "cpu":
        return state
    if cuda_available():
        log.info("sgl_budget: --device cpu on a machine with CUDA: CPU serving left entirely to SGLang")
        return state
    state.active = True
    os.environ[ENV_ACTIVE] = "1"
    if "SGLANG_USE_CPU_ENGINE" not in os.environ:
        os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
        state.changes.append("SGLANG_USE_CPU_ENGINE=1 (SGLang's CPU engine; needed by --device cpu)")
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(default_threads())
        state.changes.append(f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} (set it to override)")
    ranks = int(args.get("tp_size") or 1) * int(args.get("dp_size") or 1) * int(args.get("pp_size") or 1)
    if ranks > numa_nodes() and "SGLANG_CPU_OMP_THREADS_BIND" not in os.environ:
        # SGLang binds one NUMA node per rank unless told otherwise, and refuses more ranks than nodes
        try:
            os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = thread_binding(ranks)
        except ValueError as e:
            log.warning("sgl_budget CPU serving: %s; SGLang will refuse this launch", e)
        else:
            state.changes.append(f"SGLANG_CPU_OMP_THREADS_BIND={os.environ['SGLANG_CPU_OMP_THREADS_BIND']} ({ranks} ranks "
                                 f"on {numa_nodes()} NUMA node(s): each rank gets its own cores; set it to override)")
    if args.get("max_total_tokens") is None:
        state.overrides["max_total_tokens"] = DEFAULT_MAX_TOTAL_TOKENS
        state.changes.append(f"--max-total-tokens {DEFAULT_MAX_TOTAL_TOKENS} (KV cache size; pass it to override)")
    if not args.get("sleep_on_idle"):
        state.overrides["sleep_on_idle"] = True
        state.changes.append("--sleep-on-idle (an idle scheduler would otherwise spin a whole core)")
    if not real_sgl_kernel_loads():
        install_stand_in()
        state.stand_in = True
        state.changes.append(f"sgl_kernel: the installed package cannot load on this machine (CUDA build); using "
                             f"sgl_budget's pure-torch stand-in for its CPU ops ({STAND_IN_DIR})")
        state.refused = [f"--{name.replace('_', '-')}: {what} is not available with --device cpu on this machine "
                         f"(no CPU build of sgl_kernel; sgl_budget's stand-in implements only "
                         f"assign_req_to_token_pool_cpu)" for name, what in NEEDS_REAL_SGL_KERNEL.items()
                         if args.get(name)]
    for change in state.changes:
        log.warning("sgl_budget CPU serving: %s", change)
    return state


def no_pynccl_on_cpu(original, *args, **kwargs):
    """``init_model_parallel_group`` without PyNccl: SGLang 0.5.23 asks for it on every backend but NPU/XPU,
    and on the CPU engine it fails (``Expected a cuda device, but got: cpu``); the CPU path all-reduces with
    gloo (or sgl_kernel's shared-memory ops where they exist) and never uses it."""
    if len(args) >= 4:
        args = (*args[:3], False, *args[4:])
    else:
        kwargs["use_pynccl"] = False
    return original(*args, **kwargs)


def register_worker_hooks() -> bool:
    """In a worker of a CPU-mode launch (see :func:`prepare`), register the hooks CPU serving needs."""
    if os.environ.get(ENV_ACTIVE) != "1":
        return False
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("sglang.srt.distributed.parallel_state.init_model_parallel_group", no_pynccl_on_cpu,
                          HookType.AROUND)
    from . import native_moe  # under --ep-size, SGLang's dispatcher writes -1 for other ranks' experts, which

    native_moe.register()  # its native MoE (the CPU path without AMX) cannot index: skip -1 there
    from . import cpu_qwen2  # Qwen2-MoE's shared-expert gate is a Triton kernel on every backend: torch on CPU

    cpu_qwen2.register()
    importlib.import_module(".cpu_minimax", __package__).register()  # MiniMax-M2's QK-norm (Triton kernels): torch
    from . import cpu_mla  # DeepSeek MLA's MHA prefill on the torch-native backend (attends over the given K/V)

    cpu_mla.register()
    from . import cpu_config  # per-layer intermediate-size lists (Hunyuan) in the CPU engine's TP padding

    cpu_config.register()
    from . import cpu_gemma4  # Gemma 4's router: SGLang's CPU norm drops the fused input scale; torch on CPU

    cpu_gemma4.register()
    return True
