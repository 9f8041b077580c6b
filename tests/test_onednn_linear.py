"""Pre-packed bf16 linear layers (oneDNN) against F.linear / addmm on the model's real weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fixtures_model import checkpoint  # noqa: F401

from pdserve.engine.cpu_features import cpu_features
from pdserve.engine.layers.build import LayerTarget, dense_layer
from pdserve.engine.layers.onednn import OneDnnLinear, onednn_bf16_available
from pdserve.engine.layers.routing import RowRouted
from pdserve.engine.loader import Checkpoint

CPU = torch.device("cpu")
needs_onednn_bf16 = pytest.mark.skipif(
    not onednn_bf16_available(CPU, torch.bfloat16), reason="oneDNN has no bf16 kernels for this CPU"
)


def test_only_bf16_cpu_weights_are_packed() -> None:
    assert not onednn_bf16_available(CPU, torch.float32)
    assert not onednn_bf16_available(torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 CPU weight"):
        OneDnnLinear(torch.zeros(8, 8))


@needs_onednn_bf16
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_packed_linear_equals_f_linear(checkpoint: Checkpoint, rows: int) -> None:  # noqa: F811
    weight = checkpoint.weights["model.layers.3.mlp.gate_proj.weight"].to(torch.bfloat16)
    layer = OneDnnLinear(weight)
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, weight.shape[1], generator=generator).to(torch.bfloat16)
    residual = torch.randn(rows, weight.shape[0], generator=generator).to(torch.bfloat16)

    if cpu_features().multiplies_bf16:
        torch.testing.assert_close(layer(x), F.linear(x, weight), rtol=0, atol=0)
    else:
        # Without bf16 hardware oneDNN emulates the products, and F.linear takes another kernel
        # that sums in another order: the two round an element apart now and then, by an ulp.
        torch.testing.assert_close(layer(x), F.linear(x, weight), rtol=2**-7, atol=1e-5)
    # The fused add rounds once to bf16 where addmm may round the product first: within an ulp.
    expected = (x.float() @ weight.float().t() + residual.float()).to(torch.bfloat16)
    torch.testing.assert_close(layer(x, residual), expected, rtol=2**-7, atol=1e-2)
    assert layer.kernel_bytes == weight.numel() * 2


@needs_onednn_bf16
def test_bf16_model_packs_its_projections_and_head(checkpoint: Checkpoint) -> None:  # noqa: F811
    from pdserve.engine.model import LlamaModel

    model = LlamaModel(checkpoint.architecture, checkpoint.weights, torch.bfloat16, CPU, max_positions=64)
    layer = model.layers[0]
    # Packed for oneDNN, with a float32 copy for large batches.
    assert all(w.kernel(1) == "onednn-bf16" and w.kernel(512) == "dense-float32"
               for w in (layer.qkv, layer.o, layer.gate_up, layer.down))
    assert model.lm_head.kernel(1) == "onednn-bf16"
    # The engine benchmark's bandwidth floor still counts every weight once (the head is tied).
    from pdserve.bench.engine.ours import decode_weight_bytes

    assert checkpoint.architecture.tie_word_embeddings
    assert decode_weight_bytes(model) == 2 * sum(w.numel() for w in checkpoint.weights.values())
    fp32 = LlamaModel(checkpoint.architecture, checkpoint.weights, torch.float32, CPU, max_positions=64)
    assert fp32.layers[0].qkv.kernel(1) == "dense-float32" and fp32.lm_head.kernel(1) == "dense-float32"


@needs_onednn_bf16
def test_large_batches_multiply_the_float32_copy(checkpoint: Checkpoint) -> None:  # noqa: F811
    stored = checkpoint.weights["model.layers.5.mlp.down_proj.weight"].float()
    layer = dense_layer(stored, LayerTarget(torch.bfloat16, CPU))
    assert isinstance(layer, RowRouted)
    rows = layer.small_rows
    plain = OneDnnLinear(stored.to(torch.bfloat16))
    generator = torch.Generator().manual_seed(0)
    small = torch.randn(rows, stored.shape[1], generator=generator).to(torch.bfloat16)
    large = torch.randn(rows + 1, stored.shape[1], generator=generator).to(torch.bfloat16)
    residual = torch.randn(rows + 1, stored.shape[0], generator=generator).to(torch.bfloat16)
    # Up to the threshold the packed bf16 kernel, bit for bit; above it float32 on the stored
    # weight, rounded once to bf16, residual included.
    assert torch.equal(layer(small), plain(small))
    assert torch.equal(layer(large), F.linear(large.float(), stored).to(torch.bfloat16))
    expected = torch.addmm(residual.float(), large.float(), stored.t()).to(torch.bfloat16)
    assert torch.equal(layer(large, residual), expected)
    assert not torch.equal(plain(large), layer(large))


@needs_onednn_bf16
def test_the_float32_copies_are_kept_unless_turned_off(checkpoint: Checkpoint) -> None:  # noqa: F811
    from pdserve.engine.model import LlamaModel

    arch, weights = checkpoint.architecture, checkpoint.weights
    with_copies = LlamaModel(arch, weights, torch.bfloat16, CPU, max_positions=64)
    without = LlamaModel(arch, weights, torch.bfloat16, CPU, max_positions=64, large_batch_float32=False)
    assert with_copies.layers[0].qkv.kernel(512) == "dense-float32"
    assert without.layers[0].qkv.kernel(512) == "onednn-bf16"
    # The offline API passes the switch through to the model.
    from pdserve.engine.llm import LLM

    llm = LLM(dtype="bfloat16", large_batch_float32=False, checkpoint=checkpoint, show_progress=False)
    try:
        assert llm.engine.model.layers[0].down.kernel(512) == "onednn-bf16"
    finally:
        llm.close()
