"""Commands on policy files and model specs, no model needed: check, families, explain, allocate."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from ..errors import PolicyError
from .errors import EXIT_BAD_INPUT, CliError
from .loaders import SPEC_HELP, budget_arg
from .loaders import spec as load_spec
from .output import console


def cmd_check(args: argparse.Namespace) -> int:
    """Check policies for a model and an engine; every error of every file, as text, gcc lines or JSON."""
    from ..errors import Diagnostic
    from ..lang.limits import limits_for, load_for_engine

    spec = load_spec(args.model_spec)
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
    from ..families import engine_refusal

    return engine_refusal(engine, spec.model_type) if spec.model_type else None


def _check_launch(args: argparse.Namespace, spec, diags: list) -> list[str] | None:
    """The policies of a launch (``--moe-policy``, ``--moe-named-policy``) as the server checks them before any
    worker starts: names (invalid, reserved, repeated) and every file; the names requests may give, or None."""
    from ..lang.limits import limits_for, load_for_engine
    from ..lang.policy_set import load_policy_set, parse_named

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
    from ..families import support_markdown, support_rows

    if args.json:
        print(json.dumps(support_rows(), indent=2))
    else:
        print(support_markdown(), end="")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from ..explain import explain_policy
    from ..lang import load_policy

    spec = load_spec(args.model_spec)
    ir = load_policy(Path(args.policy), spec)
    trace = None
    if args.trace:
        from ..traces import TraceError, load_trace

        try:
            trace = load_trace(args.trace)
        except TraceError as e:
            raise CliError(str(e)) from None
    try:
        explain_policy(ir, as_json=args.json, console=console(), trace=trace)
    except ValueError as e:
        raise CliError(str(e)) from None
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
    from ..alloc import allocate_dp, load_profile

    prof = load_profile(args.profile)
    for warning in prof.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    top_k = int(prof.model["top_k"])
    per_token = budget_arg(args.budget, top_k)
    total = int(per_token * len(prof.loss) + 1e-9)
    try:
        alloc = allocate_dp(prof.loss, total, min_k=args.min_k, max_k=args.max_k)
    except ValueError as e:
        raise CliError(f"cannot allocate: {e}") from None
    title, table, summary = _allocate_table(args, prof, alloc, total)
    out = console()
    out.print(title, soft_wrap=True, highlight=False)
    out.print(table)
    out.print(summary, soft_wrap=True, highlight=False)  # one line: no wrapping inside a table caption
    if args.out:
        command = " ".join(["sgl-budget allocate", "--profile", str(args.profile), "--budget", args.budget,
                            "--min-k", str(args.min_k)] + (["--max-k", str(args.max_k)] if args.max_k else []))
        text = _plan_policy(_policy_name(args.out), args.budget.strip(), dict(alloc.k), command, summary)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}: a policy with this plan's k per layer (check it with sgl-budget check)")
    return 0



def add_commands(sub) -> None:
    """``check``, ``families``, ``explain``, ``allocate``."""
    spec_help = SPEC_HELP
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
    e.add_argument("--trace", help="a router-logit trace: show the experts per token each layer routes on its tokens "
                                   "(the distribution of a per-token confidence rule)")
    e.set_defaults(func=cmd_explain)

    a = sub.add_parser("allocate", help="Alloc-L: exact per-layer k from a sensitivity profile")
    a.add_argument("--profile", required=True, help="sensitivity profile YAML (docs/formats.md)")
    a.add_argument("--budget", required=True, help="50%% of top-k, or 3.0 experts per token")
    a.add_argument("--min-k", type=int, default=1, help="smallest k of any layer (default %(default)s)")
    a.add_argument("--max-k", type=int, default=None, help="largest k of any layer (default: the profile's)")
    a.add_argument("--out", help="write the plan as a ready .policy file (layers { layer N: k = K ... })")
    a.set_defaults(func=cmd_allocate)
