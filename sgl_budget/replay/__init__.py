"""Replay policies on recorded router logits and report cost and routing-mass metrics against stock top-k."""

from .plot import plot_report
from .report import LayerStats, PolicyResult, Report
from .run import replay

__all__ = ["LayerStats", "PolicyResult", "Report", "plot_report", "replay"]
