"""Named policy sets (what a server offers per request) and the SGLang-side request plumbing that needs no server."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sgl_budget.errors import PolicyError
from sgl_budget.lang.policy_set import STOCK, PolicySet, UnknownPolicy, load_policy_set, name_problem, parse_named
from sgl_budget.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
BROWN = ROOT / "policies" / "brown-moe"
SPEC = load_spec(str(ROOT / "models" / "brown-moe" / "config.json"))


def _set(default=BROWN / "uniform-50.policy", **named) -> PolicySet:
    return load_policy_set(SPEC, default, list(named.items()))


def test_names_ids_and_default() -> None:
    ps = _set(fast=BROWN / "uniform-25.policy", lt=BROWN / "alloc-lt-50.policy")
    assert ps.names == ("default", "stock", "fast", "lt") and ps.default == 0
    assert ps.request_names == ("default", "stock", "fast", "lt")
    assert ps.index(None) == ps.index("default") == 0 and ps.index("lt") == 3
    assert ps.irs[1].is_stock and not ps.irs[2].is_stock and ps.irs[2].name == "uniform-25"
    with pytest.raises(UnknownPolicy, match="unknown MoE policy 'slow': this server serves default, stock, fast, lt"):
        ps.index("slow")
    with pytest.raises(UnknownPolicy):
        ps.index(3)  # type: ignore[arg-type]
    for sent in ("x" * 100_000, list(range(10_000))):  # a client may send anything: the message stays short
        with pytest.raises(UnknownPolicy) as e:
            ps.index(sent)  # type: ignore[arg-type]
        assert len(str(e.value)) < 250 and "this server serves default, stock, fast, lt" in str(e.value)
    no_default = load_policy_set(SPEC, None, [("fast", BROWN / "uniform-25.policy")])
    assert no_default.names == ("stock", "fast") and no_default.default_name == STOCK
    assert no_default.request_names == ("default", "stock", "fast")


def test_every_problem_is_reported_at_once(tmp_path) -> None:
    bad = tmp_path / "bad.policy"
    bad.write_text('policy "bad" {\n  budget 50%\n  tokens { reallocate by score; min_k 3; max_k 2 }\n}\n')
    named = [("stock", BROWN / "uniform-25.policy"), ("fast", BROWN / "uniform-25.policy"),
             ("fast", BROWN / "alloc-l-50.policy"), ("two words", BROWN / "uniform-25.policy"),
             ("worse", bad), parse_named("nopath"), ("missing", tmp_path / "missing.policy")]
    with pytest.raises(PolicyError) as e:
        load_policy_set(SPEC, BROWN / "uniform-50.policy", named)
    text = e.value.format()
    for want in ("the policy name 'stock' is reserved", "the policy name 'fast' is given twice",
                 "invalid policy name 'two words'", f"{bad}:3:", "min_k 3 is above max_k 2",
                 "expected NAME=PATH, got 'nopath'", "no such policy file", "aborting due to 6 errors"):
        assert want in text, (want, text)
    assert "^" in text  # the bad policy's error points into its source


@pytest.mark.parametrize("name,ok", [("fast", True), ("v2.fast-mode_1", True), ("_x", True), ("", False),
                                     ("1fast", False), ("a b", False), ("x" * 65, False), ("default", False),
                                     ("fäst", False), ("a=b", False)])
def test_name_rules(name, ok) -> None:
    assert (name_problem(name) is None) == ok


def test_parse_named() -> None:
    assert parse_named("fast=policies/a=b.policy") == ("fast", "policies/a=b.policy")
    assert parse_named(" fast = x.policy ") == ("fast", "x.policy")
    assert parse_named("fast=") == ("fast=", "")


def test_request_check_and_cache_scope(monkeypatch) -> None:
    pytest.importorskip("sglang")
    from sgl_budget.engines.sglang.requests import ENV_PER_REQUEST_OFF, cache_key, check_request

    names = ("default", "stock", "fast")
    for ok in (None, {}, {"moe_policy": "fast"}, {"moe_policy": None}, {"other": 1}, "not a dict"):
        check_request(ok, names)
    for bad in ({"moe_policy": "slow"}, {"moe_policy": 3}, {"moe_policy": ""}):
        with pytest.raises(ValueError, match="this server serves default, stock, fast"):
            check_request(bad, names)
    monkeypatch.setenv(ENV_PER_REQUEST_OFF, "speculative decoding")
    check_request({"moe_policy": "default"}, names)
    with pytest.raises(ValueError, match="cannot be chosen per request in this launch: speculative decoding"):
        check_request({"moe_policy": "stock"}, names)

    ps = _set(fast=BROWN / "uniform-25.policy")
    assert cache_key(None, None, ps) is None and cache_key("lora1", {"moe_policy": "default"}, ps) == "lora1"
    fast, stock = cache_key(None, {"moe_policy": "fast"}, ps), cache_key(None, {"moe_policy": "stock"}, ps)
    assert fast and stock and fast != stock and cache_key("lora1", {"moe_policy": "fast"}, ps).startswith("lora1")


def test_row_buffer_fill_and_uniform_hint() -> None:
    pytest.importorskip("sglang")
    from sgl_budget.engines.sglang.requests import CAPACITY, RowPolicies, token_ids

    rows = RowPolicies(default=0)
    info = rows.fill(token_ids([2, 1, 2], [3, 1, 2]), torch.device("cpu"))
    assert info.uniform is None and info.num_rows == 6
    assert rows.rows(6, torch.device("cpu"), info).tolist() == [2, 2, 2, 1, 2, 2]
    buf = rows.buf
    info = rows.fill([1] * 4, torch.device("cpu"))
    assert info.uniform == 1 and rows.buf is buf  # one buffer for the process: captured graphs keep reading it
    assert rows.rows(8, torch.device("cpu"), info)[:4].tolist() == [1] * 4  # padded rows keep stale ids (masked)
    big = rows.fill([0, 2] * CAPACITY, torch.device("cpu"))
    assert rows.buf is buf and rows.rows(2 * CAPACITY, torch.device("cpu"), big)[:4].tolist() == [0, 2, 0, 2]
    assert rows.fill([], torch.device("cpu")).uniform == 0


def test_stats_count_requests_tokens_and_experts(caplog) -> None:
    pytest.importorskip("sglang")
    from sgl_budget.engines.sglang.stats import PolicyStats
    from sgl_budget.routing import routed_per_policy

    ps = _set(fast=BROWN / "uniform-25.policy")
    st = PolicyStats(ps, interval=3600, report=False)
    st.add_routed(torch.tensor([99, 0, 0]), torch.tensor([9, 0, 0]))  # a warm-up forward before the first batch

    class R:  # a request as SGLang's scheduler holds it (only the marker attribute is used)
        pass

    a, b = R(), R()
    st.on_batch([2, 1], [False, False], [5, 3], [a, b])  # prefill of a (fast, 5 tokens) and b (stock, 3)
    st.on_batch([2, 1], [True, True], [1, 1], [a, b])  # a decode step
    st.on_batch([2], [False], [2], [a])  # a later chunk of a's prefill: not a new request
    rows = torch.tensor([2] * 5 + [1] * 3)
    for _ in range(8):  # 8 MoE layers: fast rows route 2 experts, stock rows 8 (one padded row excluded)
        per_row = torch.where(rows == 2, 2, 8)
        st.add_routed(*routed_per_policy(per_row, rows, 3, torch.arange(8) < 7))
    st.add_stock(1, 1, 8)
    st.add_uniform(2, torch.tensor(4), 2)  # a batch of 2 fast rows, 2 experts each
    with caplog.at_level("INFO", logger="sgl_budget"):
        st.report_now()
    snap = st.snapshot()
    assert snap["fast"] == {"requests": 1, "prompt_tokens": 7, "generation_tokens": 1, "experts_per_token": 2.0}
    assert snap["stock"]["requests"] == 1 and snap["stock"]["experts_per_token"] == 8.0
    assert snap["default"]["experts_per_token"] is None  # the warm-up forward does not count
    assert st.token_layers == [0, 2 * 8 + 1, 5 * 8 + 2]
    assert "fast: 1 requests, 8 tokens (prompt 7, generated 1), 2.000 experts/token" in caplog.text
