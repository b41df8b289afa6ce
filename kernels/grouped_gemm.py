"""A Triton grouped-GEMM MoE layer over the aligned slots (the benchmark's "same kernel for both sides").

Specification: :func:`moe_reference`. :func:`sgl_budget.kernels.moe_align.moe_align`
groups the routed slots by expert; every block of ``BLOCK_M`` slots multiplies
its tokens by one expert's weights (``w13`` then ``w2``), so the weights read are
exactly those of the experts the batch uses — padded slots (id -1) launch nothing.
Blocks past ``num_tokens_post_padded`` exit at once (static grid, CUDA-graph safe).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .moe_align import moe_align

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes and launch options of the grouped GEMM (``block_m`` is also the alignment block)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


# decode candidates the benchmark tries (memory-bound: wide K tiles, deep pipelines)
DECODE_CONFIGS = tuple(GemmConfig(16, n, k, w, s) for n, k, w, s in
                       [(64, 64, 4, 3), (64, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3), (128, 64, 4, 4),
                        (32, 256, 4, 4), (128, 128, 8, 4), (64, 128, 4, 5)])


@triton.jit
def _moe_gemm_kernel(a_ptr, b_ptr, c_ptr, sorted_ptr, expert_ptr, ntpp_ptr, w_ptr, num_slots, N, K,
                     stride_am, stride_be, stride_bn, stride_cm, TOPK: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(ntpp_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_ptr + offs_m)
    valid = slot < num_slots
    expert = tl.load(expert_ptr + pid_m)
    row = slot // TOPK  # A's row: the slot's token (TOPK = k), or the slot itself (TOPK = 1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + row[:, None] * stride_am + offs_k[None, :],
                    mask=valid[:, None] & (offs_k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + expert.to(tl.int64) * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None],
                    mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0.0)
        if DOT_F32:  # Triton's interpreter gets bf16 tl.dot wrong (3.8: garbage); float32 is exact there
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            acc += tl.dot(a, b)
    if MUL_WEIGHT:
        acc *= tl.load(w_ptr + slot, mask=valid, other=0.0)[:, None]
    tl.store(c_ptr + slot[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=valid[:, None] & (offs_n[None, :] < N))


def triton_gemm(a, w, out, al, topk_ids, topk_weights, top_k: int, mul_weight: bool, cfg: GemmConfig) -> None:
    """``out[slot] = a[slot // top_k] @ w[expert].T`` (times the slot's weight if ``mul_weight``) for every
    aligned slot: this package's grouped GEMM, in the calling convention of :func:`moe_layer`."""
    e, n, k = w.shape
    grid = (al.sorted_token_ids.numel() // cfg.block_m, triton.cdiv(n, cfg.block_n))
    _moe_gemm_kernel[grid](a, w, out, al.sorted_token_ids, al.expert_ids, al.num_tokens_post_padded,
                           topk_weights.reshape(-1).float() if mul_weight else a, topk_ids.numel(), n, k,
                           a.stride(0), w.stride(0), w.stride(1), out.stride(0), TOPK=top_k, MUL_WEIGHT=mul_weight,
                           BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT_F32=INTERPRET,
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def moe_layer(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: GemmConfig, gemm=triton_gemm) -> torch.Tensor:
    """SiLU-gated MoE layer over the aligned slots with a given grouped GEMM (the benchmark swaps in
    SGLang's): alignment, up-projection per slot, SiLU-and-multiply, weighted down-projection, sum."""
    t, k = topk_ids.shape
    e, two_i, h = w13.shape
    al = moe_align(topk_ids, e, config.block_m)
    up = torch.zeros(t * k, two_i, dtype=x.dtype, device=x.device)
    gemm(x, w13, up, al, topk_ids, topk_weights, k, False, config)
    act = F.silu(up[:, : two_i // 2]) * up[:, two_i // 2:]
    down = torch.zeros(t * k, h, dtype=x.dtype, device=x.device)
    gemm(act, w2, down, al, topk_ids, topk_weights, 1, True, config)
    return down.view(t, k, h).sum(1)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: GemmConfig = GemmConfig()) -> torch.Tensor:
    """MoE layer output ``[T, H]`` for ``x [T, H]``, ``w13 [E, 2I, H]``, ``w2 [E, H, I]`` (SiLU-gated)."""
    return moe_layer(x, w13, w2, topk_weights, topk_ids, config)


def moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """Pure-torch MoE layer: each token's kept experts (id >= 0), weighted and summed."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    inter = w2.shape[2]
    for e in torch.unique(topk_ids[topk_ids >= 0]).tolist():
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        gu = x[tok].float() @ w13[e].float().T
        a = F.silu(gu[:, :inter]) * gu[:, inter:]
        out.index_add_(0, tok, (a @ w2[e].float().T) * topk_weights[tok, slot, None].float())
    return out.to(x.dtype)
