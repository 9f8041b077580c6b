"""Engine configuration: a tree of frozen, validated dataclasses.

Values known only at run time (the number of KV blocks that fit the memory budget) live in the
objects that compute them, never written back here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pdserve.engine.layers.formats import WEIGHT_FORMATS

_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to load and how to run them."""

    path: str | None = None
    """GGUF file or Hugging Face directory; None means the default model (SmolLM2-135M-Instruct)."""
    dtype: str = "auto"
    """Compute dtype: auto (bfloat16 on GPUs and CPUs with bf16 hardware, else float32),
    float32, bfloat16 or float16."""
    kv_cache_dtype: str | None = None
    """dtype of the paged KV cache; None means the same as ``dtype``."""
    device: str = "cpu"
    """torch device string, e.g. "cpu" or "cuda:0"."""
    weight_format: str = "dense"
    """Projection weights, one of ``layers.formats.WEIGHT_FORMATS``: "dense" (the compute dtype);
    weight-only "int8" / "int4" for decode batches, which read every weight each step (larger
    batches run dense); "w8a8", int8 weights times activations quantized to int8 per token on
    every call, for CPUs whose int8 dot products outrun their float ones; "w8a16", the same with
    each activation carried as two int8 digits, slower than w8a8 and far more accurate; or
    "int4+w8a16", int4 for decode batches and w8a16 above, on bf16 CPUs. Which rows run which
    kernel is the crossover table's (layers/formats.py; docs/engine.md)."""
    max_model_len: int | None = None
    """Longest prompt + output in tokens; None means the model's trained context length."""
    num_threads: int | None = None
    """torch intra-op threads on CPU; None leaves torch's default."""
    attention: str = "auto"
    """Decode attention, a layer's small ops and the int4/int8 GEMVs: "native" (C++ kernels, the
    attention reading the paged cache in place, CPU only, built on first use for the CPU's
    instruction set), "torch" (gather + SDPA, torch's kernels), or "auto" (native where the CPU
    has AVX2 or AVX-512 and they build; torch otherwise)."""

    large_batch_float32: bool = True
    """On CPUs where bf16 projections are packed for oneDNN, also keep float32 copies and multiply
    batches above the crossover table's rows (prefill chunks) in float32: prefill ran 1.3x faster
    on the 2-core Xeon, at 4 more bytes per weight (docs/engine.md). No effect elsewhere."""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in _DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be one of {', '.join(WEIGHT_FORMATS)}, got {self.weight_format!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be positive, got {self.num_threads}")
        if self.attention not in ("auto", "native", "torch"):
            raise ValueError(f"attention must be auto, native or torch, got {self.attention!r}")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: block geometry, memory budget and where the pool lives."""

    block_size: int = 16
    """Tokens per KV block."""
    memory_bytes: int = 512 * 1024 * 1024
    """Memory budget of the KV pool; the block count is derived from it (unless num_blocks is set)."""
    num_blocks: int | None = None
    """Exact number of blocks, overriding memory_bytes (tests use small pools to force preemption)."""
    enable_prefix_caching: bool = True
    """Reuse full blocks whose chained hash matches an earlier request's."""
    allocator: str = "heap"
    """Where the KV pool tensor lives: "heap" (process memory) or "shm" (named shared memory)."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.memory_bytes < 1:
            raise ValueError(f"memory_bytes must be positive, got {self.memory_bytes}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2, got {self.num_blocks}")
        if self.allocator not in ("heap", "shm"):
            raise ValueError(f"allocator must be 'heap' or 'shm', got {self.allocator!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching policy."""

    max_num_batched_tokens: int = 512
    """Token budget of one engine step: decode tokens first, then prefill chunks fill the rest."""
    max_num_seqs: int = 64
    """Most sequences running at once."""
    long_prefill_token_threshold: int | None = None
    """Largest prefill chunk of one request per step; None means the whole token budget."""

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be positive")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be positive")
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 1:
            raise ValueError("long_prefill_token_threshold must be positive")


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine instance needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    show_progress: bool = True
    """Print loading progress and the load report to stderr."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data, e.g. to configure an engine in another process."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineConfig:
        return cls(
            model=ModelConfig(**data.get("model", {})),
            cache=CacheConfig(**data.get("cache", {})),
            scheduler=SchedulerConfig(**data.get("scheduler", {})),
            show_progress=bool(data.get("show_progress", True)),
        )
