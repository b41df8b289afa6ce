"""Pure-torch stand-ins for the Triton kernels of MiniMax-M2's QK-norm (CPU serving mode).

SGLang 0.5.23's ``MiniMaxM2Attention`` (``srt/models/minimax_m2.py``, model_type ``minimax_m2``)
normalises q and k right after the QKV projection when ``use_qk_norm`` is true (every published
MiniMax-M2 / M2.1 config; ``qk_norm_type`` "per_layer"). ``MiniMaxM2QKRMSNorm`` picks its forward
once, at construction: a fused all-reduce version on CUDA with TP > 1, the ``sgl_kernel`` CPU ops
where the AMX backend is available, and otherwise ``_forward_naive`` — the CPU engine without a CPU
build of ``sgl_kernel`` (so: CPU serving here). ``_forward_naive`` calls two Triton launchers
defined in the same module, ``rms_sumsq_serial`` and ``rms_apply_serial``, which ``assert x.is_cuda``:
the first forward of any MiniMax-M2 layer fails with an ``AssertionError`` on the CPU.

Semantics (the kernels, one program per token row):

* ``rms_sumsq_serial(q, k)`` -> a float32 vector ``[B_padded]`` (``B_padded`` = ``2B`` rounded up
  to a multiple of 4, for a custom all-reduce's alignment): ``[0:B]`` = per-row sum of squares of
  ``q`` (all of this rank's heads together), ``[B:2B]`` the same for ``k``, computed in float32;
  the padding is left uninitialised there (zeros here). With attention TP the caller all-reduces it.
* ``rms_apply_serial(q, k, wq, wk, sum_sq, tp_world, eps)`` -> ``(q', k')``:
  ``x' = (x.float() * rsqrt(sum_sq_row / D / tp_world + eps) * w.float()).to(x.dtype)`` with ``D``
  the local width (``D * tp_world`` the full width).

That is one RMS norm over the concatenation of all heads' q (and one over all k heads) per token,
with one weight of width ``heads * head_dim`` — the norm transformers 5.19's ``MiniMaxM2Attention``
applies (``MiniMaxM2RMSNorm(num_attention_heads * head_dim)`` on ``q_proj``'s output, before
splitting heads and before RoPE). In float32 both compute the same expression; in half precision
transformers rounds the normalised value to the input dtype before multiplying by the weight, the
kernel (and this stand-in) rounds once, at the end.

:func:`register` (called by :func:`.cpu.register_worker_hooks` in the workers of a ``--device cpu``
launch) wraps both launchers in ``sglang.srt.models.minimax_m2`` with SGLang's ``HookRegistry``.
Their only caller, ``MiniMaxM2QKRMSNorm._forward_naive``, is in that module and looks them up as
module globals at call time, so the rebinding reaches it whenever the hooks are applied (before or
after the model is built). Tensors on the CPU get the torch version; any other device still goes to
SGLang's kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

MODULE = "sglang.srt.models.minimax_m2"
TARGETS = (f"{MODULE}.rms_sumsq_serial", f"{MODULE}.rms_apply_serial")


def _rows(x: Tensor, name: str) -> tuple[int, int]:
    if x.dim() != 2:
        raise ValueError(f"minimax_m2 qk-norm: {name} must be [tokens, width], got shape {tuple(x.shape)}")
    return x.shape[0], x.shape[1]


def rms_sumsq_serial(x1: Tensor, x2: Tensor) -> Tensor:
    """Per-row float32 sums of squares of ``x1`` then ``x2``, in a ``[ceil(2B / 4) * 4]`` float32 vector."""
    b, _ = _rows(x1, "q")
    b2, _ = _rows(x2, "k")
    if b != b2:
        raise ValueError(f"minimax_m2 qk-norm: q has {b} rows, k has {b2}")
    sum_sq = torch.zeros((b + b2 + 3) // 4 * 4, device=x1.device, dtype=torch.float32)
    x1f, x2f = x1.float(), x2.float()
    sum_sq[:b] = (x1f * x1f).sum(dim=-1)
    sum_sq[b:2 * b] = (x2f * x2f).sum(dim=-1)
    return sum_sq


def _apply(x: Tensor, w: Tensor, sum_sq: Tensor, tp_world: int, eps: float) -> Tensor:
    d = x.shape[1]
    if tuple(w.shape) != (d,):
        raise ValueError(f"minimax_m2 qk-norm: weight of shape {tuple(w.shape)} for rows of width {d}")
    # the kernel: fp32 sum_sq / D / tp_world + eps, rsqrt, x * inv_rms * w in fp32, one rounding on the store
    inv_rms = torch.rsqrt(sum_sq / d / tp_world + eps).unsqueeze(1)
    return (x.float() * inv_rms * w.float()).to(x.dtype)


def rms_apply_serial(x1: Tensor, x2: Tensor, w1: Tensor, w2: Tensor, sum_sq: Tensor, tp_world: int = 1,
                     eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """``(x1, x2)`` RMS-normalised per row with the sums of squares from :func:`rms_sumsq_serial` (all-reduced
    over ``tp_world`` attention-TP ranks, each holding ``1 / tp_world`` of the width), times ``w1`` / ``w2``."""
    b, _ = _rows(x1, "q")
    b2, _ = _rows(x2, "k")
    if b != b2:
        raise ValueError(f"minimax_m2 qk-norm: q has {b} rows, k has {b2}")
    if sum_sq.dtype != torch.float32 or sum_sq.dim() != 1 or sum_sq.shape[0] < 2 * b:
        raise ValueError(f"minimax_m2 qk-norm: sum_sq must be a float32 vector of at least {2 * b} entries, got "
                         f"{sum_sq.dtype} {tuple(sum_sq.shape)}")
    return _apply(x1, w1, sum_sq[:b], tp_world, eps), _apply(x2, w2, sum_sq[b:2 * b], tp_world, eps)


def _on_cpu(t: Tensor) -> bool:
    return t.device.type == "cpu"


def sumsq_around(original, x1, x2):
    if _on_cpu(x1):
        return rms_sumsq_serial(x1, x2)
    return original(x1, x2)


def apply_around(original, x1, x2, w1, w2, sum_sq, *args, **kwargs):
    if _on_cpu(x1):
        return rms_apply_serial(x1, x2, w1, w2, sum_sq, *args, **kwargs)
    return original(x1, x2, w1, w2, sum_sq, *args, **kwargs)


def register() -> None:
    """Register the stand-ins with SGLang's HookRegistry (applied by SGLang after the plugins load)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGETS[0], sumsq_around, HookType.AROUND)
    HookRegistry.register(TARGETS[1], apply_around, HookType.AROUND)
