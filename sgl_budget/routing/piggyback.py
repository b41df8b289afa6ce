"""OEA piggybacking (arXiv 2511.02237): fill free slots with experts the batch already loads.

After selection and re-routing fix the batch's expert set (every expert in a
valid slot), each token may add experts until it holds ``max_k`` valid slots:
its highest selection-score experts (exact ties: lower index first) that are
in the batch set, not already in its slots, eligible for it (inside its kept
groups on grouped models) and whose gate score (softmax prob / sigmoid score,
the weight they would carry) is at least ``min_score``. A memory-bound decode step reads no extra expert weights
for them, so the batch's distinct experts never grow.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..lang.ir import Piggyback
from .scoring import NEG_INF, GateScores, ranked_topk
from .slots import Slots, batch_experts


def piggyback(slots: Slots, gs: GateScores, pig: Piggyback, *, maybe_masked: bool,
              row_mask: Tensor | None = None) -> Slots:
    """Append up to ``max_k`` piggybacked slots per token (invalid where nothing qualifies).

    ``maybe_masked`` (static) says whether selection scores can be -inf (grouped
    models), in which case such experts are not eligible.
    """
    n, t, _ = slots.ids.shape
    e = gs.num_experts
    batch_set = batch_experts(slots.ids, slots.valid, e)  # [N, E]
    idx = slots.ids.masked_fill(~slots.valid, e)
    held = torch.zeros(n, t, e + 1, dtype=torch.bool, device=idx.device).scatter_(-1, idx, True)[..., :e]
    ok = batch_set.unsqueeze(1) & ~held
    if pig.min_score > 0:
        ok = ok & (gs.scores >= pig.min_score)
    if maybe_masked and gs.eligible is not None:
        ok = ok & gs.eligible
    cand = gs.select.masked_fill(~ok, NEG_INF)
    width = min(pig.max_k, e)
    vals, ids = ranked_topk(cand, width)  # exact ties: lower expert index, as the kernel
    free = (pig.max_k - slots.valid.sum(dim=-1, keepdim=True)).clamp_min(0)
    add = (vals > NEG_INF) & (torch.arange(width, device=ids.device) < free)
    if row_mask is not None:
        add = add & row_mask.unsqueeze(-1)
    raw = gs.scores.gather(-1, ids).masked_fill(~add, 0.0)
    extra = Slots(ids=ids, raw=raw, valid=add, rerouted=torch.zeros_like(add), piggybacked=add)
    return slots.cat(extra)
