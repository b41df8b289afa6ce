"""``sgl-budget explain``: print exactly what a resolved policy will run, per context and per layer."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from .lang.ir import AdaptiveRule, LayerPlan, Match, PolicyIR, RouteContext, representative_contexts

KINDS = ("layers", "tokens", "reroute", "piggyback")


def situations(ir: PolicyIR) -> list[tuple[Match, list[RouteContext]]]:
    """Distinct rule combinations the policy can select, each with the contexts that select it."""
    groups: dict[Match, list[RouteContext]] = {}
    for ctx in representative_contexts(ir.conditions()):
        groups.setdefault(ir.match(ctx), []).append(ctx)
    return list(groups.items())


def _where(ctxs: list[RouteContext], top: int) -> str:
    """Compact human description of a set of representative contexts (``top``: the open-ended point)."""
    parts = []
    for phase in ("prefill", "decode"):
        bs = sorted({c.batch_size for c in ctxs if c.phase == phase})
        if not bs:
            continue
        if bs[-1] >= top:
            rng = f"batch >= {bs[0]}" if bs[0] > 1 else "any batch"
        else:
            rng = f"batch {bs[0]}" if bs[0] == bs[-1] else f"batch {bs[0]}..{bs[-1]}"
        parts.append(f"{phase} ({rng})")
    return ", ".join(parts)


def _describe_rule(ir: PolicyIR, kind: str, key: Match) -> str:
    idx = key[KINDS.index(kind) + 1]
    if kind == "layers":
        v = ir.layer_k_for(key)
        when = ""
        if idx >= 0 and not ir.layer_rules[idx].condition.always:
            when = f" when {ir.layer_rules[idx].condition}"
        extra = f" from {v.profile}" if v.profile else ""
        loss = f", predicted loss {v.predicted_loss:.4g}" if v.predicted_loss is not None else ""
        return f"{v.method}{extra}{loss}{when}"
    if idx < 0:
        return "off"
    rule = {"tokens": ir.token_rules, "reroute": ir.reroute_rules, "piggyback": ir.piggyback_rules}[kind][idx]
    v = rule.value
    when = "" if rule.condition.always else f" when {rule.condition}"
    if kind == "tokens":
        if isinstance(v, AdaptiveRule):
            return f"per-token {v.describe()}{when}"
        return f"reallocate by score, min_k {v.min_k}, max_k {v.max_k}{when}"
    if kind == "reroute":
        unit = "%" if v.primary.kind == "coverage" else ""
        val = v.primary.value * 100 if v.primary.kind == "coverage" else int(v.primary.value)
        return (f"primary {v.primary.kind} {val:g}{unit}, min_similarity {v.min_similarity:g}, "
                f"preserve critical {v.preserve_critical}, similarity {v.similarity_path}{when}")
    return f"max_k {v.max_k}, min_score {v.min_score:g}{when}"


def routed_per_token(plans: dict[int, LayerPlan]) -> tuple[float | None, int, int, bool]:
    """Experts per token a situation routes, averaged over MoE layers, from the IR's one notion
    (:meth:`LayerPlan.routed`): mean (None: data-dependent), per-token bounds, and whether replay must measure
    the mean exactly."""
    rs = [p.routed() for p in plans.values()]
    means = [r.mean for r in rs]
    mean = None if any(m is None for m in means) else sum(means) / len(rs)  # type: ignore[arg-type]
    return mean, min(r.lo for r in rs), max(r.hi for r in rs), all(r.exact for r in rs)


def _rule_cell(p: LayerPlan) -> str:
    ad = p.adaptive
    if ad is None:
        return "-"
    got = f"{ad.kind} {ad.threshold:.4g}"
    return got + (f" (mean {ad.calibrated_mean:.2f})" if ad.calibrated_mean is not None else "")


def _layer_row(p: LayerPlan) -> tuple:
    rr = p.reroute
    bounds = p.reallocation or p.adaptive
    return (
        p.k, p.width,
        f"{bounds.min_k}..{bounds.max_k}" if bounds else "-",
        _rule_cell(p),
        (", ".join(map(str, rr.critical)) or "none") if rr else "-",
        str(p.piggyback.max_k) if p.piggyback else "-",
    )


def _ranges(layers: list[int]) -> str:
    out, start, prev = [], layers[0], layers[0]
    for l in layers[1:] + [None]:
        if l is not None and l == prev + 1:
            prev = l
            continue
        out.append(str(start) if start == prev else f"{start}..{prev}")
        if l is not None:
            start = prev = l
    return ", ".join(out)


def explain_dict(ir: PolicyIR) -> dict[str, Any]:
    """Machine-readable plan: rules, and per situation the per-layer plan."""
    spec = ir.spec
    sits = []
    for key, ctxs in situations(ir):
        plans = ir.plans(ctxs[0])
        mean, lo, hi, exact = routed_per_token(plans)
        sits.append({
            "applies_to": [{"phase": c.phase, "batch_size": c.batch_size, "num_tokens": c.tokens} for c in ctxs],
            "rules": {k: _describe_rule(ir, k, key) for k in KINDS},
            "mean_k": sum(p.k for p in plans.values()) / len(plans),
            "experts_per_token": {"mean": mean, "min": lo, "max": hi, "exact": exact},
            "layers": {
                str(l): {"k": p.k, "width": p.width,
                         "reallocate": [p.reallocation.min_k, p.reallocation.max_k] if p.reallocation else None,
                         "adaptive": _adaptive_dict(p),
                         "critical": list(p.reroute.critical) if p.reroute else None,
                         "piggyback_max_k": p.piggyback.max_k if p.piggyback else None}
                for l, p in plans.items()
            },
        })
    return {
        "policy": ir.name, "source": ir.source, "model": spec.to_dict(),
        "budgets": [{"when": str(r.condition), "experts_per_token": r.value.experts_per_token}
                    for r in ir.budget_rules],
        "widths": {str(l): w for l, w in ir.widths.items()},
        "situations": sits,
    }


def _adaptive_dict(p: LayerPlan) -> dict[str, Any] | None:
    ad = p.adaptive
    if ad is None:
        return None
    return {"rule": ad.kind, "threshold": ad.threshold, "min_k": ad.min_k, "max_k": ad.max_k,
            "calibrated_mean": ad.calibrated_mean, "target": ad.target}


def summary_dict(ir: PolicyIR) -> dict[str, Any]:
    """A compact :func:`explain_dict`: the budgets and, per situation, where it applies, its rules and the
    experts per token it routes (no per-layer plans); what a server lists for its clients."""
    sits = situations(ir)
    top = max(c.batch_size for _, cs in sits for c in cs)
    out = []
    for key, ctxs in sits:
        mean, lo, hi, exact = routed_per_token(ir.plans(ctxs[0]))
        out.append({"applies_to": _where(ctxs, top),
                    "rules": {k: v for k in KINDS if (v := _describe_rule(ir, k, key)) != "off"},
                    "experts_per_token": {"mean": None if mean is None else round(mean, 4), "min": lo, "max": hi,
                                          "exact": exact}})
    return {"policy": ir.name, "budgets": [{"when": str(r.condition), "experts_per_token": r.value.experts_per_token}
                                           for r in ir.budget_rules], "situations": out}


def per_token_only(plans: dict[int, LayerPlan]) -> bool:
    """Whether every layer decides each token's experts from that token alone (no batch-level stage)."""
    return all(p.reallocation is None and p.reroute is None and p.piggyback is None for p in plans.values())


def trace_distribution(ir: PolicyIR, trace) -> list[dict[str, Any]]:
    """Per situation whose routing is per token: the distribution of experts per token each layer routes on the
    trace's tokens (what a data-dependent rule means on real traffic); batch-level situations are left to replay."""
    import torch

    from .routing import compile_routers

    if trace.spec.num_experts != ir.spec.num_experts or any(l not in trace.router_logits for l in ir.spec.moe_layers):
        raise ValueError(f"the trace ({trace.spec.name}, layers {list(trace.layers)}) does not hold router logits "
                         f"for every MoE layer of {ir.spec.name}")
    routers = compile_routers(ir)
    out = []
    for key, ctxs in situations(ir):
        plans = ir.plans(ctxs[0])
        if not per_token_only(plans):
            out.append({"applies_to": _where(ctxs, max(c.batch_size for c in ctxs)), "layers": None})
            continue
        layers = {}
        for l, router in routers.items():
            bias = (trace.correction_bias or {}).get(l) if ir.spec.has_correction_bias else None
            ids = router(trace.router_logits[l].float(), ctxs[0], correction_bias=bias).topk_ids
            k = (ids >= 0).sum(dim=-1)
            q = torch.quantile(k.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
            layers[str(l)] = {"mean": k.double().mean().item(), "p10": q[0], "median": q[1], "p90": q[2],
                              "min": int(k.min()), "max": int(k.max()),
                              "histogram": torch.bincount(k, minlength=plans[l].width + 1).tolist()}
        out.append({"applies_to": _where(ctxs, max(c.batch_size for c in ctxs)), "layers": layers})
    return out


def explain_policy(ir: PolicyIR, as_json: bool = False, console: Console | None = None, trace=None) -> None:
    """Print the resolved plan (rich tables, or JSON); with ``trace``, each per-token situation's experts per token
    on the trace's tokens, per layer."""
    dist = trace_distribution(ir, trace) if trace is not None else None
    if as_json:
        d = explain_dict(ir)
        if dist is not None:
            for sit, got in zip(d["situations"], dist):
                sit["on_trace"] = got["layers"]
            d["trace"] = trace.source or "trace"
        print(json.dumps(d, indent=2))
        return
    console = console or Console()
    spec = ir.spec
    rule = {"softmax": "softmax", "sqrtsoftplus": "sqrt(softplus)"}.get(spec.scoring_func, "sigmoid") + (
        " + correction bias" if spec.has_correction_bias else "") + (
        f", grouped top-k {spec.topk_group}/{spec.n_group}" if spec.grouped else "") + (
        ", renormalised" if spec.norm_topk_prob else ", not renormalised") + (
        f", scaling {spec.routed_scaling_factor:g}" if spec.routed_scaling_factor != 1.0 else "")
    console.print(f"[bold]policy {ir.name!r}[/bold] ({ir.source}) for [bold]{spec.name}[/bold]: "
                  f"{spec.num_moe_layers} MoE layers of {spec.num_layers}, {spec.num_experts} experts, "
                  f"top-{spec.top_k}, {rule}")
    for r in ir.budget_rules:
        b = r.value
        rel = f" ({b.relative * 100:g}% of top-{spec.top_k})" if b.relative is not None else ""
        when = "" if r.condition.always else f" when {r.condition}"
        console.print(f"budget: {b.experts_per_token:g} experts/token averaged over MoE layers{rel}{when}")
    sits = situations(ir)
    top = max(c.batch_size for _, cs in sits for c in cs)
    for n, (key, ctxs) in enumerate(sits, 1):
        plans = ir.plans(ctxs[0])
        mean_k = sum(p.k for p in plans.values()) / len(plans)
        mean, lo, hi, exact = routed_per_token(plans)
        adaptive = any(p.adaptive is not None for p in plans.values())
        if mean is None:
            routes = "routes a data-dependent number of experts/token"
        else:
            routes = f"routes {mean:.3g} experts/token" + (" on the calibration trace" if adaptive else "")
        routes += ("" if lo == hi else f" (each token {lo}..{hi})") + (
            "" if exact or adaptive else ", before re-routing merges / piggybacking")
        table = Table(title=f"situation {n}: {_where(ctxs, top)} — mean k {mean_k:.3g}, {routes}",
                      title_justify="left")
        for col in ("layers", "k", "width", "tokens min..max", "per-token rule", "critical experts",
                    "piggyback max_k"):
            table.add_column(col, justify="right")
        rows: list[tuple[list[int], tuple]] = []
        for l, p in plans.items():
            row = _layer_row(p)
            if rows and rows[-1][1] == row and rows[-1][0][-1] == spec.moe_layers[spec.moe_layers.index(l) - 1]:
                rows[-1][0].append(l)
            else:
                rows.append(([l], row))
        for ls, row in rows:
            table.add_row(_ranges(ls), *map(str, row))
        table.caption = "\n".join(f"{k}: {_describe_rule(ir, k, key)}" for k in KINDS)
        table.caption_justify = "left"
        console.print(table)
        if dist is not None:
            _print_distribution(console, dist[n - 1]["layers"], trace)


def _print_distribution(console: Console, layers: dict | None, trace) -> None:
    if layers is None:
        console.print("  on the trace: this situation reallocates, re-routes or piggybacks across a batch; "
                      "`sgl-budget replay` measures it on batches of the trace")
        return
    t = Table(title=f"experts per token on the trace ({trace.num_tokens} tokens)", title_justify="left")
    for col in ("layer", "mean", "p10", "median", "p90", "min..max"):
        t.add_column(col, justify="right")
    for l, v in layers.items():
        t.add_row(l, f"{v['mean']:.3f}", f"{v['p10']:g}", f"{v['median']:g}", f"{v['p90']:g}", f"{v['min']}..{v['max']}")
    console.print(t)
