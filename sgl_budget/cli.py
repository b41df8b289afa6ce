"""The ``sgl-budget`` command line: check, explain, allocate, replay, trace, demo, serve-demo.

Bad input of any kind (policy, model spec, profile, trace) ends with a
compiler-style message on stderr and exit status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import functools
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


def _data_errors() -> tuple[type[Exception], ...]:
    """Data-file error types of the modules already imported (importing them here would pull in torch)."""
    found: list[type[Exception]] = [SpecError, CliError]
    for mod, name in (("sgl_budget.alloc.profile", "ProfileError"), ("sgl_budget.similarity", "SimilarityFileError"),
                      ("sgl_budget.traces", "TraceError"), ("sgl_budget.traces.format", "TraceError")):
        cls = getattr(sys.modules.get(mod), name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


@contextmanager
def _user_errors():
    """Turn every expected user error into a clean message + exit 2."""
    try:
        yield
    except PolicyError as e:
        print(e.format(), file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except Exception as e:
        if not isinstance(e, _data_errors()):
            raise
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
    """Check policies for a model and an engine; every error of every file, as text, gcc lines or JSON."""
    from .errors import Diagnostic
    from .lang.limits import limits_for, load_for_engine

    spec = _spec(args.model_spec)
    engine = limits_for(args.engine, spec.top_k)
    launch = args.moe_policy is not None or bool(args.moe_named_policy)
    if not args.policies and not launch:
        raise CliError("give policy files, or a launch's --moe-policy / --moe-named-policy flags")
    refusal = _family_refusal(args.engine, spec)
    if refusal:  # the engine's own launch check would refuse this model whatever the policy says
        if args.format == "json":
            print(json.dumps({"model": spec.name, "engine": args.engine, "files": [], "errors": [
                {"message": refusal, "file": str(args.model_spec)}]}, indent=2))
        else:
            print(f"error: {refusal}", file=sys.stderr)
        return EXIT_BAD_INPUT
    diags: list[Diagnostic] = []
    checked = []
    for p in args.policies:
        try:
            ir = load_for_engine(p, spec, args.engine)
        except PolicyError as e:
            diags += e.diagnostics
            if args.format == "text":
                print(e.format(), file=sys.stderr)
            checked.append({"file": str(p), "ok": False, "errors": len(e.diagnostics)})
            continue
        checked.append({"file": str(p), "ok": True, "policy": ir.name})
        if args.format == "text":
            print(f"ok: {p}: policy {ir.name!r} for {spec.name} ({spec.num_moe_layers} MoE layers, "
                  f"{spec.num_experts} experts, top-{spec.top_k}); servable by {engine.label}")
    served = _check_launch(args, spec, diags) if launch else None
    if args.format == "json":
        print(json.dumps({"model": spec.name, "engine": args.engine, "files": checked,
                          **({"launch": {"ok": served is not None, "names": served}} if launch else {}),
                          "errors": [d.to_dict() for d in diags]}, indent=2))
    elif args.format == "gcc":
        for d in diags:
            print(d.gcc())
    elif diags:
        n = len(diags)
        where = f"{sum(not c['ok'] for c in checked)} of {len(checked)} file(s)" if checked else "the launch"
        print(f"{n} error{'s' if n > 1 else ''} in {where} (checked for {engine.label})", file=sys.stderr)
    return EXIT_BAD_INPUT if diags else 0


def _family_refusal(engine: str, spec) -> str | None:
    """Why ``engine`` refuses this model's family (None: it serves it, or the spec names no family): the very
    function the SGLang launch check calls (:func:`sgl_budget.families.sglang_refusal`)."""
    from .families import engine_refusal

    return engine_refusal(engine, spec.model_type) if spec.model_type else None


def _check_launch(args: argparse.Namespace, spec, diags: list) -> list[str] | None:
    """The policies of a launch (``--moe-policy``, ``--moe-named-policy``) as the server checks them before any
    worker starts: names (invalid, reserved, repeated) and every file; the names requests may give, or None."""
    from .lang.limits import limits_for, load_for_engine
    from .lang.policy_set import load_policy_set, parse_named

    named = [parse_named(v) for v in args.moe_named_policy or ()]
    try:
        pset = load_policy_set(spec, args.moe_policy, named, loader=functools.partial(load_for_engine,
                                                                                         engine=args.engine))
    except PolicyError as e:
        diags += e.diagnostics
        if args.format == "text":
            print(e.format(), file=sys.stderr)
        return None
    if args.format == "text":
        print(f"ok: the launch serves {', '.join(pset.request_names)} per request (default: "
              f"{pset.default_name}); servable by {limits_for(args.engine, spec.top_k).label}")
    return list(pset.request_names)


def cmd_families(args: argparse.Namespace) -> int:
    """The MoE families sgl_budget knows and what each tool does with them (the README's support matrix)."""
    from .families import support_markdown, support_rows

    if args.json:
        print(json.dumps(support_rows(), indent=2))
    else:
        print(support_markdown(), end="")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain_policy
    from .lang import load_policy

    spec = _spec(args.model_spec)
    ir = load_policy(Path(args.policy), spec)
    explain_policy(ir, as_json=args.json, console=_console())
    return 0


# -- allocate ----------------------------------------------------------------

def _plan_policy(name: str, budget: str, k: dict[int, int], command: str, summary: str) -> str:
    """A ready ``.policy`` whose ``layers`` block fixes the planned k of every layer (usable as is, or edited)."""
    def comment(text: str) -> str:
        return "# " + " ".join(text.split())  # one line, whatever the profile's source text holds

    lines = [comment(f"Alloc-L plan written by: {command}"), comment(summary),
             f'policy "{name}" {{', f"  budget {budget}", "  layers {"]
    lines += [f"    layer {layer}: k = {kk}" for layer, kk in sorted(k.items())]
    return "\n".join(lines + ["  }", "}", ""])


def _policy_name(path: str) -> str:
    """A policy name from the output file's name (letters, digits, '-', '_', '.')."""
    stem = Path(path).name.removesuffix(".policy")
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "-" for c in stem) or "alloc-l-plan"


def _allocate_table(args: argparse.Namespace, prof, alloc, total: int):
    """``(title, table, summary)``: title and summary print as whole lines (a table would wrap them to its width)."""
    from rich.table import Table

    layers = sorted(prof.loss)
    table = Table()
    table.add_column("layer", justify="right")
    table.add_column("k", justify="right")
    table.add_column(f"loss ({prof.metric})", justify="right")
    for layer in layers:
        k = alloc.k[layer]
        table.add_row(str(layer), str(k), f"{prof.loss[layer].get(k, 0.0):.4g}")
    title = f"Alloc-L plan: budget {args.budget} = {total} activations/token over {len(layers)} MoE layers"
    return title, table, (f"mean k {alloc.total / len(layers):.3f}, summed loss {alloc.loss:.4g}; "
                          f"profile source: {prof.source}")


def cmd_allocate(args: argparse.Namespace) -> int:
    from .alloc import allocate_dp, load_profile

    prof = load_profile(args.profile)
    for warning in prof.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    top_k = int(prof.model["top_k"])
    per_token = _budget_arg(args.budget, top_k)
    total = int(per_token * len(prof.loss) + 1e-9)
    try:
        alloc = allocate_dp(prof.loss, total, min_k=args.min_k, max_k=args.max_k)
    except ValueError as e:
        raise CliError(f"cannot allocate: {e}") from None
    title, table, summary = _allocate_table(args, prof, alloc, total)
    console = _console()
    console.print(title, soft_wrap=True, highlight=False)
    console.print(table)
    console.print(summary, soft_wrap=True, highlight=False)  # one line: no wrapping inside a table caption
    if args.out:
        command = " ".join(["sgl-budget allocate", "--profile", str(args.profile), "--budget", args.budget,
                            "--min-k", str(args.min_k)] + (["--max-k", str(args.max_k)] if args.max_k else []))
        text = _plan_policy(_policy_name(args.out), args.budget.strip(), dict(alloc.k), command, summary)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}: a policy with this plan's k per layer (check it with sgl-budget check)")
    return 0


# -- policy mixes (eval, replay) ----------------------------------------------

def load_mixes(specs: Sequence[str] | None, spec=None) -> list:
    """``--mix`` values compiled against ``spec`` (a malformed one is a CliError; bad files a PolicyError);
    without a spec only their syntax is checked (before a model loads)."""
    from .lang.mix import MixError, load_mix, parse_mix

    try:
        return [load_mix(text, spec) if spec is not None else parse_mix(text) for text in specs or ()]
    except MixError as e:
        raise CliError(f"--mix: {e}") from None


def require_policies_or_mixes(policies: Sequence, mix_specs: Sequence[str] | None) -> None:
    """``eval`` and ``replay`` need something to measure; a malformed ``--mix`` fails here, before any loading."""
    if not policies and not mix_specs:
        raise CliError("give at least one policy file or --mix")
    load_mixes(mix_specs)


MIX_HELP = ("a per-row policy mix, reported as one more row: PART[,PART...] with PART = [NAME=]POLICY[:FRACTION] or "
            "stock[:FRACTION] (stock: the model's own routing); each batch's rows are split between the parts in "
            "these shares (in order; parts without a share split what is left; shares sum to 1), e.g. "
            "--mix fast=policies/brown-moe/uniform-25.policy:0.5,stock:0.5; repeat for more mixes (docs/quality.md, "
            "Policy mixes)")


# -- replay ------------------------------------------------------------------

def _replay(policy_paths: Sequence[str | Path], trace_path: str | Path, batch_size: int, phase: str,
            max_batches: int | None, plot: str | None, as_json: bool, per_layer: bool,
            mix_specs: Sequence[str] = ()) -> int:
    from .lang import load_policy
    from .replay import plot_report, replay
    from .traces import load_trace

    require_policies_or_mixes(policy_paths, mix_specs)
    trace = load_trace(trace_path)
    policies = [(load_policy(Path(p), trace.spec)) for p in policy_paths]
    mixes = load_mixes(mix_specs, trace.spec)
    try:
        report = replay(policies, trace, batch_size=batch_size, phase=phase, max_batches=max_batches,
                        trace_path=str(trace_path), mixes=mixes)
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
                   args.json, args.layers, args.mix or ())


# -- trace -------------------------------------------------------------------

def cmd_trace_synth(args: argparse.Namespace) -> int:
    from .traces import synthetic_trace, write_trace

    spec = _spec(args.model_spec)
    trace = synthetic_trace(spec, num_sequences=args.sequences, seq_len=args.seq_len, seed=args.seed)
    write_trace(trace, args.out, dtype=args.dtype) if args.dtype else write_trace(trace, args.out)
    print(f"wrote {args.out}: SYNTHETIC trace (not recorded from a model) for {spec.name}, "
          f"{trace.num_tokens} tokens x {len(trace.layers)} MoE layers, seed {args.seed}")
    return 0


def _trace_info(path: str) -> dict:
    """A trace's metadata and per-layer expert-load entropy, as a JSON-ready dict."""
    from .replay import expert_load_entropy
    from .traces import load_trace

    t = load_trace(path)
    return {
        "path": str(path), "synthetic": t.synthetic, "source": t.source, "model": t.spec.name,
        "num_tokens": t.num_tokens, "num_decode_tokens": int((t.phase == 1).sum()),
        "num_sequences": len(t.sequences), "layers": list(t.layers), "num_experts": t.spec.num_experts,
        "top_k": t.spec.top_k,
        "expert_load_entropy": {str(l): round(h, 4) for l, h in expert_load_entropy(t).items()},
    }


def _layer_ranges(layers: Sequence[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``1..3, 5``: layer ids as compact ranges."""
    parts: list[tuple[int, int]] = []
    for layer in sorted(layers):
        if parts and layer == parts[-1][1] + 1:
            parts[-1] = (parts[-1][0], layer)
        else:
            parts.append((layer, layer))
    return ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in parts)


def cmd_trace_info(args: argparse.Namespace) -> int:
    info = _trace_info(args.trace)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    ent = list(info["expert_load_entropy"].values())
    kind = "SYNTHETIC (not recorded from a model)" if info["synthetic"] else "recorded"
    lines = [
        f"{info['path']}: {kind} trace of {info['model']}",
        f"  source:     {info['source'] or '-'}",
        f"  tokens:     {info['num_tokens']} in {info['num_sequences']} sequences "
        f"({info['num_decode_tokens']} decode, {info['num_tokens'] - info['num_decode_tokens']} prefill)",
        f"  MoE layers: {len(info['layers'])} ({_layer_ranges(info['layers'])}), {info['num_experts']} experts, "
        f"top-{info['top_k']}",
        f"  expert-load entropy / log(E): min {min(ent):.3f}, mean {sum(ent) / len(ent):.3f}, max {max(ent):.3f} "
        f"(1 = perfectly balanced; per layer with --json)" if ent else "  expert-load entropy: -",
    ]
    print("\n".join(lines))
    return 0


# -- demo --------------------------------------------------------------------

def bundled_dir() -> Path:
    """Directory of the bundled policies (installed package data, or the checkout's policies/)."""
    from importlib.resources import files

    return Path(str(files("sgl_budget.policies")))


def default_model_dir() -> Path:
    """The embedded default model (models/brown-moe in a checkout)."""
    return Path(__file__).resolve().parent.parent / "models" / "brown-moe"


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
    return _replay(policies, trace, args.batch_size, "decode", None, str(out / "replay.png"), False, False)


def _demo_embedded(model: Path, d: Path, out: Path, args: argparse.Namespace) -> int:
    """Evaluate every bundled policy on held-out text, then replay them all on the recorded trace."""
    from .cli_model import cmd_eval

    text = Path(__file__).resolve().parent.parent / "data" / "brown" / "test.txt.xz"
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
    return _replay(pols, trace, args.batch_size, "decode", None, str(out / "replay.png"), False, False)


EMBEDDED_TRACE = "brown-moe.test.trace.safetensors"
DEMO_TRACE = "deepseek-v2-lite.synthetic.trace.safetensors"


# -- argument parsing --------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgl-budget", description="Check, explain and replay MoE expert-activation policies.")
    sub = p.add_subparsers(dest="cmd", required=True)
    spec_help = f"model spec: a preset ({', '.join(PRESETS)}), a config.json, or a model directory"

    c = sub.add_parser("check", help="validate policies against a model spec")
    c.add_argument("policies", nargs="*", help=".policy files")
    c.add_argument("--moe-policy", metavar="PATH", help="also check a launch: its --moe-policy (the default policy)")
    c.add_argument("--moe-named-policy", action="append", metavar="NAME=PATH",
                   help="... and its --moe-named-policy flags (repeatable): names and files as the server checks "
                        "them before any worker starts")
    c.add_argument("--model-spec", required=True, help=spec_help)
    c.add_argument("--engine", choices=["sglang", "hf"], default="sglang",
                   help="check what this engine can serve: sglang (default; its MoE runners take at most the "
                        "model's top-k experts per token) or hf (the transformers adapter, which allows more)")
    c.add_argument("--format", choices=["text", "gcc", "json"], default="text",
                   help="text: rustc-style diagnostics; gcc: one `file:line:col: error: msg` per line (editors); "
                        "json: a list of errors with file, line, column, message, hint")
    c.add_argument("--json", dest="format", action="store_const", const="json", help="same as --format json")
    c.set_defaults(func=cmd_check)

    fm = sub.add_parser("families", help="the MoE families sgl_budget knows: check / --moe-policy, CPU serving in "
                                         "CI, transformers adapter (the README's support matrix, as Markdown)")
    fm.add_argument("--json", action="store_true", help="one JSON object per family")
    fm.set_defaults(func=cmd_families)
    e = sub.add_parser("explain", help="print the resolved per-layer plan of a policy")
    e.add_argument("policy")
    e.add_argument("--model-spec", required=True, help=spec_help)
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(func=cmd_explain)

    a = sub.add_parser("allocate", help="Alloc-L: exact per-layer k from a sensitivity profile")
    a.add_argument("--profile", required=True, help="sensitivity profile YAML (docs/formats.md)")
    a.add_argument("--budget", required=True, help="50%% of top-k, or 3.0 experts per token")
    a.add_argument("--min-k", type=int, default=1, help="smallest k of any layer (default %(default)s)")
    a.add_argument("--max-k", type=int, default=None, help="largest k of any layer (default: the profile's)")
    a.add_argument("--out", help="write the plan as a ready .policy file (layers { layer N: k = K ... })")
    a.set_defaults(func=cmd_allocate)

    r = sub.add_parser("replay", help="replay policies on a recorded trace against stock top-k")
    r.add_argument("policies", nargs="*", help=".policy files (resolved against the trace's model spec)")
    r.add_argument("--mix", action="append", metavar="PART[,PART...]",
                   help=MIX_HELP + "; the mix's distinct experts per batch are the union its rows need")
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
    ti.add_argument("--json", action="store_true", help="print the metadata and per-layer entropy as JSON")
    ti.set_defaults(func=cmd_trace_info)

    from .cli_model import add_model_commands

    add_model_commands(sub, "local transformers MoE model directory (config.json, weights, tokenizer)")

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

    from .cli_serve import add_serve_demo

    add_serve_demo(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "max_batches", "sequences", "seq_len", "max_new_tokens", "threads"):
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
