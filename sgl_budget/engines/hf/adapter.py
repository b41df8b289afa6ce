"""Apply a compiled policy to a loaded Hugging Face transformers MoE model (for evaluation and recording).

Each MoE block's router (``block.gate``: Qwen2-MoE, Qwen3-MoE, OLMoE, Mixtral,
DeepSeek-V2, DeepSeek-V3 in transformers 5.x) gets the layer's compiled
:class:`~sgl_budget.routing.LayerRouter` — the same reference routing replay uses,
under the conventions of that model's own transformers code, so a policy that
asks for the model's own k leaves the logits bit-for-bit unchanged. Padded slots
become index ``num_experts``, which the transformers experts modules skip (their
one-hot has ``num_experts + 1`` classes), with weight 0. GPT-OSS (router ``mlp.router``, a
linear with a bias; weights = softmax over the chosen experts' logits) is described by its
:class:`~sgl_budget.families.HfFacts`; its eager experts cannot take the padding index, so a
padding policy runs sgl_budget's padding-safe experts forward (:mod:`.experts`). Gemma 4's router and
experts sit on the decoder layer (the "block" is the layer); its router normalises its input before the
projection, returns its softmax first, and the weights get the layer's per-expert scale last
(:func:`~sgl_budget.routing.scoring.apply_expert_scale`). DeepSeek-V4's routed layers score, select and weigh in the
logits' dtype (``HfFacts.scores_in_logit_dtype``); its hash layers (``block.is_hash``) are left alone.

The context (phase, batch) of a forward comes from the block input ``[B, S, H]``:
``S == 1`` is a decode step of B sequences, otherwise a prefill of B sequences and
B*S tokens; :meth:`PolicyHandle.context` overrides it.

:func:`apply_policy_mix` routes each batch row (sequence) with its own policy of a
:class:`~sgl_budget.lang.policy_set.PolicySet` (see :mod:`sgl_budget.routing.mixed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...lang.ir import PolicyIR, RouteContext
from ...lang.policy_set import PolicySet
from ...routing import Conventions, LayerRouter, MixedRouter, RouteOutput
from ...families import FAMILIES, HfFacts, family_of, hf_refusal
from ...routing.scoring import apply_expert_scale
from ...spec import ModelSpec
from .experts import IMPLEMENTATION as DENSE_EXPERTS
from .experts import register as register_dense_experts

PADDING_SAFE = ("eager", DENSE_EXPERTS)  # experts implementations that skip the padding index


class UnsupportedModel(ValueError):
    """A model whose MoE blocks the adapter does not know."""


def moe_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """``{decoder layer index: MoE block}`` for a transformers causal LM (blocks with a router and ``experts``; not
    the blocks the family marks as never policy-routed: DeepSeek-V4's hash layers)."""
    inner = getattr(model, "model", model)
    # a multimodal model (Gemma 4's ForConditionalGeneration) keeps its decoder layers in its language model
    layers = getattr(inner, "layers", None) or getattr(getattr(inner, "language_model", None), "layers", None)
    if layers is None:
        raise UnsupportedModel(f"{type(model).__name__} has no .model.layers")
    facts = hf_facts_of(model)
    out = {}
    for i, layer in enumerate(layers):
        # Gemma 4: the router and the experts are the decoder layer's own (its mlp is a dense MLP beside them)
        mlp = layer if facts.moe_on_layer else getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        gate = getattr(mlp, facts.router, None)
        if facts.stock_block and getattr(mlp, facts.stock_block, False):
            continue  # DeepSeek-V4's hash layers: experts from a token-id table, no policy routes them
        if gate is not None and hasattr(mlp, "experts") and _has_path(gate, facts.router_weight):
            out[i] = mlp
    return out


def hf_facts_of(model: nn.Module) -> HfFacts:
    """This model's family's transformers facts (the defaults, ``block.gate.weight``, for a model of no family)."""
    fam = family_of(getattr(getattr(model, "config", None), "model_type", None) or "")
    return fam.hf if fam is not None and fam.hf is not None else HfFacts()


def _has_path(obj, path: str) -> bool:
    try:
        _attr_path(obj, path)
    except AttributeError:
        return False
    return True


def router_of(model: nn.Module, block: nn.Module) -> nn.Module:
    """The router module of one of ``model``'s MoE blocks (``block.gate``; GPT-OSS: ``block.router``)."""
    return getattr(block, hf_facts_of(model).router)


def spec_of(model: nn.Module) -> ModelSpec:
    """The model spec of a loaded transformers model, from its config."""
    return ModelSpec.from_hf_config(model.config.to_dict(), name=getattr(model.config, "_name_or_path", "") or
                                    model.config.model_type)


@dataclass
class PolicyHandle:
    """A policy applied to a model; :meth:`remove` restores the model's own routing."""

    model: nn.Module
    ir: PolicyIR
    routers: dict[int, LayerRouter]
    _restore: list = field(default_factory=list)
    _ctx: RouteContext | None = None
    _forced: RouteContext | None = None
    _rows: int = 1  # sequences (B) of the current forward

    @contextmanager
    def context(self, phase: str, batch_size: int, num_tokens: int | None = None):
        """Route forwards inside the block with this context instead of the one inferred from shapes."""
        prev, self._forced = self._forced, RouteContext(phase, batch_size, num_tokens)  # type: ignore[arg-type]
        try:
            yield
        finally:
            self._forced = prev

    def route(self, layer: int, logits: Tensor, ctx: RouteContext, bias: Tensor | None) -> RouteOutput:
        """One MoE layer's routing of the forward's ``[B*S, E]`` logits."""
        return self.routers[layer](logits, ctx, correction_bias=bias)

    def remove(self) -> None:
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()

    def __enter__(self) -> "PolicyHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass
class PolicyMixHandle(PolicyHandle):
    """A policy *mix* applied to a model: batch row (sequence) b is routed by policy ``row_policy[b]``.

    :attr:`ir` is the first policy of the set, :attr:`routers` its routers; :attr:`mixed` routes every layer.
    """

    policies: PolicySet | None = None
    mixed: dict[int, MixedRouter] = field(default_factory=dict)
    row_policy: Tensor | None = None  # [B] int64 policy ids
    uniform: int | None = None  # every row uses this policy (known on the host)

    def set_rows(self, row_policy: Sequence[int] | Tensor) -> None:
        """Use this row -> policy map (``[B]`` ids of :attr:`policies`) from the next forward on.

        A map whose rows all name one policy routes every batch with it, whatever its size; a mixed map must
        have one id per sequence of the forward (a ValueError otherwise).
        """
        rows = torch.as_tensor(row_policy, dtype=torch.int64).flatten()
        n = len(self.policies) if self.policies is not None else 1
        if rows.numel() == 0 or int(rows.min()) < 0 or int(rows.max()) >= n:
            raise ValueError(f"row -> policy ids must lie in 0..{n - 1} (one per batch row), got {rows.tolist()}")
        self.row_policy = rows
        first = int(rows[0])
        self.uniform = first if bool((rows == first).all()) else None

    def route(self, layer: int, logits: Tensor, ctx: RouteContext, bias: Tensor | None) -> RouteOutput:
        assert self.row_policy is not None
        if self.uniform is not None:
            return self.mixed[layer](logits, ctx, bias, uniform=self.uniform)
        b = self.row_policy.numel()
        if b != self._rows or logits.shape[0] % b:
            raise ValueError(f"the row -> policy map has {b} rows, the forward {self._rows} sequences "
                             f"({logits.shape[0]} tokens): call set_rows() with one policy per sequence")
        rows = self.row_policy.to(logits.device).repeat_interleave(logits.shape[0] // b)  # token (b, s) -> row b
        return self.mixed[layer](logits, ctx, bias, row_policy=rows)


def _check_model(model: nn.Module, spec: ModelSpec) -> tuple[dict[int, nn.Module], Conventions]:
    """The model's MoE blocks and its family's routing conventions (UnsupportedModel if unknown)."""
    mt = model.config.model_type
    refusal = hf_refusal(mt)
    if refusal:
        raise UnsupportedModel(refusal)
    blocks = moe_blocks(model)
    if sorted(blocks) != list(spec.moe_layers):
        raise UnsupportedModel(f"the model's MoE layers {sorted(blocks)} differ from the spec's {list(spec.moe_layers)}")
    facts = hf_facts(mt)
    if spec.has_expert_scale and not facts.expert_scale:
        raise UnsupportedModel(f"the spec of {spec.name!r} has a per-expert scale the family's router does not name")
    clamp = float(getattr(model.config, facts.renorm_clamp)) if facts.renorm_clamp else None
    return blocks, Conventions(sorted_selection=facts.sorted_selection, renorm_clamp_min=clamp,
                               weights_from_selected_logits=facts.weights_from_selected_logits,
                               scores_in_logit_dtype=facts.scores_in_logit_dtype)


def hf_facts(model_type: str) -> HfFacts:
    """The family's transformers router facts (:mod:`sgl_budget.families`); only for families the adapter takes."""
    fam = family_of(model_type)  # gemma4_text: the gemma4 row
    facts = fam.hf if fam is not None else None
    assert facts is not None
    return facts


def _install(handle: PolicyHandle, blocks: dict[int, nn.Module], spec: ModelSpec, pads: bool) -> PolicyHandle:
    """Hook every MoE block's gate of ``handle.model`` to route with :meth:`PolicyHandle.route`."""
    model = handle.model
    facts = hf_facts(model.config.model_type)
    logits_fp32, cast_back = facts.logits_fp32, facts.cast_back
    # transformers' grouped_mm / batched_mm experts mishandle the padding index on CPU (NaN rows were seen
    # with 5.19's fallback); a policy that pads runs the eager experts, which skip it. Own-k policies keep
    # whatever the model uses, so they stay bit-exact. sgl-budget's dense experts (experts.py) skip it too.
    # GPT-OSS's eager experts cannot take the padding index (experts_skip_padding False): the dense forward
    # (experts.py), which runs its layout and skips padding at every batch size, routes a padding policy there.
    impl = getattr(model.config, "_experts_implementation", None)
    if pads and impl not in (PADDING_SAFE if facts.experts_skip_padding else (DENSE_EXPERTS,)):
        model.config._experts_implementation = "eager" if facts.experts_skip_padding else register_dense_experts()
        handle._restore.append(lambda: setattr(model.config, "_experts_implementation", impl))

    for layer, block in blocks.items():
        gate = getattr(block, facts.router)
        weight = _attr_path(gate, facts.router_weight)
        router_bias = _attr_path(gate, facts.router_bias) if facts.router_bias else None

        def pre_hook(module, args, kwargs, handle=handle):
            h = args[0] if args else kwargs["hidden_states"]
            if h.dim() == 3:
                b, s = h.shape[0], h.shape[1]
                handle._ctx = RouteContext("decode", b, b) if s == 1 else RouteContext("prefill", b, b * s)
                handle._rows = b
            return None

        def gate_forward(hidden_states, *bias_arg, gate=gate, weight=weight, layer=layer, handle=handle,
                         block=block, router_bias=router_bias):  # MiniMax-M2's block passes its correction bias
            h = hidden_states.reshape(-1, weight.shape[1])
            if facts.router_input_norm:  # Gemma4TextRouter.forward's own ops, in its order
                h = gate.norm(h)
                h = h * gate.scale * gate.scalar_root_size
            if facts.router_returns_probs:  # its projection module itself (recording hooks its output: the logits)
                logits = _attr_path(gate, facts.router_weight.rpartition(".")[0])(h)
            elif logits_fp32:
                logits = F.linear(h.type(torch.float32), weight.type(torch.float32),
                                  None if router_bias is None else router_bias.type(torch.float32))
            else:
                logits = F.linear(h, weight, router_bias)  # GPT-OSS's router is a linear with a bias
            ctx = handle._forced or handle._ctx or RouteContext("prefill", 1, h.shape[0])
            bias = ((bias_arg[0] if bias_arg else correction_bias(block, facts.correction_bias))
                    if spec.has_correction_bias else None)
            weights, ids = handle.route(layer, logits, ctx, bias)
            if spec.has_expert_scale:  # Gemma 4: x per_expert_scale of each slot's expert, in float32 as it does
                weights = apply_expert_scale(weights, ids, _attr_path(gate, facts.expert_scale))
            ids = torch.where(ids >= 0, ids, spec.num_experts).long()
            if cast_back:  # ERNIE casts to the hidden states' dtype (its logits are float32)
                weights = weights.to(hidden_states.dtype if facts.weights_to_hidden_dtype else logits.dtype)
            if facts.router_returns_probs:  # Gemma 4's router returns its float32 softmax first
                return F.softmax(logits, dim=-1, dtype=torch.float32), weights, ids
            return logits, weights, ids

        pre = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
        original = gate.forward
        gate.forward = gate_forward
        handle._restore.append(pre.remove)
        handle._restore.append(lambda gate=gate, original=original: setattr(gate, "forward", original))
    return handle


def correction_bias(block: nn.Module, path: str) -> Tensor:
    """A MoE block's correction bias at ``path`` (its family's ``HfFacts.correction_bias``: on the router for
    DeepSeek-V3 / GLM-4, on the block for MiniMax-M2, ``gate.moe_statics`` for ERNIE), as ``[E]`` (ERNIE's is
    ``[1, E]``)."""
    bias = _attr_path(block, path)
    return bias.reshape(bias.shape[-1]) if bias.dim() == 2 and bias.shape[0] == 1 else bias


def _attr_path(obj, path: str):
    """``obj.a.b`` for ``path`` ``"a.b"``."""
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def apply_policy(model: nn.Module, ir: PolicyIR) -> PolicyHandle:
    """Route every MoE block of ``model`` with ``ir`` (resolved against this model's spec)."""
    blocks, conv = _check_model(model, ir.spec)
    handle = PolicyHandle(model, ir, {l: LayerRouter(ir, l, conv) for l in blocks})
    return _install(handle, blocks, ir.spec, pads=not ir.is_stock)


def apply_policy_mix(model: nn.Module, policies: PolicySet, row_policy: Sequence[int] | Tensor) -> PolicyMixHandle:
    """Route batch row b (sequence b of the ``[B, S]`` input) of every forward with ``policies`` id ``row_policy[b]``.

    Each layer routes with a :class:`~sgl_budget.routing.MixedRouter` of the policies' routers (per-token rules
    per row; Alloc-T, SERE and piggybacking within the rows of one policy; ``when batch`` sees all B rows).
    A map whose rows all name one policy routes exactly as :func:`apply_policy` with it. Change the map between
    forwards with :meth:`PolicyMixHandle.set_rows`; it is per sequence, so prefill and decode steps share it.
    """
    spec = policies.irs[0].spec
    blocks, conv = _check_model(model, spec)
    per_layer = {l: [LayerRouter(ir, l, conv) for ir in policies.irs] for l in blocks}
    handle = PolicyMixHandle(model, policies.irs[0], {l: rs[0] for l, rs in per_layer.items()}, policies=policies,
                             mixed={l: MixedRouter(rs) for l, rs in per_layer.items()})
    handle.set_rows(row_policy)
    return _install(handle, blocks, spec, pads=not all(ir.is_stock for ir in policies.irs))
