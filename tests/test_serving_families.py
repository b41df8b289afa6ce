"""End to end, per MoE family: the stock SGLang launcher on CPU serving a tiny checkpoint of each family with a policy.

For every family the README's support matrix marks "served end to end on CPU" (``Family.cpu == "served"``),
one server is started as a user starts it — ``python -m sglang.launch_server --model-path DIR --device cpu
--dtype float32 --moe-policy uniform-50.policy --moe-named-policy alloc-t=alloc-t.policy`` — on a tiny
random-weight checkpoint shaped like the family's published config.json (``family_models.py``). Greedy fp32
tokens are checked over HTTP:

* ``stock`` requests == transformers' own model (the family's stock path, unmodified);
* default (uniform 50%) requests == sgl_budget's transformers adapter with that policy;
* a lock-step batch of 4 with ``alloc-t`` (Alloc-T's slot pool: batch-level) == the adapter decoding the
  same 4 rows as one batch.

Kimi K2 (model_type ``kimi_k2``, which transformers 5.19 has no class for) is launched with ``--trust-remote-code``
as its checkpoint asks; its transformers reference is the same weights loaded as ``deepseek_v3``
(``family_models.reference_dir``), and the spec the launcher reads must equal the adapter's.

One server per family (the per-request names share it), about 30-40 s each on 2 cores (Kimi K2: about 60 s).
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("SGL_BUDGET_REQUIRE_SGLANG"):
    import sglang  # noqa: F401
    import transformers  # noqa: F401
pytest.importorskip("sglang", reason="install the sglang extra: pip install -e '.[sglang]'")
pytest.importorskip("transformers", reason="install the hf extra")

from family_models import CONFIGS, REMOTE_CODE, SERVER_ARGS, build, reference_dir  # noqa: E402

from sgl_budget.engines.hf.adapter import apply_policy, spec_of  # noqa: E402
from sgl_budget.engines.hf.data import load_model  # noqa: E402
from sgl_budget.engines.hf.generate import greedy  # noqa: E402
from sgl_budget.engines.sglang.server import Server  # noqa: E402
from sgl_budget.engines.sglang.settings import model_spec_for  # noqa: E402
from sgl_budget.families import FAMILY_LIST  # noqa: E402
from sgl_budget.lang import load_policy  # noqa: E402

NEW = 10
SERVER_ENV = {"TRITON_INTERPRET": None}
UNIFORM = 'policy "uniform-50" {\n  budget 50%\n  layers { allocate uniform }\n}\n'
ALLOC_T = ('policy "alloc-t" {\n  budget 50%\n  layers { allocate uniform }\n'
           '  tokens { reallocate by score; min_k 1; max_k 4 }\n}\n')
MIN_P = 'policy "min-p" {\n  tokens { min_p 0.3; min_k 1; max_k 4 }\n}\n'  # per token: no batch dependence
SERVED = [f.model_type for f in FAMILY_LIST if f.cpu == "served"]
# distinct first tokens everywhere (no radix-cache hit turns part of a prompt into cached tokens)
ALONE = [[101, 7, 300, 45, 99, 1200, 5], [202, 3000, 17, 88, 4, 650]]
BATCH = [[303, 11, 12, 13, 14], [404, 21, 22, 23, 24], [505, 31, 32, 33, 34], [606, 41, 42, 43, 44]]


def test_every_served_family_has_a_checkpoint() -> None:
    assert set(SERVED) <= set(CONFIGS), "a family marked served on CPU needs a tiny config in family_models.py"


@pytest.fixture(scope="module", params=SERVED)
def family(request, tmp_path_factory):
    mt = request.param
    d = tmp_path_factory.mktemp(mt)
    model_dir = build(mt, d / "model")
    uniform, alloc_t, min_p = d / "uniform-50.policy", d / "alloc-t.policy", d / "min-p.policy"
    uniform.write_text(UNIFORM)
    alloc_t.write_text(ALLOC_T)
    min_p.write_text(MIN_P)
    model, _ = load_model(reference_dir(mt, model_dir, d / "reference"))  # Kimi K2: the same weights as deepseek_v3
    server = Server(model_dir, policy=uniform, extra_args=["--moe-named-policy", f"alloc-t={alloc_t}",
                                                           "--moe-named-policy", f"min-p={min_p}",
                                                           *SERVER_ARGS.get(mt, ())], env=SERVER_ENV)
    server.start()
    server.family, server.hf = mt, model
    server.policies = {"default": uniform, "alloc-t": alloc_t, "min-p": min_p, "stock": None}
    server.model_dir = model_dir
    yield server
    server.stop()
    errors = [line for line in server.log().splitlines() if "Traceback" in line or " ERROR " in line]
    assert not errors, f"{mt}: the server logged errors:\n{server.log_tail(80)}"


def test_server_and_reference_read_the_same_routing(family) -> None:
    """The spec the launcher reads from the checkpoint's config.json == the one the adapter reads from the
    transformers model (for Kimi K2: model_type kimi_k2 there, deepseek_v3 here; every routing fact equal)."""
    served = model_spec_for(str(family.model_dir)).to_dict()
    ref = spec_of(family.hf).to_dict()
    assert served.pop("model_type") == family.family
    for d in (served, ref):
        d.pop("name")
    ref.pop("model_type")
    assert served == ref, family.family


@pytest.mark.parametrize("mt", sorted(REMOTE_CODE))
def test_sglang_reads_a_remote_code_config_as_its_own_class(mt, tmp_path) -> None:
    """SGLang 0.5.23 registers its own ``kimi_k2`` config (an alias of transformers' DeepseekV3Config) and reloads a
    config of that model_type with it: the class the checkpoint ships is not what it serves with, with or without
    --trust-remote-code; either way it reads the published fields (routing, MLA, YaRN) as config.json has them."""
    from sglang.srt.utils.hf_transformers.config import get_config

    model_dir = build(mt, tmp_path / "model")
    cfg = CONFIGS[mt]
    for trust in (True, False):
        got = get_config(str(model_dir), trust_remote_code=trust)
        assert got.model_type == mt and got.architectures == cfg["architectures"]
        assert type(got).__mro__[1].__name__ == "DeepseekV3Config" and type(got).__module__.startswith("sglang.")
        for key in ("n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor",
                    "norm_topk_prob", "first_k_dense_replace", "q_lora_rank", "kv_lora_rank"):
            assert getattr(got, key) == cfg[key], (trust, key)
        assert got.rope_parameters["rope_theta"] == cfg["rope_theta"]
        assert {k: got.rope_parameters[k] for k in cfg["rope_scaling"]} == cfg["rope_scaling"]


def _reference(server, policy: str, prompts: list[list[int]]) -> list[list[int]]:
    model = server.hf
    path = server.policies[policy]
    handle = apply_policy(model, load_policy(path, spec_of(model))) if path else None
    try:
        return greedy(model, prompts, NEW)
    finally:
        if handle is not None:
            handle.remove()


def _params(policy: str) -> dict:
    return {"max_new_tokens": NEW, "temperature": 0.0, "ignore_eos": True, "custom_params": {"moe_policy": policy}}


def test_alone_stock_and_policy(family) -> None:
    """``stock`` == transformers; the default policy == the adapter; and the policy really changes the output."""
    changed = False
    for ids in ALONE:
        stock = family.post("/generate", {"input_ids": ids, "sampling_params": _params("stock")})["output_ids"]
        assert stock == _reference(family, "stock", [ids])[0], f"{family.family}: stock"
        pol = family.post("/generate", {"input_ids": ids, "sampling_params": _params("default")})["output_ids"]
        assert pol == _reference(family, "default", [ids])[0], f"{family.family}: uniform-50"
        changed |= pol != stock
    assert changed, f"{family.family}: routing half the experts changed no token (is the policy applied?)"


def test_lockstep_alloc_t_batch(family) -> None:
    """Alloc-T pools slots across the batch: 4 rows prefilled and decoded together == the adapter's batch of 4."""
    n_prefill = family.log().count("Prefill batch, #new-seq: 4,")
    got = family.post("/generate", {"input_ids": BATCH, "sampling_params": [_params("alloc-t")] * 4})
    assert family.log().count("Prefill batch, #new-seq: 4,") == n_prefill + 1, "the 4 requests were not batched"
    assert [g["output_ids"] for g in got] == _reference(family, "alloc-t", BATCH), family.family


def test_confidence_rule_alone_and_in_a_lockstep_batch(family) -> None:
    """A per-token min-p rule on every served family: each request == the adapter with it alone, and the rows of a
    lock-step batch of 4 == the same prompts served alone (what a token keeps depends on the token only)."""
    prompts = [[707, 51, 52, 53, 54], [808, 61, 62, 63, 64], [909, 71, 72, 73, 74], [1010, 81, 82, 83, 84]]
    alone = [family.post("/generate", {"input_ids": p, "sampling_params": _params("min-p")})["output_ids"]
             for p in prompts]
    assert alone == [_reference(family, "min-p", [p])[0] for p in prompts], family.family
    n_prefill = family.log().count("Prefill batch, #new-seq: 4,")
    fresh = [[p[0] + 1] + p[1:] for p in prompts]  # not a cached prefix: prefilled in this batch
    got = family.post("/generate", {"input_ids": fresh, "sampling_params": [_params("min-p")] * 4})
    assert family.log().count("Prefill batch, #new-seq: 4,") == n_prefill + 1, "the 4 requests were not batched"
    served_alone = [family.post("/generate", {"input_ids": p, "sampling_params": _params("min-p")})["output_ids"]
                    for p in fresh]
    assert [g["output_ids"] for g in got] == served_alone, family.family
