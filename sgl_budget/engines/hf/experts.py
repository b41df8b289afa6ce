"""A padding-safe, vectorised experts forward for transformers MoE blocks (small batches on CPU).

transformers' ``eager`` experts loop over every expert a batch hits, a dozen small
ops each: on a decode batch the cost grows with the number of distinct experts, so
full top-k (which hits the most) ran 2-3x slower than the policies it is the
baseline of. ``grouped_mm`` / ``batched_mm`` mishandle the padding index on CPU.
This forward runs every hit expert on every token of the batch as three batched
matmuls and weighs the outputs with a dense ``[T, E]`` routing matrix (padding
index ``E`` gets weight 0). Batches over :data:`DENSE_MAX_TOKENS` tokens (prefill)
keep the eager loop, whose per-expert overhead is then amortised.
"""

from __future__ import annotations

import torch
from torch import Tensor

IMPLEMENTATION = "sgl_budget_dense"
DENSE_MAX_TOKENS = 128  # above this the dense compute (hit experts x tokens) outweighs the eager loop's overhead


def _supported(experts) -> bool:
    """Whether ``experts`` uses the concatenated, untransposed, bias-free gate_up/down layout this forward assumes."""
    return (getattr(experts, "has_gate", True) and not getattr(experts, "has_bias", False)
            and not getattr(experts, "is_transposed", False) and getattr(experts, "is_concatenated", True)
            and hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"))


def dense_experts_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """Experts output ``[T, H]``: every hit expert on all T tokens, weighted by each token's routing weights."""
    t, e = hidden_states.shape[0], self.num_experts
    if t > DENSE_MAX_TOKENS or not _supported(self):
        return type(self).forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)
    idx = top_k_index.long()
    weights = torch.zeros(t, e + 1, dtype=torch.float32, device=hidden_states.device)
    weights.scatter_add_(1, idx, top_k_weights.float())
    hit = torch.bincount(idx.flatten(), minlength=e + 1)[:e].nonzero().squeeze(1)
    if hit.numel() == 0:
        return torch.zeros_like(hidden_states)
    if 2 * hit.numel() > e:  # most experts are hit: run them all rather than copy their weights
        hit = torch.arange(e, device=hidden_states.device)
        gate_up, down = self.gate_up_proj, self.down_proj
    else:
        gate_up, down = self.gate_up_proj[hit], self.down_proj[hit]
    act = self._apply_gate(torch.matmul(hidden_states, gate_up.transpose(1, 2)))  # [U, T, I]
    out = torch.matmul(act, down.transpose(1, 2))  # [U, T, H]
    mixed = torch.einsum("ut,uth->th", weights[:, hit].t().to(out.dtype), out)
    return mixed.to(hidden_states.dtype)


def register() -> str:
    """Register the forward with transformers' experts interface; returns its implementation name."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, dense_experts_forward)
    return IMPLEMENTATION
