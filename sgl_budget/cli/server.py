"""Commands measured by a running SGLang server (``--server URL``): eval, profile.

The server (launched with ``--moe-calibration``) routes and computes; this side only cuts the text into
token windows with the served model's tokenizer, sends them, and writes the same tables, plots and files as
the transformers path (:mod:`.model`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import CliError
from .output import eval_progress, print_eval, show_progress


def _client(args: argparse.Namespace):
    from ..engines.sglang.client import ServerClient

    client = ServerClient(args.server)
    client.require_calibration()
    return client


def _spec(client):
    from ..spec import ModelSpec

    return ModelSpec.from_dict(client.model())


def _tokenizer(args: argparse.Namespace, client):
    """The served model's tokenizer, loaded here (windows are cut from its tokens), checked against the server's."""
    path = args.tokenizer or client.tokenizer_path()
    if not path or not Path(path).exists():
        raise CliError(f"--tokenizer: give a local copy of the served model's tokenizer (the server's tokenizer path "
                       f"{path!r} does not exist here)")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CliError("--server needs transformers for the tokenizer: pip install 'sgl-budget[hf]'") from None
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # a directory without tokenizer files, a bad file...
        raise CliError(f"--tokenizer {path}: cannot load a tokenizer: {e}") from None
    probe = "The quick brown fox jumps over the lazy dog. 1984, $3.50; naïve café."
    if tok(probe, add_special_tokens=False)["input_ids"] != client.tokenize([probe])[0]:
        raise CliError(f"the tokenizer at {path} does not tokenize like the server at {args.server}: is it the served "
                       "model's tokenizer?")
    return tok


def _windows(args: argparse.Namespace, client, text_path: str | None):
    from ..text import read_text, token_windows

    if not text_path:
        raise CliError("give the text to measure on (--text / --calib FILE)")
    tok = _tokenizer(args, client)
    try:
        return token_windows(tok, read_text(text_path), args.seq_len, args.windows)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise CliError(str(e)) from None


def _targets(args: argparse.Namespace, client, spec) -> list:
    """The policies to evaluate: ``--policies`` names (default every served one), then policy files as text."""
    from ..engines.sglang.calibrate import Target
    from ..lang import load_policy

    listing = client.listing()
    served = {p["name"]: p for p in listing["policies"]}
    if args.policies_names:
        names = [n.strip() for n in args.policies_names.split(",") if n.strip()]
        unknown = [n for n in names if n not in served]
        if unknown:
            raise CliError(f"--policies: the server does not serve {', '.join(map(repr, unknown))}; it serves "
                           f"{', '.join(served)}")
    elif args.policies:
        names = []
    else:  # every policy once (default is an alias of one of them), stock is the reference
        names = [n for n, p in served.items() if n not in ("stock", "default") and p.get("routes_as") == n]
        if served["default"]["routes_as"] not in names and served["default"]["routes_as"] != "stock":
            names.insert(0, "default")
    targets = [Target(n, served=n, budget=_budget(served[n])) for n in names]
    for path in args.policies:
        ir = load_policy(Path(path), spec)  # checked here against the served model, before anything is sent
        text = Path(path).read_text(encoding="utf-8")
        targets.append(Target(ir.name, text=text, budget=ir.budget_rules[0].value.experts_per_token
                              if ir.budget_rules else None))
    if not targets:
        raise CliError(f"the server at {args.server} serves no policy but stock: give --policies or policy files")
    return targets


def _budget(listed: dict) -> float | None:
    budgets = listed.get("budgets") or []
    return budgets[0]["experts_per_token"] if budgets else None


def cmd_eval_server(args: argparse.Namespace) -> int:
    from ..engines.sglang.calibrate import evaluate_server

    if getattr(args, "mix", None):
        raise CliError("--mix is not available with --server (give the server the policies to mix per request)")
    client = _client(args)
    if args.list:
        for p in client.listing()["policies"]:
            b = _budget(p)
            print(f"{p['name']:>16}  routes as {p['routes_as']}" + (f", budget {b:g} experts/token" if b else ""))
        return 0
    spec = _spec(client)
    targets = _targets(args, client, spec)
    windows = _windows(args, client, args.text)
    results = evaluate_server(client, targets, windows, batch_size=args.batch_size, mode=args.mode,
                              top_n=args.logprobs, progress=eval_progress(args.json),
                              show_progress=show_progress(quiet=args.json))
    print_eval(results, args, f"{spec.name} served at {args.server}: {args.mode} evaluation on {windows.shape[0]} "
                              f"windows x {windows.shape[1]} tokens of {args.text}", spec.name)
    return 0


def cmd_profile_server(args: argparse.Namespace) -> int:
    from ..alloc import save_profile
    from ..engines.sglang.calibrate import profile_server

    client = _client(args)
    spec = _spec(client)
    windows = _windows(args, client, args.calib)
    prof = profile_server(client, spec, windows, batch_size=args.batch_size, top_n=args.logprobs,
                          show_progress=show_progress(),
                          source=f"measured by the SGLang server at {args.server} ({spec.name}): mean next-token KL "
                                 f"vs stock, one layer at k, on {windows.numel()} tokens of {args.calib} (KL over "
                                 f"the union of stock's top-{args.logprobs} tokens + one bucket: a lower bound)")
    save_profile(prof, args.out, header=f"Alloc-L sensitivity profile of {spec.name}, measured by the server "
                                        "(sgl-budget profile --server)")
    print(f"wrote {args.out}: {len(prof.loss)} layers x k 1..{spec.top_k}")
    return 0


