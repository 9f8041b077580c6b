"""A Llama decoder in plain PyTorch (RMSNorm, RoPE, GQA attention, SwiGLU) over a paged KV cache.

Weights come in Hugging Face names and layout; Q/K/V and gate/up projections are fused into one
matrix each so a layer runs two GEMMs fewer. Every ``[out, in]`` weight stays in that layout:
``F.linear`` on CPU is several times faster with it than with a pre-transposed copy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve import envs
from pdserve.engine.architecture import LlamaArchitecture
from pdserve.engine.attention import AttentionMetadata, paged_attention, write_kv
from pdserve.engine.cpu_features import cpu_features
from pdserve.engine.device import cpu_has_fast_bf16
from pdserve.engine.environment import kernels_line
from pdserve.engine.layers.build import LayerTarget, build_linear
from pdserve.engine.layers.linear import Linear
from pdserve.engine.layers.lm_head import build_lm_head
from pdserve.engine.native_kernels import NativeKernels, load_native_kernels

log = logging.getLogger(__name__)

LayerCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
"""Called after each layer wrote its K/V: (layer index, k [T, kv_heads, D], v [T, kv_heads, D])."""


def rope_inverse_frequencies(arch: LlamaArchitecture) -> torch.Tensor:
    """[head_dim / 2] float32 inverse frequencies, with the checkpoint's RoPE scaling applied."""
    exponents = torch.arange(0, arch.head_dim, 2, dtype=torch.int64).float() / arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta**exponents)
    scaling = arch.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between.
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling["low_freq_factor"])
        high_freq_factor = float(scaling["high_freq_factor"])
        original_context = float(scaling["original_max_position_embeddings"])
        low_freq_wavelength = original_context / low_freq_factor
        high_freq_wavelength = original_context / high_freq_factor
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > low_freq_wavelength, inv_freq / factor, inv_freq)
        smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
        return torch.where(is_medium, blended, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")


def _native_kernels(attention: str, device: torch.device) -> NativeKernels | None:
    """The native kernels (native_kernels.py) where ``attention`` asks for them: decode
    attention, a layer's small ops, and the int4/int8 GEMVs of quantized layers.

    ``auto`` takes them where they are vectorized for this CPU (AVX2 or AVX-512), where they made
    decode steps faster in both dtypes: bf16 on the AVX-512 Xeon (benchmarks/results/engine.json),
    float32 on the AVX2 EPYC, 1.23x dense and 3.1x int4 at batch 1 (docs/engine.md). The
    portable build is correct everywhere but unmeasured against torch: ``native`` asks for it.
    """
    if attention == "torch":
        return None
    if attention == "auto" and cpu_features().isa_levels(envs.kernel_isa())[0] == "portable":
        return None
    if device.type != "cpu":
        if attention == "native":
            raise ValueError(f"attention='native' is a CPU kernel; the model is on {device}")
        return None
    kernels = load_native_kernels()
    if kernels is None and attention == "native":
        raise RuntimeError("attention='native': the kernels could not be built here (see the warning above); "
                           "use attention='torch'")
    return kernels


@dataclass
class DecoderLayer:
    """One decoder layer's weights; Q/K/V and gate/up are fused along the output dim."""

    input_norm: torch.Tensor
    qkv: Linear
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear


class LlamaModel:
    """Weights plus a functional forward pass; holds no per-request state."""

    def __init__(
        self,
        arch: LlamaArchitecture,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        max_positions: int,
        weight_format: str = "dense",
        attention: str = "auto",
        large_batch_float32: bool = True,
    ) -> None:
        self.arch = arch
        self.dtype = dtype
        self.device = device
        # float32 SDPA is several times faster than bfloat16 on CPU; accelerators use the model dtype.
        self.attention_dtype = torch.float32 if device.type == "cpu" else dtype
        # Decodes are the exception on CPUs with bf16 hardware: converting every gathered K/V
        # position to float32 cost more than bf16 SDPA loses (decode steps 1.05x / 1.17x / 1.24x
        # faster at batch 1 / 8 / 32, 512-token contexts, 2-core Xeon with AVX512-BF16).
        fast_bf16 = device.type == "cpu" and dtype == torch.bfloat16 and cpu_has_fast_bf16()
        self.decode_attention_dtype = torch.bfloat16 if fast_bf16 else self.attention_dtype
        self.native = _native_kernels(attention, device)

        def stored(name: str) -> torch.Tensor:
            try:
                return weights[name].to(device=device)
            except KeyError:
                raise ValueError(f"checkpoint lacks weight {name!r}") from None

        def take(name: str) -> torch.Tensor:
            return stored(name).to(dtype=dtype).contiguous()

        target = LayerTarget(dtype, device, self.native, large_batch_float32)

        def project(*names: str) -> Linear:
            """The named weights fused along the output dim ([out, in] each), ready to multiply."""
            return build_linear(torch.cat([stored(name) for name in names]), weight_format, target)

        self.weight_format = weight_format
        self.embed_tokens = take("model.embed_tokens.weight")
        # With tied embeddings the head is the embedding matrix itself, shared.
        lm_head = self.embed_tokens if arch.tie_word_embeddings else take("lm_head.weight")
        self.lm_head = build_lm_head(lm_head, weight_format, target)
        self.final_norm = take("model.norm.weight")
        self.layers: list[DecoderLayer] = []
        for index in range(arch.num_layers):
            prefix = f"model.layers.{index}."
            self.layers.append(
                DecoderLayer(
                    input_norm=take(prefix + "input_layernorm.weight"),
                    qkv=project(*(prefix + f"self_attn.{p}_proj.weight" for p in ("q", "k", "v"))),
                    o=project(prefix + "self_attn.o_proj.weight"),
                    post_norm=take(prefix + "post_attention_layernorm.weight"),
                    gate_up=project(*(prefix + f"mlp.{p}_proj.weight" for p in ("gate", "up"))),
                    down=project(prefix + "mlp.down_proj.weight"),
                )
            )
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * rope_inverse_frequencies(arch)[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)  # [max_positions, head_dim]
        self._cos = angles.cos().to(device)
        self._sin = angles.sin().to(device)
        self.max_positions = max_positions
        # What runs and why, once at start: a slow machine should say why it is slow.
        kernels = kernels_line(self.native) if self.native is not None else (
            f"torch path (attention={attention}"
            + (": no vectorized kernel level here)" if attention == "auto" else ")"))
        log.info("model on %s: dtype %s, weight format %s; native kernels: %s; projections like %r",
                 cpu_features().describe() if device.type == "cpu" else device, str(dtype).removeprefix("torch."),
                 weight_format, kernels, self.layers[0].gate_up if self.layers else None)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.native is not None and self.native.rms_norm is not None:
            return self.native.rms_norm(x, weight, self.arch.rms_norm_eps)
        # One fused op; bit-identical to HF's float32 formula (checked), and half the cost.
        return F.rms_norm(x, (x.shape[-1],), weight, self.arch.rms_norm_eps)

    def _silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2 I] (gate, up) -> silu(gate) * up [T, I]."""
        if self.native is not None and self.native.silu_and_mul is not None:
            return self.native.silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D]; cos/sin: [T, 1, D]."""
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_layers: list[tuple[torch.Tensor, torch.Tensor]],
        logits_indices: torch.Tensor,
        layer_callback: LayerCallback | None = None,
    ) -> torch.Tensor:
        """Run the flat batch; returns float32 logits [len(logits_indices), vocab].

        input_ids, positions: [T]; kv_layers[i] = (k_cache, v_cache) of layer i.
        """
        arch = self.arch
        num_heads, num_kv_heads, head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        native = self.native
        # The native kernel rotates and stores in one call when the cache has the model's dtype;
        # it reads float32 [T, D] tables, the torch path the model's dtype broadcast over heads.
        rope_write_kv = native.rope_write_kv if native is not None else None
        fused_rope = rope_write_kv is not None and bool(kv_layers) and kv_layers[0][0].dtype == self.dtype
        cos, sin = self._cos[positions], self._sin[positions]
        if not fused_rope:
            cos, sin = cos.to(self.dtype).unsqueeze(1), sin.to(self.dtype).unsqueeze(1)

        hidden = F.embedding(input_ids, self.embed_tokens)  # [T, hidden]
        for index, layer in enumerate(self.layers):
            residual = hidden
            x = self._rms_norm(hidden, layer.input_norm)
            qkv = layer.qkv(x)
            k_cache, v_cache = kv_layers[index]
            v = qkv[:, q_size + kv_size :].view(-1, num_kv_heads, head_dim)
            if fused_rope:
                assert rope_write_kv is not None
                # Rotated in place and stored in one call; q and k stay views of qkv.
                rope_write_kv(qkv, cos, sin, meta.slot_mapping, k_cache, v_cache, num_heads)
                q = qkv[:, :q_size].view(-1, num_heads, head_dim)
                k = qkv[:, q_size : q_size + kv_size].view(-1, num_kv_heads, head_dim)
            else:
                # Rotate queries and keys in one go: [T, num_heads + num_kv_heads, D].
                qk = self._rope(qkv[:, : q_size + kv_size].view(-1, num_heads + num_kv_heads, head_dim), cos, sin)
                q, k = qk[:, :num_heads], qk[:, num_heads:]
                write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
            if layer_callback is not None:
                layer_callback(index, k, v)
            attended = paged_attention(q, k_cache, v_cache, meta, self.attention_dtype, self.decode_attention_dtype,
                                       native)
            hidden = layer.o(attended.reshape(-1, q_size), residual)

            residual = hidden
            x = self._rms_norm(hidden, layer.post_norm)
            activated = self._silu_and_mul(layer.gate_up(x))
            hidden = layer.down(activated, residual)

        last = self._rms_norm(hidden[logits_indices], self.final_norm)
        return self.lm_head(last)
