"""Commands measured by a running SGLang server (``--server URL``): eval, profile, tune, similarity.

The server (launched with ``--moe-calibration``) routes and computes; this side only cuts the text into
token windows with the served model's tokenizer, sends them, and writes the same tables, plots and files as
the transformers path (:mod:`.model`).
"""

from __future__ import annotations

import argparse
import sys
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
    from ..lang.inline import named_files

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
    loaded = set(listing["calibration"]["files"])
    for path in args.policies:
        ir = load_policy(Path(path), spec)  # checked here against the served model, before anything is sent
        text = Path(path).read_text(encoding="utf-8")
        missing = [n for n in named_files(text, str(path)) if n not in loaded]
        if missing:
            raise CliError(f"{path} names {', '.join(map(repr, missing))}, which the server did not load at launch: "
                           f"a policy sent to it may name only {sorted(loaded) or 'no files'} (launch the server "
                           "with a policy that loads the file, or send a policy without it)")
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


def cmd_similarity_server(args: argparse.Namespace) -> int:
    from ..engines.sglang.server_similarity import similarity_server
    from ..similarity import save_similarity

    client = _client(args)
    spec = _spec(client)
    windows = _windows(args, client, args.calib)
    table = similarity_server(client, spec, windows, method=args.method, tokens=args.tokens,
                              batch_size=args.batch_size, show_progress=show_progress(),
                              source=f"measured by the SGLang server at {args.server} ({spec.name}): every expert's "
                                     f"outputs on {args.tokens} calibration tokens per layer of {args.calib}, "
                                     f"computed in its workers on their weight shards ({args.method}, SERE's method)")
    save_similarity(table, args.out)
    print(f"wrote {args.out}: {len(table.matrices)} layers, method {args.method}")
    return 0




def _bound(args: argparse.Namespace):
    from ..engines.sglang.tune import Bound

    if (args.max_ppl_rise is None) == (args.max_kl is None):
        raise CliError("give one quality bound: --max-ppl-rise 2% (perplexity over stock) or --max-kl 0.02")
    if args.max_kl is not None:
        if not args.max_kl > 0:
            raise CliError(f"--max-kl must be a positive number of nats per token, not {args.max_kl}")
        return Bound("kl", args.max_kl)
    text = args.max_ppl_rise.strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise CliError(f"--max-ppl-rise {args.max_ppl_rise!r}: give a percentage such as 2%") from None
    if not 0 < value < 10:
        raise CliError(f"--max-ppl-rise {args.max_ppl_rise!r} must lie between 0% and 1000%")
    return Bound("ppl", value)


def _budgets(text: str) -> list[float]:
    try:
        got = [float(t.strip().rstrip("%")) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CliError(f"--budgets {text!r}: give percentages of top-k, e.g. 25,50,75") from None
    if not got or any(not 0 < b < 100 for b in got):
        raise CliError(f"--budgets {text!r}: each budget must lie strictly between 0% and 100% of top-k")
    return sorted(set(got))


def _similarity_file(args: argparse.Namespace, listing: dict) -> str | None:
    if args.no_sere:
        return None
    files = [f for f in listing["calibration"]["files"] if f.endswith(".sim.safetensors")]
    absolute = [f for f in files if Path(f).is_absolute()]
    return (absolute or files or [None])[0]


def cmd_tune(args: argparse.Namespace) -> int:
    from ..alloc import load_profile
    from ..engines.sglang.calibrate import profile_server
    from ..engines.sglang.tune import tune

    bound = _bound(args)
    budgets = _budgets(args.budgets)
    client = _client(args)
    spec = _spec(client)
    if args.profile:
        prof = load_profile(args.profile)
        if sorted(prof.loss) != sorted(spec.moe_layers) or int(prof.model.get("top_k", -1)) != spec.top_k:
            raise CliError(f"--profile {args.profile} was measured on {prof.model.get('name')}, not on the served "
                           f"{spec.name} (layers or top-k differ)")
    else:
        if not args.calib:
            raise CliError("give --calib FILE (text to profile the layers on) or --profile X.sens.yaml")
        calib = _windows(args, client, args.calib)
        prof = profile_server(client, spec, calib, batch_size=args.batch_size, top_n=args.logprobs,
                              show_progress=show_progress(quiet=args.json))
    windows = _windows(args, client, args.text)
    got = tune(client, spec, windows, prof.loss, bound, budgets=budgets, batch_size=args.batch_size,
               mode=args.mode, top_n=args.logprobs, similarity=_similarity_file(args, client.listing()),
               progress=eval_progress(args.json), show_progress=show_progress(quiet=args.json))
    _print_tune(args, spec, windows, got)
    if got.chosen is None:
        print(f"error: no candidate meets the bound ({bound.describe()}); relax it or add budgets", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(_tuned_policy(args, spec, windows, got))
        print(f"wrote {args.out}: serve it with --moe-policy {args.out} (or --moe-named-policy NAME={args.out})",
              file=sys.stderr if args.json else sys.stdout)
    return 0


def _print_tune(args: argparse.Namespace, spec, windows, got) -> None:
    import json

    from rich.table import Table

    from .output import console, plot_quality

    rows = list(zip(got.candidates, got.results, got.quality))
    if args.json:
        print(json.dumps({"bound": {"kind": got.bound.kind, "value": got.bound.value}, "stock": got.stock.to_dict(),
                          "chosen": None if got.chosen is None else got.candidates[got.chosen].name,
                          "pareto": [got.candidates[i].name for i in got.front],
                          "candidates": [{"name": c.name, "method": c.method, "budget_pct": c.budget_pct,
                                          "quality": q, **r.to_dict()} for c, r, q in rows]}, indent=2))
    else:
        t = Table(title=f"tune on {spec.name} at {args.server}: {windows.shape[0]} windows x {windows.shape[1]} "
                        f"tokens of {args.text}; {got.stock.phase}; bound: {got.bound.describe()}",
                  title_justify="left")
        for col in ("candidate", "act/token", "unique/batch", "perplexity", "Δ ppl", "KL to stock", "Pareto",
                    "meets bound"):
            t.add_column(col, justify="left" if col == "candidate" else "right")
        t.add_row("stock", f"{got.stock.activations_per_token:.3f}", f"{got.stock.unique_per_batch:.2f}",
                  f"{got.stock.perplexity:.3f}", "+0.00%", "0.0000", "", "")
        order = sorted(range(len(rows)), key=lambda i: (rows[i][1].activations_per_token, rows[i][1].unique_per_batch))
        for i in order:
            c, r, q = rows[i]
            mark = "← chosen" if i == got.chosen else ("yes" if q <= got.bound.value else "no")
            t.add_row(c.name, f"{r.activations_per_token:.3f}", f"{r.unique_per_batch:.2f}", f"{r.perplexity:.3f}",
                      f"{100 * (r.perplexity / got.stock.perplexity - 1):+.2f}%", f"{r.kl_to_full:.4f}",
                      "front" if i in got.front else "", mark)
        t.caption = f"KL to stock: {got.stock.kl_note}"
        t.caption_justify = "left"
        console().print(t)
    if args.plot:
        plot_quality([got.stock, *got.results], args.plot, title=f"{spec.name}: tune candidates ({args.mode}, batch "
                                                                 f"{args.batch_size})")
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)


def _tuned_policy(args: argparse.Namespace, spec, windows, got) -> str:
    from ..engines.sglang.tune import policy_text

    c, r = got.candidates[got.chosen], got.results[got.chosen]
    name = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "-"
                   for ch in Path(args.out).name.removesuffix(".policy")) or "tuned"
    front = ", ".join(got.candidates[i].name for i in got.front)
    header = [
        f"# Chosen by sgl-budget tune --server {args.server} on {spec.name}: the candidate with the fewest experts",
        f"# per token (then distinct experts per decode batch) whose quality meets: {got.bound.describe()}.",
        f"# Measured by the server on {windows.shape[0]} windows x {windows.shape[1]} tokens of {args.text},",
        f"# {got.stock.phase}: perplexity {r.perplexity:.4f} vs stock {got.stock.perplexity:.4f} "
        f"({100 * (r.perplexity / got.stock.perplexity - 1):+.2f}%), KL to stock {r.kl_to_full:.5f} (a lower bound),",
        f"# {r.activations_per_token:.3f} experts/token (stock {got.stock.activations_per_token:.3f}), "
        f"{r.unique_per_batch:.2f} distinct experts per batch (stock {got.stock.unique_per_batch:.2f}).",
        f"# Candidate {c.name} ({c.method}, budget {c.budget_pct:g}%) of {len(got.candidates)}; Pareto front: {front}.",
        "# Serve it with --moe-policy THIS_FILE, or per request with --moe-named-policy NAME=THIS_FILE.",
    ]
    return "\n".join(header) + "\n" + policy_text(name, c.text)


def add_commands(sub) -> None:
    """``tune`` (server only; ``eval`` and ``profile`` take ``--server`` in :mod:`.model`)."""
    t = sub.add_parser("tune", help="search policies on a running SGLang server (--moe-calibration) and write the "
                                    "cheapest that meets a quality bound")
    t.add_argument("--server", required=True, metavar="URL", help="a running SGLang server launched with "
                                                                  "--moe-calibration")
    t.add_argument("--text", required=True, help="held-out text to measure quality on (.txt or .txt.xz)")
    t.add_argument("--calib", help="text to measure the Alloc-L sensitivity profile on (not the held-out text)")
    t.add_argument("--profile", help="an Alloc-L profile already measured on this model (skips profiling)")
    bound = t.add_mutually_exclusive_group()
    bound.add_argument("--max-ppl-rise", metavar="PCT", help="the quality bound: perplexity at most PCT above stock "
                                                             "(e.g. 2%%)")
    bound.add_argument("--max-kl", type=float, metavar="NATS", help="the quality bound: mean KL to stock (a lower "
                                                                    "bound measured from top-N log-probabilities)")
    t.add_argument("--budgets", default="25,37.5,50,62.5,75", help="budgets to search, %% of top-k "
                                                                  "(default %(default)s)")
    t.add_argument("--mode", choices=["decode", "prefill"], default="decode",
                   help="decode: lock-step batches routed as decode steps (default); prefill: whole windows")
    t.add_argument("--no-sere", action="store_true", help="leave SERE re-routing out of the search")
    t.add_argument("--windows", type=int, default=16, help="windows of each text (default %(default)s)")
    t.add_argument("--seq-len", type=int, default=64, help="tokens per window (default %(default)s)")
    t.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default %(default)s)")
    t.add_argument("--logprobs", type=int, default=32, metavar="N", help="top-N log-probabilities for KL "
                                                                         "(default %(default)s)")
    t.add_argument("--tokenizer", help="a local copy of the served model's tokenizer (default: the server's path)")
    t.add_argument("--out", help="write the chosen policy here (a ready .policy file with a header saying how it "
                                 "was chosen)")
    t.add_argument("--plot", help="write a PNG of the candidates: perplexity vs experts per token and per batch")
    t.add_argument("--json", action="store_true", help="print the search as JSON")
    t.set_defaults(func=cmd_tune)
