"""A loaded checkpoint: plain float32 tensors in Hugging Face layout plus what describes them."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil
import torch

from pdserve.engine.architecture import LlamaArchitecture
from pdserve.engine.loader.model_files import resolve_model_path
from pdserve.engine.tokenizer import Tokenizer


class Hasher(Protocol):
    """What ``hashlib.sha256()`` offers that digests need."""

    def update(self, data: bytes, /) -> None: ...


@dataclass(frozen=True, eq=False)  # compared by identity: field-wise == on tensors is ambiguous
class Checkpoint:
    """Everything read from a model file, independent of the file format."""

    architecture: LlamaArchitecture
    weights: dict[str, torch.Tensor]
    """HF names and layout ([out_features, in_features]), float32, contiguous, on CPU.
    ``lm_head.weight`` is present only when embeddings are not tied."""
    tokenizer: Tokenizer
    source: Path
    """The GGUF file or Hugging Face directory the checkpoint came from."""
    model_name: str
    """Display name, e.g. "SmolLM2-135M-Instruct"."""
    weights_digest: str
    """sha256 hex over the tensors as stored in the file; equal files give equal digests."""
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    """Every id that ends generation (EOS, end-of-turn ...)."""

    @property
    def num_parameters(self) -> int:
        return sum(weight.numel() for weight in self.weights.values())

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[vocab_size, hidden_size]: the output projection, tied or not."""
        if self.architecture.tie_word_embeddings:
            return self.weights["model.embed_tokens.weight"]
        return self.weights["lm_head.weight"]


def load_checkpoint(path: str | None = None, show_progress: bool = True) -> Checkpoint:
    """Load a GGUF file or HF directory (``None``: the default model, fetched if needed)."""
    started = time.perf_counter()
    source = resolve_model_path(path, show_progress=show_progress)
    # The format loaders are imported on use: each pulls in its own libraries.
    if source.is_dir():
        from pdserve.engine.loader.hf_loader import load_hf_dir

        checkpoint = load_hf_dir(source, show_progress=show_progress)
        kind = "hf"
    else:
        from pdserve.engine.loader.gguf_loader import load_gguf

        checkpoint = load_gguf(source, show_progress=show_progress)
        kind = "gguf"
    if show_progress:
        elapsed = time.perf_counter() - started
        resident = psutil.Process().memory_info().rss
        print(
            f"loaded {checkpoint.model_name} ({kind}, {checkpoint.num_parameters / 1e6:.1f}M parameters) "
            f"in {elapsed:.1f} s; resident memory {resident / 2**30:.2f} GiB",
            file=sys.stderr,
            flush=True,
        )
    return checkpoint


def expected_weight_shapes(arch: LlamaArchitecture) -> dict[str, tuple[int, ...]]:
    """Every HF weight name of ``arch`` and its shape ([out_features, in_features])."""
    q_size = arch.num_heads * arch.head_dim
    kv_size = arch.num_kv_heads * arch.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (arch.vocab_size, arch.hidden_size),
        "model.norm.weight": (arch.hidden_size,),
    }
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, arch.hidden_size)
    for layer in range(arch.num_layers):
        prefix = f"model.layers.{layer}."
        shapes[prefix + "self_attn.q_proj.weight"] = (q_size, arch.hidden_size)
        shapes[prefix + "self_attn.k_proj.weight"] = (kv_size, arch.hidden_size)
        shapes[prefix + "self_attn.v_proj.weight"] = (kv_size, arch.hidden_size)
        shapes[prefix + "self_attn.o_proj.weight"] = (arch.hidden_size, q_size)
        shapes[prefix + "mlp.gate_proj.weight"] = (arch.intermediate_size, arch.hidden_size)
        shapes[prefix + "mlp.up_proj.weight"] = (arch.intermediate_size, arch.hidden_size)
        shapes[prefix + "mlp.down_proj.weight"] = (arch.hidden_size, arch.intermediate_size)
        shapes[prefix + "input_layernorm.weight"] = (arch.hidden_size,)
        shapes[prefix + "post_attention_layernorm.weight"] = (arch.hidden_size,)
    return shapes


def hash_file_tail(hasher: Hasher, path: Path, start: int, end: int | None = None) -> None:
    """Feed bytes [start, end) of ``path`` (to the end of file if ``end`` is None) into ``hasher``."""
    chunk_size = 8 << 20
    with path.open("rb") as file:
        file.seek(start)
        remaining = None if end is None else end - start
        while remaining is None or remaining > 0:
            chunk = file.read(chunk_size if remaining is None else min(chunk_size, remaining))
            if not chunk:
                break
            hasher.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)


def read_model_architecture(path: str | None = None) -> LlamaArchitecture:
    """The architecture of a GGUF file or HF directory without reading its weights (fast)."""
    source = resolve_model_path(path, show_progress=False)
    if source.is_dir():
        import json

        from pdserve.engine.loader.hf_loader import read_architecture as read_hf_architecture

        return read_hf_architecture(json.loads((source / "config.json").read_text()))
    from gguf import GGUFReader

    from pdserve.engine.loader.gguf_loader import GGUFMetadata
    from pdserve.engine.loader.gguf_loader import read_architecture as read_gguf_architecture

    reader = GGUFReader(source)  # memory-mapped: only the header is read
    return read_gguf_architecture(GGUFMetadata(dict(reader.fields)), {t.name for t in reader.tensors})
