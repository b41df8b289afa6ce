"""Progress bars for the transformers runs (the shared :func:`sgl_budget.progress.bar`)."""

from ...progress import bar

__all__ = ["bar"]
