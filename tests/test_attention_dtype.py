"""Decode attention in bf16 (CPUs with bf16 hardware) against the float32 path, same cache."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.attention import AttentionMetadata, paged_attention
from pdserve.engine.device import cpu_has_fast_bf16


def test_bf16_decode_attention_is_close_to_float32() -> None:
    generator = torch.Generator().manual_seed(0)
    num_blocks, block_size, kv_heads, head_dim, heads = 12, 16, 3, 64, 9
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(torch.bfloat16)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(torch.bfloat16)
    q = torch.randn(2, heads, head_dim, generator=generator).to(torch.bfloat16)
    # Two decodes: 40 positions over blocks 3, 7, 1 and 20 positions over blocks 5, 2 (padded).
    lengths = torch.tensor([40, 20])
    blocks = torch.tensor([[3, 7, 1], [5, 2, 0]])
    mask = (torch.arange(3 * block_size)[None, :] < lengths[:, None])[:, None, None, :]

    def run(decode_dtype: torch.dtype) -> torch.Tensor:
        meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decode_tokens=2,
                                 decode_blocks=blocks, decode_mask=mask, prefills=[])
        return paged_attention(q, k_cache, v_cache, meta, torch.float32, decode_dtype).float()

    reference = run(torch.float32)
    # Against a direct computation: softmax(q k^T / sqrt(d)) v over each sequence's positions.
    for row, (length, table) in enumerate(zip(lengths.tolist(), blocks.tolist(), strict=True)):
        keys = k_cache[table].reshape(-1, kv_heads, head_dim)[:length].float()
        values = v_cache[table].reshape(-1, kv_heads, head_dim)[:length].float()
        for head in range(heads):
            kv = head // (heads // kv_heads)
            weights = torch.softmax(keys[:, kv] @ q[row, head].float() / head_dim**0.5, dim=0)
            torch.testing.assert_close(reference[row, head], weights @ values[:, kv], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(run(torch.bfloat16), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="this CPU has no bf16 hardware")
def test_a_bf16_model_decodes_in_bf16_and_prefills_in_float32() -> None:
    from fixtures_model import load_default_checkpoint

    from pdserve.engine.model import LlamaModel

    checkpoint = load_default_checkpoint()
    model = LlamaModel(checkpoint.architecture, checkpoint.weights, torch.bfloat16, torch.device("cpu"), 64)
    assert (model.decode_attention_dtype, model.attention_dtype) == (torch.bfloat16, torch.float32)
    fp32 = LlamaModel(checkpoint.architecture, checkpoint.weights, torch.float32, torch.device("cpu"), 64)
    assert fp32.decode_attention_dtype == torch.float32
