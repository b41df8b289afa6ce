"""Mixed batches: one MoE layer routed for a batch whose rows use different policies of a :class:`PolicySet`.

Semantics (the routing contract's mixed-batch part):

* each row (token) is routed by its own policy; per-token rules apply per row;
* batch-level stages — Alloc-T's slot pool, SERE's primary experts, piggybacking — act
  within the rows that share a policy (each policy's pass masks every other row out);
* ``when phase`` / ``when batch`` conditions see the whole forward: its phase and the
  batch size of all rows together, as a uniform batch of that size would (the batch size is
  what the step costs, and it is what CUDA graphs are captured for).

The row -> policy map is a device tensor; the mixed path runs every policy's own router over
the whole batch with its row mask (the Triton kernels of a ``kernels.backend.KernelRouter`` where
they apply: they take the mask as device data, like the reference) and selects per row with
``torch.where``: static shapes, no host synchronisation, no branch on the map, so it can be
captured in a CUDA graph. When the caller knows on the host that every row shares one policy
(``uniform``), only that policy routes. A captured CUDA graph cannot know the map on the host,
so it always holds the mixed path: one routing pass per policy of the server.

Logits may be ``[T, E]`` (one batch) or ``[N, T, E]`` (N independent batches, as replay routes
them); the row map is then ``[T]`` (the same for every batch) or ``[N, T]``.
:meth:`MixedRouter.route_scores` routes already-scored batches, with per-slot details for replay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..lang.ir import RouteContext
from .outputs import RouteDetails, RouteOutput, pad_output
from .router import LayerRouter
from .scoring import GateScores


def _select(rows: Tensor, new: RouteOutput | RouteDetails, old: RouteOutput | RouteDetails):
    """``new`` on ``rows`` (``[.., T]`` bool), ``old`` elsewhere."""
    sel = rows.unsqueeze(-1)
    if isinstance(new, RouteOutput):
        return RouteOutput(torch.where(sel, new.topk_weights, old.topk_weights),
                           torch.where(sel, new.topk_ids, old.topk_ids))
    assert isinstance(old, RouteDetails)
    return RouteDetails(
        topk_weights=torch.where(sel, new.topk_weights, old.topk_weights),
        topk_ids=torch.where(sel, new.topk_ids, old.topk_ids),
        rerouted=torch.where(sel, new.rerouted, old.rerouted),
        piggybacked=torch.where(sel, new.piggybacked, old.piggybacked),
        probs=new.probs, num_rerouted=torch.where(rows, new.num_rerouted, old.num_rerouted),
        primary=None)  # primaries are per policy: a mixed batch has one set per policy, not one


class MixedRouter:
    """One layer's routers by policy id; routes ``[T, E]`` (or ``[N, T, E]``) logits with a row -> policy map."""

    def __init__(self, routers: Sequence[LayerRouter], width: int | None = None) -> None:
        if not routers:
            raise ValueError("a mixed router needs at least one policy")
        self.routers = list(routers)
        self.width = width if width is not None else max(r.width for r in self.routers)
        if any(r.width > self.width for r in self.routers):
            raise ValueError(f"a policy routes more than {self.width} slots at layer {self.routers[0].layer}")

    def __len__(self) -> int:
        return len(self.routers)

    def prepare(self, device: torch.device | str) -> None:
        """Every policy's re-routing tables on ``device`` now (before CUDA-graph capture)."""
        for r in self.routers:
            r.prepare(device)

    def __call__(self, router_logits: Tensor, ctx: RouteContext, correction_bias: Tensor | None = None,
                 row_policy: Tensor | None = None, row_mask: Tensor | None = None,
                 uniform: int | None = None) -> RouteOutput:
        """``(topk_weights [.., T, width], topk_ids [.., T, width])``; rows of policy p exactly as p routes them
        alone with the other rows masked out. ``uniform``: every row is known (on the host) to use that policy."""
        if uniform is not None or row_policy is None:
            router = self.routers[0 if uniform is None else uniform]
            return pad_output(router(router_logits, ctx, correction_bias, row_mask=row_mask),  # type: ignore
                              self.width)
        return self._mixed(lambda r, rows: r(router_logits, ctx, correction_bias, row_mask=rows),
                           row_policy, row_mask, router_logits.shape[:-1])

    def route_scores(self, gs: GateScores, ctx: RouteContext, row_policy: Tensor, row_mask: Tensor | None = None,
                     details: bool = False) -> RouteOutput | RouteDetails:
        """Route already-scored ``[N, T, E]`` batches (replay); with ``details`` per-slot provenance
        (``primary`` is None: each policy has its own primaries)."""
        return self._mixed(lambda r, rows: r.route_scores(gs, ctx, details=details, row_mask=rows),
                           row_policy, row_mask, gs.scores.shape[:-1])

    def _mixed(self, route: Callable[[LayerRouter, Tensor], RouteOutput | RouteDetails], row_policy: Tensor,
               row_mask: Tensor | None, shape: torch.Size):
        row_policy = row_policy.expand(shape)  # a [T] map serves every batch of [N, T, E] logits
        out = None
        for p, router in enumerate(self.routers):
            rows = row_policy == p
            if row_mask is not None:
                rows = rows & row_mask.expand(shape)
            got = pad_output(route(router, rows), self.width)
            out = got if out is None else _select(rows, got, out)
        assert out is not None
        return out


def routed_per_policy(per_row: Tensor, row_policy: Tensor, num_policies: int,
                      row_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``([P] routed slots, [P] tokens)`` of one layer from each row's routed slot count ``per_row`` ``[T]``
    (e.g. ``(topk_ids >= 0).sum(-1)``); padded rows (``row_mask`` False) do not count. Device-side, no sync."""
    per_row = per_row.to(torch.int64)
    ones = torch.ones_like(per_row)
    if row_mask is not None:
        per_row = per_row * row_mask
        ones = ones * row_mask
    idx = row_policy.long()
    slots = torch.zeros(num_policies, dtype=torch.int64, device=per_row.device).index_add_(0, idx, per_row)
    tokens = torch.zeros(num_policies, dtype=torch.int64, device=per_row.device).index_add_(0, idx, ones)
    return slots, tokens
