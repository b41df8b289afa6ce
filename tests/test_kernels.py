"""Triton kernels against their pure-torch references (CPU via TRITON_INTERPRET=1; GPU when present)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    assert os.environ.get("TRITON_INTERPRET") == "1"  # conftest.py sets it before any kernel is imported
triton = pytest.importorskip("triton", reason="triton is not installed (it comes with the sglang extra)")

from sgl_budget.routing.dispatch import align_reference, max_padded  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _moe_align():
    from sgl_budget.kernels.moe_align import moe_align

    return moe_align


@pytest.mark.parametrize("t,k,e,bs,pad_frac", [(1, 6, 64, 16, 0.0), (5, 8, 16, 4, 0.3), (16, 6, 64, 16, 0.5),
                                                (33, 4, 8, 8, 0.0), (7, 8, 128, 16, 1.0)])
def test_moe_align_matches_reference(t, k, e, bs, pad_frac) -> None:
    g = torch.Generator().manual_seed(t * 31 + k)
    ids = torch.randint(0, e, (t, k), generator=g, dtype=torch.int32)
    ids[torch.rand(t, k, generator=g) < pad_frac] = -1
    ref = align_reference(ids, e, bs)
    got = _moe_align()(ids.to(DEVICE), e, bs)
    assert torch.equal(got.num_tokens_post_padded.cpu(), ref.num_tokens_post_padded)
    assert torch.equal(got.sorted_token_ids.cpu(), ref.sorted_token_ids)
    assert torch.equal(got.expert_ids.cpu(), ref.expert_ids)


def test_reference_alignment_semantics() -> None:
    ids = torch.tensor([[3, -1], [3, 1], [-1, -1]], dtype=torch.int32)
    a = align_reference(ids, num_experts=4, block_size=2)
    assert int(a.num_tokens_post_padded) == 4  # expert 1: 1 slot -> 2, expert 3: 2 slots -> 2; -1 slots: nothing
    assert a.sorted_token_ids[:4].tolist() == [3, 6, 0, 2]  # 6 = T*K: block padding
    assert a.expert_ids.tolist()[:2] == [1, 3] and set(a.expert_ids.tolist()[2:]) == {-1}
    assert a.sorted_token_ids.numel() == max_padded(6, 4, 2)


def _spec_variants():
    from conftest import TINY_NORENORM, TINY_SIGMOID, TINY_SOFTMAX
    from sgl_budget.spec import ModelSpec

    grouped_softmax = ModelSpec(name="tiny-grouped", num_layers=3, moe_layers=(1, 2), num_experts=16, top_k=4,
                                hidden_size=64, moe_intermediate_size=32, norm_topk_prob=True, n_group=4,
                                topk_group=2, routed_scaling_factor=1.5, model_type="deepseek_v2")
    return [TINY_SOFTMAX, TINY_NORENORM, TINY_SIGMOID, grouped_softmax]


@pytest.mark.parametrize("variant", range(4))
@pytest.mark.parametrize("k", [1, 2, 4])
def test_fused_topk_matches_the_reference_router(variant, k) -> None:
    from sgl_budget.kernels.fused_topk import fused_topk
    from sgl_budget.lang import compile_policy
    from sgl_budget.lang.ir import RouteContext
    from sgl_budget.routing import compile_routers
    from sgl_budget.routing.scoring import renorm_epsilon

    spec = _spec_variants()[variant]
    ir = compile_policy(f'policy "k" {{ layers when decode {{ k = {k} }} }}', spec)
    router = compile_routers(ir)[1]
    g = torch.Generator().manual_seed(variant * 10 + k)
    x = torch.randn(37, spec.num_experts, generator=g) * 2
    bias = torch.randn(spec.num_experts, generator=g) * 0.1 if spec.has_correction_bias else None
    ref_w, ref_i = router(x, RouteContext("decode", 37), correction_bias=bias)
    w, ids = fused_topk(x.to(DEVICE), k, router.width, sigmoid=spec.scoring_func == "sigmoid",
                        correction_bias=None if bias is None else bias.to(DEVICE), n_group=spec.n_group,
                        topk_group=spec.topk_group, renormalize=spec.norm_topk_prob, eps=renorm_epsilon(spec),
                        scale=spec.routed_scaling_factor)
    assert torch.equal(ids.cpu(), ref_i), (spec.name, k)
    assert torch.allclose(w.cpu(), ref_w, rtol=1e-5, atol=1e-6), (spec.name, k)


@pytest.mark.parametrize("variant", range(4))
@pytest.mark.parametrize("k,min_k,max_k,t", [(2, 1, 4, 16), (1, 0, 4, 9), (2, 0, 2, 5), (1, 1, 4, 1), (3, 1, 4, 33)])
def test_alloc_t_matches_the_reference_router(variant, k, min_k, max_k, t) -> None:
    from sgl_budget.kernels.alloc_t import alloc_t
    from sgl_budget.lang import compile_policy
    from sgl_budget.lang.ir import RouteContext
    from sgl_budget.routing import compile_routers
    from sgl_budget.routing.scoring import renorm_epsilon

    spec = _spec_variants()[variant]
    if k > spec.top_k:
        pytest.skip("k above top-k")
    src = f'policy "t" {{ layers {{ k = {k} }} tokens {{ reallocate by score; min_k {min_k}; max_k {max_k} }} }}'
    router = compile_routers(compile_policy(src, spec))[1]
    g = torch.Generator().manual_seed(variant * 100 + t)
    x = torch.randn(t, spec.num_experts, generator=g) * 2
    bias = torch.randn(spec.num_experts, generator=g) * 0.1 if spec.has_correction_bias else None
    ref_w, ref_i = router(x, RouteContext("decode", t), correction_bias=bias)
    w, ids = alloc_t(x.to(DEVICE), k, min_k, max_k, router.width, sigmoid=spec.scoring_func == "sigmoid",
                     correction_bias=None if bias is None else bias.to(DEVICE), n_group=spec.n_group,
                     topk_group=spec.topk_group, renormalize=spec.norm_topk_prob, eps=renorm_epsilon(spec),
                     scale=spec.routed_scaling_factor)
    assert torch.equal(ids.cpu(), ref_i), (spec.name, k, min_k, max_k, t)
    assert torch.allclose(w.cpu(), ref_w, rtol=1e-5, atol=1e-6)


def test_backend_selection_and_equivalence(tmp_path) -> None:
    from conftest import TINY_SIGMOID, write_similarity
    from sgl_budget.kernels.backend import KernelRouter, compile_kernel_routers
    from sgl_budget.lang import compile_policy
    from sgl_budget.lang.ir import RouteContext

    spec = TINY_SIGMOID
    write_similarity(spec, tmp_path)
    x = torch.randn(12, spec.num_experts, generator=torch.Generator().manual_seed(0))
    bias = torch.linspace(-0.1, 0.1, spec.num_experts)
    for src in ('policy "k" { layers { k = 2 } }',
                'policy "t" { budget 50%; tokens { reallocate by score; min_k 1; max_k 4 } }',
                f'policy "s" {{ reroute {{ similarity "{spec.name}.sim.safetensors"; primary top 1 }} }}'):
        ir = compile_policy(src, spec, base_dir=tmp_path)
        ref = compile_kernel_routers(ir, backend="torch")[1]
        tri = compile_kernel_routers(ir, backend="triton")[1]
        auto = KernelRouter(ir, 1)
        plan = tri.plan(RouteContext("decode", 12))
        assert not ref.kernel_applies(plan, x) and not auto.kernel_applies(plan, x)  # CPU tensors: reference
        assert tri.kernel_applies(plan, x)  # top-k, Alloc-T and SERE plans all have kernels
        rw, ri = ref(x.to(DEVICE), RouteContext("decode", 12), correction_bias=bias.to(DEVICE))
        tw, ti = tri(x.to(DEVICE), RouteContext("decode", 12), correction_bias=bias.to(DEVICE))
        assert torch.equal(ti.cpu(), ri.cpu()) and torch.allclose(tw.cpu(), rw.cpu(), rtol=1e-5, atol=1e-6), src
    with pytest.raises(ValueError, match="backend must be"):
        KernelRouter(ir, 1, backend="cuda")


def test_sqrtsoftplus_takes_the_reference() -> None:
    """DeepSeek-V4's sqrt(softplus) scoring has no kernel: even backend="triton" routes it with the reference
    (and so equals it exactly), for every plan the kernels would otherwise take."""
    from dataclasses import replace

    from conftest import TINY_SIGMOID
    from sgl_budget.kernels.backend import compile_kernel_routers
    from sgl_budget.lang import compile_policy
    from sgl_budget.lang.ir import RouteContext

    spec = replace(TINY_SIGMOID, name="tiny-sqrtsoftplus", scoring_func="sqrtsoftplus", n_group=1, topk_group=1,
                   model_type="deepseek_v4")
    x = torch.randn(12, spec.num_experts, generator=torch.Generator().manual_seed(0)) * 2
    bias = torch.linspace(-0.1, 0.1, spec.num_experts)
    for src in ('policy "k" { layers { k = 2 } }',
                'policy "t" { budget 50%; tokens { reallocate by score; min_k 1; max_k 4 } }'):
        ir = compile_policy(src, spec)
        ref = compile_kernel_routers(ir, backend="torch")[1]
        tri = compile_kernel_routers(ir, backend="triton")[1]
        ctx = RouteContext("decode", 12)
        assert not tri.kernel_applies(tri.plan(ctx), x)
        rw, ri = ref(x.to(DEVICE), ctx, correction_bias=bias.to(DEVICE))
        tw, ti = tri(x.to(DEVICE), ctx, correction_bias=bias.to(DEVICE))
        assert torch.equal(ti, ri) and torch.equal(tw, rw), src
    scores = torch.nn.functional.softplus(x).sqrt()  # the "k = 2" plan above, by hand
    ref = compile_kernel_routers(compile_policy('policy "k" { layers { k = 2 } }', spec), backend="torch")[1]
    w, ids = ref(x, RouteContext("decode", 12), correction_bias=bias)
    assert torch.equal(ids[:, :2], (scores + bias).topk(2, dim=-1).indices) and bool((ids[:, 2:] == -1).all())
    raw = scores.gather(1, ids[:, :2])
    torch.testing.assert_close(w[:, :2], raw / (raw.sum(-1, keepdim=True) + 1e-20) * 2.5)


LAYER_BODIES = [
    "layers { k = 2 }",
    "budget 50%; tokens { reallocate by score; min_k 1; max_k 4 }",
    'budget 50%; tokens { reallocate by score; min_k 1 } reroute { similarity "SIM"; primary top 1 }',
    'budget 50%; tokens { reallocate by score; min_k 1 } reroute { similarity "SIM"; primary top 1 } '
    "piggyback { max_k 4 }",
]


class _LayerCase:
    """One tiny MoE layer: kernel routing + dispatch + grouped GEMM, and the torch references to check it."""

    def __init__(self, tmp_path, body: str) -> None:
        from conftest import TINY_SOFTMAX, write_similarity
        from sgl_budget.kernels.backend import compile_kernel_routers
        from sgl_budget.lang import compile_policy
        from sgl_budget.lang.ir import RouteContext

        self.spec = spec = TINY_SOFTMAX
        sim = write_similarity(spec, tmp_path).name
        self.ir = compile_policy(f'policy "g" {{ {body.replace("SIM", sim)} }}', spec, base_dir=tmp_path)
        self.batch_stage = "tokens" in body or "piggyback" in body  # padded rows get no slots
        # (a plain top-k routes them too)
        self.router = compile_kernel_routers(self.ir, backend="triton")[1]
        self.router.prepare(DEVICE)
        self.ctx = RouteContext("decode", 16)
        g = torch.Generator().manual_seed(0)
        e, h, i = spec.num_experts, spec.hidden_size, spec.moe_intermediate_size
        self.x = torch.randn(16, e, generator=g).to(DEVICE)
        self.h = torch.randn(16, h, generator=g).to(DEVICE)
        self.w13 = (torch.randn(e, 2 * i, h, generator=g) * 0.1).to(DEVICE)
        self.w2 = (torch.randn(e, h, i, generator=g) * 0.1).to(DEVICE)
        self.mask = (torch.arange(16) < 16).to(DEVICE)

    def run(self):
        from sgl_budget.kernels.grouped_gemm import fused_moe
        from sgl_budget.kernels.moe_align import moe_align

        w, ids = self.router(self.x, self.ctx, row_mask=self.mask)
        return w, ids, moe_align(ids, self.spec.num_experts, 16), fused_moe(self.h, self.w13, self.w2, w, ids)

    def set_inputs(self, seed: int, n_real: int) -> None:
        self.x.copy_(torch.randn(16, self.spec.num_experts, generator=torch.Generator().manual_seed(seed)))
        self.mask.copy_(torch.arange(16) < n_real)

    def check(self, w, ids, al, out, n_real: int) -> None:
        from sgl_budget.kernels.backend import compile_kernel_routers
        from sgl_budget.kernels.grouped_gemm import moe_reference

        rw, ri = compile_kernel_routers(self.ir, backend="torch")[1](self.x, self.ctx, row_mask=self.mask)
        assert torch.equal(ids, ri) and torch.allclose(w, rw, rtol=1e-5, atol=1e-6), n_real
        if self.batch_stage:
            assert (ids[n_real:] == -1).all()
        ref = align_reference(ri, self.spec.num_experts, 16)
        assert torch.equal(al.sorted_token_ids, ref.sorted_token_ids.to(DEVICE))
        assert torch.allclose(out, moe_reference(self.h, self.w13, self.w2, rw, ri), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("body", LAYER_BODIES)
def test_kernel_layer_matches_the_references_with_padded_rows(tmp_path, body) -> None:
    case = _LayerCase(tmp_path, body)
    for seed, n_real in ((1, 16), (2, 11)):
        case.set_inputs(seed, n_real)
        case.check(*case.run(), n_real)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
@pytest.mark.parametrize("body", LAYER_BODIES)
def test_kernels_capture_in_a_cuda_graph(tmp_path, body) -> None:
    """Routing + dispatch + grouped GEMM captured once, replayed on new logits and padded-row counts."""
    case = _LayerCase(tmp_path, body)
    case.run()  # warm up (compile) outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outputs = case.run()
    for seed, n_real in ((1, 16), (2, 11)):
        case.set_inputs(seed, n_real)
        g.replay()
        case.check(*outputs, n_real)


def test_kernels_leave_trailing_padded_rows_out() -> None:
    from conftest import TINY_SOFTMAX
    from sgl_budget.kernels.backend import compile_kernel_routers
    from sgl_budget.lang import compile_policy
    from sgl_budget.lang.ir import RouteContext

    ir = compile_policy('policy "t" { budget 50%; tokens { reallocate by score; min_k 1; max_k 4 } }', TINY_SOFTMAX)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(3)) * 3
    x[5:] = 0
    mask = torch.arange(8) < 5
    rw, ri = compile_kernel_routers(ir, backend="torch")[1](x, RouteContext("decode", 8), row_mask=mask)
    tw, ti = compile_kernel_routers(ir, backend="triton")[1](x.to(DEVICE), RouteContext("decode", 8),
                                                             row_mask=mask.to(DEVICE))
    assert int((ri[:5] >= 0).sum()) == 10 and (ri[5:] == -1).all()
    assert torch.equal(ti.cpu(), ri) and torch.allclose(tw.cpu(), rw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("primary", ["primary top 1", "primary top 2", "primary coverage 60%", "primary count 5"])
@pytest.mark.parametrize("variant", range(4))
@pytest.mark.parametrize("tokens", ["", "tokens { reallocate by score; min_k 1; max_k 4 }"])
def test_sere_kernel_matches_the_reference_router(tmp_path, primary, variant, tokens) -> None:
    from conftest import write_similarity
    from sgl_budget.kernels.backend import compile_kernel_routers
    from sgl_budget.lang import compile_policy
    from sgl_budget.lang.ir import RouteContext

    spec = _spec_variants()[variant]
    write_similarity(spec, tmp_path)
    src = (f'policy "s" {{ budget 50%; {tokens} reroute {{ similarity "{spec.name}.sim.safetensors"; {primary}; '
           f"min_similarity 0.55; preserve critical 2 }} }}")
    ir = compile_policy(src, spec, base_dir=tmp_path)
    g = torch.Generator().manual_seed(variant)
    x = torch.randn(24, spec.num_experts, generator=g) * 2
    bias = torch.randn(spec.num_experts, generator=g) * 0.1 if spec.has_correction_bias else None
    ctx = RouteContext("decode", 24)
    rw, ri = compile_kernel_routers(ir, backend="torch")[1](x, ctx, correction_bias=bias)
    tw, ti = compile_kernel_routers(ir, backend="triton")[1](x.to(DEVICE), ctx,
                                                             correction_bias=None if bias is None else bias.to(DEVICE))
    assert torch.equal(ti.cpu(), ri), (spec.name, primary, tokens)
    assert torch.allclose(tw.cpu(), rw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("t,k,e,pad", [(5, 2, 8, 0.0), (9, 4, 16, 0.4), (1, 4, 8, 0.5)])
def test_grouped_gemm_moe_matches_reference(t, k, e, pad, dtype, tol) -> None:
    """float32 and the benchmark's bf16 (intermediates rounded to bf16, as in SGLang's fused_moe)."""
    from sgl_budget.kernels.grouped_gemm import GemmConfig, fused_moe, moe_reference

    g = torch.Generator().manual_seed(t + e)
    h, inter = 32, 16
    x = torch.randn(t, h, generator=g)
    w13 = torch.randn(e, 2 * inter, h, generator=g) * 0.2
    w2 = torch.randn(e, h, inter, generator=g) * 0.2
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(torch.int32)
    ids[torch.rand(t, k, generator=g) < pad] = -1
    w = torch.rand(t, k, generator=g) * (ids >= 0)
    x, w13, w2 = x.to(dtype), w13.to(dtype), w2.to(dtype)
    ref = moe_reference(x.float(), w13.float(), w2.float(), w, ids)
    for cfg in (GemmConfig(), GemmConfig(16, 32, 16, 4, 2)):
        got = fused_moe(x.to(DEVICE), w13.to(DEVICE), w2.to(DEVICE), w.to(DEVICE), ids.to(DEVICE), cfg)
        assert got.dtype == dtype
        assert torch.allclose(got.cpu().float(), ref, rtol=tol, atol=tol * ref.abs().max().item()), cfg


@pytest.mark.parametrize("variant", range(4))
@pytest.mark.parametrize("before", ["budget 50%",
                                    "budget 50%; tokens { reallocate by score; min_k 1; max_k 4 }",
                                    'budget 50%; reroute { similarity "SIM"; primary top 1; min_similarity 0.4 }'])
@pytest.mark.parametrize("pig", ["piggyback { max_k 4 }", "piggyback { max_k 3; min_score 0.05 }"])
def test_piggyback_kernel_matches_the_reference_router(tmp_path, variant, before, pig) -> None:
    from conftest import write_similarity
    from sgl_budget.kernels.backend import compile_kernel_routers
    from sgl_budget.lang import compile_policy
    from sgl_budget.lang.ir import RouteContext

    spec = _spec_variants()[variant]
    sim = write_similarity(spec, tmp_path).name
    ir = compile_policy(f'policy "p" {{ {before.replace("SIM", sim)}; {pig} }}', spec, base_dir=tmp_path)
    g = torch.Generator().manual_seed(variant + 7)
    x = torch.randn(20, spec.num_experts, generator=g) * 2
    bias = torch.randn(spec.num_experts, generator=g) * 0.1 if spec.has_correction_bias else None
    mask = torch.arange(20) < 17  # three padded rows: no slots, no part in the batch's expert set
    ctx = RouteContext("decode", 20)
    ref = compile_kernel_routers(ir, backend="torch")[1]
    tri = compile_kernel_routers(ir, backend="triton")[1]
    assert tri.kernel_applies(tri.plan(ctx), x)
    rw, ri = ref(x, ctx, correction_bias=bias, row_mask=mask)
    tri.prepare(DEVICE)
    tw, ti = tri(x.to(DEVICE), ctx, correction_bias=None if bias is None else bias.to(DEVICE),
                 row_mask=mask.to(DEVICE))
    assert torch.equal(ti.cpu(), ri), (spec.name, before, pig)
    assert torch.allclose(tw.cpu(), rw, rtol=1e-5, atol=1e-6), (spec.name, before, pig)
    base = compile_policy(f'policy "b" {{ {before.replace("SIM", sim)} }}', spec, base_dir=tmp_path)
    _, bi = compile_kernel_routers(base, backend="torch")[1](x, ctx, correction_bias=bias, row_mask=mask)
    ri, bi = ri[:17], bi[:17]  # real rows (a plain top-k also routes padded rows)
    assert int((ri >= 0).sum()) > int((bi >= 0).sum()), "the case must piggyback something"
    assert set(ri[ri >= 0].tolist()) == set(bi[bi >= 0].tolist())  # no expert beyond the batch's set


SERVING_POLICIES = {
    "uniform-50": "budget 50%",
    "alloc-t-50": "budget 50%; tokens { reallocate by score; min_k 1 }",
    "sere": 'reroute { similarity "SIM"; primary top 1; min_similarity 0.5; preserve critical 4 }',
    "alloc-t-sere-50": ('budget 50%; tokens { reallocate by score; min_k 1 } '
                        'reroute { similarity "SIM"; primary coverage 70%; min_similarity 0.3 }'),
    "sere-piggyback-50": ('budget 50%; reroute { similarity "SIM"; primary top 1; min_similarity 0.5 } '
                          "piggyback { max_k 6; min_score 0.01 }"),
}


@pytest.mark.parametrize("shape", ["deepseek-v2-lite", "qwen3-30b-a3b", "deepseek-v3"])
@pytest.mark.parametrize("batch", [64, 256])
def test_kernels_match_the_reference_at_serving_shapes(tmp_path, shape, batch) -> None:
    """Real model shapes and decode batch sizes (the benchmark's), every kernel-backed plan, skewed logits."""
    from conftest import write_similarity
    from sgl_budget.kernels.backend import compile_kernel_routers
    from sgl_budget.kernels.moe_align import moe_align
    from sgl_budget.lang import compile_policy
    from sgl_budget.lang.ir import RouteContext
    from sgl_budget.spec import PRESETS
    from sgl_budget.traces import synthetic_trace

    spec = PRESETS[shape]
    sim = write_similarity(spec, tmp_path).name
    layer = spec.moe_layers[len(spec.moe_layers) // 2]
    trace = synthetic_trace(spec, num_sequences=batch, seq_len=2, seed=batch)
    x = trace.router_logits[layer][-batch:].float()
    bias = trace.correction_bias[layer] if trace.correction_bias else None
    ctx = RouteContext("decode", batch)
    for name, body in SERVING_POLICIES.items():
        ir = compile_policy(f'policy "{name}" {{ {body.replace("SIM", sim)} }}', spec, base_dir=tmp_path)
        ref_router = compile_kernel_routers(ir, backend="torch")[layer]
        tri_router = compile_kernel_routers(ir, backend="triton")[layer]
        assert tri_router.kernel_applies(tri_router.plan(ctx), x), name
        rw, ri = ref_router(x, ctx, correction_bias=bias)
        tri_router.prepare(DEVICE)
        tw, ti = tri_router(x.to(DEVICE), ctx, correction_bias=None if bias is None else bias.to(DEVICE))
        assert torch.equal(ti.cpu(), ri), (shape, batch, name)
        assert torch.allclose(tw.cpu(), rw, rtol=1e-5, atol=1e-6), (shape, batch, name)
        ref_al = align_reference(ri, spec.num_experts, 16)
        al = moe_align(ti, spec.num_experts, 16)
        assert torch.equal(al.sorted_token_ids.cpu(), ref_al.sorted_token_ids), (shape, batch, name)
        assert torch.equal(al.expert_ids.cpu(), ref_al.expert_ids)
        # padded slots launch nothing: the blocks in use are exactly those the used experts need
        used = torch.bincount(ri[ri >= 0].long(), minlength=spec.num_experts)
        assert int(al.num_tokens_post_padded) == int(((used + 15) // 16 * 16).sum())


def test_batches_too_large_for_one_program_take_the_reference_path(tmp_path) -> None:
    from conftest import TINY_SOFTMAX, write_similarity
    from sgl_budget.kernels import moe_align as moe_align_mod
    from sgl_budget.kernels.alloc_t import alloc_t_fits
    from sgl_budget.kernels.backend import compile_kernel_routers
    from sgl_budget.kernels.sere import sere_fits
    from sgl_budget.lang import compile_policy
    from sgl_budget.lang.ir import RouteContext

    assert alloc_t_fits(256, 3, 1, 8) and not alloc_t_fits(8192, 3, 1, 8) and alloc_t_fits(8192, 3, 3, 3)
    assert sere_fits(256, 8, 8) and not sere_fits(4096, 8, 8)
    spec = TINY_SOFTMAX
    write_similarity(spec, tmp_path)
    ir = compile_policy(f'policy "p" {{ budget 50%; tokens {{ reallocate by score; min_k 1; max_k 4 }} '
                        f'reroute {{ similarity "{spec.name}.sim.safetensors"; primary top 1 }} }}', spec,
                        base_dir=tmp_path)
    router = compile_kernel_routers(ir, backend="triton")[1]
    big = torch.randn(8192, spec.num_experts, generator=torch.Generator().manual_seed(0))
    ctx = RouteContext("prefill", 1, 8192)
    assert not router.kernel_applies(router.plan(ctx), big)
    rw, ri = compile_kernel_routers(ir, backend="torch")[1](big, ctx)
    tw, ti = router(big, ctx)  # reference path: same result, no kernel compiled for this size
    assert torch.equal(ti, ri) and torch.equal(tw, rw)
    ids = torch.randint(-1, spec.num_experts, (moe_align_mod.MAX_SLOTS // 4 + 1, 4), dtype=torch.int32)
    got, ref = moe_align_mod.moe_align(ids, spec.num_experts, 16), align_reference(ids, spec.num_experts, 16)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


# -- exact ties: one rule (lower expert / group index first) on the reference and the kernels --------------------

TIE_EXAMPLE = [-1.0, -3.0, 4.0, -4.0, -3.0, 8.0, 1.0, 6.0]  # experts 1 and 4 tie for the 6th place


def _tie_spec(top_k: int):
    from sgl_budget.spec import ModelSpec

    return ModelSpec(name=f"tie-{top_k}", num_layers=2, moe_layers=(1,), num_experts=8, top_k=top_k, hidden_size=64,
                     moe_intermediate_size=32, norm_topk_prob=True, model_type="qwen3_moe")


def _both_backends(ir, x, ctx, bias=None, mask=None):
    """``(reference ids, weights), (Triton ids, weights)`` of layer 1 for the same input."""
    from sgl_budget.kernels.backend import compile_kernel_routers

    ref = compile_kernel_routers(ir, backend="torch")[1]
    tri = compile_kernel_routers(ir, backend="triton")[1]
    tri.prepare(DEVICE)
    rw, ri = ref(x, ctx, correction_bias=bias, row_mask=mask)
    tw, ti = tri(x.to(DEVICE), ctx, correction_bias=None if bias is None else bias.to(DEVICE),
                 row_mask=None if mask is None else mask.to(DEVICE))
    return (ri, rw), (ti.cpu(), tw.cpu())


def test_the_issue_tie_example_routes_the_same_on_every_backend() -> None:
    from sgl_budget.lang import compile_policy
    from sgl_budget.lang.ir import RouteContext

    x = torch.tensor([TIE_EXAMPLE])
    ir = compile_policy('policy "k6" { layers { k = 6 } }', _tie_spec(8))
    (ri, rw), (ti, tw) = _both_backends(ir, x, RouteContext("decode", 1))
    assert ri[0].tolist() == ti[0].tolist() == [5, 7, 2, 6, 0, 1]  # torch.topk on CPU: [5, 7, 2, 6, 0, 4]
    assert torch.allclose(tw, rw, rtol=1e-5, atol=1e-6)


def test_a_stock_plan_keeps_the_engines_own_topk_on_every_backend() -> None:
    """The model's own k and nothing else is stock routing: torch.topk's order, the kernels are not used."""
    from sgl_budget.lang import compile_policy
    from sgl_budget.lang.ir import RouteContext

    x = torch.tensor([TIE_EXAMPLE])
    ir = compile_policy('policy "own" { layers { k = 6 } }', _tie_spec(6))
    (ri, rw), (ti, tw) = _both_backends(ir, x, RouteContext("decode", 1))
    stock = torch.topk(torch.softmax(x, -1), 6, dim=-1).indices.to(torch.int32)
    assert torch.equal(ri, stock) and torch.equal(ti, stock) and torch.equal(tw, rw)


TIE_BODIES = [
    "layers { k = 2 }",
    "budget 50%; tokens { reallocate by score; min_k 1; max_k 4 }",
    'reroute { similarity "SIM"; primary top 1; min_similarity 0.5; preserve critical 2 }',
    'budget 50%; tokens { reallocate by score; min_k 1; max_k 4 } reroute { similarity "SIM"; primary coverage 60%; '
    "min_similarity 0.5 }",
    "budget 50%; piggyback { max_k 4 }",
    'budget 50%; reroute { similarity "SIM"; primary top 1; min_similarity 0.25 } piggyback { max_k 3 }',
]


def _quantised_similarity(spec, directory):
    """A similarity file whose entries are multiples of 1/4: many exact ties for the best primary."""
    from sgl_budget.similarity import derive_critical, save_similarity, synthetic_similarity

    table = synthetic_similarity(spec, seed=3)
    for l, m in table.matrices.items():
        q = (m * 4).round() / 4
        q.fill_diagonal_(1.0)
        table.matrices[l] = q
        table.critical[l] = derive_critical(q)
    return save_similarity(table, directory / f"{spec.name}.tie.sim.safetensors")


def _tie_logits(spec, t: int, seed: int):
    """Integer-valued logits (and a two-valued bias): exact ties at every rank."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (t, spec.num_experts), generator=g).float()
    bias = (torch.randint(0, 2, (spec.num_experts,), generator=g) * 0.125) if spec.has_correction_bias else None
    return x, bias


@pytest.mark.parametrize("variant", range(4))
@pytest.mark.parametrize("body", TIE_BODIES)
def test_kernels_match_the_reference_on_tie_heavy_logits(tmp_path, variant, body) -> None:
    from sgl_budget.lang import compile_policy
    from sgl_budget.lang.ir import RouteContext

    spec = _spec_variants()[variant]
    sim = _quantised_similarity(spec, tmp_path).name
    ir = compile_policy(f'policy "ties" {{ {body.replace("SIM", sim)} }}', spec, base_dir=tmp_path)
    ctx = RouteContext("decode", 24)
    for seed in range(4):
        x, bias = _tie_logits(spec, 24, seed)
        # all real, trailing CUDA-graph padding, and a scattered mask (a mixed batch's rows of one policy)
        mask = (torch.arange(24) < (24 if seed < 2 else 19)) if seed < 3 else (torch.arange(24) % 3 != 1)
        (ri, rw), (ti, tw) = _both_backends(ir, x, ctx, bias, mask)
        assert torch.equal(ti, ri), (spec.name, body, seed)
        assert torch.allclose(tw, rw, rtol=1e-5, atol=1e-6), (spec.name, body, seed)


MIXED_BODIES = [
    "budget 25%",
    "budget 50%; tokens { reallocate by score; min_k 1; max_k 4 }",
    'reroute { similarity "SIM"; primary top 1; min_similarity 0.5 }',
    "budget 50%; piggyback { max_k 4 }",
    'budget 50%; tokens { reallocate by score; min_k 1; max_k 4 } reroute { similarity "SIM"; primary count 4; '
    "min_similarity 0.25 } piggyback { max_k 3 }",
]


@pytest.mark.parametrize("variant", [0, 2, 3])
def test_mixed_batches_route_with_the_kernels_as_the_reference_does(tmp_path, monkeypatch, variant) -> None:
    """A mixed batch through KernelRouters (each policy's kernels with its rows as a device mask) equals the same
    batch through the torch reference: per row, for scattered maps and CUDA-graph padding."""
    import sgl_budget.kernels.alloc_t as alloc_t_mod
    import sgl_budget.kernels.piggyback as piggyback_mod
    import sgl_budget.kernels.sere as sere_mod
    from conftest import write_similarity
    from sgl_budget.kernels.backend import KernelRouter
    from sgl_budget.lang import compile_policy
    from sgl_budget.lang.ir import RouteContext
    from sgl_budget.lang.policy_set import stock_ir
    from sgl_budget.routing import LayerRouter, MixedRouter
    from sgl_budget.routing.outputs import pad_output

    spec = _spec_variants()[variant]
    sim = write_similarity(spec, tmp_path).name
    irs = [stock_ir(spec)] + [compile_policy(f'policy "p{i}" {{ {body.replace("SIM", sim)} }}', spec,
                                             base_dir=tmp_path) for i, body in enumerate(MIXED_BODIES)]
    ref = MixedRouter([LayerRouter(ir, 1) for ir in irs], spec.top_k)
    tri = MixedRouter([KernelRouter(ir, 1, backend="triton") for ir in irs], spec.top_k)
    tri.prepare(DEVICE)
    launched: list[str] = []
    for mod, name in ((alloc_t_mod, "alloc_t"), (sere_mod, "sere_reroute"), (piggyback_mod, "piggyback")):
        kernel = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _k=kernel, _n=name, **kw: launched.append(_n) or _k(*a, **kw))
    ctx = RouteContext("decode", 16)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(16, spec.num_experts, generator=g) * 3
        bias = torch.rand(spec.num_experts, generator=g) * 0.1 if spec.has_correction_bias else None
        rows = torch.randint(0, len(irs), (16,), generator=g, dtype=torch.int32)
        mask = torch.arange(16) < 16 - 3 * seed
        assert all(router.kernel_applies(router.plan(ctx), x.to(DEVICE)) for router in tri.routers[1:])
        rw, ri = ref(x, ctx, correction_bias=bias, row_policy=rows, row_mask=mask)
        tw, ti = tri(x.to(DEVICE), ctx, correction_bias=None if bias is None else bias.to(DEVICE),
                     row_policy=rows.to(DEVICE), row_mask=mask.to(DEVICE))
        real = mask  # padded rows are the engine's to mask (a plain top-k routes them, batch stages do not)
        assert torch.equal(ti.cpu()[real], ri[real]), (spec.name, seed)
        assert torch.allclose(tw.cpu()[real], rw[real], rtol=1e-5, atol=1e-6), (spec.name, seed)
        for p in range(1, len(irs)):  # and each policy's rows as that policy routes them alone
            own = (rows == p) & mask
            aw, ai = pad_output(LayerRouter(irs[p], 1)(x, ctx, correction_bias=bias, row_mask=own), spec.top_k)
            assert torch.equal(ti.cpu()[own], ai[own]), (spec.name, seed, p)
    assert {"alloc_t", "sere_reroute", "piggyback"} <= set(launched)  # the mixed path ran the kernels


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_mixed_batch_routing_captures_in_a_cuda_graph() -> None:
    """A mixed batch (row -> policy map in a device buffer) captured once, replayed with new logits and a new map:
    equals eager routing each time (the per-request serving path under CUDA-graph decode)."""
    from conftest import TINY_SOFTMAX
    from sgl_budget.kernels.backend import KernelRouter
    from sgl_budget.lang import compile_policy
    from sgl_budget.lang.ir import RouteContext
    from sgl_budget.lang.policy_set import stock_ir
    from sgl_budget.routing import MixedRouter

    irs = [compile_policy('policy "t" { budget 50%; tokens { reallocate by score; min_k 1; max_k 4 } }', TINY_SOFTMAX),
           stock_ir(TINY_SOFTMAX),
           compile_policy('policy "u" { budget 25% }', TINY_SOFTMAX)]
    router = MixedRouter([KernelRouter(ir, 1, backend="auto") for ir in irs], TINY_SOFTMAX.top_k)
    ctx = RouteContext("decode", 16)
    logits = torch.zeros(16, 16, device="cuda")
    rows = torch.zeros(16, dtype=torch.int32, device="cuda")
    mask = torch.ones(16, dtype=torch.bool, device="cuda")
    router(logits, ctx, row_policy=rows, row_mask=mask)  # warm up outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        w, ids = router(logits, ctx, row_policy=rows, row_mask=mask)
    for seed in (1, 2, 3):
        gen = torch.Generator().manual_seed(seed)
        logits.copy_(torch.randn(16, 16, generator=gen).cuda() * 3)
        rows.copy_(torch.randint(0, 3, (16,), generator=gen).to(torch.int32).cuda())
        mask.copy_((torch.arange(16) < 16 - seed).cuda())
        g.replay()
        ew, eids = router(logits, ctx, row_policy=rows, row_mask=mask)
        real = mask.cpu()
        assert torch.equal(ids.cpu()[real], eids.cpu()[real]) and torch.allclose(w.cpu()[real], ew.cpu()[real])
