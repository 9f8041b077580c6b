"""Load a Hugging Face ``LlamaForCausalLM`` directory: config.json, *.safetensors, tokenizer."""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from pdserve.engine.architecture import LlamaArchitecture
from pdserve.engine.loader.checkpoint import Checkpoint, expected_weight_shapes, hash_file_tail
from pdserve.engine.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)

# Buffers some older checkpoints saved alongside the parameters; recomputed by the model.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_hf_dir(directory: Path, show_progress: bool = True) -> Checkpoint:
    """Read a Hugging Face model directory into a Checkpoint of float32 tensors."""
    config = _read_json(directory / "config.json")
    architecture = read_architecture(config)
    shards = sorted(directory.glob("*.safetensors"))
    weights = _read_weights(shards, architecture, show_progress)
    tokenizer = Tokenizer.from_hf_dir(directory)
    generation_config_path = directory / "generation_config.json"
    generation_config = (
        _read_json(generation_config_path) if generation_config_path.exists() else {}
    )
    eos_token_ids = tuple(
        dict.fromkeys(
            [*_ids(config.get("eos_token_id")), *_ids(generation_config.get("eos_token_id"))]
        )
    )
    if not eos_token_ids and tokenizer.eos_token_id is not None:
        eos_token_ids = (tokenizer.eos_token_id,)
    bos = generation_config.get("bos_token_id", config.get("bos_token_id"))
    if bos is None:
        bos = tokenizer.bos_token_id
    return Checkpoint(
        architecture=architecture,
        weights=weights,
        tokenizer=tokenizer,
        source=directory,
        model_name=_model_name(directory),
        weights_digest=weights_digest(shards),
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=eos_token_ids,
    )


def read_architecture(config: dict[str, Any]) -> LlamaArchitecture:
    """A LlamaArchitecture from a parsed ``config.json``; rejects anything but plain Llama."""
    architectures = config.get("architectures") or []
    if config.get("model_type") != "llama" or not set(architectures) & set(SUPPORTED_ARCHITECTURES):
        raise ValueError(
            f"unsupported model: architectures={architectures}, model_type={config.get('model_type')!r}; "
            f"pdserve loads {', '.join(SUPPORTED_ARCHITECTURES)} (model_type 'llama') only"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ValueError(f"Llama checkpoints with {flag}=true are not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported (only silu)")
    num_heads = int(config["num_attention_heads"])
    hidden_size = int(config["hidden_size"])
    # transformers 5 writes rope_parameters; 4.x writes rope_theta and rope_scaling.
    rope_parameters = dict(config.get("rope_parameters") or {})
    rope_theta = float(rope_parameters.pop("rope_theta", config.get("rope_theta", 10000.0)))
    rope_scaling = dict(config.get("rope_scaling") or rope_parameters or {}) or None
    if rope_scaling is not None:
        rope_scaling.pop("rope_theta", None)
        if "type" in rope_scaling and "rope_type" not in rope_scaling:
            rope_scaling["rope_type"] = rope_scaling.pop("type")
        if rope_scaling.get("rope_type") == "default" and len(rope_scaling) == 1:
            rope_scaling = None
    return LlamaArchitecture(
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden_size,
        intermediate_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=int(config.get("head_dim") or hidden_size // num_heads),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        # LlamaConfig's default is untied.
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_scaling=rope_scaling,
    )


def _read_weights(
    shards: list[Path], architecture: LlamaArchitecture, show_progress: bool
) -> dict[str, torch.Tensor]:
    expected = expected_weight_shapes(architecture)
    weights: dict[str, torch.Tensor] = {}
    handles = [safe_open(str(shard), framework="pt") for shard in shards]
    work = [(handle, name) for handle in handles for name in handle.keys()]  # noqa: SIM118
    for handle, name in tqdm(
        work, desc="loading safetensors", unit="tensor", file=sys.stderr, disable=not show_progress
    ):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and architecture.tie_word_embeddings:
            continue  # some tied checkpoints store a copy; the embedding is the one used
        if name not in expected:
            raise ValueError(
                f"unexpected tensor {name!r} in a {architecture.num_layers}-layer Llama checkpoint"
            )
        weight = handle.get_tensor(name).to(torch.float32).contiguous()
        if tuple(weight.shape) != expected[name]:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(weight.shape)}, expected {expected[name]}"
            )
        weights[name] = weight
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return weights


def weights_digest(shards: Iterable[Path]) -> str:
    """sha256 over each shard's tensor table and tensor data bytes, shards in name order."""
    hasher = hashlib.sha256()
    for shard in shards:
        with shard.open("rb") as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(header_size))
        header.pop("__metadata__", None)  # free-form; not part of the weights
        hasher.update(json.dumps(header, sort_keys=True).encode())
        hash_file_tail(hasher, shard, start=8 + header_size)
    return hasher.hexdigest()


def _model_name(directory: Path) -> str:
    resolved = directory.resolve()
    # A Hugging Face cache snapshot (models--org--name/snapshots/<commit>) is named by its repo.
    if resolved.parent.name == "snapshots" and resolved.parent.parent.name.startswith("models--"):
        return resolved.parent.parent.name.split("--")[-1]
    return resolved.name


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _ids(value: Any) -> list[int]:
    # eos_token_id may be an int, a list of ints, or absent.
    if value is None:
        return []
    if isinstance(value, list):
        return [int(item) for item in value]
    return [int(value)]
