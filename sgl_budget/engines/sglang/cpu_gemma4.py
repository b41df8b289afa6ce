"""A pure-torch stand-in for Gemma 4's router input scaling on the CPU (CPU serving mode).

transformers 5.19's ``Gemma4TextRouter`` computes its logits as
``proj(rms_norm(x) * scale * hidden_size**-0.5)`` (an RMS norm without a weight, a learned per-dimension
``scale``, a constant). SGLang 0.5.23's ``Gemma4Router`` (``srt/models/gemma4_causal.py``) folds
``scale * root_size`` into its norm's ``weight`` buffer at the first forward (``fuse_scale``) and relies on the
norm to multiply it in — but that norm is a ``Gemma4RMSNorm(with_scale=False)``: its CUDA and XPU forwards
(``rmsnorm(x, weight)``) apply the fused weight, its native forward (the CPU engine without AMX, HIP) skips the
weight because ``with_scale`` is false. On the CPU the router therefore drops ``scale * hidden_size**-0.5``:
other logits, other experts than transformers and SGLang on CUDA route.

:func:`register` (called by :func:`.cpu.register_worker_hooks` in the workers of a ``--device cpu`` launch)
wraps ``Gemma4Router.forward`` with SGLang's ``HookRegistry``: on CPU tensors it computes transformers'
expression (the norm without weight, then ``* scale * hidden_size**-0.5`` as transformers multiplies them,
then the projection); any other device still runs SGLang's forward.
"""

from __future__ import annotations

from torch import Tensor

TARGET = "sglang.srt.models.gemma4_causal.Gemma4Router.forward"


def router_forward(original, self, x: Tensor, *args, **kwargs) -> Tensor:
    if x.device.type != "cpu":
        return original(self, x, *args, **kwargs)
    h = self.norm(x)  # RMS norm without a weight (with_scale=False): what SGLang's CPU path computes
    h = h * self.scale * self.hidden_size**-0.5  # Gemma4TextRouter: * self.scale * self.scalar_root_size
    logits, _ = self.proj(h)
    return logits


def register() -> None:
    """Register the stand-in with SGLang's HookRegistry (applied by SGLang after the plugins load)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, router_forward, HookType.AROUND)
