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

A policy *mix* (:class:`~sgl_budget.lang.mix.PolicyMix`) routes the rows of every batch
with different policies in fixed proportions; it is scored over all rows (its distinct
experts per batch are the union its rows need) and per policy over that policy's rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from ...lang.ir import PolicyIR
from ...lang.mix import PolicyMix
from ...quality import EvalResult
from .adapter import PolicyMixHandle, apply_policy, apply_policy_mix, moe_blocks, router_of
from .progress import bar


def kl_to_reference(ref_logp: Tensor, logp: Tensor) -> Tensor:
    """Per-position KL(reference || other) from two next-token log-probability tensors ``[..., V]``."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


class _RouterStats:
    """Counts real experts per token and distinct experts per batch from the gates' outputs.

    Under a policy mix (``handle``) also per policy of the mix, on the rows that policy routes.
    """

    def __init__(self, model, handle: PolicyMixHandle | None = None) -> None:
        self.blocks = moe_blocks(model)
        self.handle = handle
        groups = 1 + (len(handle.policies or ()) if handle is not None else 0)  # 0: all rows, 1 + p: policy p
        self.act, self.uniq = [0.0] * groups, [0.0] * groups
        self.tokens, self.batches = [0] * groups, [0] * groups
        self.hooks = [router_of(model, b).register_forward_hook(self._hook) for b in self.blocks.values()]

    def _add(self, g: int, ids: Tensor, real: Tensor) -> None:
        self.act[g] += float(real.sum())
        self.tokens[g] += ids.shape[0]
        self.uniq[g] += float(torch.unique(ids[real]).numel())
        self.batches[g] += 1

    def _hook(self, module, args, out) -> None:
        logits, _, ids = out
        real = ids < logits.shape[-1]
        self._add(0, ids, real)
        if self.handle is not None and self.handle.row_policy is not None:
            rows = self.handle.row_policy
            rows = rows.repeat_interleave(ids.shape[0] // rows.numel())  # token (b, s) -> row b's policy
            for p in rows.unique().tolist():
                sel = rows == p
                self._add(1 + p, ids[sel], real[sel])

    def of(self, group: int = 0) -> tuple[float, float]:
        """``(experts per token, distinct experts per batch)`` of all rows (0) or of policy ``group - 1``."""
        return self.act[group] / max(1, self.tokens[group]), self.uniq[group] / max(1, self.batches[group])

    def remove(self) -> tuple[float, float]:
        for h in self.hooks:
            h.remove()
        return self.of(0)


@torch.no_grad()
def _run(model, windows: Tensor, batch: int, mode: str, tick=None, before=None) -> Tensor:
    """Next-token log-probabilities ``[N, S-1, V]`` (float16, CPU) for every window; ``tick(n)`` per n positions,
    ``before(x)`` before each batch ``x`` of windows."""
    outs = []
    tick = tick or (lambda n: None)
    for i in range(0, windows.shape[0], batch):
        x = windows[i:i + batch]
        if before is not None:
            before(x)
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
    top1 = lp.argmax(-1)
    acc = (top1 == targets).float().mean()
    kl, agree = 0.0, 1.0
    if full is not None:
        kl = float(kl_to_reference(full.float(), lp).mean())
        agree = float((top1 == full.float().argmax(-1)).float().mean())
    return EvalResult(name=name, perplexity=math.exp(float(nll.mean())), accuracy=float(acc), kl_to_full=kl,
                      activations_per_token=stats[0], unique_per_batch=stats[1], tokens=int(targets.numel()),
                      seconds=seconds, budget=budget, agreement=agree)


def _timed_run(model, windows: Tensor, batch: int, mode: str, name: str, show: bool, before=None) -> Tensor:
    """:func:`_run` with a progress bar over the window positions (one bar per policy)."""
    with bar(windows.shape[0] * (windows.shape[1] - 1), name, show, unit="tok") as b:
        return _run(model, windows, batch, mode, tick=b.update, before=before)


def _budget(ir: PolicyIR) -> float | None:
    return ir.budget_rules[0].value.experts_per_token if ir.budget_rules else None


def _evaluate_mix(model, mix: PolicyMix, full: Tensor, windows: Tensor, batch_size: int, mode: str,
                  show_progress: bool) -> list[EvalResult]:
    """The mix over all rows, then each of its policies on its own rows (windows) of every batch."""
    t0 = time.perf_counter()
    assigned: list[int] = []
    with apply_policy_mix(model, mix.policies, mix.rows(min(batch_size, windows.shape[0]))) as handle:
        def before(x: Tensor) -> None:
            rows = mix.rows(x.shape[0])
            handle.set_rows(rows)
            assigned.extend(rows)

        stats = _RouterStats(model, handle)
        logp = _timed_run(model, windows, batch_size, mode, mix.label, show_progress, before=before)
        stats.remove()
    seconds = time.perf_counter() - t0
    out = [_score(mix.label, logp, full, windows, stats.of(0), seconds, None)]
    policy_of_window = torch.tensor(assigned)
    for part, pid in zip(mix.parts, mix.ids):
        sel = policy_of_window == pid
        if bool(sel.any()):
            r = _score(part.name, logp[sel], full[sel], windows[sel], stats.of(1 + pid), seconds,
                       _budget(mix.policies.irs[pid]))
            r.mix = mix.label
            r.full_perplexity = _score("full top-k", full[sel], None, windows[sel], (0.0, 0.0), 0.0, None).perplexity
            out.append(r)
    return out


def evaluate(model, policies: list[PolicyIR], windows: Tensor, batch_size: int = 16, mode: str = "decode",
             progress=None, show_progress: bool = False, mixes: Sequence[PolicyMix] = ()) -> list[EvalResult]:
    """Full top-k, then each policy, then each mix, on the same windows; one result per run (full first).

    A mix gives one result over all rows, then one per policy of the mix over the rows it routed (``mix`` set).
    """
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
        results.append(_score(ir.name, logp, full, windows, stats.remove(), time.perf_counter() - t0, _budget(ir)))
        if progress:
            progress(results[-1])
    for mix in mixes:
        got = _evaluate_mix(model, mix, full, windows, batch_size, mode, show_progress)
        results += got
        if progress:
            progress(got[0])
    for r in results:
        r.phase = phase_label(mode, batch_size)
    return results


def phase_label(mode: str, batch_size: int) -> str:
    """What an evaluation measured, in words (the server path reports the same)."""
    return (f"decode (lock-step batches of {batch_size} sequences, teacher-forced)" if mode == "decode"
            else f"prefill (batches of {batch_size} windows)")
