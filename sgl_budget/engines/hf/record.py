"""Record router logits from real forward passes of a transformers model into the trace format.

Each window is one sequence: its first ``prefill_len`` tokens go through one prefill
forward (phase prefill), the rest are decoded one token per step with a KV cache
(phase decode), B sequences at a time — the logits a serving engine would route.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...spec import ModelSpec
from ...traces import Trace
from ...traces.format import DECODE, PREFILL
from .adapter import _attr_path, correction_bias, hf_facts_of, moe_blocks, router_of
from .progress import bar


@torch.no_grad()
def record_trace(model, spec: ModelSpec, windows: Tensor, batch_size: int = 16, prefill_len: int = 16,
                 source: str = "", show_progress: bool = False) -> Trace:
    """Record every MoE layer's router logits while prefilling, then decoding, ``windows`` B at a time."""
    from transformers import DynamicCache

    blocks = moe_blocks(model)
    current: dict[int, Tensor] = {}
    facts = hf_facts_of(model)
    # the router's logits (GPT-OSS: its bias included); Gemma 4's router returns its softmax first: its projection's
    # output is the logits
    proj = facts.router_weight.rpartition(".")[0] if facts.router_returns_probs else ""
    hooks = [(_attr_path(router_of(model, b), proj) if proj else router_of(model, b)).register_forward_hook(
        lambda m, a, out, l=l: current.__setitem__(l, (out[0] if isinstance(out, tuple) else out).detach().float()))
        for l, b in blocks.items()]
    per_seq: list[dict[int, list[Tensor]]] = []
    progress = bar(windows.numel(), "recording", show_progress, unit="tok")
    try:
        for i in range(0, windows.shape[0], batch_size):
            x = windows[i:i + batch_size]
            b, s = x.shape
            p = max(1, min(prefill_len, s))
            rows: list[dict[int, list[Tensor]]] = [{l: [] for l in blocks} for _ in range(b)]
            cache = DynamicCache()
            out = model(input_ids=x[:, :p], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            progress.update(b * p)
            for l, logits in current.items():
                for j, chunk in enumerate(logits.view(b, p, -1)):
                    rows[j][l].append(chunk)
            for t in range(p, s):
                out = model(input_ids=x[:, t:t + 1], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                progress.update(b)
                for l, logits in current.items():
                    for j in range(b):
                        rows[j][l].append(logits[j:j + 1])
            per_seq += rows
    finally:
        progress.close()
        for h in hooks:
            h.remove()
    s, p = windows.shape[1], max(1, min(prefill_len, windows.shape[1]))
    logits = {l: torch.cat([torch.cat(seq[l]) for seq in per_seq]).half() for l in blocks}
    phase = torch.tensor(([PREFILL] * p + [DECODE] * (s - p)) * len(per_seq), dtype=torch.uint8)
    bias = None
    if spec.has_correction_bias:
        path = hf_facts_of(model).correction_bias
        bias = {l: correction_bias(b, path).detach().float().clone() for l, b in blocks.items()}
    return Trace(spec=spec, router_logits=logits, phase=phase,
                 sequences=[(k * s, (k + 1) * s) for k in range(len(per_seq))], correction_bias=bias,
                 token_ids=windows.reshape(-1).clone(), source=source or "recorded from transformers forwards",
                 synthetic=False)
