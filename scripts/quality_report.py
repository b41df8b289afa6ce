"""Run the quality comparison on the embedded model and write the measured tables to docs/quality_tables.md.

    python scripts/quality_report.py [--windows 64 --seq-len 128 --batch-size 16]

Evaluates every policy in policies/brown-moe/ against full top-8 on held-out
Brown Corpus text (data/brown/test.txt.xz — never seen by training, profiling or
similarity), in the batched decode loop, and prints/writes the table, the plot
(docs/quality.png) and the per-layer expert-load entropy of the shipped trace.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from sgl_budget.cli import EMBEDDED_TRACE, bundled_dir, default_model_dir
from sgl_budget.cli.output import plot_quality
from sgl_budget.engines.hf import spec_of
from sgl_budget.engines.hf.data import load_model, read_text, token_windows
from sgl_budget.engines.hf.evaluate import evaluate
from sgl_budget.lang import load_policy
from sgl_budget.quality import EvalResult
from sgl_budget.replay import expert_load_entropy
from sgl_budget.traces import load_trace

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "docs" / "quality_tables.md"))
    ap.add_argument("--only", help="comma-separated method families to (re)measure, e.g. top-p,min-p; the other "
                                   "rows are kept from docs/quality_results.json, which must have been measured with "
                                   "the same settings (checked: full top-k must come out identical)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model_dir = default_model_dir()
    model, tok = load_model(model_dir)
    spec = spec_of(model)
    windows = token_windows(tok, read_text(ROOT / "data" / "brown" / "test.txt.xz"), args.seq_len, args.windows)
    order = ["uniform", "alloc-l", "alloc-lt", "top-p", "alloc-l-top-p", "min-p", "alloc-l-min-p", "sere", "alloc-moe-sere"]
    paths = [bundled_dir() / "brown-moe" / f"{m}-{p}.policy" for p in (25, 50, 75) for m in order]
    paths.append(bundled_dir() / "brown-moe" / "sere-own-k.policy")
    stored = ROOT / "docs" / "quality_results.json"
    keep: dict[str, EvalResult] = {}
    if args.only:
        only = set(args.only.split(","))
        keep = {d["name"]: EvalResult(**d) for d in json.loads(stored.read_text())}
        todo = [p for p in paths if p.stem.rsplit("-", 1)[0] in only]
    else:
        todo = paths
    t0 = time.time()
    results = evaluate(model, [load_policy(p, spec) for p in todo], windows, batch_size=args.batch_size,
                       mode="decode", progress=lambda r: print(f"  {r.name}: ppl {r.perplexity:.3f}", flush=True))
    minutes = (time.time() - t0) / 60
    if keep:
        old = keep["full top-k"]
        if (old.tokens, old.perplexity, old.unique_per_batch) != (results[0].tokens, results[0].perplexity,
                                                                 results[0].unique_per_batch):
            raise SystemExit(f"full top-k differs from the stored run ({old.perplexity} vs {results[0].perplexity}): "
                             "the settings differ; rerun without --only")
        new = {r.name: r for r in results}
        results = [results[0]] + [new.get(p.stem) or keep[p.stem] for p in paths]
    plot_quality(results, str(ROOT / "docs" / "quality.png"),
                 title=f"brown-moe, held-out Brown text, decode batches of {args.batch_size}")
    full = results[0]
    what = f"the {args.only} rows measured {time.strftime('%Y-%m-%d')} ({minutes:.1f} min), the others kept from " \
        "the stored run (full top-k reproduced exactly)" if args.only else f"measured {time.strftime('%Y-%m-%d')}, " \
        f"{minutes:.1f} min"
    lines = [
        f"{what[0].upper() + what[1:]} on {platform.machine()} CPU, torch {torch.__version__}. Held-out text: {full.tokens} next-token predictions from {args.windows} windows of "
        f"{args.seq_len} tokens of data/brown/test.txt.xz, decoded {args.batch_size} sequences per batch.",
        "",
        "| policy | experts/token | unique experts per decode batch | perplexity | Δ ppl vs full | top-1 acc | KL to full |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.name} | {r.activations_per_token:.2f} | {r.unique_per_batch:.1f} | {r.perplexity:.2f} | "
                     f"{r.perplexity - full.perplexity:+.2f} | {r.accuracy:.4f} | {r.kl_to_full:.4f} |")
    ent = sorted(expert_load_entropy(load_trace(bundled_dir() / "traces" / EMBEDDED_TRACE)).items())
    lines += ["", "Expert-load entropy per layer (top-8 routing on the shipped held-out trace, / log 64; "
              "1 = perfectly balanced):", "",
              "| layer | " + " | ".join(str(l) for l, _ in ent) + " |",
              "|---|" + "---|" * len(ent),
              "| entropy | " + " | ".join(f"{e:.3f}" for _, e in ent) + " |"]
    log = json.loads((model_dir / "train_log.json").read_text())
    lines += ["", f"Training: {log['steps']} steps, {log['tokens_seen']:,} tokens in {log['minutes']} min; "
              f"held-out perplexity at the end of training (fp32, 256-token windows): "
              f"{log['heldout_perplexity_fp32']:.2f}."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    (ROOT / "docs" / "quality_results.json").write_text(json.dumps([r.to_dict() for r in results], indent=1))


if __name__ == "__main__":
    main()
