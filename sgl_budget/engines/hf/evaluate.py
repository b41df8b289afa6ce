"""Quality and cost of policies on a real model: perplexity, next-token accuracy, KL to full top-k, activations.

Two ways to run text through the model:

* ``decode`` (default): B sequences are decoded in lock-step with a KV cache and
  teacher forcing, one token per sequence per step — every routing decision sees
  a real decode batch of B tokens, which is what SERE re-routing and batch
  conditions need. Batch size B is a parameter.
* ``prefill``: whole windows in one forward (a prefill batch of B sequences).

Full top-k (the model's own routing) runs first on the same windows; every policy
is compared with it: perplexity, top-1 accuracy, mean KL(full || policy) of the
next-token distributions, mean activations per token and distinct experts per batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ...lang.ir import PolicyIR
from .adapter import apply_policy, moe_blocks
from .progress import bar


@dataclass
class EvalResult:
    name: str
    perplexity: float
    accuracy: float
    kl_to_full: float
    activations_per_token: float  # real (non-padding) experts per token, mean over MoE layers
    unique_per_batch: float  # distinct experts per routed batch, mean over MoE layers
    tokens: int
    seconds: float
    budget: float | None = None  # the policy's budget in experts per token, if it has one

    def to_dict(self) -> dict:
        return asdict(self)


def kl_to_reference(ref_logp: Tensor, logp: Tensor) -> Tensor:
    """Per-position KL(reference || other) from two next-token log-probability tensors ``[..., V]``."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


class _RouterStats:
    """Counts real experts per token and distinct experts per batch from the gates' outputs."""

    def __init__(self, model) -> None:
        self.blocks = moe_blocks(model)
        self.act = self.uniq = 0.0
        self.tokens = self.batches = 0
        self.hooks = [b.gate.register_forward_hook(self._hook) for b in self.blocks.values()]

    def _hook(self, module, args, out) -> None:
        logits, _, ids = out
        e = logits.shape[-1]
        real = ids < e
        self.act += float(real.sum())
        self.tokens += ids.shape[0]
        self.uniq += float(torch.unique(ids[real]).numel())
        self.batches += 1

    def remove(self) -> tuple[float, float]:
        for h in self.hooks:
            h.remove()
        return self.act / max(1, self.tokens), self.uniq / max(1, self.batches)


@torch.no_grad()
def _run(model, windows: Tensor, batch: int, mode: str, tick=None) -> Tensor:
    """Next-token log-probabilities ``[N, S-1, V]`` (float16, CPU) for every window; ``tick(n)`` per n positions."""
    outs = []
    tick = tick or (lambda n: None)
    for i in range(0, windows.shape[0], batch):
        x = windows[i:i + batch]
        if mode == "prefill":
            logits = model(input_ids=x).logits[:, :-1]
            tick(logits.shape[0] * logits.shape[1])
        else:
            from transformers import DynamicCache

            cache, steps = DynamicCache(), []
            for t in range(x.shape[1] - 1):
                out = model(input_ids=x[:, t:t + 1], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                steps.append(out.logits[:, -1])
                tick(x.shape[0])
            logits = torch.stack(steps, dim=1)
        outs.append(torch.log_softmax(logits.float(), dim=-1).half())
    return torch.cat(outs)


def _score(name: str, logp: Tensor, full: Tensor | None, windows: Tensor, stats: tuple[float, float],
           seconds: float, budget: float | None) -> EvalResult:
    targets = windows[:, 1:]
    lp = logp.float()
    nll = -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    acc = (lp.argmax(-1) == targets).float().mean()
    kl = 0.0
    if full is not None:
        kl = float(kl_to_reference(full.float(), lp).mean())
    return EvalResult(name=name, perplexity=math.exp(float(nll.mean())), accuracy=float(acc), kl_to_full=kl,
                      activations_per_token=stats[0], unique_per_batch=stats[1], tokens=int(targets.numel()),
                      seconds=seconds, budget=budget)


def _timed_run(model, windows: Tensor, batch: int, mode: str, name: str, show: bool) -> Tensor:
    """:func:`_run` with a progress bar over the window positions (one bar per policy)."""
    with bar(windows.shape[0] * (windows.shape[1] - 1), name, show, unit="tok") as b:
        return _run(model, windows, batch, mode, tick=b.update)


def evaluate(model, policies: list[PolicyIR], windows: Tensor, batch_size: int = 16, mode: str = "decode",
             progress=None, show_progress: bool = False) -> list[EvalResult]:
    """Full top-k, then each policy, on the same windows; returns one result per run (full first)."""
    if mode not in ("decode", "prefill"):
        raise ValueError("mode must be decode or prefill")
    results = []
    _run(model, windows[:1, :2], 1, mode)  # warm-up: one-time costs must not be billed to full top-k
    t0 = time.perf_counter()
    stats = _RouterStats(model)
    full = _timed_run(model, windows, batch_size, mode, "full top-k", show_progress)
    results.append(_score("full top-k", full, None, windows, stats.remove(), time.perf_counter() - t0, None))
    if progress:
        progress(results[-1])
    for ir in policies:
        t0 = time.perf_counter()
        stats = _RouterStats(model)
        with apply_policy(model, ir):
            logp = _timed_run(model, windows, batch_size, mode, ir.name, show_progress)
        b = ir.budget_rules[0].value.experts_per_token if ir.budget_rules else None
        results.append(_score(ir.name, logp, full, windows, stats.remove(), time.perf_counter() - t0, b))
        if progress:
            progress(results[-1])
    return results
