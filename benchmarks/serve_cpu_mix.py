"""Decode speed of one SGLang server on CPU whose requests pick their policy, as the mix of a batch changes.

    python benchmarks/serve_cpu_mix.py [--model wide-moe] [--batch 16] [--repeats 3] [--json out.json]

Two servers are started with the stock launcher (``--device cpu``, fp32) in one run: a plain one
(no sgl_budget flags: the baseline) and one with ``--moe-named-policy fast=uniform-50`` (default:
the model's own routing). The second is asked for lock-step batches of B requests of which a
fraction names ``fast`` (``custom_params.moe_policy``) and the rest nothing (stock). The decode
step time is the slope between a 1-token and an N-token request (prefill and HTTP overhead cancel),
median over ``--repeats``; ratios are against the plain server measured in the same run. A batch
reads the union of the experts its rows need, so the saving should shrink as stock rows join.
Model: ``wide-moe`` from ``serve_cpu.py`` (random weights, expert weights dominate decode).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_cpu import BROWN, machine, make_wide_model, wide_policies  # noqa: E402

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)  # share of the batch's rows that pick "fast"


def step_time(server, prompts: list[list[int]], names: list[str | None], new: int) -> float:
    def run(n: int) -> float:
        params = [{"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True,
                   **({"custom_params": {"moe_policy": p}} if p else {})} for p in names]
        t0 = time.perf_counter()
        out = server.post("/generate", {"input_ids": prompts, "sampling_params": params})
        dt = time.perf_counter() - t0
        assert all(o["meta_info"]["completion_tokens"] == n for o in out)
        return dt

    return (run(new) - run(1)) / (new - 1)


def measure(server, batch: int, fraction: float | None, new: int, repeats: int, prompt_len: int, seed: int) -> dict:
    n_fast = 0 if fraction is None else round(fraction * batch)
    names = ["fast"] * n_fast + [None] * (batch - n_fast)
    times = []
    for r in range(repeats + 1):  # the first round warms up (and is discarded)
        # distinct prompts every round, so the radix cache never shortens a prefill
        prompts = [[(7 + 31 * (seed + r * 97 + i) + 13 * j) % 8000 + 100 for j in range(prompt_len)]
                   for i in range(batch)]
        t = step_time(server, prompts, names, new)
        if r:
            times.append(t)
    step = statistics.median(times)
    return {"fast_rows": n_fast, "step_ms": round(step * 1e3, 2), "decode_tok_s": round(batch / step, 1),
            "runs_ms": [round(t * 1e3, 2) for t in times]}


def main(argv=None) -> int:
    from sgl_budget.engines.sglang.server import Server

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["wide-moe", "brown-moe"], default="wide-moe")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=33)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    work = Path(args.work_dir or Path(tempfile.gettempdir()) / "sgl_budget_bench")
    work.mkdir(parents=True, exist_ok=True)
    if args.model == "wide-moe":
        model = make_wide_model(work)
        fast = wide_policies(work, model)["uniform-50"]
    else:
        model, fast = BROWN, BROWN.parent.parent / "policies" / "brown-moe" / "uniform-50.policy"
    env = {"TRITON_INTERPRET": None}
    results: dict[str, dict] = {}
    print("plain server (no sgl_budget flags) ...", file=sys.stderr, flush=True)
    with Server(model, env=env) as plain:
        results["plain stock server"] = measure(plain, args.batch, None, args.new_tokens, args.repeats,
                                                args.prompt_len, 0)
    with Server(model, extra_args=["--moe-named-policy", f"fast={fast}"], env=env) as server:
        for i, f in enumerate(FRACTIONS):
            print(f"fast share {f} ...", file=sys.stderr, flush=True)
            results[f"{int(f * 100)}% fast"] = measure(server, args.batch, f, args.new_tokens, args.repeats,
                                                       args.prompt_len, 1000 * (i + 1))
    base = results["plain stock server"]["step_ms"]
    info = machine()
    print(f"machine: {info}")
    print(f"command: python benchmarks/serve_cpu_mix.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"\n**{args.model}, B={args.batch}, fast = uniform-50 (k 8 -> 4), the rest stock**\n")
    print("| batch | fast rows | step (ms) | decode tok/s | speedup vs plain server |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['fast_rows']} | {r['step_ms']:.2f} | {r['decode_tok_s']:.1f} | {base / r['step_ms']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
