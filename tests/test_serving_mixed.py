"""End to end: one SGLang server (stock launcher, CPU) serving several named policies; each request picks one.

The server runs ``--moe-policy uniform-50`` (the default) plus named ``fast`` (uniform-25), ``alloc``
(Alloc-L 50%), ``lt`` (Alloc-T 50%) and ``mix4`` (Alloc-L + SERE in decode batches of 4 or more);
``stock`` is always there. Greedy fp32 outputs are compared token for token with the transformers
adapter: a request alone = the adapter with that policy alone; a lock-step batch mixing policies =
the adapter decoding the same rows with the same row -> policy map (so the mixed-batch semantics —
batch-level rules within the rows of one policy, ``when batch`` seeing the whole batch — are checked
exactly, not only "some output came back").
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import subprocess
import time
import urllib.request

import pytest

if os.environ.get("SGL_BUDGET_REQUIRE_SGLANG"):
    import sglang  # noqa: F401
pytest.importorskip("sglang", reason="install the sglang extra: pip install -e '.[sglang]'")
pytest.importorskip("transformers", reason="install the hf extra")

from test_serving import BROWN, HERE, MODEL, NEW, SERVER_ENV, _ids, _reference, hf  # noqa: E402,F401

from sgl_budget.engines.hf.adapter import apply_policy_mix, spec_of  # noqa: E402
from sgl_budget.engines.hf.generate import greedy  # noqa: E402
from sgl_budget.engines.sglang.server import HTTPError, Server  # noqa: E402
from sgl_budget.lang.policy_set import load_policy_set  # noqa: E402

DEFAULT = BROWN / "uniform-50.policy"
NAMED = {"fast": BROWN / "uniform-25.policy", "alloc": BROWN / "alloc-l-50.policy",
         "lt": BROWN / "alloc-lt-50.policy", "mix4": HERE / "policies" / "brown-moe-mix.policy",
         "topp": BROWN / "top-p-50.policy"}
FILE = {"default": DEFAULT, "stock": None, **NAMED}
INTERVAL = 1.0  # seconds between statistics reports
PROMPTS = ["Early in the spring the farmers", "Several of the students who", "Nobody in the village had ever",
           "Before the meeting the mayor", "Every evening the old man", "Across the river there was a",
           "Many of the workers in the", "Last week the board of"]

TOPP = ["Once upon a time the king", "Down by the old mill", "Beyond the hills lay a", "Then the doctor said that"]
LOCKSTEP = ["Within a few days the police", "Toward the end of the year", "Under the new rules the company",
            "Because of the heavy rain the"]


@pytest.fixture(scope="module")
def server():
    extra = [a for name, path in NAMED.items() for a in ("--moe-named-policy", f"{name}={path}")]
    extra += ["--moe-policy-log-interval", str(INTERVAL), "--enable-metrics"]
    s = Server(MODEL, policy=DEFAULT, extra_args=extra, env=SERVER_ENV)
    s.start()
    yield s
    s.stop()
    errors = [l for l in s.log().splitlines() if "Traceback" in l or " ERROR " in l]
    assert not errors, f"the server logged errors:\n{s.log_tail(80)}"


def _ask(server, ids: list[int], policy: str | None, new: int = NEW) -> list[int]:
    sp = {"max_new_tokens": new, "temperature": 0.0, "ignore_eos": True}
    if policy is not None:
        sp["custom_params"] = {"moe_policy": policy}
    return server.post("/generate", {"input_ids": ids, "sampling_params": sp})["output_ids"]


def _reference_mix(hf, names: list[str], prompts: list[list[int]]) -> list[list[int]]:
    """The adapter decoding ``prompts`` as one batch, row i routed by policy ``names[i]``."""
    model, _ = hf
    pset = load_policy_set(spec_of(model), DEFAULT, list(NAMED.items()))
    with apply_policy_mix(model, pset, [pset.index(n) for n in names]):
        return greedy(model, prompts, NEW)


def test_concurrent_requests_each_get_their_policy(server, hf) -> None:
    """Per-token policies: every request's tokens = the adapter's with that policy alone, whatever it was batched
    with (8 concurrent clients, 4 policies, batches formed by timing)."""
    _, tok = hf
    names = ["fast", "stock", None, "alloc", "topp", "fast", "default", "topp"]
    prompts = [_ids(tok, t) for t in PROMPTS]
    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        got = list(ex.map(lambda a: _ask(server, *a), zip(prompts, names)))
    for p, n, g in zip(prompts, names, got):
        assert g == _reference(hf, FILE[n or "default"], [p])[0], n


@pytest.mark.parametrize("names", [["stock", "fast", "default", "stock"], ["lt", "stock", "lt", "fast"],
                                   ["mix4", "stock", "mix4", "alloc"], ["topp", "lt", "topp", "stock"]])
def test_lockstep_mixed_batch_equals_the_adapter_mix(server, hf, names) -> None:
    """One /generate call with 4 rows of different policies, prefilled and decoded together: the output equals
    the adapter's mixed batch (Alloc-T's pool and SERE's primaries within each policy's rows; ``batch >= 4`` sees
    the whole batch), and a ``stock`` row gets exactly the model's own output."""
    _, tok = hf
    # fresh prompts for the batch-level policies: a cached prefix would not be prefilled in this batch
    texts = {"stock": PROMPTS[:4], "lt": PROMPTS[4:], "mix4": LOCKSTEP, "topp": TOPP}[names[0]]
    prompts = [_ids(tok, t)[:5] for t in texts]
    assert all(len(p) == 5 for p in prompts)
    n_prefill = server.log().count("Prefill batch, #new-seq: 4,")
    params = [{"max_new_tokens": NEW, "temperature": 0.0, "ignore_eos": True,
               "custom_params": {"moe_policy": n}} for n in names]
    got = [g["output_ids"] for g in server.post("/generate", {"input_ids": prompts, "sampling_params": params})]
    assert server.log().count("Prefill batch, #new-seq: 4,") == n_prefill + 1, "the 4 requests were not batched"
    assert got == _reference_mix(hf, names, prompts), names
    for p, n, g in zip(prompts, names, got):
        if n in ("stock", "fast", "alloc", "default", "topp"):  # per-token policies: as if alone
            assert g == _reference(hf, FILE[n], [p])[0], n
    if names[0] == "mix4":  # SERE ran: the mix4 rows differ from mix4 alone (batch 1 < 4)
        assert any(g != _reference(hf, FILE["mix4"], [p])[0] for p, n, g in zip(prompts, names, got) if n == "mix4")


def test_unknown_policy_is_a_client_error_and_the_server_keeps_serving(server, hf) -> None:
    import openai

    _, tok = hf
    ids = _ids(tok, PROMPTS[0])
    for bad in ("nope", 3, ""):
        with pytest.raises(HTTPError) as e:
            _ask(server, ids, bad)
        assert "HTTP 400" in str(e.value) and "default, stock, fast, alloc, lt, mix4" in str(e.value), e.value
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    with pytest.raises(openai.BadRequestError, match=r"unknown MoE policy .{0,4}nope.{0,4}: this server serves default"):
        client.completions.create(model="default", prompt=PROMPTS[0], max_tokens=2,
                                  extra_body={"custom_params": {"moe_policy": "nope"}})
    assert server.healthy()
    assert _ask(server, ids, "fast") == _reference(hf, FILE["fast"], [ids])[0]


def test_moe_policies_lists_what_requests_may_pick(server) -> None:
    """GET /moe_policies: every name a request may give (in the order the 400 lists them), the default, and what
    each routes (from the compiled policies, as ``sgl-budget explain`` says)."""
    got = server.get("/moe_policies")
    assert [p["name"] for p in got["policies"]] == ["default", "stock", *NAMED]
    assert got["request_field"] == "custom_params.moe_policy" and got["default"] == "default" and got["per_request"]
    by = {p["name"]: p for p in got["policies"]}
    assert by["default"]["file"] == str(DEFAULT.resolve()) and by["stock"]["file"] is None
    mean = {n: [s["experts_per_token"]["mean"] for s in p["situations"]] for n, p in by.items()}
    assert mean["stock"] == [8.0] and mean["default"] == [4.0] and mean["fast"] == [2.0]
    assert mean["topp"][0] == pytest.approx(4.0, abs=0.01)  # top-p calibrated per layer to 4 on its trace
    assert not by["topp"]["situations"][0]["experts_per_token"]["exact"]
    assert len(by["mix4"]["situations"]) > 1  # SERE only in decode batches of 4 or more: its own situation
    assert any("reroute" in s["rules"] for s in by["mix4"]["situations"])


def test_openai_endpoints_pick_a_policy(server, hf) -> None:
    import openai

    _, tok = hf
    text = "Our purpose in this study is to"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    for name in ("fast", "stock"):
        ref = tok.decode(_reference(hf, FILE[name], [_ids(tok, text)])[0])
        body = {"ignore_eos": True, "custom_params": {"moe_policy": name}}
        comp = client.completions.create(model="default", prompt=text, max_tokens=NEW, temperature=0.0,
                                          extra_body=body)
        assert comp.choices[0].text == ref, name
        chat = client.chat.completions.create(model="default", messages=[{"role": "user", "content": text}],
                                              max_tokens=NEW, temperature=0.0, extra_body=body)
        assert chat.choices[0].message.content == ref, name


def _metrics(server) -> dict[tuple[str, str], float]:
    text = urllib.request.urlopen(server.url + "/metrics", timeout=30).read().decode()
    out = {}
    for m in re.finditer(r'^sglang:moe_policy_(\w+)\{[^}]*policy="([^"]+)"[^}]*\} ([0-9.e+-]+)$', text, re.M):
        out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


def test_metrics_and_log_count_what_was_served(server, hf) -> None:
    _, tok = hf
    time.sleep(2 * INTERVAL + 1)
    before = _metrics(server)
    ids = [_ids(tok, f"{w} of the new houses") for w in ("Some", "Three", "Two")]
    for p in ids:
        _ask(server, p, "fast", new=4)
    _ask(server, _ids(tok, "Four of the new houses"), "stock", new=4)
    time.sleep(2 * INTERVAL + 1)
    after = _metrics(server)

    def delta(kind: str, policy: str) -> float:
        return after.get((kind, policy), 0.0) - before.get((kind, policy), 0.0)

    assert delta("requests_total", "fast") == 3 and delta("requests_total", "stock") == 1
    assert delta("generation_tokens_total", "fast") == 3 * 3  # the first new token comes from the prefill
    assert delta("prompt_tokens_total", "fast") == sum(len(p) for p in ids)
    assert delta("requests_total", "lt") == 0 and delta("requests_total", "alloc") == 0
    # uniform-25 routes 2 of 8 experts in every layer, stock 8, uniform-50 4; the gauge is the running mean
    assert after[("experts_per_token", "fast")] == 2.0 and after[("experts_per_token", "stock")] == 8.0
    assert after[("experts_per_token", "default")] == 4.0
    layers = spec_of(hf[0]).num_moe_layers
    assert delta("routed_experts_total", "fast") == 2 * delta("routed_token_layers_total", "fast")
    assert delta("routed_token_layers_total", "fast") == layers * (sum(len(p) for p in ids) + 9)
    lines = [l for l in server.log().splitlines() if "sgl_budget: MoE policies since start:" in l]
    assert lines and re.search(r"fast: \d+ requests, \d+ tokens \(prompt \d+, generated \d+\), 2\.000 experts/token",
                               lines[-1]), lines[-1:]


ENGINE = """
import json
import sglang
if __name__ == "__main__":
    llm = sglang.Engine(model_path={model!r}, device="cpu", dtype="float32", moe_policy={default!r},
                        moe_named_policies={{"fast": {fast!r}}})
    sp = {{"max_new_tokens": {new}, "temperature": 0.0, "ignore_eos": True}}
    outs = llm.generate(input_ids={ids!r}, sampling_params=[dict(sp, custom_params={{"moe_policy": n}})
                                                           for n in ("fast", "stock", "default")])
    try:
        llm.generate(input_ids={ids!r}[0], sampling_params=dict(sp, custom_params={{"moe_policy": "slow"}}))
        err = None
    except ValueError as e:
        err = str(e)
    llm.shutdown()
    print("RESULT " + json.dumps({{"out": [o["output_ids"] for o in outs], "err": err}}))
"""


def test_engine_generate_picks_a_policy(hf, tmp_path) -> None:
    import sys

    _, tok = hf
    prompts = [_ids(tok, t) for t in PROMPTS[5:8]]
    script = tmp_path / "engine.py"
    script.write_text(ENGINE.format(model=str(MODEL), default=str(DEFAULT), fast=str(NAMED["fast"]), ids=prompts,
                                    new=NEW))
    env = Server(MODEL, env=SERVER_ENV).environment()  # what a server launched by these tests sees
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads([l for l in r.stdout.splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):])
    for p, n, g in zip(prompts, ("fast", "stock", "default"), res["out"]):
        assert g == _reference(hf, FILE[n], [p])[0], n
    assert res["err"] and "unknown MoE policy 'slow'" in res["err"] and "default, stock, fast" in res["err"]


def test_launch_refuses_bad_named_policies_listing_every_problem(tmp_path) -> None:
    bad = tmp_path / "bad.policy"
    bad.write_text('policy "bad" {\n  budget 50%\n  tokens { reallocate by score; min_k 3; max_k 2 }\n}\n')
    extra = ["--moe-named-policy", f"stock={NAMED['fast']}", "--moe-named-policy", f"fast={NAMED['fast']}",
             "--moe-named-policy", f"fast={NAMED['alloc']}", "--moe-named-policy", "two words=x.policy",
             "--moe-named-policy", f"worse={bad}", "--moe-named-policy", "nopath"]
    s = Server(MODEL, policy=DEFAULT, extra_args=extra, env=SERVER_ENV)
    r = s.run_to_exit()
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr
    assert "the policy name 'stock' is reserved" in err
    assert "the policy name 'fast' is given twice" in err
    assert "invalid policy name 'two words'" in err
    assert f"{bad}:3:" in err and "min_k 3 is above max_k 2" in err
    assert "expected NAME=PATH, got 'nopath'" in err
    assert "aborting due to 5 errors" in err and "Traceback" not in err
