"""Pure-torch versions of the ``sgl_kernel`` CPU ops SGLang's CPU engine calls on the plain generate path.

PyPI's ``sglang-kernel`` wheel is the CUDA build: on a machine without CUDA it fails to
import, and SGLang's CPU engine imports a few CPU ops from it at module level. With
``--device cpu`` on such a machine, sgl_budget puts a stand-in ``sgl_kernel`` package
ahead of the real one (see :mod:`.cpu`); it exposes the ops below and, for every other
name, a function that fails with a message naming the op instead of a crash deep in a
worker. Only what the non-speculative generate path needs is implemented.
"""

from __future__ import annotations

import torch
from torch import Tensor

IMPLEMENTED = ("assign_req_to_token_pool_cpu",)


class MissingCpuOp(NotImplementedError):
    """An ``sgl_kernel`` op that the CPU stand-in does not implement was called."""


def assign_req_to_token_pool_cpu(req_pool_indices: Tensor, req_to_token: Tensor, start_offset: Tensor,
                                 end_offset: Tensor, out_cache_loc: Tensor, pool_len: int) -> None:
    """``req_to_token[req_pool_indices[i], start[i]:end[i]] = `` the i-th run of ``out_cache_loc``, in place.

    Same contract as SGLang's Triton ``assign_req_to_token_pool`` kernel (``srt/mem_cache/allocation.py``):
    the runs of ``out_cache_loc`` are consecutive, request after request.
    """
    del pool_len  # the row length of req_to_token; the kernel needs it for pointer arithmetic, torch does not
    lengths = (end_offset - start_offset).to(torch.int64)
    total = int(lengths.sum())
    if total == 0:
        return
    rows = torch.repeat_interleave(req_pool_indices.to(torch.int64), lengths)
    run_start = torch.cumsum(lengths, 0) - lengths  # where each request's run begins in out_cache_loc
    within = torch.arange(total, device=lengths.device) - torch.repeat_interleave(run_start, lengths)
    cols = torch.repeat_interleave(start_offset.to(torch.int64), lengths) + within
    req_to_token[rows, cols] = out_cache_loc[:total].to(req_to_token.dtype)


def missing_op(name: str):
    """A stand-in for an op this module lacks: importable (SGLang imports some at module level), fails when called."""

    def op(*args, **kwargs):
        raise MissingCpuOp(
            f"sgl_kernel.{name} is not available: this machine has no CPU build of sgl-kernel, and sgl_budget's "
            f"pure-torch stand-in (for trying policies with --device cpu) implements only "
            f"{', '.join(IMPLEMENTED)}. The feature that called it (e.g. speculative decoding, hierarchical KV "
            f"cache, quantised CPU kernels) is not supported in this mode; turn it off, or install SGLang's CPU "
            f"build of sgl-kernel (https://docs.sglang.io/platforms/cpu_server.html).")

    op.__name__ = op.__qualname__ = name
    return op
