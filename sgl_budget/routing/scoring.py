"""The model's own expert scoring: gate scores, selection scores and the final weight rule.

Every stage of a policy ranks experts by the *selection score* and weights them by
the *gate score*, exactly as the model does:

* softmax models (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2): gate score =
  ``softmax(logits.float())``; selection score = gate score (ERNIE-4.5-MoE: + its correction bias).
* sigmoid models (DeepSeek-V3 ``noaux_tc``): gate score = ``sigmoid(logits.float())``;
  selection score = gate score + ``e_score_correction_bias`` when the model has one.
* sqrtsoftplus models (DeepSeek-V4): gate score = ``sqrt(softplus(logits))`` (float32, or the logits'
  dtype under ``scores_in_logit_dtype``: both engines' own routers); selection score = gate score +
  ``e_score_correction_bias``. Like sigmoid scores they are no per-token distribution.
* grouped top-k (``spec.n_group > 1``): experts outside the ``topk_group`` best
  groups get selection score ``-inf``. Group score = sum of the group's top-2
  selection scores for models with a correction bias (DeepSeek-V3 / SGLang
  ``biased_grouped_topk``), the group's maximum otherwise (DeepSeek-V2
  ``group_limited_greedy`` / SGLang ``grouped_topk``). Masking with ``-inf``
  (SGLang, DeepSeek's own inference code) rather than HF's ``0.0`` keeps a
  negative biased score from losing to a masked expert.

Weights are always the *unbiased* gate scores of the chosen experts, renormalised
when ``spec.norm_topk_prob`` (``sum + eps``, or ``clamp(sum, min)`` under a clamp convention: ERNIE in
transformers) and scaled by ``routed_scaling_factor``. A model with a learned per-expert scale
(``spec.has_expert_scale``: Gemma 4) then multiplies each slot's weight by the scale of the expert the slot
finally uses; the scale is a weight of the layer, so the engines apply it to the router's output
(:func:`apply_expert_scale`) — it changes no selection, and any router (reference or kernel) serves it.

Exact ties: every ranking a policy adds (top-k at any k once a policy stage
applies, the group limit, Alloc-T, SERE, piggybacking) puts the lower expert
(or group) index first, here and in the Triton kernels alike
(:func:`ranked_topk`). Only a *stock plan* — the model's own k and nothing
else — ranks with the engine's own ``torch.topk`` (:meth:`GateScores.stock_topk`),
so it stays bit-for-bit the model's routing; ``torch.topk`` leaves the order of
exact ties unspecified (CPU: logits ``[-1,-3,4,-4,-3,8,1,6]``, k = 6 give
``[5,7,2,6,0,4]``; the lower-index rule gives ``[5,7,2,6,0,1]``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..families import family_of
from ..spec import ModelSpec

NEG_INF = float("-inf")
_SORT_MAX = 1 << 14  # ranked_topk sorts up to this many scores (same order as the keys: stable, -0.0 == 0.0)


def ranked_topk(x: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """``(values, indices)`` of the ``m`` largest along the last dim; exact ties: lower index first."""
    if x.dtype == torch.float64 or x.numel() <= _SORT_MAX:  # decode-sized: one stable sort beats the key ops
        vals, ids = torch.sort(x, dim=-1, descending=True, stable=True)
        return vals[..., :m], ids[..., :m]
    ids = torch.topk(_unique_keys(x), m, dim=-1).indices
    return x.gather(-1, ids), ids


def _unique_keys(x: Tensor) -> Tensor:
    """int64 keys in ``x``'s order with no ties: (float32 bits made monotone) << 32 | reversed index.

    One integer ``torch.topk`` on these is the lower-index-first ranking (about 2x cheaper than a stable sort).
    """
    bits = (x.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0 (they compare equal)
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # negative floats: reversed magnitude
    e = x.shape[-1]
    return (key << 32) | (e - 1 - torch.arange(e, device=x.device, dtype=torch.int64))


@dataclass(frozen=True)
class Conventions:
    """How an engine's own router computes what the model leaves open, so stock routing matches it exactly.

    The defaults follow the models' reference (Hugging Face) code. Engine adapters
    pass their engine's choices (e.g. SGLang adds 1e-20 to every renormalisation,
    selects with ``torch.topk(sorted=False)`` on grouped/biased paths, and may
    leave the routed scaling factor to the MoE output).
    """

    renorm_eps: float | None = None  # None: the family's reference value (renorm_epsilon)
    apply_routed_scaling: bool = True  # False: the engine scales the MoE output instead
    sorted_selection: bool = True  # torch.topk(sorted=...) of the plain top-k selection
    scores_in_logit_dtype: bool = False  # score in the router logits' dtype (else float32)
    renorm_clamp_min: float | None = None  # set: renormalise by clamp(sum, min=it) instead of sum + eps (ERNIE in HF)
    ignore_correction_bias: bool = False  # the engine's own top-k drops the bias (SGLang's CUDA softmax fused_topk)
    renorm_sum_fp32: bool = False  # the renormalisation sums in float32 (then divides by type promotion: SGLang's torch paths)
    # GPT-OSS's transformers router: top-k on the raw logits, weights = softmax over the chosen experts' logits in
    # the logits' dtype (mathematically the renormalised softmax; bit for bit only this way). Ranking and the
    # policy stages still use the softmax gate scores; only the stock selection and the final weights change.
    weights_from_selected_logits: bool = False


REFERENCE = Conventions()


@dataclass(frozen=True)
class GateScores:
    """A batch's scores, ``[N, T, E]`` float32: what weights come from and what ranks experts."""

    scores: Tensor  # unbiased gate scores (softmax probs / sigmoid scores): the weight source
    select: Tensor  # selection scores: biased where the model has a bias, -inf outside kept groups
    ranked: tuple[Tensor, Tensor] | None = None  # optional precomputed topk(select, M) shared by many routers
    eligible: Tensor | None = None  # [N, T, E] bool on grouped models: experts inside the token's kept groups
    stock_select: Tensor | None = None  # grouped models: select with the engine's own group choice
    stock_ranked: tuple[Tensor, Tensor] | None = None  # optional precomputed stock_topk(K) (replay shares it)
    logits: Tensor | None = None  # the router logits, kept when the weights come from the selected logits

    def weight_source(self, ids: Tensor, raw: Tensor) -> Tensor:
        """What :func:`finalize_weights` weighs slots ``ids`` by: their raw gate scores, or their logits when
        the conventions take the weights from the selected logits (slots with id < 0 read expert 0; mask them)."""
        return raw if self.logits is None else self.logits.gather(-1, ids.clamp(min=0).long())

    def topk(self, m: int) -> tuple[Tensor, Tensor]:
        """:func:`ranked_topk` of ``select`` (ties: lower index) — sliced from ``ranked`` when precomputed."""
        if self.ranked is not None and self.ranked[0].shape[-1] >= m:
            return self.ranked[0][..., :m], self.ranked[1][..., :m]
        return ranked_topk(self.select, m)

    def stock_topk(self, m: int, sorted: bool = True) -> tuple[Tensor, Tensor]:
        """The engine's own ``torch.topk`` selection (group choice included): a stock plan's, bit for bit."""
        if sorted and self.stock_ranked is not None and self.stock_ranked[0].shape[-1] == m:
            return self.stock_ranked
        select = self.select if self.stock_select is None else self.stock_select
        return torch.topk(select, m, dim=-1, sorted=sorted)

    def with_ranking(self, m: int, stock_k: int | None = None) -> "GateScores":
        """The same scores with ``topk(select, m)`` (and ``stock_topk(stock_k)``) computed once, for replay.

        One ``torch.topk`` serves both: a row without an exact tie among its ``m + 1`` best has one
        order only; just the tied rows are re-ranked. The tie check reads the host (replay, not serving).
        """
        m = min(m, self.num_experts)
        vals, ids = torch.topk(self.select, min(m + 1, self.num_experts), dim=-1)
        tied = (vals[..., 1:] == vals[..., :-1]).any(dim=-1)
        stock = None if stock_k is None else self._shared_stock(vals, ids, tied, stock_k)
        vals, ids = vals[..., :m].clone(), ids[..., :m].clone()
        if bool(tied.any()):
            vals[tied], ids[tied] = ranked_topk(self.select[tied], m)
        return replace(self, ranked=(vals, ids), stock_ranked=stock)

    def _shared_stock(self, vals: Tensor, ids: Tensor, tied: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """``stock_topk(k)`` from a wider ``torch.topk``: only tied rows (and grouped models) need their own."""
        if self.stock_select is not None:  # grouped: the engine's group choice may differ on tied groups
            return self.stock_topk(k)
        stock = (vals[..., :k].clone(), ids[..., :k].clone())
        if bool(tied.any()):  # torch.topk's tie order depends on k: rank these rows again at k
            stock[0][tied], stock[1][tied] = torch.topk(self.select[tied], k, dim=-1)
        return stock

    @property
    def num_experts(self) -> int:
        return self.scores.shape[-1]


def gate_scores(spec: ModelSpec, router_logits: Tensor, conv: Conventions = REFERENCE) -> Tensor:
    """The model's unbiased gate scores (float32 unless ``conv`` says otherwise): softmax, sigmoid or
    sqrt(softplus) (``F.softplus(x).sqrt()``, as SGLang's ``TopK`` and transformers' ``SqrtSoftplusActivation``)."""
    x = router_logits if conv.scores_in_logit_dtype else router_logits.float()
    if spec.scoring_func == "sqrtsoftplus":
        return torch.nn.functional.softplus(x).sqrt()
    return torch.sigmoid(x) if spec.scoring_func == "sigmoid" else torch.softmax(x, dim=-1)


def check_correction_bias(spec: ModelSpec, correction_bias: Tensor | None) -> None:
    """Raise ValueError when the bias is missing for a biased model or given to an unbiased one."""
    if spec.has_correction_bias and correction_bias is None:
        raise ValueError(
            f"model {spec.name!r} selects experts with sigmoid + e_score_correction_bias: "
            "pass the layer's correction_bias [E]"
        )
    if not spec.has_correction_bias and correction_bias is not None:
        raise ValueError(f"model {spec.name!r} has no correction bias, but one was passed")
    if correction_bias is not None and tuple(correction_bias.shape) != (spec.num_experts,):
        raise ValueError(
            f"correction_bias must have shape [{spec.num_experts}], not {list(correction_bias.shape)}"
        )


def _group_limit(spec: ModelSpec, select: Tensor, stock: bool = False) -> tuple[Tensor, Tensor]:
    """Mask the experts outside each token's ``topk_group`` best groups; also return the kept mask.

    Masked selection scores become -inf with a correction bias (biased scores can be
    negative) and 0.0 without one, exactly as DeepSeek's and SGLang's code do. Tied
    groups: lower group index first, or the engines' ``torch.topk`` when ``stock``.
    """
    group_size = spec.num_experts // spec.n_group
    grouped = select.unflatten(-1, (spec.n_group, group_size))
    if spec.has_correction_bias:
        group_score = grouped.topk(min(2, group_size), dim=-1).values.sum(dim=-1)
    else:
        group_score = grouped.amax(dim=-1)
    if stock:
        kept = group_score.topk(spec.topk_group, dim=-1, sorted=False).indices
    else:
        kept = ranked_topk(group_score, spec.topk_group)[1]
    keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(-1, kept, True)
    keep = keep.unsqueeze(-1).expand(grouped.shape).flatten(-2)
    return select.masked_fill(~keep, NEG_INF if spec.has_correction_bias else 0.0), keep


def score_experts(spec: ModelSpec, router_logits: Tensor, correction_bias: Tensor | None = None,
                  conv: Conventions = REFERENCE) -> GateScores:
    """Gate and selection scores for router logits ``[..., T, E]`` under the model's own rule."""
    if conv.ignore_correction_bias:  # rank as the engine's stock path does: by the unbiased scores
        correction_bias = None
    else:
        check_correction_bias(spec, correction_bias)
    scores = gate_scores(spec, router_logits, conv)
    select = scores
    if correction_bias is not None:
        select = scores + correction_bias.to(device=scores.device)  # type promotion, as the engines do
    eligible = stock_select = logits = None
    if spec.grouped:
        stock_select = _group_limit(spec, select, stock=True)[0]
        select, eligible = _group_limit(spec, select)
    if conv.weights_from_selected_logits:
        if spec.grouped or correction_bias is not None or spec.scoring_func != "softmax":
            raise ValueError("weights_from_selected_logits is the ungrouped, unbiased softmax rule only")
        logits = stock_select = router_logits  # the engine's own top-k runs on the raw logits
    return GateScores(scores=scores, select=select, eligible=eligible, stock_select=stock_select, logits=logits)


def eligible_per_token(spec: ModelSpec) -> int:
    """How many experts a token can be routed to at all (all, or those in its kept groups)."""
    if spec.grouped:
        return spec.topk_group * (spec.num_experts // spec.n_group)
    return spec.num_experts


def gate_probs(spec: ModelSpec, router_logits: Tensor, correction_bias: Tensor | None = None) -> Tensor:
    """The model's routing distribution ``[..., T, E]`` float32, used to measure routing mass.

    Softmax models: the softmax itself. Sigmoid and sqrtsoftplus models: the scores divided by
    their sum over all experts. The correction bias only steers selection, so it
    does not enter the distribution (the argument exists for a uniform call shape).
    """
    scores = gate_scores(spec, router_logits)
    if spec.scoring_func != "softmax":
        scores = scores / scores.sum(dim=-1, keepdim=True)
    return scores


def renorm_epsilon(spec: ModelSpec) -> float:
    """The term the family's reference adds to the renormalisation denominator.

    The family's record says (:mod:`sgl_budget.families`: DeepSeek's modelling code adds 1e-20, Mixtral / Qwen /
    OLMoE nothing); a spec of no known family adds 1e-20 when it selects with a correction bias (DeepSeek-V3 style).
    """
    fam = family_of(spec.model_type)
    if fam is not None:
        return fam.renorm_eps
    return 1e-20 if spec.has_correction_bias else 0.0


def finalize_weights(spec: ModelSpec, raw: Tensor, valid: Tensor | None, conv: Conventions = REFERENCE) -> Tensor:
    """Final slot weights from raw gate scores: renormalise over valid slots, then scale.

    ``valid=None`` means every slot is valid (the stock path, kept op-for-op
    identical to the models' code so stock routing is bit-exact). Padded slots
    get weight exactly 0; a token without any weight keeps zeros, never NaN.

    With ``conv.weights_from_selected_logits`` ``raw`` holds the slots' router logits
    (:meth:`GateScores.weight_source`) and the weights are their softmax over the valid slots, in the
    logits' dtype (as GPT-OSS's transformers router computes them; renormalised by construction).
    """
    if conv.weights_from_selected_logits:
        x = raw if valid is None else raw.masked_fill(~valid, NEG_INF)
        w = torch.nn.functional.softmax(x, dim=-1, dtype=x.dtype)
        if valid is not None:  # a token without any valid slot: softmax of all -inf is NaN; keep zeros
            w = w.masked_fill(~valid, 0.0)
        if conv.apply_routed_scaling and spec.routed_scaling_factor != 1.0:
            w = w * spec.routed_scaling_factor
        return w.float()
    w = raw if valid is None else raw.masked_fill(~valid, 0.0)
    if spec.norm_topk_prob:
        denom = w.sum(dim=-1, keepdim=True, dtype=torch.float32 if conv.renorm_sum_fp32 else None)
        if conv.renorm_clamp_min is not None:
            denom = torch.clamp(denom, min=conv.renorm_clamp_min)
        else:
            eps = renorm_epsilon(spec) if conv.renorm_eps is None else conv.renorm_eps
            if eps:
                denom = denom + eps
        if valid is not None:
            denom = torch.where(denom > 0, denom, torch.ones_like(denom))
        w = w / denom
    if conv.apply_routed_scaling and spec.routed_scaling_factor != 1.0:
        w = w * spec.routed_scaling_factor
    return w.float()


def apply_expert_scale(weights: Tensor, ids: Tensor, expert_scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Gemma 4's last step: each slot's weight times the layer's learned ``expert_scale[id]`` (``[E]``), float32 out.

    ``weights`` / ``ids`` ``[.., K]`` are a router's output (renormalised over the kept slots); padded slots (id
    -1 or >= E) keep weight 0. The product is taken in ``dtype``, as the engine's own router takes it
    (transformers: float32; SGLang on CPU: the router logits' dtype, which its weights were computed in, so the
    float32 weights convert to it exactly), so the model's own k stays bit for bit the engine's routing.
    """
    e = expert_scale.shape[-1]
    valid = (ids >= 0) & (ids < e)
    scale = expert_scale.to(weights.device)[ids.long().clamp(0, e - 1)]
    w = weights.to(dtype) * scale.to(dtype)
    return torch.where(valid, w, torch.zeros_like(w)).float()
