"""The forward's phase and batch size, read from SGLang's forward batch inside a worker.

Every model forward in SGLang 0.5.23 — eager prefill/decode and CUDA-graph capture
alike — runs inside ``forward_context(ctx, forward_batch=fb)``, which publishes the
batch's bound ``moe_num_token_non_padded`` method; its ``__self__`` is the
``ForwardBatch``. Decode under CUDA graphs is captured once per padded batch size,
so a policy's batch conditions see that padded size: a graph captured for batch 16
runs the plan for batch 16 for every real batch it serves.
"""

from __future__ import annotations

from ...lang.ir import RouteContext


def current_forward_batch():
    """SGLang's current ``ForwardBatch``, or None outside a model forward."""
    try:
        from sglang.srt.model_executor.forward_context import get_forward_context, has_forward_context
    except ImportError:  # pragma: no cover - other SGLang versions
        return None
    if not has_forward_context():
        return None
    getter = get_forward_context().moe_num_token_non_padded
    return getattr(getter, "__self__", None)


_UNSET = object()


def route_context(num_tokens: int, fb=_UNSET) -> RouteContext:
    """Phase and batch size of the running forward (decode at batch = tokens when SGLang gives none).

    In a batch mixing policies this is the whole forward's: every policy's ``when`` conditions see it.
    """
    if fb is _UNSET:
        fb = current_forward_batch()
    if fb is None:
        return RouteContext("decode", max(1, num_tokens), max(1, num_tokens))
    mode = fb.forward_mode
    batch = max(1, int(getattr(fb, "batch_size", num_tokens) or num_tokens))
    if mode.is_decode():
        return RouteContext("decode", batch, max(1, num_tokens))
    return RouteContext("prefill", batch, max(batch, num_tokens))
