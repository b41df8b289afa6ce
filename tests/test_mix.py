"""Policy mixes: MixedRouter semantics on the embedded model's policies, the transformers adapter's per-row mixes,
and ``eval`` / ``replay --mix``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sgl_budget.cli import main
from sgl_budget.lang import compile_policy
from sgl_budget.lang.ir import RouteContext
from sgl_budget.lang.mix import MixError, assign_rows, load_mix, parse_mix
from sgl_budget.lang.policy_set import load_policy_set
from sgl_budget.routing import LayerRouter, MixedRouter, routed_per_policy
from sgl_budget.routing.mixed import pad_output
from sgl_budget.spec import load_spec

from conftest import TINY_SIGMOID, write_similarity
from test_routing import _NoHostSync

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "brown-moe"
POL = ROOT / "policies" / "brown-moe"
TRACE = ROOT / "policies" / "traces" / "brown-moe.test.trace.safetensors"
TEXT = ROOT / "data" / "brown" / "test.txt.xz"
SPEC = load_spec(str(MODEL / "config.json"))
# one of each kind: per-token k, Alloc-T (batch slot pool), SERE (batch primaries), Alloc-T + SERE
FILES = ["uniform-25", "alloc-lt-50", "sere-50", "alloc-moe-sere-50"]
PIGGYBACK = 'policy "pig" { layers { k = 3 } piggyback when decode { max_k 6; min_score 0.01 } }'
BATCHY = 'policy "batchy" { layers when batch >= 16 { k = 1 } layers { k = 4 } }'  # sees the whole batch
LAYER = SPEC.moe_layers[1]


@pytest.fixture(scope="module")
def policies():
    """stock, the bundled brown-moe policies of every kind, a piggybacking and a batch-conditioned policy."""
    ps = load_policy_set(SPEC, None, [(f, POL / f"{f}.policy") for f in FILES])
    return [*ps.irs, compile_policy(PIGGYBACK, SPEC), compile_policy(BATCHY, SPEC)]


def _mixed(irs, layer=LAYER):
    return MixedRouter([LayerRouter(ir, layer) for ir in irs])


def _logits(t: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(t, SPEC.num_experts, generator=torch.Generator().manual_seed(seed)) * 2


# -- MixedRouter semantics -----------------------------------------------------------------------------------

@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_rows_of_a_policy_route_as_that_policy_alone_on_them(policies, phase) -> None:
    mixed = _mixed(policies)
    t = 16
    x = _logits(t)
    row_policy = torch.arange(t) % len(policies)
    ctx = RouteContext(phase, t, t)
    w, ids = mixed(x, ctx, row_policy=row_policy)
    assert ids.shape == (t, mixed.width)
    for p, ir in enumerate(policies):
        rows = row_policy == p
        # alone: only its rows exist (batch-level stages see them only), with the mixed batch's context
        aw, aid = pad_output(LayerRouter(ir, LAYER)(x[rows], ctx), mixed.width)
        assert torch.equal(ids[rows], aid), ir.name
        assert torch.equal(w[rows], aw), ir.name
    stock_rows = row_policy == 0
    stock = pad_output(LayerRouter(policies[0], LAYER)(x, ctx), mixed.width)
    assert torch.equal(stock.topk_ids[stock_rows], ids[stock_rows])  # a stock row = stock routing
    batchy = row_policy == len(policies) - 1
    assert bool(((ids[batchy] >= 0).sum(-1) == 1).all())  # `when batch >= 16` saw all 16 rows, not its 2


def test_uniform_path_equals_mixed_path(policies) -> None:
    mixed = _mixed(policies)
    x = _logits(12, seed=1)
    ctx = RouteContext("decode", 12)
    for p, ir in enumerate(policies):
        row_policy = torch.full((12,), p)
        uni = mixed(x, ctx, row_policy=row_policy, uniform=p)
        mix = mixed(x, ctx, row_policy=row_policy)
        assert torch.equal(uni.topk_ids, mix.topk_ids) and torch.equal(uni.topk_weights, mix.topk_weights), ir.name


def test_padded_rows_take_no_part_and_are_not_counted(policies) -> None:
    mixed = _mixed(policies)
    t, real = 16, 11
    x = _logits(t, seed=2)
    ctx = RouteContext("decode", t)
    row_policy = torch.tensor([1, 2, 3, 4, 5, 0] * 3)[:t]
    row_mask = torch.arange(t) < real
    _, ids = mixed(x, ctx, row_policy=row_policy, row_mask=row_mask)
    for p, ir in enumerate(policies):
        rows = (row_policy == p) & row_mask
        if bool(rows.any()):
            want = pad_output(LayerRouter(ir, LAYER)(x[rows], ctx), mixed.width).topk_ids
            assert torch.equal(ids[rows], want), ir.name
    slots, tokens = routed_per_policy((ids >= 0).sum(-1), row_policy, len(policies), row_mask)
    for p in range(len(policies)):
        rows = (row_policy == p) & row_mask
        assert int(tokens[p]) == int(rows.sum())
        assert int(slots[p]) == int((ids[rows] >= 0).sum())
    assert int(tokens.sum()) == real


def test_batched_logits_route_each_batch_like_two_d(policies) -> None:
    mixed = _mixed(policies)
    x = torch.stack([_logits(16, seed=s) for s in range(3)])
    ctx = RouteContext("decode", 16)
    row_policy = torch.arange(16) % len(policies)
    w, ids = mixed(x, ctx, row_policy=row_policy)
    for n in range(3):
        wn, idn = mixed(x[n], ctx, row_policy=row_policy)
        assert torch.equal(idn, ids[n]) and torch.equal(wn, w[n])


def test_mixed_routing_does_not_synchronise_with_the_host(policies) -> None:
    mixed = _mixed(policies)
    for r in mixed.routers:
        r.prepare("cpu")
    x = _logits(16, seed=3)
    row_policy = torch.arange(16) % len(policies)
    with _NoHostSync() as mode:
        mixed(x, RouteContext("decode", 16), row_policy=row_policy, row_mask=torch.arange(16) < 14)
    assert mode.seen == [], mode.seen


def test_triton_routers_route_uniform_and_mixed_batches_with_their_kernels(tmp_path) -> None:
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"  # conftest.py sets it before triton is imported
    pytest.importorskip("triton", reason="triton is not installed (it comes with the sglang extra)")
    from sgl_budget.kernels.backend import KernelRouter

    calls = []

    class Counting(KernelRouter):
        def __call__(self, *a, **kw):
            calls.append(self.ir.name)
            return super().__call__(*a, **kw)

    spec = TINY_SIGMOID
    write_similarity(spec, tmp_path)
    irs = [compile_policy(s, spec, base_dir=tmp_path) for s in (
        'policy "t" { budget 50%; tokens { reallocate by score; min_k 1; max_k 4 } }',
        f'policy "s" {{ reroute {{ similarity "{spec.name}.sim.safetensors"; primary top 1 }} }}')]
    x = torch.randn(8, spec.num_experts, generator=torch.Generator().manual_seed(0))
    bias = torch.linspace(-0.1, 0.1, spec.num_experts)
    ctx = RouteContext("decode", 8)
    tri = [Counting(ir, 1, backend="triton") for ir in irs]
    mixed = MixedRouter(tri)
    for p, r in enumerate(tri):
        assert r.kernel_applies(r.plan(ctx), x)
        calls.clear()
        got = mixed(x, ctx, bias, row_policy=torch.full((8,), p), uniform=p)
        assert calls == [r.ir.name]  # the kernel router itself
        want = pad_output(KernelRouter.__call__(r, x, ctx, bias), mixed.width)
        assert torch.equal(got.topk_ids, want.topk_ids) and torch.equal(got.topk_weights, want.topk_weights)
    calls.clear()
    row_policy = torch.arange(8) % 2
    got = mixed(x, ctx, bias, row_policy=row_policy)
    assert calls == [ir.name for ir in irs]  # each policy's own router (its kernels, its rows as a device mask)
    ref = MixedRouter([LayerRouter(ir, 1) for ir in irs])(x, ctx, bias, row_policy=row_policy)
    assert torch.equal(got.topk_ids, ref.topk_ids) and torch.equal(got.topk_weights, ref.topk_weights)


# -- mix specs -----------------------------------------------------------------------------------------------

def test_parse_mix_and_row_assignment() -> None:
    parts = parse_mix(f"fast={POL}/uniform-25.policy:0.25,stock")
    assert [(p.name, p.fraction) for p in parts] == [("fast", 0.25), ("stock", 0.75)]
    assert parts[1].path is None
    assert [p.name for p in parse_mix(f"{POL}/uniform-25.policy,{POL}/sere-50.policy")] == ["uniform-25", "sere-50"]
    assert assign_rows([0.5, 0.5], 4) == [0, 0, 1, 1]
    assert assign_rows([0.25, 0.75], 8) == [0, 0, 1, 1, 1, 1, 1, 1]
    assert assign_rows([1 / 3] * 3, 6) == [0, 0, 1, 1, 2, 2]
    assert assign_rows([0.1, 0.9], 2) == [1, 1]  # under half a row: no row of this batch
    mix = load_mix(f"fast={POL}/uniform-25.policy:0.5,stock:0.5", SPEC)
    assert mix.label == "mix(fast:0.5,stock:0.5)"
    assert [mix.policies.names[i] for i in mix.rows(4)] == ["fast", "fast", "stock", "stock"]


@pytest.mark.parametrize("text, msg", [
    ("stock:0.3", "sum to 0.3"),
    ("stock:0.5,stock:0.5", "given twice"),
    ("stock:x", "bad fraction"),
    ("stock:1.5", "must lie in"),
    ("a b=x.policy", "invalid policy name"),
    ("default=x.policy", "reserved"),
    ("stock,", "empty part"),
    ("stock:1,u=x.policy", "leave nothing"),
])
def test_bad_mix_specs(text: str, msg: str) -> None:
    with pytest.raises(MixError, match=msg):
        parse_mix(text)


# -- replay --mix --------------------------------------------------------------------------------------------

def test_replay_mix_reads_the_union_of_its_rows_experts(capsys) -> None:
    u25 = str(POL / "uniform-25.policy")
    assert main(["replay", u25, "--trace", str(TRACE), "--max-batches", "40", "--json",
                 "--mix", f"fast={u25}:0.5,stock:0.5", "--mix", "stock"]) == 0
    rep = json.loads(capsys.readouterr().out)
    cheap, mix, all_stock = rep["policies"]
    assert mix["name"] == "mix(fast:0.5,stock:0.5)" and all_stock["name"] == "mix(stock:1)"
    assert mix["mean"]["activations"] == pytest.approx((2 + 8) / 2)
    # a mixed batch reads the union: more distinct experts than its cheaper policy, at most stock's
    assert cheap["mean"]["unique"] < mix["mean"]["unique"] <= rep["stock"]["mean"]["unique"]
    assert all_stock["mean"] == pytest.approx(rep["stock"]["mean"])
    assert main(["replay", "--trace", str(TRACE), "--max-batches", "2", "--phase", "prefill", "--batch-size", "2",
                 "--mix", f"{u25}:0.5,stock:0.5"]) == 0
    assert "mix(uniform-25:0.5,stock:0.5)" in capsys.readouterr().out


@pytest.mark.parametrize("mix, msg", [
    ("stock:0.3", "sum to 0.3"),
    ("x=nope.policy", "no such policy file"),
    ("stock:0.5,stock:0.5", "given twice"),
])
def test_replay_bad_mix_is_a_clean_error(mix: str, msg: str, capsys) -> None:
    assert main(["replay", "--trace", str(TRACE), "--mix", mix]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_replay_needs_a_policy_or_a_mix(capsys) -> None:
    assert main(["replay", "--trace", str(TRACE)]) == 2
    assert "--mix" in capsys.readouterr().err


# -- the transformers adapter --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    pytest.importorskip("transformers", reason="install the hf extra: pip install -e '.[hf]'")
    from sgl_budget.engines.hf.data import load_model

    return load_model(MODEL)[0]


@pytest.fixture(scope="module")
def policy_set():
    return load_policy_set(SPEC, None, [(f, POL / f"{f}.policy") for f in ("uniform-25", "alloc-l-25", "alloc-lt-50")])


def _ids(b: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, SPEC_VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


SPEC_VOCAB = 8192


@torch.no_grad()
@pytest.mark.parametrize("name", ["uniform-25", "alloc-lt-50"])
def test_a_uniform_mix_is_apply_policy(model, policy_set, name: str) -> None:
    from sgl_budget.engines.hf import apply_policy, apply_policy_mix

    ids = _ids(3, 10)
    p = policy_set.index(name)
    with apply_policy(model, policy_set.irs[p]):
        want_prefill = model(input_ids=ids).logits
        want_decode = model(input_ids=ids[:, :1]).logits
    with apply_policy_mix(model, policy_set, [p, p, p]) as h:
        assert h.uniform == p
        assert torch.equal(model(input_ids=ids).logits, want_prefill)
        assert torch.equal(model(input_ids=ids[:, :1]).logits, want_decode)


@torch.no_grad()
def test_a_stock_row_is_the_unmodified_model(model, policy_set) -> None:
    from sgl_budget.engines.hf import apply_policy_mix

    ids = _ids(4, 24, seed=1)
    base = model(input_ids=ids).logits
    rows = [policy_set.index(n) for n in ("stock", "uniform-25", "alloc-l-25", "stock")]
    with apply_policy_mix(model, policy_set, rows) as h:
        got = model(input_ids=ids).logits
        assert h.uniform is None
    assert torch.equal(got[0], base[0]) and torch.equal(got[3], base[3])
    assert not torch.allclose(got[1], base[1]) and not torch.allclose(got[2], base[2])
    assert torch.equal(model(input_ids=ids).logits, base)  # removed


@torch.no_grad()
def test_greedy_with_a_mix_routes_each_prompt_by_its_policy(model, policy_set) -> None:
    from sgl_budget.engines.hf import apply_policy, apply_policy_mix
    from sgl_budget.engines.hf.generate import greedy

    prompts = _ids(2, 6, seed=2).tolist()
    stock = greedy(model, prompts, 4)
    u = policy_set.index("uniform-25")
    with apply_policy(model, policy_set.irs[u]):
        fast = greedy(model, prompts, 4)
    with apply_policy_mix(model, policy_set, [u, u]) as h:
        assert greedy(model, prompts, 4) == fast
        h.set_rows([0, u])  # row 0 stock, row 1 uniform-25 (per-token: its row as alone)
        assert greedy(model, prompts, 4) == [stock[0], fast[1]]
        h.set_rows([0, u, u])
        with pytest.raises(ValueError, match="one policy per sequence"):
            greedy(model, prompts, 1)
        with pytest.raises(ValueError, match="must lie in"):
            h.set_rows([0, 7])


def test_eval_mix_reports_the_mix_and_each_policy_on_its_rows(model, capsys) -> None:
    u25 = str(POL / "uniform-25.policy")
    args = ["eval", "--model", str(MODEL), "--text", str(TEXT), "--windows", "3", "--seq-len", "8",
            "--batch-size", "2", "--threads", "1"]
    assert main([*args, "--json", "--mix", f"fast={u25}:0.5,stock:0.5"]) == 0
    full, mix, fast, stock = json.loads(capsys.readouterr().out)
    assert mix["name"] == "mix(fast:0.5,stock:0.5)" and mix["mix"] is None
    assert (fast["name"], fast["mix"], stock["name"], stock["mix"]) == ("fast", mix["name"], "stock", mix["name"])
    # batches of 2 rows: [fast, stock], then [stock] (row b -> cumulative share above (b + 0.5) / B)
    assert fast["tokens"] == 7 and stock["tokens"] == 14 and mix["tokens"] == full["tokens"] == 21
    assert fast["activations_per_token"] == 2.0 and stock["activations_per_token"] == 8.0
    assert mix["activations_per_token"] == pytest.approx((2 + 8 + 8) / 3)
    assert stock["kl_to_full"] == pytest.approx(0.0, abs=1e-3) and fast["kl_to_full"] > 0.01
    assert fast["unique_per_batch"] <= mix["unique_per_batch"]
    assert main([*args, "--mix", f"fast={u25}:0.5,stock:0.5"]) == 0
    out = capsys.readouterr().out
    assert "mix(fast:0.5,stock:0.5)" in out and "↳ fast (its rows)" in out


@pytest.mark.parametrize("mix, msg", [("stock:0.5", "sum to 0.5"), ("x=missing.policy", "no such policy file")])
def test_eval_bad_mix_is_a_clean_error(model, mix: str, msg: str, capsys) -> None:
    assert main(["eval", "--model", str(MODEL), "--text", str(TEXT), "--windows", "1", "--seq-len", "4",
                 "--mix", mix]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
