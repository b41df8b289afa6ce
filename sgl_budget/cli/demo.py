"""``sgl-budget demo``: the embedded model's quality and cost tables, or the synthetic replay without a model."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import CliError
from .loaders import DEMO_TRACE, EMBEDDED_TRACE, bundled_dir, default_model_dir, held_out_text
from .replay import run_replay


def _have_transformers() -> bool:
    """Whether the transformers extra is installed (the demo's model run needs it)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _demo_model(args: argparse.Namespace) -> tuple[Path | None, str]:
    """The model directory the demo runs, or ``(None, why)`` for the synthetic-trace replay.

    A ``--model`` the user gave must be a model directory (a typo is an error, never a silent
    fallback); without one, the demo falls back to the synthetic trace only when transformers or
    the embedded model is missing, and says why.
    """
    if args.synthetic:
        return None, "--synthetic"
    if args.model is not None:
        model = Path(args.model)
        if not (model / "config.json").is_file():
            what = "does not exist" if not model.exists() else "is not a model directory (no config.json)"
            raise CliError(f"--model {args.model}: {what} (for the replay without a model use --synthetic)")
        if not _have_transformers():
            raise CliError(f"--model {args.model} needs transformers: pip install 'sgl-budget[hf]'")
        return model, ""
    model = default_model_dir()
    if not _have_transformers():
        return None, "transformers is not installed"
    if not (model / "config.json").is_file():
        return None, f"the embedded model is not at {model}"
    return model, ""


def cmd_demo(args: argparse.Namespace) -> int:
    d = bundled_dir()
    out = Path(args.out)
    model, why = _demo_model(args)
    out.mkdir(parents=True, exist_ok=True)
    if model is not None:
        return _demo_embedded(model, d, out, args)
    print(f"({why}: replaying the SYNTHETIC DeepSeek-V2-Lite-shaped trace instead of the embedded model)")
    policies = sorted(d.glob("*.policy"))
    trace = d / "traces" / DEMO_TRACE
    print(f"replaying {len(policies)} bundled policies on {trace.name} (batch {args.batch_size}, decode)")
    return run_replay(policies, trace, args.batch_size, "decode", None, str(out / "replay.png"), False, False)


def _demo_embedded(model: Path, d: Path, out: Path, args: argparse.Namespace) -> int:
    """Evaluate every bundled policy on held-out text, then replay them all on the recorded trace."""
    from .model import cmd_eval

    text = held_out_text()
    pols = sorted((d / "brown-moe").glob("*.policy"))  # every budget: a line per family in quality.png
    print(f"1/2 quality: {len(pols)} policies vs full top-k on {args.windows} held-out windows x {args.seq_len} "
          f"tokens of Brown Corpus text ({text.name}; change with --windows/--seq-len), decoded in lock-step "
          f"batches of {args.batch_size} (model {model})")
    ns = argparse.Namespace(model=str(model), text=str(text), windows=args.windows, seq_len=args.seq_len,
                            batch_size=args.batch_size, mode="decode", plot=str(out / "quality.png"), json=False,
                            policies=[str(p) for p in pols], threads=args.threads)
    cmd_eval(ns)
    trace = d / "traces" / EMBEDDED_TRACE
    print(f"2/2 cost: {len(pols)} policies replayed on {trace.name} (recorded from the embedded model)")
    return run_replay(pols, trace, args.batch_size, "decode", None, str(out / "replay.png"), False, False)



def add_commands(sub) -> None:
    """``demo``."""
    d = sub.add_parser("demo", help="the embedded model: quality of the bundled policies vs full top-k, and "
                                    "their cost on a recorded trace (tables + plots)")
    d.add_argument("--out", default="out", help="directory for quality.png and replay.png (default %(default)s)")
    d.add_argument("--batch-size", type=int, default=16,
                   help="sequences decoded together, and replayed per decode batch (default %(default)s)")
    d.add_argument("--model", default=None,
                   help="model directory (default: the embedded models/brown-moe); must exist")
    d.add_argument("--synthetic", action="store_true",
                   help="no model: replay the bundled policies on the SYNTHETIC DeepSeek-V2-Lite-shaped trace")
    d.add_argument("--windows", type=int, default=32, help="held-out sequences to evaluate (default %(default)s)")
    d.add_argument("--seq-len", type=int, default=96, help="tokens per sequence (default %(default)s)")
    d.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default %(default)s: the embedded model's matrices are too small to gain "
                        "from more, and extra threads thrash on a busy machine)")
    d.set_defaults(func=cmd_demo)
