"""Unit-test policies on recorded router logits: replay one policy and assert what it must guarantee.

Used through the pytest plugin (``sgl_budget.testing.plugin``, registered as a
``pytest11`` entry point), whose fixtures return :class:`PolicyCheck` objects::

    def test_my_policy(load_trace, compile_policy, replay_policy):
        trace = load_trace("traffic.trace.safetensors")
        check = replay_policy(compile_policy("my.policy", trace.spec), trace, batch_size=32)
        assert_within_budget(check)
        assert_mass_retained(check, at_least=0.85)  # of stock top-k's routing mass
        assert_unique_reduction(check, at_least=0.25)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..lang.ir import PolicyIR, RouteContext
from ..replay import PolicyResult, Report, replay

__all__ = ["PolicyCheck", "assert_mass_retained", "assert_unique_reduction", "assert_within_budget", "check_policy"]


@dataclass
class PolicyCheck:
    """One policy replayed on a trace, with the stock baseline of the same run."""

    ir: PolicyIR
    report: Report

    @property
    def result(self) -> PolicyResult:
        return self.report.policies[0]

    @property
    def context(self) -> RouteContext:
        b = self.report.batch_size
        return RouteContext(self.report.phase, b, b if self.report.phase == "decode" else None)  # type: ignore[arg-type]

    @property
    def activations_per_token(self) -> float:
        """Selected (not piggybacked) activations per token, mean over MoE layers."""
        return self.result.mean("activations") - self.result.mean("piggybacked")

    @property
    def mass_retained(self) -> float:
        """Mass retained: the policy's routing mass as a fraction of stock top-k's (the replay table's column)."""
        return self.report.mass_retained(self.result)

    @property
    def routing_mass(self) -> float:
        """Absolute routing probability mass on the kept experts, mean over MoE layers (stock's is below 1)."""
        return self.result.mean("routing_mass")

    @property
    def unique_ratio(self) -> float:
        return self.result.mean("unique") / self.report.stock.mean("unique")

    @property
    def est_decode_time_ratio(self) -> float:
        return self.report.time_ratio(self.result)


def check_policy(ir: PolicyIR, trace, batch_size: int = 16, phase: str = "decode",
                 max_batches: int | None = None) -> PolicyCheck:
    """Replay one policy on ``trace`` and wrap the result for assertions."""
    return PolicyCheck(ir, replay([ir], trace, batch_size=batch_size, phase=phase, max_batches=max_batches))


def assert_within_budget(check: PolicyCheck, tolerance: float = 1e-6) -> None:
    """Selected activations per token stay within the policy's budget and each layer's k."""
    budget = check.ir.budget(check.context)
    limit = budget.experts_per_token if budget is not None else float(check.ir.spec.top_k)
    got = check.activations_per_token
    assert got <= limit + tolerance, (
        f"policy {check.ir.name!r}: {got:.4f} activations per token exceed its budget of {limit:g}")
    for layer, s in check.result.layers.items():
        k = check.result.k[layer]
        sel = s.activations - s.piggybacked
        assert sel <= k + tolerance, f"policy {check.ir.name!r}: layer {layer} uses {sel:.4f} slots per token > k = {k}"


def assert_mass_retained(check: PolicyCheck, at_least: float) -> None:
    """Mass retained (routing mass as a fraction of stock top-k's, as in the replay table) is at least ``at_least``."""
    got = check.mass_retained
    if got < at_least:
        layer = min(check.result.layers, key=lambda l: check.report.mass_retained(check.result, l))
        raise AssertionError(f"policy {check.ir.name!r}: mass retained {got:.4f} (of stock top-k's routing mass) "
                             f"is below {at_least:g}; worst layer {layer}: "
                             f"{check.report.mass_retained(check.result, layer):.4f} of stock's")


def assert_unique_reduction(check: PolicyCheck, at_least: float) -> None:
    """Distinct experts per batch fall by at least ``at_least`` (a fraction) against stock top-k."""
    got = 1.0 - check.unique_ratio
    if got < at_least:
        raise AssertionError(f"policy {check.ir.name!r} cuts unique experts per batch by {got:.2%}, "
                             f"less than {at_least:.0%} (stock {check.report.stock.mean('unique'):.2f}, "
                             f"policy {check.result.mean('unique'):.2f})")
