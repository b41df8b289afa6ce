"""SGLang's torch-native MoE forward (``moe_forward_native``, the CPU engine's MoE path without AMX) taught to
skip id -1, so a policy that routes fewer experts computes fewer, and expert parallelism works on CPU.

``moe_forward_native`` indexes expert weights by id, so without this a padded slot needs a real
expert with weight 0 — which the CPU still computes: at batch 1, uniform top-4 of top-8 then ran
8 experts per token and was no faster than stock. With the hook, the policy's routing pads with
-1 on this path (as on CUDA runners) and only the kept (token, expert) pairs are computed, by
SGLang's own function on a compacted problem: every kept slot becomes a one-slot row, so the
expert math (activation, biases, dtype handling) is SGLang's, unchanged. Inputs without -1 go
to SGLang's function untouched (bit-for-bit stock). A fixed-k layer's routing is SGLang's own top-k
at that k, left at width k on this path (:meth:`.routing.PolicyRouting.select_experts`; the function
takes any width): it has no -1 and goes to SGLang's function as it is, exactly stock's computation at
that k, with no compaction. A single token's kept slots (batch-1 decode) are likewise a narrower input
of the same form.

Expert parallelism (``--ep-size N``): SGLang's ``StandardDispatcher.dispatch`` maps the global ids
to this rank's local ones (``local_expert_mapping``: experts ``[r*E/N, (r+1)*E/N)`` become
``0..E/N-1``, every other expert -1, a -1 stays -1), each rank computes its own experts and the
model all-reduces the partial sums. ``moe_forward_native`` cannot take that -1 (its ``scatter_``
raises "index -1 is out of bounds"), so stock SGLang 0.5.23 fails under EP on CPU; in a CPU-mode
worker (:func:`.cpu.register_worker_hooks`) this hook is registered for every launch, with or
without a policy. A rank none of whose (token, expert) pairs is local — common under EP at small
batches, more so with a policy — contributes exact zeros.
"""

from __future__ import annotations

import torch

TARGET = "sglang.srt.layers.moe.fused_moe_native.moe_forward_native"
_registered = False  # this process's moe_forward_native skips -1 (set by register())
_skips: bool | None = None  # native_path_skips_minus_one's answer once registered


def moe_forward_skip_padding(original, layer, x, topk_output, moe_runner_config, *args, **kwargs):
    topk_weights, topk_ids, router_logits = topk_output
    keep = topk_ids >= 0
    tokens, width = topk_ids.shape
    if tokens and bool(keep.all()):  # CPU path: a host read is free
        return original(layer, x, topk_output, moe_runner_config, *args, **kwargs)
    if tokens == 1 and bool(keep.any()):  # one token (batch-1 decode): its kept slots are a narrower problem
        sel = keep[0]
        narrow = type(topk_output)(topk_weights[:, sel], topk_ids[:, sel], router_logits)
        return original(layer, x, narrow, moe_runner_config, *args, **kwargs)
    slots = torch.nonzero(keep.reshape(-1)).squeeze(1)
    if slots.numel() == 0:  # no local pair on this rank (EP), or no tokens: SGLang's function cannot take an
        return x.new_zeros(tokens, x.shape[-1])  # empty problem ("cannot reshape tensor of 0 elements")
    compact = type(topk_output)(torch.ones(slots.numel(), 1, dtype=topk_weights.dtype, device=x.device),
                                topk_ids.reshape(-1)[slots].unsqueeze(1), router_logits)
    per_slot = original(layer, x[slots // width], compact, moe_runner_config, *args, **kwargs)  # [kept, H]
    out = x.new_zeros(tokens * width, x.shape[-1])
    out[slots] = per_slot
    # combine exactly as moe_forward_native does (a padded or non-local slot adds an exact 0)
    return (out.view(tokens, width, -1).type(topk_weights.dtype).mul_(topk_weights.unsqueeze(-1)).sum(dim=1)
            .type(x.dtype))


def native_path_skips_minus_one() -> bool:
    """Whether this worker's CPU MoE path is ``moe_forward_native`` with the hook (registered, no AMX kernels)."""
    global _skips
    if not _registered:
        return False
    if _skips is None:  # the CPU's AMX support does not change while a worker runs
        from sglang.srt.utils.common import cpu_has_amx_support

        _skips = not cpu_has_amx_support()
    return _skips


def register() -> None:
    """Install the hook in this process, once (CPU-mode workers always; the plugin in every worker that routes
    with a policy)."""
    global _registered
    if _registered:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, moe_forward_skip_padding, HookType.AROUND)
    _registered = True
