"""One MoE layer in decode, stock top-k vs budget policies, same grouped-GEMM kernel, under CUDA graphs (GPU).

    python benchmarks/moe_decode.py [--shapes deepseek-v2-lite qwen3-30b-a3b] [--batches 1 4 16 64 256]

For each model shape and decode batch size: router logits from a SYNTHETIC
skewed trace (seeded; no recorded trace of these models exists here), routing
by each policy (kernel backend), then the layer = aligned grouped GEMM over the
routed experts + the shared experts, in bf16, captured in one CUDA graph; median
of ``--iters`` replays. Reports per row: latency, speedup vs stock, unique
experts, the roofline ratio (weight bytes read vs stock: routed experts used +
shared experts), achieved HBM bandwidth as % of the device's peak, and the
routing share of the layer time. Not a test: prints a table and the device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PEAK_TBPS = {"H100": 3.35, "H200": 4.8, "A100": 2.0}  # HBM peak, TB/s (SXM parts)


def policies_for(spec, tmp: Path) -> dict[str, str]:
    from sgl_budget.alloc import save_profile, synthetic_profile
    from sgl_budget.similarity import save_similarity, synthetic_similarity

    save_profile(synthetic_profile(spec, seed=0), tmp / "p.yaml")
    save_similarity(synthetic_similarity(spec, seed=0), tmp / "s.safetensors")
    dp = 'layers { allocate dp from "p.yaml"\n k >= 1 }'
    tok = f"tokens {{ reallocate by score; min_k 1; max_k {spec.top_k} }}"
    sere = 'reroute { similarity "s.safetensors"; primary top 1; min_similarity 0.5 }'
    return {
        "uniform-50": "budget 50%",
        "alloc-l-50": f"budget 50%\n{dp}",
        "alloc-t-50": f"budget 50%\n{tok}",
        "sere-own-k": sere,
        "alloc-moe-sere-50": f"budget 50%\n{dp}\n{tok}\n{sere}",
    }


def bench(fn, iters: int) -> float:
    """Median milliseconds of a captured CUDA graph of ``fn``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["deepseek-v2-lite", "qwen3-30b-a3b"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 64, 256])
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    import tempfile

    import torch.nn.functional as F

    from sgl_budget.kernels.backend import compile_kernel_routers
    from sgl_budget.kernels.grouped_gemm import fused_moe
    from sgl_budget.lang import compile_policy
    from sgl_budget.lang.ir import RouteContext
    from sgl_budget.spec import PRESETS
    from sgl_budget.traces import synthetic_trace

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TBPS.items() if k in name), None)
    print(f"device: {name}; torch {torch.__version__}; peak HBM {peak} TB/s; SYNTHETIC router logits")
    print("| shape | batch | policy | latency ms | speedup | unique experts | roofline ratio | HBM % peak | routing % |")
    print("|---|---|---|---|---|---|---|---|---|")
    dev = "cuda"
    for shape in args.shapes:
        spec = PRESETS[shape]
        layer = spec.moe_layers[len(spec.moe_layers) // 2]
        h, inter, e = spec.hidden_size, spec.moe_intermediate_size, spec.num_experts
        w13 = torch.randn(e, 2 * inter, h, device=dev, dtype=torch.bfloat16) * 0.02
        w2 = torch.randn(e, h, inter, device=dev, dtype=torch.bfloat16) * 0.02
        sh_i = spec.shared_expert_intermediate_size
        sw1 = torch.randn(2 * sh_i, h, device=dev, dtype=torch.bfloat16) * 0.02 if sh_i else None
        sw2 = torch.randn(h, sh_i, device=dev, dtype=torch.bfloat16) * 0.02 if sh_i else None
        with tempfile.TemporaryDirectory() as tmp:
            irs = {n: compile_policy(f'policy "{n}" {{ {body} }}', spec, base_dir=tmp)
                   for n, body in policies_for(spec, Path(tmp)).items()}
            for b in args.batches:
                trace = synthetic_trace(spec, num_sequences=b, seq_len=2, seed=b)
                logits = trace.router_logits[layer][-b:].float().to(dev)
                bias = trace.correction_bias[layer].to(dev) if trace.correction_bias else None
                x = torch.randn(b, h, device=dev, dtype=torch.bfloat16)
                ctx = RouteContext("decode", b)
                rows = []
                for pname, ir in [("stock top-k", None), *irs.items()]:
                    ir = ir or compile_policy('policy "stock" { }', spec)
                    router = compile_kernel_routers(ir)[layer]
                    router.prepare(dev)

                    def route():
                        return router(logits, ctx, correction_bias=bias)

                    def layer_fn():
                        w, ids = route()
                        out = fused_moe(x, w13, w2, w.to(torch.bfloat16), ids)
                        if sw1 is not None:
                            gu = x @ sw1.T
                            out = out + (F.silu(gu[:, :sh_i]) * gu[:, sh_i:]) @ sw2.T
                        return out

                    t_layer = bench(layer_fn, args.iters)
                    t_route = bench(route, args.iters)
                    _, ids = route()
                    unique = int(torch.unique(ids[ids >= 0]).numel())
                    bytes_read = unique * spec.expert_bytes + (spec.shared_expert_bytes if sh_i else 0)
                    rows.append((pname, t_layer, unique, bytes_read, t_route))
                stock = rows[0]
                for pname, t_layer, unique, bytes_read, t_route in rows:
                    bw = bytes_read / (t_layer * 1e-3) / 1e12
                    print(f"| {shape} | {b} | {pname} | {t_layer:.3f} | {stock[1] / t_layer:.2f}x | {unique} | "
                          f"{stock[3] / bytes_read:.2f}x | {100 * bw / peak if peak else float('nan'):.0f}% | "
                          f"{100 * t_route / t_layer:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
