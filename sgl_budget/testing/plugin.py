"""pytest plugin for unit-testing policies on recorded router logits (fixtures and assertion helpers)."""
