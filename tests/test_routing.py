"""Reference routing: stock equivalence, each stage's semantics, the contract's invariants, no host sync."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from sgl_budget.lang import compile_policy
from sgl_budget.lang.ir import RouteContext
from sgl_budget.routing import compile_routers, stock_route
from sgl_budget.routing.scoring import score_experts
from sgl_budget.spec import PRESETS, ModelSpec

import tempfile
from pathlib import Path

from conftest import TINY_SIGMOID, TINY_SOFTMAX, TINY_SPECS, write_similarity


SIM_DIR = Path(tempfile.mkdtemp(prefix="sgl_budget_sim_"))


def model_topk(spec: ModelSpec, logits: torch.Tensor, bias: torch.Tensor | None, k: int):
    """Independent transcription of the models' own routers (HF Qwen/Mixtral/DeepSeek-V2/V3 code)."""
    if spec.scoring_func == "softmax":
        scores = torch.softmax(logits.float(), dim=-1)
        choice = scores
    else:
        scores = logits.float().sigmoid()
        choice = scores + bias.float() if bias is not None else scores
    if spec.n_group > 1:
        t = logits.shape[0]
        grouped = choice.view(t, spec.n_group, -1)
        gs = grouped.topk(2, dim=-1)[0].sum(dim=-1) if bias is not None else grouped.max(dim=-1).values
        idx = torch.topk(gs, k=spec.topk_group, dim=-1, sorted=False)[1]
        gmask = torch.zeros_like(gs).scatter_(1, idx, 1)
        smask = gmask.unsqueeze(-1).expand(t, spec.n_group, spec.num_experts // spec.n_group).reshape(t, -1)
        choice = choice.masked_fill(~smask.bool(), float("-inf"))
    _, ids = torch.topk(choice, k=k, dim=-1)
    w = scores.gather(1, ids)
    if spec.norm_topk_prob:
        denom = w.sum(dim=-1, keepdim=True)
        if spec.model_type.startswith("deepseek") or spec.has_correction_bias:
            denom = denom + 1e-20
        w = w / denom
    if spec.routed_scaling_factor != 1.0:
        w = w * spec.routed_scaling_factor
    return w, ids.to(torch.int32)


def logits_for(spec: ModelSpec, t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, spec.num_experts, generator=g) * 2
    bias = torch.randn(spec.num_experts, generator=g) * 0.1 if spec.has_correction_bias else None
    return x, bias


def test_stock_policy_is_bit_exact(tiny_spec: ModelSpec) -> None:
    ir = compile_policy(f'policy "stock" {{ layers {{ k = {tiny_spec.top_k} }} }}', tiny_spec)
    assert ir.is_stock
    for layer, router in compile_routers(ir).items():
        x, bias = logits_for(tiny_spec, 33, seed=layer)
        w, ids = router(x, RouteContext("decode", 33), correction_bias=bias)
        rw, rids = model_topk(tiny_spec, x, bias, tiny_spec.top_k)
        assert torch.equal(ids, rids) and torch.equal(w, rw)
        assert w.dtype == torch.float32 and ids.dtype == torch.int32
        sw, sids = stock_route(tiny_spec, x, bias)
        assert torch.equal(sw, rw) and torch.equal(sids, rids)


def test_empty_policy_is_stock_on_presets() -> None:
    for name in ("deepseek-v2-lite", "deepseek-v3", "qwen3-30b-a3b", "mixtral-8x7b"):
        spec = PRESETS[name]
        ir = compile_policy('policy "nothing" { }', spec)
        router = compile_routers(ir)[spec.moe_layers[-1]]
        x, bias = logits_for(spec, 9)
        w, ids = router(x, correction_bias=bias)
        rw, rids = model_topk(spec, x, bias, spec.top_k)
        assert torch.equal(ids, rids) and torch.equal(w, rw), name


def test_uniform_k_is_plain_topk_then_padding(tiny_spec: ModelSpec) -> None:
    ir = compile_policy('policy "p" { layers when decode { k = 2 } }', tiny_spec)
    r = compile_routers(ir)[1]
    assert r.width == tiny_spec.top_k  # the prefill context (stock) fixes the static width
    x, bias = logits_for(tiny_spec, 10)
    w, ids = r(x, RouteContext("decode", 10), correction_bias=bias)
    rw, rids = model_topk(tiny_spec, x, bias, 2)
    assert torch.equal(ids[:, :2], rids) and torch.equal(w[:, :2], rw)
    assert (ids[:, 2:] == -1).all() and (w[:, 2:] == 0).all()
    w6, ids6 = r(x, RouteContext("prefill", 1, 10), correction_bias=bias)
    assert torch.equal(ids6, model_topk(tiny_spec, x, bias, tiny_spec.top_k)[1])


def test_alloc_t_uses_exactly_the_layer_slots() -> None:
    spec = TINY_SOFTMAX
    ir = compile_policy('policy "t" { layers { k = 2 } tokens { reallocate by score; min_k 1; max_k 4 } }', spec)
    r = compile_routers(ir)[1]
    x, _ = logits_for(spec, 16)
    w, ids = r(x, RouteContext("decode", 16))
    per_token = (ids >= 0).sum(-1)
    assert int(per_token.sum()) == 16 * 2
    assert int(per_token.min()) >= 1 and int(per_token.max()) <= 4
    # the chosen (token, expert) pairs are the best by probability beyond each token's first expert
    probs = torch.softmax(x, -1)
    vals, order = probs.sort(dim=-1, descending=True, stable=True)
    extra = vals[:, 1:4].flatten()
    threshold = extra.sort(descending=True).values[16 - 1]
    for t in range(16):
        kt = int(per_token[t])
        assert torch.equal(ids[t, :kt].long(), order[t, :kt])
        if kt < 4:
            assert vals[t, kt] <= threshold
    assert torch.allclose(w.sum(-1), torch.ones(16))  # renormalised over each token's kept experts


def test_alloc_t_ties_are_deterministic() -> None:
    spec = TINY_SOFTMAX
    ir = compile_policy('policy "t" { layers { k = 2 } tokens { reallocate by score; min_k 0; max_k 4 } }', spec)
    r = compile_routers(ir)[1]
    x = torch.zeros(8, spec.num_experts)  # every score ties
    w, ids = r(x)
    counts = (ids >= 0).sum(-1)
    assert counts.tolist() == [4, 4, 4, 4, 0, 0, 0, 0]  # earlier tokens win ties
    # within a token, ties among experts fall as torch.topk orders them (as in the model's own router)
    assert len(set(ids[0].tolist())) == 4
    assert torch.equal(r(x)[1], ids)


def sere_reference(ids: torch.Tensor, weights_raw: torch.Tensor, sim: torch.Tensor, s: int, rho: float):
    """SERE's CUDA kernel rule (peers.md) written as loops, plus our merge of duplicates."""
    t, k = ids.shape
    primary = set(ids[:, :s].flatten().tolist())
    out = []
    for i in range(t):
        slots: dict[int, float] = {}
        for j in range(k):
            e = int(ids[i, j])
            if j >= s and e not in primary:
                best, dest = -1.0, e
                for p in sorted(primary):
                    if sim[e, p] > best:
                        best, dest = float(sim[e, p]), p
                if not (rho > 0 and best < rho):
                    e = dest
            slots[e] = slots.get(e, 0.0) + float(weights_raw[i, j])
        out.append(slots)
    return out


def test_sere_matches_the_published_rule(tmp_path) -> None:
    spec = TINY_SOFTMAX
    write_similarity(spec, tmp_path)
    for rho in (0.0, 0.6):
        src = (f'policy "s" {{ reroute {{ similarity "{spec.name}.sim.safetensors"; primary top 1; '
               f"min_similarity {rho} }} }}")
        ir = compile_policy(src, spec, base_dir=tmp_path)
        r = compile_routers(ir)[2]
        x, _ = logits_for(spec, 12, seed=3)
        w, ids = r(x)
        probs = torch.softmax(x, -1)
        sids = probs.topk(spec.top_k, dim=-1).indices
        sim = ir.plan(2, RouteContext()).reroute.similarity
        ref = sere_reference(sids, probs.gather(1, sids), sim, 1, rho)
        for i in range(12):
            got = {int(e): float(v) for e, v in zip(ids[i], w[i]) if e >= 0}
            total = sum(ref[i].values())
            assert set(got) == set(ref[i])
            for e, v in ref[i].items():
                assert abs(got[e] - v / total) < 1e-6


def _policies(spec: ModelSpec, sim: str) -> st.SearchStrategy[str]:
    e, top = spec.num_experts, spec.top_k

    @st.composite
    def build(draw) -> str:
        parts = [f"budget {draw(st.sampled_from([25, 50, 75, 100]))}%"]
        lo = draw(st.integers(1, 2))
        parts.append(f"layers {{ allocate uniform; k >= {lo} }}")
        if draw(st.booleans()):
            mn = draw(st.integers(0, 1))
            mx = draw(st.integers(max(mn, 1), min(8, e // 2)))
            parts.append(f"tokens {{ reallocate by score; min_k {mn}; max_k {mx} }}")
        if draw(st.booleans()):
            prim = draw(st.sampled_from([f"primary top {draw(st.integers(1, top))}", "primary coverage 60%",
                                         f"primary count {draw(st.integers(1, e))}"]))
            parts.append(f'reroute when decode {{ similarity "{sim}"; {prim}; '
                         f"min_similarity {draw(st.sampled_from([0, 0.3, 0.7]))}; "
                         f"preserve critical {draw(st.integers(0, 3))} }}")
        if draw(st.booleans()):
            parts.append(f"piggyback {{ max_k {draw(st.integers(1, top + 2))} }}")
        return 'policy "h" {\n' + "\n".join(parts) + "\n}"

    return build()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 ])
@given(data=st.data())
def test_contract_invariants(data) -> None:
    d = SIM_DIR
    spec = data.draw(st.sampled_from(sorted(TINY_SPECS)).map(TINY_SPECS.get))
    write_similarity(spec, d)
    src = data.draw(_policies(spec, f"{spec.name}.sim.safetensors"))
    try:
        ir = compile_policy(src, spec, base_dir=d)
    except Exception as e:  # min_k above a tiny layer k, etc.: must be a clean PolicyError
        from sgl_budget.errors import PolicyError

        assert isinstance(e, PolicyError)
        return
    t = data.draw(st.integers(1, 24))
    x = torch.randn(t, spec.num_experts, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    x = x * data.draw(st.sampled_from([0.0, 1.0, 5.0]))  # 0.0: every score ties
    bias = torch.linspace(-0.1, 0.1, spec.num_experts) if spec.has_correction_bias else None
    ctx = RouteContext("decode", t)
    for layer, r in compile_routers(ir).items():
        plan = r.plan(ctx)
        d_ = r.details(x, ctx, correction_bias=bias)
        w, ids = d_.topk_weights, d_.topk_ids
        assert ids.shape == (t, r.width) and w.shape == (t, r.width)
        assert ((ids >= -1) & (ids < spec.num_experts)).all()
        valid = ids >= 0
        # valid slots first, padding last
        assert (valid.int().diff(dim=-1) <= 0).all()
        assert torch.isfinite(w).all() and (w >= 0).all() and (w[~valid] == 0).all()
        for row in ids:
            kept = row[row >= 0].tolist()
            assert len(kept) == len(set(kept)), "an expert appears twice in one token"
        selected = valid & ~d_.piggybacked
        assert int(selected.sum()) <= t * plan.k, "the layer's slot total exceeds its budget"
        per_token = selected.sum(-1)
        if plan.reallocation is not None:
            assert int(per_token.max()) <= plan.reallocation.max_k
            if plan.reroute is None:
                assert int(per_token.min()) >= plan.reallocation.min_k
        else:
            assert int(per_token.max()) <= plan.k
        if plan.piggyback is not None:
            assert int(valid.sum(-1).max()) <= max(plan.piggyback.max_k, int(per_token.max()))
        # re-routing and piggybacking never add a distinct expert to the batch
        if plan.reroute is not None or plan.piggyback is not None:
            base = compile_policy(src.split("reroute")[0].split("piggyback")[0] + "}", spec, base_dir=d)
            b_router = compile_routers(base)[layer]
            if b_router.is_stock_plan(b_router.plan(ctx)):  # alone it is stock (torch.topk's tie order); as a
                b_ids = score_experts(spec, x, bias).topk(plan.k)[1]  # policy's first stage, ties go lower index
            else:
                b_ids = b_router(x, ctx, correction_bias=bias)[1]
            assert set(ids[ids >= 0].tolist()) <= set(b_ids[b_ids >= 0].tolist())


def test_batched_equals_one_batch_at_a_time(tmp_path) -> None:
    spec = TINY_SIGMOID
    write_similarity(spec, tmp_path)
    src = (f'policy "all" {{ budget 50%; tokens {{ reallocate by score; min_k 1; max_k 4 }} '
           f'reroute {{ similarity "{spec.name}.sim.safetensors"; primary top 1; min_similarity 0.3 }} '
           f"piggyback {{ max_k 4 }} }}")
    r = compile_routers(compile_policy(src, spec, base_dir=tmp_path))[1]
    x = torch.randn(5, 8, spec.num_experts)
    bias = torch.linspace(-0.1, 0.1, spec.num_experts)
    w, ids = r(x, RouteContext("decode", 8), correction_bias=bias)
    for n in range(5):
        wn, idn = r(x[n], RouteContext("decode", 8), correction_bias=bias)
        assert torch.equal(idn, ids[n]) and torch.equal(wn, w[n])


class _NoHostSync(TorchDispatchMode):
    BANNED = ("_local_scalar_dense", "nonzero", "unique", "masked_select", "item")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if any(b in name for b in self.BANNED):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_no_host_synchronisation(tmp_path) -> None:
    spec = TINY_SIGMOID
    write_similarity(spec, tmp_path)
    src = (f'policy "all" {{ budget 50%; tokens {{ reallocate by score; min_k 1; max_k 4 }} '
           f'reroute when decode {{ similarity "{spec.name}.sim.safetensors"; primary coverage 50%; '
           f"min_similarity 0.2; preserve critical 2 }} piggyback when decode {{ max_k 4 }} }}")
    routers = compile_routers(compile_policy(src, spec, base_dir=tmp_path))
    x = torch.randn(16, spec.num_experts)
    bias = torch.linspace(-0.1, 0.1, spec.num_experts)
    for r in routers.values():
        r.prepare("cpu")
    with _NoHostSync() as mode:
        outs = [r(x, RouteContext("decode", 16), correction_bias=bias) for r in routers.values()]
    assert mode.seen == [], mode.seen
    again = [r(x, RouteContext("decode", 16), correction_bias=bias) for r in routers.values()]
    for (w1, i1), (w2, i2) in zip(outs, again):
        assert torch.equal(w1, w2) and torch.equal(i1, i2)


def test_sync_detector_detects_item() -> None:
    with _NoHostSync() as mode:
        torch.ones(3).sum().item()
    assert mode.seen


def test_phase_conditions_change_the_plan() -> None:
    spec = TINY_SOFTMAX
    ir = compile_policy('policy "p" { layers when decode and batch >= 4 { k = 1 } layers { k = 3 } }', spec)
    r = compile_routers(ir)[1]
    x = torch.randn(4, spec.num_experts)
    assert int((r(x, RouteContext("decode", 4))[1] >= 0).sum()) == 4
    assert int((r(x, RouteContext("decode", 3, 4))[1] >= 0).sum()) == 12
    assert int((r(x, RouteContext("prefill", 1, 4))[1] >= 0).sum()) == 12
    assert r.width == 3


def test_padded_rows_take_no_part_in_batch_stages(tmp_path) -> None:
    """SGLang pads decode batches to a CUDA-graph size: padded rows must not take slots or add experts."""
    spec = TINY_SOFTMAX
    write_similarity(spec, tmp_path)
    x = torch.randn(8, spec.num_experts, generator=torch.Generator().manual_seed(4)) * 3
    x[5:] = 0.0  # three padding rows (zero hidden states: all scores tie)
    mask = torch.arange(8) < 5
    ir = compile_policy('policy "t" { budget 50%; tokens { reallocate by score; min_k 1; max_k 4 } }', spec)
    r = compile_routers(ir)[1]
    _, ids = r(x, RouteContext("decode", 8), row_mask=mask)
    assert int((ids[:5] >= 0).sum()) == 5 * 2  # the real tokens' own T*k, not the padded rows' share
    assert (ids[5:] == -1).all()
    # piggybacking: the real tokens' distinct experts never grow
    ir = compile_policy('policy "p" { layers { k = 2 } piggyback { max_k 4 } }', spec)
    r, base = compile_routers(ir)[1], compile_routers(compile_policy('policy "k2" { layers { k = 2 } }', spec))[1]
    _, ids = r(x, RouteContext("decode", 8), row_mask=mask)
    _, b_ids = base(x[:5], RouteContext("decode", 5))
    assert set(ids[:5][ids[:5] >= 0].tolist()) <= set(b_ids[b_ids >= 0].tolist())


def test_contexts_are_normalised_and_empty_batches_route() -> None:
    assert RouteContext("decode", 8, 4).tokens == 8  # one token per sequence in decode
    assert RouteContext("prefill", 4, 2).tokens == 4  # at least one per sequence in prefill
    assert RouteContext("decode", 0).batch_size == 1
    spec = TINY_SOFTMAX
    r = compile_routers(compile_policy('policy "h" { budget 50% }', spec))[1]
    w, ids = r(torch.empty(0, spec.num_experts))
    assert ids.shape == (0, r.width) == (0, 2)


def test_sere_top_s_uses_each_tokens_best_slots_even_with_unsorted_engine_conventions(tmp_path) -> None:
    from sgl_budget.routing import Conventions
    from sgl_budget.routing.router import LayerRouter

    spec = TINY_SIGMOID
    write_similarity(spec, tmp_path)
    src = f'policy "s" {{ reroute {{ similarity "{spec.name}.sim.safetensors"; primary top 1 }} }}'
    ir = compile_policy(src, spec, base_dir=tmp_path)
    x = torch.randn(12, spec.num_experts, generator=torch.Generator().manual_seed(5))
    bias = torch.linspace(-0.1, 0.1, spec.num_experts)
    ref = LayerRouter(ir, 1).details(x, RouteContext("decode", 12), correction_bias=bias)
    eng = LayerRouter(ir, 1, Conventions(sorted_selection=False)).details(x, RouteContext("decode", 12),
                                                                           correction_bias=bias)
    assert torch.equal(ref.primary, eng.primary)


# -- exact ties -----------------------------------------------------------------------------------------------


def tie_logits(spec: ModelSpec, t: int, seed: int):
    """Integer-valued logits (and a two-valued bias): exact ties at every rank."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (t, spec.num_experts), generator=g).float()
    bias = torch.randint(0, 2, (spec.num_experts,), generator=g) * 0.125 if spec.has_correction_bias else None
    return x, bias


def lower_index_topk(spec: ModelSpec, logits: torch.Tensor, bias: torch.Tensor | None, k: int) -> list[list[int]]:
    """Independent transcription of the tie rule: rank by (score descending, index ascending), groups too."""
    scores = logits.float().sigmoid() if spec.scoring_func == "sigmoid" else torch.softmax(logits.float(), dim=-1)
    choice = (scores + bias.float() if bias is not None else scores).tolist()
    out = []
    for row in choice:
        experts = range(spec.num_experts)
        if spec.n_group > 1:
            size = spec.num_experts // spec.n_group
            groups = [row[g * size:(g + 1) * size] for g in range(spec.n_group)]
            gscore = [sum(sorted(gr, reverse=True)[:2]) if bias is not None else max(gr) for gr in groups]
            kept = sorted(range(spec.n_group), key=lambda g: (-gscore[g], g))[: spec.topk_group]
            experts = [e for e in experts if e // size in kept]
        out.append(sorted(experts, key=lambda e: (-row[e], e))[:k])
    return out


def test_the_issue_tie_example_takes_the_lower_expert_index() -> None:
    spec = ModelSpec(name="tie-8", num_layers=2, moe_layers=(1,), num_experts=8, top_k=8, hidden_size=64,
                     moe_intermediate_size=32, norm_topk_prob=True, model_type="qwen3_moe")
    x = torch.tensor([[-1.0, -3.0, 4.0, -4.0, -3.0, 8.0, 1.0, 6.0]])
    router = compile_routers(compile_policy('policy "k6" { layers { k = 6 } }', spec))[1]
    assert router(x)[1][0].tolist() == [5, 7, 2, 6, 0, 1]  # torch.topk on CPU: [5, 7, 2, 6, 0, 4]
    assert router.details(x).topk_ids[0].tolist() == [5, 7, 2, 6, 0, 1]


def test_policy_selection_breaks_exact_ties_by_lower_index(tiny_spec: ModelSpec) -> None:
    for k in range(1, tiny_spec.top_k):
        router = compile_routers(compile_policy(f'policy "k" {{ layers {{ k = {k} }} }}', tiny_spec))[1]
        for seed in range(4):
            x, bias = tie_logits(tiny_spec, 16, seed)
            want = lower_index_topk(tiny_spec, x, bias, k)
            assert router(x, correction_bias=bias)[1].tolist() == want, (tiny_spec.name, k, seed)
            assert router.details(x, correction_bias=bias).topk_ids.tolist() == want


def test_a_stock_plan_stays_bit_exact_under_exact_ties(tiny_spec: ModelSpec) -> None:
    """The model's own k is the engine's own torch.topk, tie order included (what transformers and SGLang run)."""
    router = compile_routers(compile_policy('policy "own" { }', tiny_spec))[1]
    for seed in range(4):
        x, bias = tie_logits(tiny_spec, 16, seed)
        rw, rids = model_topk(tiny_spec, x, bias, tiny_spec.top_k)
        w, ids = router(x, correction_bias=bias)
        assert torch.equal(ids, rids) and torch.equal(w, rw), (tiny_spec.name, seed)
        sw, sids = stock_route(tiny_spec, x, bias)
        assert torch.equal(sids, rids) and torch.equal(sw, rw)


def test_ranked_topk_is_a_stable_descending_order() -> None:
    from sgl_budget.routing.scoring import ranked_topk

    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (64, 16), generator=g).float()
    x[torch.rand(64, 16, generator=g) < 0.1] = float("-inf")
    x[torch.rand(64, 16, generator=g) < 0.1] = -0.0  # equal to +0.0: a tie like any other
    for m in (1, 5, 16):
        vals, ids = ranked_topk(x, m)
        want = torch.sort(x, dim=-1, descending=True, stable=True)
        assert torch.equal(ids, want.indices[:, :m]) and torch.equal(vals, want.values[:, :m])


def test_replays_shared_ranking_equals_both_rules_under_ties(tiny_spec: ModelSpec) -> None:
    """Replay ranks once per layer: the shared ranking must be the policies' rule and the stock top-k alike."""
    from sgl_budget.routing.scoring import ranked_topk, score_experts

    x, bias = tie_logits(tiny_spec, 48, seed=9)
    gs = score_experts(tiny_spec, x.view(3, 16, -1), bias)
    shared = gs.with_ranking(tiny_spec.top_k + 2, stock_k=tiny_spec.top_k)
    want = ranked_topk(gs.select, tiny_spec.top_k + 2)
    assert torch.equal(shared.topk(tiny_spec.top_k + 2)[1], want[1])
    assert torch.equal(shared.topk(tiny_spec.top_k + 2)[0], want[0])
    assert torch.equal(shared.stock_topk(tiny_spec.top_k)[1], gs.stock_topk(tiny_spec.top_k)[1])
    sw, sids = stock_route(tiny_spec, x.view(3, 16, -1), bias, gs=shared)
    rw, rids = stock_route(tiny_spec, x.view(3, 16, -1), bias)
    assert torch.equal(sids, rids) and torch.equal(sw, rw)
