"""Triton kernels for budgeted routing (shipped in the wheel as ``sgl_budget.kernels``).

Each kernel has a pure-torch specification in :mod:`sgl_budget.routing`.
"""
