"""Backend selection: the Triton kernels on CUDA tensors, the torch reference elsewhere (or forced either way).

:class:`KernelRouter` is a :class:`~sgl_budget.routing.LayerRouter` whose
``route_scores``-level work runs in Triton for the plans the kernels cover —
per-layer top-k, Alloc-T, the per-token confidence rules (top-p / min-p), SERE
re-routing and piggybacking, alone or chained —
on a single ``[T, E]`` batch on a CUDA device; every other case (batches too
large for the one-program batch stages, i.e. big prefills) and
``backend="torch"`` take the reference path. ``backend="triton"`` also runs the kernels on CPU
tensors (under ``TRITON_INTERPRET=1``), which is how CI tests the selection.

Exact ties follow one rule on both paths: lower expert (group) index first. A stock
plan (the model's own k and nothing else) is the one exception: it is the engine's own
routing, so it always takes the reference's ``torch.topk`` path, never the kernels
(SGLang's plugin calls SGLang's own ``select_experts`` for such layers anyway).
The choice depends only on host facts (plan, device, shapes): no host sync.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from sgl_budget.lang.ir import LayerPlan, PolicyIR, RouteContext
from sgl_budget.routing import Conventions, LayerRouter, RouteOutput
from sgl_budget.routing.scoring import REFERENCE, renorm_epsilon

from .alloc_t import alloc_t_fits
from .piggyback import piggyback_fits
from .sere import sere_fits

Backend = Literal["auto", "torch", "triton"]


class KernelRouter(LayerRouter):
    """A layer router that uses the Triton kernels where they apply."""

    def __init__(self, ir: PolicyIR, layer: int, conventions: Conventions = REFERENCE,
                 backend: Backend = "auto") -> None:
        super().__init__(ir, layer, conventions)
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be auto, torch or triton, not {backend!r}")
        self.backend = backend

    def kernel_applies(self, plan: LayerPlan, router_logits: Tensor) -> bool:
        if self.backend == "torch" or router_logits.dim() != 2 or self.is_stock_plan(plan):
            return False
        if self.backend == "auto" and not router_logits.is_cuda:
            return False
        if self.conv.scores_in_logit_dtype and router_logits.dtype != torch.float32:
            return False  # the kernels score in float32
        if self.spec.scoring_func not in ("softmax", "sigmoid"):
            return False  # the kernels score with softmax or sigmoid only (DeepSeek-V4's sqrtsoftplus: the reference)
        if self.conv.renorm_clamp_min is not None:
            return False  # the kernels renormalise by sum + eps, not clamp(sum, min) (ERNIE in transformers)
        if self.conv.weights_from_selected_logits:
            return False  # the kernels weigh by renormalised gate scores, not a softmax of the selected logits
        # whole-batch stages run in one program: decode-sized batches (large prefills take the reference)
        t = router_logits.shape[0]
        r = plan.reallocation
        if r is not None and not alloc_t_fits(t, plan.k, r.min_k, r.max_k):
            return False
        if plan.reroute is not None:
            k_in = r.max_k if r is not None else plan.adaptive.max_k if plan.adaptive is not None else plan.k
            if not sere_fits(t, k_in, self.width):
                return False
        return plan.piggyback is None or piggyback_fits(t)

    def __call__(self, router_logits: Tensor, ctx: RouteContext | None = None,
                 correction_bias: Tensor | None = None, row_mask: Tensor | None = None) -> RouteOutput:
        t = router_logits.shape[0]
        ctx = ctx or RouteContext("decode", max(1, t), max(1, t))
        plan = self.plan(ctx)
        if not self.kernel_applies(plan, router_logits):
            return super().__call__(router_logits, ctx, correction_bias, row_mask)
        spec = self.spec
        if self.conv.ignore_correction_bias:  # as score_experts: the engine's stock path ranks without it
            correction_bias = None
        kw = dict(sigmoid=spec.scoring_func == "sigmoid", correction_bias=correction_bias, n_group=spec.n_group,
                  topk_group=spec.topk_group, renormalize=spec.norm_topk_prob,
                  eps=renorm_epsilon(spec) if self.conv.renorm_eps is None else self.conv.renorm_eps,
                  scale=spec.routed_scaling_factor if self.conv.apply_routed_scaling else 1.0)
        rr, pig = plan.reroute, plan.piggyback
        later = rr is not None or pig is not None  # a batch stage follows: it weighs the raw gate scores
        stage = dict(kw, renormalize=False, scale=1.0) if later else kw
        if plan.adaptive is not None:  # per token: any batch size, padded rows get no slots
            from .adaptive import adaptive_topk

            ad = plan.adaptive
            width = ad.max_k if later else self.width
            w, ids = adaptive_topk(router_logits, ad.kind, ad.threshold, ad.min_k, ad.max_k, width,
                                   row_mask=row_mask, **stage)
        elif plan.reallocation is None:
            from .fused_topk import fused_topk

            width = plan.k if later else self.width
            w, ids = fused_topk(router_logits, plan.k, width, **stage)  # rows are independent
            if row_mask is not None and later:  # as the reference: a plain top-k routes padded rows
                # too (the engine masks them); the batch stages must not count them
                ids = ids.masked_fill(~row_mask.unsqueeze(-1), -1)
                w = w.masked_fill(~row_mask.unsqueeze(-1), 0.0)
        else:
            from .alloc_t import alloc_t

            r = plan.reallocation
            width = r.max_k if later else self.width
            w, ids = alloc_t(router_logits, plan.k, r.min_k, r.max_k, width, row_mask=row_mask, **stage)
        if rr is not None:
            from .sere import sere_reroute

            tables = self._reroute_tables(plan, router_logits.device)
            last = stage if pig is not None else kw  # piggybacking weighs after adding its slots
            w, ids = sere_reroute(ids, w, tables.similarity, tables.critical, rr.primary.kind, rr.primary.value,
                                  rr.min_similarity, width if pig is not None else self.width,
                                  renormalize=last["renormalize"], eps=kw["eps"], scale=last["scale"])
        if pig is not None:
            from .piggyback import piggyback

            w, ids = piggyback(router_logits, ids, w, pig.max_k, pig.min_score, self.width, row_mask=row_mask,
                               **kw)
        return RouteOutput(w, ids)


def compile_kernel_routers(ir: PolicyIR, conventions: Conventions = REFERENCE,
                           backend: Backend = "auto") -> dict[int, KernelRouter]:
    """One :class:`KernelRouter` per MoE layer (``backend``: auto | torch | triton)."""
    return {layer: KernelRouter(ir, layer, conventions, backend) for layer in ir.spec.moe_layers}
