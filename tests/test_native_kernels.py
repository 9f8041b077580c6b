"""The native layer kernels (native_kernels.py) against the torch path: decode attention on the
same paged cache, the rotary embedding and cache write on the same projections, the norm and the
activation against Hugging Face's formulas; their input checks; and the engine generating the
same tokens with either path."""

from __future__ import annotations

import pytest
import torch
from fixtures_model import make_float32_llm

from pdserve.engine.attention import AttentionMetadata, paged_attention, write_kv
from pdserve.engine.config import CacheConfig, ModelConfig
from pdserve.engine.loader import Checkpoint
from pdserve.engine.native_kernels import NativeKernels
from pdserve.engine.sampling_params import SamplingParams


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
def test_the_kernel_matches_the_torch_path(native: NativeKernels, dtype: torch.dtype, heads: int,
                                           kv_heads: int, head_dim: int) -> None:
    # One position, a partial block, exactly one block, one past it, and a long context.
    lengths = [1, 5, 16, 17, 300]
    q, k_cache, v_cache, tables, context = _paged_case(dtype, lengths, heads, kv_heads, head_dim)
    out = native.paged_decode_attention(q, k_cache, v_cache, tables, context, head_dim**-0.5)
    assert out.dtype == torch.float32 and out.shape == (len(lengths), heads, head_dim)
    expected = _torch_path(q, k_cache, v_cache, tables, context)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # Into the caller's tensor in the cache's dtype, from queries strided as a QKV projection's rows.
    rows = torch.zeros(len(lengths), heads + 2 * kv_heads, head_dim, dtype=dtype)
    rows[:, :heads] = q
    into = torch.full((len(lengths), heads, head_dim), float("nan"), dtype=dtype)
    native.paged_decode_attention_into(rows[:, :heads], k_cache, v_cache, tables, context, head_dim**-0.5, into)
    # The same sums, rounded once into the cache's dtype.
    torch.testing.assert_close(into, out.to(dtype), rtol=0, atol=0)


def test_the_kernel_refuses_what_it_cannot_read(native: NativeKernels) -> None:
    kernel = native.paged_decode_attention
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


def _rope_case(dtype: torch.dtype, tokens: int, heads: int, kv_heads: int, head_dim: int, num_slots: int,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A QKV projection's output, the cos/sin rows of scattered positions, and distinct slots."""
    generator = torch.Generator().manual_seed(1)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator).to(dtype)
    inverse = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    positions = torch.randint(0, 4096, (tokens,), generator=generator)
    freqs = positions[:, None].float() * inverse[None, :]
    angles = torch.cat([freqs, freqs], dim=-1)
    slots = torch.randperm(num_slots, generator=generator)[:tokens]
    return qkv, angles.cos(), angles.sin(), slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 37])
def test_rope_write_kv_matches_the_torch_path(native: NativeKernels, dtype: torch.dtype, tokens: int) -> None:
    heads, kv_heads, head_dim, blocks, block_size = 9, 3, 64, 8, 16
    qkv, cos, sin, slots = _rope_case(dtype, tokens, heads, kv_heads, head_dim, blocks * block_size)
    # The torch path (model.py) in float32: rotate half, then index_copy into the cache.
    wide = qkv.float().view(tokens, heads + 2 * kv_heads, head_dim)
    half = head_dim // 2
    qk = wide[:, : heads + kv_heads]
    rotated = torch.cat([-qk[..., half:], qk[..., :half]], dim=-1)
    expected_qk = qk * cos[:, None] + rotated * sin[:, None]
    expected_k_cache = torch.zeros(blocks, block_size, kv_heads, head_dim)
    expected_v_cache = torch.zeros(blocks, block_size, kv_heads, head_dim)
    write_kv(expected_k_cache, expected_v_cache, expected_qk[:, heads:], wide[:, heads + kv_heads :], slots)

    k_cache = torch.zeros(blocks, block_size, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    values = qkv[:, (heads + kv_heads) * head_dim :].clone()
    native.rope_write_kv(qkv, cos, sin, slots, k_cache, v_cache, heads)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    got = qkv.view(tokens, heads + 2 * kv_heads, head_dim)
    torch.testing.assert_close(got[:, : heads + kv_heads].float(), expected_qk, **tolerance)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], values), "values are not rotated"
    torch.testing.assert_close(k_cache.float(), expected_k_cache, **tolerance)
    torch.testing.assert_close(v_cache.float(), expected_v_cache, rtol=0, atol=0)


def test_rope_write_kv_refuses_what_it_cannot_write(native: NativeKernels) -> None:
    qkv, cos, sin, slots = _rope_case(torch.float32, 4, 9, 3, 64, 32)
    k_cache = torch.zeros(2, 16, 3, 64)
    v_cache = torch.zeros_like(k_cache)
    with pytest.raises(RuntimeError, match="outside the cache"):
        native.rope_write_kv(qkv, cos, sin, torch.tensor([0, 1, 2, 32]), k_cache, v_cache, 9)
    with pytest.raises(RuntimeError, match="share a dtype"):
        native.rope_write_kv(qkv.bfloat16(), cos, sin, slots, k_cache, v_cache, 9)
    with pytest.raises(RuntimeError, match="heads"):
        native.rope_write_kv(qkv, cos, sin, slots, k_cache, v_cache, 8)
    with pytest.raises(RuntimeError, match="float32"):
        native.rope_write_kv(qkv, cos.double(), sin, slots, k_cache, v_cache, 9)


def _hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: float32 statistics, rounded to x's dtype before the weight."""
    wide = x.float()
    normalized = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normalized.to(x.dtype)


def _ulps_apart(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """How many representable values lie between two bf16 tensors (same signs assumed)."""
    return (got.view(torch.int16).int() - expected.view(torch.int16).int()).abs()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 130])
def test_rms_norm_matches_hugging_face(native: NativeKernels, dtype: torch.dtype, rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    # Rows a stride apart, as the fused QKV output's or a gathered batch's are.
    wide = (torch.randn(rows, 700, generator=generator) * 3).to(dtype)
    x = wide[:, :576]
    weight = (torch.rand(576, generator=generator) + 0.5).to(dtype)
    got = native.rms_norm(x, weight, 1e-5)
    expected = _hf_rms_norm(x, weight, 1e-5)
    assert got.shape == expected.shape and got.dtype == dtype and got.is_contiguous()
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    else:
        # Only the float32 sum's order differs: at most one rounding step, and rarely.
        ulps = _ulps_apart(got, expected)
        assert int(ulps.max()) <= 1 and float((ulps > 0).float().mean()) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_silu_and_mul_matches_hugging_face(native: NativeKernels, dtype: torch.dtype, rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * 1536, generator=generator) * 4).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up  # LlamaMLP's act_fn(gate) * up, in x's dtype
    got = native.silu_and_mul(gate_up)
    assert got.shape == (rows, 1536) and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    else:
        # The vectorized exp may differ from torch's in the last float32 bits, so silu(gate) may
        # round one step the other way, which the product can widen to two; rarely.
        ulps = _ulps_apart(got, expected)
        assert int(ulps.max()) <= 2 and float((ulps > 0).float().mean()) < 0.01


def test_rms_norm_and_silu_and_mul_refuse_what_they_cannot_read(native: NativeKernels) -> None:
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="share a dtype"):
        native.rms_norm(x, torch.ones(8, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(RuntimeError, match="weight must be"):
        native.rms_norm(x, torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match="contiguous rows"):
        native.rms_norm(x.t(), torch.ones(2), 1e-5)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        native.rms_norm(x.double(), torch.ones(8, dtype=torch.float64), 1e-5)
    with pytest.raises(RuntimeError, match="2 \\* width"):
        native.silu_and_mul(torch.randn(2, 7))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        native.silu_and_mul(torch.randn(2, 8, dtype=torch.float64))


def test_config_refuses_an_unknown_attention() -> None:
    with pytest.raises(ValueError, match="attention must be"):
        ModelConfig(attention="flash")


def test_the_engine_generates_the_same_tokens_with_either_path(
    checkpoint: Checkpoint, native: NativeKernels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float32, where both paths compute the same sums in another order: greedy tokens agree, on
    each instruction-set level's kernels (PDSERVE_KERNEL_ISA caps the engine's choice)."""
    isa = native.builds["rms_norm"].isa
    monkeypatch.setenv("PDSERVE_KERNEL_ISA", isa)
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a land far away, there"]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    outputs = {}
    for attention in ("torch", "native"):
        llm = make_float32_llm(checkpoint, CacheConfig(num_blocks=64), attention=attention)
        try:
            model_native = llm.engine.model.native
            assert (model_native is not None) == (attention == "native")
            assert model_native is None or model_native.builds["rms_norm"].isa == isa
            # Together: the three decode in one batch over contexts of different lengths.
            outputs[attention] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        finally:
            llm.close()
    assert outputs["native"] == outputs["torch"]
