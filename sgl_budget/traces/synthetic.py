"""A seeded SYNTHETIC trace generator (for tests and the offline demo); never mistaken for a recording.

Router logits per layer are ``scale * z_t @ W_l^T + popularity_l + noise`` where
the token state ``z_t`` follows an AR(1) process along each sequence (routing of
neighbouring tokens is correlated) and is shared by all layers (so are layers),
``W_l`` are random expert embeddings and ``popularity_l`` a Zipf-like skew over a
random permutation of experts (some experts are hot). The trace's ``source``
says SYNTHETIC and its ``synthetic`` flag is set; reports print that label.
"""

from __future__ import annotations

import math

import torch

from ..spec import ModelSpec
from .format import DECODE, PREFILL, Trace


def synthetic_trace(spec: ModelSpec, num_sequences: int = 16, seq_len: int = 64, seed: int = 0,
                    dim: int = 32, rho: float = 0.8, zipf: float = 0.8, scale: float = 1.2) -> Trace:
    """A deterministic synthetic trace of ``num_sequences`` sequences of ``seq_len`` tokens."""
    if num_sequences < 1 or seq_len < 1:
        raise ValueError("num_sequences and seq_len must be >= 1")
    g = torch.Generator().manual_seed(seed)
    n, e = num_sequences * seq_len, spec.num_experts
    z = torch.empty(num_sequences, seq_len, dim)
    z[:, 0] = torch.randn(num_sequences, dim, generator=g)
    for t in range(1, seq_len):
        z[:, t] = rho * z[:, t - 1] + math.sqrt(1 - rho * rho) * torch.randn(num_sequences, dim, generator=g)
    z = z.reshape(n, dim)
    logits, bias = {}, {}
    ranks = torch.arange(1, e + 1, dtype=torch.float32)
    for l in spec.moe_layers:
        w = torch.randn(e, dim, generator=g) / math.sqrt(dim)
        pop = (-zipf * ranks.log())[torch.randperm(e, generator=g)]
        pop = pop - pop.mean()
        noise = 0.3 * torch.randn(n, e, generator=g)
        logits[l] = scale * (z @ w.T) * math.sqrt(dim) / 4 + pop + noise
        if spec.has_correction_bias:
            bias[l] = 0.05 * torch.randn(e, generator=g)
    phase = torch.full((num_sequences, seq_len), DECODE, dtype=torch.uint8)
    phase[:, : max(1, seq_len // 4)] = PREFILL
    return Trace(
        spec=spec, router_logits=logits, phase=phase.flatten(),
        sequences=[(i * seq_len, (i + 1) * seq_len) for i in range(num_sequences)],
        correction_bias=bias or None,
        source=f"SYNTHETIC: seeded generator (not recorded from a model), seed={seed}, "
               f"AR(1) rho={rho}, Zipf skew {zipf}",
        synthetic=True,
    )
