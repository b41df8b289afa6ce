"""Reference token-to-expert alignment for grouped-GEMM MoE runners, skipping padded slots (id -1).

The equivalent of SGLang's / vLLM's ``moe_align_block_size``: the ``T*K`` routed
slots are grouped by expert, each expert's segment padded to a multiple of
``block_size``; every block of the grouped GEMM then reads one expert's weights.
Slots with id -1 belong to no expert, so they produce no block: an expert that
no valid slot uses costs nothing. Static output sizes, no host synchronisation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Alignment(NamedTuple):
    sorted_token_ids: Tensor  # [max_padded] int32: flat slot index (t*K + j), or T*K for block padding
    expert_ids: Tensor  # [max_blocks] int32: the expert of each block (-1 past the used blocks)
    num_tokens_post_padded: Tensor  # [1] int32: used length of sorted_token_ids


def max_padded(num_slots: int, num_experts: int, block_size: int) -> int:
    """Static capacity: every slot, plus up to block_size-1 padding per expert, rounded to whole blocks."""
    n = num_slots + num_experts * (block_size - 1)
    return (n + block_size - 1) // block_size * block_size


def align_reference(topk_ids: Tensor, num_experts: int, block_size: int) -> Alignment:
    """Pure-torch alignment (the specification of ``sgl_budget.kernels.moe_align``)."""
    flat = topk_ids.reshape(-1).long()
    n = flat.numel()
    valid = flat >= 0
    e_idx = flat.masked_fill(~valid, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device).scatter_add_(
        0, e_idx, torch.ones_like(e_idx))[:num_experts]
    padded = (counts + block_size - 1) // block_size * block_size
    starts = torch.cumsum(padded, 0) - padded
    total = padded.sum()
    cap = max_padded(n, num_experts, block_size)
    # rank of each slot within its expert, in slot order (stable sort by expert)
    order = torch.sort(e_idx, stable=True).indices
    seg_start = torch.cumsum(torch.cat([counts.new_zeros(1), counts]), 0)  # unpadded segment starts
    rank_sorted = torch.arange(n, device=flat.device) - seg_start[e_idx[order]]
    dest_sorted = torch.where(e_idx[order] < num_experts,
                              torch.cat([starts, starts.new_zeros(1)])[e_idx[order]] + rank_sorted,
                              torch.full_like(rank_sorted, cap))  # invalid slots go nowhere
    sorted_ids = torch.full((cap + 1,), n, dtype=torch.int64, device=flat.device)
    sorted_ids.scatter_(0, dest_sorted, order)
    blocks = cap // block_size
    block_start = torch.arange(blocks, device=flat.device) * block_size
    ends = torch.cumsum(padded, 0)
    expert_of_block = torch.searchsorted(ends, block_start, right=True)
    expert_ids = torch.where(block_start < total, expert_of_block, torch.full_like(expert_of_block, -1))
    return Alignment(sorted_ids[:cap].to(torch.int32), expert_ids.to(torch.int32),
                     total.reshape(1).to(torch.int32))
