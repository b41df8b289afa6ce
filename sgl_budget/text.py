"""Text for quality measurements: read a corpus file and cut it into fixed-length token windows.

Shared by the transformers path and the server path, so both measure the very same windows.
"""

from __future__ import annotations

import lzma
from pathlib import Path

import torch
from torch import Tensor


def read_text(path: str | Path) -> str:
    """Plain text from a ``.txt`` or ``.txt.xz`` file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such text file")
    if p.suffix == ".xz":
        with lzma.open(p, "rt", encoding="utf-8") as f:
            return f.read()
    return p.read_text(encoding="utf-8")


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
