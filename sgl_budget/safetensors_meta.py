"""safetensors files that carry one JSON metadata entry (traces, similarity tables)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor


def save_with_meta(tensors: dict[str, Tensor], path: str | Path, key: str, meta: dict) -> Path:
    """Write ``tensors`` with ``meta`` as JSON under metadata ``key`` (creating parent directories)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={key: json.dumps(meta)})
    _as_umask_allows(out)
    return out


def _as_umask_allows(path: Path) -> None:
    """Give the file the permissions any new file gets (safetensors creates it 0600: unreadable to the other
    users of a shared trace or similarity file)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def read_with_meta(path: str | Path, key: str) -> tuple[dict[str, Tensor], str | None]:
    """All tensors and the raw metadata entry ``key`` (None if absent).

    Raises ``SafetensorError`` / ``OSError`` / ``ValueError`` for files that are not safetensors;
    callers turn them into their own error type.
    """
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(key)
        return {k: f.get_tensor(k) for k in f.keys()}, raw
