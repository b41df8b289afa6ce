"""CPU serving: DeepSeek-V2/V3 (MLA attention) on SGLang 0.5.23's torch-native attention backend.

Root cause. SGLang's ``DeepseekV2AttentionMLA`` picks a forward method per batch through
``AttentionBackendRegistry`` (``models/deepseek_common/attention_backend_handler.py``). The
``torch_native`` backend — what the CPU engine runs without AMX / a CPU build of ``sgl_kernel`` —
registers no handler there, so it gets the Triton backend's rule: a prefill with no cached prefix
runs the **MHA** path (``forward_normal_*``), everything else the absorbed **MLA** path.

* The absorbed MLA path works on torch-native: ``attn_mqa`` (head dim ``kv_lora_rank +
  qk_rope_head_dim``, one KV head, v dim ``kv_lora_rank``) writes the latent into the MLA KV pool
  and reads it back; the pool's value buffer is the first ``kv_lora_rank`` columns of the same rows.
* The MHA path does not. ``forward_normal_prepare`` writes the *latent* (``kv_a`` ‖ ``k_pe``)
  into the MLA pool itself, decompresses K and V with ``kv_b_proj`` and calls ``attn_mha`` (head dim
  ``qk_nope + qk_rope``, one KV head per query head, v dim ``v_head_dim``) with
  ``save_kv_cache=False``: every other backend then attends over the K/V it was *given*. The
  torch-native backend ignores ``k``/``v`` and always attends over the KV pool, i.e. over the
  latent rows (``[tokens, 1, kv_lora_rank + qk_rope]``): ``q·kᵀ`` meets 48 columns where it
  expects 32 — "Expected size for first two dimensions of batch2 tensor to be: [4, 32] but got:
  [4, 48]" (kv_lora_rank 32, qk_rope 16, qk_nope 16; for real DeepSeek-V3 it is 192 vs 576).

The fix (registered only in workers of a ``--device cpu`` launch, see :mod:`.cpu`): an AROUND
hook on ``TorchNativeAttnBackend.forward_extend`` that, for exactly that case — the KV pool is
an MLA pool and the layer is not its latent layout, so the pool cannot hold this layer's K/V —
attends over the given ``k``/``v`` instead, per sequence, with the same ``scaled_dot_product_attention``
call (causal, the layer's scaling) torch-native uses. The MHA path is only chosen when no sequence
of the batch has a cached prefix, so the given K/V are the whole context; a batch with a prefix
there is refused with a clear error rather than answered wrongly. Every other call (all non-MLA
models, the absorbed MLA path, decode) runs SGLang's unchanged code, and the method SGLang
chooses is kept, so the prefill computes what SGLang computes on GPUs (decompressed MHA, as
transformers does) and decode uses SGLang's absorbed MLA path.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor
from torch.nn.functional import scaled_dot_product_attention

TARGET = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_extend"


def is_mha_over_latent_pool(pool, layer) -> bool:
    """Whether ``layer`` attends with dense per-head K/V while ``pool`` is an MLA pool holding latents.

    An MLA pool (``kv_lora_rank`` attribute) stores one row of ``kv_lora_rank + qk_rope_head_dim``
    per token; only a layer of exactly that layout (one KV head, v = the first ``kv_lora_rank``
    columns) can read its K/V from it.
    """
    rank = getattr(pool, "kv_lora_rank", None)
    if rank is None:
        return False
    rope = getattr(pool, "qk_rope_head_dim", 0) or 0
    latent = layer.qk_head_dim == rank + rope and layer.v_head_dim == rank and layer.tp_k_head_num == 1
    return not latent


def causal_attention_over_given_kv(q: Tensor, k: Tensor, v: Tensor, seq_lens: Sequence[int], num_heads: int,
                                   qk_head_dim: int, v_head_dim: int, scaling: float | None) -> Tensor:
    """Causal attention of each sequence's queries over its own keys/values (no cached prefix).

    ``q``: ``[tokens, num_heads * qk_head_dim]`` (or ``[tokens, num_heads, qk_head_dim]``); ``k``:
    ``[tokens, kv_heads, qk_head_dim]``; ``v``: ``[tokens, kv_heads, v_head_dim]``; sequences are
    consecutive runs of ``seq_lens`` tokens. Returns ``[tokens, num_heads * v_head_dim]``.
    """
    q = q.reshape(-1, num_heads, qk_head_dim)
    k = k.reshape(q.shape[0], -1, qk_head_dim)
    v = v.reshape(q.shape[0], -1, v_head_dim)
    out = q.new_empty((q.shape[0], num_heads, v_head_dim))
    gqa = k.shape[1] != num_heads
    start = 0
    for n in seq_lens:
        end = start + int(n)
        if end > start:
            o = scaled_dot_product_attention(q[start:end].movedim(0, 1).unsqueeze(0),
                                             k[start:end].movedim(0, 1).unsqueeze(0).to(q.dtype),
                                             v[start:end].movedim(0, 1).unsqueeze(0).to(q.dtype),
                                             is_causal=True, scale=scaling, enable_gqa=gqa)
            out[start:end] = o.squeeze(0).movedim(0, 1)
        start = end
    return out.view(q.shape[0], num_heads * v_head_dim)


def _lens(forward_batch, cpu_name: str, name: str) -> list[int]:
    values = getattr(forward_batch, cpu_name, None)
    if values is None:
        values = getattr(forward_batch, name).tolist()
    return [int(x) for x in values]


def forward_extend_mla_aware(original, backend, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
    """AROUND hook for ``TorchNativeAttnBackend.forward_extend``: the MHA-over-MLA case attends over the given
    K/V (see the module docstring); everything else is SGLang's own code."""
    if k is None or v is None or not is_mha_over_latent_pool(backend.token_to_kv_pool, layer):
        return original(backend, q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
    prefix = _lens(forward_batch, "extend_prefix_lens_cpu", "extend_prefix_lens")
    if any(prefix):
        raise NotImplementedError(
            "sgl_budget CPU serving: SGLang chose its MHA attention path for an MLA (DeepSeek) batch with a cached "
            f"prefix (prefix lengths {prefix}); the torch-native backend's KV pool holds only the compressed "
            "latents, so this stand-in supports the MHA path only without a prefix (SGLang's default choice).")
    if save_kv_cache:  # the MHA path writes the latent cache itself; a dense K/V cannot go into an MLA pool
        raise NotImplementedError("sgl_budget CPU serving: MHA over an MLA KV pool with save_kv_cache=True")
    return causal_attention_over_given_kv(q, k, v, _lens(forward_batch, "extend_seq_lens_cpu", "extend_seq_lens"),
                                          layer.tp_q_head_num, layer.qk_head_dim, layer.v_head_dim, layer.scaling)


def register() -> None:
    """Register the hook with SGLang's HookRegistry (call only in CPU-mode workers)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, forward_extend_mla_aware, HookType.AROUND)
