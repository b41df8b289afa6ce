"""Check a policy AST against a model spec and resolve it into the IR.

Everything that can be wrong with a policy that parsed — a number out of range,
a layer the model lacks, min_k above a layer's k, a plan above its budget, a
missing or malformed profile / similarity file, a condition that can never
hold, a block that an earlier one always shadows — is found here and raised as
a :class:`PolicyError` pointing at the offending text. Nothing is clamped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from ..errors import Diagnostic, PolicyError, SourceSpan
from ..spec import ModelSpec
from .ast import Block, Cond, LayerItem, Num, PolicyAst, Setting, Str
from .ir import (
    Adaptive, AdaptiveRule, Budget, Condition, ContextMatches, Interval, LayerK, LayersRule, Piggyback, PolicyIR, PrimaryRule, Reallocation,
    LayerPlan, Reroute, RerouteRule, RouteContext, Rule, context_matches,
)


def _err(msg: str, span: SourceSpan, hint: str | None = None) -> PolicyError:
    return PolicyError(msg, span, hint)


class _Errors:
    """Collects independent diagnostics (one per statement or block) instead of stopping at the first."""

    def __init__(self) -> None:
        self.items: list[Diagnostic] = []

    def run(self, fn: Callable, *args):
        """``fn(*args)``, or None with its errors recorded."""
        try:
            return fn(*args)
        except PolicyError as e:
            self.items.extend(e.diagnostics)
            return None

    def raise_if_any(self) -> None:
        """Raise every collected diagnostic at once (one per source position: no cascades)."""
        if self.items:
            seen: dict[tuple, Diagnostic] = {}
            for d in self.items:
                seen.setdefault((d.line, d.column), d)
            raise PolicyError.of(seen.values())


def _layers_text(spec: ModelSpec) -> str:
    ls = list(spec.moe_layers)
    contiguous = ls == list(range(ls[0], ls[-1] + 1))
    return f"{ls[0]}..{ls[-1]}" if contiguous and len(ls) > 1 else ", ".join(map(str, ls))


# -- numbers -----------------------------------------------------------------

def _short(text: str) -> str:
    return text if len(text) <= 24 else text[:10] + "..." + text[-6:]


def _int(num: Num, what: str, lo: int, hi: int | None, hint: str | None = None) -> int:
    """A whole number in [lo, hi]; anything else is an error at the literal."""
    if not math.isfinite(num.value) or abs(num.value) > 1e15:
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise _err(f"{what} {_short(num.text)} is out of range", num.span, hint or f"{what} must lie in {rng}")
    if not num.is_integer:
        raise _err(f"{what} must be a whole number, not {num.text}", num.span, hint or f"write e.g. {max(lo, 1)}")
    v = int(num.value)
    if v < lo or (hi is not None and v > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise _err(f"{what} {v} is out of range", num.span, hint or f"{what} must lie in {rng}")
    return v


def _real(num: Num, what: str, lo: float, hi: float, hint: str | None = None) -> float:
    if not lo <= num.value <= hi:
        raise _err(f"{what} {num.text} is out of range", num.span, hint or f"{what} must lie in [{lo:g}, {hi:g}]")
    return float(num.value)


# -- conditions ----------------------------------------------------------------

def _condition(terms: tuple[Cond, ...]) -> Condition:
    phase = None
    batch, tokens = Interval(), Interval()
    for c in terms:
        if c.phase is not None:
            if phase is not None and phase != c.phase:
                raise _err(f"condition can never hold: a forward is not both {phase} and {c.phase}", c.span,
                           "write two blocks, one `when prefill` and one `when decode`")
            phase = c.phase
            continue
        assert c.value is not None and c.op is not None and c.quantity is not None
        n = _int(c.value, f"{c.quantity} size" if c.quantity == "batch" else "token count", 0, 1 << 30)
        iv = {">=": Interval(n), ">": Interval(n + 1), "<=": Interval(1, n), "<": Interval(1, n - 1),
              "==": Interval(n, n)}[c.op]
        if iv.empty or (iv.hi is not None and iv.hi < 1):
            raise _err(f"condition can never hold: {c.quantity} {c.op} {c.value.text}", c.span,
                       f"{c.quantity} counts are at least 1")
        old = batch if c.quantity == "batch" else tokens
        new = old.intersect(iv)
        if new.empty:
            raise _err(f"condition can never hold: {c.quantity} {c.op} {c.value.text} contradicts {c.quantity} {old}",
                       c.span, "remove one of the two bounds")
        if c.quantity == "batch":
            batch = new
        else:
            tokens = new
    return Condition(phase=phase, batch=batch, tokens=tokens)


# -- blocks --------------------------------------------------------------------

def _check_duplicates(block: Block) -> None:
    """Every setting at most once per block (all repeats reported)."""
    errs = _Errors()
    seen: dict[str, Setting] = {}
    for s in block.settings:
        key = "allocate" if s.key.startswith("allocate") else "primary" if s.key.startswith("primary") else s.key
        if key == "layer":
            continue
        if key in seen:
            first = seen[key].span
            errs.items.extend(_err(f"'{_show(s.key)}' is set twice in this {block.kind} block", s.span,
                                   f"it was already set on line {first.line}; keep one").diagnostics)
        seen[key] = s
    errs.raise_if_any()


def _show(key: str) -> str:
    return {"k=": "k =", "k>=": "k >=", "k<=": "k <="}.get(key, key)


def _budget(block: Block, spec: ModelSpec) -> Budget:
    num = block.settings[0].value
    assert isinstance(num, Num)
    top = spec.top_k
    if block.percent:
        if num.value <= 0:
            raise _err(f"budget {num.text} must be above 0%", num.span, "a budget of 0 activates no experts")
        if num.value > 100:
            raise _err(f"budget {num.text} is above the model's top-k", num.span,
                       f"a budget is at most 100% (= top-{top}, {top} experts per token)")
        return Budget(experts_per_token=num.value / 100.0 * top, relative=num.value / 100.0)
    if num.value <= 0:
        raise _err(f"budget {num.text} must be above 0 experts per token", num.span,
                   "write e.g. `budget 50%` or `budget 3.0`")
    if num.value > top:
        raise _err(f"budget {num.text} experts per token is above the model's top-k ({top})", num.span,
                   f"{spec.name} activates {top} experts per token; a budget can only lower that")
    return Budget(experts_per_token=float(num.value))


def _layers(block: Block, spec: ModelSpec) -> tuple[LayersRule, Setting | None]:
    top = spec.top_k
    k_hint = f"per-layer k lies in 1..{top}: {spec.name} routes top-{top}, and a policy can only lower that"
    default = min_k = max_k = None
    alloc: Setting | None = None
    overrides: dict[int, int] = {}
    override_spans: dict[int, SourceSpan] = {}
    errs = _Errors()
    for s in block.settings:
        if s.key == "k=":
            default = errs.run(_int, s.value, "k", 1, top, k_hint)
        elif s.key == "k>=":
            min_k = errs.run(_int, s.value, "k lower bound", 1, top, k_hint)
        elif s.key == "k<=":
            max_k = errs.run(_int, s.value, "k upper bound", 1, top, k_hint)
        elif s.key.startswith("allocate"):
            alloc = s
        elif s.key == "layer":
            k = errs.run(_int, s.value, "k", 1, top, k_hint)
            layers = errs.run(_layer_set, s, spec)
            for layer in layers or ():
                if layer in overrides:
                    errs.run(_raise, f"layer {layer} is given a k twice", s.span,
                             f"it was already set on line {override_spans[layer].line}")
                    break
                if k is not None:
                    overrides[layer] = k
                    override_spans[layer] = s.span
    lo, hi = min_k or 1, max_k or top
    if min_k is not None and max_k is not None and min_k > max_k:
        bound = block.get("k<=")
        errs.run(_raise, f"k <= {max_k} is below k >= {min_k}: no k satisfies both", bound.span,
                 "swap or widen the bounds")
        lo, hi = 1, top  # checked against the bounds already reported: no cascade
    if block.get("k=") is not None and alloc is not None:
        errs.run(_raise, f"`k = {_show_num(block.get('k='))}` conflicts with `{alloc.key}`", block.get("k=").span,
                 "either fix k for every layer or let `allocate` choose it, not both")
    elif default is not None and not lo <= default <= hi:
        errs.run(_raise, f"k = {default} lies outside the bounds {lo}..{hi}", block.get("k=").span,
                 "change k or the `k >=` / `k <=` bounds")
    bad_spans: set[SourceSpan] = set()
    for layer, k in overrides.items():
        if not lo <= k <= hi and override_spans[layer] not in bad_spans:
            bad_spans.add(override_spans[layer])
            errs.run(_raise, f"layer {layer}: k = {k} lies outside this block's bounds {lo}..{hi}",
                     override_spans[layer], "explicit layers must respect `k >=` / `k <=` too")
    errs.raise_if_any()
    if alloc is not None:
        method = "dp" if alloc.key == "allocate dp" else "uniform"
    elif default is not None:
        method = "explicit"
    else:
        method = "auto"
    profile = alloc.value.value if alloc is not None and isinstance(alloc.value, Str) else None
    rule = LayersRule(method=method, default_k=default, min_k=lo, max_k=hi, overrides=overrides, profile=profile)
    return rule, alloc


def _raise(msg: str, span: SourceSpan, hint: str | None = None) -> None:
    raise _err(msg, span, hint)


def _show_num(s: Setting) -> str:
    return s.value.text if isinstance(s.value, Num) else "?"


def _layer_set(s: Setting, spec: ModelSpec) -> list[int]:
    """The MoE layers a ``layer`` override names; every bad item is reported."""
    assert s.extra is not None
    errs = _Errors()
    out: list[int] = []
    for item in s.extra.items:
        out += errs.run(_layer_item, item, spec) or []
    errs.raise_if_any()
    return out


def _layer_item(item: LayerItem, spec: ModelSpec) -> list[int]:
    """``N`` or ``lo..hi`` as the MoE layers it names."""
    last = spec.num_layers - 1
    hint = f"{spec.name} has layers 0..{last}; its MoE layers are {_layers_text(spec)}"
    lo = _int(item.lo, "layer", 0, last, hint)
    if item.hi is None:
        if not spec.is_moe_layer(lo):
            raise _err(f"layer {lo} is not an MoE layer of {spec.name}", item.span, hint)
        return [lo]
    hi = _int(item.hi, "layer", 0, last, hint)
    if hi < lo:
        raise _err(f"empty layer range {lo}..{hi}", item.span, f"write {hi}..{lo}")
    got = [l for l in range(lo, hi + 1) if spec.is_moe_layer(l)]
    if not got:
        raise _err(f"layers {lo}..{hi} hold no MoE layer of {spec.name}", item.span, hint)
    return got


ADAPTIVE_KEYS = ("top_p", "min_p", "top_p calibrated", "min_p calibrated")


def _tokens(block: Block, spec: ModelSpec, eligible: int, files: "_Loaded") -> Reallocation | AdaptiveRule:
    """An Alloc-T block or a per-token confidence rule; every bad statement is reported."""
    errs = _Errors()
    realloc = block.get("reallocate by score")
    rules = [s for s in block.settings if s.key in ADAPTIVE_KEYS]
    overrides = [s for s in block.settings if s.key == "layer"]
    if realloc is None and not rules:
        errs.run(_raise, "a tokens block needs `reallocate by score` or a per-token rule", block.span,
                 "Alloc-T: `reallocate by score`; a confidence rule: `top_p 0.9` or `min_p 0.2` "
                 "(or `top_p calibrated from \"trace.safetensors\"`)")
    if realloc is not None and (rules or overrides):
        errs.run(_raise, "a tokens block either reallocates by score (Alloc-T) or keeps experts by a per-token "
                 "rule, not both", (rules or overrides)[0].span,
                 "Alloc-T shares a batch's slots; top_p / min_p decide per token: write one of them")
    for extra in rules[1:]:
        errs.run(_raise, f"a second per-token rule `{extra.key}` (the block already has "
                 f"`{rules[0].key}` on line {rules[0].span.line})", extra.span,
                 "one rule per tokens block; a layer may differ with `layer N: top_p P`")
    adaptive = bool(rules) and realloc is None
    lo_min = 1 if adaptive else 0
    hint = f"per-token k lies in {lo_min}..{eligible} ({eligible} experts a token can be routed to)"
    min_s, max_s = block.get("min_k"), block.get("max_k")
    min_k = errs.run(_int, min_s.value, "min_k", lo_min, eligible, hint) if min_s else 1
    max_k = errs.run(_int, max_s.value, "max_k", 1, eligible, hint) if max_s else spec.top_k
    if min_k is not None and max_k is not None and min_k > max_k:
        errs.run(_raise, f"min_k {min_k} is above max_k {max_k}", (min_s or max_s).span, "min_k must be <= max_k")
    if not adaptive:
        errs.raise_if_any()
        return Reallocation(min_k=min_k, max_k=max_k, max_k_span=max_s.value.span if max_s else None)
    rule = rules[0]
    kind = rule.key.split()[0]
    threshold = trace = None
    if isinstance(rule.value, Num):
        threshold = errs.run(_threshold, kind, rule.value)
    else:
        assert isinstance(rule.value, Str)
        trace = rule.value.value
        errs.run(_check_calibration_trace, rule.value, spec, files)
    per_layer: dict[int, tuple] = {}
    first: dict[int, Setting] = {}
    for o in overrides:
        assert o.extra is not None and isinstance(o.value, Num)
        t = errs.run(_threshold, o.extra.rule, o.value)
        for l in errs.run(_layer_set, o, spec) or []:
            if l in first:
                errs.run(_raise, f"layer {l}'s rule is set twice in this tokens block", o.span,
                         f"it was already set on line {first[l].span.line}; keep one")
                continue
            first[l] = o
            if t is not None:
                per_layer[l] = (o.extra.rule, t)
    errs.raise_if_any()
    return AdaptiveRule(kind=kind, threshold=threshold, min_k=min_k, max_k=max_k, trace=trace,
                        overrides=dict(sorted(per_layer.items())), max_k_span=max_s.value.span if max_s else None,
                        rule_span=rule.span)


def _threshold(kind: str, num: Num) -> float:
    """A confidence threshold as routing compares it (float32): top_p in (0, 1], min_p in [0, 1]."""
    import numpy as np

    if kind == "top_p":
        if not 0.0 < num.value <= 1.0:
            raise _err(f"top_p {_short(num.text)} is out of range", num.span,
                       "top_p is the gate mass a token's kept experts must reach: 0 < top_p <= 1")
    elif not 0.0 <= num.value <= 1.0:
        raise _err(f"min_p {_short(num.text)} is out of range", num.span,
                   "min_p is a fraction of the token's top expert's gate score: 0 <= min_p <= 1")
    return float(np.float32(num.value))


def _check_calibration_trace(s: Str, spec: ModelSpec, files: "_Loaded") -> None:
    """:func:`_calibration_trace`'s checks, skipped for a file that, unchanged, was found to fit this model before."""
    if _file_identity(files.path(s), spec) not in _FITTING_TRACES:
        _calibration_trace(s, spec, files)


def _calibration_trace(s: Str, spec: ModelSpec, files: "_Loaded"):
    """The router-logit trace a calibrated rule names, checked against the model."""
    from ..traces import TraceError, load_trace

    trace = files.load(s, "calibration trace", load_trace, TraceError, "sgl-budget record (or --moe-record-trace)")
    t = trace.spec
    problems = []
    if t.num_experts != spec.num_experts:
        problems.append(f"it has {t.num_experts} experts per layer, the model {spec.num_experts}")
    problems += spec.layer_coverage_problems(trace.router_logits)
    if spec.has_correction_bias and not trace.correction_bias:
        problems.append("the model selects with a correction bias the trace does not carry")
    if problems:
        raise _err(f"calibration trace does not fit {spec.name}: {problems[0]}", s.span,
                   "record router logits of this model (`--moe-record-trace DIR` on the server)")
    if trace.num_tokens == 0:
        raise _err("calibration trace holds no tokens", s.span, "record some traffic first")
    ident = _file_identity(files.path(s), spec)
    if ident is not None:
        _FITTING_TRACES.add(ident)
    return trace


def _piggyback(block: Block, spec: ModelSpec, eligible: int) -> Piggyback:
    """An OEA block; every bad statement is reported."""
    errs = _Errors()
    ms = block.get("max_k")
    if ms is None:
        errs.run(_raise, "a piggyback block needs `max_k N`", block.span,
                 "how many slots a token may fill with experts the batch already loads")
    max_k = errs.run(_int, ms.value, "max_k", 1, eligible, f"max_k lies in 1..{eligible}") if ms else None
    sc = block.get("min_score")
    min_score = errs.run(_real, sc.value, "min_score", 0.0, 1.0) if sc else 0.0
    errs.raise_if_any()
    return Piggyback(max_k=max_k, min_score=min_score, max_k_span=ms.value.span)


@dataclass
class _Loaded:
    """Files named by a policy, loaded once."""

    base_dir: Path
    cache: dict
    allowed: Mapping[str, Path] | None = None  # set: only these names, never a path the text sends (calibration)

    def path(self, s: Str) -> Path:
        if not s.value.strip():
            raise _err("empty file name", s.span, "name a file relative to the policy's directory")
        if self.allowed is not None:
            got = self.allowed.get(s.value)
            if got is None:
                known = ", ".join(repr(n) for n in sorted(self.allowed)) or "none"
                raise _err(f"{s.value!r} is not a file this server loaded at launch", s.span,
                           f"a policy sent in a request may name only those files (by the name a launch policy "
                           f"gives them, or their absolute path): {known}")
            return got
        p = Path(s.value)
        return p if p.is_absolute() else self.base_dir / p

    def load(self, s: Str, what: str, loader: Callable, error: type[Exception], tool: str):
        """Load the file named by ``s`` once; a missing, unreadable or malformed file is an error at the name."""
        path = self.path(s)
        key = (what, str(path))
        if key not in self.cache:
            self.cache[key] = self._read(s, path, what, loader, error, tool)
        got = self.cache[key]
        if isinstance(got, PolicyError):  # the same bad file named again: the same error, at this name
            raise _err(got.message, s.span, got.hint)
        return got

    @staticmethod
    def _read(s: Str, path: Path, what: str, loader: Callable, error: type[Exception], tool: str):
        """The loaded file, or the PolicyError that describes why it cannot be (never an OSError)."""
        try:
            if not path.is_file():
                return _err(f"{what} not found: {s.value}", s.span,
                            f"looked for {path}; paths are relative to the policy's directory")
            return loader(path)
        except error as e:
            line = getattr(e, "line", None)
            where = f" (line {line})" if line else ""
            return _err(f"bad {what}{where}: {getattr(e, 'message', str(e))}", s.span,
                        getattr(e, "hint", None) or f"write it with `{tool}`")
        except (OSError, ValueError) as e:  # name too long, permission denied, embedded NUL...
            reason = getattr(e, "strerror", None) or str(e)
            return _err(f"cannot read {what} {s.value!r}: {reason}", s.span,
                        "check the file name (each path component is at most 255 bytes)")


def _reroute(block: Block, spec: ModelSpec, files: _Loaded) -> RerouteRule:
    """A SERE block; every bad statement (and the similarity file) is reported."""
    errs = _Errors()
    sim = block.get("similarity")
    if sim is None:
        errs.run(_raise, "a reroute block needs `similarity \"file\"`", block.span,
                 "SERE re-routes by expert similarity: compute it with `sgl-budget similarity`")
    prim = next((s for s in block.settings if s.key.startswith("primary")), None)
    primary = None
    if prim is None:
        errs.run(_raise, "a reroute block needs a primary rule", block.span,
                 "add `primary top 1` (SERE), `primary coverage 60%` or `primary count 16`")
    elif prim.key == "primary top":
        v = errs.run(_int, prim.value, "primary top", 1, spec.top_k, f"S lies in 1..{spec.top_k} (the model's top-k)")
        primary = PrimaryRule("top", v) if v is not None else None
    elif prim.key == "primary coverage":
        v = errs.run(_real, prim.value, "primary coverage", 1e-9, 100.0, "coverage lies in (0%, 100%]")
        primary = PrimaryRule("coverage", v / 100.0) if v is not None else None
    else:
        v = errs.run(_int, prim.value, "primary count", 1, spec.num_experts,
                     f"count lies in 1..{spec.num_experts} (experts per layer)")
        primary = PrimaryRule("count", v) if v is not None else None
    ms = block.get("min_similarity")
    min_sim = errs.run(_real, ms.value, "min_similarity", 0.0, 1.0, "similarities lie in [0, 1]") if ms else 0.0
    pc = block.get("preserve critical")
    n_crit = errs.run(_int, pc.value, "preserve critical", 0, spec.num_experts,
                      f"between 0 and {spec.num_experts} experts") if pc else 0
    table = errs.run(_similarity, sim.value, spec, files) if sim is not None else None
    errs.raise_if_any()
    s = sim.value
    per_layer = {
        l: Reroute(primary=primary, min_similarity=min_sim, similarity=table.matrices[l],
                   critical=tuple(int(e) for e in table.critical[l][:n_crit].tolist()), similarity_path=s.value)
        for l in spec.moe_layers
    }
    return RerouteRule(primary=primary, min_similarity=min_sim, similarity_path=s.value,
                       preserve_critical=n_crit, per_layer=per_layer)


def _similarity(s: Str, spec: ModelSpec, files: _Loaded):
    """The similarity table a reroute block names, checked against the model."""
    from ..similarity import SimilarityFileError, load_similarity

    table = files.load(s, "similarity file", load_similarity, SimilarityFileError, "sgl-budget similarity")
    problems = table.check_against(spec)
    if problems:
        raise _err(f"similarity file does not fit {spec.name}: {problems[0]}", s.span,
                   "compute the similarity file for this model")
    return table


# -- per-layer k for one (budget, layers) combination ----------------------------

def _spread(total: int, layers: list[int], hi: int) -> dict[int, int]:
    """``total`` activations spread as evenly as integers allow (capped at ``hi``)."""
    n = len(layers)
    return {l: min(hi, (i + 1) * total // n - i * total // n) for i, l in enumerate(layers)}


def _layer_k(rule: Rule[LayersRule] | None, alloc: Setting | None, budget: Rule[Budget] | None,
             spec: ModelSpec, files: _Loaded, where: str) -> LayerK:
    moe = list(spec.moe_layers)
    L = len(moe)
    lr = rule.value if rule is not None else LayersRule(method="auto", max_k=spec.top_k)
    b = budget.value if budget is not None else None
    span = rule.span if rule is not None else budget.span  # type: ignore[union-attr]
    method = lr.method
    if method == "auto":
        method = "uniform" if b is not None else "explicit"
    if method in ("uniform", "dp") and b is None:
        assert alloc is not None
        raise _err(f"`{alloc.key}` needs a budget, but no budget applies {where}", alloc.span,
                   "add e.g. `budget 50%` (or one whose `when` covers this case)")
    fixed = dict(lr.overrides)
    free = [l for l in moe if l not in fixed]
    if method == "explicit":
        base = lr.default_k if lr.default_k is not None else spec.top_k
        ks = {l: fixed.get(l, base) for l in moe}
        out = LayerK(ks, method="explicit" if (lr.default_k is not None or fixed) else "stock")
    else:
        assert b is not None
        total = b.total(L)
        rest = total - sum(fixed.values())
        if free and rest < lr.min_k * len(free):
            what = f"{b.experts_per_token:g} experts per token ({total} activations over {L} MoE layers)"
            raise _err(f"budget too small: {what} cannot give {len(free)} layers k >= {lr.min_k}"
                       + (f" after the {len(fixed)} explicit layers" if fixed else ""),
                       budget.span if budget is not None else span,
                       "raise the budget or lower `k >=`")
        if method == "uniform":
            ks = {**fixed, **_spread(rest, free, lr.max_k)} if free else dict(fixed)
            out = LayerK(dict(sorted(ks.items())), method="uniform")
        else:
            out = _dp(lr, alloc, fixed, free, total, spec, files)
    used = sum(out.k.values())
    if b is not None and used > b.total(L):
        raise _err(f"the layer plan uses {used} activations per token ({used / L:.2f} per layer), above the "
                   f"budget's {b.total(L)} ({b.experts_per_token:g} x {L} MoE layers) {where}", span,
                   "lower k, or raise the budget")
    return out


def _profile(s: Str, spec: ModelSpec, files: _Loaded):
    """The sensitivity profile an ``allocate dp`` names, checked against the model."""
    from ..alloc import ProfileError, load_profile

    prof = files.load(s, "profile", load_profile, ProfileError, "sgl-budget profile")
    problems = prof.check_against(spec)
    if problems:
        raise _err(f"profile does not fit {spec.name}: {problems[0]}", s.span, "profile this model")
    return prof


def _dp(lr: LayersRule, alloc: Setting | None, fixed: dict[int, int], free: list[int], total: int,
        spec: ModelSpec, files: _Loaded) -> LayerK:
    """Alloc-L's exact plan; runs once per distinct (profile, total, bounds, fixed layers) however many
    budget x layers combinations ask for it, so many conditioned blocks stay cheap."""
    from ..alloc import allocate_dp

    assert alloc is not None and isinstance(alloc.value, Str)
    s = alloc.value
    prof = _profile(s, spec, files)
    key = ("dp", str(files.path(s)), total, lr.min_k, lr.max_k, tuple(sorted(fixed.items())))
    if key not in files.cache:
        try:
            files.cache[key] = allocate_dp({l: prof.loss[l] for l in spec.moe_layers}, total, min_k=lr.min_k,
                                           max_k=lr.max_k, fixed=fixed or None)
        except ValueError as e:
            files.cache[key] = e
    got = files.cache[key]
    if isinstance(got, ValueError):
        raise _err(f"no per-layer plan fits the budget: {got}", s.span, "raise the budget or relax `k >=`")
    return LayerK(dict(sorted(got.k.items())), method="dp", profile=s.value, predicted_loss=float(got.loss))


# -- the whole policy ----------------------------------------------------------------

def _describe(ctx: RouteContext) -> str:
    if ctx.phase == "decode":
        return f"in decode at batch {ctx.batch_size}"
    return f"in prefill at batch {ctx.batch_size}, {ctx.tokens} tokens"


NEVER = Condition(batch=Interval(2, 1))  # stands in for a condition that was itself an error


def resolve(ast: PolicyAst, spec: ModelSpec, base_dir: str | Path = ".",
            allowed_files: Mapping[str, Path] | None = None) -> PolicyIR:
    """Resolve ``ast`` against ``spec``; raises one :class:`PolicyError` carrying every independent problem.

    ``allowed_files``: the only file names the policy may use (name -> path), for policy text that arrives in a
    request: no other name is ever opened, or even looked up on disk."""
    errs = _Errors()
    if not ast.name.value.strip():
        errs.run(_raise, "the policy has an empty name", ast.name.span, 'name it, e.g. policy "alloc-moe-half"')
    files = _Loaded(Path(base_dir), {}, allowed_files)
    eligible = spec.topk_group * (spec.num_experts // spec.n_group) if spec.grouped else spec.num_experts
    failed_kinds: set[str] = set()  # kinds with a bad condition: reachability is not judged (no cascades)

    def rules(kind: str, build: Callable[[Block], object]) -> tuple[Rule, ...]:
        out = []
        for b in ast.of(kind):  # type: ignore[arg-type]
            cond = errs.run(_condition, b.when)
            if cond is None:
                failed_kinds.add(kind)
            n = len(errs.items)
            errs.run(_check_duplicates, b)
            value = errs.run(build, b) if len(errs.items) == n else None
            out.append(Rule(cond or NEVER, value, b.span))
        return tuple(out)

    allocs = [next((s for s in b.settings if s.key.startswith("allocate")), None) for b in ast.of("layers")]

    def layers(b: Block) -> LayersRule:
        rule, alloc = _layers(b, spec)
        if alloc is not None and alloc.key == "allocate dp" and isinstance(alloc.value, Str):
            _profile(alloc.value, spec, files)
        return rule

    ir = PolicyIR(
        name=ast.name.value, spec=spec, source=ast.file,
        budget_rules=rules("budget", lambda b: _budget(b, spec)),
        layer_rules=rules("layers", layers),
        token_rules=rules("tokens", lambda b: _tokens(b, spec, eligible, files)),
        reroute_rules=rules("reroute", lambda b: _reroute(b, spec, files)),
        piggyback_rules=rules("piggyback", lambda b: _piggyback(b, spec, eligible)),
    )
    # every combination of rules some forward selects, each with the first representative context that
    # selects it (near-linear in the rules: no scan of every rule for every context)
    matches = context_matches(ir)
    errs.run(_check_reachable, ir, ast, matches, failed_kinds)
    first = {ctx: key for key, ctx in matches.first().items()}
    widths = _check_combinations(ir, ast, first, allocs, files, errs)
    errs.raise_if_any()
    ir.widths = widths
    return ir


def _check_combinations(ir: PolicyIR, ast: PolicyAst, matches: dict[RouteContext, tuple],
                        allocs: list[Setting | None], files: _Loaded, errs: _Errors) -> dict[int, int]:
    """Resolve and check every reachable (budget, layers, tokens, piggyback) combination; the layers' widths.

    ``matches``: each combination once, keyed by the first context that selects it (its errors name it).
    """
    spec = ir.spec
    widths = {l: 1 for l in spec.moe_layers}
    bad: set[tuple[int, int]] = set()
    for ctx, key in matches.items():
        bi, li, ti, _, pi = key
        if (bi, li) in bad or (bi >= 0 and ir.budget_rules[bi].value is None) or (
                li >= 0 and ir.layer_rules[li].value is None):
            continue  # a block of this combination is already reported
        if (bi, li) != (-1, -1) and (bi, li) not in ir.layer_k:
            got = errs.run(_layer_k, ir.layer_rules[li] if li >= 0 else None, allocs[li] if li >= 0 else None,
                           ir.budget_rules[bi] if bi >= 0 else None, spec, files, _describe(ctx))
            if got is None:
                bad.add((bi, li))
                continue
            ir.layer_k[(bi, li)] = got
        ks = ir.layer_k_for(key).k
        tok = ir.token_rules[ti].value if ti >= 0 else None
        re = tok if isinstance(tok, Reallocation) else None
        if re is not None:
            blk = ast.of("tokens")[ti]
            errs.run(_check_reallocation, re, ks, blk, _describe(ctx))
        ads: dict[int, Adaptive] = {}
        if isinstance(tok, AdaptiveRule):
            akey = (bi, li, ti)
            if akey not in ir.adaptive:
                got = errs.run(_adaptive_plan, tok, ks, (bi, li) != (-1, -1), spec, files, ast.of("tokens")[ti],
                               _describe(ctx))
                if got is None:
                    continue
                ir.adaptive[akey] = got
            ads = ir.adaptive[akey]
        pig = ir.piggyback_rules[pi].value if pi >= 0 else None
        for l in spec.moe_layers:
            plan = LayerPlan(l, ks[l], 0, re, None, pig, adaptive=ads.get(l))
            widths[l] = max(widths[l], ks[l], plan.routed().hi)
    return widths


def _adaptive_plan(rule: AdaptiveRule, ks: dict[int, int], planned: bool, spec: ModelSpec, files: _Loaded,
                   blk: Block, where: str) -> dict[int, Adaptive]:
    """Each layer's confidence rule for one layer plan ``ks``: written thresholds as they are, calibrated ones
    chosen on the trace so the layer's mean experts per token is its k. ``planned``: a budget or layers block
    set ``ks``; a written threshold must then never route more than k (its mean depends on the data)."""
    out: dict[int, Adaptive] = {}
    fixed = {l: rule.overrides.get(l, (rule.kind, rule.threshold)) for l in spec.moe_layers}
    fixed = {l: v for l, v in fixed.items() if v[1] is not None}
    calibrated = [l for l in spec.moe_layers if l not in fixed]
    if planned:
        over = [l for l in fixed if rule.max_k > ks[l]]
        if over:
            l = max(over, key=lambda x: rule.max_k - ks[x])
            kind = fixed[l][0]
            raise _err(f"{kind} {fixed[l][1]:g} may route up to max_k = {rule.max_k} experts per token at layer {l}, "
                       f"above the plan's k = {ks[l]} {where}; its mean depends on the data, so the plan cannot be "
                       "checked", rule.max_k_span or rule.rule_span or blk.span,
                       f'calibrate the threshold to the plan (`{kind} calibrated from "trace.safetensors"`), or '
                       f"set max_k <= {ks[l]}")
    for l, (kind, t) in fixed.items():
        out[l] = Adaptive(kind, t, rule.min_k, rule.max_k)  # type: ignore[arg-type]
    if calibrated:
        bad = [l for l in calibrated if not rule.min_k <= ks[l] <= rule.max_k]
        if bad:
            l = bad[0]
            raise _err(f"layer {l}'s k = {ks[l]} lies outside min_k..max_k = {rule.min_k}..{rule.max_k} {where}: no "
                       f"{rule.kind} threshold gives that mean", rule.rule_span or blk.span,
                       f"widen min_k / max_k to include {ks[l]}, or change the budget")
        setting = next(s for s in blk.settings if s.key.endswith(" calibrated"))
        assert isinstance(setting.value, Str)
        path = files.path(setting.value)
        keys = {l: _calibration_key(path, spec, l, rule, ks[l]) for l in calibrated}
        if any(k is None or k not in _CALIBRATED for k in keys.values()):  # else: this file, unchanged, fit before
            trace = _calibration_trace(setting.value, spec, files)
            for l in calibrated:
                got = _calibrate(trace, l, rule, ks[l], spec)
                if keys[l] is not None:
                    _remember(keys[l], got)
                out[l] = _adaptive(rule, got, ks[l])
        else:
            for l in calibrated:
                out[l] = _adaptive(rule, _CALIBRATED[keys[l]], ks[l])
    return dict(sorted(out.items()))


_CALIBRATED: dict = {}  # calibrations of this process, by trace file identity and rule (re-resolving is free)
_CALIBRATED_MAX = 4096
_FITTING_TRACES: set = set()  # identities of trace files read and found to fit a model (not read again)


def _file_identity(path: Path, spec: ModelSpec):
    """A trace file as it is on disk (path, size, mtime) for a model (None when it cannot be stat'ed: then it is
    loaded, and its error reported)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, spec)


def _calibration_key(path: Path, spec: ModelSpec, layer: int, rule: AdaptiveRule, target: int):
    """A calibration's identity: the trace file's (:func:`_file_identity`), the layer, the rule and the target."""
    ident = _file_identity(path, spec)
    return None if ident is None else (*ident, layer, rule.kind, rule.min_k, rule.max_k, target)


def _remember(key, got) -> None:
    if len(_CALIBRATED) >= _CALIBRATED_MAX:
        _CALIBRATED.pop(next(iter(_CALIBRATED)))
    _CALIBRATED[key] = got


def _calibrate(trace, layer: int, rule: AdaptiveRule, target: int, spec: ModelSpec):
    """One layer's calibrated threshold on ``trace`` (:func:`~sgl_budget.alloc.thresholds.calibrate_threshold`)."""
    from ..alloc.thresholds import calibrate_threshold

    bias = trace.correction_bias.get(layer) if (trace.correction_bias and spec.has_correction_bias) else None
    return calibrate_threshold(spec, trace.router_logits[layer], bias, rule.kind, rule.min_k, rule.max_k,
                               float(target))


def _adaptive(rule: AdaptiveRule, got, target: int) -> Adaptive:
    return Adaptive(rule.kind, got.threshold, rule.min_k, rule.max_k, calibrated_mean=got.mean,  # type: ignore[arg-type]
                    target=float(target))


def _check_reallocation(re: Reallocation, ks: dict[int, int], blk: Block, where: str) -> None:
    """Alloc-T must route exactly each layer's k per token on average: no bound may clamp the plan."""
    low = min(ks, key=lambda l: ks[l])
    if re.min_k > ks[low]:
        raise _err(f"min_k {re.min_k} is above layer {low}'s k = {ks[low]} {where}", (blk.get("min_k") or blk).span,
                   "every token gets min_k slots, so the layer would exceed its T*k slots; lower min_k")
    high = max(ks, key=lambda l: ks[l])
    if re.max_k < ks[high]:
        raise _err(f"max_k {re.max_k} is below layer {high}'s k = {ks[high]} {where}: Alloc-T would route only "
                   f"{re.max_k} experts per token, not the {ks[high]} the plan promises",
                   (blk.get("max_k") or blk).span,
                   f"raise max_k to at least {ks[high]}, or lower the budget / k so no layer needs more than "
                   f"{re.max_k}")


def _check_reachable(ir: PolicyIR, ast: PolicyAst, matches: ContextMatches,
                     failed_kinds: set[str] = frozenset()) -> None:
    """Every block must be the first match of its kind for some forward; say why not (all such blocks)."""
    kinds = ("budget", "layers", "tokens", "reroute", "piggyback")
    all_rules = (ir.budget_rules, ir.layer_rules, ir.token_rules, ir.reroute_rules, ir.piggyback_rules)
    errs = _Errors()
    for pos, (kind, rules) in enumerate(zip(kinds, all_rules)):
        if kind in failed_kinds:
            continue
        errs.run(_reachable_kind, kind, pos, rules, ast, matches)
    errs.raise_if_any()


def _reachable_kind(kind: str, pos: int, rules: tuple[Rule, ...], ast: PolicyAst,
                    matches: ContextMatches) -> None:
    """Report every block of ``kind`` that no forward selects."""
    errs = _Errors()
    used = {m[pos] for m in matches.combinations()}
    for i, r in enumerate(rules):
        if i in used:
            continue
        span = r.span or SourceSpan(ast.file, 1, 1)
        shadows = sorted({m[pos] for _, m in matches.where(r.condition)})  # first matches wherever r holds
        if not shadows:
            errs.run(_raise, f"the condition of this {kind} block can never hold", span,
                     "in decode every sequence has one token (tokens == batch); in prefill tokens >= batch")
            continue
        lines = ", ".join(str(rules[j].span.line) for j in shadows if 0 <= j < len(rules) and rules[j].span)
        errs.run(_raise, f"this {kind} block never applies: the {kind} block(s) on line {lines} match first "
                 "wherever this one would", span,
                 "blocks of a kind are tried in order; put the more specific one first")
    errs.raise_if_any()
