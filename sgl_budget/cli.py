"""The ``sgl-budget`` command line: check, explain, allocate, replay, trace, demo, serve-demo.

Bad input of any kind (policy, model spec, profile, trace) ends with a
compiler-style message on stderr and exit status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import PolicyError
from .spec import PRESETS, SpecError, load_spec

EXIT_BAD_INPUT = 2


class CliError(Exception):
    """A bad command-line input that is not a policy (missing file, bad budget string...)."""


@contextmanager
def _user_errors():
    """Turn every expected user error into a clean message + exit 2."""
    from .alloc import ProfileError
    from .similarity import SimilarityFileError
    from .traces import TraceError

    try:
        yield
    except PolicyError as e:
        print(e.format(), file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except (SpecError, ProfileError, SimilarityFileError, TraceError, CliError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


def _console():
    """A rich console; wide when output goes to a file or pipe (tables stay readable in logs)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def _spec(ref: str):
    return load_spec(ref)


def _budget_arg(text: str, top_k: int) -> float:
    """Parse ``50%`` (of top-k) or ``3.0`` (experts per token) into experts per token."""
    t = text.strip()
    try:
        if t.endswith("%"):
            pct = float(t[:-1])
            if not 0 < pct <= 100:
                raise CliError(f"budget {text!r} must lie in (0%, 100%]")
            return pct / 100.0 * top_k
        val = float(t)
    except ValueError:
        raise CliError(f"budget {text!r} is neither a percentage (50%) nor a number of experts (3.0)") from None
    if not 0 < val <= top_k:
        raise CliError(f"budget {text!r} must lie in (0, top_k={top_k}] experts per token")
    return val


# -- check / explain ---------------------------------------------------------

def cmd_check(args: argparse.Namespace) -> int:
    from .lang import load_policy

    spec = _spec(args.model_spec)
    bad = 0
    for p in args.policies:
        try:
            ir = load_policy(Path(p), spec)
        except PolicyError as e:
            print(e.format(), file=sys.stderr)
            bad += 1
            continue
        print(f"ok: {p}: policy {ir.name!r} for {spec.name} "
              f"({spec.num_moe_layers} MoE layers, {spec.num_experts} experts, top-{spec.top_k})")
    return EXIT_BAD_INPUT if bad else 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain_policy
    from .lang import load_policy

    spec = _spec(args.model_spec)
    ir = load_policy(Path(args.policy), spec)
    explain_policy(ir, as_json=args.json, console=_console())
    return 0


# -- allocate ----------------------------------------------------------------

def cmd_allocate(args: argparse.Namespace) -> int:
    import yaml
    from rich.table import Table

    from .alloc import allocate_dp, load_profile

    prof = load_profile(args.profile)
    top_k = int(prof.model["top_k"])
    layers = sorted(prof.loss)
    per_token = _budget_arg(args.budget, top_k)
    total = int(per_token * len(layers) + 1e-9)
    try:
        alloc = allocate_dp(prof.loss, total, min_k=args.min_k, max_k=args.max_k)
    except ValueError as e:
        raise CliError(f"cannot allocate: {e}") from None
    table = Table(title=f"Alloc-L plan: budget {args.budget} = {total} activations/token over {len(layers)} MoE layers")
    table.add_column("layer", justify="right")
    table.add_column("k", justify="right")
    table.add_column(f"loss ({prof.metric})", justify="right")
    for layer in layers:
        k = alloc.k[layer]
        table.add_row(str(layer), str(k), f"{prof.loss[layer].get(k, 0.0):.4g}")
    table.caption = f"mean k {alloc.total / len(layers):.3f}, summed loss {alloc.loss:.4g}; profile source: {prof.source}"
    _console().print(table)
    if args.out:
        plan = {
            "format": "sgl-budget-plan/1",
            "profile": str(args.profile),
            "budget": args.budget,
            "total_activations": alloc.total,
            "summed_loss": float(alloc.loss),
            "k": {int(l): int(k) for l, k in sorted(alloc.k.items())},
        }
        Path(args.out).write_text(yaml.safe_dump(plan, sort_keys=False))
        print(f"wrote {args.out}")
    return 0


# -- replay ------------------------------------------------------------------

def _replay(policy_paths: Sequence[str | Path], trace_path: str | Path, batch_size: int, phase: str,
            max_batches: int | None, plot: str | None, as_json: bool, per_layer: bool) -> int:
    from .lang import load_policy
    from .replay import plot_report, replay
    from .traces import load_trace

    trace = load_trace(trace_path)
    policies = [(load_policy(Path(p), trace.spec)) for p in policy_paths]
    try:
        report = replay(policies, trace, batch_size=batch_size, phase=phase, max_batches=max_batches,
                        trace_path=str(trace_path))
    except ValueError as e:
        raise CliError(f"cannot replay {trace_path}: {e}") from None
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        console = _console()
        report.render(console)
        if per_layer:
            report.render_layers(console)
    if plot:
        plot_report(report, plot)
        print(f"wrote {plot}", file=sys.stderr if as_json else sys.stdout)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    return _replay(args.policies, args.trace, args.batch_size, args.phase, args.max_batches, args.plot,
                   args.json, args.layers)


# -- trace -------------------------------------------------------------------

def cmd_trace_synth(args: argparse.Namespace) -> int:
    from .traces import synthetic_trace, write_trace

    spec = _spec(args.model_spec)
    trace = synthetic_trace(spec, num_sequences=args.sequences, seq_len=args.seq_len, seed=args.seed)
    write_trace(trace, args.out, dtype=args.dtype) if args.dtype else write_trace(trace, args.out)
    print(f"wrote {args.out}: SYNTHETIC trace (not recorded from a model) for {spec.name}, "
          f"{trace.num_tokens} tokens x {len(trace.layers)} MoE layers, seed {args.seed}")
    return 0


def cmd_trace_info(args: argparse.Namespace) -> int:
    from .traces import load_trace

    t = load_trace(args.trace)
    info = {
        "path": str(args.trace),
        "synthetic": t.synthetic,
        "source": t.source,
        "model": t.spec.name,
        "num_tokens": t.num_tokens,
        "num_sequences": len(t.sequences),
        "layers": list(t.layers),
        "num_experts": t.spec.num_experts,
        "top_k": t.spec.top_k,
    }
    from .replay import expert_load_entropy

    info["expert_load_entropy"] = {str(l): round(h, 4) for l, h in expert_load_entropy(t).items()}
    print(json.dumps(info, indent=2, default=str))
    return 0


# -- demo --------------------------------------------------------------------

def bundled_dir() -> Path:
    """Directory of the bundled policies (installed package data, or the checkout's policies/)."""
    from importlib.resources import files

    return Path(str(files("sgl_budget.policies")))


def default_model_dir() -> Path:
    """The embedded default model (models/brown-moe in a checkout)."""
    return Path(__file__).resolve().parent.parent / "models" / "brown-moe"


def cmd_demo(args: argparse.Namespace) -> int:
    d = bundled_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else default_model_dir()
    try:
        import transformers  # noqa: F401

        have_hf = True
    except ImportError:
        have_hf = False
    if (model / "config.json").is_file() and have_hf:
        return _demo_embedded(model, d, out, args)
    why = "transformers is not installed" if not have_hf else f"no model at {model}"
    print(f"({why}: replaying the SYNTHETIC DeepSeek-V2-Lite-shaped trace instead of the embedded model)")
    policies = sorted(d.glob("*.policy"))
    trace = d / "traces" / DEMO_TRACE
    print(f"replaying {len(policies)} bundled policies on {trace.name} (batch {args.batch_size}, decode)")
    return _replay(policies, trace, args.batch_size, "decode", None, str(out / "replay.png"), False, False)


def _demo_embedded(model: Path, d: Path, out: Path, args: argparse.Namespace) -> int:
    """Evaluate the 50%-budget policies on held-out text, then replay every policy on the recorded trace."""
    from .cli_model import cmd_eval

    text = Path(__file__).resolve().parent.parent / "data" / "brown" / "test.txt.xz"
    pols = sorted((d / "brown-moe").glob("*-50.policy")) + [d / "brown-moe" / "sere-own-k.policy"]
    print(f"1/2 quality: {len(pols)} policies vs full top-k on held-out Brown Corpus text, {args.windows} sequences "
          f"decoded in lock-step batches of {args.batch_size} (model {model})")
    ns = argparse.Namespace(model=str(model), text=str(text), windows=args.windows, seq_len=args.seq_len,
                            batch_size=args.batch_size, mode="decode", plot=str(out / "quality.png"), json=False,
                            policies=[str(p) for p in pols])
    cmd_eval(ns)
    trace = d / "traces" / EMBEDDED_TRACE
    allp = sorted((d / "brown-moe").glob("*.policy"))
    print(f"2/2 cost: {len(allp)} policies replayed on {trace.name} (recorded from the embedded model)")
    return _replay(allp, trace, args.batch_size, "decode", None, str(out / "replay.png"), False, False)


EMBEDDED_TRACE = "brown-moe.test.trace.safetensors"
DEMO_TRACE = "deepseek-v2-lite.synthetic.trace.safetensors"


# -- argument parsing --------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgl-budget", description="Check, explain and replay MoE expert-activation policies.")
    sub = p.add_subparsers(dest="cmd", required=True)
    spec_help = f"model spec: a preset ({', '.join(PRESETS)}), a config.json, or a model directory"

    c = sub.add_parser("check", help="validate policies against a model spec")
    c.add_argument("policies", nargs="+", help=".policy files")
    c.add_argument("--model-spec", required=True, help=spec_help)
    c.set_defaults(func=cmd_check)

    e = sub.add_parser("explain", help="print the resolved per-layer plan of a policy")
    e.add_argument("policy")
    e.add_argument("--model-spec", required=True, help=spec_help)
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(func=cmd_explain)

    a = sub.add_parser("allocate", help="Alloc-L: exact per-layer k from a sensitivity profile")
    a.add_argument("--profile", required=True, help="sensitivity profile YAML (docs/formats.md)")
    a.add_argument("--budget", required=True, help="50%% of top-k, or 3.0 experts per token")
    a.add_argument("--min-k", type=int, default=1)
    a.add_argument("--max-k", type=int, default=None)
    a.add_argument("--out", help="write the plan as YAML")
    a.set_defaults(func=cmd_allocate)

    r = sub.add_parser("replay", help="replay policies on a recorded trace against stock top-k")
    r.add_argument("policies", nargs="+", help=".policy files (resolved against the trace's model spec)")
    r.add_argument("--trace", required=True, help="trace file (.safetensors, docs/formats.md)")
    r.add_argument("--batch-size", type=int, default=16, help="sequences per batch (default 16)")
    r.add_argument("--phase", choices=["decode", "prefill"], default="decode",
                   help="decode: one token of each of B sequences per batch; prefill: B whole sequences")
    r.add_argument("--max-batches", type=int, default=None, help="replay at most this many batches")
    r.add_argument("--plot", help="write a PNG: per-layer k and unique experts per batch")
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.add_argument("--layers", action="store_true", help="also print the per-layer table")
    r.set_defaults(func=cmd_replay)

    t = sub.add_parser("trace", help="create or inspect traces")
    tsub = t.add_subparsers(dest="trace_cmd", required=True)
    ts = tsub.add_parser("synth", help="write a seeded SYNTHETIC trace (for tests and demos)")
    ts.add_argument("--model-spec", required=True, help=spec_help)
    ts.add_argument("--out", required=True)
    ts.add_argument("--sequences", type=int, default=16)
    ts.add_argument("--seq-len", type=int, default=64)
    ts.add_argument("--seed", type=int, default=0)
    ts.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None)
    ts.set_defaults(func=cmd_trace_synth)
    ti = tsub.add_parser("info", help="print a trace's metadata")
    ti.add_argument("trace")
    ti.set_defaults(func=cmd_trace_info)

    from .cli_model import add_model_commands

    add_model_commands(sub, "local transformers MoE model directory (config.json, weights, tokenizer)")

    d = sub.add_parser("demo", help="the embedded model: quality of the bundled policies vs full top-k, and "
                                    "their cost on a recorded trace (tables + plots)")
    d.add_argument("--out", default="out")
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--model", default=None, help="model directory (default: the embedded models/brown-moe)")
    d.add_argument("--windows", type=int, default=32, help="held-out sequences to evaluate (default %(default)s)")
    d.add_argument("--seq-len", type=int, default=96, help="tokens per sequence (default %(default)s)")
    d.set_defaults(func=cmd_demo)

    from .cli_serve import add_serve_demo

    add_serve_demo(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "max_batches", "sequences", "seq_len", "max_new_tokens"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        with _user_errors():
            return int(args.func(args) or 0)
    except SystemExit as e:  # _user_errors printed the message
        return int(e.code) if isinstance(e.code, int) else EXIT_BAD_INPUT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
