"""SERE's expert similarity measured by a running SGLang server (``sgl-budget similarity --server URL``).

The client side of :mod:`.expert_similarity`: draws the calibration tokens exactly as the transformers path does
(:func:`sgl_budget.similarity.sample_tokens`: all windows' tokens in window order, one generator seeded ``seed``,
``tokens`` per MoE layer), sends the windows in groups of ``batch_size`` (one ``/generate`` call each, routed with
stock) with each window's positions per layer, then one finishing request, and builds the same
:class:`~sgl_budget.similarity.SimilarityTable` (critical experts by :func:`~sgl_budget.similarity.derive_critical`).
"""

from __future__ import annotations

import uuid

import torch
from torch import Tensor

from ...progress import bar
from ...similarity import METHODS, SimilarityTable, derive_critical, sample_tokens
from ...spec import ModelSpec
from .client import ServerClient, ServerError


def window_positions(picks: dict[int, Tensor], windows: int, length: int) -> list[dict[int, list[int]]]:
    """Per window: MoE layer -> the window positions of the sampled tokens (indices into window-major tokens)."""
    out: list[dict[int, list[int]]] = [{} for _ in range(windows)]
    for layer, idx in picks.items():
        for t in sorted(idx.tolist()):
            out[t // length].setdefault(layer, []).append(t % length)
    return out


def similarity_server(client: ServerClient, spec: ModelSpec, windows: Tensor, method: str = "frobenius",
                      tokens: int = 2048, batch_size: int = 8, seed: int = 0, source: str = "",
                      show_progress: bool = False) -> SimilarityTable:
    """Per-layer similarity of the served model's experts, computed in the server's workers."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}")
    n, length = windows.shape
    picks = sample_tokens(windows.numel(), list(spec.moe_layers), tokens, seed)
    positions = window_positions(picks, n, length)
    session = uuid.uuid4().hex
    used = [i for i in range(n) if positions[i]]  # windows none of whose tokens was drawn are not sent
    with bar(len(used), "windows measured by the server", show_progress, unit="window") as b:
        for a in range(0, len(used), batch_size):
            group = used[a:a + batch_size]
            client.similarity([windows[i].tolist() for i in group], session, method,
                              positions=[positions[i] for i in group])
            b.update(len(group))
    got = client.similarity([windows[0, :2].tolist()], session, method, finish=True)
    matrices = {}
    for layer in spec.moe_layers:
        m = got["matrices"].get(str(layer))
        if m is None:
            raise ServerError(f"the server's similarity report has no matrix for layer {layer}")
        matrices[layer] = torch.tensor(m, dtype=torch.float32)
        if tuple(matrices[layer].shape) != (spec.num_experts, spec.num_experts):
            raise ServerError(f"the server's layer {layer} matrix is {list(matrices[layer].shape)}, not "
                              f"[{spec.num_experts}, {spec.num_experts}]")
    return SimilarityTable(
        matrices=matrices, critical={l: derive_critical(m) for l, m in matrices.items()},
        model={"name": spec.name, "num_experts": spec.num_experts, "moe_layers": list(spec.moe_layers)},
        method=method, source=source or f"measured by an SGLang server: expert outputs on {min(tokens, n * length)} "
                                        f"calibration tokens per layer ({method})", synthetic=False)
