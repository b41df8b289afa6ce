"""Launch settings shared by the one-program kernels (the whole batch in one Triton program)."""

import torch
import triton


def token_tile(num_tokens: int) -> int:
    """The power-of-two token extent of a whole-batch tile (at least 2, so that 1-token batches reduce too)."""
    return max(2, triton.next_power_of_2(max(num_tokens, 1)))


def whole_batch_warps(elements: int) -> int:
    """Warps for one program whose largest tile holds ``elements`` values: enough threads that the tiles stay
    in registers (at 4 warps ptxas spills from a few thousand values on; checked for sm_90)."""
    return 4 if elements <= 2048 else 8 if elements <= 8192 else 16


def as_int8_mask(row_mask: torch.Tensor, device) -> torch.Tensor:
    """A ``[T]`` row mask as the kernels read it (int8, contiguous): a bool mask is viewed, not copied, so the
    mixed path's per-policy masks add no cast kernel per layer."""
    m = row_mask.to(device=device)
    m = m.view(torch.int8) if m.dtype == torch.bool else m.to(torch.int8)
    return m.contiguous()
