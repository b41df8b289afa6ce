"""SERE expert similarity from expert outputs on calibration tokens (SERE's own method).

SERE's calibration (github JL-Cheng/SERE, calibration/cal_expert_similarity.py)
runs *every* expert of a layer on the same calibration tokens and compares their
outputs; its default metric is ``frobenius``: ``1 - ||O_i - O_j||_F / max_pair
distance``; ``cosine`` is the mean per-token cosine mapped to [0, 1] and ``cka``
linear CKA. We do the same on the layer inputs captured from a forward over the
calibration text (a random sample of tokens per layer), with the experts' own
weights (transformers 5.x layout: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``).
The diagonal is 1. Critical experts are ranked least-replaceable first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...similarity import METHODS, SimilarityTable, derive_critical, glu_expert_outputs, sample_tokens, \
    similarity_matrix
from ...spec import ModelSpec
from .adapter import _attr_path, hf_facts_of, moe_blocks
from .progress import bar

__all__ = ["METHODS", "expert_outputs", "expert_similarity", "similarity_matrix"]


def expert_outputs(experts, h: Tensor) -> Tensor:
    """``[E, N, H]``: every expert applied to every token of ``h [N, H]``."""
    return glu_expert_outputs(h, experts.gate_up_proj.float(), experts.down_proj.float(), experts.act_fn)


def bar_iter(items, total: int, desc: str, show: bool):
    """Iterate ``items`` under a progress bar of ``total`` steps."""
    with bar(total, desc, show) as b:
        for item in items:
            yield item
            b.update(1)


@torch.no_grad()
def expert_similarity(model, spec: ModelSpec, windows: Tensor, method: str = "frobenius", tokens: int = 2048,
                      batch_size: int = 8, seed: int = 0, source: str = "",
                      show_progress: bool = False) -> SimilarityTable:
    """Per-layer similarity of the model's experts, from their outputs on a sample of calibration tokens."""
    blocks = moe_blocks(model)
    facts = hf_facts_of(model)
    inputs: dict[int, list[Tensor]] = {l: [] for l in blocks}
    # the experts' input: the block's (Gemma 4, whose "block" is the decoder layer: its experts' own input)
    hooks = [(b.experts if facts.moe_on_layer else b).register_forward_pre_hook(
        lambda m, a, l=l: inputs[l].append(a[0].reshape(-1, a[0].shape[-1]))) for l, b in blocks.items()]
    try:
        with bar(windows.shape[0], "calibration forwards", show_progress, unit="window") as b:
            for i in range(0, windows.shape[0], batch_size):
                model(input_ids=windows[i:i + batch_size])
                b.update(min(batch_size, windows.shape[0] - i))
    finally:
        for h in hooks:
            h.remove()
    picks = sample_tokens(windows.numel(), list(inputs), tokens, seed)
    matrices = {}
    for l, chunks in bar_iter(inputs.items(), len(inputs), "expert similarity per layer", show_progress):
        h = torch.cat(chunks).float()
        pick = picks[l]
        outs = expert_outputs(blocks[l].experts, h[pick])
        if facts.expert_scale:  # Gemma 4: an expert's contribution carries its learned per-expert scale
            scale = _attr_path(getattr(blocks[l], facts.router), facts.expert_scale).float()
            outs = outs * scale.to(outs.device)[:, None, None]
        matrices[l] = similarity_matrix(outs, method)
    return SimilarityTable(
        matrices=matrices, critical={l: derive_critical(m) for l, m in matrices.items()},
        model={"name": spec.name, "num_experts": spec.num_experts, "moe_layers": list(spec.moe_layers)},
        method=method, source=source or f"measured: expert outputs on {min(tokens, windows.numel())} calibration "
                                         f"tokens per layer ({method})", synthetic=False)
