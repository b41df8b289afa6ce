"""How commands print: a rich console sized for terminals and logs, and progress bars only on a terminal."""

from __future__ import annotations

import sys
from pathlib import Path


def console():
    """A rich console; wide when output goes to a file or pipe (tables stay readable in logs)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def show_progress(quiet: bool = False) -> bool:
    """Progress bars on stderr: only on a terminal, and not under ``--json``."""
    return not quiet and sys.stderr.isatty()


def plot_quality(results, path: str, title: str = "") -> None:
    """Perplexity against experts per token and against distinct experts per decode batch (two panels).

    One colour per family (policy names ``method-NN``), a line through its budgets, a marker
    per policy (legend outside the axes); full top-k is the black star. The right panel is what a memory-bound
    decode step pays for (weights of the distinct experts it reads): SERE's argument.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..replay.plot import STOCK_STYLE, family, legend_outside, series_styles

    full, rest = results[0], results[1:]
    styles = series_styles([r.name for r in rest])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    panels = (("activations_per_token", "routed experts per token (mean over MoE layers)"),
              ("unique_per_batch", "distinct experts per decode batch (mean over MoE layers)"))
    for ax, (attr, xlabel) in zip(axes, panels):
        families: dict[str, list] = {}
        for r in rest:
            families.setdefault(family(r.name), []).append(r)
        for members in families.values():
            members = sorted(members, key=lambda r: getattr(r, attr))
            xs, ys = [getattr(r, attr) for r in members], [r.perplexity for r in members]
            ax.plot(xs, ys, color=styles[members[0].name]["color"], linewidth=1, alpha=0.6)
            for r, x, y in zip(members, xs, ys):
                st = styles[r.name]
                ax.plot([x], [y], linestyle="none", marker=st["marker"], color=st["color"], markersize=7,
                        label=r.name)
        ax.plot([getattr(full, attr)], [full.perplexity], linestyle="none", marker=STOCK_STYLE["marker"],
                color="black", markersize=12, label="full top-k")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out perplexity")
    fig.suptitle(title)
    fig.tight_layout()
    legend_outside(fig, axes[1])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
