"""The Triton confidence-routing kernel (top-p / min-p, kernels/adaptive.py) against the reference LayerRouter.

CPU via TRITON_INTERPRET=1 (conftest.py sets it), CUDA when present. Shapes stay small: the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (it comes with the sglang extra)")

from test_kernels import DEVICE, _both_backends, _spec_variants, _tie_logits  # noqa: E402

RULES = [
    "top_p 0.7; min_k 1; max_k 6",
    "top_p 0.9; min_k 2; max_k 8",
    "top_p 0.35; min_k 1; max_k 3",
    "min_p 0.2",  # min_k 1, max_k the model's top-k
    "min_p 0.05; min_k 2; max_k 8",
    "min_p 0.6; min_k 1; max_k 5",
]


def _ir(spec, body: str, tmp_path=None):
    from sgl_budget.lang import compile_policy

    return compile_policy(f'policy "a" {{ {body} }}', spec, base_dir=tmp_path or ".")


def _logits(spec, t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, spec.num_experts, generator=g) * (0.5 + 2.5 * torch.rand(t, 1, generator=g))  # flat..peaked
    bias = torch.randn(spec.num_experts, generator=g) * 0.1 if spec.has_correction_bias else None
    return x, bias


def _check(ir, x, bias, mask, label) -> torch.Tensor:
    from sgl_budget.kernels.backend import KernelRouter
    from sgl_budget.lang.ir import RouteContext

    ctx = RouteContext("decode", x.shape[0])
    tri = KernelRouter(ir, 1, backend="triton")
    assert tri.kernel_applies(tri.plan(ctx), x), label
    (ri, rw), (ti, tw) = _both_backends(ir, x, ctx, bias, mask)
    assert torch.equal(ti, ri), label
    assert torch.allclose(tw, rw, rtol=1e-5, atol=1e-6), label
    if mask is not None:
        assert bool((ti[~mask] == -1).all()), label
    return ri


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("variant", range(4))  # softmax, softmax without renormalisation, DeepSeek-V3-like, grouped
def test_adaptive_kernel_matches_the_reference_router(variant, rule) -> None:
    spec = _spec_variants()[variant]
    ir = _ir(spec, f"tokens {{ {rule} }}")
    counts = set()
    # no mask, trailing CUDA-graph padding, a scattered mask (one policy's rows of a mixed batch)
    for t, seed, mask in ((1, 0, None), (13, 1, torch.arange(13) < 10), (40, 2, torch.arange(40) % 3 != 1),
                          (40, 3, None)):
        x, bias = _logits(spec, t, seed + 10 * variant)
        ri = _check(ir, x, bias, mask, (spec.name, rule, t))
        counts |= set((ri >= 0).sum(-1).tolist())
    assert len(counts) > 1, (spec.name, rule, counts)  # the rule really varies k per token


@pytest.mark.parametrize("variant", range(4))
def test_adaptive_kernel_on_tie_heavy_logits(variant) -> None:
    spec = _spec_variants()[variant]
    for rule in ("top_p 0.8; min_k 1; max_k 6", "min_p 0.3; min_k 1; max_k 6"):
        ir = _ir(spec, f"tokens {{ {rule} }}")
        for seed in range(2):
            x, bias = _tie_logits(spec, 24, seed)
            _check(ir, x, bias, torch.arange(24) % 5 != 2 if seed else None, (spec.name, rule, seed))


CHAINED = [
    'reroute { similarity "SIM"; primary top 1; min_similarity 0.4 }',
    'reroute { similarity "SIM"; primary coverage 60%; min_similarity 0.3; preserve critical 2 }',
    "piggyback { max_k 6; min_score 0.01 }",
    'reroute { similarity "SIM"; primary top 2; min_similarity 0.3 } piggyback { max_k 6 }',
]


@pytest.mark.parametrize("variant", [0, 2, 3])
@pytest.mark.parametrize("after", CHAINED)
def test_adaptive_kernel_chains_into_sere_and_piggybacking(tmp_path, variant, after) -> None:
    """A confidence rule as the selection stage before the batch stages (raw gate scores into SERE's kernel)."""
    from conftest import write_similarity

    spec = _spec_variants()[variant]
    sim = write_similarity(spec, tmp_path).name
    for rule in ("top_p 0.6; min_k 1; max_k 4", "min_p 0.3; min_k 1; max_k 4"):
        ir = _ir(spec, f"tokens {{ {rule} }} {after.replace('SIM', sim)}", tmp_path)
        x, bias = _logits(spec, 20, variant)
        _check(ir, x, bias, torch.arange(20) < 17, (spec.name, rule, after))


def test_adaptive_kernel_rows_are_independent_and_any_batch_size_fits() -> None:
    """A token routes the same alone as inside a batch (the rule is per token), and no batch is too large for the
    kernel (no whole-batch program: a big prefill takes it too)."""
    from sgl_budget.kernels.adaptive import adaptive_topk
    from sgl_budget.kernels.backend import KernelRouter
    from sgl_budget.lang.ir import RouteContext

    spec = _spec_variants()[2]
    ir = _ir(spec, "tokens { top_p 0.8; min_k 1; max_k 6 }")
    router = KernelRouter(ir, 1, backend="triton")
    assert router.kernel_applies(router.plan(RouteContext("prefill", 1, 8192)), torch.empty(8192, spec.num_experts))
    x, bias = _logits(spec, 33, 5)
    x, bias = x.to(DEVICE), bias.to(DEVICE)
    w, ids = router(x, RouteContext("decode", 33), correction_bias=bias)
    for i in (0, 16, 32):
        wi, ii = router(x[i:i + 1], RouteContext("decode", 1), correction_bias=bias)
        assert torch.equal(ii[0], ids[i]) and torch.equal(wi[0], w[i])
    with pytest.raises(ValueError, match="kind"):
        adaptive_topk(x, "top_k", 0.5, 1, 4, 4)
    with pytest.raises(ValueError, match="min_k"):
        adaptive_topk(x, "top_p", 0.5, 3, 2, 4)


def test_adaptive_kernel_caps_k_at_the_eligible_ranks() -> None:
    """Gate scores that underflow to exactly 0 tie with the experts outside a grouped token's kept groups (masked
    to 0 without a bias), so ranks past the nonzero ones interleave eligible and ineligible experts: k_t stops
    at the token's eligible ranks among its max_k best, as the reference's does."""
    spec = _spec_variants()[3]  # grouped softmax, no bias: 8 eligible experts per token
    g = torch.Generator().manual_seed(0)
    x = torch.where(torch.rand(24, spec.num_experts, generator=g) < 0.15, 0.0, -200.0)  # exp(-200) == 0
    x[:, 0] = 0.0  # every token has a nonzero expert
    for rule in ("min_p 0.5; min_k 6; max_k 8", "top_p 0.9; min_k 7; max_k 8"):
        ri = _check(_ir(spec, f"tokens {{ {rule} }}"), x, None, torch.arange(24) != 3, rule)
        assert bool(((ri >= 0).sum(-1) < 6).any()), rule  # the cap binds somewhere


@pytest.mark.parametrize("shape", ["qwen3-30b-a3b", "deepseek-v3"])
def test_adaptive_kernel_matches_the_reference_at_serving_shapes(shape) -> None:
    """Real expert counts (128; 256 in 8 groups with a bias) at a decode batch the benchmark runs, skewed logits."""
    from sgl_budget.kernels.backend import compile_kernel_routers
    from sgl_budget.lang.ir import RouteContext
    from sgl_budget.spec import PRESETS
    from sgl_budget.traces import synthetic_trace

    spec = PRESETS[shape]
    layer = spec.moe_layers[len(spec.moe_layers) // 2]
    trace = synthetic_trace(spec, num_sequences=64, seq_len=2, seed=64)
    x = trace.router_logits[layer][-64:].float()
    bias = trace.correction_bias[layer] if trace.correction_bias else None
    # sigmoid scores: the top 8 hold ~1/10 of the eligible mass and lie within a few % of each other
    p, t = (0.6, 0.3) if spec.scoring_func == "softmax" else (0.1, 0.95)
    for rule in (f"top_p {p}; min_k 1; max_k {spec.top_k}", f"min_p {t}; min_k 2"):
        ir = _ir(spec, f"tokens {{ {rule} }}")
        ctx = RouteContext("decode", 64)
        ref = compile_kernel_routers(ir, backend="torch")[layer]
        tri = compile_kernel_routers(ir, backend="triton")[layer]
        assert tri.kernel_applies(tri.plan(ctx), x)
        rw, ri = ref(x, ctx, correction_bias=bias)
        tw, ti = tri(x.to(DEVICE), ctx, correction_bias=None if bias is None else bias.to(DEVICE))
        assert torch.equal(ti.cpu(), ri), (shape, rule)
        assert torch.allclose(tw.cpu(), rw, rtol=1e-5, atol=1e-6), (shape, rule)
        assert len(set((ri >= 0).sum(-1).tolist())) > 1, (shape, rule)
