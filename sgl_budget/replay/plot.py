"""Plot a replay report: per-layer k and unique experts per batch, one line per policy.

Every series gets its own colour + marker + line-style combination: policies of one
family (``uniform-25``, ``uniform-50``...) share a colour and differ in marker and
line style, so 17 series stay distinguishable; the legend sits outside the axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .report import Report

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
          "tab:cyan", "tab:gray")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", ":", "-.")
BASELINES = ("stock top-k", "full top-k")
STOCK_STYLE = {"color": "black", "linestyle": "-", "linewidth": 2.5, "marker": "*", "markersize": 9}


def family(name: str) -> str:
    """A policy's family: its name without a trailing budget number (``alloc-l-50`` -> ``alloc-l``)."""
    head, _, tail = name.rpartition("-")
    return head if head and tail.isdigit() else name


def series_styles(names: Sequence[str]) -> dict[str, dict]:
    """Distinct matplotlib styles: one colour per family, marker and line style per member (unique combinations)."""
    families: dict[str, list[str]] = {}
    for n in names:
        families.setdefault(family(n), []).append(n)
    styles, used = {}, set()
    for f_idx, members in enumerate(families.values()):
        for m_idx, n in enumerate(members):
            combo = (f_idx % len(COLORS), (f_idx // len(COLORS) + m_idx) % len(MARKERS), m_idx % len(LINESTYLES))
            while combo in used:  # only with more families than colours
                combo = (combo[0], (combo[1] + 1) % len(MARKERS), (combo[2] + 1) % len(LINESTYLES))
            used.add(combo)
            styles[n] = {"color": COLORS[combo[0]], "marker": MARKERS[combo[1]], "linestyle": LINESTYLES[combo[2]],
                         "linewidth": 1.3, "markersize": 5}
    return styles


def legend_outside(fig, ax) -> None:
    """One legend for the figure, right of the axes (never over the data): baseline first, then by name."""
    pairs = sorted(zip(*ax.get_legend_handles_labels()), key=lambda hl: (hl[1] not in BASELINES, hl[1]))
    handles, labels = [h for h, _ in pairs], [l for _, l in pairs]
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)


def plot_report(report: Report, path: str | Path) -> Path:
    """Write a two-panel PNG (per-layer activations per token; unique experts per batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_k, ax_u) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    layers = list(report.stock.layers)
    styles = series_styles([r.name for r in report.policies])
    for r in report.all:
        style = STOCK_STYLE if r is report.stock else styles[r.name]
        ax_k.plot(layers, [r.layers[l].activations for l in layers], label=r.name, **style)
        ax_u.plot(layers, [r.layers[l].unique for l in layers], label=r.name, **style)
    ax_k.set_ylabel("activations per token")
    ax_u.set_ylabel(f"unique experts per batch of {report.batch_size}")
    ax_u.set_xlabel("MoE layer")
    for ax in (ax_k, ax_u):
        ax.grid(alpha=0.3)
    label = "SYNTHETIC trace" if report.synthetic else "recorded trace"
    fig.suptitle(f"{report.model} — {report.phase} replay, batch {report.batch_size} ({label})")
    fig.tight_layout()
    legend_outside(fig, ax_k)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
