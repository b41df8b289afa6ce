"""Calibration through a running server (``--moe-calibration``): the engine's numbers equal the transformers path's.

One stock SGLang server (the launcher as a user starts it, CPU, fp32) serves the embedded model with every
bundled kind of brown-moe policy by name. On the same held-out windows:

* ``eval --server`` (decode: lock-step groups routed as decode steps by the plugin; and prefill) gives the
  transformers ``eval``'s perplexity within 0.1% relative, the same experts per token and distinct experts per
  batch, and a KL that is a lower bound of the transformers' full KL;
* ``profile --server`` gives a sensitivity profile whose Alloc-L plan (DP) picks the same k per layer at
  25/50/75% as the transformers profile's;
* calibration requests are checked: policy text with errors or naming a file the launch did not load is a 400
  with the diagnostics; a group the scheduler cannot run as one batch is reported, never silently mis-routed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

if os.environ.get("SGL_BUDGET_REQUIRE_SGLANG"):
    import sglang  # noqa: F401
    import transformers  # noqa: F401
pytest.importorskip("sglang", reason="install the sglang extra: pip install -e '.[sglang]'")
pytest.importorskip("transformers", reason="install the hf extra")

import torch  # noqa: E402

from sgl_budget.alloc import allocate_dp  # noqa: E402
from sgl_budget.cli import bundled_dir, default_model_dir, main  # noqa: E402
from sgl_budget.engines.hf import spec_of  # noqa: E402
from sgl_budget.engines.hf.data import load_model  # noqa: E402
from sgl_budget.engines.hf.evaluate import evaluate  # noqa: E402
from sgl_budget.engines.hf.profile import profile_layers  # noqa: E402
from sgl_budget.engines.sglang.calibrate import Target, evaluate_server, profile_server  # noqa: E402
from sgl_budget.engines.sglang.client import ServerClient, ServerError  # noqa: E402
from sgl_budget.engines.sglang.server import HTTPError, Server  # noqa: E402
from sgl_budget.engines.sglang.server_similarity import similarity_server  # noqa: E402
from sgl_budget.lang import load_policy  # noqa: E402
from sgl_budget.text import read_text, token_windows  # noqa: E402
from conftest import CALIBRATION_POLICIES  # noqa: E402

MODEL = default_model_dir()
BROWN = bundled_dir() / "brown-moe"
DATA = MODEL.parent.parent / "data" / "brown"
KINDS = CALIBRATION_POLICIES  # every bundled kind
SERVER_ENV = {"TRITON_INTERPRET": None}


@pytest.fixture(scope="module")
def hf():
    torch.set_num_threads(1)
    return load_model(MODEL)


@pytest.fixture(scope="module")
def server(calibration_server):
    return calibration_server  # conftest: --moe-calibration and every KINDS policy by name


@pytest.fixture(scope="module")
def windows(hf):
    return token_windows(hf[1], read_text(DATA / "test.txt.xz"), 48, 8)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_eval_equals_transformers(server, hf, windows, mode) -> None:
    model, _ = hf
    spec = spec_of(model)
    got = evaluate_server(ServerClient(server.url), [Target(k, served=k) for k in KINDS], windows, batch_size=4,
                          mode=mode, top_n=20)
    want = evaluate(model, [load_policy(BROWN / f"{k}.policy", spec) for k in KINDS], windows, batch_size=4,
                    mode=mode)
    assert [r.name for r in got] == ["stock", *KINDS]
    for g, w in zip(got, want):
        assert abs(g.perplexity / w.perplexity - 1) < 1e-3, (g.name, g.perplexity, w.perplexity)
        assert g.activations_per_token == pytest.approx(w.activations_per_token, abs=1e-9), g.name
        assert g.unique_per_batch == pytest.approx(w.unique_per_batch, abs=1e-9), g.name
        assert abs(g.agreement - w.agreement) < 0.02, (g.name, g.agreement, w.agreement)
        assert g.kl_to_full <= w.kl_to_full * (1 + 1e-3) + 1e-6, (g.name, g.kl_to_full, w.kl_to_full)  # a bound
        assert g.kl_to_full >= 0.5 * w.kl_to_full, (g.name, g.kl_to_full, w.kl_to_full)
        assert g.phase.startswith(mode) and g.kl_note and "lower bound" in g.kl_note
    assert got[1].kl_to_full > 0 and got[1].perplexity > got[0].perplexity  # the policies really route


def test_profile_picks_the_same_plan_as_transformers(server, hf) -> None:
    model, tok = hf
    spec = spec_of(model)
    calib = token_windows(tok, read_text(DATA / "calib.txt.xz"), 64, 8)
    got = profile_server(ServerClient(server.url), spec, calib, batch_size=8, top_n=20)
    want = profile_layers(model, spec, calib, batch_size=8)
    for layer in spec.moe_layers:
        for k in range(1, spec.top_k):
            ratio = got.loss[layer][k] / want.loss[layer][k]
            assert 0.5 < ratio <= 1 + 1e-3, (layer, k, ratio)  # the top-N KL bounds the full KL from below
    for pct in (25, 50, 75):
        total = pct * spec.top_k * spec.num_moe_layers // 100
        assert dict(allocate_dp(got.loss, total).k) == dict(allocate_dp(want.loss, total).k), pct


def test_eval_cli_json(server, tmp_path, capsys) -> None:
    code = main(["eval", "--server", server.url, "--text", str(DATA / "test.txt.xz"), "--windows", "4",
                 "--seq-len", "32", "--batch-size", "4", "--policies", "uniform-50", "--json",
                 str(BROWN / "alloc-l-25.policy")])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [r["name"] for r in out] == ["stock", "uniform-50", "alloc-l-25"]
    assert all(r["phase"].startswith("decode") for r in out)
    assert out[2]["activations_per_token"] == pytest.approx(2.0)  # policy text sent by the client: 25% of 8


def test_profile_cli_writes_a_profile_allocate_reads(server, tmp_path, capsys) -> None:
    out = tmp_path / "server.sens.yaml"
    assert main(["profile", "--server", server.url, "--calib", str(DATA / "calib.txt.xz"), "--windows", "2",
                 "--seq-len", "32", "--batch-size", "2", "--logprobs", "8", "--out", str(out)]) == 0
    plan = tmp_path / "plan.policy"
    assert main(["allocate", "--profile", str(out), "--budget", "50%", "--out", str(plan)]) == 0
    assert main(["check", str(plan), "--model-spec", str(MODEL)]) == 0
    assert "measured by the SGLang server" in out.read_text()


def test_request_policy_errors_are_400_with_diagnostics(server) -> None:
    cal = {"policy": 'policy "p" { layers { layer 3: k = 20 } }\n'}
    with pytest.raises(HTTPError) as e:
        server.generate([5, 6, 7], 1, custom_params={"moe_calibration": cal})
    assert e.value.status == 400 and "<request>:1:" in e.value.body and "out of range" in e.value.body
    cal = {"policy": 'policy "p" {\n  budget 50%\n  reroute { similarity "/etc/hostname"; primary top 1 }\n}\n'}
    with pytest.raises(HTTPError) as e:
        server.generate([5, 6, 7], 1, custom_params={"moe_calibration": cal})
    assert e.value.status == 400 and "not a file this server loaded at launch" in e.value.body
    with pytest.raises(HTTPError) as e:
        server.generate([5, 6, 7], 1, custom_params={"moe_calibration": {"bogus": 1}})
    assert e.value.status == 400 and "unknown key" in e.value.body


def test_a_split_group_is_reported_not_misrouted(server) -> None:
    client = ServerClient(server.url)
    payload = {"input_ids": [[5, 6, 7, 8]] * 2, "return_logprob": True, "logprob_start_len": 0,
               "sampling_params": {"max_new_tokens": 1, "custom_params": {"moe_calibration": {
                   "group": {"id": "short", "rows": 3, "lockstep": True}, "report": True}}}}
    replies = client.post("/generate", payload)
    reports = [r["meta_info"]["sgl_budget"][0] for r in replies]
    assert all("2 of the group's 3 requests" in r["error"] and not r["lockstep"] for r in reports)


def test_unusable_servers_are_clear_errors(server, tmp_path, capsys) -> None:
    text = str(DATA / "test.txt.xz")
    assert main(["eval", "--server", "http://127.0.0.1:9", "--text", text]) == 2
    assert "cannot reach the server" in capsys.readouterr().err
    other = tmp_path / "other.policy"  # written for a bigger model: refused against the served one
    other.write_text('policy "other" { layers { layer 20: k = 2 } }\n')
    assert main(["eval", "--server", server.url, "--text", text, str(other)]) == 2
    assert "layer 20" in capsys.readouterr().err
    with pytest.raises(ServerError, match="--moe-calibration"):
        _no_calibration_listing(server.url)


def _no_calibration_listing(url: str) -> None:
    """A client that reads a listing without calibration (what an older or plain-policy launch answers)."""
    client = ServerClient(url)
    client._listing = {**client.listing(), "calibration": {"enabled": False}}
    client.require_calibration()


def test_tune_writes_a_policy_that_meets_its_bound(server, hf, tmp_path, capsys) -> None:
    """tune through the server, then the written policy evaluated independently (transformers) meets the bound."""
    model, tok = hf
    out = tmp_path / "tuned.policy"
    profile = BROWN / "profiles" / "brown-moe.sens.yaml"  # measured on this model (profiling: the test above)
    args = ["tune", "--server", server.url, "--profile", str(profile), "--text", str(DATA / "test.txt.xz"),
            "--windows", "8", "--seq-len", "32", "--batch-size", "4", "--logprobs", "8", "--budgets", "25,50",
            "--max-ppl-rise", "5%", "--out", str(out), "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["chosen"] and report["chosen"] in report["pareto"]
    assert {c["method"] for c in report["candidates"]} >= {"uniform", "alloc-l", "alloc-lt", "alloc-l-piggyback",
                                                           "alloc-lt-sere"}
    text = out.read_text()
    assert text.startswith("# Chosen by sgl-budget tune") and "--moe-policy" in text
    assert main(["check", str(out), "--model-spec", str(MODEL)]) == 0
    spec = spec_of(model)
    windows = token_windows(tok, read_text(DATA / "test.txt.xz"), 32, 8)
    stock, tuned = evaluate(model, [load_policy(out, spec)], windows, batch_size=4, mode="decode")
    assert tuned.perplexity / stock.perplexity - 1 <= 0.05 + 1e-3, (tuned.perplexity, stock.perplexity)
    assert tuned.activations_per_token < stock.activations_per_token


def test_tensor_parallel_2_gives_the_same_numbers(server, hf) -> None:
    """--tp 2 on CPU (gloo): each rank routes the same groups; eval (decode), the profile and the similarity file
    (every expert run on its rank's weight shard, partial outputs reduced across the ranks) equal --tp 1's."""
    _, tok = hf
    windows = token_windows(tok, read_text(DATA / "test.txt.xz"), 32, 4)
    calib = token_windows(tok, read_text(DATA / "calib.txt.xz"), 32, 4)
    spec = spec_of(hf[0])
    targets = [Target(k, served=k) for k in ("alloc-lt-50", "sere-50")]
    one = ServerClient(server.url)
    named = [a for k in ("alloc-lt-50", "sere-50") for a in ("--moe-named-policy", f"{k}={BROWN / f'{k}.policy'}")]
    with Server(MODEL, extra_args=["--tp", "2", *named, "--moe-calibration"], env=SERVER_ENV) as s2:
        two = ServerClient(s2.url)
        got = evaluate_server(two, targets, windows, batch_size=4, mode="decode", top_n=8)
        prof2 = profile_server(two, spec, calib, batch_size=4, top_n=8)
        sim2 = similarity_server(two, spec, calib, tokens=96, batch_size=4)  # expert shards reduced across ranks
    want = evaluate_server(one, targets, windows, batch_size=4, mode="decode", top_n=8)
    prof1 = profile_server(one, spec, calib, batch_size=4, top_n=8)
    sim1 = similarity_server(one, spec, calib, tokens=96, batch_size=4)
    for layer, m in sim1.matrices.items():
        assert float((sim2.matrices[layer] - m).abs().max()) < 1e-4, layer
        assert torch.equal(sim2.critical[layer], sim1.critical[layer]), layer
    for g, w in zip(got, want):
        assert g.perplexity == pytest.approx(w.perplexity, rel=1e-4), g.name
        assert (g.activations_per_token, g.unique_per_batch) == (w.activations_per_token, w.unique_per_batch)
        assert g.kl_to_full == pytest.approx(w.kl_to_full, rel=1e-2, abs=1e-5), g.name
    for layer in spec.moe_layers:
        for k in range(1, spec.top_k):
            assert prof2.loss[layer][k] == pytest.approx(prof1.loss[layer][k], rel=1e-2, abs=1e-6), (layer, k)
    for pct in (25, 50, 75):
        total = pct * spec.top_k * spec.num_moe_layers // 100
        assert dict(allocate_dp(prof2.loss, total).k) == dict(allocate_dp(prof1.loss, total).k), pct
