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


def eval_progress(quiet: bool):
    """A line on stderr per finished evaluation run (none under ``--json``)."""
    def progress(r) -> None:
        if not quiet:
            print(f"  {r.name}: ppl {r.perplexity:.3f} ({r.seconds:.0f} s)", file=sys.stderr)

    return progress


def print_eval(results, args, title: str, plot_name: str, mixes: bool = False) -> None:
    """An evaluation's results: a table (or JSON with ``--json``) and the quality plot (``--plot``), the same for
    every engine. The first result is the reference (full top-k / stock)."""
    import json

    from rich.table import Table

    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        full = results[0]
        t = Table(title=f"{title} ({full.tokens} predicted tokens, batch {args.batch_size}); phase: {full.phase}",
                  title_justify="left")
        for col in ("policy", "perplexity", "Δ ppl", "top-1 acc", "top-1 = ref", "KL to ref", "act/token",
                    "unique experts/batch"):
            t.add_column(col, justify="left" if col == "policy" else "right")
        for r in results:
            ref = r.full_perplexity if r.full_perplexity is not None else full.perplexity  # a share: its rows
            agree = "-" if r.agreement is None else f"{r.agreement:.4f}"
            t.add_row(f"  ↳ {r.name} (its rows)" if r.mix else r.name, f"{r.perplexity:.3f}",
                      f"{r.perplexity - ref:+.3f}", f"{r.accuracy:.4f}", agree, f"{max(r.kl_to_full, 0.0):.4f}",
                      f"{r.activations_per_token:.3f}", f"{r.unique_per_batch:.2f}")
        notes = [f"ref: {full.name}"]
        if full.kl_note:
            notes.append(f"KL to ref: {full.kl_note}")
        if mixes:
            notes.append("mix: each batch's rows split between policies in the given shares; ↳: one policy of the "
                         "mix on its own rows (Δ ppl against full top-k on those rows); a mixed batch reads the union "
                         "of the experts its rows need")
        t.caption = "\n".join(notes)
        t.caption_justify = "left"
        console().print(t)
    if args.plot:
        plot_quality([r for r in results if not r.mix], args.plot, title=f"{plot_name}: {args.mode}, batch "
                                                                          f"{args.batch_size}")
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)


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
