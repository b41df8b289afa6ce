"""lm-evaluation-harness (``lm_eval``) against the per-request server, as the README's "Evaluate with
lm-evaluation-harness" section runs it.

One real SGLang server (stock launcher, CPU, fp32, models/brown-moe, default routing = stock) with a named 25% policy
``u25``; lm_eval evaluates the offline perplexity task ``brown_heldout`` (examples/lm_eval: 24 held-out Brown passages,
no download) through the server's OpenAI ``/v1/completions`` with the model ``sgl-budget-completions``
(examples/lm_eval/sgl_budget_completions.py: lm_eval's ``local-completions`` + ``moe_policy=NAME`` in every request
body), once per policy; and a generation task through lm_eval's stock ``local-completions`` with
``gen_kwargs={"custom_params": {"moe_policy": ...}}``. The server's per-policy statistics show which policy served
the requests. lm_eval's Python API runs in this process (one import for all runs); the README gives the same
evaluation as ``lm_eval`` commands.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path

import pytest

if os.environ.get("SGL_BUDGET_REQUIRE_SGLANG"):
    import sglang  # noqa: F401
if os.environ.get("SGL_BUDGET_REQUIRE_LMEVAL"):
    import lm_eval  # noqa: F401
pytest.importorskip("sglang", reason="install the sglang extra: pip install -e '.[sglang]'")
pytest.importorskip("lm_eval", reason="install the lmeval extra (lm-evaluation-harness): pip install -e '.[lmeval]'")

from sgl_budget.cli import bundled_dir, default_model_dir  # noqa: E402
from sgl_budget.engines.sglang.server import Server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "examples" / "lm_eval"
MODEL = default_model_dir()
U25 = bundled_dir() / "brown-moe" / "uniform-25.policy"
N_DOCS = 24  # passages in examples/lm_eval/brown_heldout.jsonl; each is one request (all are < max_length tokens)
SERVER_ENV = {"TRITON_INTERPRET": None}  # the test process's Triton interpreter setting is not the server's
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# stock's bits per byte on brown_heldout computed without lm_eval or SGLang: transformers, fp32, each passage as
# [BOS] + its tokens, -sum(log p) / ln 2 / UTF-8 bytes (2.0365452987; lm_eval through the server: 2.0365452898)
STOCK_BITS_PER_BYTE = 2.0365452987
STATS = re.compile(r"(\S+): (\d+) requests, .*? ([\d.]+|-) experts/token")


@pytest.fixture(scope="module")
def server():
    s = Server(MODEL, extra_args=["--moe-named-policy", f"u25={U25}", "--moe-policy-log-interval", "0.5"],
               env=SERVER_ENV)
    s.start()
    yield s
    s.stop()
    errors = [l for l in s.log().splitlines() if "Traceback" in l or " ERROR " in l]
    assert not errors, f"the server logged errors:\n{s.log_tail(80)}"


@pytest.fixture(scope="module")
def lm_eval_api(server):
    import lm_eval
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as mp:
        for k, v in OFFLINE.items():
            mp.setenv(k, v)
        mp.syspath_prepend(str(TASKS))
        import sgl_budget_completions  # noqa: F401  registers the model "sgl-budget-completions"

        yield lm_eval, TaskManager(include_path=str(TASKS), include_defaults=False), server


def _stats(s: Server) -> dict[str, tuple[int, str]]:
    """The server's latest per-policy statistics line: {policy: (requests, experts/token)}."""
    lines = [l for l in s.log().splitlines() if "sgl_budget: MoE policies since start:" in l]
    return {m[1]: (int(m[2]), m[3]) for m in STATS.finditer(lines[-1].split("since start:", 1)[1])} if lines else {}


def _wait_requests(s: Server, policy: str, expected: int, timeout: float = 15.0) -> dict[str, tuple[int, str]]:
    deadline = time.monotonic() + timeout
    while (st := _stats(s)).get(policy, (0, ""))[0] < expected and time.monotonic() < deadline:
        time.sleep(0.25)
    return st


def _perplexity(lm_eval_api, policy: str) -> dict[str, float]:
    lm_eval, tasks, s = lm_eval_api
    out = lm_eval.simple_evaluate(
        model="sgl-budget-completions",
        model_args={"model": str(MODEL), "base_url": f"{s.url}/v1/completions", "tokenizer_backend": "huggingface",
                    "max_length": 1024, "moe_policy": policy},
        tasks=["brown_heldout"], task_manager=tasks)
    res = out["results"]["brown_heldout"]
    return {m: res[f"{m},none"] for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")}


def test_perplexity_per_request_policy(lm_eval_api) -> None:
    """lm_eval's perplexity of the same server, stock vs the 25% policy picked per request: both finite, the 25%
    policy worse on every metric, every request of the u25 run served by u25 (2 experts per token), and stock's
    bits per byte equal to transformers' on the same passages (so lm_eval scores every token, from BOS, once)."""
    _, _, s = lm_eval_api
    st = _stats(s)
    n_stock, n_u25 = st.get("stock", (0, ""))[0], st.get("u25", (0, ""))[0]
    stock = _perplexity(lm_eval_api, "stock")
    st = _wait_requests(s, "stock", n_stock + N_DOCS)
    assert st.get("stock") == (n_stock + N_DOCS, "8.000"), f"stock did not serve the stock run's requests: {st}"
    assert st.get("u25", (0, ""))[0] == n_u25, f"the stock run sent requests to u25: {st}"
    u25 = _perplexity(lm_eval_api, "u25")
    st = _wait_requests(s, "u25", n_u25 + N_DOCS)
    assert st.get("u25") == (n_u25 + N_DOCS, "2.000"), f"u25 did not serve the u25 run's {N_DOCS} requests: {st}"
    assert st.get("stock", (0, ""))[0] == n_stock + N_DOCS, f"the u25 run sent requests to stock: {st}"
    print(f"\nbrown_heldout via lm_eval: stock {stock}\n                          u25   {u25}")
    for m in stock:
        assert math.isfinite(stock[m]) and math.isfinite(u25[m]), (stock, u25)
        assert u25[m] > stock[m], (m, stock, u25)
    assert stock["word_perplexity"] > 1 and 0 < stock["bits_per_byte"] < 8, stock
    assert stock["bits_per_byte"] == pytest.approx(STOCK_BITS_PER_BYTE, rel=1e-5)


def test_generation_policy_through_gen_kwargs(lm_eval_api) -> None:
    """Generation tasks need no extra model class: lm_eval's stock ``local-completions`` spreads gen_kwargs into the
    request body, so ``gen_kwargs={"custom_params": {"moe_policy": "u25"}}`` picks the policy per request."""
    lm_eval, tasks, s = lm_eval_api
    task = {"task": "brown_continue", "custom_dataset": _first_docs, "output_type": "generate_until",
            "test_split": "test", "doc_to_text": "{{text.split(' ')[:8] | join(' ')}}",
            "doc_to_target": "{{' ' + text.split(' ')[8:10] | join(' ')}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "temperature": 0.0},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    before = _stats(s).get("u25", (0, "-"))[0]
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": str(MODEL), "base_url": f"{s.url}/v1/completions", "tokenizer_backend": "huggingface",
                    "max_length": 1024},
        tasks=[task], task_manager=tasks, gen_kwargs={"custom_params": {"moe_policy": "u25"}}, log_samples=True)
    samples = out["samples"]["brown_continue"]
    assert len(samples) == 4 and all(isinstance(x["resps"][0][0], str) for x in samples), samples
    st = _wait_requests(s, "u25", before + 4)
    assert st.get("u25", (0, ""))[0] == before + 4, f"the 4 generation requests were not served by u25: {st}"


def _first_docs(**_metadata):
    import datasets

    rows = [json.loads(l) for l in (TASKS / "brown_heldout.jsonl").read_text(encoding="utf-8").splitlines()[:4]]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
