"""Compile a resolved policy into per-layer routers: ``route(router_logits, ctx) -> (topk_weights, topk_ids)``.

A :class:`LayerRouter` runs one MoE layer's plan for the forward's context:
selection (per-layer top-k, or Alloc-T reallocation), SERE re-routing,
OEA piggybacking, then compaction to the layer's static width ``K_max`` with
padding slots (id -1, weight 0) last, and the model's own weight rule.

Shapes are static per layer, nothing synchronises with the host, and the
plan is chosen from the context on the host, so a decode step can be captured
in a CUDA graph. Inputs may be ``[T, E]`` (one batch, as engines call it) or
``[N, T, E]`` (N independent batches at once, as replay does).
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch
from torch import Tensor

from ..lang.ir import LayerPlan, PolicyIR, RouteContext
from .outputs import RouteDetails, RouteOutput, pad_output
from .adaptive import adaptive_select, adaptive_slots
from .piggyback import piggyback
from .reallocate import reallocate
from .reroute import RerouteTables, reroute_slots
from .scoring import REFERENCE, Conventions, GateScores, finalize_weights, gate_probs, score_experts
from .slots import Slots, compact, pad
from .topk import select_topk


class LayerRouter:
    """The compiled routing of one MoE layer (real layer index ``layer``) of a policy."""

    def __init__(self, ir: PolicyIR, layer: int, conventions: Conventions = REFERENCE) -> None:
        if not ir.spec.is_moe_layer(layer):
            raise ValueError(f"layer {layer} is not an MoE layer of {ir.spec.name}")
        self.ir, self.spec, self.layer, self.conv = ir, ir.spec, layer, conventions
        self.width = ir.widths.get(layer, ir.spec.top_k)
        self._tables: dict[tuple[int, str], RerouteTables] = {}

    def __repr__(self) -> str:
        return f"LayerRouter(policy={self.ir.name!r}, layer={self.layer}, width={self.width})"

    def plan(self, ctx: RouteContext) -> LayerPlan:
        return self.ir.plan(self.layer, ctx)

    def prepare(self, device: torch.device | str) -> None:
        """Move every re-routing table of this layer to ``device`` now (call before CUDA-graph capture)."""
        dev = torch.device(device)
        for rule in self.ir.reroute_rules:
            rr = rule.value.per_layer[self.layer]
            key = (id(rr), str(dev))
            if key not in self._tables:
                self._tables[key] = RerouteTables.build(rr, self.spec.num_experts, dev)

    def _reroute_tables(self, plan: LayerPlan, device: torch.device) -> RerouteTables:
        rr = plan.reroute
        assert rr is not None
        key = (id(rr), str(device))
        if key not in self._tables:
            self.prepare(device)
        return self._tables[key]

    # -- the routing itself ---------------------------------------------------------
    def __call__(self, router_logits: Tensor, ctx: RouteContext | None = None,
                 correction_bias: Tensor | None = None, row_mask: Tensor | None = None) -> RouteOutput:
        """``(topk_weights [.., T, K_max] float32, topk_ids [.., T, K_max] int32)``; padding id -1, weight 0.

        ``row_mask`` ``[.., T]`` bool marks real tokens (see :meth:`route_scores`).
        """
        return self._route(router_logits, ctx, correction_bias, details=False,  # type: ignore[return-value]
                           row_mask=row_mask)

    def details(self, router_logits: Tensor, ctx: RouteContext | None = None,
                correction_bias: Tensor | None = None) -> RouteDetails:
        """Like ``__call__`` plus per-slot provenance and the routing distribution (for replay/tests)."""
        return self._route(router_logits, ctx, correction_bias, details=True)  # type: ignore[return-value]

    def _route(self, router_logits: Tensor, ctx: RouteContext | None, correction_bias: Tensor | None,
               details: bool, row_mask: Tensor | None = None) -> RouteOutput | RouteDetails:
        if router_logits.dim() not in (2, 3) or router_logits.shape[-1] != self.spec.num_experts:
            raise ValueError(f"router_logits must be [T, {self.spec.num_experts}] or [N, T, "
                             f"{self.spec.num_experts}], not {list(router_logits.shape)}")
        single = router_logits.dim() == 2
        logits = router_logits.unsqueeze(0) if single else router_logits
        t = logits.shape[1]
        ctx = ctx or RouteContext(phase="decode", batch_size=max(1, t), num_tokens=max(1, t))
        gs = score_experts(self.spec, logits, correction_bias, self.conv)
        if row_mask is not None and single:
            row_mask = row_mask.unsqueeze(0)
        out = self.route_scores(gs, ctx, details=details, row_mask=row_mask)
        if details:
            out = replace(out, probs=gate_probs(self.spec, logits))
        if not single:
            return out
        if isinstance(out, RouteOutput):
            return RouteOutput(out.topk_weights[0], out.topk_ids[0])
        return RouteDetails(**{f.name: (None if getattr(out, f.name) is None else getattr(out, f.name)[0])
                               for f in fields(RouteDetails)})

    def route_scores(self, gs: GateScores, ctx: RouteContext, details: bool = False,
                     row_mask: Tensor | None = None) -> RouteOutput | RouteDetails:
        """Route already-scored ``[N, T, E]`` batches (replay scores once and shares across policies).

        ``row_mask`` (``[N, T]`` bool, a device tensor) marks the real tokens: padded rows (SGLang pads
        decode batches to a CUDA-graph size) take no part in Alloc-T, SERE or piggybacking and get
        no slots. With ``details`` the result's ``probs`` is None (the caller has the scores).
        """
        plan = self.plan(ctx)
        assert plan.k <= self.width, (plan, self.width)
        if plan.is_stock_shape and not details:  # padded rows are routed too; the engine masks them
            slots = select_topk(gs, plan.k, maybe_masked=False, stock=self.is_stock_plan(plan),
                                sorted=self.conv.sorted_selection)
            w = finalize_weights(self.spec, gs.weight_source(slots.ids, slots.raw), None, self.conv)  # pads last
            return pad_output(RouteOutput(w, slots.ids.to(torch.int32)), self.width)

        if plan.adaptive is not None and plan.reroute is None and plan.piggyback is None and not details:
            # a per-token rule alone: its kept slots are already a prefix, so no compaction (what serving runs)
            ids, valid = adaptive_slots(gs, plan.adaptive, row_mask)
            raw = gs.scores.gather(-1, ids).masked_fill(~valid, 0.0)
            w = finalize_weights(self.spec, gs.weight_source(ids, raw), valid, self.conv)
            return pad_output(RouteOutput(w, ids.masked_fill(~valid, -1).to(torch.int32)), self.width)
        slots, primary, n_moved = self._stages(plan, gs, gs.scores.device, row_mask)
        slots = pad(slots, self.width) if plan.is_stock_shape else compact(slots, self.width)
        if plan.is_stock_shape:
            w = finalize_weights(self.spec, gs.weight_source(slots.ids[..., : plan.k], slots.raw[..., : plan.k]),
                                 None, self.conv)
            w = torch.cat([w, w.new_zeros(*w.shape[:-1], self.width - plan.k)], dim=-1)
        else:
            w = finalize_weights(self.spec, gs.weight_source(slots.ids, slots.raw), slots.valid, self.conv)
        ids = torch.where(slots.valid, slots.ids, torch.full_like(slots.ids, -1)).to(torch.int32)
        if not details:
            return RouteOutput(w, ids)
        if n_moved is None:
            n_moved = torch.zeros(slots.ids.shape[:-1], dtype=torch.int32, device=ids.device)
        return RouteDetails(topk_weights=w, topk_ids=ids, rerouted=slots.rerouted, piggybacked=slots.piggybacked,
                            probs=None, num_rerouted=n_moved, primary=primary)

    def is_stock_plan(self, plan: LayerPlan) -> bool:
        """The model's own k and nothing else: routed by the engine's own top-k (its tie order included)."""
        return plan.is_stock_shape and plan.k == self.spec.top_k

    def _stages(self, plan: LayerPlan, gs, device: torch.device,
                row_mask: Tensor | None = None) -> tuple[Slots, Tensor | None, Tensor | None]:
        # past the stock path selection is always sorted: SERE's "top S" means each token's best S slots
        if plan.reallocation is not None:
            slots = reallocate(gs, plan.k, plan.reallocation, sigmoid=self.spec.scoring_func != "softmax",
                               row_mask=row_mask)
        elif plan.adaptive is not None:  # per token: no other row changes what a token keeps
            slots = adaptive_select(gs, plan.adaptive, row_mask=row_mask)
        else:
            slots = select_topk(gs, plan.k, maybe_masked=False, stock=self.is_stock_plan(plan))
        if row_mask is not None:
            slots = slots.with_(valid=slots.valid & row_mask.unsqueeze(-1))
            slots = slots.with_(raw=slots.raw.masked_fill(~slots.valid, 0.0))
        primary = n_moved = None
        if plan.reroute is not None:
            slots, primary, n_moved = reroute_slots(slots, plan.reroute, self._reroute_tables(plan, device))
        if plan.piggyback is not None:
            slots = piggyback(slots, gs, plan.piggyback, maybe_masked=self.spec.grouped, row_mask=row_mask)
        return slots, primary, n_moved


def compile_routers(ir: PolicyIR, conventions: Conventions = REFERENCE) -> dict[int, LayerRouter]:
    """One :class:`LayerRouter` per MoE layer, keyed by the real layer index."""
    return {layer: LayerRouter(ir, layer, conventions) for layer in ir.spec.moe_layers}


def stock_route(spec, router_logits: Tensor, correction_bias: Tensor | None = None,
                gs: GateScores | None = None) -> RouteOutput:
    """The model's own top-k routing (the baseline every policy is compared with; engine tie order)."""
    gs = gs if gs is not None else score_experts(spec, router_logits, correction_bias)
    slots = select_topk(gs, spec.top_k, maybe_masked=False, stock=True)
    return RouteOutput(finalize_weights(spec, slots.raw, None), slots.ids.to(torch.int32))
