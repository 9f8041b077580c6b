"""KV codecs: round-trip error bounds per codec, wire sizes, frame checks and the registry."""

from __future__ import annotations

import pytest
import torch

from pdserve.transfer.codecs import CODEC_NAMES, KVCodec, as_bytes, get_codec

# SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64.
NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 30, 3, 64
E4M3_MAX = 448.0


def random_kv(num_tokens: int = 37, seed: int = 0) -> torch.Tensor:
    """[2, num_tokens, kv_heads, head_dim]: Gaussian rows whose scales span four decades."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(2, num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=generator)
    row_scales = 10.0 ** torch.empty(2, num_tokens, NUM_KV_HEADS, 1).uniform_(
        -3, 1, generator=generator
    )
    return values * row_scales * (torch.arange(num_tokens).view(1, -1, 1, 1) != 2)  # token 2: zeros


def realistic_kv(num_tokens: int = 64, seed: int = 1) -> torch.Tensor:
    """What post-RoPE keys and values look like: a few large outlier channels in K, an
    attention-sink token far larger than the rest, V much smaller than K, an all-zero row, a
    row of one repeated negative value and a row with a single non-zero."""
    generator = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=generator)
    kv[0, :, :, [3, 35]] *= 25.0  # outlier channels (a RoPE pair) in every key
    kv[1] *= 0.05
    kv[:, 0] *= 40.0  # the sink token
    kv[0, 5, 1] = 0.0
    kv[1, 6, 2] = -0.75
    kv[1, 7, 0] = 0.0
    kv[1, 7, 0, 11] = -3e-4
    return kv


def round_trip(codec: KVCodec, kv: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """encode -> the bytes a wire would carry (read-only, like bytes from a socket) -> decode."""
    frames = [bytes(as_bytes(frame)) for frame in codec.encode(kv)]
    return codec.decode(frames, tuple(kv.shape), dtype or kv.dtype)


def row_absmax(kv: torch.Tensor) -> torch.Tensor:
    return kv.float().abs().amax(dim=-1, keepdim=True)


def test_registry_names_and_unknown_name() -> None:
    assert CODEC_NAMES == ("none", "fp16", "bf16", "int8", "fp8")
    assert [get_codec(name).name for name in CODEC_NAMES] == list(CODEC_NAMES)
    with pytest.raises(ValueError, match="unknown KV codec 'zstd'") as error:
        get_codec("zstd")
    for name in CODEC_NAMES:
        assert name in str(error.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("make_kv", [random_kv, realistic_kv])
def test_none_is_exact_in_the_kv_dtype(dtype: torch.dtype, make_kv) -> None:
    kv = make_kv().to(dtype)
    decoded = round_trip(get_codec("none"), kv)
    assert decoded.dtype == dtype
    assert torch.equal(decoded, kv)


@pytest.mark.parametrize(
    ("name", "wire_dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)]
)
@pytest.mark.parametrize("make_kv", [random_kv, realistic_kv])
def test_half_casts_round_to_nearest(name: str, wire_dtype: torch.dtype, make_kv) -> None:
    kv = make_kv()
    decoded = round_trip(get_codec(name), kv)
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded, kv.to(wire_dtype).float())
    # Round to nearest: at most half an ulp, i.e. eps / 2 relative (plus fp16's subnormal step).
    eps = torch.finfo(wire_dtype).eps
    assert ((decoded - kv).abs() <= kv.abs() * eps / 2 + 2.0**-25).all()
    # Already in the wire dtype: the bytes pass through unchanged.
    same = kv.to(wire_dtype)
    assert torch.equal(round_trip(get_codec(name), same), same)


@pytest.mark.parametrize("make_kv", [random_kv, realistic_kv])
def test_int8_error_is_at_most_half_a_step_per_row(make_kv) -> None:
    kv = make_kv()
    decoded = round_trip(get_codec("int8"), kv)
    assert decoded.dtype == torch.float32
    # Step = the row's absmax / 127, rounded up to fp16 (at most 2**-10 larger, 2**-24 minimum).
    step = (row_absmax(kv) / 127).clamp_min(2.0**-24) * (1 + 2.0**-10)
    assert ((decoded - kv).abs() <= step / 2).all()
    # All-zero rows stay exactly zero.
    zero_rows = row_absmax(kv).squeeze(-1) == 0
    assert zero_rows.any()
    assert (decoded[zero_rows] == 0).all()


@pytest.mark.parametrize("make_kv", [random_kv, realistic_kv])
def test_fp8_error_is_relative_per_value(make_kv) -> None:
    kv = make_kv()
    decoded = round_trip(get_codec("fp8"), kv)
    assert torch.isfinite(decoded).all()
    # e4m3 keeps 3 mantissa bits: normals round within 2**-4 relative; below 2**-6 (scaled)
    # the subnormal step is 2**-9, so half of it times the row's scale bounds the absolute error.
    scale = (row_absmax(kv) / E4M3_MAX).clamp_min(2.0**-24) * (1 + 2.0**-10)
    bound = kv.abs() * 2.0**-4 + scale * 2.0**-10
    assert ((decoded - kv).abs() <= bound).all()
    # The row's absmax lands on e4m3's largest code (no clipping, no wasted range), unless the
    # scale is an fp16 subnormal, whose coarse steps round it up further.
    codes, _ = get_codec("fp8").encode(kv)
    normal = row_absmax(kv).squeeze(-1) / E4M3_MAX >= 2.0**-14
    assert (codes.float().abs().amax(dim=-1)[normal] == E4M3_MAX).all()


def test_fp8_decodes_every_code_like_torch() -> None:
    """The hand-written float8 -> fp16 bit move against torch's own cast, over all 254 codes."""
    codes = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=torch.uint8)
    shape = (2, 1, 1, codes.numel() // 2)
    scales = torch.ones(2, 1, 1, dtype=torch.float16)
    decoded = get_codec("fp8").decode([as_bytes(codes), as_bytes(scales)], shape, torch.float32)
    expected = codes.view(torch.float8_e4m3fn).float().reshape(shape)
    assert torch.equal(decoded, expected)


def test_int8_codes_use_the_full_range() -> None:
    kv = realistic_kv()
    codes, scales = get_codec("int8").encode(kv)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16
    assert tuple(scales.shape) == tuple(kv.shape[:-1])
    normal = row_absmax(kv).squeeze(-1) / 127 >= 2.0**-14  # fp16-normal scales (see the fp8 test)
    assert (codes.abs().amax(dim=-1)[normal] == 127).all()
    assert (scales.float() * 127 >= row_absmax(kv).squeeze(-1)).all()  # rounded up: no clipping


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [0, 1, 5, 300])
def test_encoded_nbytes_matches_the_frames(name: str, dtype: torch.dtype, num_tokens: int) -> None:
    codec = get_codec(name)
    kv = random_kv(num_tokens).to(dtype)
    frames = codec.encode(kv)
    assert all(frame.is_contiguous() and frame.device.type == "cpu" for frame in frames)
    assert sum(frame.nbytes for frame in frames) == codec.encoded_nbytes(tuple(kv.shape), dtype)
    decoded = round_trip(codec, kv)
    assert decoded.shape == kv.shape and decoded.dtype == dtype


def test_none_needs_the_kv_dtype_for_its_size() -> None:
    with pytest.raises(ValueError, match="none codec"):
        get_codec("none").encoded_nbytes((2, 4, 3, 64))
    assert get_codec("int8").encoded_nbytes((2, 4, 3, 64)) == 2 * 4 * 3 * (64 + 2)


def test_bytes_per_token_for_smollm2() -> None:
    def per_token(name: str, dtype: torch.dtype = torch.float32) -> int:
        shape = (2, 1, NUM_KV_HEADS, HEAD_DIM)
        return NUM_LAYERS * get_codec(name).encoded_nbytes(shape, dtype)

    assert per_token("none") == 46_080  # float32 KV
    assert per_token("none", torch.bfloat16) == per_token("bf16") == per_token("fp16") == 23_040
    # One byte per value plus a 2-byte scale per 64 values: 51.6% of bf16.
    assert per_token("int8") == per_token("fp8") == 11_520 + 360
    assert per_token("int8") / per_token("bf16") == pytest.approx(0.515625)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_wrong_frame_size_or_count_is_a_value_error(name: str) -> None:
    codec = get_codec(name)
    kv = random_kv(8)
    shape = tuple(kv.shape)
    frames = [bytes(as_bytes(frame)) for frame in codec.encode(kv)]
    expected = len(frames[0])
    with pytest.raises(ValueError, match=rf"{name} codec.*{expected}.*{expected - 1}"):
        codec.decode([frames[0][:-1], *frames[1:]], shape, kv.dtype)
    with pytest.raises(ValueError, match=rf"{name} codec"):
        codec.decode([*frames, b"x"], shape, kv.dtype)
    # The same frames against a different shape are the wrong size too.
    with pytest.raises(ValueError, match=rf"{name} codec"):
        codec.decode(frames, (2, 9, NUM_KV_HEADS, HEAD_DIM), kv.dtype)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_decode_takes_any_buffer_and_never_aliases_it(name: str) -> None:
    codec = get_codec(name)
    kv = realistic_kv(16)
    shape = tuple(kv.shape)
    expected = round_trip(codec, kv)
    payloads = [bytes(as_bytes(frame)) for frame in codec.encode(kv)]
    # bytearray (writable), a memoryview of one, and a view starting at an odd address.
    makers = [
        lambda p: bytearray(p),
        lambda p: memoryview(bytearray(p)),
        lambda p: memoryview(bytearray(b"\0" + p))[1:],
    ]
    for make in makers:
        frames = [make(p) for p in payloads]
        decoded = codec.decode(frames, shape, torch.float32)
        assert torch.equal(decoded, expected)
        for frame in frames:
            frame[:] = b"\xff" * len(frame)  # the receive buffer is reused...
        assert torch.equal(decoded, expected)  # ...without touching what was decoded


@pytest.mark.parametrize("name", ["int8", "fp8", "bf16"])
def test_decode_casts_to_the_requested_dtype(name: str) -> None:
    kv = realistic_kv()
    as_float = round_trip(get_codec(name), kv)
    as_bf16 = round_trip(get_codec(name), kv, torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16
    assert torch.equal(as_bf16, as_float.to(torch.bfloat16))


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_non_contiguous_layer_slice(name: str) -> None:
    # A [layers, 2, tokens, heads, dim] KV viewed token-major from a block layout is strided.
    full = realistic_kv(12).permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert not full.is_contiguous()
    codec = get_codec(name)
    assert torch.equal(round_trip(codec, full), round_trip(codec, full.contiguous()))
