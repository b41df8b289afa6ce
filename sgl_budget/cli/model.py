"""Commands that run a real model in transformers, in this process: record, profile, similarity, eval."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import CliError
from .loaders import MIX_HELP, load_mixes, require_policies_or_mixes
from .output import plot_quality, show_progress


def _windows(args, text_path: str):
    from ..engines.hf.data import load_model, read_text, token_windows

    threads = getattr(args, "threads", None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        model, tok = load_model(args.model)
        text = read_text(text_path)
        windows = token_windows(tok, text, args.seq_len, args.windows)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise CliError(str(e)) from None
    return model, windows


def _spec(model):
    from ..engines.hf import spec_of

    return spec_of(model)


def cmd_record(args: argparse.Namespace) -> int:
    from ..engines.hf.record import record_trace
    from ..traces import write_trace

    model, windows = _windows(args, args.text)
    trace = record_trace(model, _spec(model), windows, batch_size=args.batch_size, prefill_len=args.prefill_len,
                         show_progress=show_progress(),
                         source=f"recorded from {args.model} on {args.text} ({windows.shape[0]} x {windows.shape[1]} "
                                f"tokens, prefill {args.prefill_len}, decode batches of {args.batch_size})")
    write_trace(trace, args.out)
    print(f"wrote {args.out}: {trace.num_tokens} tokens x {len(trace.layers)} MoE layers "
          f"({int((trace.phase == 1).sum())} decode)")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from ..alloc import save_profile
    from ..engines.hf.profile import profile_layers

    model, windows = _windows(args, args.calib)
    spec = _spec(model)
    prof = profile_layers(model, spec, windows, batch_size=args.batch_size, show_progress=show_progress(),
                          source=f"measured on {args.model}: mean next-token KL vs the full model, one layer at "
                                 f"k, on {windows.numel()} tokens of {args.calib}")
    save_profile(prof, args.out, header=f"Alloc-L sensitivity profile of {args.model} (sgl-budget profile)")
    print(f"wrote {args.out}: {len(prof.loss)} layers x k 1..{spec.top_k}")
    return 0


def cmd_similarity(args: argparse.Namespace) -> int:
    from ..engines.hf.similarity import expert_similarity
    from ..similarity import save_similarity

    model, windows = _windows(args, args.calib)
    table = expert_similarity(model, _spec(model), windows, method=args.method, tokens=args.tokens,
                              batch_size=args.batch_size, show_progress=show_progress(),
                              source=f"measured on {args.model}: every expert's outputs on {args.tokens} "
                                     f"calibration tokens per layer of {args.calib} ({args.method}, SERE's method)")
    save_similarity(table, args.out)
    print(f"wrote {args.out}: {len(table.matrices)} layers, method {args.method}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..engines.hf.evaluate import evaluate
    from ..lang import load_policy

    mix_specs = getattr(args, "mix", None)
    require_policies_or_mixes(args.policies, mix_specs)  # before the model loads
    model, windows = _windows(args, args.text)
    spec = _spec(model)
    policies = [load_policy(Path(p), spec) for p in args.policies]
    mixes = load_mixes(mix_specs, spec)
    console = Console() if sys.stdout.isatty() else Console(width=160)

    def progress(r) -> None:
        if not args.json:
            print(f"  {r.name}: ppl {r.perplexity:.3f} ({r.seconds:.0f} s)", file=sys.stderr)

    results = evaluate(model, policies, windows, batch_size=args.batch_size, mode=args.mode, progress=progress,
                       show_progress=show_progress(quiet=args.json), mixes=mixes)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        full = results[0]
        t = Table(title=f"{args.model}: {args.mode} evaluation on {windows.shape[0]} windows x {windows.shape[1]} "
                        f"tokens of {args.text} ({full.tokens} predicted tokens, batch {args.batch_size})",
                  title_justify="left")
        for col in ("policy", "perplexity", "Δ ppl", "top-1 acc", "KL to full", "act/token", "unique experts/batch"):
            t.add_column(col, justify="left" if col == "policy" else "right")
        for r in results:
            ref = r.full_perplexity if r.full_perplexity is not None else full.perplexity  # a share: its rows
            t.add_row(f"  ↳ {r.name} (its rows)" if r.mix else r.name, f"{r.perplexity:.3f}",
                      f"{r.perplexity - ref:+.3f}", f"{r.accuracy:.4f}", f"{max(r.kl_to_full, 0.0):.4f}",
                      f"{r.activations_per_token:.3f}", f"{r.unique_per_batch:.2f}")
        if mixes:
            t.caption = ("mix: each batch's rows split between policies in the given shares; ↳: one policy of "
                         "the mix on its own rows (Δ ppl against full top-k on those rows); a mixed batch reads the "
                         "union of the experts its rows need")
            t.caption_justify = "left"
        console.print(t)
    if args.plot:
        plot_quality([r for r in results if not r.mix], args.plot,
                     title=f"{Path(args.model).name}: {args.mode}, batch {args.batch_size}")
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def add_commands(sub) -> None:
    """``record``, ``profile``, ``similarity``, ``eval`` on a local transformers model."""
    model_help = "local transformers MoE model directory (config.json, weights, tokenizer)"

    def common(p, text_flag: str, windows: int, seq_len: int, batch: int) -> None:
        p.add_argument("--model", required=True, help=model_help)
        p.add_argument(text_flag, required=True, help="text file (.txt or .txt.xz; documents separated by blank lines)")
        p.add_argument("--windows", type=int, default=windows, help="token windows to use (default %(default)s)")
        p.add_argument("--seq-len", type=int, default=seq_len, help="tokens per window (default %(default)s)")
        p.add_argument("--batch-size", type=int, default=batch, help="sequences per batch (default %(default)s)")
        p.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's; 1 is fastest for small models on a busy machine)")

    r = sub.add_parser("record", help="record router logits of a transformers model into a trace")
    common(r, "--text", 64, 128, 16)
    r.add_argument("--prefill-len", type=int, default=16, help="tokens of each window run as prefill")
    r.add_argument("--out", required=True)
    r.set_defaults(func=cmd_record)

    p = sub.add_parser("profile", help="Alloc-L: measure per-layer sensitivity (KL at each k) -> profile YAML")
    common(p, "--calib", 32, 256, 8)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_profile)

    s = sub.add_parser("similarity", help="SERE: expert similarity from expert outputs -> safetensors")
    common(s, "--calib", 32, 256, 8)
    s.add_argument("--method", choices=["frobenius", "cosine", "cka"], default="frobenius")
    s.add_argument("--tokens", type=int, default=2048, help="calibration tokens per layer")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_similarity)

    e = sub.add_parser("eval", help="quality and cost of policies on a real model vs full top-k")
    e.add_argument("policies", nargs="*", help=".policy files")
    e.add_argument("--mix", action="append", metavar="PART[,PART...]",
                   help=MIX_HELP + "; also reported: each policy of the mix on its own rows")
    common(e, "--text", 32, 128, 16)
    e.add_argument("--mode", choices=["decode", "prefill"], default="decode",
                   help="decode: B sequences decoded in lock-step with a KV cache (default); prefill: whole windows")
    e.add_argument("--plot", help="write a PNG of perplexity against experts per token and per decode batch")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)
