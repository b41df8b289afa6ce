"""Qwen3-Next and Qwen3.5-MoE through SGLang's own MoE class, in this process, on CPU (issue 17).

SGLang 0.5.23's CPU engine cannot run these models whole (their Gated DeltaNet attention needs
sgl_kernel's CPU ops), but their MoE layers are SGLang's ``Qwen2MoeSparseMoeBlock`` — the class
``qwen3_next.py`` and ``qwen3_5.py`` build, with the family's SGLang config object. Here that block runs
on CPU with sgl_budget's hooks installed as in a ``--device cpu`` worker that routes with a policy
(``plugin.register`` with ``SGLBUDGET_CPU_SERVING=1``, applied through SGLang's ``HookRegistry``: the
shared-expert gate's Triton kernel replaced by :mod:`.cpu_qwen2`, ``select_experts`` hooked, the native
MoE path taught to skip padded slots), with the weights of the transformers 5.19 block of the same family
loaded through SGLang's own ``weight_loader`` methods, and is checked against it:

* stock (no policy, and an own-k policy forced through sgl_budget's reference router): SGLang's block ==
  the transformers block;
* with policies installed through the plugin's state (uniform 50%, Alloc-T, a phase/batch-conditioned
  plan): SGLang's block == the transformers block under :func:`sgl_budget.engines.hf.apply_policy`, in the
  same route context (a direct block call has no forward batch: SGLang's hook routes it as a decode step
  at batch = tokens; inside a forward context it reads the phase and batch from the forward batch).

``SGLANG_USE_CPU_ENGINE`` is left unset: a block needs nothing it switches on (without AMX both settings
dispatch SGLang's ops to their torch-native forwards and the experts to ``moe_forward_native``), and
setting it in the pytest process would make sglang import ``sgl_kernel`` (the CUDA build here) and, on a
CPU with AMX, route the MoE and gates to sgl_kernel CPU ops that no stand-in provides.
"""

from __future__ import annotations

import json
import os
import socket
from types import SimpleNamespace

import pytest
import torch

if os.environ.get("SGL_BUDGET_REQUIRE_SGLANG"):
    import sglang  # noqa: F401  (CI: a missing sglang is a failure, not a skip)
    import transformers  # noqa: F401
pytest.importorskip("sglang", reason="install the sglang extra: pip install -e '.[sglang]'")
transformers = pytest.importorskip("transformers", reason="install the hf extra: pip install -e '.[hf]'")

from family_configs import QWEN3_5_MOE, QWEN3_5_MOE_TEXT, QWEN3_NEXT  # noqa: E402

from sgl_budget.engines.hf import apply_policy, moe_blocks, spec_of  # noqa: E402
from sgl_budget.engines.sglang import plugin  # noqa: E402
from sgl_budget.engines.sglang.cpu import ENV_ACTIVE  # noqa: E402
from sgl_budget.engines.sglang.settings import ENV_POLICY, ENV_SPEC, Settings, model_spec_for  # noqa: E402
from sgl_budget.lang import compile_policy  # noqa: E402

LAYER = 1  # a linear-attention (Gated DeltaNet) decoder layer of both families: its MLP is the MoE block
TOKENS = 12
ROUTER_STD = 0.5  # router weights ~ N(0, 0.5) (x25 transformers' init): decisive routing, no near-ties

# model_type -> (SGLang's config.json, the transformers text model's config.json)
FAMILIES = {
    "qwen3_next": (QWEN3_NEXT, QWEN3_NEXT),
    "qwen3_5_moe_text": (QWEN3_5_MOE_TEXT, QWEN3_5_MOE_TEXT),
    # the multimodal checkpoint: SGLang builds its language model from config.text_config; transformers' causal
    # LM of it is the qwen3_5_moe_text model (the adapter routes that one)
    "qwen3_5_moe": (QWEN3_5_MOE, QWEN3_5_MOE_TEXT),
}

UNIFORM_50 = 'policy "uniform-50" { budget 50%; layers { allocate uniform } }'
ALLOC_T = 'policy "alloc-t" { budget 50%; tokens { reallocate by score; min_k 0; max_k 4 } }'
PREFILL_ONLY = 'policy "prefill-k1" { layers when prefill and batch >= 2 { k = 1 } }'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sglang_cpu():
    """One CPU rank of SGLang (world size 1, gloo) with sgl_budget's hooks as a CPU-mode routing worker has them."""
    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.runtime_context import SpawnRanks, publish, reset_context
    from sglang.srt.server_args import ServerArgs

    saved = {k: os.environ.get(k) for k in (ENV_ACTIVE, ENV_POLICY)}
    os.environ[ENV_ACTIVE] = "1"  # a --device cpu launch's worker: register_worker_hooks() registers its hooks
    os.environ[ENV_POLICY] = "placeholder"  # ... of a launch that routes: the select_experts hook too
    try:
        plugin.register()
        HookRegistry.apply_hooks()  # what load_plugins() does after running the plugins
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    plugin._STATE.clear()

    import sglang.srt.models.qwen2_moe as qwen2_moe
    from sglang.srt.layers.moe import fused_moe_native, topk

    for fn in (topk.select_experts, qwen2_moe.fused_gate_sigmoid_mul_add, fused_moe_native.moe_forward_native):
        assert hasattr(fn, "__wrapped__"), f"{fn.__module__}.{fn.__name__} is not hooked"

    reset_context()
    publish(ServerArgs(model_path="dummy", device="cpu"), role="test", ranks=SpawnRanks(world_rank=0))
    started = not torch.distributed.is_initialized()
    if started:
        ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                        distributed_init_method=f"tcp://127.0.0.1:{_free_port()}")
    groups = not ps.model_parallel_is_initialized()
    if groups:
        ps.initialize_model_parallel(backend="gloo")
    try:
        yield qwen2_moe
    finally:
        plugin._STATE.clear()
        os.environ.pop(ENV_SPEC, None)
        if groups:
            ps.destroy_model_parallel()
        if started:
            ps.destroy_distributed_environment()
        reset_context()


def _sglang_config(cfg: dict):
    """SGLang's config object for this config.json, as its model class receives it."""
    from sglang.srt.utils.hf_transformers.common import _CONFIG_REGISTRY

    config = _CONFIG_REGISTRY[cfg["model_type"]](**{k: v for k, v in cfg.items() if k != "model_type"})
    return getattr(config, "text_config", config)  # Qwen3_5MoeForConditionalGeneration's language model


def _sglang_block(config):
    """``Qwen2MoeSparseMoeBlock`` as qwen3_next.py / qwen3_5.py construct it for a decoder layer on CPU."""
    from sglang.srt.models.qwen2_moe import Qwen2MoeSparseMoeBlock
    from sglang.srt.utils import add_prefix

    prefix = f"model.layers.{LAYER}"
    if config.model_type == "qwen3_next":  # Qwen3HybridLinearDecoderLayer
        return Qwen2MoeSparseMoeBlock(layer_id=LAYER, config=config, quant_config=None, alt_stream=None,
                                      prefix=add_prefix("mlp", prefix), is_nextn=False,
                                      support_shared_expert_fusion=True, enable_cuda_shared_expert_fusion=True,
                                      reduce_results=False)
    from sglang.srt.models import qwen3_5

    assert qwen3_5._qwen3_5_is_moe(config)
    return Qwen2MoeSparseMoeBlock(layer_id=LAYER, config=config, quant_config=None, alt_stream=None,
                                  prefix=add_prefix("mlp", prefix), is_nextn=False,
                                  support_shared_expert_fusion=not qwen3_5._disable_shared_experts_fusion(),
                                  reduce_results=False)


def hf_model(cfg: dict, layer: int = LAYER):
    """The transformers model of this config.json (float32, seed 0) and its MoE block of ``layer``."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return model, moe_blocks(model)[layer]


def randomise(named_parameters, router: str, ones: tuple[str, ...] = ()) -> torch.Generator:
    """New weights from a generator seeded 1, in order: the router's (``router`` and the parameters under it)
    ~ N(0, ROUTER_STD), those named in ``ones`` (ones at init: made to matter) ~ U(0.5, 2), the others ~ N(0, 0.1).
    Returns the generator, for further draws."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in named_parameters:
            if name in ones:
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.5)
            else:
                is_router = name == router or name.startswith(f"{router}.")
                p.copy_(torch.randn(p.shape, generator=g) * (ROUTER_STD if is_router else 0.1))
    return g


class WeightLoading:
    """Loading SGLang's block ``sgl`` through its parameters' own ``weight_loader`` (``default_weight_loader`` where
    there is none), by parameter name (``prefix`` + the name in ``sgl``), over NaN-filled parameters; :meth:`finish`
    then checks that every parameter was loaded and runs SGLang's post-loading step."""

    def __init__(self, sgl, prefix: str = "") -> None:
        self.sgl = sgl
        self.params = {f"{prefix}{n}": p for n, p in sgl.named_parameters()}
        with torch.no_grad():
            for p in self.params.values():  # every parameter must be written (integer ones: -1, e.g. an id table)
                p.fill_(float("nan") if p.is_floating_point() else -1)
        self.loaded: set[str] = set()

    def __call__(self, name: str, weight: torch.Tensor, *args, **kwargs) -> None:
        from sglang.srt.model_loader.weight_utils import default_weight_loader

        param = self.params[name]
        getattr(param, "weight_loader", default_weight_loader)(param, weight.detach(), *args, **kwargs)
        self.loaded.add(name)

    def finish(self) -> None:
        assert self.loaded == set(self.params), set(self.params) ^ self.loaded
        finish_loading(self.sgl)


def load_checkpoint(sgl, checkpoint: dict[str, torch.Tensor], *, stacked=(), experts=(), prefix: str = "",
                    unstacked: str | None = None, rename=None) -> None:
    """``checkpoint`` (names as a checkpoint holds them) into SGLang's block along the branches of a model's
    ``load_weights``: the ``stacked`` params mapping ``(param_name, weight_name, shard_id)`` (not for names holding
    ``unstacked``), else the experts' mapping (``make_expert_params_mapping``'s ``(param_name, weight_name,
    expert_id, shard_id)`` or ``make_expert_params_mapping_fused``'s ``(param_name, weight_name, shard_id)``), else
    the parameter of that name (after ``rename``); then :meth:`WeightLoading.finish`."""
    load = WeightLoading(sgl, prefix)
    for name, weight in checkpoint.items():
        for param_name, weight_name, shard_id in stacked:
            if weight_name in name and (unstacked is None or unstacked not in name):
                load(name.replace(weight_name, param_name), weight, shard_id)
                break
        else:
            for param_name, weight_name, *ids in experts:
                if weight_name in name:
                    name = name.replace(weight_name, param_name)
                    load(name, weight, name, **dict(zip(("expert_id", "shard_id")[-len(ids):], ids)))
                    break
            else:
                load(rename(name) if rename else name, weight)
    load.finish()


GATE_UP_STACKED = [(".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1)]  # a shared MLP's


def load_per_expert(sgl, hf, router: dict[str, torch.Tensor], names: tuple[str, str, str], *, experts: str,
                    shared: str, num_experts: int | None = None, **kwargs) -> None:
    """The transformers block ``hf`` (fused experts, a shared MLP) into SGLang's block as a per-expert checkpoint
    of it loads: the ``router`` weights (checkpoint name -> tensor), each expert's gate/up/down as
    ``{experts}.{e}.{name}.weight`` with ``names`` (SGLang's ``make_expert_params_mapping`` of them, for
    ``num_experts``: default the block's), and the shared MLP (``hf``'s attribute named as the last part of
    ``shared``) as ``{shared}.{gate,up,down}_proj.weight`` through :data:`GATE_UP_STACKED`; ``kwargs`` go to
    :func:`load_checkpoint`."""
    from sglang.srt.layers.moe.fused_moe_triton import FusedMoE

    w = dict(router)
    gate_w, up_w = hf.experts.gate_up_proj.chunk(2, dim=-2)  # [E, 2I, H]: gate rows first
    for e in range(hf.experts.num_experts):
        for name, weight in zip(names, (gate_w[e], up_w[e], hf.experts.down_proj[e])):
            w[f"{experts}.{e}.{name}.weight"] = weight
    shared_mlp = getattr(hf, shared.rsplit(".", 1)[-1])
    for proj in ("gate_proj", "up_proj", "down_proj"):
        w[f"{shared}.{proj}.weight"] = getattr(shared_mlp, proj).weight
    gate, up, down = names
    if num_experts is None:
        num_experts = hf.experts.num_experts
    mapping = FusedMoE.make_expert_params_mapping(ckpt_gate_proj_name=gate, ckpt_down_proj_name=down,
                                                  ckpt_up_proj_name=up, num_experts=num_experts)
    load_checkpoint(sgl, {k: v.detach() for k, v in w.items()}, stacked=GATE_UP_STACKED, experts=mapping, **kwargs)


def _load(sgl, hf) -> None:
    """The transformers block's weights into SGLang's block through SGLang's weight loaders, the way
    qwen3_5.py's load_weights loads a fused-experts checkpoint (and qwen3_next.py a per-expert one: the same
    weight_loader calls per expert), then the quant methods' post-loading step as SGLang's model loader runs it."""
    load = WeightLoading(sgl)
    load("gate.weight", hf.gate.weight)
    gate_w, up_w = hf.experts.gate_up_proj.chunk(2, dim=-2)  # [E, 2I, H]: gate rows first
    for e in range(hf.experts.num_experts):
        load("experts.w13_weight", gate_w[e], "experts.w13_weight", "w1", e)
        load("experts.w13_weight", up_w[e], "experts.w13_weight", "w3", e)
        load("experts.w2_weight", hf.experts.down_proj[e], "experts.w2_weight", "w2", e)
    load("shared_expert.gate_up_proj.weight", hf.shared_expert.gate_proj.weight, 0)
    load("shared_expert.gate_up_proj.weight", hf.shared_expert.up_proj.weight, 1)
    load("shared_expert.down_proj.weight", hf.shared_expert.down_proj.weight)
    load("shared_expert_gate.weight", hf.shared_expert_gate.weight)
    load.finish()


def finish_loading(sgl) -> None:
    """After a block's weights were loaded (over NaN-filled parameters): SGLang's post-load processing, and
    every parameter really written."""
    for module in sgl.modules():
        method = getattr(module, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)
    for name, p in sgl.named_parameters():
        assert not (p.isnan() if p.is_floating_point() else p == -1).any(), f"SGLang's {name} was not loaded"


SPEC_FIELDS = ("num_experts", "top_k", "moe_layers", "scoring_func", "norm_topk_prob", "grouped",
               "has_correction_bias", "routed_scaling_factor")


def block_family(name: str, sgl, model, block, directory, fields=SPEC_FIELDS, **extra) -> SimpleNamespace:
    """A family's blocks for the checks: the spec the launcher publishes to the workers for the checkpoint whose
    ``config.json`` is in ``directory`` equals the adapter's spec of ``model`` on ``fields``."""
    spec = model_spec_for(str(directory))
    hf_spec = spec_of(model)
    for field in fields:
        assert getattr(spec, field) == getattr(hf_spec, field), field
    return SimpleNamespace(name=name, sgl=sgl, model=model, block=block, spec=spec, hf_spec=hf_spec, dir=directory,
                           **extra)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, sglang_cpu, tmp_path_factory):
    sgl_cfg, hf_cfg = FAMILIES[request.param]
    config = _sglang_config(sgl_cfg)
    sgl = _sglang_block(config).eval()
    # the CPU path: a separate shared expert with its gate (no fusion), SGLang's own TopK and FusedMoE
    assert sgl.shared_expert is not None and sgl.num_fused_shared_experts == 0
    assert isinstance(sgl.shared_expert_gate, torch.nn.Linear)
    model, block = hf_model(hf_cfg)
    randomise(block.named_parameters(), router="gate.weight")
    _load(sgl, block)
    directory = tmp_path_factory.mktemp(request.param)
    (directory / "config.json").write_text(json.dumps(sgl_cfg))
    family = block_family(request.param, sgl, model, block, directory)
    assert family.spec.model_type == config.model_type  # qwen3_5_moe: the spec of its text model, as SGLang builds it
    return family


def _use(family, policy_text: str | None, stock_fast_path: bool = True) -> None:
    """Point this process's plugin state at a policy, as a worker does from its environment."""
    os.environ[ENV_SPEC] = json.dumps(family.spec.to_dict())
    path = None
    if policy_text is not None:
        path = family.dir / "p.policy"
        path.write_text(policy_text)
    plugin._STATE.clear()
    plugin.activate(Settings(policy=str(path) if path else None))
    routing = plugin._STATE.get("routing")
    assert (routing is None) == (policy_text is None)
    if routing is not None:
        routing.stock_fast_path = stock_fast_path


def _x(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, seq, 64, generator=torch.Generator().manual_seed(seed))


def _sglang(family, x: torch.Tensor, forward_batch=None) -> tuple[torch.Tensor, int]:
    """SGLang's block on ``x`` flattened to tokens; the output ``[B, S, H]`` and the routed (token, expert) pairs.

    Padded slots (weight 0) are id -1 where the CPU path is SGLang's ``moe_forward_native`` with sgl_budget's hook
    (no AMX), which then computes only the kept pairs; with AMX they hold an expert the token does not use."""
    from sgl_budget.engines.sglang.native_moe import native_path_skips_minus_one

    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    seen = []
    hook = family.sgl.topk.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            if forward_batch is None:
                out = family.sgl(x.reshape(-1, x.shape[-1]))
            else:
                with forward_context(ForwardContext(attn_backend=None), forward_batch=forward_batch):
                    out = family.sgl(x.reshape(-1, x.shape[-1]), forward_batch)
    finally:
        hook.remove()
    (topk_out,) = seen
    kept = topk_out.topk_weights > 0
    padded = topk_out.topk_ids[~kept]
    assert bool((padded == -1).all() if native_path_skips_minus_one() else (padded >= 0).all())
    return out.reshape(x.shape), int(kept.sum())


def _hf(family, x: torch.Tensor, policy_text: str | None = None, context=None) -> tuple[torch.Tensor, int]:
    """The transformers block on ``x`` ``[B, S, H]`` (under the adapter with ``policy_text`` on the whole model):
    its output and the (token, expert) pairs it routed. The router is ``block.gate`` (``block.router``: GPT-OSS)."""
    seen = []
    router = getattr(family.block, "router", None) or family.block.gate
    hook = router.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            if policy_text is None:
                out = family.block(x)
            else:
                with apply_policy(family.model, compile_policy(policy_text, family.hf_spec)) as handle:
                    if context is None:
                        out = family.block(x)
                    else:
                        with handle.context(*context):
                            out = family.block(x)
    finally:
        hook.remove()
    out = out[0] if isinstance(out, tuple) else out  # GPT-OSS's block also returns its router scores
    (_, weights, ids), = seen
    return out, int(((ids < family.hf_spec.num_experts) & (weights > 0)).sum())


class _Batch:
    """What SGLang's forward context reads from a ForwardBatch (sgl_budget reads the mode and batch size)."""

    def __init__(self, mode, batch_size: int):
        self.forward_mode, self.batch_size = mode, batch_size

    def moe_num_token_non_padded(self):
        return None


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}")


def check_stock_block(family, run_block=None) -> tuple[torch.Tensor, torch.Tensor]:
    """SGLang's block without a policy == the transformers block, and so is the model's own k through sgl_budget's
    reference router (SGLang's fast path for stock plans turned off); returns (SGLang's stock, own-k) outputs.
    ``run_block`` runs SGLang's block (default: :func:`_sglang`); every family's in-process test calls this."""
    run = run_block or _sglang
    name = getattr(family, "name", family.hf_spec.model_type)
    x = _x(1, TOKENS, 2)
    want, want_pairs = _hf(family, x)
    _use(family, None)  # no policy: the hook hands every call to SGLang's own select_experts
    got, pairs = run(family, x)
    assert pairs == want_pairs == TOKENS * family.spec.top_k
    _close(got, want, f"{name} stock")
    _use(family, f'policy "own-k" {{ layers {{ k = {family.spec.top_k} }} }}', stock_fast_path=False)
    own, _ = run(family, x)
    _close(own, want, f"{name} own-k via sgl_budget's router")
    return got, own


def check_policy_block(family, policy: str, run_block=None) -> None:
    """SGLang's block under ``policy`` == the transformers block under the adapter, and the policy changes it."""
    run = run_block or _sglang
    name = getattr(family, "name", family.hf_spec.model_type)
    x = _x(1, TOKENS, 3)
    stock, _ = _hf(family, x)
    # a direct block call has no forward batch: SGLang's hook routes it as a decode step at batch = tokens
    want, want_pairs = _hf(family, x, policy, context=("decode", TOKENS, TOKENS))
    _use(family, policy)
    got, pairs = run(family, x)
    assert pairs == want_pairs == TOKENS * family.spec.top_k // 2  # 50% of the model's top-k, per layer
    assert not torch.allclose(want, stock, rtol=1e-3, atol=1e-3)  # the policy really changes the output
    _close(got, want, f"{name} {policy}")


def test_stock_block_equals_transformers(family) -> None:
    check_stock_block(family)


@pytest.mark.parametrize("policy", [UNIFORM_50, ALLOC_T], ids=["uniform-50", "alloc-t"])
def test_policy_block_equals_the_adapter(family, policy) -> None:
    check_policy_block(family, policy)


def test_route_context_from_the_forward_batch(family) -> None:
    """Inside a forward, the phase and batch come from SGLang's forward batch; the adapter infers the same from
    the block input ``[B, S, H]``: a plan conditioned on them is the same plan in both engines."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    x = _x(2, TOKENS // 2, 4)
    stock, _ = _hf(family, x)
    want, want_pairs = _hf(family, x, PREFILL_ONLY)  # [2, 6, H]: a prefill of 2 sequences: k = 1
    _use(family, PREFILL_ONLY)
    got, pairs = _sglang(family, x, _Batch(ForwardMode.EXTEND, 2))
    assert pairs == want_pairs == TOKENS
    _close(got, want, f"{family.name} prefill, batch 2")
    assert not torch.allclose(want, stock, rtol=1e-3, atol=1e-3)
    # a decode step of the same tokens, and a direct call (no forward batch: decode), keep the model's own k
    decode, decode_pairs = _sglang(family, x, _Batch(ForwardMode.DECODE, TOKENS))
    direct, direct_pairs = _sglang(family, x)
    assert decode_pairs == direct_pairs == TOKENS * family.spec.top_k
    _close(decode, stock, f"{family.name} decode")
    _close(direct, stock, f"{family.name} no forward batch")
