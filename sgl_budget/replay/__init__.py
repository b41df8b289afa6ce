"""Replay policies on recorded router logits and report cost and routing-mass metrics against stock top-k."""

from .plot import plot_report
from .report import LayerStats, PolicyResult, Report
from .run import expert_load_entropy, replay

__all__ = ["LayerStats", "PolicyResult", "Report", "expert_load_entropy", "plot_report", "replay"]
