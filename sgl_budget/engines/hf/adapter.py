"""Apply a compiled policy to a loaded Hugging Face transformers MoE model (for evaluation and recording).

Each MoE block's router (``block.gate``: Qwen2-MoE, Qwen3-MoE, OLMoE, Mixtral,
DeepSeek-V2, DeepSeek-V3 in transformers 5.x) gets the layer's compiled
:class:`~sgl_budget.routing.LayerRouter` — the same reference routing replay uses,
under the conventions of that model's own transformers code, so a policy that
asks for the model's own k leaves the logits bit-for-bit unchanged. Padded slots
become index ``num_experts``, which the transformers experts modules skip (their
one-hot has ``num_experts + 1`` classes), with weight 0.

The context (phase, batch) of a forward comes from the block input ``[B, S, H]``:
``S == 1`` is a decode step of B sequences, otherwise a prefill of B sequences and
B*S tokens; :meth:`PolicyHandle.context` overrides it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...lang.ir import PolicyIR, RouteContext
from ...routing import Conventions, LayerRouter
from ...spec import ModelSpec
from .experts import IMPLEMENTATION as DENSE_EXPERTS

# model_type -> (router logits computed in float32, weights cast back to the logits dtype, sorted top-k)
FAMILIES = {
    "qwen2_moe": (False, True, True),
    "qwen3_moe": (False, True, True),
    "olmoe": (False, True, True),
    "mixtral": (False, False, True),
    "deepseek_v2": (True, False, False),
    "deepseek_v3": (True, False, False),
}

PADDING_SAFE = ("eager", DENSE_EXPERTS)  # experts implementations that skip the padding index


class UnsupportedModel(ValueError):
    """A model whose MoE blocks the adapter does not know."""


def moe_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """``{decoder layer index: MoE block}`` for a transformers causal LM (blocks with ``gate`` and ``experts``)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise UnsupportedModel(f"{type(model).__name__} has no .model.layers")
    out = {}
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        if mlp is not None and hasattr(mlp, "gate") and hasattr(mlp, "experts") and hasattr(mlp.gate, "weight"):
            out[i] = mlp
    return out


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

    @contextmanager
    def context(self, phase: str, batch_size: int, num_tokens: int | None = None):
        """Route forwards inside the block with this context instead of the one inferred from shapes."""
        prev, self._forced = self._forced, RouteContext(phase, batch_size, num_tokens)  # type: ignore[arg-type]
        try:
            yield
        finally:
            self._forced = prev

    def remove(self) -> None:
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()

    def __enter__(self) -> "PolicyHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_policy(model: nn.Module, ir: PolicyIR) -> PolicyHandle:
    """Route every MoE block of ``model`` with ``ir`` (resolved against this model's spec)."""
    mt = model.config.model_type
    if mt not in FAMILIES:
        raise UnsupportedModel(f"model type {mt!r} is not supported by the transformers adapter "
                               f"(supported: {', '.join(FAMILIES)})")
    logits_fp32, cast_back, sorted_topk = FAMILIES[mt]
    spec = ir.spec
    blocks = moe_blocks(model)
    if sorted(blocks) != list(spec.moe_layers):
        raise UnsupportedModel(f"the model's MoE layers {sorted(blocks)} differ from the spec's {list(spec.moe_layers)}")
    conv = Conventions(sorted_selection=sorted_topk)
    handle = PolicyHandle(model, ir, {l: LayerRouter(ir, l, conv) for l in blocks})
    # transformers' grouped_mm / batched_mm experts mishandle the padding index on CPU (NaN rows were seen
    # with 5.19's fallback); a policy that pads runs the eager experts, which skip it. Own-k policies keep
    # whatever the model uses, so they stay bit-exact. sgl-budget's dense experts (experts.py) skip it too.
    impl = getattr(model.config, "_experts_implementation", None)
    if not ir.is_stock and impl not in PADDING_SAFE:
        model.config._experts_implementation = "eager"
        handle._restore.append(lambda: setattr(model.config, "_experts_implementation", impl))

    for layer, block in blocks.items():
        gate, router = block.gate, handle.routers[layer]

        def pre_hook(module, args, kwargs, handle=handle):
            h = args[0] if args else kwargs["hidden_states"]
            if h.dim() == 3:
                b, s = h.shape[0], h.shape[1]
                handle._ctx = RouteContext("decode", b, b) if s == 1 else RouteContext("prefill", b, b * s)
            return None

        def gate_forward(hidden_states, gate=gate, router=router, handle=handle):
            h = hidden_states.reshape(-1, gate.weight.shape[1])
            if logits_fp32:
                logits = F.linear(h.type(torch.float32), gate.weight.type(torch.float32))
            else:
                logits = F.linear(h, gate.weight)
            ctx = handle._forced or handle._ctx or RouteContext("prefill", 1, h.shape[0])
            bias = getattr(gate, "e_score_correction_bias", None) if spec.has_correction_bias else None
            weights, ids = router(logits, ctx, correction_bias=bias)
            ids = torch.where(ids >= 0, ids, spec.num_experts).long()
            if cast_back:
                weights = weights.to(logits.dtype)
            return logits, weights, ids

        pre = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
        original = gate.forward
        gate.forward = gate_forward
        handle._restore.append(pre.remove)
        handle._restore.append(lambda gate=gate, original=original: setattr(gate, "forward", original))
    return handle

