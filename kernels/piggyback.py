"""Triton OEA piggybacking of one batch: fill each token's free slots with experts the batch already loads.

Specification: :func:`sgl_budget.routing.piggyback.piggyback` followed by the
router's compaction and weight rule. One program takes the whole batch (the
batch's expert set needs every token): the set of experts in a valid slot
(histogram), then per block of ``BLOCK_T`` tokens the gate scores again
(:func:`~sgl_budget.kernels.fused_topk.score_rows`), the candidates (in the set,
not held, eligible, gate score >= ``min_score``, a real row), up to
``max_k - held`` of them by selection score (ties to the lower expert index)
appended after the token's valid slots, and the weights over all kept slots.
Input slots carry raw gate scores (the previous stage's weights before the
weight rule). Static shapes, no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_topk import NEG, score_rows
from .launch import as_int8_mask, token_tile, whole_batch_warps
from .weights import finalize_weights

MAX_TOKENS = 1024  # one program; larger (prefill) batches take the reference


@triton.jit(do_not_specialize=["T"])
def _piggyback_kernel(logits_ptr, bias_ptr, ids_ptr, raw_ptr, mask_ptr, w_out_ptr, ids_out_ptr, T,
                      E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr, T_PAD: tl.constexpr,
                      W_IN: tl.constexpr, W_IN_PAD: tl.constexpr, WIDTH: tl.constexpr, WIDTH_PAD: tl.constexpr,
                      MAX_K: tl.constexpr, ADD: tl.constexpr, MIN_SCORE: tl.constexpr, SIGMOID: tl.constexpr,
                      HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                      RENORM: tl.constexpr, EPS: tl.constexpr, SCALE: tl.constexpr, HAS_MASK: tl.constexpr):
    cols = tl.arange(0, E_PAD)
    ks = tl.arange(0, W_IN_PAD)
    wo = tl.arange(0, WIDTH_PAD)
    # the batch's expert set: every expert in a valid slot of any token
    all_rows = tl.arange(0, T_PAD)
    in_all = (all_rows < T)[:, None] & (ks < W_IN)[None, :]
    all_ids = tl.load(ids_ptr + all_rows[:, None] * W_IN + ks[None, :], mask=in_all, other=-1)
    bins = tl.reshape(tl.where(all_ids >= 0, all_ids, E), [T_PAD * W_IN_PAD])
    in_set = (tl.histogram(bins, E_PAD) > 0) & (cols < E)

    for tb in range(0, tl.cdiv(T, BLOCK_T)):
        rows = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        in_k = (rows < T)[:, None] & (ks < W_IN)[None, :]
        ids = tl.load(ids_ptr + rows[:, None] * W_IN + ks[None, :], mask=in_k, other=-1)
        raw = tl.load(raw_ptr + rows[:, None] * W_IN + ks[None, :], mask=in_k, other=0.0)
        valid = ids >= 0
        scores, select, eligible = score_rows(logits_ptr, bias_ptr, rows, T, BLOCK_T, E, E_PAD, SIGMOID,
                                              HAS_BIAS, N_GROUP, TOPK_GROUP)
        held = tl.zeros([BLOCK_T, E_PAD], dtype=tl.int1)
        for j in tl.static_range(W_IN):
            id_j = tl.sum(tl.where(ks[None, :] == j, ids, 0), 1)
            held = held | (cols[None, :] == id_j[:, None])
        real = rows < T
        if HAS_MASK:  # rows outside the mask (padding, other policies' rows) take no experts
            real = real & (tl.load(mask_ptr + rows, mask=rows < T, other=0) != 0)
        ok = in_set[None, :] & ~held & eligible & real[:, None]
        if MIN_SCORE > 0:
            ok = ok & (scores >= MIN_SCORE)
        cand = tl.where(ok, select, NEG)
        n_valid = tl.sum(valid.to(tl.int32), 1)
        free = MAX_K - n_valid

        # the token's valid slots first, in order (a stable compaction), then the piggybacked ones
        pos = tl.cumsum(valid.to(tl.int32), 1) - 1
        place = valid[:, :, None] & (pos[:, :, None] == wo[None, None, :])
        out_w = tl.sum(tl.where(place, raw[:, :, None], 0.0), 1)
        out_i = tl.sum(tl.where(place, ids[:, :, None] + 1, 0), 1) - 1
        for j in tl.static_range(ADD):
            arg = tl.argmax(cand, 1)
            best = tl.max(cand, 1)
            add = (best > NEG) & (j < free)
            pick = cols[None, :] == arg[:, None]
            s_j = tl.sum(tl.where(pick, scores, 0.0), 1)
            at = (wo[None, :] == (n_valid + j)[:, None]) & add[:, None]
            out_w = tl.where(at, s_j[:, None], out_w)
            out_i = tl.where(at, arg[:, None], out_i)
            cand = tl.where(pick, NEG, cand)
        kept = out_i >= 0
        w = finalize_weights(tl.where(kept, out_w, 0.0), RENORM, EPS, SCALE)
        omask = (rows < T)[:, None] & (wo[None, :] < WIDTH)
        tl.store(w_out_ptr + rows[:, None] * WIDTH + wo[None, :], w, mask=omask)
        tl.store(ids_out_ptr + rows[:, None] * WIDTH + wo[None, :], out_i, mask=omask)


def piggyback_fits(num_tokens: int) -> bool:
    """Whether one program takes this batch (decode batches do; large prefills go to torch)."""
    return num_tokens <= MAX_TOKENS


def piggyback(router_logits: torch.Tensor, ids: torch.Tensor, raw: torch.Tensor, max_k: int, min_score: float,
              width: int, *, sigmoid: bool = False, correction_bias: torch.Tensor | None = None, n_group: int = 1,
              topk_group: int = 1, renormalize: bool = True, eps: float = 0.0, scale: float = 1.0,
              row_mask: torch.Tensor | None = None, block_t: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Piggyback onto one batch's slots ``ids``/``raw`` (``[T, W]``, -1 padding, raw gate scores)
    -> ``(weights [T, width] float32, ids [T, width] int32)``; rows outside ``row_mask`` (``[T]`` bool) take
    nothing (their slots should already be -1: they must not add to the batch's expert set)."""
    x = router_logits.contiguous()
    t, e = x.shape
    w_in = ids.shape[1]
    dev = x.device
    w = torch.empty(t, width, dtype=torch.float32, device=dev)
    out = torch.empty(t, width, dtype=torch.int32, device=dev)
    ids = ids.to(torch.int32).contiguous()
    bias = correction_bias.contiguous().float() if correction_bias is not None else x
    mask = as_int8_mask(row_mask, dev) if row_mask is not None else ids
    e_pad = triton.next_power_of_2(e + 1)
    t_pad = token_tile(t)
    w_in_pad = triton.next_power_of_2(w_in)
    width_pad = triton.next_power_of_2(max(width, max_k, w_in))
    _piggyback_kernel[(1,)](x, bias, ids, raw.float().contiguous(), mask, w, out, t, E=e, E_PAD=e_pad,
                            BLOCK_T=block_t, T_PAD=t_pad, W_IN=w_in, W_IN_PAD=w_in_pad, WIDTH=width,
                            WIDTH_PAD=width_pad, MAX_K=max_k, ADD=min(max_k, e), MIN_SCORE=float(min_score),
                            SIGMOID=sigmoid, HAS_BIAS=correction_bias is not None, N_GROUP=n_group,
                            TOPK_GROUP=topk_group, RENORM=renormalize, EPS=eps, SCALE=scale,
                            HAS_MASK=row_mask is not None,
                            num_warps=whole_batch_warps(max(block_t * e_pad, t_pad * w_in_pad,
                                                            block_t * w_in_pad * width_pad)))
    return w, out
