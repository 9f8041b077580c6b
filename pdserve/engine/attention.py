"""Paged attention over a batch that mixes decode tokens and prefill chunks of any length.

The batch is flat: ``T`` tokens, the decode tokens (one per sequence) first, then each prefill
chunk's tokens. Every layer first writes the new tokens' K/V into their cache slots, then
attends from the cache, so a chunk continuing an earlier prefill, a prefix-cache hit and imported
KV all look the same to the math.

Decodes run as one padded, batched attention call; prefill chunks run one call each (they are
compute-bound, so the loop costs nothing measurable).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pdserve.engine.native_kernels import NativeKernels


@dataclass
class PrefillSpan:
    """One prefill chunk inside the flat batch."""

    query_start: int
    query_length: int
    context_blocks: torch.Tensor
    """[num_blocks] the blocks holding positions 0 .. context_length - 1 (its own included)."""
    context_length: int
    causal_mask: torch.Tensor | None
    """[query_length, context_length] bool (True = attend); None when the chunk starts at 0."""


@dataclass
class AttentionMetadata:
    """Where each token's K/V goes and what each query attends to, for one forward pass."""

    slot_mapping: torch.Tensor
    """[T] flat cache slot (block * block_size + offset) of every token in the batch."""
    num_decode_tokens: int
    decode_blocks: torch.Tensor | None
    """[num_decode, max_blocks] block table of each decode sequence, padded with block 0."""
    decode_mask: torch.Tensor | None
    """[num_decode, 1, 1, max_blocks * block_size] bool, True for real (unpadded) positions."""
    prefills: list[PrefillSpan]
    decode_context_lens: torch.Tensor | None = None
    """[num_decode] int64 context length of each decode sequence (its new token included)."""
    workspace: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    """Gather buffers reused by every layer of one forward pass. Allocating ~50 MB per layer
    crossed glibc's trim threshold at batch 64: memory went back to the OS and was
    page-faulted in again every layer (1.5 s vs 0.6 s per step, measured)."""


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """Store new keys/values. caches: [num_blocks, block_size, kv_heads, head_dim]; k, v: [T, kv_heads, head_dim]."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    compute_dtype: torch.dtype,
    decode_dtype: torch.dtype | None = None,
    native: NativeKernels | None = None,
) -> torch.Tensor:
    """Attention of every query in the batch over its sequence's cached context.

    q: [T, num_heads, head_dim]; returns [T, num_heads, head_dim] in q's dtype.
    ``compute_dtype`` exists because on CPU float32 SDPA is several times faster than bfloat16
    for prefill chunks; ``decode_dtype`` (default: ``compute_dtype``) is the decodes' own, since
    converting every gathered K/V position for them can cost more than the kernel saves.
    ``native`` (native_kernels.py), when given, runs the decodes straight from the cache
    instead of gathering their contexts for SDPA, writing their rows of the result in place.
    """
    decode_dtype = decode_dtype or compute_dtype
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[-2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)

    def gather(cache: torch.Tensor, blocks: torch.Tensor, role: str, dtype: torch.dtype) -> torch.Tensor:
        # Whole blocks at once: index_select copies contiguous block-sized rows, ~2x faster
        # than gathering token slots. Returns [*blocks.shape[:-1], num_positions, kv_heads, D].
        index = blocks.reshape(-1)
        key = (role, index.numel())
        buffer = meta.workspace.get(key)
        if buffer is None:
            buffer = cache.new_empty((index.numel(), *cache.shape[1:]))
            meta.workspace[key] = buffer
        torch.index_select(cache, 0, index, out=buffer)
        return buffer.to(dtype).view(*blocks.shape[:-1], -1, num_kv_heads, head_dim)


    num_decode = meta.num_decode_tokens
    attend = native.paged_decode_attention if native is not None else None
    attend_into = native.paged_decode_attention_into if native is not None else None
    if num_decode and attend is not None and attend_into is not None and meta.decode_context_lens is not None:
        assert meta.decode_blocks is not None
        args = (q[:num_decode], k_cache, v_cache, meta.decode_blocks, meta.decode_context_lens, head_dim**-0.5)
        if out.dtype in (torch.float32, k_cache.dtype):
            attend_into(*args, out[:num_decode])
        else:  # a cache in another dtype than the model's
            out[:num_decode] = attend(*args).to(out.dtype)
    elif num_decode:
        assert meta.decode_blocks is not None and meta.decode_mask is not None
        # All query heads of one KV head attend to the same keys: fold them into the query axis
        # instead of repeating K/V (GQA without copies).
        q_decode = q[:num_decode].view(num_decode, num_kv_heads, group, head_dim)
        keys = gather(k_cache, meta.decode_blocks, "k", decode_dtype).transpose(1, 2)  # [B, kv, L, D]
        values = gather(v_cache, meta.decode_blocks, "v", decode_dtype).transpose(1, 2)
        attended = F.scaled_dot_product_attention(
            q_decode.to(decode_dtype), keys, values, attn_mask=meta.decode_mask
        )  # [B, kv, group, D]
        out[:num_decode] = attended.reshape(num_decode, num_heads, head_dim).to(q.dtype)

    for span in meta.prefills:
        rows = slice(span.query_start, span.query_start + span.query_length)
        q_span = q[rows].transpose(0, 1).unsqueeze(0).to(compute_dtype)  # [1, H, Lq, D]
        length = span.context_length
        keys = gather(k_cache, span.context_blocks, "k", compute_dtype)[:length].transpose(0, 1).unsqueeze(0)
        values = gather(v_cache, span.context_blocks, "v", compute_dtype)[:length].transpose(0, 1).unsqueeze(0)
        attended = F.scaled_dot_product_attention(
            q_span,
            keys,
            values,
            attn_mask=span.causal_mask,
            is_causal=span.causal_mask is None,
            enable_gqa=group > 1,
        )  # [1, H, Lq, D]
        out[rows] = attended[0].transpose(0, 1).to(q.dtype)
    return out
