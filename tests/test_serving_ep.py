"""Expert parallelism on CPU: ``--tp 2 --ep-size 2``, the stock launcher, per-request policies.

Under EP SGLang's ``StandardDispatcher`` maps the router's global expert ids to the rank's local ones
(this rank's experts ``0..E/N-1``, every other expert -1; a -1 stays -1), each rank computes its own
experts and the model all-reduces the partial sums. The CPU engine's MoE (``moe_forward_native``)
cannot take -1, so stock SGLang 0.5.23 failed ("index -1 is out of bounds for dimension 1 with
size 64"), and so did sgl_budget's skip-padding hook for a rank with no local (token, expert) pair
("cannot reshape tensor of 0 elements"). sgl_budget's hook (:mod:`sgl_budget.engines.sglang.native_moe`)
is registered in every CPU-mode worker and handles both.

One server, launched as a user does (``--moe-policy uniform-50 --moe-named-policy alloc-t=...``);
greedy fp32 tokens are compared with transformers: stock requests (no policy rows: the stock EP path)
== the plain model, default == the adapter with uniform-50, a lock-step batch of 4 with Alloc-T == the
adapter decoding the same 4 rows as a batch.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

if os.environ.get("SGL_BUDGET_REQUIRE_SGLANG"):
    import sglang  # noqa: F401
pytest.importorskip("sglang", reason="install the sglang extra: pip install -e '.[sglang]'")
pytest.importorskip("transformers", reason="install the hf extra")

import torch  # noqa: E402

from test_serving import BROWN, MODEL, NEW, SERVER_ENV, _ids, _reference, hf  # noqa: E402,F401

from sgl_budget.engines.sglang.server import Server  # noqa: E402

DEFAULT = BROWN / "uniform-50.policy"
ALLOC_T = BROWN / "alloc-lt-50.policy"
# Distinct first words (none shared with each other, nor with SGLang's warm-up "The capital city ..."), so
# the radix cache never serves part of a prompt: every prefill computes what the reference computes.
STOCK = ["Two of the men who had", "Once upon a time there was"]
DEFAULT_ALONE = ["Only a few of the members", "Even though the weather was"]
LOCKSTEP = ["Between the two world wars", "Almost all of the new", "Like many other young men", "Then the old woman "
            "turned"]
STOCK_LOCKSTEP = ["Perhaps the most important thing", "Neither of the two candidates", "Instead of going to the",
                  "Without any doubt the best"]


# -- the hook under EP, without a server --------------------------------------------------------------

def _layer(e: int, hdim: int = 8, inter: int = 8, seed: int = 5):
    from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig

    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(w13_weight=torch.randn(e, 2 * inter, hdim, generator=g) * 0.2,
                           w2_weight=torch.randn(e, hdim, inter, generator=g) * 0.2, num_experts=e,
                           moe_runner_config=MoeRunnerConfig(activation="silu"))


def _rank_view(layer, rank: int, ranks: int):
    """What rank ``rank`` of ``ranks`` holds under EP: its slice of the experts (SGLang keeps ``num_experts``
    global), and SGLang's global -> local id map (as ``StandardDispatcher.dispatch`` builds it)."""
    e = layer.num_experts
    n = e // ranks
    local = SimpleNamespace(w13_weight=layer.w13_weight[rank * n:(rank + 1) * n],
                            w2_weight=layer.w2_weight[rank * n:(rank + 1) * n], num_experts=e,
                            moe_runner_config=layer.moe_runner_config)
    mapping = torch.full((e,), -1, dtype=torch.int32)
    mapping[rank * n:(rank + 1) * n] = torch.arange(n, dtype=torch.int32)
    return local, mapping


def test_native_moe_under_expert_parallelism() -> None:
    """Sum over the ranks of the hook's output on each rank's local ids == the unsplit layer's output, for stock
    top-k and for policy routing padded with -1; a rank with no local pair gives exact zeros; SGLang's own
    function alone fails on the ids its dispatcher hands it (the stock crash this hook fixes)."""
    from sglang.srt.layers.moe.fused_moe_native import moe_forward_native
    from sglang.srt.layers.moe.token_dispatcher.standard import _map_topk_ids_to_local_experts
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    from sgl_budget.engines.sglang.native_moe import moe_forward_skip_padding

    e, tokens, k = 8, 6, 4
    layer = _layer(e)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, 8, generator=g)
    logits = torch.randn(tokens, e, generator=g)
    w, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    padded_ids = ids.clone().int()
    padded_ids[::2, 2:] = -1  # a policy keeping 2 of 4 on even tokens (padded slots: -1, weight 0)
    padded_w = w.masked_fill(padded_ids < 0, 0.0)
    for topk_w, topk_ids in ((w, ids.int()), (padded_w, padded_ids)):
        want = moe_forward_skip_padding(moe_forward_native, layer, x, StandardTopKOutput(topk_w, topk_ids, logits),
                                        layer.moe_runner_config)
        parts = []
        for rank in range(2):
            local, mapping = _rank_view(layer, rank, 2)
            local_ids = _map_topk_ids_to_local_experts(topk_ids, mapping)
            out = StandardTopKOutput(topk_w, local_ids, logits)
            assert (local_ids == -1).any()
            with pytest.raises((RuntimeError, IndexError)):
                moe_forward_native(local, x, out, local.moe_runner_config)  # SGLang 0.5.23 alone
            parts.append(moe_forward_skip_padding(moe_forward_native, local, x, out, local.moe_runner_config))
        assert torch.allclose(parts[0] + parts[1], want, atol=1e-6, rtol=1e-5)
    # a batch whose every pair lives on rank 0: rank 1 computes nothing and contributes exact zeros
    only0 = torch.tensor([[0, 1, 2, 3], [3, 2, -1, -1]], dtype=torch.int32)
    local, mapping = _rank_view(layer, 1, 2)
    local_ids = _map_topk_ids_to_local_experts(only0, mapping)
    assert (local_ids == -1).all()
    got = moe_forward_skip_padding(moe_forward_native, local, x[:2],
                                   StandardTopKOutput(w[:2], local_ids, logits[:2]), local.moe_runner_config)
    assert got.shape == (2, 8) and got.dtype == x.dtype and not got.any()
    # no tokens at all (an idle forward)
    empty = StandardTopKOutput(w[:0], ids[:0].int(), logits[:0])
    assert moe_forward_skip_padding(moe_forward_native, layer, x[:0], empty, layer.moe_runner_config).shape == (0, 8)


# -- the server -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    extra = ["--tp", "2", "--ep-size", "2", "--moe-named-policy", f"alloc-t={ALLOC_T}"]
    s = Server(MODEL, policy=DEFAULT, extra_args=extra, env=SERVER_ENV)
    s.start()
    yield s
    s.stop()
    log = s.log()
    assert "TP1 EP1" in log, "the server did not run two expert-parallel ranks"
    errors = [l for l in log.splitlines() if "Traceback" in l or " ERROR " in l]
    assert not errors, f"the server logged errors:\n{s.log_tail(80)}"


def _generate(server, prompts, policy: str | None):
    sp = {"max_new_tokens": NEW, "temperature": 0.0, "ignore_eos": True}
    if policy is not None:
        sp["custom_params"] = {"moe_policy": policy}
    return server.post("/generate", {"input_ids": prompts, "sampling_params": sp})


def test_stock_requests_equal_transformers(server, hf) -> None:
    """Rows without a policy: SGLang's own routing and MoE path under EP (which crashed in stock SGLang on CPU)."""
    _, tok = hf
    for text in STOCK:
        ids = _ids(tok, text)
        assert _generate(server, ids, "stock")["output_ids"] == _reference(hf, None, [ids])[0], text


def test_stock_lockstep_batch_equals_transformers(server, hf) -> None:
    _, tok = hf
    prompts = [_ids(tok, t)[:5] for t in STOCK_LOCKSTEP]
    assert all(len(p) == 5 for p in prompts)
    got = _generate(server, prompts, "stock")
    assert [g["output_ids"] for g in got] == _reference(hf, None, prompts)


def test_default_policy_equals_the_adapter(server, hf) -> None:
    _, tok = hf
    for text in DEFAULT_ALONE:
        ids = _ids(tok, text)
        assert _generate(server, ids, None)["output_ids"] == _reference(hf, DEFAULT, [ids])[0], text


def test_lockstep_batch_alloc_t_equals_the_adapter(server, hf) -> None:
    """Alloc-T's batch-wide slot pool under EP: both ranks route the same batch identically from their (equal)
    router logits, each computes its own experts' share."""
    _, tok = hf
    prompts = [_ids(tok, t)[:5] for t in LOCKSTEP]
    assert all(len(p) == 5 for p in prompts)
    n_prefill = server.log().count("Prefill batch, #new-seq: 4,")
    got = _generate(server, prompts, "alloc-t")
    assert server.log().count("Prefill batch, #new-seq: 4,") == n_prefill + 1, \
        "the 4 requests were not prefilled together"
    assert [g["output_ids"] for g in got] == _reference(hf, ALLOC_T, prompts)
