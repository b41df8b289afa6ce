"""Plot a replay report: per-layer k and unique experts per batch, one line per policy."""

from __future__ import annotations

from pathlib import Path

from .report import Report


def plot_report(report: Report, path: str | Path) -> Path:
    """Write a two-panel PNG (per-layer activations per token; unique experts per batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_k, ax_u) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    layers = list(report.stock.layers)
    for r in report.all:
        style = {"color": "black", "linestyle": "--", "linewidth": 2} if r is report.stock else {}
        ax_k.plot(layers, [r.layers[l].activations for l in layers], marker=".", label=r.name, **style)
        ax_u.plot(layers, [r.layers[l].unique for l in layers], marker=".", label=r.name, **style)
    ax_k.set_ylabel("activations per token")
    ax_u.set_ylabel(f"unique experts per batch of {report.batch_size}")
    ax_u.set_xlabel("MoE layer")
    ax_k.legend(fontsize=8, ncol=2)
    label = "SYNTHETIC trace" if report.synthetic else "recorded trace"
    fig.suptitle(f"{report.model} — {report.phase} replay, batch {report.batch_size} ({label})")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
