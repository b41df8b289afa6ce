"""Robust A/B of decode speed on CPU: a plain SGLang server and a policy server side by side, requests interleaved.

    python benchmarks/serve_cpu_ab.py [--model brown-moe|wide-moe] [--policies all|NAME,...] [--batches 1,16]
                                      [--rounds 12] [--json out.json]

Two servers run at once (the stock launcher, ``--device cpu``, fp32): a **plain** one (no sgl_budget flags)
and a **policy** server started with ``--moe-policy`` (the first policy) and every policy as
``--moe-named-policy NAME=PATH``. Each round measures, in a rotating order so that no arm always
follows another, the plain server and, on the policy server, requests naming ``stock`` and each
policy (``custom_params.moe_policy``). A measurement is the decode time per step of one lock-step
batch of B prompts: the slope between a 1-token and an N-token request, (t(N) - t(1)) / (N - 1), so
prefill and HTTP cancel. The first round warms up and is discarded. Reported per arm: median and
inter-quartile range over the rounds, and two ratios to the plain server — of the medians, and the
median of the per-round ratios (each arm against the plain measurement of its own round, which
cancels slow drifts of a shared machine).

Models as in ``serve_cpu.py``: ``brown-moe`` (the embedded model; ``all`` = every bundled
``policies/brown-moe/*.policy``) and ``wide-moe`` (RANDOM weights, speed only; uniform-50, alloc-t-50,
sere-50 with a SYNTHETIC similarity file).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_cpu import model_and_policies, report  # noqa: E402
from serve_cpu_mix import step_time  # noqa: E402

PLAIN, STOCK = "plain server", "stock"


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def summarise(times: dict[str, list[float]], batch: int) -> dict:
    base = times[PLAIN]
    out = {}
    for arm, ts in times.items():
        q1, med, q3 = quartiles(ts)
        paired = [b / t for b, t in zip(base, ts)]
        out[arm] = {"step_ms": round(med * 1e3, 2), "iqr_ms": [round(q1 * 1e3, 2), round(q3 * 1e3, 2)],
                    "decode_tok_s": round(batch / med, 1),
                    "speedup_of_medians": round(statistics.median(base) / med, 3),
                    "speedup_paired_median": round(statistics.median(paired), 3),
                    "runs_ms": [round(t * 1e3, 2) for t in ts]}
    return out


def run_batch(plain, server, arms: list[str], batch: int, rounds: int, new: int, prompt_len: int,
              seed: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(rounds + 1):  # round 0 warms up every arm (and is discarded)
        order = arms[r % len(arms):] + arms[:r % len(arms)]
        for i, arm in enumerate(order):
            # distinct prompts every measurement, so the radix cache never shortens a prefill
            base = seed + r * 7919 + i * 997
            prompts = [[(7 + 31 * (base + b) + 13 * j) % 8000 + 100 for j in range(prompt_len)] for b in range(batch)]
            names = [None if arm == PLAIN else arm] * batch  # the policy its requests pick (None: none)
            t = step_time(plain if arm == PLAIN else server, prompts, names, new)
            if r:
                times[arm].append(t)
        if r:
            print(f"  B={batch} round {r}: " + ", ".join(f"{a} {times[a][-1] * 1e3:.1f}" for a in arms),
                  file=sys.stderr, flush=True)
    return times


def table(results: dict, batches: list[int]) -> str:
    lines = []
    for b in batches:
        rows = results[str(b)]
        lines += [f"\n**B={b}** (median of {len(rows[PLAIN]['runs_ms'])} rounds)\n",
                  "| arm | step (ms), median | IQR (ms) | decode tok/s | speedup (of medians) | speedup (paired) |",
                  "|---|---|---|---|---|---|"]
        for arm, x in rows.items():
            lines.append(f"| {arm} | {x['step_ms']:.2f} | {x['iqr_ms'][0]:.2f}–{x['iqr_ms'][1]:.2f} | "
                         f"{x['decode_tok_s']:.1f} | {x['speedup_of_medians']:.2f}x | {x['speedup_paired_median']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from sgl_budget.engines.sglang.server import Server

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["brown-moe", "wide-moe"], default="brown-moe")
    ap.add_argument("--policies", default="all", help="policy names (brown-moe: files under policies/brown-moe)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=33)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--work-dir", default=None, help="where the random wide-moe checkpoint is kept")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    work = Path(args.work_dir or Path(tempfile.gettempdir()) / "sgl_budget_bench")
    work.mkdir(parents=True, exist_ok=True)
    model, available = model_and_policies(args.model, work)
    names = list(available) if args.policies == "all" else args.policies.split(",")
    unknown = [n for n in names if n not in available]
    if unknown:
        ap.error(f"unknown policies {unknown}; available: {sorted(available)}")
    named = [a for n in names for a in ("--moe-named-policy", f"{n}={available[n]}")]
    env = {"TRITON_INTERPRET": None}
    arms = [PLAIN, STOCK, *names]
    results: dict[str, dict] = {}
    print(f"starting a plain server and a policy server ({len(names)} policies) ...", file=sys.stderr, flush=True)
    with Server(model, env=env) as plain, Server(model, policy=available[names[0]], extra_args=named,
                                                   env=env) as server:
        for i, b in enumerate(batches):
            times = run_batch(plain, server, arms, b, args.rounds, args.new_tokens, args.prompt_len, 100000 * i)
            results[str(b)] = summarise(times, b)
    report("serve_cpu_ab.py", argv, args, results,
           f"model: {args.model}; policy server: --moe-policy {names[0]} + every policy named; arms interleaved",
           table(results, batches))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
