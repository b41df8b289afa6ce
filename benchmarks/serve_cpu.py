"""Decode speed of the real SGLang server on CPU: stock routing vs sgl_budget policies, in one run.

    python benchmarks/serve_cpu.py [--models brown-moe,wide-moe] [--repeats 3] [--json out.json]

For each model and policy the stock launcher is started (``--device cpu``, fp32), warmed up,
and asked for greedy continuations in lock-step batches of B = 1 and 16 prompts (one
``/generate`` call per batch). The decode time per step is the slope between a 1-token and an
N-token request, (t(N) - t(1)) / (N - 1), so prefill and HTTP overhead cancel; decode
tokens/s = B / step time. The median over ``--repeats`` runs is reported, with ratios to the
stock server measured in the same run.

Models: ``brown-moe`` (the embedded model: 8 layers, hidden 192, 64 experts of 64, top-8) and
``wide-moe`` — a Qwen3-MoE with RANDOM weights (speed only; its outputs mean nothing), shaped
so that expert weights dominate decode: 4 layers, hidden 1024, 64 experts of intermediate 512,
top-8. Policies for wide-moe use no profile (its layers are alike) and a SYNTHETIC similarity
file for SERE.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BROWN = ROOT / "models" / "brown-moe"
BROWN_POLICIES = ROOT / "policies" / "brown-moe"
WIDE = dict(hidden_size=1024, num_hidden_layers=4, num_experts=64, moe_intermediate_size=512, num_experts_per_tok=8,
            num_attention_heads=16, num_key_value_heads=4, head_dim=64, intermediate_size=2048, vocab_size=8192)

WIDE_POLICIES = {
    "uniform-50": 'policy "uniform-50" {\n  budget 50%\n  layers { allocate uniform }\n}\n',
    "alloc-t-50": 'policy "alloc-t-50" {\n  budget 50%\n  layers { allocate uniform }\n'
                  '  tokens { reallocate by score; min_k 1; max_k 8 }\n}\n',
    "sere-50": 'policy "sere-50" {\n  budget 50%\n  layers { allocate uniform }\n'
               '  reroute when decode {\n    similarity "wide-moe.synthetic.sim.safetensors"\n'
               '    primary top 1\n    min_similarity 0.0\n  }\n}\n',
}


def make_wide_model(directory: Path) -> Path:
    """A random-weight Qwen3-MoE checkpoint (seed 0) with the embedded model's tokenizer; cached in ``directory``."""
    import shutil

    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    d = directory / "wide-moe"
    if (d / "config.json").is_file():
        return d
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(**WIDE, tie_word_embeddings=False, norm_topk_prob=True, max_position_embeddings=1024,
                         decoder_sparse_step=1, mlp_only_layers=[])
    model = Qwen3MoeForCausalLM(cfg).eval()
    model.save_pretrained(d, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(BROWN / f, d / f)
    return d


def wide_policies(directory: Path, model: Path) -> dict[str, Path]:
    from sgl_budget.similarity import save_similarity, synthetic_similarity
    from sgl_budget.spec import load_spec

    spec = load_spec(model)
    save_similarity(synthetic_similarity(spec, seed=0), directory / "wide-moe.synthetic.sim.safetensors")
    out = {}
    for name, text in WIDE_POLICIES.items():
        (directory / f"{name}.policy").write_text(text)
        out[name] = directory / f"{name}.policy"
    return out


def step_time(server, prompts: list[list[int]], new: int) -> float:
    """Seconds per decode step for this batch: slope between a 1-token and a ``new``-token lock-step request."""

    def run(n: int) -> float:
        t0 = time.perf_counter()
        out = server.post("/generate", {"input_ids": prompts, "sampling_params": {
            "max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}})
        dt = time.perf_counter() - t0
        assert all(o["meta_info"]["completion_tokens"] == n for o in out)
        return dt

    return (run(new) - run(1)) / (new - 1)


def measure(model: Path, policy: Path | None, batches: list[int], new: int, repeats: int, prompt_len: int) -> dict:
    from sgl_budget.engines.sglang.server import Server

    with Server(model, policy=policy, env={"TRITON_INTERPRET": None}) as server:
        result = {"start_s": round(server.started_s, 1)}
        vocab = 8000
        for b in batches:
            times = []
            for r in range(repeats + 1):  # the first round warms up (and is discarded)
                # distinct prompts every round, so the radix cache never shortens a prefill
                prompts = [[(7 + 31 * (r * 97 + i) + 13 * j) % vocab + 100 for j in range(prompt_len)]
                           for i in range(b)]
                t = step_time(server, prompts, new)
                if r:
                    times.append(t)
            step = statistics.median(times)
            result[str(b)] = {"step_ms": round(step * 1e3, 2), "decode_tok_s": round(b / step, 1),
                              "runs_ms": [round(t * 1e3, 2) for t in times]}
    return result


def machine() -> dict:
    import sglang
    import torch

    cpu, ident = platform.processor(), {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "vendor_id", "cpu family", "model", "stepping") and key not in ident:
                ident[key] = value.strip()
            if not line.strip():  # the first processor's block is enough
                break
        cpu = ident.get("model name", cpu)
    except OSError:
        pass
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cpu_id": {k: ident[k] for k in ("vendor_id", "cpu family", "model", "stepping") if k in ident},
            "cores": n, "amx": "amx_tile" in flags, "avx512": "avx512f" in flags, "torch": torch.__version__,
            "sglang": sglang.__version__, "python": platform.python_version(),
            "omp_threads": os.environ.get("OMP_NUM_THREADS", "(sgl_budget CPU default)")}


def model_and_policies(name: str, work: Path) -> tuple[Path, dict[str, Path]]:
    """A model's checkpoint and every policy benchmarked on it (brown-moe: all of policies/brown-moe)."""
    if name == "wide-moe":
        model = make_wide_model(work)
        return model, wide_policies(work, model)
    return BROWN, {p.stem: p for p in sorted(BROWN_POLICIES.glob("*.policy"))}


def report(script: str, argv, args, results: dict, *lines: str) -> None:
    """Print the machine (CPU model, cores, versions), the command and ``lines``; the raw results to ``--json``."""
    command = f"python benchmarks/{script} {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip()
    info = machine()
    print(f"machine: {info}")
    print(f"command: {command}")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "command": command, "args": vars(args),
                                               "results": results}, indent=1))


def table(results: dict, batches: list[int]) -> str:
    lines = []
    for model, rows in results.items():
        lines.append(f"\n**{model}**\n")
        head = "| policy | " + " | ".join(f"B={b} step (ms) | B={b} decode tok/s | B={b} speedup" for b in batches) + " |"
        lines += [head, "|" + "---|" * (1 + 3 * len(batches))]
        stock = rows["stock"]
        for name, r in rows.items():
            cells = []
            for b in batches:
                x = r[str(b)]
                cells += [f"{x['step_ms']:.2f}", f"{x['decode_tok_s']:.1f}",
                          f"{stock[str(b)]['step_ms'] / x['step_ms']:.2f}x"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="brown-moe,wide-moe")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=33, help="tokens of the long request (default 33)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work-dir", default=None, help="where the random wide-moe checkpoint is kept")
    ap.add_argument("--json", default=None, help="write the raw results here")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    work = Path(args.work_dir or Path(tempfile.gettempdir()) / "sgl_budget_bench")
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Path | None]] = {}
    for m in args.models.split(","):
        if m == "brown-moe":
            runs[m] = {"stock": None, **{p: BROWN_POLICIES / f"{p}.policy" for p in
                                         ("uniform-50", "alloc-l-50", "alloc-lt-50", "sere-50", "alloc-moe-sere-50")}}
            runs[m]["_model"] = BROWN
        elif m == "wide-moe":
            model = make_wide_model(work)
            runs[m] = {"stock": None, **wide_policies(work, model), "_model": model}
        else:
            ap.error(f"unknown model {m!r}")
    results: dict[str, dict] = {}
    for m, pols in runs.items():
        model = pols.pop("_model")
        results[m] = {}
        for name, pol in pols.items():
            print(f"{m} / {name} ...", file=sys.stderr, flush=True)
            results[m][name] = measure(model, pol, batches, args.new_tokens, args.repeats, args.prompt_len)
            print(f"  {results[m][name]}", file=sys.stderr, flush=True)
    report("serve_cpu.py", argv, args, results, table(results, batches))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
