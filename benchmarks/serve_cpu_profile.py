"""Where a CPU decode step's time goes in the real SGLang server: py-spy samples of the scheduler process.

    python benchmarks/serve_cpu_profile.py [--model brown-moe|wide-moe] [--policy P] [--batch 16] [--seconds 15]

Starts the stock server on CPU (``--moe-policy P`` if given), keeps it decoding lock-step
batches, samples the scheduler (the process that runs the model) with py-spy, and reports the
share of samples whose stack is in the MoE experts (``moe_forward_native``), in routing
(``select_experts``, which runs sgl_budget's router under a policy), in attention, in
sampling/logits, and elsewhere (scheduling, Python overhead). Used to explain the serving ratios
in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_cpu import BROWN, make_wide_model  # noqa: E402

BUCKETS = [  # first match wins, checked from the innermost frame outwards
    ("experts (moe_forward_native)", ("moe_forward_native",)),
    ("routing (select_experts)", ("select_experts",)),
    ("attention", ("attention", "Attention")),
    ("logits + sampling", ("logits_processor", "LogitsProcessor", "sampler", "Sampler")),
    ("other model code (norms, embeddings, linear)", ("forward_decode", "forward_extend", "model_runner")),
]


def scheduler_pid(launcher_pid: int) -> int:
    out = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    for pid in out:
        name = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        if "scheduler" in name:
            return int(pid)
    raise RuntimeError(f"no scheduler child of {launcher_pid}: {out}")


def classify(stack: str) -> str:
    frames = stack.split(";")
    for label, keys in BUCKETS:
        if any(any(k in f for k in keys) for f in frames):
            return label
    return "scheduler and other"


def main(argv=None) -> int:
    from sgl_budget.engines.sglang.server import Server

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="brown-moe", choices=["brown-moe", "wide-moe"])
    ap.add_argument("--policy", default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=int, default=15)
    args = ap.parse_args(argv)
    model = BROWN if args.model == "brown-moe" else make_wide_model(Path(tempfile.gettempdir()) / "sgl_budget_bench")
    with Server(model, policy=args.policy, env={"TRITON_INTERPRET": None}) as server:
        stop = threading.Event()

        def load():
            r = 0
            while not stop.is_set():
                prompts = [[(11 + 37 * (r * 89 + i) + 7 * j) % 8000 + 100 for j in range(16)] for i in range(args.batch)]
                server.post("/generate", {"input_ids": prompts, "sampling_params": {
                    "max_new_tokens": 64, "temperature": 0.0, "ignore_eos": True}})
                r += 1

        t = threading.Thread(target=load, daemon=True)
        t.start()
        out = Path(tempfile.mkstemp(suffix=".txt")[1])
        pid = scheduler_pid(server.proc.pid)
        subprocess.run(["py-spy", "record", "--pid", str(pid), "--duration", str(args.seconds), "--rate", "200",
                        "--format", "raw", "--output", str(out), "--nonblocking"], check=True,
                       capture_output=True)
        stop.set()
        t.join()
    counts: collections.Counter = collections.Counter()
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit() and "idle" not in stack.lower():
            counts[classify(stack)] += int(n)
    total = sum(counts.values())
    print(f"{args.model}, policy {args.policy or 'stock'}, lock-step batches of {args.batch}, {total} samples:")
    for label, n in counts.most_common():
        print(f"  {label:48s} {100 * n / total:5.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
