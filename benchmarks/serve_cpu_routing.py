"""Per-layer routing time in-process: SGLang's own ``select_experts`` against sgl_budget's hook, on CPU.

    python benchmarks/serve_cpu_routing.py [--model brown-moe|wide-moe] [--batches 1,16] [--json out.json]

Runs the code a server worker runs for one MoE layer, without the server: SGLang 0.5.23's real
``select_experts`` (``TopK`` config as ``TopK.forward_native`` sets it on this CPU engine), called
directly ("SGLang, no plugin") or through sgl_budget's routing hook (``plugin._select_experts_hook``)
inside a forward whose rows all use one policy — ``stock`` (a policy server's stock request), and
each policy — and then the layer's experts through SGLang's ``moe_forward_native`` behind sgl_budget's
native-MoE hook (registered in every CPU-mode worker, plain or not). ``reference`` rows force
sgl_budget's reference router (what a fixed-k layer ran before it took SGLang's function at its k).
Reported: microseconds per layer (median of blocks, averaged over the model's MoE layers, random
router logits and weights), routing alone and routing + experts, and the ratio to SGLang's own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_cpu import model_and_policies, report  # noqa: E402


class _Batch:
    """What the hook reads from SGLang's ForwardBatch: a decode forward whose rows all use one policy."""

    def __init__(self, rows: int, policy: int) -> None:
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        from sgl_budget.engines.sglang.requests import ROWS_ATTR, BatchRows

        self.forward_mode, self.batch_size = ForwardMode.DECODE, rows
        setattr(self, ROWS_ATTR, BatchRows(rows, policy))


def per_layer_us(fn, layers: list[int], blocks: int, iters: int) -> float:
    """Median over ``blocks`` of the mean time of one call of ``fn(layer)`` (cycling the layers), in us."""
    for layer in layers:  # warm-up: routers built, configs cached
        fn(layer)
    times = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(iters):
            for layer in layers:
                fn(layer)
        times.append((time.perf_counter() - t0) / (iters * len(layers)))
    return statistics.median(times) * 1e6


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["brown-moe", "wide-moe"], default="brown-moe")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--blocks", type=int, default=7)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as the CPU server's workers run (OMP_NUM_THREADS=1 on 2 cores)

    from sglang.srt.layers.moe.fused_moe_native import moe_forward_native
    from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig
    from sglang.srt.runtime_context import get_context
    from sglang.srt.server_args import ServerArgs

    get_context().set_server_args(ServerArgs(model_path="dummy", device="cpu"))
    from sglang.srt.layers.moe import topk as T

    from sgl_budget.engines.sglang import native_moe, plugin
    from sgl_budget.engines.sglang import routing as R
    from sgl_budget.engines.sglang.settings import ENV_SPEC, Settings
    from sgl_budget.spec import load_spec

    model, policies = model_and_policies(args.model, Path(tempfile.gettempdir()) / "sgl_budget_bench")
    spec = load_spec(model)
    os.environ[ENV_SPEC] = json.dumps(spec.to_dict())
    plugin._STATE.clear()
    plugin.activate(Settings(policy=None, named=tuple((n, str(p)) for n, p in policies.items())))
    routing = plugin._STATE["routing"]
    routing.stats = None  # (counted on the host or by one device add per layer: measured apart by the server A/B)
    native_moe._registered = True  # as in a CPU worker (no AMX kernels here: the native path skips -1)
    original = T.select_experts
    layers = list(spec.moe_layers)
    g = torch.Generator().manual_seed(0)
    e, h, inter = spec.num_experts, spec.hidden_size, spec.moe_intermediate_size
    moe = SimpleNamespace(w13_weight=torch.randn(e, 2 * inter, h, generator=g) * 0.05,
                          w2_weight=torch.randn(e, h, inter, generator=g) * 0.05, num_experts=e,
                          moe_runner_config=MoeRunnerConfig(activation="silu"))
    configs = {}
    for layer in layers:
        cfg = T.TopK(top_k=spec.top_k, layer_id=layer, renormalize=spec.norm_topk_prob).topk_config
        cfg.torch_native = True  # TopK.forward_native on this CPU engine
        configs[layer] = cfg
    results: dict[str, dict] = {}
    for b in [int(x) for x in args.batches.split(",")]:
        logits = torch.randn(b, e, generator=g) * 2
        x = torch.randn(b, h, generator=g)
        hs = torch.zeros(b, h)

        def own(layer):
            return original(hs, logits, configs[layer], layer_id=layer)

        def hooked(policy: int, fast: bool = True):
            fb = _Batch(b, policy)

            def fn(layer):
                routing.stock_fast_path = fast
                saved = R.current_forward_batch
                R.current_forward_batch = lambda: fb
                try:
                    return plugin._select_experts_hook(original, hs, logits, configs[layer], layer_id=layer)
                finally:
                    R.current_forward_batch = saved
            return fn

        def with_experts(route):
            def fn(layer):
                out = route(layer)
                return native_moe.moe_forward_skip_padding(moe_forward_native, moe, x, out, moe.moe_runner_config)
            return fn

        arms = {"SGLang, no plugin": own, "stock": hooked(routing.pset.index("stock"))}
        for name in policies:
            arms[name] = hooked(routing.pset.index(name))
        first = next(iter(policies))
        arms[f"{first} (reference router)"] = hooked(routing.pset.index(first), fast=False)
        rows = {}
        for arm, fn in arms.items():
            route_us = per_layer_us(fn, layers, args.blocks, args.iters)
            total_us = per_layer_us(with_experts(fn), layers, args.blocks, max(1, args.iters // 4))
            rows[arm] = {"routing_us": round(route_us, 1), "routing_experts_us": round(total_us, 1)}
            print(f"B={b} {arm}: {rows[arm]}", file=sys.stderr, flush=True)
        routing.stock_fast_path = True
        base = rows["SGLang, no plugin"]
        for r in rows.values():
            r["routing_ratio"] = round(r["routing_us"] / base["routing_us"], 2)
            r["layer_ratio"] = round(r["routing_experts_us"] / base["routing_experts_us"], 2)
        results[str(b)] = rows
    lines = []
    for b, rows in results.items():
        lines += [f"\n**{args.model}, B={b}: per MoE layer (us), 1 thread**\n",
                  "| arm | routing | ratio | routing + experts | ratio |", "|---|---|---|---|---|"]
        lines += [f"| {arm} | {r['routing_us']:.1f} | {r['routing_ratio']:.2f}x | {r['routing_experts_us']:.1f} | "
                  f"{r['layer_ratio']:.2f}x |" for arm, r in rows.items()]
    report("serve_cpu_routing.py", argv, args, results, *lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
