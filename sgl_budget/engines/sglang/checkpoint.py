"""Launch-time checks of a local checkpoint that SGLang would load wrongly without a word."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ...families import FAMILY_LIST

# SGLang 0.5.23 model classes that always build their own output layer and never tie it to the input
# embedding (srt/models/<type>.py; the families' sglang_never_ties); deepseek_v2 / qwen2 / qwen3 dense do tie.
NEVER_TIED = tuple(f.model_type for f in FAMILY_LIST if f.sglang_never_ties)
MAX_HEADER = 100 * 2**20


def _tensor_names(model_dir: Path) -> set[str] | None:
    """Names of the tensors in the checkpoint's safetensors files (headers only), or None if unreadable."""
    index = model_dir / "model.safetensors.index.json"
    try:
        if index.is_file():
            return set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
        names: set[str] = set()
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            return None
        for f in files:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > MAX_HEADER:
                    return None
                names |= set(json.loads(fh.read(n)))
        return names
    except (OSError, ValueError, struct.error, AttributeError):
        return None


def untied_head_problem(model_path: str | None) -> str | None:
    """A warning if SGLang would serve this local checkpoint with an untrained output layer, else None.

    A checkpoint with ``tie_word_embeddings: true`` and no ``lm_head.weight`` relies on the model tying
    its output layer to ``embed_tokens``; the SGLang classes in :data:`NEVER_TIED` do not, so the head
    stays uninitialised (every request answers the same token) and nothing says so.
    """
    if not model_path:
        return None
    d = Path(model_path)
    try:
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict) or cfg.get("model_type") not in NEVER_TIED or cfg.get("tie_word_embeddings") is not True:
        return None
    names = _tensor_names(d)
    if names is None or "lm_head.weight" in names:
        return None
    return (f"{model_path} has tie_word_embeddings: true and no lm_head.weight, but SGLang's {cfg['model_type']} "
            "model never ties its output layer to the embedding: it will serve an UNTRAINED output head (every "
            "request answers the same token). Save the checkpoint with an explicit lm_head.weight (a copy of "
            "model.embed_tokens.weight) and tie_word_embeddings: false.")
