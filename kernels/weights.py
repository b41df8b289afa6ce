"""The router's weight rule inside a kernel: renormalise a token's kept slots, then scale.

Triton twin of :func:`sgl_budget.routing.scoring.finalize_weights` for slots with a
validity mask (zero weight on padding, no NaN for a token without any weight).
"""

import triton
import triton.language as tl


@triton.jit
def finalize_weights(w, RENORM: tl.constexpr, EPS: tl.constexpr, SCALE: tl.constexpr):
    """``w [BLOCK_T, SLOTS]`` (zeros on padded slots) -> final slot weights."""
    if RENORM:
        den = tl.sum(w, 1) + EPS
        den = tl.where(den > 0, den, 1.0)
        w = w / den[:, None]
    return w * SCALE
