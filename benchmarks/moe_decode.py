"""One MoE layer in decode: stock top-k vs budget policies, same grouped-GEMM kernel, under CUDA graphs.

    python benchmarks/moe_decode.py [--shapes deepseek-v2-lite qwen3-30b-a3b] [--batches 1 4 16 64 256]
                                    [--json results.json]
    python benchmarks/moe_decode.py --smoke      # tiny widths (CPU: Triton interpreter): checks the code path

For each model shape and decode batch size, one decode step through the
model's MoE layers (all of them by default, so that Alloc-L's per-layer plan
counts as a whole): router logits from a SYNTHETIC skewed trace (seeded; no
recorded trace of these models exists here), routing by each policy with the
kernel backend, then the layer = dispatch alignment + grouped GEMM over the
routed experts + the shared experts, in bf16 (``--dtype``). The layers cycle through
``--copies`` distinct copies of the weights, so no layer finds its weights in L2.
The whole step is one CUDA graph; the reported latency is the median over
``--iters`` replays divided by the number of layers. Both sides run the same
grouped-GEMM kernel — SGLang's own Triton ``fused_moe_kernel`` when the sglang
package imports (it needs no ``sgl_kernel``) or its source was extracted by
``scripts/extract_sglang_moe_kernel.py``, else this package's — with the
same tile configuration (the fastest for stock top-k at that shape and batch,
from a small sweep), after the same dispatch alignment (padded slots skipped). One layer's output per
policy is checked against the pure-torch MoE.

Per row (per layer, mean over the step): latency, speedup vs stock, unique
experts, the roofline ratio (weight bytes read by stock / by the policy: routed
experts used + shared experts),
achieved HBM bandwidth as % of the device's peak, and routing + dispatch time as
% of the layer time. Then the issue's goals, met or missed. ``--per-request`` adds two policies routed as
a per-request server's captured decode step routes them (policy and stock both, each row its own) and
reports their cost against the policy alone. Not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
# HBM peak of each part, TB/s (vendor specifications); matched in this order against the device name
PEAK_TBPS = (("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35), ("H200", 4.8), ("H20", 4.0),
             ("A100-SXM4-80GB", 2.039), ("A100", 1.555))
POLICIES = ("stock top-k", "uniform-50", "alloc-l-50", "alloc-t-50", "top-p-50", "min-p-50", "sere",
            "alloc-moe-sere-50", "uniform-50+piggyback")
GOAL_ROOFLINE_GAP, GOAL_OVERHEAD, GOAL_SPEEDUP = 0.05, 0.03, 1.34
# --per-request: these policies again, as a per-request server's captured decode step routes them
PER_REQUEST = ("uniform-50", "alloc-moe-sere-50")
PER_REQUEST_TAG = " [per-request]"


@dataclass
class Row:
    shape: str
    batch: int
    policy: str
    layer_ms: float
    overhead_ms: float  # routing + dispatch alignment
    unique_experts: float  # per layer, mean over the layers run
    weight_bytes: int  # per layer, mean
    max_rel_err: float  # layer output vs the pure-torch MoE
    speedup: float = 1.0
    roofline: float = 1.0
    hbm_pct: float = float("nan")
    overhead_pct: float = float("nan")


def policy_sources(spec, tmp: Path) -> dict[str, str]:
    """The compared policies (bodies), with the profile, similarity and calibration trace they read written into
    ``tmp``."""
    from sgl_budget.alloc import save_profile, synthetic_profile
    from sgl_budget.similarity import save_similarity, synthetic_similarity
    from sgl_budget.traces import synthetic_trace, write_trace

    save_profile(synthetic_profile(spec, seed=0), tmp / "p.yaml")
    save_similarity(synthetic_similarity(spec, seed=0), tmp / "s.safetensors")
    # the confidence rules' thresholds: per layer, a mean of k = 50% of top-k experts per token on a held-out
    # synthetic trace (another seed than the measured batches')
    write_trace(synthetic_trace(spec, num_sequences=32, seq_len=16, seed=1000), tmp / "c.safetensors")
    conf = 'tokens {{ {} calibrated from "c.safetensors"; min_k 1; max_k {} }}'
    dp = 'layers { allocate dp from "p.yaml"\n k >= 1 }'
    tok = "tokens { reallocate by score; min_k 1 }"
    sere = 'reroute { similarity "s.safetensors"; primary top 1; min_similarity 0.5 }'
    return {
        "stock top-k": "",
        "uniform-50": "budget 50%",
        "alloc-l-50": f"budget 50%\n{dp}",
        "alloc-t-50": f"budget 50%\n{tok}",
        # per-token confidence rules (each token's k from its own router scores), calibrated to the budget
        "top-p-50": "budget 50%\n" + conf.format("top_p", spec.top_k),
        "min-p-50": "budget 50%\n" + conf.format("min_p", spec.top_k),
        "sere": sere,
        "alloc-moe-sere-50": f"budget 50%\n{dp}\n{tok}\n{sere}",
        # OEA: free slots back up to top-k on experts the batch loads anyway (its GEMM rows should cost ~nothing)
        "uniform-50+piggyback": f"budget 50%\npiggyback {{ max_k {spec.top_k} }}",
    }


def shrink(spec):
    """The smoke test's stand-in: the model's routing (experts, top-k, scoring) with tiny expert widths."""
    return dataclasses.replace(spec, hidden_size=64, moe_intermediate_size=32,
                               shared_expert_intermediate_size=64 if spec.shared_expert_intermediate_size else 0)


def own_fused_moe():
    """This package's Triton grouped GEMM (:func:`sgl_budget.kernels.grouped_gemm.fused_moe`)."""
    from sgl_budget.kernels.grouped_gemm import fused_moe

    return fused_moe


def _sglang_gemm_from_package():
    """SGLang's own launcher of its Triton ``fused_moe_kernel`` (the sglang package imports without
    ``sgl_kernel``), or None."""
    try:
        import sglang
        from sglang.kernels.ops.moe.fused_moe_triton_kernels import invoke_fused_moe_kernel
    except ImportError:
        return None

    def gemm(a, b, c, al, topk_ids, topk_weights, top_k, mul_weight, cfg, compute_type):
        invoke_fused_moe_kernel(a, b, None, c, None, None, None, topk_weights, topk_ids, al.sorted_token_ids,
                                al.expert_ids, al.num_tokens_post_padded, mul_weight, top_k, cfg, compute_type,
                                use_fp8_w8a8=False, use_int8_w8a8=False, use_int8_w8a16=False,
                                use_int4_w4a16=False, per_channel_quant=False)

    return f"SGLang {sglang.__version__} Triton fused_moe_kernel", gemm


def _sglang_gemm_from_file(path: Path):
    """The same kernel from the file ``scripts/extract_sglang_moe_kernel.py`` wrote (machines without
    sglang), launched with the arguments ``invoke_fused_moe_kernel`` passes for unquantised weights."""
    import importlib.util

    import triton

    spec = importlib.util.spec_from_file_location("sglang_fused_moe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def gemm(a, b, c, al, topk_ids, topk_weights, top_k, mul_weight, cfg, compute_type):
        n, k = b.shape[1], b.shape[2]
        em = al.sorted_token_ids.shape[0]
        grid = (triton.cdiv(em, cfg["BLOCK_SIZE_M"]) * triton.cdiv(n, cfg["BLOCK_SIZE_N"]),)
        mod.fused_moe_kernel[grid](
            a, None, b, None, None, c, None, None, topk_weights, al.sorted_token_ids, al.expert_ids,
            al.num_tokens_post_padded, None, n, k, em, topk_ids.numel(), a.stride(0), a.stride(1), b.stride(0),
            b.stride(2), b.stride(1), 0, 0, c.stride(-2), c.stride(-1), 0, 0, 0, 0, 0, 0, 0,
            MUL_ROUTED_WEIGHT=mul_weight, top_k=top_k, compute_type=compute_type, use_fp8_w8a8=False,
            use_int8_w8a8=False, use_int8_w8a16=False, per_channel_quant=False,
            even_Ks=k % cfg["BLOCK_SIZE_K"] == 0, c_sorted=False, swap_ab=False, FUSE_ADD_TO_OUTPUT=False,
            A_OUTPUT_SLICES=1, A_OUTPUT_SLICE_WIDTH=0, A_OUTPUT_SLICE_K=0, MASK_OUTPUT=False,
            FUSE_SUM_ALL_REDUCE=False, ROUTER_TOPK=1, FUSE_SWIGLU=False, **cfg)

    return f"SGLang {mod.SGLANG_VERSION} Triton fused_moe_kernel (extracted source)", gemm


def sglang_fused_moe(kernel_file: Path | None = None, prefer_package: bool = True):
    """``(label, fused_moe)`` on SGLang's own Triton ``fused_moe_kernel`` — from the sglang package, else from
    ``kernel_file`` — inside the same layer as this package's GEMM (:func:`moe_layer`: this package's
    dispatch alignment, in the format of SGLang's ``moe_align_block_size``, padded slots skipped); None if
    neither is there."""
    found = _sglang_gemm_from_package() if prefer_package else None
    if found is None and kernel_file is not None and kernel_file.is_file():
        found = _sglang_gemm_from_file(kernel_file)
    if found is None:
        return None
    label, gemm = found
    import triton.language as tl

    from sgl_budget.kernels.grouped_gemm import moe_layer

    compute = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}

    def sglang_gemm(a, w, out, al, topk_ids, topk_weights, top_k, mul_weight, config):
        cfg = {"BLOCK_SIZE_M": config.block_m, "BLOCK_SIZE_N": config.block_n, "BLOCK_SIZE_K": config.block_k,
               "GROUP_SIZE_M": 1, "num_warps": config.num_warps, "num_stages": config.num_stages}
        weights = topk_weights.float().contiguous() if mul_weight else topk_weights  # read only when multiplied
        gemm(a, w, out, al, topk_ids, weights, top_k, mul_weight, cfg, compute[a.dtype])

    def fused_moe(x, w13, w2, topk_weights, topk_ids, config):
        return moe_layer(x, w13, w2, topk_weights, topk_ids, config, sglang_gemm)

    return label, fused_moe


def pick_gemm(name: str, kernel_file: Path | None = None):
    """``(label, fused_moe)`` for ``--gemm`` auto | sglang | own (auto: SGLang's kernel when it can be had)."""
    if name in ("auto", "sglang"):
        found = sglang_fused_moe(kernel_file)
        if found is not None:
            return found
        if name == "sglang":
            sys.exit("--gemm sglang: neither the sglang package nor an extracted kernel file "
                     "(scripts/extract_sglang_moe_kernel.py) is here")
    return "sgl_budget Triton grouped GEMM (kernels/grouped_gemm.py)", own_fused_moe()


class MoELayers:
    """``n`` copies of one MoE layer's weights (routed + shared experts) and its forward pass."""

    def __init__(self, spec, n: int, device: str, gemm, dtype=torch.bfloat16, seed: int = 0) -> None:
        g = torch.Generator(device=device).manual_seed(seed)
        h, inter, e = spec.hidden_size, spec.moe_intermediate_size, spec.num_experts
        sh = spec.shared_expert_intermediate_size

        def rand(*shape):  # drawn in the target dtype: no float32 copy of a whole layer
            return torch.empty(*shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=g)

        self.w13 = [rand(e, 2 * inter, h) for _ in range(n)]
        self.w2 = [rand(e, h, inter) for _ in range(n)]
        self.shared = [(rand(2 * sh, h), rand(h, sh)) for _ in range(n)] if sh else None
        self.sh = sh
        self.gemm = gemm
        self.dtype = dtype

    def forward(self, i: int, x, w, ids, config):
        import torch.nn.functional as F

        out = self.gemm(x, self.w13[i], self.w2[i], w, ids, config)
        if self.shared is not None:
            s1, s2 = self.shared[i]
            gu = x @ s1.T
            out = out + (F.silu(gu[:, : self.sh]) * gu[:, self.sh:]) @ s2.T
        return out

    def reference(self, i: int, x, w, ids):
        import torch.nn.functional as F

        from sgl_budget.kernels.grouped_gemm import moe_reference

        out = moe_reference(x, self.w13[i], self.w2[i], w, ids).float()
        if self.shared is not None:
            s1, s2 = self.shared[i]
            gu = x.float() @ s1.float().T
            out = out + (F.silu(gu[:, : self.sh]) * gu[:, self.sh:]) @ s2.float().T
        return out


def cuda_graph_timer(iters: int) -> Callable[..., float]:
    """Median milliseconds of one replay of a CUDA graph that captured ``fn`` (warm-up outside).

    ``sweep=True``: a quick measurement (a fifth of the replays) for choosing a tile configuration.
    """
    def run(fn, sweep: bool = False) -> float:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        for _ in range(5):
            g.replay()
        times = []
        for _ in range(max(5, iters // 5) if sweep else iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)

    return run


def wall_timer(iters: int) -> Callable[..., float]:
    """Median wall-clock milliseconds of ``fn`` (the CPU smoke path: exercises the code, times nothing real)."""
    def run(fn, sweep: bool = False) -> float:
        fn()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return run


def sample_layers(spec, n: int | None) -> list[int]:
    """``n`` of the model's MoE layers, evenly spaced (all of them when ``n`` is None)."""
    layers = list(spec.moe_layers)
    if n is None or n >= len(layers):
        return layers
    return [layers[round(i * (len(layers) - 1) / max(1, n - 1))] for i in range(n)]


def kernel_profile(fn, device: str, top: int = 12) -> list[str]:
    """Where one eager run of ``fn`` spends its time: the ``top`` kernels (GPU) or ops (CPU) by self time,
    summed over calls, as markdown table rows ``| name | calls | ms | % |``."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # compiled and warm
    act = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with profile(activities=[act]) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [f"| {e.key[:70]} | {e.count} | {getattr(e, attr) / 1e3:.3f} | {100 * getattr(e, attr) / total:.1f}% |"
            for e in events[:top]]


class PerRequestRouter:
    """A policy as a per-request server routes it in a CUDA-graph decode step: the map of rows to policies is
    device data, so the policy and ``stock`` both route every row and each row takes its own policy's result
    (:class:`~sgl_budget.routing.MixedRouter`); here every row picks the policy (a ``--moe-policy`` server's
    usual traffic), so only the routing cost differs from the policy's own row."""

    def __init__(self, policy_router, stock_router, batch: int, device: str) -> None:
        from sgl_budget.routing import MixedRouter

        self.mixed = MixedRouter([policy_router, stock_router], stock_router.spec.top_k)
        self.rows = torch.zeros(batch, dtype=torch.int32, device=device)

    def __call__(self, logits, ctx, correction_bias=None):
        return self.mixed(logits, ctx, correction_bias, row_policy=self.rows)


def measure_batch(spec, name: str, batch: int, irs: dict, weights: MoELayers, moe_layers: list[int], device: str,
                  timer, configs, profile: tuple[str, ...] = (), routing: str = "triton",
                  per_request: tuple[str, ...] = ()) -> list[Row]:
    """Every policy's row for one shape and batch size (stock first): one decode step through ``moe_layers``.

    ``profile``: policies whose step is also profiled kernel by kernel (printed), to say where time goes.
    ``routing``: the routing backend (``triton`` kernels, or the ``torch`` reference for comparison).
    ``per_request``: policies measured again as a per-request server routes them (:class:`PerRequestRouter`).
    """
    from sgl_budget.kernels.backend import compile_kernel_routers
    from sgl_budget.kernels.moe_align import moe_align
    from sgl_budget.lang.ir import RouteContext
    from sgl_budget.lang.policy_set import stock_ir
    from sgl_budget.traces import synthetic_trace

    trace = synthetic_trace(spec, num_sequences=batch, seq_len=2, seed=batch)
    # each sequence's decode-step token, per layer
    logits = {li: trace.router_logits[li][-batch:].float().to(device) for li in moe_layers}
    bias = {li: trace.correction_bias[li].to(device) if trace.correction_bias else None for li in moe_layers}
    x = (torch.randn(batch, spec.hidden_size, generator=torch.Generator().manual_seed(batch)) * 0.5).to(
        device, weights.dtype)
    ctx = RouteContext("decode", batch)
    copies = len(weights.w13)

    routers = {}
    for pname, ir in irs.items():
        rs = compile_kernel_routers(ir, backend=routing)
        for li in moe_layers:
            rs[li].prepare(device)
        routers[pname] = rs
    if per_request:
        stock = compile_kernel_routers(stock_ir(spec), backend=routing)
        for pname in per_request:
            routers[pname + PER_REQUEST_TAG] = {li: PerRequestRouter(routers[pname][li], stock[li], batch, device)
                                                for li in moe_layers}

    def step(rs, config):
        def fn():
            for i, li in enumerate(moe_layers):
                w, ids = rs[li](logits[li], ctx, correction_bias=bias[li])
                weights.forward(i % copies, x, w.to(weights.dtype), ids, config)
        return fn

    # the tile configuration: the fastest for stock top-k here, then used for every policy
    config = configs[0]
    if len(configs) > 1:
        swept = {}
        for c in configs:
            try:
                swept[c] = timer(step(routers["stock top-k"], c), sweep=True)
            except Exception as exc:  # e.g. a tile that needs more shared memory than this device has
                print(f"  (tile {c} skipped: {type(exc).__name__}: {str(exc)[:120]})", flush=True)
        config = min(swept, key=swept.get)

    rows = []
    n = len(moe_layers)
    for pname, rs in routers.items():
        unique, weight_bytes, err = 0, 0, 0.0
        for i, li in enumerate(moe_layers):
            w, ids = rs[li](logits[li], ctx, correction_bias=bias[li])
            u = int(torch.unique(ids[ids >= 0]).numel())
            unique += u
            weight_bytes += u * spec.expert_bytes + spec.shared_expert_bytes
            if i == len(moe_layers) // 2:  # one layer's output against the pure-torch MoE
                got = weights.forward(i % copies, x, w.to(weights.dtype), ids, config).float()
                ref = weights.reference(i % copies, x, w.to(weights.dtype), ids)
                err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))

        def overhead(rs=rs):
            for li in moe_layers:
                _, ids_ = rs[li](logits[li], ctx, correction_bias=bias[li])
                moe_align(ids_, spec.num_experts, config.block_m)

        rows.append(Row(name, batch, pname, timer(step(rs, config)) / n, timer(overhead) / n, unique / n,
                        weight_bytes // n, err))
    for pname in profile:
        print(f"\nprofile: {name}, batch {batch}, {pname}, one decode step of {n} MoE layers ({config})\n"
              "| kernel | calls | ms | share |\n|---|---|---|---|\n"
              + "\n".join(kernel_profile(step(routers[pname], config), device)) + "\n", flush=True)
    return rows


def finish(rows: list[Row], peak_tbps: float | None) -> None:
    """Fill in the ratios of each row against its stock row (the same shape and batch, same run)."""
    stock = {(r.shape, r.batch): r for r in rows if r.policy == "stock top-k"}
    for r in rows:
        s = stock[(r.shape, r.batch)]
        r.speedup = s.layer_ms / r.layer_ms
        r.roofline = s.weight_bytes / r.weight_bytes
        r.overhead_pct = 100 * r.overhead_ms / r.layer_ms
        if peak_tbps:
            r.hbm_pct = 100 * r.weight_bytes / (r.layer_ms * 1e-3) / (peak_tbps * 1e12)


def table(rows: list[Row]) -> list[str]:
    out = ["| shape | batch | policy | latency ms | speedup | unique experts | roofline ratio | HBM % peak "
           "| routing+dispatch % |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.shape} | {r.batch} | {r.policy} | {r.layer_ms:.4f} | {r.speedup:.2f}x | "
                   f"{r.unique_experts:.1f} | {r.roofline:.2f}x | {r.hbm_pct:.0f}% | {r.overhead_pct:.1f}% |")
    return out


def goals(rows: list[Row]) -> list[str]:
    """The issue's targets, each met or missed, with the rows that decide it."""
    per_request = [r for r in rows if r.policy.endswith(PER_REQUEST_TAG)]
    rows = [r for r in rows if not r.policy.endswith(PER_REQUEST_TAG)]
    budget = [r for r in rows if r.policy != "stock top-k"]
    gap = [r for r in budget if r.batch >= 16]
    worst_gap = max(gap, key=lambda r: 1 - r.speedup / r.roofline, default=None)
    at64 = [r for r in rows if r.batch == 64]
    worst_oh = max(at64, key=lambda r: r.overhead_pct, default=None)
    dsv2 = [r for r in budget if r.shape.startswith("deepseek-v2-lite") and r.policy.endswith("-50")]
    best = max(dsv2, key=lambda r: r.speedup, default=None)
    lines = []
    if worst_gap:
        ok = sum(1 - r.speedup / r.roofline <= GOAL_ROOFLINE_GAP for r in gap)
        lines.append(f"- speedup within {GOAL_ROOFLINE_GAP:.0%} of the roofline ratio (batch >= 16): {ok}/{len(gap)} "
                     f"rows; worst {worst_gap.shape} b{worst_gap.batch} {worst_gap.policy}: {worst_gap.speedup:.2f}x "
                     f"of {worst_gap.roofline:.2f}x")
    if worst_oh:
        ok = sum(r.overhead_pct <= 100 * GOAL_OVERHEAD for r in at64)
        lines.append(f"- routing + dispatch <= {GOAL_OVERHEAD:.0%} of layer time at batch 64: {ok}/{len(at64)} rows; "
                     f"worst {worst_oh.shape} {worst_oh.policy}: {worst_oh.overhead_pct:.1f}%")
    if best:
        lines.append(f"- >= {GOAL_SPEEDUP}x at 50% budget on deepseek-v2-lite: "
                     f"{'met' if best.speedup >= GOAL_SPEEDUP else 'missed'} (best {best.policy} at batch "
                     f"{best.batch}: {best.speedup:.2f}x; per batch: "
                     + ", ".join(f"b{b} {max((r.speedup for r in dsv2 if r.batch == b), default=0):.2f}x"
                                 for b in sorted({r.batch for r in dsv2})) + ")")
    own = {(r.shape, r.batch, r.policy): r for r in rows}
    for r in per_request:  # not a goal: what per-request choice costs a server whose requests all use one policy
        alone = own[(r.shape, r.batch, r.policy[: -len(PER_REQUEST_TAG)])]
        lines.append(f"- per-request server, {r.shape} b{r.batch} {r.policy}: {r.layer_ms / alone.layer_ms:.3f}x "
                     f"the layer time of the policy alone (routing+dispatch {r.overhead_pct:.1f}% vs "
                     f"{alone.overhead_pct:.1f}%)")
    return lines


def environment(device: str) -> dict:
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "device": "cpu (Triton interpreter)"}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, cuda=torch.version.cuda, sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1))
    return env


def copy_bandwidth_tbps() -> float:
    """Achievable HBM bandwidth on this device: a 2 GiB device-to-device copy (bytes read + written)."""
    a = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    ms = cuda_graph_timer(20)(lambda: b.copy_(a))
    return 2 * a.numel() * a.element_size() / (ms * 1e-3) / 1e12


def main(argv: list[str] | None = None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["deepseek-v2-lite", "qwen3-30b-a3b"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 64, 256])
    ap.add_argument("--iters", type=int, default=100, help="graph replays per measurement (median)")
    ap.add_argument("--moe-layers", type=int, help="run this many of the model's MoE layers, evenly spaced "
                    "(default: all, i.e. one whole decode step's MoE layers)")
    ap.add_argument("--copies", type=int, default=8,
                    help="distinct weight copies the layers cycle through (defeats L2 reuse)")
    ap.add_argument("--no-sweep", action="store_true", help="use the default tile configuration")
    ap.add_argument("--gemm", choices=["auto", "sglang", "own"], default="auto",
                    help="the grouped GEMM both sides use (auto: SGLang's Triton kernel when sglang imports)")
    ap.add_argument("--sglang-kernel", type=Path,
                    default=Path(os.environ.get("SGL_BUDGET_SGLANG_KERNEL", ROOT / ".gpu" / "sglang_fused_moe.py")),
                    help="SGLang's kernel extracted by scripts/extract_sglang_moe_kernel.py, used where the "
                    "sglang package is absent")
    ap.add_argument("--dtype", choices=["bf16", "fp16"],
                    help="weights and activations (default bf16; fp16 for a CPU smoke run, since Triton's "
                    "interpreter gets bf16 tl.dot wrong)")
    ap.add_argument("--routing", choices=["triton", "torch"], default="triton",
                    help="routing backend: the Triton kernels, or the torch reference (to see what the kernels buy)")
    ap.add_argument("--profile", nargs="*", type=int, metavar="BATCH",
                    help="also profile, kernel by kernel, stock top-k and the combined policy at these batch sizes "
                    "(default with no value: 64)")
    ap.add_argument("--per-request", action="store_true",
                    help=f"also measure {', '.join(PER_REQUEST)} as a per-request server's CUDA-graph decode step "
                    "routes them (the policy and stock both route, each row selects its own; sgl_budget.routing."
                    "MixedRouter)")
    ap.add_argument("--json", type=Path, help="also write the rows and the environment here")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny expert widths, two layers, batches <= 16 (on CPU under Triton's interpreter): "
                    "a check of the code path, not a measurement")
    args = ap.parse_args(argv)
    if args.smoke:  # tiny widths, two layers: on the GPU if there is one, else CPU + Triton's interpreter
        if torch.cuda.is_available():
            device, timer = "cuda", cuda_graph_timer(5)
        else:
            device, timer = "cpu", wall_timer(1)
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
        copies, args.moe_layers = 1, min(args.moe_layers or 2, 2)
        batches = [b for b in args.batches if b <= 16] or [1]
    elif torch.cuda.is_available():
        device, timer, copies, batches = "cuda", cuda_graph_timer(args.iters), args.copies, args.batches
    else:
        sys.exit("this benchmark needs a CUDA GPU (or --smoke for a check of the code path)")
    from sgl_budget.kernels.grouped_gemm import DECODE_CONFIGS, GemmConfig
    from sgl_budget.lang import compile_policy
    from sgl_budget.spec import PRESETS

    env = environment(device)
    env["gemm"], gemm = pick_gemm(args.gemm, args.sglang_kernel)
    env["dtype"] = args.dtype or ("fp16" if device == "cpu" else "bf16")
    env["routing"] = args.routing
    dtype = torch.bfloat16 if env["dtype"] == "bf16" else torch.float16
    peak = next((v for k, v in PEAK_TBPS if k in env["device"]), None) if device == "cuda" else None
    configs = [GemmConfig()] if args.smoke or args.no_sweep else list(DECODE_CONFIGS)
    label = "SMOKE RUN (tiny widths: timings mean nothing)" if args.smoke else "MoE decode benchmark"
    print(f"{label}; " + "; ".join(f"{k} {v}" for k, v in env.items()) + f"; HBM peak {peak} TB/s; "
          "router logits SYNTHETIC (seeded skewed trace)", flush=True)
    if device == "cuda" and not args.smoke:
        env["copy_tbps"] = round(copy_bandwidth_tbps(), 2)
        print(f"device-to-device copy: {env['copy_tbps']} TB/s (read + written)", flush=True)
    rows: list[Row] = []
    for name in args.shapes:
        spec = shrink(PRESETS[name]) if args.smoke else PRESETS[name]
        n_copies = copies
        if device == "cuda":  # as many distinct copies as fit (DeepSeek-V3: 22.5 GB of experts per layer)
            copy_bytes = spec.num_experts * spec.expert_bytes + spec.shared_expert_bytes
            n_copies = max(1, min(copies, int(0.6 * torch.cuda.mem_get_info()[0] // copy_bytes)))
            if n_copies < copies:
                print(f"{name}: {n_copies} weight copies fit in memory (asked for {copies})", flush=True)
        weights = MoELayers(spec, n_copies, device, gemm, dtype)
        moe_layers = sample_layers(spec, args.moe_layers)
        with tempfile.TemporaryDirectory() as tmp:
            irs = {p: compile_policy(f'policy "{p}" {{ {body} }}', spec, base_dir=tmp)
                   for p, body in policy_sources(spec, Path(tmp)).items()}
            for b in batches:
                prof = ("stock top-k", "alloc-moe-sere-50") if args.profile is not None and b in (
                    args.profile or [64]) else ()
                new = measure_batch(spec, name, b, irs, weights, moe_layers, device, timer, configs, prof,
                                    args.routing, PER_REQUEST if args.per_request else ())
                finish(new, peak)
                rows += new
                print("\n".join(table(new)[0 if len(rows) == len(new) else 2:]), flush=True)
        del weights
    print("\nGoals" + (" (smoke run: timings mean nothing, shown to check the report)" if args.smoke else "")
          + ":\n" + "\n".join(goals(rows)))
    worst = max(r.max_rel_err for r in rows)
    print(f"layer outputs vs the pure-torch MoE: max relative error {worst:.2e}")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "peak_tbps": peak, "command": sys.argv,
                                         "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
    return rows


if __name__ == "__main__":
    main()
