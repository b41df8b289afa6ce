"""The ``sgl-budget`` command line: one module per group of verbs over shared pieces, imports one way.

    errors, output, loaders      what every command shares (clean errors + exit 2, consoles, inputs)
    policy                       check, families, explain, allocate       (policy files, no model)
    replay                       replay, trace synth|info                 (recorded traces, no model)
    model                        record, profile, similarity, eval        (a transformers model, in process)
    server                       eval|profile|similarity|tune --server    (a running SGLang server, over HTTP)
    demo, serve_demo             the embedded model's demos

Bad input of any kind ends with a compiler-style message on stderr and exit status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import demo, model, policy, replay, serve_demo, server
from .errors import EXIT_BAD_INPUT, CliError, user_errors
from .loaders import DEMO_TRACE, EMBEDDED_TRACE, bundled_dir, default_model_dir

__all__ = ["main", "build_parser", "CliError", "EXIT_BAD_INPUT", "bundled_dir", "default_model_dir",
           "EMBEDDED_TRACE", "DEMO_TRACE"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgl-budget", description="Check, explain and replay MoE expert-activation policies.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for group in (policy, replay, model, server, demo, serve_demo):
        group.add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "max_batches", "sequences", "seq_len", "max_new_tokens", "threads"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        with user_errors():
            return int(args.func(args) or 0)
    except SystemExit as e:  # user_errors printed the message
        return int(e.code) if isinstance(e.code, int) else EXIT_BAD_INPUT
