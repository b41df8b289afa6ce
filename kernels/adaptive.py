"""Triton per-token confidence routing (top-p / min-p) in one launch: scoring + ranking + rule + weights.

Specification: :func:`sgl_budget.routing.adaptive.adaptive_select` followed by the
router's compaction and weight rule. Each program takes ``BLOCK_T`` tokens (the rule
depends on the token alone, so any batch size runs, prefills included): softmax (or
sigmoid + correction bias) and the group limit as
:func:`~sgl_budget.kernels.fused_topk.score_rows` computes them, then ``MAXK`` rounds of
arg-max (exact ties: lower expert index first). Round ``r`` reads the gate score
``s_r`` of the rank's expert (0 outside the token's kept groups) and, for ``r >=
MIN_K``, whether the rank passes: top-p ``s_0 + .. + s_{r-1} < threshold * Z`` (the
prefix summed in rank order in float32, ``Z`` the gate mass of the token's eligible
experts), min-p ``s_r >= threshold * s_0``. The token keeps its first ``k_t = MIN_K +
#passing`` ranks (never more than its eligible ranks); the kept slots' weights are
renormalised (``sum + eps``) and scaled; slots ``k_t..WIDTH-1`` are padding (id -1,
weight 0), as are all slots of rows outside ``row_mask``. Static shapes, no host sync;
the threshold is a runtime argument, so calibrated per-layer thresholds share one compile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_topk import next_rank, put_slot, score_rows
from .launch import as_int8_mask
from .weights import finalize_weights

KINDS = {"top_p": 0, "min_p": 1}


@triton.jit(do_not_specialize=["T"])
def _adaptive_kernel(logits_ptr, bias_ptr, mask_ptr, w_ptr, ids_ptr, T, threshold, E: tl.constexpr,
                     E_PAD: tl.constexpr, MIN_K: tl.constexpr, MAXK: tl.constexpr, WIDTH: tl.constexpr,
                     WIDTH_PAD: tl.constexpr, BLOCK_T: tl.constexpr, MIN_P: tl.constexpr, SIGMOID: tl.constexpr,
                     HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                     HAS_MASK: tl.constexpr, RENORM: tl.constexpr, EPS: tl.constexpr, SCALE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    cols = tl.arange(0, E_PAD)
    scores, select, eligible = score_rows(logits_ptr, bias_ptr, rows, T, BLOCK_T, E, E_PAD, SIGMOID, HAS_BIAS,
                                          N_GROUP, TOPK_GROUP)
    thr = tl.zeros([BLOCK_T], dtype=tl.float32) + threshold  # a float32 value (exact)
    z = tl.sum(tl.where(eligible, scores, 0.0), 1)  # the token's eligible gate mass
    limit = thr * z
    wo = tl.arange(0, WIDTH_PAD)
    out_w = tl.zeros([BLOCK_T, WIDTH_PAD], dtype=tl.float32)
    out_i = tl.zeros([BLOCK_T, WIDTH_PAD], dtype=tl.int32)
    prefix = tl.zeros([BLOCK_T], dtype=tl.float32)  # gate mass of the ranks before this one, in rank order
    s0 = tl.zeros([BLOCK_T], dtype=tl.float32)
    k = tl.zeros([BLOCK_T], dtype=tl.int32) + MIN_K
    n_elig = tl.zeros([BLOCK_T], dtype=tl.int32)
    cur = select
    for r in tl.static_range(MAXK):
        arg, pick, raw, cur = next_rank(cur, scores, cols)
        if N_GROUP > 1:  # outside the token's kept groups: no gate mass, never kept by the rule
            elig = tl.max(tl.where(pick & eligible, 1, 0), 1) > 0
        else:  # every real expert (MAXK <= E: no padding column is ever picked)
            elig = rows >= 0
        s = tl.where(elig, raw, 0.0)
        if r == 0:
            s0 = s
        if r >= MIN_K:
            if MIN_P:
                ok = s >= thr * s0
            else:
                ok = prefix < limit
            k += (ok & elig).to(tl.int32)
        n_elig += elig.to(tl.int32)
        prefix = prefix + s
        out_w = put_slot(out_w, wo, r, raw)
        out_i = put_slot(out_i, wo, r, arg.to(tl.int32))
    k = tl.minimum(k, n_elig)
    if HAS_MASK:
        k = tl.where(tl.load(mask_ptr + rows, mask=rmask, other=0) != 0, k, 0)
    valid = wo[None, :] < k[:, None]
    w = finalize_weights(tl.where(valid, out_w, 0.0), RENORM, EPS, SCALE)
    omask = rmask[:, None] & (wo[None, :] < WIDTH)
    tl.store(w_ptr + rows[:, None] * WIDTH + wo[None, :], w, mask=omask)
    tl.store(ids_ptr + rows[:, None] * WIDTH + wo[None, :], tl.where(valid, out_i, -1), mask=omask)


def adaptive_topk(router_logits: torch.Tensor, kind: str, threshold: float, min_k: int, max_k: int, width: int, *,
                  sigmoid: bool = False, correction_bias: torch.Tensor | None = None, n_group: int = 1,
                  topk_group: int = 1, renormalize: bool = True, eps: float = 0.0, scale: float = 1.0,
                  row_mask: torch.Tensor | None = None, block_t: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, width] float32, ids [T, width] int32)`` of a confidence rule (``kind`` top_p | min_p) with
    bounds ``min_k..max_k`` (``width >= max_k``); each token's kept experts first, then padding (-1, 0).

    ``row_mask`` (``[T]`` bool, on the device): rows outside it get padding only (no other row changes).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, not {kind!r}")
    if not 0 <= min_k <= max_k <= width:
        raise ValueError(f"need 0 <= min_k <= max_k <= width, not {min_k}, {max_k}, {width}")
    x = router_logits.contiguous()
    t, e = x.shape
    w = torch.empty(t, width, dtype=torch.float32, device=x.device)
    ids = torch.empty(t, width, dtype=torch.int32, device=x.device)
    bias = correction_bias.contiguous().float() if correction_bias is not None else x
    mask = as_int8_mask(row_mask, x.device) if row_mask is not None else ids
    grid = (triton.cdiv(max(t, 1), block_t),)
    _adaptive_kernel[grid](x, bias, mask, w, ids, t, float(threshold), E=e, E_PAD=triton.next_power_of_2(e),
                           MIN_K=min_k, MAXK=max_k, WIDTH=width, WIDTH_PAD=triton.next_power_of_2(width),
                           BLOCK_T=block_t, MIN_P=KINDS[kind] == 1, SIGMOID=sigmoid,
                           HAS_BIAS=correction_bias is not None, N_GROUP=n_group, TOPK_GROUP=topk_group,
                           HAS_MASK=row_mask is not None, RENORM=renormalize, EPS=eps, SCALE=scale)
    return w, ids
