"""Per-layer k: plain per-token top-k on the selection scores, as the engines do it."""

from __future__ import annotations

import torch

from .scoring import NEG_INF, GateScores
from .slots import Slots


def select_topk(gs: GateScores, k: int, *, maybe_masked: bool, stock: bool = False, sorted: bool = True) -> Slots:
    """Slots for plain top-k with this layer's ``k``.

    ``stock`` (a stock plan: the model's own k, nothing else) ranks with the
    engine's own ``torch.topk`` (``sorted`` as the engine does), so the layer is
    bit-for-bit stock; otherwise exact ties go to the lower expert index, as in
    the Triton kernels. ``maybe_masked`` (a static fact of the spec and k) says
    whether k can exceed the experts in a token's kept groups; only then can a
    chosen expert carry a ``-inf`` selection score, and such a slot is invalid.
    """
    vals, ids = gs.stock_topk(k, sorted=sorted) if stock else gs.topk(k)
    raw = gs.scores.gather(-1, ids)
    valid = vals > NEG_INF if maybe_masked else torch.ones_like(ids, dtype=torch.bool)
    return Slots.selected(ids, raw, valid)
