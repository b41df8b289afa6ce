"""The resolved policy IR: what the routing layer executes.

A policy is a set of *rules* of five kinds (budget, layers, tokens, reroute,
piggyback). Each rule carries a :class:`Condition` on the forward's context
(phase, batch size, token count). For every kind the first rule, in source
order, whose condition holds applies — like the arms of a ``match``. The
resolver has already checked that every rule can apply somewhere and that every
reachable combination stays within its budget, and fixed each MoE layer's
static output width (``widths``), so routing never needs to validate anything.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Iterable, Iterator, Literal, Sequence, TypeVar

from ..errors import SourceSpan
from ..spec import ModelSpec

if TYPE_CHECKING:  # the checker (parse + resolve) never imports torch: it must answer in well under a second
    import torch

Phase = Literal["prefill", "decode"]
PHASES: tuple[Phase, ...] = ("prefill", "decode")


@dataclass(frozen=True)
class RouteContext:
    """What a forward tells the router: phase, number of sequences, number of tokens.

    All plain Python values known on the host before the kernels run, so
    branching on them never synchronises with the device. ``num_tokens`` is the
    T of the ``[T, E]`` router logits; in decode it equals ``batch_size``.
    """

    phase: Phase = "decode"
    batch_size: int = 1
    num_tokens: int | None = None

    def __post_init__(self) -> None:
        # Normalise to the contexts the resolver validated: batch >= 1; decode has one token per
        # sequence (tokens == batch); prefill has at least one token per sequence.
        b = max(1, int(self.batch_size))
        t = b if self.phase == "decode" or self.num_tokens is None else max(b, int(self.num_tokens))
        object.__setattr__(self, "batch_size", b)
        object.__setattr__(self, "num_tokens", t)

    @property
    def tokens(self) -> int:
        return self.batch_size if self.num_tokens is None else self.num_tokens


@dataclass(frozen=True)
class Interval:
    """Inclusive integer interval; ``hi=None`` means unbounded."""

    lo: int = 1
    hi: int | None = None

    def contains(self, x: int) -> bool:
        return x >= self.lo and (self.hi is None or x <= self.hi)

    @property
    def empty(self) -> bool:
        return self.hi is not None and self.hi < self.lo

    def intersect(self, other: "Interval") -> "Interval":
        his = [h for h in (self.hi, other.hi) if h is not None]
        return Interval(max(self.lo, other.lo), min(his) if his else None)

    def __str__(self) -> str:
        if self.hi is None:
            return f">= {self.lo}"
        return f"== {self.lo}" if self.lo == self.hi else f"{self.lo}..{self.hi}"


@dataclass(frozen=True)
class Condition:
    """A conjunction: phase (None = any), batch-size interval, token-count interval."""

    phase: Phase | None = None
    batch: Interval = Interval()
    tokens: Interval = Interval()

    @property
    def always(self) -> bool:
        return self.phase is None and self.batch == Interval() and self.tokens == Interval()

    def holds(self, ctx: RouteContext) -> bool:
        return (
            (self.phase is None or self.phase == ctx.phase)
            and self.batch.contains(ctx.batch_size)
            and self.tokens.contains(ctx.tokens)
        )

    def __str__(self) -> str:
        parts = []
        if self.phase:
            parts.append(self.phase)
        if self.batch != Interval():
            parts.append(f"batch {self.batch}")
        if self.tokens != Interval():
            parts.append(f"tokens {self.tokens}")
        return " and ".join(parts) if parts else "always"


T = TypeVar("T")


@dataclass(frozen=True)
class Rule(Generic[T]):
    """One rule of a kind: its condition, its resolved content, where it was written."""

    condition: Condition
    value: T
    span: SourceSpan | None = None


@dataclass(frozen=True)
class Budget:
    """Average expert activations per token over the MoE layers (already absolute)."""

    experts_per_token: float
    relative: float | None = None  # the fraction of top-k the user wrote, if any

    def total(self, num_moe_layers: int) -> int:
        """Activations per token summed over MoE layers that the budget allows (floored)."""
        return int(self.experts_per_token * num_moe_layers + 1e-9)


@dataclass(frozen=True)
class LayerK:
    """A resolved per-layer plan: k for every MoE layer, and how it was chosen."""

    k: dict[int, int]
    method: str = "explicit"  # "stock" | "explicit" | "uniform" | "dp"
    profile: str | None = None  # profile path when method == "dp"
    predicted_loss: float | None = None  # summed profile loss of the plan (dp only)


@dataclass(frozen=True)
class Reallocation:
    """Alloc-T: a layer's T*k slots go to the highest-scoring (token, expert) pairs."""

    min_k: int
    max_k: int
    max_k_span: SourceSpan | None = field(default=None, compare=False, repr=False)  # where max_k was written

    def extra_per_token(self, k: int) -> int:
        """Slots per token handed out by score beyond every token's ``min_k`` (what routing uses)."""
        return self.routed_k(k) - self.min_k

    def routed_k(self, k: int) -> int:
        """Mean experts per token Alloc-T routes for a layer of ``k``: ``min(k, max_k)``; the checker
        refuses ``max_k < k``, so this is ``k`` for every resolved policy (no silent clamp)."""
        return max(self.min_k, min(k, self.max_k))


AdaptiveKind = Literal["top_p", "min_p"]


@dataclass(frozen=True)
class Adaptive:
    """A per-token confidence rule for one layer: each token keeps a prefix of its ranked experts.

    Rank the token's eligible experts by selection score; ``s_r`` is the gate score (the weight source) at
    rank r, ``Z`` the sum of gate scores over the token's eligible experts. A rank r in ``[min_k, max_k)``
    passes when

    * ``top_p``: ``s_0 + .. + s_{r-1} < threshold * Z`` (the smallest set whose mass reaches p: top-p routing);
    * ``min_p``: ``s_r >= threshold * s_0`` (relative threshold: SER's ``-ser Kmin,t``, min-p);

    and the token keeps its first ``k_t = min_k + #passing ranks`` experts (fp32, sums in rank order).
    ``k_t`` depends on the token alone, never on its batch. ``calibrated_mean``: the mean experts per token
    this threshold gives on the calibration trace (None: a threshold written in the policy).
    """

    kind: AdaptiveKind
    threshold: float  # a float32 value (routing compares in float32)
    min_k: int
    max_k: int
    calibrated_mean: float | None = None
    target: float | None = None  # the mean the calibration aimed at (the layer's k)

    def describe(self) -> str:
        how = f" (calibrated: mean {self.calibrated_mean:.3f})" if self.calibrated_mean is not None else ""
        return f"{self.kind} {self.threshold:.6g}{how}, min_k {self.min_k}, max_k {self.max_k}"


@dataclass(frozen=True)
class AdaptiveRule:
    """A ``tokens`` block with a per-token rule, as written (thresholds resolved per layer plan)."""

    kind: AdaptiveKind
    threshold: float | None  # None: calibrated from ``trace``
    min_k: int
    max_k: int
    trace: str | None = None  # calibration trace, as written
    overrides: dict[int, tuple[AdaptiveKind, float]] = field(default_factory=dict)  # layer -> fixed rule
    max_k_span: SourceSpan | None = field(default=None, compare=False, repr=False)
    rule_span: SourceSpan | None = field(default=None, compare=False, repr=False)

    @property
    def calibrated(self) -> bool:
        return self.threshold is None

    def describe(self) -> str:
        how = f"calibrated from {self.trace}" if self.calibrated else f"{self.threshold:g}"
        more = f", {len(self.overrides)} layer override(s)" if self.overrides else ""
        return f"{self.kind} {how}, min_k {self.min_k}, max_k {self.max_k}{more}"


@dataclass(frozen=True)
class Routed:
    """What one layer plan routes per token: the batch mean and the per-token bounds.

    The one notion shared by ``explain``, replay, the engines' width checks and the
    checker. ``exact``: replay's measured mean must equal ``mean`` (no SERE merges,
    no piggybacking; a grouped model's token may still have fewer eligible experts).
    """

    mean: float | None  # None: data-dependent (a per-token confidence rule with a written threshold)
    lo: int
    hi: int
    exact: bool


PrimaryKind = Literal["top", "coverage", "count"]


@dataclass(frozen=True)
class PrimaryRule:
    """How a batch's primary experts are chosen.

    * ``top S``      — SERE: union over the batch of every token's top-S experts.
    * ``coverage p`` — most-loaded experts (slot count, ties by expert index)
                       until they cover fraction ``p`` of the batch's slots.
    * ``count N``    — the N most-loaded experts (a cap on distinct experts).
    """

    kind: PrimaryKind
    value: float


@dataclass(frozen=True)
class Reroute:
    """SERE re-routing for one layer: similarity matrix, primaries, threshold, critical set."""

    primary: PrimaryRule
    min_similarity: float
    similarity: "torch.Tensor" = field(repr=False, compare=False)  # [E, E] float32
    critical: tuple[int, ...] = ()  # experts that are always primary in this layer
    similarity_path: str = ""


@dataclass(frozen=True)
class RerouteRule:
    """A reroute block before it is split per layer."""

    primary: PrimaryRule
    min_similarity: float
    similarity_path: str
    preserve_critical: int
    per_layer: dict[int, Reroute] = field(compare=False, repr=False)


@dataclass(frozen=True)
class Piggyback:
    """OEA: fill free slots, up to ``max_k``, with experts the batch already loads."""

    max_k: int
    min_score: float = 0.0  # a piggybacked expert's gate score must be at least this
    max_k_span: SourceSpan | None = field(default=None, compare=False, repr=False)  # where max_k was written


@dataclass(frozen=True)
class LayerPlan:
    """Everything one MoE layer runs for one context: the unit routing executes."""

    layer: int
    k: int
    width: int  # the layer's static K_max (same for every context)
    reallocation: Reallocation | None = None
    reroute: Reroute | None = None
    piggyback: Piggyback | None = None
    adaptive: Adaptive | None = None  # a per-token confidence rule (k is then the mean it targets)

    @property
    def is_stock_shape(self) -> bool:
        """A fixed k per token and nothing else (what an engine's own top-k with a smaller k computes)."""
        return (self.reallocation is None and self.reroute is None and self.piggyback is None
                and self.adaptive is None)

    def routed(self) -> Routed:
        """Experts per token this plan routes: selection's mean, widened by SERE merges and piggybacking."""
        re, pig, ad = self.reallocation, self.piggyback, self.adaptive
        mean: float | None = re.routed_k(self.k) if re is not None else self.k
        lo, hi = (re.min_k, re.max_k) if re is not None else (self.k, self.k)
        if ad is not None:  # per-token: the mean depends on the data (a calibrated rule's is on its trace)
            mean, lo, hi = ad.calibrated_mean, ad.min_k, ad.max_k
        if self.reroute is not None:  # a moved slot merges into one the token holds: fewer, never more
            lo = min(lo, 1)
        if pig is not None:  # free slots up to max_k filled with experts the batch already loads
            hi = max(hi, pig.max_k)
        return Routed(mean=None if mean is None else float(mean), lo=lo, hi=hi,
                      exact=self.reroute is None and pig is None and ad is None)


@dataclass(frozen=True)
class LayersRule:
    """A ``layers`` block as written: how k is chosen (resolved per budget into :class:`LayerK`)."""

    method: str  # "explicit" | "uniform" | "dp"
    default_k: int | None = None
    min_k: int = 1
    max_k: int | None = None
    overrides: dict[int, int] = field(default_factory=dict)
    profile: str | None = None


Match = tuple[int, int, int, int, int]  # first matching budget/layers/tokens/reroute/piggyback rule (-1: none)


@dataclass
class PolicyIR:
    """A policy resolved against one model spec.

    ``layer_k[(budget_rule, layers_rule)]`` holds the resolved per-layer k for
    every combination that some context can select (-1 = no rule of that kind).
    """

    name: str
    spec: ModelSpec
    source: str  # file name the policy came from
    budget_rules: tuple[Rule[Budget], ...] = ()
    layer_rules: tuple[Rule[LayersRule], ...] = ()
    token_rules: tuple[Rule[Reallocation | AdaptiveRule], ...] = ()
    reroute_rules: tuple[Rule[RerouteRule], ...] = ()
    piggyback_rules: tuple[Rule[Piggyback], ...] = ()
    layer_k: dict[tuple[int, int], LayerK] = field(default_factory=dict)
    # per-layer confidence rules of every reachable (budget, layers, tokens) combination with an adaptive tokens rule
    adaptive: dict[tuple[int, int, int], dict[int, Adaptive]] = field(default_factory=dict)
    widths: dict[int, int] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)
    _index: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @staticmethod
    def _first(rules: tuple[Rule[T], ...], ctx: RouteContext) -> int:
        for i, r in enumerate(rules):
            if r.condition.holds(ctx):
                return i
        return -1

    def rules_by_kind(self) -> tuple[tuple[Rule, ...], ...]:
        """The budget/layers/tokens/reroute/piggyback rules, in :data:`Match` order."""
        return (self.budget_rules, self.layer_rules, self.token_rules, self.reroute_rules, self.piggyback_rules)

    def rule_index(self) -> "RuleIndex":
        """The first-match index of the current rules (built once; rebuilt if a rule tuple is replaced)."""
        kinds = self.rules_by_kind()
        got = self._index
        if got is None or any(a is not b for a, b in zip(got[0], kinds)):
            got = self._index = (kinds, RuleIndex([[r.condition for r in rs] for rs in kinds]))
        return got[1]

    def match(self, ctx: RouteContext) -> Match:
        """Indices of the first matching budget/layers/tokens/reroute/piggyback rules (-1: none)."""
        b, l, t, r, p = self.budget_rules, self.layer_rules, self.token_rules, self.reroute_rules, self.piggyback_rules
        if len(b) + len(l) + len(t) + len(r) + len(p) > _SCAN_RULES:
            return self.rule_index().match(ctx)
        # a handful of rules (the common case): trying them in order is cheapest
        return self._first(b, ctx), self._first(l, ctx), self._first(t, ctx), self._first(r, ctx), self._first(p, ctx)

    def budget(self, ctx: RouteContext) -> Budget | None:
        i = self.match(ctx)[0]
        return self.budget_rules[i].value if i >= 0 else None

    def plans(self, ctx: RouteContext) -> dict[int, LayerPlan]:
        """Per-layer plans for ``ctx`` (cached by which rules matched)."""
        key = self.match(ctx)
        got = self._cache.get(key)
        if got is None:
            got = self._cache[key] = self.build(key)
        return got

    def plan(self, layer: int, ctx: RouteContext) -> LayerPlan:
        return self.plans(ctx)[layer]

    def stock_k(self) -> LayerK:
        return LayerK({l: self.spec.top_k for l in self.spec.moe_layers}, method="stock")

    def layer_k_for(self, key: Match) -> LayerK:
        bi, li = key[0], key[1]
        if (bi, li) == (-1, -1):
            return self.stock_k()
        got = self.layer_k.get((bi, li))
        if got is None:  # the resolver validates every reachable combination; this is a bug, not a fallback
            raise RuntimeError(f"policy {self.name!r}: rule combination {key} was never validated")
        return got

    def build(self, key: Match) -> dict[int, LayerPlan]:
        """The per-layer plans of one rule combination."""
        bi, li, ti, ri, pi = key
        ks = self.layer_k_for(key).k
        tok = self.token_rules[ti].value if ti >= 0 else None
        realloc = tok if isinstance(tok, Reallocation) else None
        adaptive = self.adaptive_for(key) if isinstance(tok, AdaptiveRule) else {}
        rr = self.reroute_rules[ri].value if ri >= 0 else None
        pig = self.piggyback_rules[pi].value if pi >= 0 else None
        return {
            l: LayerPlan(
                layer=l, k=ks[l], width=self.widths.get(l, self.spec.top_k), reallocation=realloc,
                reroute=rr.per_layer[l] if rr is not None else None, piggyback=pig, adaptive=adaptive.get(l),
            )
            for l in self.spec.moe_layers
        }

    def adaptive_for(self, key: Match) -> dict[int, Adaptive]:
        """The per-layer confidence rules of one combination (resolved and validated by the resolver)."""
        got = self.adaptive.get(key[:3])
        if got is None:  # the resolver resolves every reachable combination; this is a bug, not a fallback
            raise RuntimeError(f"policy {self.name!r}: confidence rules of combination {key} were never resolved")
        return got

    @property
    def is_stock(self) -> bool:
        """True when every context runs the model's own top-k and nothing else."""
        return (not self.token_rules and not self.reroute_rules and not self.piggyback_rules
                and all(v.k == self.stock_k().k for v in self.layer_k.values())
                and all(w == self.spec.top_k for w in self.widths.values()))

    def conditions(self) -> list[Condition]:
        rules = (*self.budget_rules, *self.layer_rules, *self.token_rules, *self.reroute_rules,
                 *self.piggyback_rules)
        return [r.condition for r in rules]


def _points(intervals: Iterable[Interval]) -> list[int]:
    """Representative values of one quantity: 1, c-1, c, c+1 around every bound c, and one past the largest."""
    cuts = {1}
    for iv in intervals:
        for c in (iv.lo, iv.hi):
            if c is not None:
                cuts.update({c - 1, c, c + 1})
    top = max(cuts)
    cuts.add(top + 1)
    return sorted(c for c in cuts if c >= 1)


def representative_contexts(conditions: "list[Condition]") -> list[RouteContext]:
    """One context per region where every condition's truth value is constant.

    Conditions are unions of phase x batch-interval x token-interval boxes, so
    the points 1, c-1, c, c+1 around every bound c (and one past the largest)
    hit every region. Used by ``sgl-budget explain``; the checker uses
    :func:`context_matches`, which computes the same matches without
    enumerating every (batch, tokens) pair.
    """
    batches = _points(c.batch for c in conditions)
    tokens = _points(c.tokens for c in conditions)
    out = []
    # decode: every sequence contributes exactly one token, so T == batch size
    for b in sorted(set(batches) | set(tokens)):
        out.append(RouteContext(phase="decode", batch_size=b, num_tokens=b))
    # prefill: every sequence contributes at least one token, so T >= batch size
    for b in batches:
        for t in sorted(set(tokens) | {b}):
            if t >= b:
                out.append(RouteContext(phase="prefill", batch_size=b, num_tokens=t))
    return out


# -- first match without scanning every rule -------------------------------------------------------------

_SCAN_RULES = 8  # PolicyIR.match scans policies with at most this many rules (the common case) directly
_NO_RULE = 1 << 62  # "no rule of this kind holds": above every rule index
_ANY = Interval()


def _starts(intervals: Iterable[Interval]) -> list[int]:
    """Sorted starts of the elementary regions the intervals' bounds cut the integers into: every
    interval is a union of whole regions, so each interval's truth is constant on a region."""
    out = {1}
    for iv in intervals:
        if not iv.empty:
            out.add(iv.lo)
            if iv.hi is not None:
                out.add(iv.hi + 1)
    return sorted(out)


def _paint(starts: list[int], rules: list[tuple[int, Interval]]) -> list[int]:
    """Per region of ``starts``, the smallest rule index whose interval covers it (``_NO_RULE``: none).

    ``rules`` come in increasing index order, and each region is painted by the first rule that
    covers it and then skipped (next-unpainted pointers with path compression): O((n + regions) log n)
    however the intervals overlap.
    """
    best = [_NO_RULE] * len(starts)
    nxt = list(range(len(starts) + 1))  # nxt[r]: the next region >= r that may be unpainted

    def find(r: int) -> int:
        root = r
        while nxt[root] != root:
            root = nxt[root]
        while r != root:
            nxt[r], r = root, nxt[r]
        return root

    for i, iv in rules:
        if iv.empty:
            continue
        end = len(starts) if iv.hi is None else bisect_left(starts, iv.hi + 1)
        r = find(bisect_left(starts, iv.lo))
        while r < end:
            best[r] = i
            nxt[r] = r + 1
            r = find(r + 1)
    return best


class _PhaseIndex:
    """First-match tables for the rules that can hold in one phase.

    The batch and token axes are cut into elementary regions by the bounds of every such rule, so a
    context's (batch region, token region) -- its *cell* -- decides the truth of every condition. Per
    kind, a rule bounded in one quantity only is folded into a per-region table of the smallest
    index that holds there (``a``: batch-only and unconditional rules, ``c``: token-only rules); the
    few rules bounded in both are checked in order, only while their index is below the tables'.
    """

    __slots__ = ("bstarts", "tstarts", "a", "c", "both")

    def __init__(self, kinds: Sequence[Sequence[Condition]], phase: str | None) -> None:
        rules = [[(i, c) for i, c in enumerate(conds) if c.phase is None or c.phase == phase] for conds in kinds]
        self.bstarts = _starts(c.batch for rs in rules for _, c in rs)
        self.tstarts = _starts(c.tokens for rs in rules for _, c in rs)
        self.a = [_paint(self.bstarts, [(i, c.batch) for i, c in rs if c.tokens == _ANY]) for rs in rules]
        self.c = [_paint(self.tstarts, [(i, c.tokens) for i, c in rs if c.batch == _ANY and c.tokens != _ANY])
                  for rs in rules]
        self.both = [tuple((i, c.batch, c.tokens) for i, c in rs if c.batch != _ANY and c.tokens != _ANY)
                     for rs in rules]

    def cell(self, b: int, t: int) -> tuple[int, int]:
        return bisect_right(self.bstarts, b) - 1, bisect_right(self.tstarts, t) - 1

    def at(self, rb: int, rt: int, b: int, t: int) -> Match:
        """The match at (b, t), whose cell is (rb, rt)."""
        out = []
        for a, c, both in zip(self.a, self.c, self.both):
            m, x = a[rb], c[rt]
            if x < m:
                m = x
            for i, bi, ti in both:
                if i >= m:
                    break
                if bi.contains(b) and ti.contains(t):
                    m = i
                    break
            out.append(m if m != _NO_RULE else -1)
        return tuple(out)  # type: ignore[return-value]


class RuleIndex:
    """First matching rule of every kind for any context, in O(log n) per kind instead of a scan of
    every rule (plus the rules bounded in both batch and tokens that come before the answer).

    Same answer as trying each kind's rules in order (:meth:`PolicyIR._first`).
    """

    def __init__(self, kinds: Sequence[Sequence[Condition]]) -> None:
        self.kinds = [list(conds) for conds in kinds]
        self._phases: dict[str | None, _PhaseIndex] = {}

    def phase(self, phase: str | None) -> _PhaseIndex:
        got = self._phases.get(phase)
        if got is None:
            got = self._phases[phase] = _PhaseIndex(self.kinds, phase)
        return got

    def match(self, ctx: RouteContext) -> Match:
        idx = self.phase(ctx.phase if ctx.phase in PHASES else None)
        b, t = ctx.batch_size, ctx.tokens
        rb, rt = idx.cell(b, t)
        return idx.at(rb, rt, b, t)


@dataclass
class ContextMatches:
    """The match of every representative context (:func:`representative_contexts`), one context per cell.

    Representative contexts in the same cell (same phase, and the same elementary batch and token
    regions of that phase's rules) agree on every condition and so on their match; only each cell's
    first context, in representative order, is kept. So every combination keeps the first context that
    selects it, and a rule's condition holds at a kept context exactly when it holds at a representative
    one. Kept: ``decode`` as (batch == tokens, match) by batch; ``prefill`` as rows (batch, token counts
    ascending, their matches) by batch.
    """

    decode: list[tuple[int, Match]]
    prefill: list[tuple[int, list[int], list[Match]]]

    def __post_init__(self) -> None:
        self._decode_batches = [b for b, _ in self.decode]  # for bisection in where()
        self._prefill_batches = [b for b, _, _ in self.prefill]

    def items(self) -> Iterator[tuple[RouteContext, Match]]:
        """The kept contexts and their matches, in representative order."""
        for b, m in self.decode:
            yield RouteContext(phase="decode", batch_size=b, num_tokens=b), m
        for b, ts, ms in self.prefill:
            for t, m in zip(ts, ms):
                yield RouteContext(phase="prefill", batch_size=b, num_tokens=t), m

    def combinations(self) -> set[Match]:
        """Every combination some context selects."""
        return {m for _, m in self.decode} | {m for _, _, ms in self.prefill for m in ms}

    def first(self) -> dict[Match, RouteContext]:
        """Every combination some context selects, with the first representative context that selects it."""
        out: dict[Match, RouteContext] = {}
        for b, m in self.decode:
            if m not in out:
                out[m] = RouteContext(phase="decode", batch_size=b, num_tokens=b)
        for b, ts, ms in self.prefill:
            for t, m in zip(ts, ms):
                if m not in out:
                    out[m] = RouteContext(phase="prefill", batch_size=b, num_tokens=t)
        return out

    def where(self, cond: Condition) -> Iterator[tuple[RouteContext, Match]]:
        """The kept contexts where ``cond`` -- one of the conditions these matches were computed for --
        holds, in representative order (found by bisection, not by testing every context)."""
        if cond.batch.empty or cond.tokens.empty:
            return
        if cond.phase in (None, "decode"):
            both = cond.batch.intersect(cond.tokens)
            if not both.empty:
                bs = self._decode_batches
                hi = len(bs) if both.hi is None else bisect_right(bs, both.hi)
                for j in range(bisect_left(bs, both.lo), hi):
                    b, m = self.decode[j]
                    yield RouteContext(phase="decode", batch_size=b, num_tokens=b), m
        if cond.phase in (None, "prefill"):
            rows = self._prefill_batches
            hi = len(rows) if cond.batch.hi is None else bisect_right(rows, cond.batch.hi)
            for j in range(bisect_left(rows, cond.batch.lo), hi):
                b, ts, ms = self.prefill[j]
                thi = len(ts) if cond.tokens.hi is None else bisect_right(ts, cond.tokens.hi)
                for k in range(bisect_left(ts, cond.tokens.lo), thi):
                    yield RouteContext(phase="prefill", batch_size=b, num_tokens=ts[k]), ms[k]


def context_matches(ir: "PolicyIR") -> ContextMatches:
    """The matches of the representative contexts of ``ir``'s conditions, one context per cell.

    Near-linear in the number of rules: each kept context costs O(log n) (:class:`RuleIndex`), a
    prefill batch region is scanned once (a later batch of the same region reaches no cell its first
    batch does not: for a token region [u, v] that a later batch reaches, the first batch b1 reaches u
    if u >= b1 and b1 itself otherwise), and within a row one token count per token region is kept.
    Only policies that bound prefill by both batch and tokens (in different blocks or in one) have
    more kept contexts than rules -- a row per batch region -- as many as they have cells.
    """
    conditions = ir.conditions()
    batches = _points(c.batch for c in conditions)
    tokens = _points(c.tokens for c in conditions)
    index = ir.rule_index()

    decode: list[tuple[int, Match]] = []
    idx, last = index.phase("decode"), None
    for b in sorted(set(batches) | set(tokens)):
        cell = idx.cell(b, b)
        if cell != last:
            decode.append((b, idx.at(*cell, b, b)))
            last = cell

    prefill: list[tuple[int, list[int], list[Match]]] = []
    idx, last_rb = index.phase("prefill"), None
    tcells = [bisect_right(idx.tstarts, t) - 1 for t in tokens]
    for b in batches:
        rb = bisect_right(idx.bstarts, b) - 1
        if rb == last_rb:
            continue  # same batch region as the previous row: it reaches only cells that row reached
        last_rb = rb
        ts: list[int] = []
        ms: list[Match] = []
        j = bisect_left(tokens, b)
        row = [(b, bisect_right(idx.tstarts, b) - 1)] if j == len(tokens) or tokens[j] != b else []
        row += zip(tokens[j:], tcells[j:])
        last_rt = None
        for t, rt in row:
            if rt != last_rt:
                ts.append(t)
                ms.append(idx.at(rb, rt, b, t))
                last_rt = rt
        prefill.append((b, ts, ms))
    return ContextMatches(decode, prefill)
