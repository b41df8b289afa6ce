"""Alloc-T (Alloc-MoE, arXiv 2604.08133): reallocate a layer's T*k slots across a batch's tokens.

Every token first gets its top ``min_k`` experts. The remaining ``T*(k - min_k)``
slots of the batch go to the highest-ranked (token, expert) pairs among each
token's candidates of rank ``min_k .. max_k-1``, so confident tokens give slots
to uncertain ones while the layer's slot total — hence its cost — stays fixed.

Cross-token ranking key (scores must be comparable between tokens):

* softmax models: the softmax probability (a distribution per token already);
* sigmoid and sqrtsoftplus models: the token's *normalised* selection score,
  ``max(s, 0) / sum(max(s', 0) over the token's eligible experts)``, since raw
  sigmoid / sqrt(softplus) scores (plus correction bias) are not a per-token distribution.

Ties break deterministically by (key descending, token index, rank) through a
stable sort over the batch's candidates laid out token-major; within a token,
exactly tied experts rank lower index first (:func:`~.scoring.ranked_topk`).
Each token's keys fall with rank, so every token keeps a prefix of its sorted experts:
``min_k <= k_t <= max_k`` and ``sum_t k_t = T*k`` (fewer only when a grouped
model's token has fewer than ``max_k`` eligible experts).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..lang.ir import Reallocation
from .scoring import NEG_INF, GateScores
from .slots import Slots


def ranking_key(gs: GateScores, vals: Tensor, sigmoid: bool) -> Tensor:
    """Cross-token comparable key for selected selection scores ``vals`` ``[N, T, M]``."""
    if not sigmoid:
        return vals
    total = gs.select.clamp_min(0.0).sum(dim=-1, keepdim=True)  # -inf (masked) clamps to 0
    total = torch.where(total > 0, total, torch.ones_like(total))
    return vals.clamp_min(0.0) / total


def reallocate(gs: GateScores, k: int, realloc: Reallocation, *, sigmoid: bool,
               row_mask: Tensor | None = None) -> Slots:
    """Alloc-T slots ``[N, T, max_k]``: per-token top-``min_k`` plus the batch's best extra slots.

    ``row_mask`` ``[N, T]`` marks real tokens; padded rows get no slots and the batch's
    extra slots are counted over real tokens only (a device-side count, no host sync).
    """
    min_k, max_k = realloc.min_k, realloc.max_k
    vals, ids = gs.topk(max_k)
    raw = gs.scores.gather(-1, ids)
    finite = vals > NEG_INF
    if row_mask is not None:
        finite = finite & row_mask.unsqueeze(-1)
    n, t, _ = vals.shape
    extra_per_token = realloc.extra_per_token(k)  # the IR's one notion of what this layer routes
    cands = max_k - min_k
    if extra_per_token <= 0 or cands <= 0:
        rank = torch.arange(max_k, device=ids.device)
        return Slots.selected(ids, raw, finite & (rank < min_k))
    if extra_per_token == cands:  # every candidate fits: plain top-max_k
        return Slots.selected(ids, raw, finite)
    key = ranking_key(gs, vals, sigmoid)[..., min_k:]
    key = key.masked_fill(~finite[..., min_k:], NEG_INF).reshape(n, t * cands)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, : t * extra_per_token]
    take = torch.ones_like(order, dtype=torch.bool)
    if row_mask is not None:  # only the real tokens' share of extra slots
        real = row_mask.sum(dim=-1, keepdim=True) * extra_per_token
        take = torch.arange(order.shape[-1], device=order.device) < real
    chosen = torch.zeros_like(key, dtype=torch.bool).scatter_(-1, order, take)
    chosen = (chosen & (key > NEG_INF)).view(n, t, cands)
    valid = torch.cat([finite[..., :min_k], chosen], dim=-1)
    return Slots.selected(ids, raw, valid)
