"""Fixed-k layers run SGLang's own ``select_experts`` at that k (issue 19, part 5), in-process on CPU.

A layer whose plan is a fixed k (uniform, Alloc-L's per-layer k; Alloc-T over one token) is routed by
SGLang's real ``select_experts`` with ``top_k`` = k (+ fused shared-expert slots), padded to the model's
width — never by sgl_budget's reference router — and equals that reference router (up to the order of
the slots, which SGLang's grouped / biased top-k leaves unsorted, and exact ties). No timing here: speed
is measured by benchmarks/serve_cpu_ab.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang", reason="install the sglang extra: pip install -e '.[sglang]'")

from sgl_budget.engines.sglang import native_moe, plugin  # noqa: E402
from sgl_budget.engines.sglang import routing as R  # noqa: E402
from sgl_budget.engines.sglang.requests import ROWS_ATTR, BatchRows  # noqa: E402
from sgl_budget.lang.ir import RouteContext  # noqa: E402

from test_sglang import VARIANTS, _use, _variant, sglang_topk  # noqa: E402,F401  (the fixture, re-used)


def _rows(ids: torch.Tensor, w: torch.Tensor) -> list[list[tuple[int, float]]]:
    """Each row's (id, weight) pairs with weight > 0, as a sorted list (slot order and padding left out)."""
    return [sorted((i, x) for i, x in zip(r.tolist(), s.tolist()) if x > 0) for r, s in zip(ids, w)]


class _Spy:
    """Counts calls of SGLang's own ``select_experts`` (the hook's ``original``) and records their top_k."""

    def __init__(self, original) -> None:
        self.original, self.top_ks = original, []

    def __call__(self, hidden_states, router_logits, topk_config, **kwargs):
        self.top_ks.append(topk_config.top_k)
        return self.original(hidden_states, router_logits, topk_config, **kwargs)


def _native(topk):
    """The TopK's config as ``TopK.forward_native`` (this CPU engine's path) sets it before routing."""
    topk.topk_config.torch_native = True
    return topk.topk_config


class _Batch:
    """What the hook reads from SGLang's ForwardBatch: decode of T rows, every row on policy ``uniform``."""

    def __init__(self, rows: int, uniform: int | None) -> None:
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        self.forward_mode, self.batch_size = ForwardMode.DECODE, rows
        setattr(self, ROWS_ATTR, BatchRows(rows, uniform))


def _route(routing, original, x, topk_config, layer_id=1, uniform: int | str | None = "default", **kwargs):
    """The hook's ``select_experts`` inside a decode forward whose rows all use policy ``uniform`` (None: a mixed
    batch); returns its output and the ``top_k`` of each call it made to SGLang's own function."""
    uniform = routing.pset.default if uniform == "default" else uniform
    spy = _Spy(original)
    saved = R.current_forward_batch
    R.current_forward_batch = lambda: _Batch(x.shape[0], uniform)
    try:
        out = routing.select_experts(spy, torch.zeros(x.shape[0], 8), x, topk_config, layer_id=layer_id, **kwargs)
    finally:
        R.current_forward_batch = saved
    return out, spy.top_ks


@pytest.mark.parametrize("minus_one", [True, False])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fixed_k_runs_sglang_select_experts_and_equals_the_reference(sglang_topk, tmp_path, monkeypatch, name,
                                                                     minus_one) -> None:
    monkeypatch.setattr(native_moe, "_registered", minus_one)  # CPU native path with / without the -1 hook
    T = sglang_topk.T
    spec, topk_kw = _variant(name)
    topk = T.TopK(top_k=4, layer_id=1, **topk_kw)
    _native(topk)
    x = torch.randn(23, 16, generator=torch.Generator().manual_seed(11)) * 2
    _use(spec, 'policy "k2" { layers { k = 2 } }', tmp_path)
    routing = plugin._STATE["routing"]
    got, calls = _route(routing, sglang_topk.original, x, topk.topk_config)
    assert calls == [2]  # SGLang's own function, at k = 2
    if minus_one:  # the CPU engine's native MoE path takes any width: SGLang's output at k, unpadded
        assert got.topk_ids.shape == (23, 2) and (got.topk_ids >= 0).all()
    else:  # padded to the model's width with a distinct expert the token does not use, weight 0
        assert got.topk_ids.shape == (23, 4) and got.topk_weights.shape == (23, 4)
        assert (got.topk_weights[:, 2:] == 0).all()
        assert all(min(r) >= 0 and len(set(r)) == 4 for r in got.topk_ids.tolist())
    routing.stock_fast_path = False  # the reference router under SGLang's conventions
    ref, calls = _route(routing, sglang_topk.original, x, topk.topk_config)
    assert calls == []
    g, r = _rows(got.topk_ids, got.topk_weights), _rows(ref.topk_ids, ref.topk_weights)
    for a, b in zip(g, r):
        assert [i for i, _ in a] == [i for i, _ in b]
        assert torch.allclose(torch.tensor([w for _, w in a]), torch.tensor([w for _, w in b]), rtol=0, atol=1e-6)


def test_per_layer_k_and_the_models_own_k(sglang_topk, tmp_path) -> None:
    """Alloc-L-style explicit per-layer k: each layer's k through SGLang's function; the model's own k untouched."""
    T = sglang_topk.T
    spec, topk_kw = _variant("softmax-renorm")
    _use(spec, 'policy "l" { layers { k = 3; layer 2: k = 1; layer 3: k = 4 } }', tmp_path)
    routing = plugin._STATE["routing"]
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    for layer, k in ((1, 3), (2, 1), (3, 4)):
        cfg = _native(T.TopK(top_k=4, layer_id=layer, **topk_kw))
        out, calls = _route(routing, sglang_topk.original, x, cfg, layer_id=layer)
        assert calls == [k]
        assert ((out.topk_weights > 0).sum(-1) == k).all()
        if k == 4:  # bit for bit SGLang's own output
            want = sglang_topk.original(torch.zeros(5, 8), x, cfg, layer_id=layer)
            assert torch.equal(out.topk_ids, want.topk_ids) and torch.equal(out.topk_weights, want.topk_weights)


def test_fused_shared_expert_slots_stay_after_the_padding(sglang_topk, tmp_path) -> None:
    """A TopK with a fused shared-expert slot: SGLang writes it after the k routed slots; padding goes between, as
    the reference path lays it out."""
    from dataclasses import replace

    from sglang.srt.configs.shared_experts import SharedExpertsConfig

    T = sglang_topk.T
    spec, topk_kw = _variant("sigmoid-bias-grouped")
    cfg = replace(_native(T.TopK(top_k=4, layer_id=1, **topk_kw)), top_k=5,
                  shared_experts=SharedExpertsConfig(num_fused_shared_experts=1))
    assert cfg.num_shared_topk_slots == 1
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(5))
    _use(spec, 'policy "k2" { layers { k = 2 } }', tmp_path)
    routing = plugin._STATE["routing"]
    got, calls = _route(routing, sglang_topk.original, x, cfg)
    assert calls == [3]  # 2 routed + 1 shared
    routing.stock_fast_path = False
    ref, _ = _route(routing, sglang_topk.original, x, cfg)
    assert got.topk_ids.shape == ref.topk_ids.shape == (9, 5)
    assert torch.equal(got.topk_ids[:, 4], ref.topk_ids[:, 4]) and (got.topk_ids[:, 4] == 16).all()
    assert torch.allclose(got.topk_weights[:, 4], ref.topk_weights[:, 4])
    assert _rows(got.topk_ids[:, :4], got.topk_weights[:, :4]) == _rows(ref.topk_ids[:, :4], ref.topk_weights[:, :4])


@pytest.mark.parametrize("name", ["softmax-renorm", "sigmoid-bias-grouped", "ernie-as-built"])
def test_alloc_t_over_one_token_is_top_k(sglang_topk, tmp_path, name) -> None:
    """Alloc-T over a forward of one token is plain top-k at the layer's k: the fast path gives the reference
    router's experts and weights; over two tokens the reference router runs."""
    T = sglang_topk.T
    spec, topk_kw = _variant(name)
    cfg = _native(T.TopK(top_k=4, layer_id=2, **topk_kw))
    _use(spec, 'policy "t" { budget 50%; tokens { reallocate by score; min_k 1; max_k 4 } }', tmp_path)
    routing = plugin._STATE["routing"]
    plan = routing.ir.plan(2, RouteContext("decode", 1))
    assert plan.reallocation is not None and routing.fixed_k(plan, 1) == 2 and routing.fixed_k(plan, 2) is None
    g = torch.Generator().manual_seed(9)
    for _ in range(20):
        x = torch.randn(1, 16, generator=g) * 3
        got, calls = _route(routing, sglang_topk.original, x, cfg, layer_id=2)
        assert calls == [2]
        routing.stock_fast_path = False
        ref, calls = _route(routing, sglang_topk.original, x, cfg, layer_id=2)
        routing.stock_fast_path = True
        assert calls == []
        (a,), (b,) = _rows(got.topk_ids, got.topk_weights), _rows(ref.topk_ids, ref.topk_weights)
        assert [i for i, _ in a] == [i for i, _ in b]
        assert torch.allclose(torch.tensor([w for _, w in a]), torch.tensor([w for _, w in b]), rtol=0, atol=1e-6)
    _, calls = _route(routing, sglang_topk.original, torch.randn(2, 16), cfg, layer_id=2)
    assert calls == []  # two tokens share a pool: the reference router


def test_stats_count_the_fixed_k(sglang_topk, tmp_path) -> None:
    """Slots and tokens of a fixed-k layer reach the per-policy counters; CUDA-graph padding rows are left out."""
    T = sglang_topk.T
    spec, topk_kw = _variant("softmax-renorm")
    _use(spec, 'policy "k2" { layers { k = 2 } }', tmp_path)
    routing = plugin._STATE["routing"]
    cfg = _native(T.TopK(top_k=4, layer_id=1, **topk_kw))
    p = routing.pset.default
    _route(routing, sglang_topk.original, torch.randn(6, 16), cfg)
    _route(routing, sglang_topk.original, torch.randn(6, 16), cfg, num_token_non_padded=torch.tensor(4))
    routing.stats._collect()
    assert routing.stats.token_layers[p] == 6 + 4 and routing.stats.slots[p] == 2 * (6 + 4)


def test_padding_columns_for_runners_that_skip_minus_one() -> None:
    """CUDA runners: SGLang's output at k widened with -1 / weight-0 slots, before any fused shared-expert column."""
    from sgl_budget.engines.sglang.routing import _pad_columns

    ids = torch.tensor([[3, 5], [7, 1]], dtype=torch.int32)
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3]])
    pi, pw = _pad_columns(ids, w, 2, 4, 16, minus_one=True)
    assert pi.tolist() == [[3, 5, -1, -1], [7, 1, -1, -1]] and pi.dtype == torch.int32
    assert torch.equal(pw[:, :2], w) and (pw[:, 2:] == 0).all()
    shared = torch.cat([ids, torch.full((2, 1), 16, dtype=torch.int32)], dim=1)
    pi, pw = _pad_columns(shared, torch.cat([w, torch.ones(2, 1)], dim=1), 2, 4, 16, minus_one=True)
    assert pi.tolist() == [[3, 5, -1, -1, 16], [7, 1, -1, -1, 16]] and pw[:, 4].tolist() == [1.0, 1.0]
    masked = torch.tensor([[3, 5], [-1, -1]], dtype=torch.int32)  # a row SGLang masked keeps its -1
    pi, _ = _pad_columns(masked, w, 2, 4, 16, minus_one=False)
    assert pi[1, :2].tolist() == [-1, -1] and min(pi[0].tolist()) >= 0 and len(set(pi[0].tolist())) == 4
    assert min(pi[1, 2:].tolist()) >= 0


def test_unpadded_fixed_k_through_native_moe_equals_the_padded_problem(sglang_topk, tmp_path, monkeypatch) -> None:
    """The fixed-k output at width k through SGLang's moe_forward_native (behind sgl_budget's hook) equals the same
    routing padded to the model's width with -1 and computed by the hook's compaction."""
    from sglang.srt.layers.moe.fused_moe_native import moe_forward_native
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    from sgl_budget.engines.sglang.routing import _pad_columns
    from test_sglang import _native_layer

    layer = _native_layer(16, 8, 4)
    T = sglang_topk.T
    spec, topk_kw = _variant("softmax-renorm")
    monkeypatch.setattr(native_moe, "_registered", True)
    _use(spec, 'policy "k2" { layers { k = 2 } }', tmp_path)
    routing = plugin._STATE["routing"]
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(4))
    h = torch.randn(7, 8, generator=torch.Generator().manual_seed(6))
    out, _ = _route(routing, sglang_topk.original, x, _native(T.TopK(top_k=4, layer_id=1, **topk_kw)))
    assert out.topk_ids.shape == (7, 2)
    narrow = native_moe.moe_forward_skip_padding(moe_forward_native, layer, h, out, layer.moe_runner_config)
    pi, pw = _pad_columns(out.topk_ids, out.topk_weights, 2, 4, 16, minus_one=True)
    padded = StandardTopKOutput(pw, pi, out.router_logits)
    general = native_moe.moe_forward_skip_padding(moe_forward_native, layer, h, padded, layer.moe_runner_config)
    assert torch.allclose(narrow, general, rtol=1e-5, atol=1e-6)


def test_one_token_with_padded_slots_through_native_moe(sglang_topk) -> None:
    """Batch-1 decode under a variable-k rule: one token's kept slots run as a narrower input of SGLang's function,
    equal to the compacted problem of the general path."""
    from sglang.srt.layers.moe.fused_moe_native import moe_forward_native
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    from test_sglang import _dense_reference, _native_layer

    layer = _native_layer(16, 8, 4)
    x = torch.randn(1, 8, generator=torch.Generator().manual_seed(8))
    ids = torch.tensor([[5, -1, 2, -1]], dtype=torch.int32)
    w = torch.tensor([[0.7, 0.0, 0.3, 0.0]])
    got = native_moe.moe_forward_skip_padding(moe_forward_native, layer, x, StandardTopKOutput(w, ids, None),
                                              layer.moe_runner_config)
    assert torch.allclose(got, _dense_reference(layer, x, ids, w), rtol=1e-5, atol=1e-6)
    two = StandardTopKOutput(w.repeat(2, 1), ids.repeat(2, 1), None)  # the general (compacting) path
    general = native_moe.moe_forward_skip_padding(moe_forward_native, layer, x.repeat(2, 1), two,
                                                  layer.moe_runner_config)
    assert torch.allclose(got, general[:1], rtol=1e-6, atol=1e-7)
    none = StandardTopKOutput(torch.zeros(1, 4), torch.full((1, 4), -1, dtype=torch.int32), None)
    assert (native_moe.moe_forward_skip_padding(moe_forward_native, layer, x, none, layer.moe_runner_config) == 0).all()
