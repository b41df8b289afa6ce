"""SGLang integration: ``--moe-policy`` on the stock launcher through SGLang's plugin entry points.

Installed with ``pip install "sgl-budget[sglang]"``; SGLang discovers
:func:`sgl_budget.engines.sglang.plugin.register` through the ``sglang.srt.plugins``
entry point. Supported SGLang versions: :data:`SUPPORTED_SGLANG`.
"""

SUPPORTED_SGLANG = ("0.5.23",)
