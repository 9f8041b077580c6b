"""Load a llama.cpp GGUF file: dequantized HF-layout weights, architecture and tokenizer."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderField
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer
from tqdm import tqdm

from pdserve.engine.architecture import LlamaArchitecture
from pdserve.engine.loader.checkpoint import Checkpoint, expected_weight_shapes, hash_file_tail
from pdserve.engine.tokenizer import Tokenizer, TokenizerConfig, with_special_token_template

SUPPORTED_TYPES = frozenset(
    {
        GGMLQuantizationType.F32,
        GGMLQuantizationType.F16,
        GGMLQuantizationType.BF16,
        GGMLQuantizationType.Q4_0,
        GGMLQuantizationType.Q4_1,
        GGMLQuantizationType.Q8_0,
    }
)
"""Tensor types this loader dequantizes (through ``gguf.quants.dequantize``)."""

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")

# How llama.cpp's pre-tokenizer types split text before BPE, as ``tokenizers`` pre-tokenizers.
_GPT2_STYLE = frozenset({"default", "gpt2", "mpt", "olmo", "jais"})
_DIGITS_THEN_GPT2 = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_REGEXES = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# A quantization suffix on a file name, e.g. "SmolLM2-135M-Instruct.Q4_1" or "model-Q4_K_M".
_QUANT_SUFFIX = re.compile(r"[.\-_](?:I?Q\d\w*|F16|F32|BF16|FP16)$", re.IGNORECASE)


class GGUFMetadata:
    """Typed access to a GGUF file's key/value metadata."""

    def __init__(self, fields: dict[str, ReaderField]) -> None:
        self._fields = fields

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        if key not in self._fields:
            raise ValueError(f"GGUF metadata lacks required key {key!r}")
        return self._fields[key].contents()


def load_gguf(path: Path, show_progress: bool = True) -> Checkpoint:
    """Read ``path`` into a Checkpoint with float32 weights in Hugging Face names and layout."""
    if show_progress:
        print(f"reading GGUF {path}", file=sys.stderr, flush=True)
    reader = GGUFReader(path)
    metadata = GGUFMetadata(dict(reader.fields))
    tensor_names = {tensor.name for tensor in reader.tensors}
    architecture = read_architecture(metadata, tensor_names)
    tokenizer = build_tokenizer(metadata)  # before the slow part: fail fast on an unknown tokenizer
    weights = _read_weights(reader, architecture, show_progress)
    eos_token_ids = _unique(
        int(metadata.get(key))
        for key in (
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        )
        if key in metadata
    )
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    return Checkpoint(
        architecture=architecture,
        weights=weights,
        tokenizer=tokenizer,
        source=path,
        model_name=model_name_for(path, metadata.get("general.name")),
        weights_digest=weights_digest(reader, path),
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=eos_token_ids,
    )


def read_architecture(metadata: GGUFMetadata, tensor_names: set[str]) -> LlamaArchitecture:
    """The Llama shapes and constants from ``llama.*`` metadata."""
    arch = metadata.require("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; pdserve runs Llama-architecture models"
        )
    if "rope_freqs.weight" in tensor_names:
        # Llama 3.1-style frequency scaling stored as a tensor of per-frequency factors.
        raise ValueError(
            "GGUF has a rope_freqs tensor (llama3 rope scaling), which pdserve does not support yet"
        )
    num_heads = int(metadata.require("llama.attention.head_count"))
    hidden_size = int(metadata.require("llama.embedding_length"))
    vocab_size = metadata.get("llama.vocab_size")
    if vocab_size is None:
        vocab_size = len(metadata.require("tokenizer.ggml.tokens"))
    return LlamaArchitecture(
        vocab_size=int(vocab_size),
        hidden_size=hidden_size,
        intermediate_size=int(metadata.require("llama.feed_forward_length")),
        num_layers=int(metadata.require("llama.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(metadata.get("llama.attention.head_count_kv", num_heads)),
        head_dim=int(metadata.get("llama.attention.key_length", hidden_size // num_heads)),
        rms_norm_eps=float(metadata.require("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(metadata.get("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(metadata.require("llama.context_length")),
        tie_word_embeddings="output.weight" not in tensor_names,
        rope_scaling=_rope_scaling(metadata),
    )


def _rope_scaling(metadata: GGUFMetadata) -> dict[str, Any] | None:
    kind = metadata.get("llama.rope.scaling.type")
    factor = metadata.get("llama.rope.scaling.factor", metadata.get("llama.rope.scale_linear"))
    if kind is None and factor is not None and float(factor) != 1.0:
        kind = "linear"  # older files only have rope.scale_linear
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        return {
            "rope_type": "yarn",
            "factor": float(factor),
            "original_max_position_embeddings": int(
                metadata.require("llama.rope.scaling.original_context_length")
            ),
        }
    raise ValueError(f"GGUF rope scaling type {kind!r} is not supported")


def hf_name(gguf_name: str) -> str:
    """The Hugging Face parameter name of a llama.cpp tensor name."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_NAME.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ValueError(f"unexpected tensor {gguf_name!r} in a llama GGUF")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of q_proj / k_proj output rows.

    HF's RoPE rotates the pair (x[i], x[i + head_dim/2]) of each head; llama.cpp's rotates
    adjacent (x[2i], x[2i+1]). Its converter therefore reorders each head's rows from
    [half, i] to [i, half]; this reverses that.
    """
    rows, cols = weight.shape  # weight: [num_heads * head_dim, hidden_size]
    head_dim = rows // num_heads
    # [num_heads, head_dim/2, 2, hidden] -> [num_heads, 2, head_dim/2, hidden]
    return (
        weight.reshape(num_heads, head_dim // 2, 2, cols)
        .transpose(1, 2)
        .reshape(rows, cols)
        .contiguous()
    )


def _read_weights(
    reader: GGUFReader, architecture: LlamaArchitecture, show_progress: bool
) -> dict[str, torch.Tensor]:
    expected = expected_weight_shapes(architecture)
    weights: dict[str, torch.Tensor] = {}
    for tensor in tqdm(
        reader.tensors,
        desc="loading GGUF tensors",
        unit="tensor",
        file=sys.stderr,
        disable=not show_progress,
    ):
        name = hf_name(tensor.name)
        if tensor.tensor_type not in SUPPORTED_TYPES:
            supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
            raise ValueError(
                f"tensor {tensor.name!r} has GGML type {tensor.tensor_type.name}, which pdserve cannot "
                f"dequantize (supported: {supported})"
            )
        values = dequantize(tensor.data, tensor.tensor_type)
        if np.may_share_memory(values, tensor.data):
            values = values.copy()  # F32 comes back as a view of the read-only file mapping
        weight = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        if name not in expected:
            raise ValueError(
                f"tensor {tensor.name!r} does not belong to a {architecture.num_layers}-layer model"
            )
        if tuple(weight.shape) != expected[name]:
            raise ValueError(
                f"tensor {tensor.name!r} has shape {tuple(weight.shape)}, expected {expected[name]}"
            )
        if name.endswith("q_proj.weight"):
            weight = unpermute_rope_rows(weight, architecture.num_heads)
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rope_rows(weight, architecture.num_kv_heads)
        weights[name] = weight
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"GGUF lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return weights


def weights_digest(reader: GGUFReader, path: Path) -> str:
    """sha256 over the tensor table (name, type, shape, offset) and the tensor data bytes."""
    hasher = hashlib.sha256()
    table = [
        [
            tensor.name,
            tensor.tensor_type.name,
            [int(d) for d in tensor.shape],
            int(tensor.data_offset),
        ]
        for tensor in reader.tensors
    ]
    hasher.update(json.dumps(table).encode())
    hash_file_tail(hasher, path, start=int(reader.data_offset))
    return hasher.hexdigest()


def model_name_for(path: Path, general_name: str | None) -> str:
    """A display name: the file name without extension and quantization suffix."""
    name = _QUANT_SUFFIX.sub("", path.stem)
    return name or general_name or path.stem


# ---- tokenizer ----------------------------------------------------------------------------------


def build_tokenizer(metadata: GGUFMetadata) -> Tokenizer:
    """Build the byte-level BPE tokenizer ``tokenizer.ggml.*`` describes, with ``tokenizers`` only.

    The result equals the model's original ``tokenizer.json`` pipeline: BPE over GPT-2's byte
    alphabet, the pre-tokenizer llama.cpp names in ``tokenizer.ggml.pre``, control tokens as
    special added tokens, and BOS/EOS added as ``tokenizer.ggml.add_*_token`` say.
    """
    kind = metadata.require("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer model {kind!r} is not supported; pdserve reads byte-level BPE ('gpt2')"
        )
    tokens: list[str] = metadata.require("tokenizer.ggml.tokens")
    token_types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges: list[str] = metadata.require("tokenizer.ggml.merges")

    alphabet = _byte_alphabet()
    alphabet_chars = set(alphabet.values())
    # Byte-level tokens are spelled in the byte alphabet; re-spell any stored as raw text.
    spelled = [
        token
        if set(token) <= alphabet_chars
        else "".join(alphabet[b] for b in token.encode("utf-8"))
        for token in tokens
    ]
    vocab = {token: index for index, token in enumerate(spelled)}
    pairs = [(left, right) for left, _, right in (merge.partition(" ") for merge in merges)]
    backend = RustTokenizer(
        models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
    )
    backend.pre_tokenizer = _pre_tokenizer(metadata.get("tokenizer.ggml.pre", "default"))
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, token_type in zip(tokens, token_types, strict=True)
            # A control token outside the byte alphabet is a llama.cpp mislabel, not a real token.
            if token_type == _TOKEN_TYPE_CONTROL and set(token) <= alphabet_chars
        ]
    )
    backend.add_tokens(
        [
            AddedToken(token, special=False, normalized=False)
            for token, token_type in zip(spelled, token_types, strict=True)
            if token_type == _TOKEN_TYPE_USER_DEFINED
        ]
    )

    def token_at(key: str) -> str | None:
        index = metadata.get(key)
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    config = TokenizerConfig(
        bos_token=token_at("tokenizer.ggml.bos_token_id"),
        eos_token=token_at("tokenizer.ggml.eos_token_id"),
        unk_token=token_at("tokenizer.ggml.unknown_token_id"),
        pad_token=token_at("tokenizer.ggml.padding_token_id"),
        # A byte-level BPE file that does not say adds no BOS (Hugging Face's reading).
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=metadata.get("tokenizer.chat_template"),
    )
    return Tokenizer(with_special_token_template(backend, config), config)


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_STYLE:
        return byte_level
    if pre in _DIGITS_THEN_GPT2:
        # llama.cpp splits every digit off first ("\p{N}"), then applies GPT-2's regex.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _SPLIT_REGEXES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_REGEXES[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    known = sorted(_GPT2_STYLE | _DIGITS_THEN_GPT2 | set(_SPLIT_REGEXES))
    raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(known)})")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are spelled in."""
    # Printable Latin-1 bytes stand for themselves; the rest are shifted past 255 in order.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    alphabet = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in alphabet:
            alphabet[byte] = chr(256 + shifted)
            shifted += 1
    return alphabet


def _unique(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(values))
