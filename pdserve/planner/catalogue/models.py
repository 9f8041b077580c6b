"""Model architecture facts, enough to cost a forward pass: shapes in, parameters, bytes and FLOPs out.

Dense decoder-only transformers of the Llama family (Llama, Mistral, Qwen2): GQA attention with
q/k/v/o projections, a gated MLP (gate, up, down), RMSNorm. Mixture-of-experts is not modelled.

The shipped catalogue is ``data/models.json`` (values from each model's published config.json);
``model_from_config_json`` reads any Hugging Face config.json of this family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.planner.catalogue.json_file import EntryFields, load_catalogue

SECTION = "models"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1, "int8": 1}


def dtype_bytes(dtype: str) -> int:
    """Bytes of one element of ``dtype`` (float32, bfloat16, float16, float8, int8)."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPE_BYTES)}") from None


@dataclass(frozen=True)
class ModelSpec:
    """The shapes of one checkpoint and what follows from them."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    """The output projection reuses the embedding table (stored once, still multiplied every token)."""
    attention_bias: bool = False
    """q/k/v projections carry a bias (Qwen2); negligible in FLOPs, counted in parameters."""
    stated_params: int | None = None
    """The total the publisher states, to check params() against."""
    source: str = ""

    def __post_init__(self) -> None:
        for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                    "intermediate_size", "vocab_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{self.name}: {key} must be positive, got {getattr(self, key)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.name}: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    # Parameters. Projections are [in, out] matrices; h = hidden, q = heads * head_dim,
    # kv = kv_heads * head_dim: q_proj h*q, k_proj and v_proj h*kv each, o_proj q*h,
    # gate/up h*I each, down I*h.

    def attention_matmul_params(self) -> int:
        """Weights of q, k, v and o projections in one layer."""
        q_width = self.num_heads * self.head_dim
        kv_width = self.num_kv_heads * self.head_dim
        return 2 * self.hidden_size * q_width + 2 * self.hidden_size * kv_width

    def mlp_params(self) -> int:
        """Weights of gate, up and down projections in one layer."""
        return 3 * self.hidden_size * self.intermediate_size

    def layer_matmul_params(self) -> int:
        """Weights every token is multiplied by in the decoder layers (all layers)."""
        return self.num_layers * (self.attention_matmul_params() + self.mlp_params())

    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def matmul_params(self) -> int:
        """Every weight a step multiplies: the decoder layers plus the output projection.

        The input embedding is a lookup, not a matmul, so an untied embedding table is
        resident in memory but neither multiplied nor streamed in full each step.
        """
        return self.layer_matmul_params() + self.lm_head_params()

    def params(self) -> int:
        """Total parameters computed from the shapes (what the weights occupy)."""
        per_layer = self.attention_matmul_params() + self.mlp_params() + 2 * self.hidden_size
        if self.attention_bias:
            per_layer += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        embeddings = self.vocab_size * self.hidden_size
        output = 0 if self.tie_word_embeddings else self.lm_head_params()
        return self.num_layers * per_layer + embeddings + output + self.hidden_size

    def weight_bytes(self, dtype: str) -> int:
        return self.params() * dtype_bytes(dtype)

    def kv_bytes_per_token(self, dtype: str) -> int:
        """K and V of one token across all layers: 2 * layers * kv_heads * head_dim * dtype bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes(dtype)

    # FLOPs. A matmul of a [1, n] row by an [n, m] matrix is n*m multiply-adds = 2*n*m FLOPs.

    def linear_flops_per_token(self) -> int:
        """FLOPs of the projections for one token, including the output projection: 2 * matmul params."""
        return 2 * self.matmul_params()

    def attention_flops(self, num_new_tokens: int, num_cached_tokens: int = 0) -> int:
        """FLOPs of scores and weighted sums for new tokens appended after cached ones.

        New token i (1-based) attends to num_cached_tokens + i keys (causal, itself included).
        Per head and key, q.k is head_dim multiply-adds and p*v another head_dim: 4 * head_dim
        FLOPs. Summed over the new tokens: keys = n*c + n*(n+1)/2. Softmax is not counted.
        """
        if num_new_tokens < 0 or num_cached_tokens < 0:
            raise ValueError("token counts must be >= 0")
        n, c = num_new_tokens, num_cached_tokens
        keys = n * c + n * (n + 1) // 2
        return 4 * self.num_layers * self.num_heads * self.head_dim * keys

    def check_stated_params(self, tolerance: float = 0.03) -> None:
        """Raise if params() is off the stated total by more than ``tolerance`` (a fraction)."""
        if self.stated_params is None:
            return
        error = abs(self.params() - self.stated_params) / self.stated_params
        if error > tolerance:
            raise ValueError(
                f"{self.name}: {self.params():,} parameters from the shapes, stated "
                f"{self.stated_params:,} ({error:.1%} apart): a shape is probably wrong"
            )


def model_from_config_json(path: Path, name: str | None = None) -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json (Llama, Mistral, Qwen2 and similar)."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read config.json: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path}: config.json must be a JSON object")
    if any(key in config for key in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise ValueError(f"{path}: mixture-of-experts models are not modelled by the planner yet")

    def required(key: str) -> int:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}: config.json needs an integer {key!r}, got {value!r}")
        return value

    hidden_size = required("hidden_size")
    num_heads = required("num_attention_heads")
    num_kv_heads = config.get("num_key_value_heads") or num_heads
    head_dim = config.get("head_dim") or hidden_size // num_heads
    model_type = config.get("model_type", "")
    return ModelSpec(
        name=name or config.get("_name_or_path") or Path(path).resolve().parent.name,
        num_layers=required("num_hidden_layers"),
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=int(num_kv_heads),
        head_dim=int(head_dim),
        intermediate_size=required("intermediate_size"),
        vocab_size=required("vocab_size"),
        # Llama, Mistral and Qwen2 configs default to untied when the key is absent.
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        # Qwen2 has q/k/v biases without saying so; Llama-style configs say attention_bias.
        attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
        source=str(path),
    )


def load_model_catalogue(path: Path | None = None) -> dict[str, ModelSpec]:
    """The shipped model catalogue, with the entries of the user file at ``path`` merged in by name."""
    return load_catalogue("models.json", SECTION, "model", path, _parse_model)


def _parse_model(name: str, fields: EntryFields) -> ModelSpec:
    shapes: dict[str, Any] = {
        key: fields.integer(key)
        for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                    "intermediate_size", "vocab_size")
    }
    tied, bias = fields.flag("tie_word_embeddings"), fields.flag("attention_bias", default=False)
    stated, source = fields.optional_integer("stated_params"), fields.text("source", default="")
    fields.finish()
    try:
        return ModelSpec(name=name, tie_word_embeddings=tied, attention_bias=bias,
                         stated_params=stated, source=source, **shapes)
    except ValueError as exc:
        raise ValueError(f"{fields.where}: {exc}") from exc

