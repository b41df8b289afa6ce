"""``sgl-budget serve-demo``: the stock SGLang server on CPU with and without a bundled policy, one request each.

Starts ``python -m sglang.launch_server --device cpu`` exactly as a user would (the policy
through ``--moe-policy``), sends the same greedy request over HTTP, prints both answers and
stops each server cleanly. Needs ``pip install "sgl-budget[sglang]"``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from .errors import CliError
from .loaders import bundled_dir, default_model_dir

DEFAULT_PROMPT = "In the morning the city council met to"


def _shown(cmd: list[str]) -> str:
    """The launch command as a user would type it (no interpreter path, no test port)."""
    out, skip = ["python"], False
    for a in cmd[1:]:
        if skip:
            skip = False
        elif a in ("--port", "--host"):
            skip = True
        else:
            out.append(a)
    return shlex.join(out)


def cmd_serve_demo(args: argparse.Namespace) -> int:
    try:
        import sglang  # noqa: F401
    except ImportError:
        raise CliError('serve-demo needs SGLang: pip install "sgl-budget[sglang]"') from None
    from ..engines.sglang.server import Server, ServerError

    model = Path(args.model) if args.model else default_model_dir()
    if not (model / "config.json").is_file():
        raise CliError(f"{model}: not a model directory (no config.json)")
    policy = Path(args.policy) if args.policy else bundled_dir() / "brown-moe" / "alloc-l-50.policy"
    if not policy.is_file():
        raise CliError(f"{policy}: no such policy file")
    answers = {}
    for label, pol in (("stock routing", None), (policy.stem, policy)):
        extra = [a for a in (args.sglang_args or []) if a != "--"]
        server = Server(model, policy=pol, device="cpu", dtype="float32", extra_args=extra)
        print(f"$ {_shown(server.command())}", flush=True)
        t0 = time.monotonic()
        try:
            with server:
                print(f"  ready in {server.started_s:.0f} s (log: {server.log_path})", flush=True)
                t1 = time.monotonic()
                reply = server.generate(args.prompt, args.max_new_tokens)
                dt = time.monotonic() - t1
        except ServerError as e:
            print(f"error: the SGLang server failed ({label}):\n{e}", file=sys.stderr)
            return 1
        answers[label] = reply["text"]
        n = reply["meta_info"]["completion_tokens"]
        print(f"  {label}: {n} tokens in {dt:.2f} s; server stopped after {time.monotonic() - t0:.0f} s in all")
    print(f"\nprompt: {args.prompt!r}")
    for label, text in answers.items():
        print(f"{label:>16}: {text!r}")
    same = len(set(answers.values())) == 1
    print("(the same text)" if same else "(the policy changed the continuation: it routes to fewer experts)")
    return 0


def add_commands(sub) -> None:
    """``serve-demo``."""
    d = sub.add_parser("serve-demo", help="start SGLang on CPU with and without a bundled policy on the embedded "
                                          "model, send a request, print both answers")
    d.add_argument("--model", default=None, help="model directory (default: the embedded models/brown-moe)")
    d.add_argument("--policy", default=None, help="policy file (default: the bundled brown-moe/alloc-l-50.policy)")
    d.add_argument("--prompt", default=DEFAULT_PROMPT, help="the request's text")
    d.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate (greedy; default %(default)s)")
    d.add_argument("sglang_args", nargs=argparse.REMAINDER,
                   help="after --: more flags for sglang.launch_server (e.g. -- --tp 2)")
    d.set_defaults(func=cmd_serve_demo)
