"""The native decode attention kernel (native_attention.py) against the torch path on the same
paged cache, its input checks, and the engine generating the same tokens with either."""

from __future__ import annotations

import pytest
import torch
from fixtures_model import make_float32_llm

from pdserve.engine.attention import AttentionMetadata, paged_attention
from pdserve.engine.config import CacheConfig, ModelConfig
from pdserve.engine.loader import Checkpoint
from pdserve.engine.native_attention import PagedDecodeAttention, load_paged_decode_attention
from pdserve.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def kernel() -> PagedDecodeAttention:
    loaded = load_paged_decode_attention()
    assert loaded is not None, "the kernel must build here (gcc and ninja are installed by bootstrap)"
    return loaded


def _paged_case(dtype: torch.dtype, lengths: list[int], heads: int, kv_heads: int, head_dim: int,
                block_size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                              torch.Tensor, torch.Tensor]:
    """A cache whose sequences own shuffled, non-contiguous blocks, as a busy pool's do."""
    generator = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for n in lengths)
    num_blocks = len(lengths) * max_blocks + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
    order = torch.randperm(num_blocks, generator=generator)
    tables = torch.zeros(len(lengths), max_blocks, dtype=torch.long)  # padded with block 0
    taken = 0
    for row, length in enumerate(lengths):
        used = -(-length // block_size)
        tables[row, :used] = order[taken : taken + used]
        taken += used
    q = torch.randn(len(lengths), heads, head_dim, generator=generator).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lengths, dtype=torch.long)


def _torch_path(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
    """The engine's gather + SDPA path, in float32 on the same (exactly widened) cache values."""
    block_size = k_cache.shape[1]
    mask = (torch.arange(tables.shape[1] * block_size)[None, :] < lengths[:, None])[:, None, None, :]
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decode_tokens=len(lengths),
                             decode_blocks=tables, decode_mask=mask, prefills=[])
    return paged_attention(q.float(), k_cache, v_cache, meta, torch.float32, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 128), (6, 2, 32)])
def test_the_kernel_matches_the_torch_path(kernel: PagedDecodeAttention, dtype: torch.dtype, heads: int,
                                           kv_heads: int, head_dim: int) -> None:
    # One position, a partial block, exactly one block, one past it, and a long context.
    lengths = [1, 5, 16, 17, 300]
    q, k_cache, v_cache, tables, context = _paged_case(dtype, lengths, heads, kv_heads, head_dim)
    out = kernel(q, k_cache, v_cache, tables, context, head_dim**-0.5)
    assert out.dtype == torch.float32 and out.shape == (len(lengths), heads, head_dim)
    torch.testing.assert_close(out, _torch_path(q, k_cache, v_cache, tables, context), rtol=1e-5, atol=1e-5)


def test_the_kernel_refuses_what_it_cannot_read(kernel: PagedDecodeAttention) -> None:
    q, k_cache, v_cache, tables, context = _paged_case(torch.float32, [20, 8], 9, 3, 64)
    scale = 64**-0.5
    outside = tables.clone()
    outside[0, 1] = k_cache.shape[0]  # past the last block
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernel(q, k_cache, v_cache, outside, context, scale)
    with pytest.raises(RuntimeError, match="outside its block table"):
        kernel(q, k_cache, v_cache, tables, torch.tensor([20, 0]), scale)
    with pytest.raises(RuntimeError, match="outside its block table"):
        kernel(q, k_cache, v_cache, tables, torch.tensor([20, 33]), scale)  # 2 blocks of 16 hold 32
    with pytest.raises(RuntimeError, match="int64"):
        kernel(q, k_cache, v_cache, tables.int(), context, scale)
    with pytest.raises(RuntimeError, match="KV heads"):
        kernel(q[:, :8], k_cache, v_cache, tables, context, scale)  # 8 query heads over 3 KV heads


def test_config_refuses_an_unknown_attention() -> None:
    with pytest.raises(ValueError, match="attention must be"):
        ModelConfig(attention="flash")


def test_the_engine_generates_the_same_tokens_with_either_path(checkpoint: Checkpoint) -> None:
    """float32, where both paths compute the same sums in another order: greedy tokens agree."""
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a land far away, there"]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    outputs = {}
    for attention in ("torch", "native"):
        llm = make_float32_llm(checkpoint, CacheConfig(num_blocks=64), attention=attention)
        try:
            assert (llm.engine.model.native_decode is not None) == (attention == "native")
            # Together: the three decode in one batch over contexts of different lengths.
            outputs[attention] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        finally:
            llm.close()
    assert outputs["native"] == outputs["torch"]
