"""What a router returns: SGLang-style ``(topk_weights, topk_ids)``, or the same with per-slot provenance."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor


class RouteOutput(NamedTuple):
    """Routing of one MoE layer, static width K per layer; padded slots have id -1 and weight 0."""

    topk_weights: Tensor  # [..., T, K] float32
    topk_ids: Tensor  # [..., T, K] int32, -1 = padded slot


@dataclass(frozen=True)
class RouteDetails:
    """A :class:`RouteOutput` plus what each stage did, for replay metrics and tests."""

    topk_weights: Tensor  # [..., T, K] float32
    topk_ids: Tensor  # [..., T, K] int32, -1 = padded slot
    rerouted: Tensor  # [..., T, K] bool: the slot holds weight re-routed from a secondary expert
    piggybacked: Tensor  # [..., T, K] bool: the slot was added by piggybacking (OEA)
    probs: Tensor | None  # [..., T, E] float32: the model's routing distribution (see gate_probs), if asked
    num_rerouted: Tensor  # [..., T] int32: the token's selected slots that re-routing moved (merged ones too)
    primary: Tensor | None = None  # [..., E] bool per batch: primary experts (None without re-routing)

    @property
    def output(self) -> RouteOutput:
        return RouteOutput(self.topk_weights, self.topk_ids)

    @property
    def valid(self) -> Tensor:
        """``[..., T, K]`` bool: slots that route to an expert."""
        return self.topk_ids >= 0


def _pad(t: Tensor, extra: int, value) -> Tensor:
    return torch.cat([t, t.new_full((*t.shape[:-1], extra), value)], dim=-1)


def pad_output(out: RouteOutput | RouteDetails, width: int) -> RouteOutput | RouteDetails:
    """Padding slots (id -1, weight 0; not re-routed or piggybacked) appended up to ``width``."""
    extra = width - out.topk_ids.shape[-1]
    if extra <= 0:
        return out
    w, ids = _pad(out.topk_weights, extra, 0.0), _pad(out.topk_ids, extra, -1)
    if isinstance(out, RouteOutput):
        return RouteOutput(w, ids)
    return replace(out, topk_weights=w, topk_ids=ids, rerouted=_pad(out.rerouted, extra, False),
                   piggybacked=_pad(out.piggybacked, extra, False))
