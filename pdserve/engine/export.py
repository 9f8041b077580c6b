"""Write a Checkpoint as a Hugging Face ``LlamaForCausalLM`` directory (safetensors).

The result loads in transformers (``AutoModelForCausalLM.from_pretrained``), in vLLM, and back
into pdserve through ``hf_loader`` with identical weights and tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pdserve.engine.loader.checkpoint import Checkpoint

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_hf_dir(checkpoint: Checkpoint, out_dir: Path, dtype: str = "float32") -> Path:
    """Write config.json, model.safetensors, tokenizer and generation config into ``out_dir``."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "config.json", hf_config(checkpoint, dtype))
    _write_json(out_dir / "generation_config.json", generation_config(checkpoint))
    tensors = {
        name: weight.to(_DTYPES[dtype]).contiguous() for name, weight in checkpoint.weights.items()
    }
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = checkpoint.tokenizer
    if tokenizer.config.model_max_length is None:
        tokenizer = tokenizer.with_config(
            model_max_length=checkpoint.architecture.max_position_embeddings
        )
    tokenizer.save_hf(out_dir)
    return out_dir


def hf_config(checkpoint: Checkpoint, dtype: str = "float32") -> dict[str, Any]:
    """``config.json`` of a LlamaForCausalLM, every field spelled out (transformers 4.x style,
    which transformers 5 and vLLM also read)."""
    arch = checkpoint.architecture
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "rope_scaling": arch.rope_scaling,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": checkpoint.bos_token_id,
        "eos_token_id": _one_or_many(checkpoint.eos_token_ids),
        "pad_token_id": checkpoint.tokenizer.pad_token_id,
        "torch_dtype": dtype,
    }


def generation_config(checkpoint: Checkpoint) -> dict[str, Any]:
    """``generation_config.json``: which ids start and end a generation."""
    return {
        "bos_token_id": checkpoint.bos_token_id,
        "eos_token_id": _one_or_many(checkpoint.eos_token_ids),
        "pad_token_id": checkpoint.tokenizer.pad_token_id,
    }


def _one_or_many(token_ids: tuple[int, ...]) -> int | list[int] | None:
    if not token_ids:
        return None
    return token_ids[0] if len(token_ids) == 1 else list(token_ids)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
