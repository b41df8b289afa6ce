"""Commands on recorded traces, no model needed: replay, trace synth, trace info."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import CliError
from .loaders import MIX_HELP, SPEC_HELP, load_mixes, require_policies_or_mixes
from .loaders import spec as load_spec
from .output import console


def run_replay(policy_paths: Sequence[str | Path], trace_path: str | Path, batch_size: int, phase: str,
               max_batches: int | None, plot: str | None, as_json: bool, per_layer: bool,
               mix_specs: Sequence[str] = ()) -> int:
    from ..lang import load_policy
    from ..replay import plot_report, replay
    from ..traces import load_trace

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
        out = console()
        report.render(out)
        if per_layer:
            report.render_layers(out)
    if plot:
        plot_report(report, plot)
        print(f"wrote {plot}", file=sys.stderr if as_json else sys.stdout)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    return run_replay(args.policies, args.trace, args.batch_size, args.phase, args.max_batches, args.plot,
                      args.json, args.layers, args.mix or ())


# -- trace -------------------------------------------------------------------

def cmd_trace_synth(args: argparse.Namespace) -> int:
    from ..traces import synthetic_trace, write_trace

    spec = load_spec(args.model_spec)
    trace = synthetic_trace(spec, num_sequences=args.sequences, seq_len=args.seq_len, seed=args.seed)
    write_trace(trace, args.out, dtype=args.dtype) if args.dtype else write_trace(trace, args.out)
    print(f"wrote {args.out}: SYNTHETIC trace (not recorded from a model) for {spec.name}, "
          f"{trace.num_tokens} tokens x {len(trace.layers)} MoE layers, seed {args.seed}")
    return 0


def _trace_info(path: str) -> dict:
    """A trace's metadata and per-layer expert-load entropy, as a JSON-ready dict."""
    from ..replay import expert_load_entropy
    from ..traces import load_trace

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



def add_commands(sub) -> None:
    """``replay`` and ``trace synth|info``."""
    spec_help = SPEC_HELP
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
