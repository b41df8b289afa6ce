"""CPU serving: SGLang 0.5.23's CPU config padding on models with per-layer intermediate sizes (Hunyuan-A13B).

On the CPU engine, ``ModelRunner.load_model`` pads intermediate sizes for tensor parallelism
(``configs/update_config.py`` ``adjust_config_with_unaligned_cpu_tp`` → ``update_intermediate_size``),
which computes ``value % padding`` and fails on Hunyuan's ``moe_intermediate_size: [3072, ...]``
list ("unsupported operand type(s) for %: 'list' and 'int'"), even at ``--tp 1``. The hook below
(registered only in ``--device cpu`` workers, see :mod:`.cpu`) leaves a list that needs no padding
as it is (every layer's size already divides), and refuses one that would, naming the field;
every other case is SGLang's own function.
"""

from __future__ import annotations

TARGET = "sglang.srt.configs.update_config.update_intermediate_size"


def _value(model_config, attr_name: str):
    hf = getattr(model_config, "hf_config", None)
    for holder in (getattr(hf, "text_config", None), hf, model_config):
        if holder is not None and hasattr(holder, attr_name):
            return getattr(holder, attr_name)
    return None


def update_intermediate_size_lists(original, model_config, attr_name, intermediate_padding_size, *args, **kwargs):
    value = _value(model_config, attr_name)
    if isinstance(value, (list, tuple)):
        if all(int(v) % intermediate_padding_size == 0 for v in value):
            return model_config
        raise ValueError(f"sgl_budget CPU serving: {attr_name} {list(value)} has per-layer sizes that SGLang's CPU "
                         f"tensor parallelism would pad to a multiple of {intermediate_padding_size}; padding per-layer "
                         "lists is not supported (use a --tp that divides every layer's size)")
    return original(model_config, attr_name, intermediate_padding_size, *args, **kwargs)


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, update_intermediate_size_lists, HookType.AROUND)
