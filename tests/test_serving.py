"""End to end: the stock SGLang server (``python -m sglang.launch_server``) serving the embedded model on CPU.

One server per policy kind (stock, uniform k, Alloc-L, Alloc-T, SERE, piggyback, a mix with
``when decode and batch >= 4``), started as a user starts it, asked over HTTP; greedy fp32
outputs are compared token for token with the transformers adapter running the same policy:

* alone: one request at a time = the adapter on that one sequence;
* a batch: one ``/generate`` call with 4 prompts of equal length, which SGLang prefills
  together and decodes in lock-step = the adapter decoding the same 4 sequences as one batch
  (so batch-level rules — Alloc-T's slot pool, SERE's primaries, piggybacking, ``batch >= 4`` —
  see the same batches on both sides);
* concurrent clients, for per-token policies (whose result cannot depend on batching).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("SGL_BUDGET_REQUIRE_SGLANG"):
    import sglang  # noqa: F401
    import transformers  # noqa: F401
pytest.importorskip("sglang", reason="install the sglang extra: pip install -e '.[sglang]'")
pytest.importorskip("transformers", reason="install the hf extra")

import torch  # noqa: E402

from sgl_budget.cli import bundled_dir, default_model_dir  # noqa: E402
from sgl_budget.engines.hf.adapter import apply_policy, moe_blocks, spec_of  # noqa: E402
from sgl_budget.engines.hf.data import load_model  # noqa: E402
from sgl_budget.engines.hf.generate import greedy  # noqa: E402
from sgl_budget.engines.sglang.server import HTTPError, Server  # noqa: E402
from sgl_budget.lang import load_policy  # noqa: E402
from sgl_budget.lang.ir import RouteContext  # noqa: E402
from sgl_budget.traces import load_trace  # noqa: E402

MODEL = default_model_dir()
BROWN = bundled_dir() / "brown-moe"
HERE = Path(__file__).resolve().parent
NEW = 12  # tokens generated per request
SERVER_ENV = {"TRITON_INTERPRET": None}  # the test process's Triton interpreter setting is not the server's

CASES = {  # name -> (policy file, per-token?)
    "stock": (None, True),
    "uniform-50": (BROWN / "uniform-50.policy", True),
    "alloc-l-50": (BROWN / "alloc-l-50.policy", True),
    "alloc-l-min-p": (BROWN / "alloc-l-min-p-50.policy", True),  # per-token confidence rule, calibrated per layer
    "alloc-t": (BROWN / "alloc-lt-50.policy", False),
    "sere": (BROWN / "sere-50.policy", False),
    "piggyback": (HERE / "policies" / "brown-moe-piggyback.policy", False),
    "mix-batch4": (HERE / "policies" / "brown-moe-mix.policy", False),
}
# Distinct first words everywhere (and none shared with SGLang's warm-up prompt "The capital city ..."),
# so the radix cache never turns part of a prompt into cached tokens: a prefill computes what the
# reference computes.
ALONE = ["In the morning the city council met to", "It was a long time before anyone", "Mr. Johnson told the "
         "committee that"]
BATCH = ["After the war the government began", "She said that the new school would", "When they arrived at the "
         "house", "Most of the people in the town"]
CONCURRENT = ["Yesterday the governor announced that", "A new law was passed by the", "Some of the older members of",
              "During the summer the children played", "His father had been a farmer", "We do not know whether",
              "For many years the church had", "On Sunday morning the family went"]
OPENAI = "Our purpose in this study is to"


@pytest.fixture(scope="module")
def hf():
    model, tok = load_model(MODEL)  # fp32, eager experts
    return model, tok


def _ids(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


_REFS: dict = {}


def _reference(hf, policy: Path | None, prompts: list[list[int]]) -> list[list[int]]:
    """The transformers adapter's greedy continuation of ``prompts`` decoded as one batch (cached)."""
    key = (str(policy), tuple(map(tuple, prompts)))
    if key not in _REFS:
        model, _ = hf
        handle = apply_policy(model, load_policy(policy, spec_of(model))) if policy else None
        try:
            _REFS[key] = greedy(model, prompts, NEW)
        finally:
            if handle is not None:
                handle.remove()
    return _REFS[key]


@pytest.fixture(scope="module", params=list(CASES))
def served(request, tmp_path_factory):
    name = request.param
    policy, _ = CASES[name]
    extra = []
    record = None
    if name == "uniform-50":  # this server also records its router logits
        record = tmp_path_factory.mktemp("trace")
        extra = ["--moe-record-trace", str(record), "--moe-record-max-tokens", "48"]
    server = Server(MODEL, policy=policy, extra_args=extra, env=SERVER_ENV)
    server.start()
    server.case = name
    server.record_dir = record
    yield server
    server.stop()
    errors = [l for l in server.log().splitlines() if "Traceback" in l or " ERROR " in l]
    assert not errors, f"{name}: the server logged errors:\n{server.log_tail(80)}"


PER_TOKEN = [c for c, (_, per_token) in CASES.items() if per_token]


def test_policy_listing(served) -> None:
    """GET /moe_policies on a policy server: default (its file) and stock; a server without sgl_budget flags has
    no such route (SGLang answers 404)."""
    policy = CASES[served.case][0]
    if policy is None:
        with pytest.raises(HTTPError, match="HTTP 404"):
            served.get("/moe_policies")
        _calibration_refused(served, "not an SGLang server launched with sgl_budget")
        return
    got = served.get("/moe_policies")
    assert [(p["name"], p["file"]) for p in got["policies"]] == [("default", str(policy.resolve())), ("stock", None)]
    assert got["policies"][0]["policy"] == policy.stem  # the name in the file (each is named as its file)
    assert got["calibration"]["enabled"] is False and got["model"]["name"] == MODEL.name
    _calibration_refused(served, "launched without --moe-calibration")


def _calibration_refused(served, cli_message: str) -> None:
    """Without --moe-calibration a calibration request is a 400 (nothing computed) and `eval --server` says why."""
    from sgl_budget.cli import main

    with pytest.raises(HTTPError) as e:
        served.generate([5, 6, 7], 1, custom_params={"moe_calibration": {"report": True}})
    assert e.value.status == 400 and "--moe-calibration" in e.value.body
    r = subprocess.run([sys.executable, "-m", "sgl_budget.cli", "eval", "--server", served.url, "--text",
                        str(MODEL / "config.json")], capture_output=True, text=True)
    assert r.returncode == 2 and cli_message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_alone_equals_transformers(served, hf) -> None:
    _, tok = hf
    for text in ALONE:
        ids = _ids(tok, text)
        got = served.generate(ids, NEW)["output_ids"]
        assert got == _reference(hf, CASES[served.case][0], [ids])[0], f"{served.case}: {text!r}"


def test_lockstep_batch_equals_transformers(served, hf) -> None:
    _, tok = hf
    prompts = [_ids(tok, t)[:5] for t in BATCH]
    assert all(len(p) == 5 for p in prompts)
    n_prefill = served.log().count("Prefill batch, #new-seq: 4,")
    got = served.post("/generate", {"input_ids": prompts, "sampling_params": {
        "max_new_tokens": NEW, "temperature": 0.0, "ignore_eos": True}})
    assert served.log().count("Prefill batch, #new-seq: 4,") == n_prefill + 1, "the 4 requests were not prefilled together"
    assert [g["output_ids"] for g in got] == _reference(hf, CASES[served.case][0], prompts), served.case
    if CASES[served.case][1]:  # a per-token policy: each row's tokens are exactly its tokens served alone
        alone = [served.generate(p, NEW)["output_ids"] for p in prompts]
        assert [g["output_ids"] for g in got] == alone, served.case
    if served.case == "mix-batch4":  # the batch really switched SERE on: alone, the rows decode differently
        assert any(_reference(hf, CASES[served.case][0], [p])[0] != g["output_ids"] for p, g in zip(prompts, got))


@pytest.mark.parametrize("served", PER_TOKEN, indirect=True)
def test_concurrent_clients_per_token_policy(served, hf) -> None:
    """Batch-level rules are left out: which requests share a batch is timing-dependent (see the lock-step test)."""
    _, tok = hf
    prompts = [_ids(tok, t) for t in CONCURRENT]
    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        got = list(ex.map(lambda p: served.generate(p, NEW)["output_ids"], prompts))
    for p, g in zip(prompts, got):
        assert g == _reference(hf, CASES[served.case][0], [p])[0], served.case


@pytest.mark.parametrize("served", ["stock", "alloc-l-50"], indirect=True)
def test_openai_endpoints(served, hf) -> None:
    import openai

    _, tok = hf
    ref = tok.decode(_reference(hf, CASES[served.case][0], [_ids(tok, OPENAI)])[0])
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="none")
    comp = client.completions.create(model="default", prompt=OPENAI, max_tokens=NEW, temperature=0.0,
                                      extra_body={"ignore_eos": True})
    assert comp.choices[0].text == ref and comp.usage.completion_tokens == NEW
    chat = client.chat.completions.create(model="default", messages=[{"role": "user", "content": OPENAI}],
                                          max_tokens=NEW, temperature=0.0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == ref  # the model's chat template is the plain text


@pytest.mark.parametrize("served", ["uniform-50"], indirect=True)
def test_recorded_trace_replays_and_equals_transformers_logits(served, hf, capsys) -> None:
    from sgl_budget.cli import main

    files = sorted(served.record_dir.glob("*.trace.safetensors"))
    assert len(files) == 1, f"expected one trace after --moe-record-max-tokens was reached: {files}"
    trace = load_trace(files[0])
    assert not trace.synthetic and trace.spec.num_experts == 64
    # the router logits of each ALONE prompt's prefill, as the transformers model computes them under the
    # same policy (from layer 1 on, a layer's input depends on the routing of the layers before it)
    model, tok = hf
    found = 0
    for text in ALONE:
        ids = _ids(tok, text)
        with apply_policy(model, load_policy(CASES[served.case][0], spec_of(model))):
            logits = _hf_router_logits(model, ids)
        for start, end in trace.sequences:
            if end - start == len(ids) and int(trace.phase[start]) == 0:
                rec = {l: trace.router_logits[l][start:end].float() for l in logits}
                if all(torch.allclose(rec[l], logits[l].half().float(), atol=2e-3, rtol=2e-3) for l in logits):
                    found += 1
                    break
    assert found >= 1, "no recorded prefill matches the transformers router logits of an ALONE prompt"
    assert main(["replay", str(BROWN / "uniform-50.policy"), "--trace", str(files[0]), "--batch-size", "1"]) == 0
    assert "uniform-50" in capsys.readouterr().out
    # a confidence rule calibrated on what the engine recorded: per layer, the threshold whose mean experts per
    # token on those tokens is the plan's k (replaying them routes exactly the reported mean)
    from sgl_budget.routing import compile_routers

    pol = files[0].parent / "top-p.policy"
    pol.write_text(f'policy "engine-calibrated" {{ budget 50%; tokens {{ top_p calibrated from "{files[0].name}" }} }}')
    ir = load_policy(pol, trace.spec)
    for l, router in compile_routers(ir).items():
        ad = router.plan(RouteContext()).adaptive
        out = router(trace.router_logits[l].float(), RouteContext("prefill", 1, trace.num_tokens))
        assert (out.topk_ids >= 0).sum(-1).double().mean().item() == pytest.approx(ad.calibrated_mean)
        assert abs(ad.calibrated_mean - 4) <= 1.5, (l, ad)  # 48 tokens: steps of 1/48, ties between tokens aside


def _hf_router_logits(model, ids: list[int]) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}
    hooks = [block.gate.register_forward_hook(lambda m, a, o, l=l: out.__setitem__(l, o[0].detach().float()))
             for l, block in moe_blocks(model).items()]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return out


@pytest.mark.parametrize("served", ["sere"], indirect=True)
def test_load_many_concurrent_clients(served, hf) -> None:
    _, tok = hf
    words = ("Now", "Then", "Later", "Here", "Soon", "Still", "Once", "Perhaps")
    prompts = [f"{words[i % len(words)]} the {i} men said" for i in range(240)]

    def ask(p: str) -> int:
        r = served.post("/generate", {"text": p, "sampling_params": {"max_new_tokens": 6, "temperature": 0.7}})
        return r["meta_info"]["completion_tokens"]

    with cf.ThreadPoolExecutor(24) as ex:
        counts = list(ex.map(ask, prompts))
    assert len(counts) == 240 and all(1 <= c <= 6 for c in counts)
    assert served.healthy()
    assert served.generate(_ids(tok, ALONE[0]), 4)["meta_info"]["completion_tokens"] == 4


# -- launch paths that need no serving ------------------------------------------------------------

BAD = 'policy "bad" {\n  budget 50%\n  tokens { reallocate by score; min_k 3; max_k 2 }\n}\n'


@pytest.mark.parametrize("entry", ["launch_server", "serve"])
def test_bad_policy_ends_the_launch_with_the_compiler_message(entry, tmp_path) -> None:
    bad = tmp_path / "bad.policy"
    bad.write_text(BAD)
    s = Server(MODEL, policy=bad, entry=entry, env=SERVER_ENV)
    r = s.run_to_exit()
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{bad}:3:" in r.stderr and "min_k 3 is above max_k 2" in r.stderr and "^" in r.stderr
    assert "Traceback" not in r.stderr and "sglang::scheduler" not in r.stderr


def test_sglang_serve_help_lists_the_flags() -> None:
    r = subprocess.run([str(Path(sys.executable).parent / "sglang"), "serve", "--help"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for flag in ("--moe-policy PATH", "--moe-named-policy NAME=PATH", "--moe-policy-log-interval SECONDS",
                 "--moe-record-trace DIR", "--moe-record-max-tokens N"):
        assert flag in r.stdout


ENGINE = """
import json, sys
import sglang
if __name__ == "__main__":
    llm = sglang.Engine(model_path={model!r}, device="cpu", dtype="float32", moe_policy={policy!r})
    outs = llm.generate(input_ids={ids!r}, sampling_params={{"max_new_tokens": {new}, "temperature": 0.0,
                                                             "ignore_eos": True}})
    llm.shutdown()
    print("RESULT " + json.dumps([o["output_ids"] for o in outs]))
"""


def test_engine_in_process_with_a_policy(hf, tmp_path) -> None:
    _, tok = hf
    policy = BROWN / "alloc-lt-50.policy"
    prompts = [_ids(tok, t)[:5] for t in BATCH]
    script = tmp_path / "engine.py"
    script.write_text(ENGINE.format(model=str(MODEL), policy=str(policy), ids=prompts, new=NEW))
    env = Server(MODEL, env=SERVER_ENV).environment()  # what a server launched by these tests sees
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")][-1]
    assert json.loads(line[len("RESULT "):]) == _reference(hf, policy, prompts)


def test_untied_head_warning(tmp_path) -> None:
    from safetensors.torch import save_file

    from sgl_budget.engines.sglang.checkpoint import untied_head_problem

    cfg = json.loads((MODEL / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False  # the embedded model ships its head (SGLang never ties Qwen3-MoE)
    assert untied_head_problem(str(MODEL)) is None
    d = tmp_path / "tied"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    save_file({"model.embed_tokens.weight": torch.zeros(4, 2)}, str(d / "model.safetensors"))
    msg = untied_head_problem(str(d))
    assert msg and "UNTRAINED output head" in msg and "lm_head.weight" in msg
    save_file({"model.embed_tokens.weight": torch.zeros(4, 2), "lm_head.weight": torch.zeros(4, 2)},
              str(d / "model.safetensors"))
    assert untied_head_problem(str(d)) is None
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "deepseek_v2", "tie_word_embeddings": True}))
    assert untied_head_problem(str(d)) is None  # SGLang's DeepSeek-V2 ties


def test_untied_head_warning_at_launch(tmp_path) -> None:
    """The launcher warns before loading; the launch itself is ended by an invalid port to stay fast."""
    import shutil

    d = tmp_path / "tied"
    shutil.copytree(MODEL, d, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(4, 2)}, str(d / "model.safetensors"))
    pol = tmp_path / "bad.policy"
    pol.write_text(BAD)
    r = Server(d, policy=pol, env=SERVER_ENV).run_to_exit()
    assert r.returncode == 2 and re.search(r"warning.*UNTRAINED output head", r.stderr, re.I), r.stderr[-2000:]
    assert r.stderr.count("UNTRAINED output head") == 1, r.stderr[-2000:]  # said once


def test_tensor_parallel_2_on_cpu(hf, tmp_path) -> None:
    """--tp 2 on CPU (gloo): both ranks see bit-identical router logits, hence route identically (the routing is a
    function of the logits and the batch), and a lock-step batch with Alloc-T decodes exactly as --tp 1 / the
    transformers adapter does."""
    _, tok = hf
    policy = BROWN / "alloc-lt-50.policy"
    prompts = [_ids(tok, t)[:5] for t in BATCH]
    env = {**SERVER_ENV, "SGLBUDGET_RECORD_ALL_RANKS": "1"}
    extra = ["--tp", "2", "--moe-record-trace", str(tmp_path), "--moe-record-max-tokens", "40"]
    with Server(MODEL, policy=policy, extra_args=extra, env=env) as server:
        got = server.post("/generate", {"input_ids": prompts, "sampling_params": {
            "max_new_tokens": NEW, "temperature": 0.0, "ignore_eos": True}})
        log = server.log()
    assert [g["output_ids"] for g in got] == _reference(hf, policy, prompts)
    assert "TP1" in log and "Traceback" not in log
    traces = [load_trace(f) for f in sorted(tmp_path.glob("*.trace.safetensors"))]
    assert len(traces) == 2, "one trace per TP rank"
    a, b = traces
    assert a.sequences == b.sequences and torch.equal(a.phase, b.phase)
    for layer in a.router_logits:
        assert torch.equal(a.router_logits[layer], b.router_logits[layer]), f"ranks disagree at layer {layer}"


def test_serve_demo_command(capsys) -> None:
    """The README's serving command: stock server and policy server on CPU, one request each, both answers."""
    from sgl_budget.cli import main

    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        assert main(["serve-demo", "--max-new-tokens", "8"]) == 0
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old
    out = capsys.readouterr().out
    assert "python -m sglang.launch_server --model-path" in out and "--moe-policy" in out and "--device cpu" in out
    assert re.search(r"stock routing: ['\"].+['\"]\n", out) and re.search(r"alloc-l-50: ['\"].+['\"]\n", out)
    assert out.count("server stopped") == 2


def test_cpu_mode_refuses_what_the_stand_in_lacks() -> None:
    """A feature whose CPU code needs sgl_kernel ops the stand-in lacks ends the launch with a message naming them."""
    import torch as _torch

    if _torch.cuda.is_available():
        pytest.skip("CUDA machine: CPU mode is off")
    s = Server(MODEL, extra_args=["--speculative-algorithm", "NGRAM"], env=SERVER_ENV)
    r = s.run_to_exit()
    if "using sgl_budget's pure-torch stand-in" not in r.stderr:
        pytest.skip("a CPU build of sgl_kernel is installed: the real ops are used")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--speculative-algorithm: speculative decoding" in r.stderr and "verify_tree_greedy_cpu" in r.stderr
    assert "Traceback" not in r.stderr
