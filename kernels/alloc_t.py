"""Triton Alloc-T in one launch: scoring + top-k + the batch's slot reallocation, with per-token min/max k.

Specification: :func:`sgl_budget.routing.reallocate.reallocate` followed by the
router's weight rule. One program takes the whole batch (the reallocation needs
every token): it ranks each block of ``BLOCK_T`` tokens' top ``max_k`` experts
with :func:`~sgl_budget.kernels.fused_topk.route_rows` (raw gate scores, ids and
cross-token keys into a scratch buffer), then sorts the candidates of rank
``min_k..max_k-1`` by (key descending, token, rank) as one 64-bit composite, keeps
the best ``n*(k - min_k)`` (``n``: the rows in ``row_mask``, all ``T`` without one) and writes
weights renormalised over each token's kept slots (padding id -1, weight 0; rows outside the
mask get padding only). Each token keeps a prefix of its ranking, so the
valid slots come first, as the contract requires. Static shapes, no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_topk import route_rows
from .launch import as_int8_mask, token_tile, whole_batch_warps
from .weights import finalize_weights

MAX_SORT = 8192  # candidates one program sorts (T * (max_k - min_k), padded); larger batches use the reference


@triton.jit(do_not_specialize=["T"])
def _alloc_t_kernel(logits_ptr, bias_ptr, raw_ptr, ids_ptr, key_ptr, scratch_ptr, w_out_ptr, ids_out_ptr, mask_ptr,
                    T, E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr, SIGMOID: tl.constexpr,
                    HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                    MAXK: tl.constexpr, MIN_K: tl.constexpr, EXTRA: tl.constexpr, CANDS: tl.constexpr,
                    CANDS_PAD: tl.constexpr, T_PAD: tl.constexpr, WIDTH: tl.constexpr, WIDTH_PAD: tl.constexpr,
                    RENORM: tl.constexpr, EPS: tl.constexpr, SCALE: tl.constexpr, HAS_MASK: tl.constexpr):
    # 1. every token's top max_k: raw gate scores, ids and Alloc-T keys (block by block, into scratch)
    wo = tl.arange(0, WIDTH_PAD)
    for tb in range(0, tl.cdiv(T, BLOCK_T)):
        rows_b = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        raw_b, ids_b, key_b, _ = route_rows(logits_ptr, bias_ptr, rows_b, T, BLOCK_T, E, E_PAD, MAXK, WIDTH_PAD,
                                            SIGMOID, HAS_BIAS, N_GROUP, TOPK_GROUP, CANDS > 0)
        m_b = (rows_b < T)[:, None] & (wo[None, :] < MAXK)
        at = rows_b[:, None] * MAXK + wo[None, :]
        tl.store(raw_ptr + at, raw_b, mask=m_b)
        tl.store(ids_ptr + at, ids_b, mask=m_b)
        if CANDS > 0:
            tl.store(key_ptr + at, key_b, mask=m_b)
    tl.debug_barrier()

    # 2. the best n_real*(k - min_k) candidates of rank min_k.. across the real rows of the batch
    # rows outside the mask (CUDA-graph padding, another policy's rows): no slots and no share of the budget
    rows = tl.arange(0, T_PAD)
    rmask = rows < T
    if HAS_MASK:
        real = rmask & (tl.load(mask_ptr + rows, mask=rmask, other=0) != 0)
    else:
        real = rmask
    n_real = tl.sum(real.to(tl.int32), 0)
    if CANDS > 0:
        offs = tl.arange(0, T_PAD * CANDS_PAD)
        t = offs // CANDS_PAD
        c = offs % CANDS_PAD
        m = (t < T) & (c < CANDS)
        if HAS_MASK:
            m = m & (tl.load(mask_ptr + t, mask=t < T, other=0) != 0)
        key = tl.load(key_ptr + t * MAXK + MIN_K + c, mask=m, other=-1.0)
        bits = key.to(tl.int32, bitcast=True).to(tl.int64)  # non-negative floats keep their order as integers
        composite = (bits << 32) | (0x7FFFFFFF - offs).to(tl.int64)
        composite = tl.where(m, composite, -(1 << 62))
        ranked = tl.sort(composite, 0, descending=True)
        n = n_real * EXTRA
        thr = tl.sum(tl.where(offs == n - 1, ranked, 0), 0)
        chosen = m & (key >= 0) & (composite >= thr) & (n > 0)
        tl.store(scratch_ptr + t * MAXK + MIN_K + c, chosen.to(tl.int32), mask=m)
        tl.debug_barrier()

    # 3. each token's kept prefix, its weights renormalised over the kept slots
    in_k = real[:, None] & (wo[None, :] < MAXK)
    raw = tl.load(raw_ptr + rows[:, None] * MAXK + wo[None, :], mask=in_k, other=0.0)
    ids = tl.load(ids_ptr + rows[:, None] * MAXK + wo[None, :], mask=in_k, other=-1)
    valid = in_k & (wo[None, :] < MIN_K) & (ids >= 0)
    if CANDS > 0:
        extra = tl.load(scratch_ptr + rows[:, None] * MAXK + wo[None, :],
                        mask=in_k & (wo[None, :] >= MIN_K), other=0)
        valid = valid | (in_k & (extra != 0) & (ids >= 0))
    w = tl.where(valid, raw, 0.0)
    w = finalize_weights(w, RENORM, EPS, SCALE)
    omask = rmask[:, None] & (wo[None, :] < WIDTH)
    tl.store(w_out_ptr + rows[:, None] * WIDTH + wo[None, :], w, mask=omask)
    tl.store(ids_out_ptr + rows[:, None] * WIDTH + wo[None, :], tl.where(valid, ids, -1), mask=omask)


def _ranking(k: int, min_k: int, max_k: int) -> tuple[int, int, int]:
    """``(min_k, extra, candidates)`` the kernel ranks: none when every candidate fits or none is asked for."""
    cands = max_k - min_k
    extra = min(k, max_k) - min_k
    if extra >= cands:
        return (max_k if cands > 0 else min_k), 0, 0
    return min_k, max(0, extra), cands if extra > 0 else 0


def alloc_t_fits(num_tokens: int, k: int, min_k: int, max_k: int) -> bool:
    """Whether one program can rank this batch's candidates (decode batches can; large prefills go to torch)."""
    _, _, cands = _ranking(k, min_k, max_k)
    t_pad = token_tile(num_tokens)
    return cands == 0 or t_pad * triton.next_power_of_2(cands) <= MAX_SORT


def alloc_t(router_logits: torch.Tensor, k: int, min_k: int, max_k: int, width: int, *, sigmoid: bool = False,
            correction_bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1,
            renormalize: bool = True, eps: float = 0.0, scale: float = 1.0,
            row_mask: torch.Tensor | None = None, block_t: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, width] float32, ids [T, width] int32)`` of Alloc-T for one batch of ``T`` tokens.

    ``row_mask`` (``[T]`` bool, on the device): the rows that take part (CUDA-graph padding and, in a mixed
    batch, other policies' rows do not: they get no slots and the budget is ``k`` per real row).
    """
    x = router_logits.contiguous()
    t, e = x.shape
    dev = x.device
    min_k_eff, extra, cands = _ranking(k, min_k, max_k)
    raw = torch.empty(t, max_k, dtype=torch.float32, device=dev)
    ids = torch.empty(t, max_k, dtype=torch.int32, device=dev)
    keys = torch.empty(t, max_k, dtype=torch.float32, device=dev) if cands else raw
    scratch = torch.zeros(t, max_k, dtype=torch.int32, device=dev) if cands else ids
    w = torch.empty(t, width, dtype=torch.float32, device=dev)
    out_ids = torch.empty(t, width, dtype=torch.int32, device=dev)
    bias = correction_bias.contiguous().float() if correction_bias is not None else x
    mask = as_int8_mask(row_mask, dev) if row_mask is not None else ids
    e_pad = triton.next_power_of_2(e)
    t_pad = token_tile(t)
    cands_pad = max(1, triton.next_power_of_2(cands))
    width_pad = triton.next_power_of_2(max(width, max_k))
    _alloc_t_kernel[(1,)](x, bias, raw, ids, keys, scratch, w, out_ids, mask, t, E=e, E_PAD=e_pad, BLOCK_T=block_t,
                          SIGMOID=sigmoid, HAS_BIAS=correction_bias is not None, N_GROUP=n_group,
                          TOPK_GROUP=topk_group, MAXK=max_k, MIN_K=min_k_eff, EXTRA=extra, CANDS=cands,
                          CANDS_PAD=cands_pad, T_PAD=t_pad, WIDTH=width, WIDTH_PAD=width_pad, RENORM=renormalize,
                          EPS=eps, SCALE=scale, HAS_MASK=row_mask is not None,
                          num_warps=whole_batch_warps(max(block_t * e_pad, t_pad * cands_pad, t_pad * width_pad)))
    return w, out_ids
