"""Greedy generation with a transformers model, prefill then one-token decode steps (the reference for serving)."""

from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def greedy(model, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of equal-length ``prompts``, decoded in lock-step as one batch (KV cache).

    The MoE blocks see a prefill ``[B, S]`` and then decode steps ``[B, 1]``, which is what an
    applied policy's context is inferred from (phase, batch of B sequences), as in a server that
    prefills the B requests together and then decodes them together.
    """
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("prompts of one batch must have the same length (no padding in the reference)")
    ids = torch.tensor([list(p) for p in prompts], dtype=torch.int64)
    out = model(input_ids=ids, use_cache=True)
    past, produced = out.past_key_values, []
    nxt = out.logits[:, -1].argmax(-1)
    for step in range(max_new_tokens):
        produced.append(nxt)
        if step + 1 == max_new_tokens:
            break
        out = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
    return torch.stack(produced, 1).tolist()
