"""Per-token confidence rules (top-p and relative-threshold routing): each token keeps the experts its router is
sure about, between ``min_k`` and ``max_k``, whatever else is in its batch.

* ``top_p p`` — post-hoc top-p routing: the smallest prefix of the token's ranked experts whose gate mass
  reaches ``p`` of the token's total (Huang et al. 2024's dynamic routing, applied to a trained top-k model).
* ``min_p t`` — relative threshold: the experts whose gate score is at least ``t`` times the top expert's
  (ik_llama.cpp's Smart Expert Reduction ``-ser Kmin,t``; min-p as in llama.cpp #4470; Lu et al. 2024's
  dynamic skipping of low-weight experts).

The rule (:class:`~sgl_budget.lang.ir.Adaptive`): rank the token's eligible experts by selection score (exact
ties: lower index first); ``s_r`` is the gate score at rank r, ``Z`` the gate mass of the eligible experts. Rank
r in ``[min_k, max_k)`` *passes* when ``s_0 + .. + s_{r-1} < p * Z`` (top-p) or ``s_r >= t * s_0`` (min-p); the
token keeps its first ``min_k + #passing`` ranks. Everything is float32 with sums taken in rank order, so the
Triton kernel and the calibration (:mod:`sgl_budget.alloc.thresholds`) decide exactly as this reference does.
Gate scores are non-negative, so a top-p token's passing ranks are a prefix; on models that rank by a biased
score (DeepSeek-V3) a min-p token's scores need not fall with rank, and it keeps a count, not a set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..lang.ir import Adaptive
from .scoring import NEG_INF, GateScores
from .slots import Slots


@dataclass(frozen=True)
class RankedMass:
    """A batch's ``max_k`` best experts per token with what the confidence rules compare, ``[N, T, max_k]``."""

    ids: Tensor  # int64 ranked experts
    raw: Tensor  # float32 gate scores at each rank (0 where not eligible)
    eligible: Tensor  # bool: the rank holds an eligible expert (grouped models mask whole groups)
    prefix: Tensor  # float32: gate mass of the ranks before this one, summed in rank order
    total: Tensor  # [N, T, 1] float32: gate mass of the token's eligible experts
    grouped: bool = False  # a group limit may leave a token fewer eligible experts than ranks

    @classmethod
    def of(cls, gs: GateScores, max_k: int, kind: str = "top_p") -> "RankedMass":
        """The ranked experts and what ``kind`` compares (min-p needs no prefix sums or total: left empty)."""
        vals, ids = gs.topk(max_k)
        eligible = vals > NEG_INF if gs.eligible is None else gs.eligible.gather(-1, ids)
        raw = gs.scores.gather(-1, ids).float()
        if gs.eligible is not None:  # grouped models (ungrouped: every ranked expert is eligible)
            raw = raw.masked_fill(~eligible, 0.0)
        if kind != "top_p":
            return cls(ids=ids, raw=raw, eligible=eligible, prefix=raw[..., :0], total=raw[..., :0],
                       grouped=gs.eligible is not None)
        acc = torch.zeros_like(raw[..., 0])
        prefix = []
        for r in range(max_k):  # in rank order, as the kernel sums
            prefix.append(acc)
            acc = acc + raw[..., r]
        scores = gs.scores.float()
        if gs.eligible is not None:  # grouped models: only the token's kept groups
            scores = scores.masked_fill(~gs.eligible, 0.0)
        total = scores.sum(dim=-1, keepdim=True)
        return cls(ids=ids, raw=raw, eligible=eligible, prefix=torch.stack(prefix, dim=-1), total=total,
                   grouped=gs.eligible is not None)

    def passing(self, kind: str, threshold: float, min_k: int) -> Tensor:
        """``[N, T, max_k - min_k]`` bool: ranks ``min_k..max_k-1`` the rule keeps (eligible ones only)."""
        if kind == "top_p":
            ok = self.prefix[..., min_k:] < threshold * self.total
        else:
            ok = self.raw[..., min_k:] >= threshold * self.raw[..., :1]
        return ok & self.eligible[..., min_k:] if self.grouped else ok  # ungrouped: every rank is eligible

    def kept(self, kind: str, threshold: float, min_k: int) -> Tensor:
        """``[N, T]`` int64: experts each token keeps (``min_k`` + passing ranks, never past its eligible ones)."""
        k = self.passing(kind, threshold, min_k).sum(dim=-1) + min_k
        if min_k == 0 or self.grouped:  # else every token has at least min_k eligible experts
            k = torch.minimum(k, self.eligible.sum(dim=-1))
        return k


_RANKS: dict = {}


def _ranks(m: int, device) -> Tensor:
    """``arange(m)`` on ``device``, made once on the CPU (a decode step routes every layer through here); on an
    accelerator made per call, so that a CUDA-graph capture never keeps a tensor from its private pool."""
    if torch.device(device).type != "cpu":
        return torch.arange(m, device=device)
    key = (m, str(device))
    got = _RANKS.get(key)
    if got is None:
        got = _RANKS[key] = torch.arange(m, device=device)
    return got


def adaptive_slots(gs: GateScores, rule: Adaptive, row_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(ids, valid)`` ``[N, T, max_k]``: each token's ranked experts and which it keeps (its first ``k_t``, from
    ``rule``: a prefix). ``row_mask`` ``[N, T]`` marks real tokens (padded rows keep none; no other row changes)."""
    rm = RankedMass.of(gs, rule.max_k, rule.kind)
    k = rm.kept(rule.kind, rule.threshold, rule.min_k)
    valid = _ranks(rule.max_k, k.device) < k.unsqueeze(-1)
    if row_mask is not None:
        valid = valid & row_mask.unsqueeze(-1)
    return rm.ids, valid


def adaptive_select(gs: GateScores, rule: Adaptive, row_mask: Tensor | None = None) -> Slots:
    """:func:`adaptive_slots` as the stages' slots (SERE and piggybacking run on them)."""
    ids, valid = adaptive_slots(gs, rule, row_mask)
    return Slots.selected(ids, gs.scores.gather(-1, ids), valid)
