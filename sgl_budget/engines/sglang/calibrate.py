"""Quality and Alloc-L sensitivity measured by a running SGLang server (its calibration mode, :mod:`.calibration`).

The same numbers ``sgl-budget eval`` / ``profile`` compute with transformers in one process, computed from what
the engine returns over HTTP, so models that only fit a multi-GPU server get them too:

* each group of B windows is one forward batch of the engine; in ``decode`` mode it is routed as B sequences
  decoded in lock-step (the plugin routes the prefill position by position as decode steps of B tokens);
* perplexity and top-1 accuracy come from the engine's log-probabilities of the window's own tokens (exact);
* KL to stock needs two distributions the server does not return whole: stock's N most likely tokens at each
  position, and the policy's log-probabilities of exactly those tokens (``token_ids_logprob``). KL over those N
  tokens plus one bucket for the rest is a lower bound of the full KL, exact when N covers the vocabulary;
* experts per token and distinct experts per routed batch come from the plugin's routing report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from ...alloc.profile import Profile
from ...progress import bar
from ...quality import EvalResult
from .client import ScoredWindow, ServerClient, ServerError, coarse_kl

STOCK = "stock"


@dataclass(frozen=True)
class Target:
    """What to measure: a policy the server serves (by name) or policy text sent with each request."""

    name: str  # shown in tables
    served: str | None = None  # a served policy's name
    text: str | None = None  # policy text (calibration mode compiles it on the server)
    budget: float | None = None


def phase_label(mode: str, batch_size: int) -> str:
    return (f"decode (lock-step batches of {batch_size} sequences, teacher-forced; routed by the server)"
            if mode == "decode" else f"prefill (batches of {batch_size} windows; routed by the server)")


def kl_note(top_n: int) -> str:
    return (f"lower bound: KL over the window's union of stock's {top_n} most likely next tokens at each position, "
            "plus one bucket for all other tokens (data-processing inequality; exact when the union covers the "
            "vocabulary)")


def _groups(windows: Tensor, batch_size: int) -> list[list[list[int]]]:
    return [windows[i:i + batch_size].tolist() for i in range(0, windows.shape[0], batch_size)]


def _run(client: ServerClient, target: Target, groups, lockstep: bool, top_n: int,
         token_ids: list[list[list[int]]] | None, tick: Callable[[int], None]) -> list[list[ScoredWindow]]:
    out = []
    for gi, g in enumerate(groups):
        out.append(client.score(g, policy=target.served, policy_text=target.text, lockstep=lockstep, top_n=top_n,
                                token_ids=None if token_ids is None else token_ids[gi]))
        tick(len(g) * len(g[0]))
    return out


def _union_ids(group: list[ScoredWindow], positions: int) -> list[list[int]]:
    """Per window: every token id in stock's top-N at any of its first ``positions`` positions."""
    return [sorted({t for pos in w.top_ids[:positions] for t in pos}) for w in group]


def _stats(runs: list[list[ScoredWindow]]) -> tuple[float, float]:
    slots = sum(w.report["slots"] for g in runs for w in g)
    tokens = sum(w.report["tokens"] for g in runs for w in g)
    distinct = sum(g[0].report["distinct"] for g in runs)
    batches = sum(g[0].report["batches"] for g in runs)
    return slots / max(1, tokens), distinct / max(1, batches)


def _check_phase(runs: list[list[ScoredWindow]], mode: str) -> None:
    want = "decode" if mode == "decode" else "prefill"
    got = {w.report.get("phase") for g in runs for w in g}
    if got != {want}:
        raise ServerError(f"the server routed the windows as {sorted(got)}, not {want}")


def evaluate_server(client: ServerClient, targets: Sequence[Target], windows: Tensor, batch_size: int = 16,
                    mode: str = "decode", top_n: int = 20, progress=None, show_progress: bool = False
                    ) -> list[EvalResult]:
    """Stock, then each target, on the same windows, all routed by the server; one result each (stock first)."""
    if mode not in ("decode", "prefill"):
        raise ValueError("mode must be decode or prefill")
    groups = _groups(windows, batch_size)
    lockstep = mode == "decode"
    positions = windows.shape[1] - 1  # scored positions 1..L-1 (the last prediction is past the window)
    n_tok = windows.numel()
    results: list[EvalResult] = []

    def timed(target: Target, top: int, ids) -> tuple[list[list[ScoredWindow]], float]:
        t0 = time.perf_counter()
        with bar(n_tok, target.name, show_progress, unit="tok") as b:
            runs = _run(client, target, groups, lockstep, top, ids, b.update)
        _check_phase(runs, mode)
        return runs, time.perf_counter() - t0

    stock, secs = timed(Target(STOCK, served=STOCK), top_n, None)
    union = [_union_ids(g, positions) for g in stock]
    stock_u = _run(client, Target(STOCK, served=STOCK), groups, lockstep, 1, union, lambda n: None)
    for g, gu in zip(stock, stock_u):  # stock's log-probabilities of every token of the union, at every position
        for w, wu in zip(g, gu):
            w.ids_logp = wu.ids_logp
    flat_stock = [w for g in stock for w in g]
    results.append(_score(STOCK, flat_stock, None, windows, _stats(stock), secs, None, positions))
    if progress:
        progress(results[-1])
    for target in targets:
        runs, secs = timed(target, 1, union)
        results.append(_score(target.name, [w for g in runs for w in g], flat_stock, windows, _stats(runs), secs,
                              target.budget, positions))
        if progress:
            progress(results[-1])
    for r in results:
        r.phase = phase_label(mode, batch_size)
        r.kl_note = kl_note(top_n)
    return results


def _score(name: str, got: list[ScoredWindow], stock: list[ScoredWindow] | None, windows: Tensor,
           stats: tuple[float, float], seconds: float, budget: float | None, positions: int) -> EvalResult:
    targets = windows[:, 1:].tolist()
    nll = acc = agree = kl = 0.0
    count = 0
    for i, w in enumerate(got):
        ref = stock[i] if stock is not None else None
        nll -= sum(w.target[:positions])
        top1 = [pos[0] for pos in w.top_ids[:positions]]
        acc += sum(a == b for a, b in zip(top1, targets[i]))
        if ref is None:
            agree += positions
        else:
            agree += sum(a == pos[0] for a, pos in zip(top1, ref.top_ids))
            kl += float(_kl(ref, w, positions).sum())
        count += positions
    return EvalResult(name=name, perplexity=math.exp(nll / count), accuracy=acc / count, kl_to_full=kl / count,
                      activations_per_token=stats[0], unique_per_batch=stats[1], tokens=count, seconds=seconds,
                      budget=budget, agreement=agree / count)


def _kl(ref: ScoredWindow, w: ScoredWindow, positions: int) -> np.ndarray:
    """``[positions]`` KL(stock || policy) at each of the first positions over the tokens both report (the
    window's union of stock's top-N tokens) plus one bucket for the rest."""
    assert ref.ids_logp is not None and w.ids_logp is not None
    return coarse_kl(ref.ids_logp[:positions], w.ids_logp[:positions])


def profile_server(client: ServerClient, spec, windows: Tensor, batch_size: int = 8, top_n: int = 20,
                   source: str = "", show_progress: bool = False) -> Profile:
    """Alloc-L sensitivity measured by the server: ``loss[layer][k]`` = mean KL(stock || only ``layer`` at ``k``)
    per token over every position of prefilled windows (as :func:`sgl_budget.engines.hf.profile.profile_layers`),
    each probe sent as policy text; KL is the top-N lower bound (:func:`kl_note`)."""
    groups = _groups(windows, batch_size)
    positions = windows.shape[1]  # every position, the prediction past the window included (as transformers)
    stock = _run(client, Target(STOCK, served=STOCK), groups, False, top_n, None, lambda n: None)
    _check_phase(stock, "prefill")
    union = [_union_ids(g, positions) for g in stock]
    stock = _run(client, Target(STOCK, served=STOCK), groups, False, 1, union, lambda n: None)
    loss: dict[int, dict[int, float]] = {l: {} for l in spec.moe_layers}
    jobs = [(l, k) for l in spec.moe_layers for k in range(1, spec.top_k)]
    with bar(len(jobs), "profiling (layer, k) on the server", show_progress) as b:
        for layer, k in jobs:
            text = f'policy "profile-{layer}-{k}" {{ layers {{ layer {layer}: k = {k} }} }}'
            runs = _run(client, Target(text, text=text), groups, False, 1, union, lambda n: None)
            total, count = 0.0, 0
            for g_stock, g in zip(stock, runs):
                for ref, w in zip(g_stock, g):
                    total += float(_kl(ref, w, positions).sum())
                    count += positions
            loss[layer][k] = max(0.0, total / count)
            b.update(1)
    for row in loss.values():
        row[spec.top_k] = 0.0
    return Profile(loss=loss, metric="kl",
                   model={"name": spec.name, "num_experts": spec.num_experts, "top_k": spec.top_k,
                          "moe_layers": list(spec.moe_layers)},
                   source=source or f"measured by the server: mean next-token KL vs stock ({kl_note(top_n)}) on "
                                    f"{windows.numel()} tokens")
