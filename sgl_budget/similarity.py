"""Expert-similarity file format (safetensors) read by a policy's ``reroute`` block.

INTERFACE (to be implemented):

    Tensors: "layer.{i}.similarity" float32 [E, E] per MoE layer i (real layer index),
    optional "layer.{i}.critical" int64 [E] = experts ranked most-critical first.
    Metadata (safetensors __metadata__): "sgl_budget.similarity" = JSON
    {"format": "sgl-budget-similarity/1", "model": {name, num_experts, moe_layers},
     "method": "frobenius|cosine|cka|...", "source": "...", "synthetic": bool}

    @dataclass(frozen=True)
    class SimilarityTable:
        matrices: dict[int, torch.Tensor]        # layer -> [E, E] float32, diag 1, values in [0, 1]
        critical: dict[int, torch.Tensor]        # layer -> ranking [E] int64 (derived if absent:
                                                 # experts sorted by their highest off-diagonal
                                                 # similarity, ascending; ties by index)
        method: str; source: str; synthetic: bool; path: str
        def check_against(self, spec: ModelSpec) -> list[str]

    class SimilarityFileError(ValueError): (message, path, hint=None)

    def load_similarity(path) -> SimilarityTable   # validates shapes, finiteness, range, layers
    def save_similarity(table_or_matrices, path, *, method, source, synthetic, model) -> None
    def synthetic_similarity(spec, seed=0) -> SimilarityTable   # labelled synthetic
"""
