"""Per-token routing slots passed between the stages, and their final compaction.

All tensors are ``[N, T, M]`` (N batches, T tokens, M slots). An invalid slot's
id is any in-range expert (never read) and its raw weight is 0, so stages can
gather and scatter with static shapes and no masking by indexing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class Slots:
    """Token-expert slots of a batch: ids, raw gate weights, validity and provenance flags."""

    ids: Tensor  # int64, in [0, E) everywhere (meaningful only where valid)
    raw: Tensor  # float32 raw weight: gate score of the expert the slot was selected for; 0 where invalid
    valid: Tensor  # bool
    rerouted: Tensor  # bool: the slot holds weight re-routed from a secondary expert
    piggybacked: Tensor  # bool: the slot was added by piggybacking

    @property
    def width(self) -> int:
        return self.ids.shape[-1]

    @classmethod
    def selected(cls, ids: Tensor, raw: Tensor, valid: Tensor) -> "Slots":
        """Slots straight from a selection stage (nothing re-routed or piggybacked yet)."""
        no = torch.zeros_like(valid)
        return cls(ids=ids, raw=raw.masked_fill(~valid, 0.0), valid=valid, rerouted=no, piggybacked=no)

    def with_(self, **changes: Tensor) -> "Slots":
        return replace(self, **changes)

    def cat(self, other: "Slots") -> "Slots":
        """Append ``other``'s slots after this one's, slot-wise."""
        return Slots(*(torch.cat([a, b], dim=-1) for a, b in zip(self._fields(), other._fields())))

    def _fields(self) -> tuple[Tensor, ...]:
        return (self.ids, self.raw, self.valid, self.rerouted, self.piggybacked)


def compact(slots: Slots, width: int) -> Slots:
    """Move valid slots first (keeping their order), padding last, and fit to ``width`` slots.

    A stable partition written as cumsum + scatter (no sort, no host sync). The
    caller guarantees no token has more than ``width`` valid slots, so cutting
    to ``width`` only drops padding.
    """
    v = slots.valid.to(torch.int64)
    n_valid = v.sum(dim=-1, keepdim=True)
    pos = torch.where(slots.valid, v.cumsum(dim=-1) - 1, n_valid + (1 - v).cumsum(dim=-1) - 1)
    moved = [torch.empty_like(t).scatter_(-1, pos, t) for t in slots._fields()]
    m = slots.width
    if m > width:
        moved = [t[..., :width] for t in moved]
    elif m < width:
        moved = [torch.cat([t, t.new_zeros(*t.shape[:-1], width - m)], dim=-1) for t in moved]
    return Slots(*moved)


def pad(slots: Slots, width: int) -> Slots:
    """Append padding slots up to ``width`` (for stages whose valid slots are already a prefix)."""
    m = slots.width
    if m >= width:
        return slots
    return Slots(*(torch.cat([t, t.new_zeros(*t.shape[:-1], width - m)], dim=-1) for t in slots._fields()))


def batch_experts(ids: Tensor, valid: Tensor, num_experts: int) -> Tensor:
    """``[N, E]`` bool: the experts a batch loads (held by at least one valid slot)."""
    n = ids.shape[0]
    idx = ids.masked_fill(~valid, num_experts).flatten(1)
    mask = torch.zeros(n, num_experts + 1, dtype=torch.bool, device=ids.device)
    return mask.scatter_(-1, idx, True)[:, :num_experts]


def expert_load(ids: Tensor, valid: Tensor, num_experts: int) -> Tensor:
    """``[N, E]`` float32: number of valid slots on each expert in each batch."""
    n = ids.shape[0]
    idx = ids.masked_fill(~valid, num_experts).flatten(1)
    load = torch.zeros(n, num_experts + 1, dtype=torch.float32, device=ids.device)
    return load.scatter_add_(-1, idx, valid.flatten(1).to(torch.float32))[:, :num_experts]
