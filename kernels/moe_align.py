"""Triton token-to-expert alignment that skips padded slots (id -1): one launch, static shapes, no host sync.

Specification: :func:`sgl_budget.routing.dispatch.align_reference`. One program
handles the whole routed batch (decode sizes: up to a few thousand slots):
histogram of expert ids, padded segment offsets by cumulative sum, each slot's
rank inside its expert from a sort of ``(expert, slot)`` keys, then the scatter
into ``sorted_token_ids`` and the expert of every block. Slots with id -1 fall
into an extra bin that is never written, so unused experts launch no block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sgl_budget.routing.dispatch import Alignment, align_reference, max_padded

from .launch import whole_batch_warps

MAX_SLOTS = 8192  # slots one program sorts; larger (prefill) batches use the sync-free torch reference


@triton.jit(do_not_specialize=["n"])
def _moe_align_kernel(ids_ptr, sorted_ptr, expert_ids_ptr, total_ptr, scratch_ptr, n,
                      E: tl.constexpr, BS: tl.constexpr, N_PAD: tl.constexpr, E_PAD: tl.constexpr,
                      CAP: tl.constexpr, CAP_PAD: tl.constexpr, BLOCKS: tl.constexpr, BLOCKS_PAD: tl.constexpr,
                      BB: tl.constexpr, EB: tl.constexpr):
    offs = tl.arange(0, N_PAD)
    in_range = offs < n
    ids = tl.load(ids_ptr + offs, mask=in_range, other=-1)
    e_idx = tl.where(ids >= 0, ids, E)  # bin E collects padded slots and out-of-range lanes

    eo = tl.arange(0, E_PAD)
    counts = tl.histogram(e_idx, E_PAD)
    counts = tl.where(eo < E, counts, 0)
    padded = (counts + BS - 1) // BS * BS
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    seg = tl.cumsum(counts, 0) - counts  # unpadded segment starts
    total = tl.sum(padded, 0)
    tl.store(total_ptr, total)
    tl.store(scratch_ptr + eo, starts)
    tl.store(scratch_ptr + E_PAD + eo, seg)

    co = tl.arange(0, CAP_PAD)
    tl.store(sorted_ptr + co, tl.zeros([CAP_PAD], dtype=tl.int32) + n, mask=co < CAP)
    tl.debug_barrier()

    key = e_idx.to(tl.int64) * N_PAD + offs  # sort by expert, then slot order
    key = tl.sort(key, 0)
    e_sorted = (key // N_PAD).to(tl.int32)
    slot = (key % N_PAD).to(tl.int32)
    ok = e_sorted < E
    safe_e = tl.where(ok, e_sorted, 0)
    rank = offs - tl.load(scratch_ptr + E_PAD + safe_e)
    dest = tl.load(scratch_ptr + safe_e) + rank
    tl.store(sorted_ptr + dest, slot, mask=ok)

    # the expert of each block: how many experts' padded segments end at or before the block's start,
    # counted in [BB, EB] tiles (a [blocks, experts] tile would not fit one program for 256 experts)
    tl.store(scratch_ptr + 2 * E_PAD + eo, tl.where(eo < E, ends, 1 << 30))
    tl.debug_barrier()
    for b0 in range(0, BLOCKS_PAD, BB):
        bo = b0 + tl.arange(0, BB)
        block_start = bo * BS
        expert = tl.zeros([BB], dtype=tl.int32)
        for e0 in range(0, E_PAD, EB):
            e_ends = tl.load(scratch_ptr + 2 * E_PAD + e0 + tl.arange(0, EB))
            expert += tl.sum((e_ends[None, :] <= block_start[:, None]).to(tl.int32), 1)
        expert = tl.where(block_start < total, expert, -1)
        tl.store(expert_ids_ptr + bo, expert, mask=bo < BLOCKS)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_size: int) -> Alignment:
    """Kernel version of :func:`~sgl_budget.routing.dispatch.align_reference` (same outputs)."""
    flat = topk_ids.reshape(-1).to(torch.int32).contiguous()
    n = flat.numel()
    if n > MAX_SLOTS:
        return align_reference(topk_ids, num_experts, block_size)
    cap = max_padded(n, num_experts, block_size)
    blocks = cap // block_size
    dev = flat.device
    sorted_ids = torch.empty(cap, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(blocks, dtype=torch.int32, device=dev)
    total = torch.empty(1, dtype=torch.int32, device=dev)
    e_pad = triton.next_power_of_2(num_experts + 1)
    scratch = torch.empty(3 * e_pad, dtype=torch.int32, device=dev)
    blocks_pad = max(16, triton.next_power_of_2(blocks))
    n_pad = max(16, triton.next_power_of_2(n))
    cap_pad = triton.next_power_of_2(cap)
    bb, eb = min(128, blocks_pad), min(64, e_pad)
    _moe_align_kernel[(1,)](flat, sorted_ids, expert_ids, total, scratch, n, E=num_experts, BS=block_size,
                            N_PAD=n_pad, E_PAD=e_pad, CAP=cap, CAP_PAD=cap_pad, BLOCKS=blocks,
                            BLOCKS_PAD=blocks_pad, BB=bb, EB=eb,
                            num_warps=whole_batch_warps(max(n_pad, cap_pad, bb * eb)))
    return Alignment(sorted_ids, expert_ids, total)
