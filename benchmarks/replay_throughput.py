"""Replay throughput in token-layers per second (a benchmark, not a test).

    python benchmarks/replay_throughput.py [--threads 1] [--tokens 16384] [--batch-size 16]

Replays each bundled policy alone (plus the stock baseline the report always
measures) on a SYNTHETIC DeepSeek-V2-Lite-shaped trace (64 experts, 26 MoE
layers) and prints token-layers routed per second, counting every policy and
the stock baseline. Records the device and torch version.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from sgl_budget.lang import load_policy
from sgl_budget.replay import replay
from sgl_budget.spec import PRESETS
from sgl_budget.traces import synthetic_trace

POLICIES = Path(__file__).resolve().parent.parent / "policies"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = PRESETS["deepseek-v2-lite"]
    seqs = max(args.batch_size, 64)
    trace = synthetic_trace(spec, num_sequences=seqs, seq_len=args.tokens // seqs, seed=1)
    print(f"device: CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"{args.threads} thread(s); SYNTHETIC trace: {trace.num_tokens} tokens x {len(trace.layers)} MoE layers")
    irs = [load_policy(path, spec) for path in sorted(POLICIES.glob("*.policy"))]
    token_layers = trace.num_tokens * len(trace.layers)

    def best_time(policies) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            replay(policies, trace, batch_size=args.batch_size)
            best = min(best, time.perf_counter() - t0)
        return best

    print(f"{'policy (replayed alone)':28s} {'token-layers/s':>16s}")
    for ir in irs:
        print(f"{ir.name:28s} {token_layers / best_time([ir]):16,.0f}")
    dt = best_time(irs)
    print(f"{'all ' + str(len(irs)) + ' in one replay':28s} {token_layers * len(irs) / dt:16,.0f}"
          "   (policy token-layers/s; scores and ranking shared)")
    print(f"best of {args.repeats}; each time includes scoring, the stock top-k baseline and all metrics")


if __name__ == "__main__":
    main()
