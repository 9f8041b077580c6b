"""Shared model fixtures: the default checkpoint, loaded once per test session.

Use the functions directly, or import the fixture into a conftest:
``from fixtures_model import checkpoint  # noqa: F401``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine.llm import LLM
from pdserve.engine.loader import Checkpoint, load_checkpoint, resolve_model_path
from pdserve.engine.sampling_params import SamplingParams


@functools.lru_cache(maxsize=1)
def default_model_path() -> Path:
    """The default model's GGUF (fetched into the cache on first use)."""
    return resolve_model_path(None, show_progress=False)


@functools.lru_cache(maxsize=1)
def load_default_checkpoint() -> Checkpoint:
    """The default model (SmolLM2-135M-Instruct), loaded once per process."""
    return load_checkpoint(str(default_model_path()), show_progress=False)


@pytest.fixture(scope="session")
def checkpoint() -> Checkpoint:
    return load_default_checkpoint()


# ---- a tiny synthetic GGUF: every supported tensor type, untied output, GQA --------------------

TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_MERGES = ("h e", "l l", "he ll", "hell o")
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter reorders q/k rows per head from [half, i] to [i, half]."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(
    path: Path, tensor_types: dict[str, str] | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Write a 2-layer llama GGUF (hidden 64, 4 heads, 2 KV heads) and return the weights a
    correct loader must produce (HF names and layout, after quantization round-off).

    ``tensor_types`` maps a GGUF tensor-name suffix (e.g. "attn_q") to a GGML type name; by
    default the layers use F16, BF16, Q4_0, Q4_1, Q8_0 and F32 between them.
    """
    import gguf
    from gguf.quants import dequantize, quantize

    hidden, intermediate, num_heads, num_kv_heads, head_dim, num_layers = 64, 96, 4, 2, 16, 2
    alphabet = _byte_alphabet_chars()
    tokens = [*TINY_SPECIAL_TOKENS, *alphabet, "he", "ll", "hell", "hello"]
    types = {
        "token_embd": "F16", "output": "Q8_0", "output_norm": "F32",
        "attn_q": "BF16", "attn_k": "Q4_0", "attn_v": "Q8_0", "attn_output": "Q4_1",
        "ffn_gate": "F32", "ffn_up": "Q8_0", "ffn_down": "Q4_0", "attn_norm": "F32", "ffn_norm": "F32",
    }  # fmt: skip
    types.update(tensor_types or {})
    rng = np.random.default_rng(seed)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_block_count(num_layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in TINY_SPECIAL_TOKENS else 1 for token in tokens])
    writer.add_token_merges(list(TINY_MERGES))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TINY_CHAT_TEMPLATE)

    expected: dict[str, torch.Tensor] = {}

    def add(gguf_name: str, hf_name: str, shape: tuple[int, ...], heads: int | None = None) -> None:
        kind = gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else gguf_name.split(".")[0]
        qtype = gguf.GGMLQuantizationType[types[kind]]
        values = rng.standard_normal(shape).astype(np.float32)
        stored = _llama_cpp_permute(values, heads) if heads else values
        data = quantize(stored, qtype)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        # Quantization blocks run along rows, so round-off commutes with the row permutation.
        expected[hf_name] = torch.from_numpy(
            dequantize(quantize(values, qtype), qtype).astype(np.float32)
        )

    vocab = len(tokens)
    add("token_embd.weight", "model.embed_tokens.weight", (vocab, hidden))
    for layer in range(num_layers):
        blk, hf = f"blk.{layer}.", f"model.layers.{layer}."
        add(blk + "attn_norm.weight", hf + "input_layernorm.weight", (hidden,))
        add(
            blk + "attn_q.weight",
            hf + "self_attn.q_proj.weight",
            (num_heads * head_dim, hidden),
            num_heads,
        )
        add(
            blk + "attn_k.weight",
            hf + "self_attn.k_proj.weight",
            (num_kv_heads * head_dim, hidden),
            num_kv_heads,
        )
        add(
            blk + "attn_v.weight", hf + "self_attn.v_proj.weight", (num_kv_heads * head_dim, hidden)
        )
        add(
            blk + "attn_output.weight",
            hf + "self_attn.o_proj.weight",
            (hidden, num_heads * head_dim),
        )
        add(blk + "ffn_norm.weight", hf + "post_attention_layernorm.weight", (hidden,))
        add(blk + "ffn_gate.weight", hf + "mlp.gate_proj.weight", (intermediate, hidden))
        add(blk + "ffn_up.weight", hf + "mlp.up_proj.weight", (intermediate, hidden))
        add(blk + "ffn_down.weight", hf + "mlp.down_proj.weight", (hidden, intermediate))
    add("output_norm.weight", "model.norm.weight", (hidden,))
    add("output.weight", "lm_head.weight", (vocab, hidden))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def _byte_alphabet_chars() -> list[str]:
    """GPT-2's 256 byte characters in byte order (written out independently of the loader)."""
    kept = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    chars: dict[int, str] = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def make_float32_llm(
    checkpoint: Checkpoint, cache: CacheConfig | None = None, scheduler: SchedulerConfig | None = None,
    attention: str = "auto",
) -> LLM:
    """An engine in float32 (the reference-exact mode) over an already loaded checkpoint."""
    config = EngineConfig(
        model=ModelConfig(dtype="float32", attention=attention),
        cache=cache or CacheConfig(),
        scheduler=scheduler or SchedulerConfig(),
        show_progress=False,
    )
    return LLM(config=config, checkpoint=checkpoint)


CAPITAL_PROMPT = (
    "Question: which city is the capital of France, and which river flows through it? Answer: The capital of France is"
)
"""A prompt whose greedy answer every engine configuration should get right: " Paris"."""


def make_small_llm(checkpoint: Checkpoint, dtype: str, weight_format: str) -> LLM:
    """An engine with a small KV pool (64 blocks) in the given dtype and weight format."""
    config = EngineConfig(
        model=ModelConfig(dtype=dtype, weight_format=weight_format),
        cache=CacheConfig(num_blocks=64),
        show_progress=False,
    )
    return LLM(config=config, checkpoint=checkpoint)


def capital_answer(llm: LLM) -> str:
    """The first four greedy tokens' text after CAPITAL_PROMPT."""
    (output,) = llm.generate(CAPITAL_PROMPT, SamplingParams(max_tokens=4))
    return output.outputs[0].text
