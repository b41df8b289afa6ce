"""Mixed batches: one MoE layer routed for a batch whose rows use different policies of a :class:`PolicySet`.

Semantics (the routing contract's mixed-batch part):

* each row (token) is routed by its own policy; per-token rules apply per row;
* batch-level stages — Alloc-T's slot pool, SERE's primary experts, piggybacking — act
  within the rows that share a policy (each policy's pass masks every other row out);
* ``when phase`` / ``when batch`` conditions see the whole forward: its phase and the
  batch size of all rows together, as a uniform batch of that size would (the batch size is
  what the step costs, and it is what CUDA graphs are captured for).

The row -> policy map is a device tensor; the mixed path runs every policy's reference
routing over the whole batch with its row mask and selects per row with ``torch.where``:
static shapes, no host synchronisation, no branch on the map, so it can be captured in a
CUDA graph. When the caller knows on the host that every row shares one policy
(``uniform``), only that policy routes, with its own router (the Triton kernels where they
apply). The kernels take padded rows as a trailing count, not an arbitrary mask, so the
mixed path always uses the torch reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..lang.ir import RouteContext
from .outputs import RouteOutput
from .router import LayerRouter


def pad_output(out: RouteOutput, width: int) -> RouteOutput:
    """Padding slots (id -1, weight 0) appended up to ``width``."""
    w, ids = out.topk_weights, out.topk_ids
    extra = width - ids.shape[-1]
    if extra <= 0:
        return out
    return RouteOutput(torch.cat([w, w.new_zeros(*w.shape[:-1], extra)], dim=-1),
                       torch.cat([ids, ids.new_full((*ids.shape[:-1], extra), -1)], dim=-1))


class MixedRouter:
    """One layer's routers by policy id; routes ``[T, E]`` logits with a ``[T]`` row -> policy map."""

    def __init__(self, routers: Sequence[LayerRouter], width: int | None = None) -> None:
        if not routers:
            raise ValueError("a mixed router needs at least one policy")
        self.routers = list(routers)
        self.width = width if width is not None else max(r.width for r in self.routers)
        if any(r.width > self.width for r in self.routers):
            raise ValueError(f"a policy routes more than {self.width} slots at layer {self.routers[0].layer}")

    def __len__(self) -> int:
        return len(self.routers)

    def __call__(self, router_logits: Tensor, ctx: RouteContext, correction_bias: Tensor | None = None,
                 row_policy: Tensor | None = None, row_mask: Tensor | None = None,
                 uniform: int | None = None) -> RouteOutput:
        """``(topk_weights [T, width], topk_ids [T, width])``; rows of policy p exactly as p routes them alone
        with the other rows masked out. ``uniform``: every row is known (on the host) to use that policy."""
        if uniform is not None or row_policy is None:
            router = self.routers[0 if uniform is None else uniform]
            return pad_output(router(router_logits, ctx, correction_bias, row_mask=row_mask), self.width)
        out_w = out_ids = None
        for p, router in enumerate(self.routers):
            rows = row_policy == p
            if row_mask is not None:
                rows = rows & row_mask
            # the reference on purpose (also for a KernelRouter): the kernels read a mask as a trailing count
            got = pad_output(LayerRouter.__call__(router, router_logits, ctx, correction_bias, row_mask=rows),
                             self.width)
            if out_w is None:
                out_w, out_ids = got.topk_weights, got.topk_ids
            else:
                sel = rows.unsqueeze(-1)
                out_w = torch.where(sel, got.topk_weights, out_w)
                out_ids = torch.where(sel, got.topk_ids, out_ids)
        assert out_w is not None and out_ids is not None
        return RouteOutput(out_w, out_ids)


def routed_per_policy(valid: Tensor, row_policy: Tensor, num_policies: int,
                      row_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``([P] routed slots, [P] tokens)`` of one layer's routing (``valid`` ``[T, K]`` bool); device-side, no sync."""
    per_row = valid.sum(dim=-1).to(torch.int64)
    ones = torch.ones_like(per_row)
    if row_mask is not None:
        per_row = per_row * row_mask
        ones = ones * row_mask
    idx = row_policy.long()
    slots = torch.zeros(num_policies, dtype=torch.int64, device=valid.device).index_add_(0, idx, per_row)
    tokens = torch.zeros(num_policies, dtype=torch.int64, device=valid.device).index_add_(0, idx, ones)
    return slots, tokens
