"""Triton fused routing for a layer's plain top-k plan: scoring + grouped top-k + top-k + weights, one launch.

Specification: :class:`sgl_budget.routing.LayerRouter` for a plan with per-layer
k and no batch stage (reference conventions: sorted top-k). Each program takes
``BLOCK_T`` tokens: softmax (or sigmoid + correction bias) in float32, the group
limit for grouped models, then k rounds of arg-max (ties to the lower expert
index: the reference's rule for every plan but a stock one, see ``backend``),
renormalisation over the k chosen and the routed scaling factor; slots
``k..width-1`` are padding (id -1, weight 0). Static shapes, no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NEG = tl.constexpr(-3.0e38)  # a global a @triton.jit function reads must be a constexpr


@triton.jit
def score_rows(logits_ptr, bias_ptr, rows, T, BLOCK_T: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
               SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr):
    """``(scores, select, eligible)`` ``[BLOCK_T, E_PAD]`` of the tokens ``rows`` (the reference's GateScores).

    ``scores``: softmax / sigmoid gate scores in float32; ``select``: what top-k ranks (plus the correction
    bias; the group limit applied: -inf, or 0 without a bias, as the model does); ``eligible``: inside the
    token's kept groups (every real expert on ungrouped models).
    """
    cols = tl.arange(0, E_PAD)
    rmask = rows < T
    cmask = cols < E
    x = tl.load(logits_ptr + rows[:, None] * E + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                other=NEG).to(tl.float32)
    if SIGMOID:
        scores = tl.sigmoid(x)
    else:
        m = tl.max(x, 1)
        p = tl.exp(x - m[:, None])
        p = tl.where(cmask[None, :], p, 0.0)
        scores = p / tl.sum(p, 1)[:, None]
    select = scores
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        select = scores + b[None, :]
    select = tl.where(cmask[None, :], select, NEG)
    eligible = tl.broadcast_to(cmask[None, :], [BLOCK_T, E_PAD])

    if N_GROUP > 1:
        GS: tl.constexpr = E // N_GROUP
        group_of = cols // GS
        # group score: sum of the top-2 (with a bias) or the max (without) selection scores of each group
        gscore = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32) + NEG  # per column: its group's score
        for gi in tl.static_range(N_GROUP):
            in_g = group_of == gi
            vals = tl.where(in_g[None, :], select, NEG)
            first = tl.max(vals, 1)
            if HAS_BIAS:
                arg = tl.argmax(vals, 1)
                second = tl.max(tl.where(cols[None, :] == arg[:, None], NEG, vals), 1)
                score = first + second
            else:
                score = first
            gscore = tl.where(in_g[None, :], score[:, None], gscore)
        # keep the TOPK_GROUP best groups (ties to the lower group index)
        chosen = tl.zeros([BLOCK_T, E_PAD], dtype=tl.int1)
        cand = tl.where(cmask[None, :], gscore, NEG)
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.argmax(cand, 1)  # a column of the best remaining group
            g_best = best // GS
            hit = group_of[None, :] == g_best[:, None]
            chosen = chosen | hit
            cand = tl.where(hit, NEG, cand)
        if HAS_BIAS:
            select = tl.where(chosen, select, NEG)
        else:
            select = tl.where(chosen, select, tl.where(cmask[None, :], 0.0, NEG))
        eligible = chosen & cmask[None, :]
    return scores, select, eligible


@triton.jit
def next_rank(cur, scores, cols):
    """One round of ranking ``[BLOCK_T, E_PAD]`` rows: ``(column, one-hot pick, its gate score, cur without it)``
    of each row's best remaining selection score in ``cur`` (exact ties: the lower expert index)."""
    arg = tl.argmax(cur, 1)
    pick = cols[None, :] == arg[:, None]
    raw = tl.sum(tl.where(pick, scores, 0.0), 1)
    return arg, pick, raw, tl.where(pick, NEG, cur)


@triton.jit
def put_slot(out, wo, j, value):
    """``out [BLOCK_T, WIDTH_PAD]`` with slot ``j`` of every row set to ``value [BLOCK_T]``."""
    return tl.where(wo[None, :] == j, value[:, None], out)


@triton.jit
def route_rows(logits_ptr, bias_ptr, rows, T, BLOCK_T: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
               K: tl.constexpr, WIDTH_PAD: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
               N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, WRITE_KEY: tl.constexpr):
    """Score and rank the ``BLOCK_T`` tokens ``rows``: ``(raw gate scores, ids, Alloc-T keys, sum of raw)`` of
    their top-K. Columns ``K..WIDTH_PAD-1`` are padding (id -1, score 0); keys are zero unless ``WRITE_KEY``.
    """
    cols = tl.arange(0, E_PAD)
    scores, select, _ = score_rows(logits_ptr, bias_ptr, rows, T, BLOCK_T, E, E_PAD, SIGMOID, HAS_BIAS, N_GROUP,
                                   TOPK_GROUP)
    if SIGMOID:  # Alloc-T's cross-token key: the token's normalised (clamped) selection score
        key_den = tl.sum(tl.where(select > 0, select, 0.0), 1)
        key_den = tl.where(key_den > 0, key_den, 1.0)
    wo = tl.arange(0, WIDTH_PAD)
    out_k = tl.zeros([BLOCK_T, WIDTH_PAD], dtype=tl.float32)
    out_w = tl.zeros([BLOCK_T, WIDTH_PAD], dtype=tl.float32)
    out_i = tl.zeros([BLOCK_T, WIDTH_PAD], dtype=tl.int32) - 1
    total = tl.zeros([BLOCK_T], dtype=tl.float32)
    cur = select
    for j in tl.static_range(K):
        arg, pick, raw, cur = next_rank(cur, scores, cols)
        if WRITE_KEY:
            if SIGMOID:
                sel = tl.sum(tl.where(pick, select, 0.0), 1)
                kv = tl.where(sel > 0, sel, 0.0) / key_den
            else:
                kv = raw
            out_k = put_slot(out_k, wo, j, kv)
        out_w = put_slot(out_w, wo, j, raw)
        out_i = put_slot(out_i, wo, j, arg)
        total += raw
    return out_w, out_i, out_k, total


@triton.jit
def _fused_topk_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, T, E: tl.constexpr, E_PAD: tl.constexpr,
                       K: tl.constexpr, WIDTH: tl.constexpr, WIDTH_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                       SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                       RENORM: tl.constexpr, EPS: tl.constexpr, SCALE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    out_w, out_i, out_k, total = route_rows(logits_ptr, bias_ptr, rows, T, BLOCK_T, E, E_PAD, K, WIDTH_PAD, SIGMOID,
                                            HAS_BIAS, N_GROUP, TOPK_GROUP, False)
    if RENORM:
        out_w = out_w / (total + EPS)[:, None]
    out_w = out_w * SCALE
    wo = tl.arange(0, WIDTH_PAD)
    omask = (rows < T)[:, None] & (wo[None, :] < WIDTH)
    tl.store(w_ptr + rows[:, None] * WIDTH + wo[None, :], out_w, mask=omask)
    tl.store(ids_ptr + rows[:, None] * WIDTH + wo[None, :], out_i, mask=omask)


def fused_topk(router_logits: torch.Tensor, k: int, width: int, *, sigmoid: bool = False,
               correction_bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1,
               renormalize: bool = True, eps: float = 0.0, scale: float = 1.0,
               block_t: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, width] float32, ids [T, width] int32)``; slots ``k..width-1`` padded (-1, 0)."""
    x = router_logits.contiguous()
    t, e = x.shape
    w = torch.empty(t, width, dtype=torch.float32, device=x.device)
    ids = torch.empty(t, width, dtype=torch.int32, device=x.device)
    bias = correction_bias.contiguous().float() if correction_bias is not None else x
    grid = (triton.cdiv(max(t, 1), block_t),)
    _fused_topk_kernel[grid](x, bias, w, ids, t, E=e, E_PAD=triton.next_power_of_2(e), K=k, WIDTH=width,
                             WIDTH_PAD=triton.next_power_of_2(width), BLOCK_T=block_t, SIGMOID=sigmoid,
                             HAS_BIAS=correction_bias is not None, N_GROUP=n_group, TOPK_GROUP=topk_group,
                             RENORM=renormalize, EPS=eps, SCALE=scale)
    return w, ids
