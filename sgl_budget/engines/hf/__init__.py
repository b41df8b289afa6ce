"""Hugging Face transformers adapter: apply a policy to a loaded MoE model (evaluation, recording, profiling)."""

from .adapter import FAMILIES, PolicyHandle, UnsupportedModel, apply_policy, moe_blocks, spec_of

__all__ = ["FAMILIES", "PolicyHandle", "UnsupportedModel", "apply_policy", "moe_blocks", "spec_of"]
