"""Replay policies on a recorded trace: cut it into batches, route every layer, measure cost and mass.

Every policy is compared with the model's stock top-k routing measured in the same
run on the same batches. The decode-time estimate follows the memory-bound model
of a decode step: an MoE layer reads each distinct routed expert it uses once
(``spec.expert_bytes``) plus its shared experts, so

    est. time ratio = sum over batches and layers of (unique * expert_bytes + shared_bytes)
                      / the same sum for stock top-k.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from ..lang.ir import PolicyIR, RouteContext
from ..lang.mix import PolicyMix
from ..routing import MixedRouter, compile_routers, stock_route
from ..routing.scoring import gate_probs, score_experts
from ..spec import ModelSpec
from .report import LayerStats, PolicyResult, Report


def _unique_per_batch(ids: Tensor, num_experts: int) -> Tensor:
    """``[N]`` float: distinct experts each batch of ``ids [N, B, K]`` (id -1 = padding) loads."""
    n = ids.shape[0]
    idx = ids.long().masked_fill(ids < 0, num_experts).flatten(1)
    seen = torch.zeros(n, num_experts + 1, dtype=torch.bool).scatter_(1, idx, True)[:, :num_experts]
    return seen.sum(dim=1).float()


def _measure(ids: Tensor, probs: Tensor, num_experts: int, rerouted: Tensor | None = None,
             piggybacked: Tensor | None = None) -> LayerStats:
    """Statistics of one layer's routing of ``[N, B, K]`` ids against the distribution ``probs [N, B, E]``."""
    valid = ids >= 0
    tokens = ids.shape[0] * ids.shape[1]
    mass = probs.gather(-1, ids.long().clamp_min(0)).masked_fill(~valid, 0.0).sum(-1)
    return LayerStats(
        activations=float(valid.sum()) / tokens,
        unique=float(_unique_per_batch(ids, num_experts).mean()),
        routing_mass=float(mass.mean()),
        rerouted=float(rerouted.sum()) / tokens if rerouted is not None else 0.0,
        piggybacked=float((piggybacked & valid).sum()) / tokens if piggybacked is not None else 0.0,
    )


def expert_load_entropy(trace) -> dict[int, float]:
    """Per MoE layer: entropy of the stock top-k expert load over the trace / log(E) (1 = perfectly balanced)."""
    spec = trace.spec
    out = {}
    for layer, x in trace.router_logits.items():
        bias = trace.correction_bias.get(layer) if trace.correction_bias else None
        ids = stock_route(spec, x.float(), bias).topk_ids.long()
        p = torch.bincount(ids.flatten(), minlength=spec.num_experts).float()
        p = p[p > 0] / p.sum()
        out[layer] = float(-(p * p.log()).sum()) / math.log(spec.num_experts)
    return out


def _max_k(ir: PolicyIR) -> int:
    """The widest ranking any selection stage of ``ir`` asks for (Alloc-T max_k)."""
    return max([r.value.max_k for r in ir.token_rules] or [0])


def _batches(trace, batch_size: int, phase: str, max_batches: int | None):
    """Yield ``(ctx, {layer: logits [N, T, E]}, rows [T])`` groups of equally shaped batches; ``rows``: the
    batch row (sequence, 0..B-1) of each token."""
    from ..traces import prefill_batches, stack_decode_batches

    if phase == "decode":
        stacked = stack_decode_batches(trace, batch_size, max_batches=max_batches)
        first = next(iter(stacked.values()), None)
        if first is None or first.shape[0] == 0:
            return
        yield RouteContext("decode", batch_size, batch_size), stacked, torch.arange(batch_size)
        return
    for i, b in enumerate(prefill_batches(trace, batch_size, max_batches=max_batches)):
        logits = {l: x.unsqueeze(0) for l, x in b.layer_logits.items()}
        t = next(iter(logits.values())).shape[1]
        lengths = torch.tensor([e - s for s, e in trace.sequences[i * batch_size:(i + 1) * batch_size]])
        yield RouteContext("prefill", batch_size, t), logits, torch.arange(batch_size).repeat_interleave(lengths)


def replay(policies: Sequence[PolicyIR], trace, batch_size: int = 16, phase: str = "decode",
           max_batches: int | None = None, trace_path: str = "", mixes: Sequence[PolicyMix] = ()) -> Report:
    """Replay ``policies`` on ``trace``; returns a :class:`Report` with stock top-k as baseline.

    Each mix of ``mixes`` is one more result: the rows (sequences) of every batch are split between its
    policies (:meth:`PolicyMix.rows`) and routed by a :class:`MixedRouter`; its distinct experts per batch
    are the union its rows need.
    """
    spec: ModelSpec = trace.spec
    irs = [*policies, *(ir for m in mixes for ir in m.policies.irs)]
    for ir in irs:
        if ir.spec.num_experts != spec.num_experts or set(ir.spec.moe_layers) != set(spec.moe_layers):
            raise ValueError(f"policy {ir.name!r} was resolved for {ir.spec.name}, the trace is of {spec.name}")
    compiled = [compile_routers(ir) for ir in irs]
    routers = compiled[:len(policies)]
    layers = list(spec.moe_layers)
    mixed, at = [], len(policies)
    for m in mixes:
        mixed.append({l: MixedRouter([rs[l] for rs in compiled[at:at + len(m.policies)]]) for l in layers})
        at += len(m.policies)
    e = spec.num_experts
    runs = len(policies) + len(mixes)
    acc: list[dict[int, list[tuple[int, LayerStats]]]] = [{l: [] for l in layers} for _ in range(runs + 1)]
    ks: list[dict[int, int]] = [dict() for _ in range(runs)]
    widest = {l: max([spec.top_k] + [max(rs[l].width, _max_k(ir)) for ir, rs in zip(irs, compiled)]) for l in layers}
    num_batches = tokens = 0
    t0 = time.perf_counter()
    for ctx, logits, rows in _batches(trace, batch_size, phase, max_batches):
        n = next(iter(logits.values())).shape[0]
        num_batches += n
        tokens += n * ctx.tokens
        maps = [torch.tensor(m.rows(batch_size))[rows] for m in mixes]  # token -> policy id
        for l in layers:
            x = logits[l].float()
            bias = trace.correction_bias.get(l) if trace.correction_bias else None
            # score and rank once; stock and every policy slice the shared ranking
            gs = score_experts(spec, x, bias).with_ranking(widest[l], stock_k=spec.top_k)
            probs = gs.scores if spec.scoring_func == "softmax" else gate_probs(spec, x)
            _, sids = stock_route(spec, x, gs=gs)
            acc[0][l].append((n * ctx.tokens, _measure(sids, probs, e)))
            routed = [rs[l].route_scores(gs, ctx, details=True) for rs in routers]
            routed += [mr[l].route_scores(gs, ctx, row_map, details=True) for mr, row_map in zip(mixed, maps)]
            for i, d in enumerate(routed):
                if i < len(routers):
                    ks[i][l] = routers[i][l].plan(ctx).k
                acc[i + 1][l].append((n * ctx.tokens, _measure(d.topk_ids, probs, e, d.num_rerouted, d.piggybacked)))
    elapsed = time.perf_counter() - t0
    if num_batches == 0:
        raise ValueError(f"the trace holds no full {phase} batch of {batch_size} sequences")

    def combine(parts: list[tuple[int, LayerStats]]) -> LayerStats:
        total = sum(w for w, _ in parts)
        return LayerStats(*(sum(w * getattr(s, f) for w, s in parts) / total for f in LayerStats.fields()))

    results = []
    names = ["stock top-k"] + [ir.name for ir in policies] + [m.label for m in mixes]
    sources = ["model's own routing"] + [ir.source for ir in policies] + [m.describe() for m in mixes]
    for i, name in enumerate(names):
        per_layer = {l: combine(acc[i][l]) for l in layers}
        results.append(PolicyResult(name=name, source=sources[i], layers=per_layer,
                                    k=ks[i - 1] if i else {l: spec.top_k for l in layers}))
    return Report(
        model=spec.name, trace_path=trace_path, synthetic=bool(trace.synthetic), trace_source=trace.source,
        batch_size=batch_size, phase=phase, num_batches=num_batches, num_tokens=tokens,
        expert_bytes=spec.expert_bytes, shared_bytes=spec.shared_expert_bytes,
        stock=results[0], policies=results[1:], elapsed_s=elapsed,
    )
