"""Cut a trace into the batches a serving engine would have formed.

Decode: batch ``b`` at step ``s`` holds the ``s``-th decode-phase token of each of
sequences ``b*B .. b*B+B-1`` (B sequences decoding together, one token each); only
full batches, and only steps every sequence of the group reaches. A trace without
decode-phase tokens uses all tokens in their place; a trace with fewer than B
sequences falls back to consecutive groups of B decode tokens. Prefill: B whole
sequences per batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .format import DECODE, Trace


@dataclass(frozen=True)
class Batch:
    """One batch: per-layer logits ``[B or T, E]`` and the trace positions of its tokens."""

    layer_logits: dict[int, Tensor]
    token_index: Tensor  # [B or T] int64


def decode_index(trace: Trace, batch_size: int, max_batches: int | None = None) -> Tensor:
    """``[N_batches, B]`` int64 token positions of the decode batches (see module docstring)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    is_decode = trace.phase == DECODE
    use_all = not bool(is_decode.any())  # a prefill-only trace: every token stands in for a decode step
    seqs = [torch.arange(s, e) if use_all else torch.arange(s, e)[is_decode[s:e]] for s, e in trace.sequences]
    groups = []
    if len(seqs) >= batch_size:
        for g in range(len(seqs) // batch_size):
            members = seqs[g * batch_size:(g + 1) * batch_size]
            steps = min(len(m) for m in members)
            groups.append(torch.stack([m[:steps] for m in members], dim=1))  # [steps, B]
        idx = torch.cat(groups) if groups else torch.empty(0, batch_size, dtype=torch.long)
    else:
        dec = torch.cat(seqs) if seqs else torch.empty(0, dtype=torch.long)
        n = dec.numel() // batch_size
        idx = dec[: n * batch_size].view(n, batch_size)
    if max_batches is not None:
        idx = idx[:max_batches]
    return idx.long()


def stack_decode_batches(trace: Trace, batch_size: int, max_batches: int | None = None) -> dict[int, Tensor]:
    """All decode batches at once: ``{layer: logits [N_batches, B, E]}`` (for vectorised replay)."""
    idx = decode_index(trace, batch_size, max_batches)
    return {l: x[idx] for l, x in trace.router_logits.items()}


def decode_batches(trace: Trace, batch_size: int, max_batches: int | None = None) -> Iterator[Batch]:
    idx = decode_index(trace, batch_size, max_batches)
    for row in idx:
        yield Batch({l: x[row] for l, x in trace.router_logits.items()}, row)


def prefill_batches(trace: Trace, batch_size: int, max_batches: int | None = None) -> Iterator[Batch]:
    """B whole sequences per batch, tokens concatenated (only full batches)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    seqs = trace.sequences
    for i, g in enumerate(range(0, len(seqs) - batch_size + 1, batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        row = torch.cat([torch.arange(s, e) for s, e in seqs[g:g + batch_size]])
        yield Batch({l: x[row] for l, x in trace.router_logits.items()}, row)
