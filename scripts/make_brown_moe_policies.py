"""Write the comparison policies for the embedded model (policies/brown-moe/), one per method and budget.

    python scripts/make_brown_moe_policies.py

Methods: uniform top-k reduction (Faster-MoE), Alloc-L (per-layer k by exact DP on
the measured profile), Alloc-L+T (Alloc-MoE), SERE re-routing on top of a uniform
k at the same budget, Alloc-MoE + SERE, and the per-token confidence rules top-p and
min-p (SER) with thresholds calibrated per layer to the uniform or the Alloc-L k.
Budgets 25%, 50%, 75% of top-8; plus SERE on the model's own top-8 (its published
setting). Profile, similarity and calibration trace were measured on the calibration
split (sgl-budget profile / similarity / record).
"""

from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "policies" / "brown-moe"
PROFILE = "profiles/brown-moe.sens.yaml"
SIM = "profiles/brown-moe.sim.safetensors"
CALIB = "../traces/brown-moe.calib.trace.safetensors"
SERE = f'reroute when decode {{\n    similarity "{SIM}"\n    primary top 1\n    min_similarity 0.0\n  }}'

METHODS = {
    "uniform": ("Faster-MoE: the same reduced top-k in every layer", "layers { allocate uniform }"),
    "alloc-l": ("Alloc-L: per-layer k by exact DP on the measured sensitivity profile",
                f'layers {{\n    allocate dp from "{PROFILE}"\n    k >= 1\n  }}'),
    "alloc-lt": ("Alloc-MoE (Alloc-L + Alloc-T): per-layer k, then slots reallocated across the batch's tokens",
                 f'layers {{\n    allocate dp from "{PROFILE}"\n    k >= 1\n  }}\n'
                 "  tokens {\n    reallocate by score\n    min_k 1\n    max_k 8\n  }"),
    "sere": ("SERE re-routing in decode on top of a uniform k at the same budget",
             "layers { allocate uniform }\n  " + SERE),
    "alloc-moe-sere": ("Alloc-MoE + SERE: per-layer k, token reallocation, and decode re-routing",
                       f'layers {{\n    allocate dp from "{PROFILE}"\n    k >= 1\n  }}\n'
                       "  tokens {\n    reallocate by score\n    min_k 1\n    max_k 8\n  }\n  " + SERE),
    "top-p": ("Top-p routing: each token keeps the fewest experts whose gate mass reaches p, p calibrated per layer "
              "so the mean is the uniform k", "layers { allocate uniform }\n"
              f'  tokens {{\n    top_p calibrated from "{CALIB}"\n    min_k 1\n    max_k 8\n  }}'),
    "alloc-l-top-p": ("Alloc-L + top-p: p calibrated per layer so the layer's mean is its Alloc-L k",
                      f'layers {{\n    allocate dp from "{PROFILE}"\n    k >= 1\n  }}\n'
                      f'  tokens {{\n    top_p calibrated from "{CALIB}"\n    min_k 1\n    max_k 8\n  }}'),
    "min-p": ("Relative threshold (SER / min-p): each token keeps the experts scoring >= t x its top expert's, t "
              "calibrated per layer so the mean is the uniform k", "layers { allocate uniform }\n"
              f'  tokens {{\n    min_p calibrated from "{CALIB}"\n    min_k 1\n    max_k 8\n  }}'),
    "alloc-l-min-p": ("Alloc-L + min-p: t calibrated per layer so the layer's mean is its Alloc-L k",
                      f'layers {{\n    allocate dp from "{PROFILE}"\n    k >= 1\n  }}\n'
                      f'  tokens {{\n    min_p calibrated from "{CALIB}"\n    min_k 1\n    max_k 8\n  }}'),
}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for method, (doc, body) in METHODS.items():
        for pct in (25, 50, 75):
            name = f"{method}-{pct}"
            (OUT / f"{name}.policy").write_text(
                f"# {doc}; {pct}% of the embedded model's top-8.\n"
                f'policy "{name}" {{\n  budget {pct}%\n  {body}\n}}\n')
    (OUT / "sere-own-k.policy").write_text(
        "# SERE as published: the model's own top-8, decode batches re-routed to similar primary experts.\n"
        f'policy "sere-own-k" {{\n  {SERE}\n}}\n')


if __name__ == "__main__":
    main()
