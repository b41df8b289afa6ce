"""Load a local transformers MoE checkpoint and turn text into fixed-length token windows."""

from __future__ import annotations

from pathlib import Path

import torch

from ...text import read_text, token_windows
from .experts import register

__all__ = ["load_model", "read_text", "token_windows"]


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a local directory (no download), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: not a model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, local_files_only=True).eval()
    # one padding-safe experts implementation for every run, so full top-k and policies compare like for like
    # (vectorised for decode batches: the eager loop made full top-k the slowest run, see experts.py)
    model.config._experts_implementation = register()
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    return model, tok
