"""What every command shares about failure: :class:`CliError`, exit status 2 and the clean-message guard.

Bad input of any kind (policy, model spec, profile, trace, similarity file, server) ends with a
compiler-style message on stderr and exit status 2 — never a traceback.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

from ..errors import PolicyError
from ..spec import SpecError

EXIT_BAD_INPUT = 2


class CliError(Exception):
    """A bad command-line input that is not a policy (missing file, bad budget string, unreachable server...)."""


def _data_errors() -> tuple[type[Exception], ...]:
    """Data-file error types of the modules already imported (importing them here would pull in torch)."""
    found: list[type[Exception]] = [SpecError, CliError]
    for mod, name in (("sgl_budget.alloc.profile", "ProfileError"), ("sgl_budget.similarity", "SimilarityFileError"),
                      ("sgl_budget.traces", "TraceError"), ("sgl_budget.traces.format", "TraceError"),
                      ("sgl_budget.engines.sglang.client", "ServerError")):
        cls = getattr(sys.modules.get(mod), name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


@contextmanager
def user_errors():
    """Turn every expected user error into a clean message + exit 2."""
    try:
        yield
    except PolicyError as e:
        print(e.format(), file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except Exception as e:
        if not isinstance(e, _data_errors()):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
