"""Triton Alloc-T: a layer's ``T*k`` slots go to the batch's best (token, expert) pairs, with per-token min/max k.

Specification: :func:`sgl_budget.routing.reallocate.reallocate` followed by the
router's weight rule. Two launches, no host sync: :func:`fused_topk` ranks every
token's top ``max_k`` experts and writes their raw gate scores and cross-token keys;
then one program takes the whole batch, sorts the candidates of rank
``min_k..max_k-1`` by (key descending, token, rank) as one 64-bit composite, keeps
the best ``T*(k - min_k)`` and writes weights renormalised over each token's kept
slots (padding id -1, weight 0). Each token keeps a prefix of its ranking, so the
valid slots come first, as the contract requires.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_topk import fused_topk
from .weights import finalize_weights


@triton.jit
def _alloc_t_kernel(raw_ptr, ids_ptr, key_ptr, scratch_ptr, w_out_ptr, ids_out_ptr, nv_ptr, T,
                    MAXK: tl.constexpr, MIN_K: tl.constexpr, EXTRA: tl.constexpr, CANDS: tl.constexpr,
                    CANDS_PAD: tl.constexpr, T_PAD: tl.constexpr, WIDTH: tl.constexpr, WIDTH_PAD: tl.constexpr,
                    RENORM: tl.constexpr, EPS: tl.constexpr, SCALE: tl.constexpr, HAS_NV: tl.constexpr):
    n_real = T
    if HAS_NV:  # trailing padded rows (a CUDA-graph batch): they get no slots and no share of the budget
        n_real = tl.load(nv_ptr).to(tl.int32)
    offs = tl.arange(0, T_PAD * CANDS_PAD)
    t = offs // CANDS_PAD
    c = offs % CANDS_PAD
    m = (t < n_real) & (c < CANDS)
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

    rows = tl.arange(0, T_PAD)
    cols = tl.arange(0, WIDTH_PAD)
    rmask = rows < T
    in_k = (rows < n_real)[:, None] & (cols[None, :] < MAXK)
    raw = tl.load(raw_ptr + rows[:, None] * MAXK + cols[None, :], mask=in_k, other=0.0)
    ids = tl.load(ids_ptr + rows[:, None] * MAXK + cols[None, :], mask=in_k, other=-1)
    extra = tl.load(scratch_ptr + rows[:, None] * MAXK + cols[None, :],
                    mask=in_k & (cols[None, :] >= MIN_K), other=0)
    valid = in_k & ((cols[None, :] < MIN_K) | (extra != 0)) & (ids >= 0)
    w = tl.where(valid, raw, 0.0)
    w = finalize_weights(w, RENORM, EPS, SCALE)
    omask = rmask[:, None] & (cols[None, :] < WIDTH)
    tl.store(w_out_ptr + rows[:, None] * WIDTH + cols[None, :], w, mask=omask)
    tl.store(ids_out_ptr + rows[:, None] * WIDTH + cols[None, :], tl.where(valid, ids, -1), mask=omask)


def alloc_t(router_logits: torch.Tensor, k: int, min_k: int, max_k: int, width: int, *, sigmoid: bool = False,
            correction_bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1,
            renormalize: bool = True, eps: float = 0.0, scale: float = 1.0,
            num_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, width] float32, ids [T, width] int32)`` of Alloc-T for one batch of ``T`` tokens.

    ``num_valid`` (a device scalar): only the first ``num_valid`` rows are real tokens.
    """
    t = router_logits.shape[0]
    dev = router_logits.device
    keys = torch.empty(t, max_k, dtype=torch.float32, device=dev)
    raw, ids = fused_topk(router_logits, max_k, max_k, sigmoid=sigmoid, correction_bias=correction_bias,
                          n_group=n_group, topk_group=topk_group, renormalize=False, scale=1.0, keys=keys)
    cands = max_k - min_k
    extra = min(k, max_k) - min_k
    if extra >= cands:  # every candidate fits (or none is asked for): no ranking across tokens needed
        extra, min_k_eff = 0, (max_k if extra >= cands > 0 else min_k)
    else:
        min_k_eff = min_k
    w = torch.empty(t, width, dtype=torch.float32, device=dev)
    out_ids = torch.empty(t, width, dtype=torch.int32, device=dev)
    scratch = torch.zeros(t, max_k, dtype=torch.int32, device=dev)
    cands_eff = max_k - min_k_eff  # 0: nothing to rank across tokens (the kernel then loads no key)
    nv = num_valid.reshape(1).to(device=dev, dtype=torch.int32) if num_valid is not None else scratch
    _alloc_t_kernel[(1,)](raw, ids, keys, scratch, w, out_ids, nv, t, MAXK=max_k, MIN_K=min_k_eff,
                          EXTRA=max(0, extra), CANDS=cands_eff, CANDS_PAD=max(1, triton.next_power_of_2(cands_eff)),
                          T_PAD=max(2, triton.next_power_of_2(max(t, 1))), WIDTH=width,
                          WIDTH_PAD=triton.next_power_of_2(max(width, max_k)), RENORM=renormalize, EPS=eps,
                          SCALE=scale, HAS_NV=num_valid is not None)
    return w, out_ids
