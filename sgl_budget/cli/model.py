"""Commands that run a real model in transformers, in this process: record, profile, similarity, eval."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import CliError
from .loaders import MIX_HELP, load_mixes, require_policies_or_mixes
from .output import eval_progress, print_eval, show_progress


SERVER_HELP = ("a running SGLang server launched with --moe-calibration (and the policies to measure): the engine "
               "routes and computes everything, so models too big for one process get it too")


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

    _require_model(args)
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
    if getattr(args, "server", None):
        from .server import cmd_profile_server

        return cmd_profile_server(args)
    from ..alloc import save_profile
    from ..engines.hf.profile import profile_layers

    _require_model(args)
    model, windows = _windows(args, args.calib)
    spec = _spec(model)
    prof = profile_layers(model, spec, windows, batch_size=args.batch_size, show_progress=show_progress(),
                          source=f"measured on {args.model}: mean next-token KL vs the full model, one layer at "
                                 f"k, on {windows.numel()} tokens of {args.calib}")
    save_profile(prof, args.out, header=f"Alloc-L sensitivity profile of {args.model} (sgl-budget profile)")
    print(f"wrote {args.out}: {len(prof.loss)} layers x k 1..{spec.top_k}")
    return 0


def cmd_similarity(args: argparse.Namespace) -> int:
    if getattr(args, "server", None):
        from .server import cmd_similarity_server

        return cmd_similarity_server(args)
    from ..engines.hf.similarity import expert_similarity
    from ..similarity import save_similarity

    _require_model(args)
    model, windows = _windows(args, args.calib)
    table = expert_similarity(model, _spec(model), windows, method=args.method, tokens=args.tokens,
                              batch_size=args.batch_size, show_progress=show_progress(),
                              source=f"measured on {args.model}: every expert's outputs on {args.tokens} "
                                     f"calibration tokens per layer of {args.calib} ({args.method}, SERE's method)")
    save_similarity(table, args.out)
    print(f"wrote {args.out}: {len(table.matrices)} layers, method {args.method}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if getattr(args, "server", None):
        from .server import cmd_eval_server

        return cmd_eval_server(args)
    from ..engines.hf.evaluate import evaluate
    from ..lang import load_policy

    _require_model(args)
    mix_specs = getattr(args, "mix", None)
    require_policies_or_mixes(args.policies, mix_specs)  # before the model loads
    model, windows = _windows(args, args.text)
    spec = _spec(model)
    policies = [load_policy(Path(p), spec) for p in args.policies]
    mixes = load_mixes(mix_specs, spec)
    results = evaluate(model, policies, windows, batch_size=args.batch_size, mode=args.mode,
                       progress=eval_progress(args.json), show_progress=show_progress(quiet=args.json), mixes=mixes)
    print_eval(results, args, f"{args.model}: {args.mode} evaluation on {windows.shape[0]} windows x "
                              f"{windows.shape[1]} tokens of {args.text}", Path(args.model).name, bool(mixes))
    return 0


def _require_model(args: argparse.Namespace) -> None:
    if not args.model:
        raise CliError("give --model DIR (a local transformers checkpoint) or --server URL (a running SGLang "
                       "server launched with --moe-calibration)")


def add_commands(sub) -> None:
    """``record``, ``profile``, ``similarity``, ``eval`` on a local transformers model."""
    model_help = "local transformers MoE model directory (config.json, weights, tokenizer)"

    def common(p, text_flag: str, windows: int, seq_len: int, batch: int, server: bool = False,
               logprobs: bool = True) -> None:
        if server:
            src = p.add_mutually_exclusive_group()
            src.add_argument("--model", help=model_help)
            src.add_argument("--server", metavar="URL", help=SERVER_HELP)
            p.add_argument("--tokenizer", help="with --server: a local copy of the served model's tokenizer (default: "
                                               "the server's tokenizer path, when it exists here)")
            if logprobs:
                p.add_argument("--logprobs", type=int, default=32, metavar="N",
                               help="with --server: KL to stock over the union of stock's N most likely next tokens "
                                    "at each position of a window, plus one bucket for the rest (a lower bound; "
                                    "default %(default)s)")
        else:
            p.add_argument("--model", required=True, help=model_help)
        p.add_argument(text_flag, required=not server,
                       help="text file (.txt or .txt.xz; documents separated by blank lines)")
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
    common(p, "--calib", 32, 256, 8, server=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_profile)

    s = sub.add_parser("similarity", help="SERE: expert similarity from expert outputs -> safetensors")
    common(s, "--calib", 32, 256, 8, server=True, logprobs=False)
    s.add_argument("--method", choices=["frobenius", "cosine", "cka"], default="frobenius")
    s.add_argument("--tokens", type=int, default=2048, help="calibration tokens per layer")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_similarity)

    e = sub.add_parser("eval", help="quality and cost of policies on a real model vs full top-k")
    e.add_argument("policies", nargs="*", help=".policy files (with --server: sent to it as policy text, compiled "
                                               "against the served model)")
    e.add_argument("--mix", action="append", metavar="PART[,PART...]",
                   help=MIX_HELP + "; also reported: each policy of the mix on its own rows")
    common(e, "--text", 32, 128, 16, server=True)
    e.add_argument("--policies", dest="policies_names", metavar="A,B", help="with --server: which of its served policies to evaluate "
                                                     "(default: every policy it offers; `sgl-budget eval --server URL "
                                                     "--list` shows them)")
    e.add_argument("--list", action="store_true", help="with --server: list the server's policies and exit")
    e.add_argument("--mode", choices=["decode", "prefill"], default="decode",
                   help="decode: B sequences decoded in lock-step with a KV cache (default); prefill: whole windows")
    e.add_argument("--plot", help="write a PNG of perplexity against experts per token and per decode batch")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)
