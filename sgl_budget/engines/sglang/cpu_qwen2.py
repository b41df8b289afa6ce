"""Pure-torch stand-ins for the Triton kernels SGLang's Qwen2-MoE block calls on every backend (CPU serving mode).

SGLang 0.5.23's ``Qwen2MoeSparseMoeBlock.forward`` (``srt/models/qwen2_moe.py``) adds the gated
shared-expert output with ``fused_gate_sigmoid_mul_add`` — a Triton kernel
(``sglang/kernels/ops/elementwise/elementwise.py``) — whenever the block has a shared-expert gate and
the gate is not on the AMX backend: also on the CPU engine without AMX, where Triton has no driver
("0 active drivers") and the first forward crashes. The same block serves ``qwen2_moe``,
``qwen3_next``, ``qwen3_5`` (MoE), ``qwen3_5_text`` and ``qwen4_exp``; it is the only caller, and its
out-of-place twin ``fused_gate_sigmoid_mul`` is called only on CUDA-only paths (dual stream,
deferred finalize) but is covered too.

:func:`register` (called by :func:`.cpu.register_worker_hooks` in the workers of a ``--device cpu``
launch) wraps both functions in their defining module with SGLang's ``HookRegistry``. That also
reaches ``qwen2_moe``'s own ``from ... import fused_gate_sigmoid_mul_add`` binding: the registry
rebinds every module already holding the original when it applies hooks, and a module imported later
copies the already-wrapped attribute. Tensors on the CPU get the torch version; any other device
still goes to SGLang's kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

MODULE = "sglang.kernels.ops.elementwise.elementwise"
TARGETS = (f"{MODULE}.fused_gate_sigmoid_mul_add", f"{MODULE}.fused_gate_sigmoid_mul")


def _gated(hidden_states: Tensor, gate_weight: Tensor, shared_output: Tensor) -> Tensor:
    """``sigmoid(hidden_states . gate_weight) * shared_output`` per row, in float32 (the kernel's arithmetic)."""
    num_tokens, hidden_dim = hidden_states.shape
    if tuple(gate_weight.shape) != (hidden_dim,) or tuple(shared_output.shape) != (num_tokens, hidden_dim):
        raise ValueError(f"fused_gate_sigmoid_mul: hidden_states {tuple(hidden_states.shape)}, gate_weight "
                         f"{tuple(gate_weight.shape)} (want ({hidden_dim},)), shared_output "
                         f"{tuple(shared_output.shape)} (want {(num_tokens, hidden_dim)})")
    # the kernel: one program per row, fp32 loads, tl.sum(h * w) (a reduction, no bias), tl.sigmoid, gate * s
    gate = torch.sigmoid((hidden_states.float() * gate_weight.float()).sum(dim=-1, keepdim=True))
    return gate * shared_output.float()


def fused_gate_sigmoid_mul_add(hidden_states: Tensor, gate_weight: Tensor, shared_output: Tensor,
                               final_hidden_states: Tensor) -> None:
    """``final_hidden_states += sigmoid(hidden_states @ gate_weight) * shared_output``, in place, returns None.

    Same contract as SGLang's Triton version: the gate is the row's dot product with ``gate_weight``
    (``[hidden]``; no bias), everything is computed in float32 and the sum is rounded once, to
    ``final_hidden_states``' dtype, when it is stored.
    """
    result = _gated(hidden_states, gate_weight, shared_output)
    result += final_hidden_states.float()
    final_hidden_states.copy_(result)


def fused_gate_sigmoid_mul(hidden_states: Tensor, gate_weight: Tensor, shared_output: Tensor) -> Tensor:
    """``sigmoid(hidden_states @ gate_weight) * shared_output`` as a new tensor like ``shared_output``."""
    return _gated(hidden_states, gate_weight, shared_output).to(shared_output.dtype)


def _on_cpu(t: Tensor) -> bool:
    return t.device.type == "cpu"


def mul_add_around(original, hidden_states, gate_weight, shared_output, final_hidden_states):
    if _on_cpu(hidden_states):
        return fused_gate_sigmoid_mul_add(hidden_states, gate_weight, shared_output, final_hidden_states)
    return original(hidden_states, gate_weight, shared_output, final_hidden_states)


def mul_around(original, hidden_states, gate_weight, shared_output):
    if _on_cpu(hidden_states):
        return fused_gate_sigmoid_mul(hidden_states, gate_weight, shared_output)
    return original(hidden_states, gate_weight, shared_output)


def register() -> None:
    """Register the stand-ins with SGLang's HookRegistry (applied by SGLang after the plugins load)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGETS[0], mul_add_around, HookType.AROUND)
    HookRegistry.register(TARGETS[1], mul_around, HookType.AROUND)
