"""Calibrate a per-token confidence rule to a budget: per layer, the threshold whose mean experts per token on a
recorded trace is closest to the layer's k (``top_p calibrated from "trace.safetensors"``).

The mean is a step function of the threshold. Each (token, rank) of the trace passes from one threshold on
(top-p: the least float32 p with ``prefix < p * total``; min-p: up to the largest t with ``raw >= t * raw_0``,
both in the routing's float32 arithmetic, :class:`~sgl_budget.routing.adaptive.RankedMass`), so sorting those
edges gives the mean at every threshold at once; the threshold whose mean is closest to the target wins
(ties: the cheaper). Replaying the trace with it gives the reported mean exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..spec import ModelSpec


@dataclass(frozen=True)
class Calibrated:
    """A layer's calibrated threshold and the mean experts per token it gives on the trace."""

    threshold: float
    mean: float


def calibrate_threshold(spec: ModelSpec, router_logits: Tensor, correction_bias: Tensor | None, kind: str,
                        min_k: int, max_k: int, target: float) -> Calibrated:
    """The ``kind`` threshold whose mean experts per token over ``router_logits`` ``[N, E]`` is closest to
    ``target`` (which should lie in ``[min_k, max_k]``); exact ties between means go to the cheaper threshold."""
    from ..routing.adaptive import RankedMass
    from ..routing.scoring import score_experts

    gs = score_experts(spec, router_logits.float().unsqueeze(0), correction_bias)
    rm = RankedMass.of(gs, max_k)
    n = router_logits.shape[0]
    base = int(torch.minimum(rm.eligible.sum(-1), torch.tensor(min_k)).sum())  # experts kept whatever the threshold
    elig = rm.eligible[..., min_k:]
    if kind == "top_p":  # rank r passes at p iff prefix < p * total (float32): from p* = the least such p on
        edge = _least_passing(rm.prefix[..., min_k:], rm.total.expand_as(rm.prefix)[..., min_k:])
        edge = edge[elig]
        tiny = np.nextafter(np.float32(0), np.float32(1))  # the smallest positive p
        cands = np.unique(np.concatenate([[tiny], edge[(edge > 0) & (edge <= 1)].numpy()]))
        counts = np.searchsorted(np.sort(edge.numpy()), cands, side="right")  # passing ranks at each p
    else:  # rank r passes at t iff raw_r >= t * raw_0: up to t* = the largest such t
        edge = _largest_passing(rm.raw[..., min_k:], rm.raw[..., :1].expand_as(rm.raw)[..., min_k:])[elig]
        cands = np.unique(np.concatenate([[0.0, 1.0], edge[(edge >= 0) & (edge <= 1)].numpy()]))
        counts = len(edge) - np.searchsorted(np.sort(edge.numpy()), cands, side="left")
    means = (base + counts) / n
    # the closest mean; among equally close ones the smallest mean
    order = np.lexsort((means, np.abs(means - target)))
    best = float(np.float32(cands[order[0]]))
    got = float(rm.kept(kind, best, min_k).sum()) / n  # the routing's own count (equals means[order[0]])
    return Calibrated(best, got)


def _next(x: Tensor, up: bool) -> Tensor:
    return torch.nextafter(x, torch.full_like(x, float("inf") if up else float("-inf")))


def _least_passing(prefix: Tensor, total: Tensor) -> Tensor:
    """Per rank, the least float32 p with ``prefix < p * total`` in float32 (inf where none)."""
    p = torch.where(total > 0, prefix / total, torch.full_like(prefix, float("inf")))
    for _ in range(4):  # the quotient is within an ulp or two: step to the exact edge
        p = torch.where((p * total <= prefix) & torch.isfinite(p), _next(p, True), p)
    for _ in range(4):
        below = _next(p, False)
        p = torch.where((below * total > prefix) & torch.isfinite(p), below, p)
    return p


def _largest_passing(raw: Tensor, top: Tensor) -> Tensor:
    """Per rank, the largest float32 t with ``raw >= t * top`` in float32 (inf where every t passes)."""
    t = torch.where(top > 0, raw / top, torch.full_like(raw, float("inf")))
    for _ in range(4):
        t = torch.where((t * top > raw) & torch.isfinite(t), _next(t, False), t)
    for _ in range(4):
        above = _next(t, True)
        t = torch.where((above * top <= raw) & torch.isfinite(t), above, t)
    return t
