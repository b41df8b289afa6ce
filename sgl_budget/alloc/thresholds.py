"""Calibrate a per-token confidence rule to a budget: per layer, the threshold whose mean experts per token on a
recorded trace is closest to the layer's k (``top_p calibrated from "trace.safetensors"``).

The mean is a monotone step function of the threshold (top-p: non-decreasing in p; min-p: non-increasing in
t), evaluated exactly as routing decides (:class:`~sgl_budget.routing.adaptive.RankedMass`, float32), so a
bisection over the float32 values in [0, 1] finds the two neighbouring thresholds around the target; the one
whose mean is closer wins (ties: the cheaper). Replaying the trace with the chosen threshold gives the
reported mean exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..spec import ModelSpec

_ONE = int(np.float32(1.0).view(np.int32))  # float32 bits of 1.0; positive floats order like their bits


@dataclass(frozen=True)
class Calibrated:
    """A layer's calibrated threshold and the mean experts per token it gives on the trace."""

    threshold: float
    mean: float


def _as_float(bits: int) -> float:
    return float(np.int32(bits).view(np.float32))


def calibrate_threshold(spec: ModelSpec, router_logits: Tensor, correction_bias: Tensor | None, kind: str,
                        min_k: int, max_k: int, target: float) -> Calibrated:
    """The ``kind`` threshold whose mean experts per token over ``router_logits`` ``[N, E]`` is closest to
    ``target`` (which must lie in ``[min_k, max_k]``)."""
    from ..routing.adaptive import RankedMass
    from ..routing.scoring import score_experts

    gs = score_experts(spec, router_logits.float().unsqueeze(0), correction_bias)
    rm = RankedMass.of(gs, max_k)
    n = router_logits.shape[0]

    def mean(bits: int) -> float:
        return float(rm.kept(kind, _as_float(bits), min_k).sum()) / n

    # the cheap end keeps the fewest experts (top-p: the smallest positive p; min-p: t = 1), the dear end the most
    cheap, dear = (1, _ONE) if kind == "top_p" else (_ONE, 0)
    if mean(cheap) > target:
        return Calibrated(_as_float(cheap), mean(cheap))
    if mean(dear) <= target:
        return Calibrated(_as_float(dear), mean(dear))
    a, b = cheap, dear  # invariant: mean(a) <= target < mean(b); neighbouring float32 values at the end
    while abs(b - a) > 1:
        m = (a + b) // 2
        if mean(m) <= target:
            a = m
        else:
            b = m
    below, above = mean(a), mean(b)
    best = a if target - below <= above - target else b
    return Calibrated(_as_float(best), mean(best))
