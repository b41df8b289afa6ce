"""Progress bars for the long runs (eval, profile, similarity, record, demo, calibration through a server), on stderr."""

from __future__ import annotations

import sys


def bar(total: int, desc: str, enabled: bool, unit: str = "it"):
    """A tqdm bar on stderr that disappears when done (a no-op object when ``enabled`` is false)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, file=sys.stderr,
                dynamic_ncols=True)
