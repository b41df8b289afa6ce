"""Regenerate the bundled SYNTHETIC data (DeepSeek-V2-Lite-shaped): profile, similarity file, demo trace.

    python scripts/make_synthetic_data.py

These files exist so policies can be checked and replayed offline before a real
model has been profiled or recorded. All are seeded and labelled synthetic.
"""

from pathlib import Path

from sgl_budget.alloc import save_profile, synthetic_profile
from sgl_budget.similarity import save_similarity, synthetic_similarity
from sgl_budget.spec import PRESETS
from sgl_budget.traces import synthetic_trace, write_trace

ROOT = Path(__file__).resolve().parent.parent / "policies"
SPEC = PRESETS["deepseek-v2-lite"]


def make_trace() -> Path:
    """The demo trace: 32 sequences x 24 tokens, fp16 (32 x 32 would exceed 3 MB)."""
    return write_trace(synthetic_trace(SPEC, num_sequences=32, seq_len=24, seed=0),
                       ROOT / "traces" / "deepseek-v2-lite.synthetic.trace.safetensors")


def main() -> None:
    save_profile(synthetic_profile(SPEC, seed=0), ROOT / "profiles" / "deepseek-v2-lite.synthetic.sens.yaml",
                 header="SYNTHETIC sensitivity profile (seeded, NOT measured on a model).\n"
                        "Regenerate: python scripts/make_synthetic_data.py")
    save_similarity(synthetic_similarity(SPEC, seed=0), ROOT / "profiles" / "deepseek-v2-lite.synthetic.sim.safetensors")
    make_trace()


if __name__ == "__main__":
    main()
