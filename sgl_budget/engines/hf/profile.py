"""Alloc-L profiling: the quality loss of running one MoE layer with k experts, for every layer and k.

For each MoE layer l and each k in 1..top-k, only layer l routes to its top-k
experts (the others keep the model's top-k) and the loss is the mean KL divergence
of the next-token distributions from the full model's, on calibration windows
(prefill forwards). k = top-k is the full model: loss 0. The result is the
profile YAML ``allocate dp from`` reads (docs/formats.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...alloc.profile import Profile
from ...lang import compile_policy
from ...spec import ModelSpec
from .adapter import apply_policy
from .evaluate import kl_to_reference
from .progress import bar


@torch.no_grad()
def _logp(model, windows: Tensor, batch: int) -> list[Tensor]:
    return [torch.log_softmax(model(input_ids=windows[i:i + batch]).logits.float(), dim=-1)
            for i in range(0, windows.shape[0], batch)]


def _layer_loss(model, spec: ModelSpec, windows: Tensor, batch: int, full: list[Tensor], layer: int,
                k: int) -> float:
    """Mean KL(full || model with only ``layer`` at ``k``) per token."""
    ir = compile_policy(f'policy "profile-{layer}-{k}" {{ layers {{ layer {layer}: k = {k} }} }}', spec)
    total, count = 0.0, 0
    with apply_policy(model, ir):
        for f, q in zip(full, _logp(model, windows, batch)):
            total += float(kl_to_reference(f, q).sum())
            count += f.shape[0] * f.shape[1]
    return max(0.0, total / count)


def profile_layers(model, spec: ModelSpec, windows: Tensor, batch_size: int = 8, source: str = "",
                   show_progress: bool = False) -> Profile:
    """Measure ``loss[layer][k]`` = mean KL(full || layer-at-k) per token on ``windows``."""
    full = _logp(model, windows, batch_size)
    loss: dict[int, dict[int, float]] = {l: {} for l in spec.moe_layers}
    jobs = [(l, k) for l in spec.moe_layers for k in range(1, spec.top_k)]
    with bar(len(jobs), "profiling (layer, k)", show_progress) as b:
        for layer, k in jobs:
            loss[layer][k] = _layer_loss(model, spec, windows, batch_size, full, layer, k)
            b.update(1)
    for row in loss.values():
        row[spec.top_k] = 0.0  # the full model; jobs ran k in ascending order, so rows stay sorted
    return Profile(loss=loss, metric="kl",
                   model={"name": spec.name, "num_experts": spec.num_experts, "top_k": spec.top_k,
                          "moe_layers": list(spec.moe_layers)},
                   source=source or f"measured: mean next-token KL vs full model on {windows.numel()} tokens")
