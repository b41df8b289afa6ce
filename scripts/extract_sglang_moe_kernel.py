"""Writes SGLang's Triton ``fused_moe_kernel`` (and the one jit helper it calls) verbatim into one file.

The device machine has no sglang (and cannot install its dependencies), but the
benchmark should run SGLang's own grouped-GEMM kernel there. The kernel's source
needs only ``triton``/``tl`` and ``write_zeros_to_output``, so this copies those two
JIT functions out of the installed sglang (Apache-2.0), with a header naming the
origin and version:

    python scripts/extract_sglang_moe_kernel.py [OUT]   (default .gpu/sglang_fused_moe.py)
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

HEADER = '''"""SGLang {version}'s Triton fused_moe_kernel, extracted verbatim (do not edit).

Source: sglang/kernels/ops/moe/fused_moe_triton_kernels.py of the sglang {version} wheel
(Apache License 2.0, https://github.com/sgl-project/sglang). Written by
scripts/extract_sglang_moe_kernel.py of sgl_budget for benchmarks/moe_decode.py on machines
without sglang.
"""

import triton
import triton.language as tl

SGLANG_VERSION = "{version}"


'''


def extract(out: Path) -> Path:
    import sglang
    from sglang.kernels.ops.moe import fused_moe_triton_kernels as m

    def is_jit(obj) -> bool:  # a JITFunction, or its stand-in under TRITON_INTERPRET=1
        return callable(getattr(obj, "fn", None)) and hasattr(obj, "__getitem__")

    # the JIT functions the kernel calls (co_names also lists attribute names such as `.T`)
    names = sorted(n for n in m.fused_moe_kernel.fn.__code__.co_names if is_jit(vars(m).get(n)))
    if names != ["write_zeros_to_output"]:  # a new sglang: its kernel needs more than this copies
        raise SystemExit(f"fused_moe_kernel now also uses {names}: extend this script")
    parts = [inspect.getsource(m.write_zeros_to_output.fn), inspect.getsource(m.fused_moe_kernel.fn)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(HEADER.format(version=sglang.__version__) + "\n\n".join(parts))
    return out


if __name__ == "__main__":
    print(extract(Path(sys.argv[1] if len(sys.argv) > 1 else ".gpu/sglang_fused_moe.py")))
