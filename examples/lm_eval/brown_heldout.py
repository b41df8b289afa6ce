"""Dataset loader for the ``brown_heldout`` lm-evaluation-harness task: the JSONL next to this file, so the task
runs offline from any working directory (no download, no Hugging Face cache).

brown_heldout.jsonl: passage i (i = 0..23) is lines 233*i+1 .. 233*i+4 of data/brown/test.txt.xz (the held-out
split) joined by spaces; ``line`` is the first of them.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "brown_heldout.jsonl"


def load(**_metadata):  # lm_eval passes the task metadata and model_args; none of them matter here
    import datasets

    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
