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

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

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


@dataclass(frozen=True)
class Routed:
    """What one layer plan routes per token: the batch mean and the per-token bounds.

    The one notion shared by ``explain``, replay, the engines' width checks and the
    checker. ``exact``: replay's measured mean must equal ``mean`` (no SERE merges,
    no piggybacking; a grouped model's token may still have fewer eligible experts).
    """

    mean: float
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

    @property
    def is_stock_shape(self) -> bool:
        return self.reallocation is None and self.reroute is None and self.piggyback is None

    def routed(self) -> Routed:
        """Experts per token this plan routes: selection's mean, widened by SERE merges and piggybacking."""
        re, pig = self.reallocation, self.piggyback
        mean = re.routed_k(self.k) if re is not None else self.k
        lo, hi = (re.min_k, re.max_k) if re is not None else (self.k, self.k)
        if self.reroute is not None:  # a moved slot merges into one the token holds: fewer, never more
            lo = min(lo, 1)
        if pig is not None:  # free slots up to max_k filled with experts the batch already loads
            hi = max(hi, pig.max_k)
        return Routed(mean=float(mean), lo=lo, hi=hi, exact=self.reroute is None and pig is None)


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
    token_rules: tuple[Rule[Reallocation], ...] = ()
    reroute_rules: tuple[Rule[RerouteRule], ...] = ()
    piggyback_rules: tuple[Rule[Piggyback], ...] = ()
    layer_k: dict[tuple[int, int], LayerK] = field(default_factory=dict)
    widths: dict[int, int] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @staticmethod
    def _first(rules: tuple[Rule[T], ...], ctx: RouteContext) -> int:
        for i, r in enumerate(rules):
            if r.condition.holds(ctx):
                return i
        return -1

    def match(self, ctx: RouteContext) -> Match:
        """Indices of the first matching budget/layers/tokens/reroute/piggyback rules (-1: none)."""
        return (
            self._first(self.budget_rules, ctx),
            self._first(self.layer_rules, ctx),
            self._first(self.token_rules, ctx),
            self._first(self.reroute_rules, ctx),
            self._first(self.piggyback_rules, ctx),
        )

    def budget(self, ctx: RouteContext) -> Budget | None:
        i = self._first(self.budget_rules, ctx)
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
        _, _, ti, ri, pi = key
        ks = self.layer_k_for(key).k
        realloc = self.token_rules[ti].value if ti >= 0 else None
        rr = self.reroute_rules[ri].value if ri >= 0 else None
        pig = self.piggyback_rules[pi].value if pi >= 0 else None
        return {
            l: LayerPlan(
                layer=l, k=ks[l], width=self.widths.get(l, self.spec.top_k), reallocation=realloc,
                reroute=rr.per_layer[l] if rr is not None else None, piggyback=pig,
            )
            for l in self.spec.moe_layers
        }

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


def representative_contexts(conditions: "list[Condition]") -> list[RouteContext]:
    """One context per region where every condition's truth value is constant.

    Conditions are unions of phase x batch-interval x token-interval boxes, so
    the points 1, c-1, c, c+1 around every bound c (and one past the largest)
    hit every region. Used to find rules that never apply, to check budgets for
    every reachable combination, and by ``sgl-budget explain``.
    """
    def points(intervals: list[Interval]) -> list[int]:
        cuts = {1}
        for iv in intervals:
            for c in (iv.lo, iv.hi):
                if c is not None:
                    cuts.update({c - 1, c, c + 1})
        top = max(cuts)
        cuts.add(top + 1)
        return sorted(c for c in cuts if c >= 1)

    batches = points([c.batch for c in conditions])
    tokens = points([c.tokens for c in conditions])
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
