"""sgl_budget's stand-in for ``sgl_kernel`` on machines without a CPU build of it (see sgl_budget.engines.sglang.cpu).

Put on ``sys.path`` only by ``--device cpu`` launches where the real package cannot load.
"""

from sgl_budget.engines.sglang.cpu_ops import IMPLEMENTED, assign_req_to_token_pool_cpu, missing_op  # noqa: F401

__version__ = "0.0.0+sgl_budget.cpu_stand_in"
SGL_BUDGET_STAND_IN = True


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return missing_op(name)
