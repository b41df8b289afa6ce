"""The replay report: per-policy and per-layer metrics, rendered as rich tables or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class LayerStats:
    """One layer's routing, averaged over the replayed tokens / batches."""

    activations: float  # valid slots per token (piggybacked ones included)
    unique: float  # distinct experts per batch
    routing_mass: float  # absolute routing probability mass on the experts each token keeps (stock: < 1)
    rerouted: float  # slots moved by re-routing, per token
    piggybacked: float  # slots added by piggybacking, per token

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass
class PolicyResult:
    name: str
    source: str
    layers: dict[int, LayerStats]
    k: dict[int, int]

    def mean(self, field: str) -> float:
        return sum(getattr(s, field) for s in self.layers.values()) / len(self.layers)

    def moe_bytes(self, expert_bytes: int, shared_bytes: int) -> float:
        """Weight bytes one batch reads across all MoE layers (memory-bound decode model)."""
        return sum(s.unique * expert_bytes + shared_bytes for s in self.layers.values())


@dataclass
class Report:
    model: str
    trace_path: str
    synthetic: bool
    trace_source: str
    batch_size: int
    phase: str
    num_batches: int
    num_tokens: int
    expert_bytes: int
    shared_bytes: int
    stock: PolicyResult
    policies: list[PolicyResult]
    elapsed_s: float

    @property
    def all(self) -> list[PolicyResult]:
        return [self.stock, *self.policies]

    def mass_retained(self, r: PolicyResult, layer: int | None = None) -> float:
        """Mass retained: ``r``'s routing mass as a fraction of stock top-k's (stock = 1), mean or one layer."""
        if layer is not None:
            return r.layers[layer].routing_mass / max(self.stock.layers[layer].routing_mass, 1e-12)
        return r.mean("routing_mass") / max(self.stock.mean("routing_mass"), 1e-12)

    def time_ratio(self, r: PolicyResult) -> float:
        """Estimated MoE time of ``r`` in this phase relative to stock (unique-expert bytes + shared experts)."""
        return r.moe_bytes(self.expert_bytes, self.shared_bytes) / self.stock.moe_bytes(self.expert_bytes,
                                                                                       self.shared_bytes)

    @property
    def token_layers_per_s(self) -> float:
        return self.num_tokens * len(self.stock.layers) * len(self.all) / max(self.elapsed_s, 1e-9)

    def title(self) -> str:
        label = "SYNTHETIC trace (not recorded from a model)" if self.synthetic else "recorded trace"
        return (f"{self.model}: {self.phase} replay, batch {self.batch_size}, {self.num_batches} batches, "
                f"{self.num_tokens} tokens — {label}")

    def render(self, console: Console | None = None) -> None:
        console = console or Console()
        t = Table(title=self.title(), title_justify="left")
        for col in ("policy", "act/token", "× stock", "unique experts/batch", "× stock", "mass retained (of stock)",
                    "re-routed/token", "piggybacked/token", f"est. MoE {self.phase} time"):
            t.add_column(col, justify="left" if col == "policy" else "right", no_wrap=col == "policy")
        s_act, s_uni = self.stock.mean("activations"), self.stock.mean("unique")
        for r in self.all:
            act, uni = r.mean("activations"), r.mean("unique")
            t.add_row(r.name, f"{act:.3f}", f"{act / s_act:.3f}", f"{uni:.2f}", f"{uni / s_uni:.3f}",
                      f"{self.mass_retained(r):.3f}", f"{r.mean('rerouted'):.3f}", f"{r.mean('piggybacked'):.3f}",
                      f"{self.time_ratio(r):.3f}×")
        t.caption = (f"means over MoE layers; mass retained = routing probability mass on the kept experts as a "
                     f"fraction of stock top-k's (stock keeps {self.stock.mean('routing_mass'):.3f} of the "
                     f"softmax); est. {self.phase} time = unique-expert + shared-expert weight bytes relative to "
                     f"stock top-k (memory-bound model)" + (
                         f"\ntrace source: {self.trace_source}" if self.trace_source else ""))
        t.caption_justify = "left"
        console.print(t)

    def render_layers(self, console: Console | None = None) -> None:
        """Per-layer k and unique experts per batch for every policy."""
        console = console or Console()
        t = Table(title="per layer: k (plan) / activations per token / unique experts per batch",
                  title_justify="left")
        t.add_column("layer", justify="right")
        for r in self.all:
            t.add_column(r.name, justify="right")
        for layer in self.stock.layers:
            t.add_row(str(layer), *(f"{r.k.get(layer, '-')} / {r.layers[layer].activations:.2f} / "
                                    f"{r.layers[layer].unique:.1f}" for r in self.all))
        console.print(t)

    def to_dict(self) -> dict[str, Any]:
        def pol(r: PolicyResult) -> dict[str, Any]:
            return {
                "name": r.name, "source": r.source,
                "mean": {f: r.mean(f) for f in LayerStats.fields()},
                "activations_ratio": r.mean("activations") / self.stock.mean("activations"),
                "unique_ratio": r.mean("unique") / self.stock.mean("unique"),
                "mass_retained": self.mass_retained(r),
                "est_moe_time_ratio": self.time_ratio(r),  # for this report's phase
                "layers": {str(l): {"k": r.k.get(l), **asdict(s), "mass_retained": self.mass_retained(r, l)}
                           for l, s in r.layers.items()},
            }

        return {
            "model": self.model, "trace": self.trace_path, "synthetic": self.synthetic,
            "trace_source": self.trace_source, "phase": self.phase, "batch_size": self.batch_size,
            "num_batches": self.num_batches, "num_tokens": self.num_tokens,
            "stock": pol(self.stock), "policies": [pol(r) for r in self.policies],
        }
