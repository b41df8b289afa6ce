"""Triton SERE re-routing of one batch: primaries, best-primary remap above the threshold, merge, weights.

Specification: :func:`sgl_budget.routing.reroute.reroute_slots` plus the router's
weight rule and compaction. One program takes the whole decode batch (its
per-expert decisions need every token): the batch's expert load (histogram),
the primary set (SERE's union of every token's first S slots, or the
load-ranked coverage / count rules, ties by expert index), the used critical
experts (``preserve critical``: sgl_budget's extension, not SERE's rule), each
secondary expert's most similar primary (first maximum) and whether it clears
``min_similarity``; then per token the moved slots, the merge of slots that
land on the same expert (weights add into the earlier slot), the renormalised
weights and the compaction of valid slots to the front.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import token_tile, whole_batch_warps
from .weights import finalize_weights

NEG = tl.constexpr(-3.0e38)
KINDS = {"top": 0, "coverage": 1, "count": 2}
MAX_ELEMENTS = 32768  # the per-token merge works on [T, K, K] tiles in one program; larger batches use torch


def sere_fits(num_tokens: int, k: int, width: int) -> bool:
    """Whether one program can re-route this batch (decode batches can; large prefills go to torch)."""
    t_pad = token_tile(num_tokens)
    k_pad = triton.next_power_of_2(k)
    return t_pad * k_pad * max(k_pad, triton.next_power_of_2(max(width, k))) <= MAX_ELEMENTS


@triton.jit(do_not_specialize=["T"])
def _sere_kernel(ids_ptr, raw_ptr, sim_ptr, crit_ptr, scratch_ptr, w_out_ptr, ids_out_ptr, T,
                 E: tl.constexpr, E_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, T_PAD: tl.constexpr,
                 WIDTH: tl.constexpr, WIDTH_PAD: tl.constexpr, KIND: tl.constexpr, S: tl.constexpr,
                 COVERAGE: tl.constexpr, COUNT: tl.constexpr, MIN_SIM: tl.constexpr,
                 RENORM: tl.constexpr, EPS: tl.constexpr, SCALE: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.arange(0, T_PAD)
    ks = tl.arange(0, K_PAD)
    eo = tl.arange(0, E_PAD)
    in_tk = (rows < T)[:, None] & (ks < K)[None, :]
    ids = tl.load(ids_ptr + rows[:, None] * K + ks[None, :], mask=in_tk, other=-1)
    raw = tl.load(raw_ptr + rows[:, None] * K + ks[None, :], mask=in_tk, other=0.0)
    valid = in_tk & (ids >= 0)
    bins = tl.reshape(tl.where(valid, ids, E), [T_PAD * K_PAD])
    load = tl.histogram(bins, E_PAD)
    load = tl.where(eo < E, load, 0)
    present = load > 0

    if KIND == 0:  # SERE: union of every token's first S slots
        top_bins = tl.reshape(tl.where(valid & (ks[None, :] < S), ids, E), [T_PAD * K_PAD])
        primary = (tl.histogram(top_bins, E_PAD) > 0) & (eo < E)
    else:  # most-loaded experts first (ties to the lower index): a prefix of the load ranking
        comp = (load.to(tl.int64) << 20) | (E_PAD - eo).to(tl.int64)
        comp = tl.where(eo < E, comp, -1)
        ranked = tl.sort(comp, 0, descending=True)
        ranked_load = (ranked >> 20).to(tl.int32)
        if KIND == 1:
            total = tl.sum(load, 0)
            before = tl.cumsum(ranked_load, 0) - ranked_load
            keep_sorted = before.to(tl.float32) < COVERAGE * total.to(tl.float32)
        else:
            keep_sorted = eo < COUNT
        keep_sorted = keep_sorted & (ranked_load > 0) & (ranked >= 0)
        n_keep = tl.sum(keep_sorted.to(tl.int32), 0)
        thr = tl.sum(tl.where(eo == n_keep - 1, ranked, 0), 0)
        primary = (comp >= thr) & (n_keep > 0) & (eo < E)
    crit = tl.load(crit_ptr + eo, mask=eo < E, other=0) != 0
    primary = (primary | crit) & present

    # each secondary expert's most similar primary, BLOCK_E similarity rows at a time (an [E, E] tile would
    # not fit one program's registers for 256 experts): scratch[e] = where expert e's slots go
    tl.store(scratch_ptr + E_PAD + eo, primary.to(tl.int32))
    tl.debug_barrier()
    for eb in range(0, E_PAD, BLOCK_E):
        er = eb + tl.arange(0, BLOCK_E)
        sim = tl.load(sim_ptr + er[:, None] * E + eo[None, :], mask=(er < E)[:, None] & (eo < E)[None, :],
                      other=NEG)
        cand = tl.where(primary[None, :], sim, NEG)
        best = tl.max(cand, 1)
        dest = tl.argmax(cand, 1)  # the first maximum, as the reference
        row_primary = tl.load(scratch_ptr + E_PAD + er) != 0
        moves = (~row_primary) & (best >= MIN_SIM) & (best > NEG) & (er < E)
        tl.store(scratch_ptr + er, tl.where(moves, dest, er).to(tl.int32))
    tl.debug_barrier()

    safe = tl.where(valid, ids, 0)
    new_ids = tl.where(valid, tl.load(scratch_ptr + safe), -1)
    # merge: a slot whose expert an earlier valid slot of the token also holds adds its weight there
    same = (new_ids[:, :, None] == new_ids[:, None, :]) & valid[:, None, :] & valid[:, :, None]
    earlier = ks[None, None, :] < ks[None, :, None]
    dup = tl.sum((same & earlier).to(tl.int32), 2) > 0  # [T, K]: an earlier slot holds the same expert
    keep = valid & ~dup
    first = tl.argmax((same & ((ks[None, None, :] <= ks[None, :, None]))).to(tl.int32), 2)  # earliest holder
    to_first = (first[:, :, None] == ks[None, None, :]) & valid[:, :, None]  # [T, src slot, dst slot]
    merged = tl.sum(tl.where(to_first, raw[:, :, None], 0.0), 1)
    w = tl.where(keep, merged, 0.0)
    w = finalize_weights(w, RENORM, EPS, SCALE)
    pos = tl.cumsum(keep.to(tl.int32), 1) - 1
    wo = tl.arange(0, WIDTH_PAD)
    place = keep[:, :, None] & (pos[:, :, None] == wo[None, None, :])  # [T, slot, out column]
    out_w = tl.sum(tl.where(place, w[:, :, None], 0.0), 1)
    out_i = tl.sum(tl.where(place, new_ids[:, :, None] + 1, 0), 1) - 1
    omask = (rows < T)[:, None] & (wo < WIDTH)[None, :]
    tl.store(w_out_ptr + rows[:, None] * WIDTH + wo[None, :], out_w, mask=omask)
    tl.store(ids_out_ptr + rows[:, None] * WIDTH + wo[None, :], out_i, mask=omask)


def sere_reroute(ids: torch.Tensor, raw: torch.Tensor, similarity: torch.Tensor, critical: torch.Tensor,
                 primary_kind: str, primary_value: float, min_similarity: float, width: int, *,
                 renormalize: bool = True, eps: float = 0.0, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-route one batch's slots ``ids``/``raw`` (``[T, K]``, -1 padding) -> ``(weights, ids)`` ``[T, width]``."""
    t, k = ids.shape
    e = similarity.shape[0]
    dev = ids.device
    e_pad = triton.next_power_of_2(e + 1)
    w = torch.empty(t, width, dtype=torch.float32, device=dev)
    out = torch.empty(t, width, dtype=torch.int32, device=dev)
    scratch = torch.zeros(2 * e_pad, dtype=torch.int32, device=dev)
    t_pad = token_tile(t)
    k_pad = triton.next_power_of_2(k)
    width_pad = triton.next_power_of_2(max(width, k))
    block_e = min(16, e_pad)
    _sere_kernel[(1,)](ids.to(torch.int32).contiguous(), raw.float().contiguous(), similarity.float().contiguous(),
                       critical.to(torch.int32).contiguous(), scratch, w, out, t, E=e, E_PAD=e_pad, K=k,
                       K_PAD=k_pad, T_PAD=t_pad, WIDTH=width, WIDTH_PAD=width_pad, KIND=KINDS[primary_kind],
                       S=int(primary_value) if primary_kind == "top" else 0,
                       COVERAGE=float(primary_value) if primary_kind == "coverage" else 0.0,
                       COUNT=int(primary_value) if primary_kind == "count" else 0, MIN_SIM=float(min_similarity),
                       RENORM=renormalize, EPS=eps, SCALE=scale, BLOCK_E=block_e,
                       num_warps=whole_batch_warps(max(t_pad * k_pad * max(k_pad, width_pad), block_e * e_pad)))
    return w, out
