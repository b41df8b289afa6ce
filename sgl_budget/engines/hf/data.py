"""Load a local transformers MoE checkpoint and turn text into fixed-length token windows."""

from __future__ import annotations

import lzma
from pathlib import Path

import torch
from torch import Tensor

from .experts import register


def read_text(path: str | Path) -> str:
    """Plain text from a ``.txt`` or ``.txt.xz`` file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such text file")
    if p.suffix == ".xz":
        with lzma.open(p, "rt", encoding="utf-8") as f:
            return f.read()
    return p.read_text(encoding="utf-8")


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


def token_windows(tok, text: str, seq_len: int, max_windows: int | None = None) -> Tensor:
    """``[N, seq_len]`` non-overlapping windows over the documents (blank-line separated), in order."""
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    ids: list[int] = []
    for doc in text.split("\n\n"):
        if doc.strip():
            ids += tok(doc)["input_ids"] + [eos]
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has fewer than {seq_len} tokens")
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len)
