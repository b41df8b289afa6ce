"""Sensitivity profile format (YAML): per MoE layer, the quality loss at each k.

INTERFACE (to be implemented):

    @dataclass(frozen=True)
    class Profile:
        loss: dict[int, dict[int, float]]   # layer -> {k: loss}; loss >= 0, finite
        metric: str                         # e.g. "kl" or "ppl_delta"
        model: dict                         # {"name", "num_experts", "top_k", "moe_layers"}
        source: str                         # free text; "synthetic ..." for generated ones
        path: str = ""
        def check_against(self, spec: ModelSpec) -> list[str]   # problems, [] if compatible

    class ProfileError(ValueError):  # .line (1-based, or None) points into the YAML file
        def __init__(self, message: str, path: str, line: int | None = None, hint: str | None = None)

    def load_profile(path) -> Profile          # raises ProfileError for missing/malformed files
    def save_profile(profile, path) -> None
"""
