"""sgl_budget: declarative expert-activation budgets for Mixture-of-Experts serving."""

__version__ = "0.1.0"
