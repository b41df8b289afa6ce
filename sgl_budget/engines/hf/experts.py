"""A padding-safe, vectorised experts forward for transformers MoE blocks (small batches on CPU).

transformers' ``eager`` experts loop over every expert a batch hits, a dozen small
ops each: on a decode batch the cost grows with the number of distinct experts, so
full top-k (which hits the most) ran 2-3x slower than the policies it is the
baseline of. ``grouped_mm`` / ``batched_mm`` mishandle the padding index on CPU.
This forward runs every hit expert on every token of the batch as three batched
matmuls and weighs the outputs with a dense ``[T, E]`` routing matrix (padding
index ``E`` gets weight 0). Batches over :data:`DENSE_MAX_TOKENS` tokens (prefill)
keep the eager loop, whose per-expert overhead is then amortised.

GPT-OSS's layout (transposed ``[E, in, out]`` weights, per-expert biases, interleaved
gate/up columns split by its own ``_apply_gate``) runs here too, and its large batches take
:func:`padding_safe_loop` instead of its eager forward, whose one-hot has only ``num_experts``
classes (the padding index raises there).
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


def _general(experts) -> bool:
    """A gate_up/down layout this module's forwards also run: transposed ``[E, in, out]`` weights, per-expert
    biases, or interleaved gate/up columns that the class's own ``_apply_gate`` splits (GPT-OSS)."""
    return (getattr(experts, "has_gate", True) and hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj")
            and (getattr(experts, "is_concatenated", True) or "_apply_gate" in type(experts).__dict__))


def _project(experts, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight`` (+ ``bias``) for one expert's ``weight`` (or a stack of them) in the module's layout."""
    y = torch.matmul(x, weight if getattr(experts, "is_transposed", False) else weight.transpose(-1, -2))
    return y if bias is None else y + bias


def padding_safe_loop(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The eager experts loop (one expert at a time, on its tokens) for any :func:`_general` layout, skipping the
    padding index ``num_experts``: for experts whose own eager forward cannot take it (GPT-OSS's one-hot has
    ``num_experts`` classes). Per expert it computes what GPT-OSS's eager forward does."""
    out = torch.zeros_like(hidden_states)
    bias = getattr(self, "has_bias", False)
    for expert in torch.unique(top_k_index[top_k_index < self.num_experts]).tolist():
        slot, token = torch.where(top_k_index.t() == expert)  # eager's row order (by slot, then token)
        act = self._apply_gate(_project(self, hidden_states[token], self.gate_up_proj[expert],
                                        self.gate_up_proj_bias[expert] if bias else None))
        y = _project(self, act, self.down_proj[expert], self.down_proj_bias[expert] if bias else None)
        out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(hidden_states.dtype))
    return out


def dense_experts_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """Experts output ``[T, H]``: every hit expert on all T tokens, weighted by each token's routing weights."""
    t, e = hidden_states.shape[0], self.num_experts
    if not _supported(self) and _general(self):  # GPT-OSS's layout: its eager loop cannot skip the padding
        return (padding_safe_loop if t > DENSE_MAX_TOKENS else _dense_general)(self, hidden_states, top_k_index,
                                                                                top_k_weights)
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


def _dense_general(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """:func:`dense_experts_forward` for a :func:`_general` layout (transposed weights, biases, own gate split)."""
    t, e = hidden_states.shape[0], self.num_experts
    idx = top_k_index.long()
    weights = torch.zeros(t, e + 1, dtype=torch.float32, device=hidden_states.device)
    weights.scatter_add_(1, idx, top_k_weights.float())  # padding index e: its own column, never read
    hit = torch.bincount(idx.flatten(), minlength=e + 1)[:e].nonzero().squeeze(1)
    if hit.numel() == 0:
        return torch.zeros_like(hidden_states)
    bias = getattr(self, "has_bias", False)
    act = self._apply_gate(_project(self, hidden_states, self.gate_up_proj[hit],
                                    self.gate_up_proj_bias[hit].unsqueeze(1) if bias else None))  # [U, T, I]
    out = _project(self, act, self.down_proj[hit], self.down_proj_bias[hit].unsqueeze(1) if bias else None)
    mixed = torch.einsum("ut,uth->th", weights[:, hit].t().to(out.dtype), out)
    return mixed.to(hidden_states.dtype)


def register() -> str:
    """Register the forward with transformers' experts interface; returns its implementation name."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, dense_experts_forward)
    return IMPLEMENTATION
