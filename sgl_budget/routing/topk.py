"""Per-layer k: plain per-token top-k on the selection scores, as the engines do it."""

from __future__ import annotations

import torch

from .scoring import NEG_INF, GateScores
from .slots import Slots


def select_topk(gs: GateScores, k: int, *, maybe_masked: bool, sorted: bool = True) -> Slots:
    """Slots for plain top-k with this layer's ``k``.

    ``maybe_masked`` (a static fact of the spec and k) says whether k can exceed
    the experts in a token's kept groups; only then can a chosen expert carry a
    ``-inf`` selection score, and such a slot is invalid.
    """
    vals, ids = gs.topk(k) if sorted else torch.topk(gs.select, k, dim=-1, sorted=False)
    raw = gs.scores.gather(-1, ids)
    valid = vals > NEG_INF if maybe_masked else torch.ones_like(ids, dtype=torch.bool)
    return Slots.selected(ids, raw, valid)
