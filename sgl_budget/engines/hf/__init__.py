"""Hugging Face transformers adapter: apply a policy to a loaded MoE model (evaluation, recording, profiling)."""

from .adapter import (FAMILIES, PolicyHandle, PolicyMixHandle, UnsupportedModel, apply_policy, apply_policy_mix,
                      moe_blocks, spec_of)

__all__ = ["FAMILIES", "PolicyHandle", "PolicyMixHandle", "UnsupportedModel", "apply_policy", "apply_policy_mix",
           "moe_blocks", "spec_of"]
