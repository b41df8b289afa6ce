"""SERE re-routing (github JL-Cheng/SERE): move slots off secondary experts onto similar primary ones.

Per batch and layer:

1. *Primary* experts, by the plan's :class:`PrimaryRule`:
   ``top S`` — SERE's rule: the union over tokens of their first S valid slots
   (slots rank by selection score, exact ties lower expert index first);
   ``coverage p`` — experts by slot count in this batch (descending, ties by
   expert index) until their cumulative count reaches ``p`` of the batch's slots;
   ``count N`` — the N most-loaded experts in that order. Experts with no slot in
   the batch are never primary. The policy's critical experts are primary whenever
   the batch uses them (``preserve critical N``: sgl_budget's extension, not part of
   SERE's published rule; never re-routed away from; an unused one is not made a
   destination, so re-routing only ever moves slots onto experts the batch loads).
2. Every other (secondary) expert ``e`` maps to the primary expert ``p`` with the
   highest ``similarity[e, p]`` (ties: lower expert index). If that similarity is
   at least ``min_similarity`` all of ``e``'s slots move to ``p``, the weight
   moving with the slot; otherwise ``e`` stays (critical for this batch).
3. A moved slot whose destination the token already holds **merges**: its weight
   is added to the earlier of the two slots and the later one becomes padding.
   (SERE's kernel keeps the duplicate; merging gives the same MoE output with one
   token-expert pair fewer.)

The decision is per (batch, expert), so a batch never gains a distinct expert:
each moved expert disappears and at most one primary (already present) receives it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..lang.ir import Reroute
from .scoring import NEG_INF
from .slots import Slots, batch_experts, expert_load


@dataclass(frozen=True)
class RerouteTables:
    """A layer's re-routing constants on one device: similarity ``[E, E]`` float32, critical mask ``[E]``."""

    similarity: Tensor
    critical: Tensor

    @classmethod
    def build(cls, reroute: Reroute, num_experts: int, device: torch.device) -> "RerouteTables":
        """Move the similarity matrix and critical set to ``device`` (do this once, before capture)."""
        sim = reroute.similarity.to(device=device, dtype=torch.float32)
        if tuple(sim.shape) != (num_experts, num_experts):
            raise ValueError(f"similarity must be [{num_experts}, {num_experts}], not {list(sim.shape)}")
        critical = torch.zeros(num_experts, dtype=torch.bool)
        if any(not 0 <= e < num_experts for e in reroute.critical):
            raise ValueError(f"critical experts must lie in 0..{num_experts - 1}: {reroute.critical}")
        if reroute.critical:
            critical[list(reroute.critical)] = True
        return cls(similarity=sim, critical=critical.to(device))


def primary_experts(slots: Slots, reroute: Reroute, tables: RerouteTables) -> Tensor:
    """``[N, E]`` bool: each batch's primary experts under the plan's rule (plus used critical ones)."""
    num_experts = tables.critical.shape[0]
    rule = reroute.primary
    if rule.kind == "top":
        s = max(0, int(rule.value))
        primary = batch_experts(slots.ids[..., :s], slots.valid[..., :s], num_experts)
        present = batch_experts(slots.ids, slots.valid, num_experts)
    else:
        load = expert_load(slots.ids, slots.valid, num_experts)
        present = load > 0
        # stable descending sort: ties keep ascending expert index
        sorted_load, order = torch.sort(load, dim=-1, descending=True, stable=True)
        if rule.kind == "coverage":
            total = sorted_load.sum(dim=-1, keepdim=True)
            before = sorted_load.cumsum(dim=-1) - sorted_load
            keep = before < float(rule.value) * total
        else:  # count
            keep = torch.arange(num_experts, device=load.device) < int(rule.value)
        keep = keep & (sorted_load > 0)
        primary = torch.zeros_like(present).scatter_(-1, order, keep)
    return primary | (tables.critical & present)


def reroute_slots(slots: Slots, reroute: Reroute, tables: RerouteTables) -> tuple[Slots, Tensor, Tensor]:
    """Re-route and merge; returns (slots, primary ``[N, E]``, moved-slot count per token ``[N, T]``)."""
    n, t, m = slots.ids.shape
    primary = primary_experts(slots, reroute, tables)
    # best primary substitute of every expert, per batch: [N, E, E] masked to primaries
    penalty = torch.zeros(primary.shape, dtype=torch.float32, device=primary.device).masked_fill_(~primary, NEG_INF)
    best, dest = (tables.similarity.unsqueeze(0) + penalty.unsqueeze(1)).max(dim=-1)  # first maximum wins ties
    moves = ~primary & (best >= float(reroute.min_similarity))  # best is -inf without primaries

    flat = slots.ids.reshape(n, t * m)
    moved = moves.gather(-1, flat).view(n, t, m) & slots.valid
    ids = torch.where(moved, dest.gather(-1, flat).view(n, t, m), slots.ids)

    # merge duplicates into the earliest valid slot holding the same expert
    same = (ids.unsqueeze(-1) == ids.unsqueeze(-2)) & slots.valid.unsqueeze(-2)  # [N,T,M(slot),M(earlier)]
    first = same.to(torch.uint8).argmax(dim=-1)
    slot_index = torch.arange(m, device=ids.device)
    valid = slots.valid & (first == slot_index)
    raw = torch.zeros_like(slots.raw).scatter_add_(-1, first, slots.raw)
    got_moved = torch.zeros_like(slots.raw).scatter_add_(-1, first, moved.to(slots.raw.dtype)) > 0
    rerouted = got_moved & valid
    out = slots.with_(ids=ids, raw=raw.masked_fill(~valid, 0.0), valid=valid, rerouted=rerouted)
    return out, primary, moved.sum(dim=-1, dtype=torch.int32)
