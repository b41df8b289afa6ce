"""SGLang integration, tested against the real installed sglang (0.5.23) on CPU.

Covers: the plugin entry point and the ``--moe-policy`` flag on SGLang's own parser,
launch-time validation (compiler-style error, exit 2), the Engine keyword path,
stock equivalence with SGLang's own ``select_experts`` for each scoring variant,
variable k through SGLang's torch-native MoE runners against a dense reference,
phase/batch context from SGLang's forward context, no host synchronisation, and
router-logit recording at the TopK level.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

if os.environ.get("SGL_BUDGET_REQUIRE_SGLANG"):
    import sglang  # noqa: F401  (CI: a missing sglang is a failure, not a skip)
sglang = pytest.importorskip("sglang", reason="install the sglang extra: pip install -e '.[sglang]'")

from sgl_budget.engines.sglang import SUPPORTED_SGLANG, plugin  # noqa: E402
from sgl_budget.engines.sglang.settings import ENV_POLICY, ENV_SPEC, Settings  # noqa: E402
from sgl_budget.lang.ir import RouteContext  # noqa: E402
from sgl_budget.spec import ModelSpec  # noqa: E402

from test_routing import _NoHostSync  # noqa: E402

QWEN3 = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 4,
         "num_experts": 16, "num_experts_per_tok": 4, "hidden_size": 64, "moe_intermediate_size": 32,
         "intermediate_size": 128, "norm_topk_prob": True, "vocab_size": 1000, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16}
DSV3 = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "num_hidden_layers": 4,
        "n_routed_experts": 16, "num_experts_per_tok": 4, "hidden_size": 64, "moe_intermediate_size": 32,
        "n_shared_experts": 1, "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "noaux_tc",
        "n_group": 4, "topk_group": 2, "scoring_func": "sigmoid", "norm_topk_prob": True,
        "routed_scaling_factor": 2.5, "vocab_size": 1000}


def test_pinned_version() -> None:
    assert sglang.__version__ in SUPPORTED_SGLANG


def _model_dir(tmp_path, cfg) -> str:
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def _run(code: str, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLBUDGET_")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env,
                          timeout=timeout)


# -- the launcher --------------------------------------------------------------------------------

def test_launcher_help_lists_the_flags() -> None:
    r = subprocess.run([sys.executable, "-W", "ignore", "-m", "sglang.launch_server", "--help"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for flag in ("--moe-policy PATH", "--moe-record-trace DIR", "--moe-record-max-tokens N"):
        assert flag in r.stdout


def test_bad_policy_ends_the_launch_before_any_worker(tmp_path) -> None:
    model = _model_dir(tmp_path, QWEN3)
    bad = tmp_path / "bad.policy"
    bad.write_text('policy "bad" {\n  budget 50%\n  tokens { reallocate by score; min_k 3; max_k 2 }\n}\n')
    r = subprocess.run([sys.executable, "-W", "ignore", "-m", "sglang.launch_server", "--model-path", model,
                        "--moe-policy", str(bad)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert f"{bad}:3:" in r.stderr and "min_k 3 is above max_k 2" in r.stderr and "^" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("cfg,message", [
    ({**QWEN3, "model_type": "llama4"},
     "model type 'llama4' (Llama 4) is not supported by --moe-policy"),
    ({**QWEN3, "model_type": "acme_moe"}, "model type 'acme_moe' is not an MoE family sgl_budget knows"),
    ({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8}, "not an MoE config"),
])
def test_unsupported_model_is_refused_at_launch(tmp_path, cfg, message) -> None:
    model = _model_dir(tmp_path, cfg)
    pol = tmp_path / "p.policy"
    pol.write_text('policy "p" { budget 50% }')
    r = subprocess.run([sys.executable, "-W", "ignore", "-m", "sglang.launch_server", "--model-path", model,
                        "--moe-policy", str(pol)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_good_policy_is_validated_and_published_for_workers(tmp_path) -> None:
    model = _model_dir(tmp_path, QWEN3)
    pol = tmp_path / "half.policy"
    pol.write_text('policy "half" { budget 50%; tokens { reallocate by score; min_k 1; max_k 4 } }')
    code = f"""
import os, json
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.server_args import prepare_server_args
sa = prepare_server_args(["--model-path", {model!r}, "--moe-policy", {str(pol)!r}])
print(json.dumps({{"policy": os.environ.get("{ENV_POLICY}"), "spec": json.loads(os.environ["{ENV_SPEC}"]),
                  "model_path": sa.model_path}}))
"""
    r = _run(code)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["policy"] == str(pol.resolve()) and out["model_path"] == model
    assert out["spec"]["num_experts"] == 16 and out["spec"]["moe_layers"] == [0, 1, 2, 3]


def test_no_flags_leave_sglang_stock(tmp_path) -> None:
    model = _model_dir(tmp_path, QWEN3)
    code = f"""
import os
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.layers.moe import topk
from sglang.srt.server_args import prepare_server_args
prepare_server_args(["--model-path", {model!r}])
print(topk.select_experts.__module__, topk.select_experts.__name__, hasattr(topk.select_experts, "__wrapped__"),
      any(k.startswith("SGLBUDGET_") for k in os.environ))
"""
    r = _run(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-4:] == ["sglang.srt.layers.moe.topk", "select_experts", "False", "False"]


def test_engine_keyword_path(tmp_path) -> None:
    model = _model_dir(tmp_path, DSV3)
    good = tmp_path / "g.policy"
    good.write_text('policy "g" { layers when decode { k = 2 } }')
    bad = tmp_path / "b.policy"
    bad.write_text('policy "b" { layers { layer 0: k = 2 } }')  # layer 0 is dense in this config
    code = f"""
import os
from sglang.srt.entrypoints.engine import Engine
from sglang.srt.plugins import load_plugins
load_plugins()
sa = Engine.server_args_class(model_path={model!r}, moe_policy={str(good)!r})
print("ok", type(sa).__name__, os.environ["{ENV_POLICY}"])
try:
    Engine.server_args_class(model_path={model!r}, moe_policy={str(bad)!r})
except Exception as e:
    print("refused", type(e).__name__, e.message)
"""
    r = _run(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"ok ServerArgs {good.resolve()}" in r.stdout
    assert "refused PolicyError layer 0 is not an MoE layer" in r.stdout


# -- in-process: SGLang's real TopK / select_experts on CPU --------------------------------------

@pytest.fixture(scope="module")
def sglang_topk():
    """SGLang's topk module with sgl_budget's hooks applied through SGLang's own HookRegistry."""
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.runtime_context import get_context
    from sglang.srt.server_args import ServerArgs

    get_context().set_server_args(ServerArgs(model_path="dummy", device="cpu"))
    from sglang.srt.layers.moe import topk as T

    original = getattr(T.select_experts, "__wrapped__", T.select_experts)  # another in-process test may have applied it
    os.environ[ENV_POLICY] = "placeholder"  # the worker-side hooks register only when a launch asked for them
    try:
        plugin.register()
        HookRegistry.apply_hooks()
    finally:
        os.environ.pop(ENV_POLICY, None)
    plugin._STATE.clear()
    assert T.select_experts is not original and T.select_experts.__wrapped__ is original
    yield SimpleNamespace(T=T, original=original)
    plugin._STATE.clear()


def _use(spec: ModelSpec, policy_text: str | None, tmp_path, record_dir=None, stock_fast_path=True):
    """Point this process's hooks at a policy (as a worker would from its environment)."""
    os.environ[ENV_SPEC] = json.dumps(spec.to_dict())
    path = None
    if policy_text is not None:
        path = tmp_path / "p.policy"
        path.write_text(policy_text)
    plugin._STATE.clear()
    plugin.activate(Settings(policy=str(path) if path else None, record_dir=record_dir))
    routing = plugin._STATE.get("routing")
    if routing is not None:
        routing.stock_fast_path = stock_fast_path


VARIANTS = {
    # name: (spec kwargs, TopK kwargs)
    "softmax-renorm": (dict(norm_topk_prob=True), dict(renormalize=True)),
    "softmax-no-renorm": (dict(norm_topk_prob=False, model_type="deepseek_v2"), dict(renormalize=False)),
    "softmax-grouped": (dict(norm_topk_prob=True, n_group=4, topk_group=2, model_type="deepseek_v2"),
                        dict(renormalize=True, use_grouped_topk=True, num_expert_group=4, topk_group=2)),
    "sigmoid-bias-grouped": (
        dict(scoring_func="sigmoid", norm_topk_prob=True, n_group=4, topk_group=2, routed_scaling_factor=2.5,
             has_correction_bias=True, model_type="deepseek_v3"),
        dict(renormalize=True, use_grouped_topk=True, num_expert_group=4, topk_group=2, scoring_func="sigmoid",
             routed_scaling_factor=2.5)),
    # as SGLang's deepseek_v2.py builds them: always the grouped path, scoring_func left at its default
    "deepseek-v2-lite-as-built": (dict(norm_topk_prob=False, model_type="deepseek_v2"),
                                  dict(renormalize=False, use_grouped_topk=True, num_expert_group=1, topk_group=1)),
    "deepseek-v3-as-built": (
        dict(scoring_func="sigmoid", norm_topk_prob=True, n_group=4, topk_group=2, routed_scaling_factor=2.5,
             has_correction_bias=True, model_type="deepseek_v3"),
        dict(renormalize=True, use_grouped_topk=True, num_expert_group=4, topk_group=2, routed_scaling_factor=2.5)),
    # GLM-4.5/4.6/4.7 (glm4_moe.py): DeepSeek-V3's grouped biased path, scoring_func left at its default
    "glm4-moe-as-built": (
        dict(scoring_func="sigmoid", norm_topk_prob=True, n_group=4, topk_group=2, routed_scaling_factor=2.5,
             has_correction_bias=True, model_type="glm4_moe"),
        dict(renormalize=True, use_grouped_topk=True, num_expert_group=4, topk_group=2, routed_scaling_factor=2.5)),
    # ERNIE-4.5-MoE (ernie4.py): softmax selecting with softmax + correction bias, ungrouped, always renormalised
    "ernie-as-built": (dict(norm_topk_prob=True, has_correction_bias=True, model_type="ernie4_5_moe"),
                       dict(renormalize=True, use_grouped_topk=False)),
    "sigmoid-bias-grouped-scaled-in-topk": (
        dict(scoring_func="sigmoid", norm_topk_prob=True, n_group=4, topk_group=2, routed_scaling_factor=2.5,
             has_correction_bias=True, model_type="deepseek_v3"),
        dict(renormalize=True, use_grouped_topk=True, num_expert_group=4, topk_group=2, scoring_func="sigmoid",
             routed_scaling_factor=2.5, apply_routed_scaling_factor_on_output=True)),
}


def _variant(name: str):
    spec_kw, topk_kw = VARIANTS[name]
    spec = ModelSpec(name=name, num_layers=4, moe_layers=(1, 2, 3), num_experts=16, top_k=4, hidden_size=8,
                     moe_intermediate_size=8, **spec_kw)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(16, generator=g) * 0.1 if spec.has_correction_bias else None
    topk_kw = dict(topk_kw, correction_bias=bias) if bias is not None else topk_kw
    return spec, topk_kw


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_stock_policy_equals_sglang_select_experts(sglang_topk, tmp_path, name) -> None:
    T = sglang_topk.T
    spec, topk_kw = _variant(name)
    topk = T.TopK(top_k=4, layer_id=2, **topk_kw)
    x = torch.randn(37, 16, generator=torch.Generator().manual_seed(7)) * 2
    h = torch.zeros(37, 8)
    _use(spec, None, tmp_path)
    with torch._dynamo.config.patch(disable=True):  # SGLang's grouped gates are torch.compile'd: also run eagerly
        torch._dynamo.reset()
        want_eager = topk.forward_native(h, x)
    torch._dynamo.reset()
    want = topk.forward_native(h, x)
    # through the hook a stock plan is SGLang's own function: identical output
    _use(spec, 'policy "own-k" { layers { k = 4 } }', tmp_path)
    fast = topk.forward_native(h, x)
    assert torch.equal(fast.topk_weights, want.topk_weights) and torch.equal(fast.topk_ids, want.topk_ids)
    # our reference router under SGLang's conventions, forced past that fast path: bit for bit equal to
    # SGLang's code run eagerly (Inductor's fused kernels may differ from any eager code in the last ulp)
    _use(spec, 'policy "own-k" { layers { k = 4 } }', tmp_path, stock_fast_path=False)
    got = topk.forward_native(h, x)
    assert torch.equal(got.topk_weights, want_eager.topk_weights), name
    assert torch.equal(got.topk_ids.long(), want_eager.topk_ids.long()), name
    assert torch.equal(got.topk_ids.long(), want.topk_ids.long())
    assert torch.allclose(got.topk_weights, want.topk_weights, rtol=0, atol=1e-6)


@pytest.mark.parametrize("native_hook", [True, False])
@pytest.mark.parametrize("name", ["softmax-renorm", "sigmoid-bias-grouped", "ernie-as-built"])
def test_reduced_k_matches_sglang_at_that_k(sglang_topk, tmp_path, name, native_hook, monkeypatch) -> None:
    """k = 2 through the hook == SGLang's own select_experts with top_k = 2, plus padding."""
    from sgl_budget.engines.sglang import native_moe

    monkeypatch.setattr(native_moe, "_registered", native_hook)  # as in a worker that registered the hook
    T = sglang_topk.T
    spec, topk_kw = _variant(name)
    x = torch.randn(21, 16, generator=torch.Generator().manual_seed(3))
    h = torch.zeros(21, 8)
    _use(spec, None, tmp_path)
    want = T.TopK(top_k=2, layer_id=1, **topk_kw).forward_native(h, x)
    _use(spec, 'policy "k2" { layers { k = 2 } }', tmp_path)
    got = T.TopK(top_k=4, layer_id=1, **topk_kw).forward_native(h, x)
    assert got.topk_ids.shape == (21, 4)
    key = lambda ids, w: sorted(zip(ids.tolist(), w.tolist()))  # noqa: E731  (SGLang's grouped top-k is unsorted)
    for t in range(21):
        assert key(got.topk_ids[t, :2], got.topk_weights[t, :2]) == key(want.topk_ids[t], want.topk_weights[t])
    assert (got.topk_weights[:, 2:] == 0).all()
    if native_hook:  # CPU native path with sgl_budget's moe_forward_native hook: padded slots are -1 (skipped)
        assert (got.topk_ids[:, 2:] == -1).all() and (got.topk_ids[:, :2] >= 0).all()
    else:  # without it (e.g. a fork with the patch series), a distinct expert the token does not use, never -1
        for row in got.topk_ids.tolist():
            assert min(row) >= 0 and len(set(row)) == 4


@pytest.mark.parametrize("k", [2, 4])
def test_ernie_where_stock_drops_the_bias(sglang_topk, tmp_path, k) -> None:
    """ERNIE's TopK off the torch-native path (CUDA's fused_topk, simulated here): SGLang's own top-k drops the
    correction bias, so sgl_budget's routing does too — own k and k = 2 equal plain softmax top-k at that k."""
    from sgl_budget.engines.sglang.routing import sglang_conventions, stock_drops_correction_bias

    T = sglang_topk.T
    spec, topk_kw = _variant("ernie-as-built")
    x = torch.randn(21, 16, generator=torch.Generator().manual_seed(4))
    h = torch.zeros(21, 8)
    topk = T.TopK(top_k=4, layer_id=1, **topk_kw)
    topk.topk_config.torch_native = True  # TopK.forward_native (the CPU engine): SGLang applies the bias
    assert not stock_drops_correction_bias(topk.topk_config)
    assert not sglang_conventions(topk.topk_config).ignore_correction_bias
    topk.topk_config.torch_native = False  # TopK.forward_cuda: fused_topk's softmax kernels never read it
    assert stock_drops_correction_bias(topk.topk_config) == (T.fused_topk is not getattr(T, "fused_topk_cpu", None))
    if not stock_drops_correction_bias(topk.topk_config):
        pytest.skip("this CPU's SGLang top-k (AMX) applies the bias on every path")
    conv = sglang_conventions(topk.topk_config)
    assert conv.ignore_correction_bias and conv.sorted_selection and not conv.scores_in_logit_dtype
    _use(spec, None, tmp_path)
    want = T.TopK(top_k=k, layer_id=1, renormalize=True).forward_native(h, x)  # plain softmax top-k, no bias
    biased = T.TopK(top_k=k, layer_id=1, **topk_kw).forward_native(h, x)  # SGLang's torch-native path
    assert not torch.equal(biased.topk_ids.sort().values, want.topk_ids.sort().values)  # the bias matters here
    _use(spec, f'policy "k" {{ layers {{ k = {k} }} }}', tmp_path, stock_fast_path=False)
    got = T.select_experts(h, x, topk.topk_config, layer_id=1)
    assert torch.equal(got.topk_ids[:, :k].long(), want.topk_ids.long())
    assert torch.equal(got.topk_weights[:, :k], want.topk_weights)
    assert (got.topk_weights[:, k:] == 0).all()
    topk.topk_config.torch_native = True  # the same layer on SGLang's torch-native path: the bias applies again
    native = T.select_experts(h, x, topk.topk_config, layer_id=1)
    key = lambda ids, w: sorted(zip(ids.tolist(), w.tolist()))  # noqa: E731  (torch-native top-k is unsorted)
    for t in range(21):
        assert key(native.topk_ids[t, :k], native.topk_weights[t, :k]) == key(biased.topk_ids[t],
                                                                                biased.topk_weights[t])


def _native_layer(e: int, hdim: int, inter: int):
    from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig

    g = torch.Generator().manual_seed(5)
    return SimpleNamespace(
        w13_weight=torch.randn(e, 2 * inter, hdim, generator=g) * 0.2,
        w2_weight=torch.randn(e, hdim, inter, generator=g) * 0.2,
        num_experts=e, moe_runner_config=MoeRunnerConfig(activation="silu"))


def _dense_reference(layer, x, ids, w):
    """Sum over each token's kept experts only (weight > 0), computed expert by expert."""
    out = torch.zeros_like(x)
    inter = layer.w2_weight.shape[2]
    for t in range(x.shape[0]):
        for e, wt in zip(ids[t].tolist(), w[t].tolist()):
            if wt == 0.0:
                continue
            gate_up = layer.w13_weight[e] @ x[t]
            a = torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]
            out[t] += wt * (layer.w2_weight[e] @ a)
    return out


def test_variable_k_through_sglang_native_moe(sglang_topk, tmp_path, monkeypatch) -> None:
    from sglang.srt.layers.moe.fused_moe_native import fused_moe_forward_native, moe_forward_native
    from sglang.srt.layers.moe.token_dispatcher import StandardDispatchOutput

    from sgl_budget.engines.sglang import native_moe
    from sgl_budget.engines.sglang.native_moe import moe_forward_skip_padding
    from sgl_budget.engines.sglang.routing import fill_padding

    monkeypatch.setattr(native_moe, "_registered", True)  # as in a worker that registered the hook

    T = sglang_topk.T
    spec, topk_kw = _variant("softmax-renorm")
    _use(spec, 'policy "t" { budget 50%; tokens { reallocate by score; min_k 0; max_k 4 } }', tmp_path)
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(9))
    logits = torch.randn(12, 16, generator=torch.Generator().manual_seed(10)) * 3
    out = T.TopK(top_k=4, layer_id=3, **topk_kw).forward_native(x, logits)
    k_t = (out.topk_weights > 0).sum(1)
    assert int(k_t.sum()) <= 12 * 2 and int(k_t.max()) <= 4 and int(k_t.min()) < int(k_t.max())  # really variable
    layer = _native_layer(16, 8, 8)
    ref = _dense_reference(layer, x, out.topk_ids, out.topk_weights)
    assert (out.topk_ids == -1).any()
    # SGLang's moe_forward_native through sgl_budget's hook (skips -1: computes only the kept pairs)
    got = moe_forward_skip_padding(moe_forward_native, layer, x, out, layer.moe_runner_config)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4)
    # ... and equals what SGLang's own function computes when padded slots hold real experts with weight 0
    valid = out.topk_ids >= 0
    filled = type(out)(out.topk_weights, fill_padding(out.topk_ids, valid, 16), out.router_logits)
    assert torch.allclose(got, moe_forward_native(layer, x, filled, layer.moe_runner_config), atol=1e-6, rtol=1e-6)
    # the torch.compile path (fused_moe_forward_native) gathers by id: -1 is the last expert, times weight 0
    combine = fused_moe_forward_native(layer, StandardDispatchOutput(hidden_states=x, hidden_states_scale=None,
                                                                     topk_output=out))
    assert torch.allclose(combine.hidden_states, ref, atol=1e-5, rtol=1e-4)
    # no padding: the hook hands SGLang's function the input untouched (bit-for-bit stock)
    calls = []
    moe_forward_skip_padding(lambda *a: calls.append(a) or "stock", layer, x, filled, layer.moe_runner_config)
    assert len(calls) == 1 and calls[0][2] is filled


def test_phase_and_batch_from_sglang_forward_context(sglang_topk, tmp_path) -> None:
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    class Batch:  # what forward_context reads from a ForwardBatch
        def __init__(self, mode, bs):
            self.forward_mode, self.batch_size = mode, bs

        def moe_num_token_non_padded(self):
            return None

    T = sglang_topk.T
    spec, topk_kw = _variant("softmax-renorm")
    _use(spec, 'policy "c" { layers when decode and batch >= 8 { k = 1 } }', tmp_path)
    topk = T.TopK(top_k=4, layer_id=1, **topk_kw)
    x = torch.randn(8, 16)
    h = torch.zeros(8, 8)

    def kept(mode, bs):
        with forward_context(ForwardContext(attn_backend=None), forward_batch=Batch(mode, bs)):
            return int((topk.forward_native(h, x).topk_weights > 0).sum())

    assert kept(ForwardMode.DECODE, 8) == 8  # k = 1
    assert kept(ForwardMode.DECODE, 4) == 32  # batch below 8: the model's own k
    assert kept(ForwardMode.EXTEND, 8) == 32  # prefill: the model's own k


def test_no_host_sync_and_repeatable(sglang_topk, tmp_path) -> None:
    from conftest import write_similarity

    from sgl_budget.routing import routed_per_policy

    spec, topk_kw = _variant("sigmoid-bias-grouped")
    write_similarity(spec, tmp_path)
    _use(spec, f'policy "all" {{ budget 50%; tokens {{ reallocate by score; min_k 1; max_k 4 }} '
               f'reroute {{ similarity "{spec.name}.sim.safetensors"; primary top 1; min_similarity 0.2 }} '
               f'piggyback {{ max_k 4 }} }}', tmp_path)
    routing = plugin._STATE["routing"]
    topk = sglang_topk.T.TopK(top_k=4, layer_id=2, **topk_kw)
    x = torch.randn(16, 16)
    router = routing.router(2, topk.topk_config, 16)
    router.prepare("cpu")
    ctx = RouteContext("decode", 16)
    rows = torch.tensor([0, 1] * 8)  # a mixed batch: the policy and stock rows
    mask = torch.arange(16) < 14  # two padded rows
    with _NoHostSync() as mode:
        w1, i1 = router(x, ctx, correction_bias=topk_kw["correction_bias"])
        wm, im = router(x, ctx, correction_bias=topk_kw["correction_bias"], row_policy=rows, row_mask=mask)
        routed_per_policy((im >= 0).sum(-1), rows, 2, mask)
    assert mode.seen == []
    w2, i2 = router(x, ctx, correction_bias=topk_kw["correction_bias"])
    assert torch.equal(w1, w2) and torch.equal(i1, i2)
    assert not torch.equal(im[rows == 0], im[rows == 1])
    a = topk.forward_native(torch.zeros(16, 8), x)
    b = topk.forward_native(torch.zeros(16, 8), x)
    assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_weights, b.topk_weights)


def test_recording_at_the_topk_level(sglang_topk, tmp_path) -> None:
    from sgl_budget.traces import load_trace

    spec, topk_kw = _variant("sigmoid-bias-grouped")
    _use(spec, None, tmp_path, record_dir=str(tmp_path / "rec"))
    layers = {l: sglang_topk.T.TopK(top_k=4, layer_id=l, **topk_kw) for l in spec.moe_layers}
    xs = [torch.randn(5, 16), torch.randn(3, 16)]
    for x in xs:  # two forwards through every MoE layer
        for l, topk in layers.items():
            topk.forward_native(torch.zeros(x.shape[0], 8), x + l)
    path = plugin._STATE["recorder"].flush()
    t = load_trace(path)
    assert not t.synthetic and "SGLang" in t.source and t.num_tokens == 8 and t.layers == (1, 2, 3)
    assert torch.equal(t.router_logits[2], torch.cat(xs).add(2).half())
    assert t.correction_bias is not None and torch.equal(t.correction_bias[1], topk_kw["correction_bias"])


def test_recording_keeps_the_file_current(sglang_topk, tmp_path, monkeypatch) -> None:
    """The trace on disk follows the traffic (a stopped server's workers are SIGKILLed: no atexit)."""
    from sgl_budget.engines.sglang import record
    from sgl_budget.traces import load_trace

    monkeypatch.setattr(record, "WRITE_EVERY_S", 0.0)
    spec, topk_kw = _variant("softmax-renorm")
    _use(spec, None, tmp_path, record_dir=str(tmp_path / "rec"))
    layers = {l: sglang_topk.T.TopK(top_k=4, layer_id=l, **topk_kw) for l in spec.moe_layers}
    for n in (5, 3, 2):  # a forward is closed when the next one starts
        x = torch.randn(n, 16)
        for l, topk in layers.items():
            topk.forward_native(torch.zeros(n, 8), x)
    (path,) = (tmp_path / "rec").glob("*.trace.safetensors")  # one file, rewritten, no temporary left
    assert load_trace(path).num_tokens == 8


def test_cuda_graph_padding_rows_are_left_out(sglang_topk, tmp_path) -> None:
    """num_token_non_padded: padded rows neither take Alloc-T slots nor count in the batch."""
    T = sglang_topk.T
    spec, topk_kw = _variant("softmax-renorm")
    _use(spec, 'policy "t" { budget 50%; tokens { reallocate by score; min_k 1; max_k 4 } }', tmp_path)
    topk = T.TopK(top_k=4, layer_id=1, **topk_kw)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2)) * 3
    x[5:] = 0
    out = topk.forward_native(torch.zeros(8, 8), x, num_token_non_padded=torch.tensor(5))
    assert int((out.topk_weights[:5] > 0).sum()) == 5 * 2
    assert (out.topk_weights[5:] == 0).all()


def test_fillers_prefer_experts_the_batch_loads() -> None:
    from sgl_budget.engines.sglang.routing import fill_padding

    ids = torch.tensor([[3, 5, -1, -1], [5, 7, 9, -1]], dtype=torch.int32)
    out = fill_padding(ids, ids >= 0, 16)
    assert out[0].tolist() == [3, 5, 7, 9] and out[1].tolist() == [5, 7, 9, 3]
    assert out.dtype == torch.int32


def test_policy_stats_leave_cuda_graph_padding_rows_out(sglang_topk, tmp_path) -> None:
    """A forward without a row map (as a CUDA-graph capture or replay) whose policies are all stock here runs
    SGLang's own top-k; the per-policy counts take num_token_non_padded as a row mask, not as a factor."""
    T = sglang_topk.T
    spec, topk_kw = _variant("softmax-renorm")
    _use(spec, 'policy "d" { layers when batch >= 1000 { k = 2 } }', tmp_path)  # batch 8: stock in every layer
    routing = plugin._STATE["routing"]
    topk = T.TopK(top_k=4, layer_id=1, **topk_kw)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    topk.forward_native(torch.zeros(8, 8), x, num_token_non_padded=torch.tensor(5))
    routing.stats._collect()
    assert routing.stats.token_layers == [5, 0] and routing.stats.slots == [5 * 4, 0]


def test_topk_check_refuses_what_the_spec_cannot_describe(sglang_topk) -> None:
    """A TopK with its own routing function (Llama 4's), or whose scoring differs from the spec, is refused at its
    first routed forward with the reason; SGLang's grouped biased path counts as sigmoid whatever scoring_func says."""
    from sgl_budget.engines.sglang.routing import check_topk_matches_spec

    T = sglang_topk.T
    spec, kw = _variant("deepseek-v3-as-built")
    check_topk_matches_spec(spec, T.TopK(top_k=4, layer_id=2, **kw).topk_config, 16, 2)  # scoring_func left default

    def llama4_router(hidden_states, gating_output, topk, renormalize):  # noqa: ARG001
        return None

    softmax, _ = _variant("softmax-renorm")
    custom = T.TopK(top_k=4, layer_id=2, renormalize=True, custom_routing_function=llama4_router).topk_config
    with pytest.raises(RuntimeError, match="routes with its own function .*llama4_router"):
        check_topk_matches_spec(softmax, custom, 16, 2)
    sigmoid = T.TopK(top_k=4, layer_id=2, renormalize=True, scoring_func="sigmoid").topk_config
    with pytest.raises(RuntimeError, match="scoring 'sigmoid' vs 'softmax'"):
        check_topk_matches_spec(softmax, sigmoid, 16, 2)
