"""The prefill/decode seam: what a prefill engine hands a decode engine, and how it is checked.

A :class:`KVHandoff` is transport-free plain data. Moving it between processes (shared memory,
TCP, compression) is the transfer layer's job; this module only defines the contents and the
compatibility fingerprint both sides must agree on.

KV layout: ``kv`` is ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]`` in the KV-cache
dtype, token-major (independent of either side's block layout); ``kv[layer, 0]`` are the keys
after RoPE, ``kv[layer, 1]`` the values, for prompt positions ``0 .. num_tokens - 1``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from pdserve.engine.sampler import SampledToken

PROTOCOL_VERSION = 1


class IncompatibleHandoffError(ValueError):
    """A handoff produced by a different model, dtype or layout than this engine's."""


def compatibility_fields(
    weights_digest: str,
    kv_dtype: torch.dtype,
    block_size: int,
    arch_description: dict[str, Any],
) -> dict[str, Any]:
    """Every fact both sides must share for the KV of one to be valid in the other."""
    return {
        "protocol_version": PROTOCOL_VERSION,
        "weights_digest": weights_digest,
        "kv_dtype": str(kv_dtype).removeprefix("torch."),
        "block_size": block_size,
        "num_layers": arch_description["num_layers"],
        "num_kv_heads": arch_description["num_kv_heads"],
        "head_dim": arch_description["head_dim"],
        "rope_theta": arch_description["rope_theta"],
        "rope_scaling": arch_description["rope_scaling"],
    }


def fingerprint(fields: dict[str, Any]) -> str:
    """sha256 of the compatibility fields, stable across processes."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def check_compatible(expected: dict[str, Any], received: dict[str, Any]) -> None:
    """Raise :class:`IncompatibleHandoffError` naming the first field that differs."""
    for name in sorted(set(expected) | set(received)):
        if expected.get(name) != received.get(name):
            raise IncompatibleHandoffError(
                f"KV handoff is incompatible with this engine: {name} is "
                f"{received.get(name)!r} in the handoff but {expected.get(name)!r} here"
            )


@dataclass
class KVHandoff:
    """A prompt's KV cache plus what decoding needs to continue exactly where prefill stopped."""

    request_id: str
    prompt_token_ids: list[int]
    kv: torch.Tensor
    """[num_layers, 2, num_tokens, num_kv_heads, head_dim]; num_tokens <= len(prompt_token_ids)."""
    compatibility: dict[str, Any]
    """The producer's :func:`compatibility_fields`; checked field by field on import."""
    seed: int
    """The resolved sampling seed, so decoding continues the same random stream."""
    first_tokens: list[SampledToken] = field(default_factory=list)
    """The first sampled token of each choice; empty unless ``kv`` covers the whole prompt."""
    model_name: str = ""

    @property
    def num_tokens(self) -> int:
        """Prompt positions whose KV this handoff carries."""
        return int(self.kv.shape[2])

    @property
    def is_complete(self) -> bool:
        return self.num_tokens == len(self.prompt_token_ids) and bool(self.first_tokens)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.compatibility)

    @property
    def header(self) -> HandoffHeader:
        return HandoffHeader(
            request_id=self.request_id,
            prompt_token_ids=list(self.prompt_token_ids),
            num_tokens=self.num_tokens,
            compatibility=dict(self.compatibility),
            seed=self.seed,
            first_tokens=list(self.first_tokens),
            model_name=self.model_name,
        )

    def truncated(self, num_blocks: int) -> KVHandoff:
        """The first ``num_blocks`` complete blocks only (e.g. what arrived of a cut transfer)."""
        block_size = int(self.compatibility["block_size"])
        num_tokens = min(num_blocks * block_size, (len(self.prompt_token_ids) // block_size) * block_size)
        return replace(self, kv=self.kv[:, :, :num_tokens].contiguous(), first_tokens=[])


@dataclass
class HandoffHeader:
    """A handoff without its KV bytes: what a transfer announces before the data, as JSON."""

    request_id: str
    prompt_token_ids: list[int]
    num_tokens: int
    """Prompt positions whose KV follows (complete blocks only, unless it is the whole prompt)."""
    compatibility: dict[str, Any]
    seed: int
    first_tokens: list[SampledToken] = field(default_factory=list)
    """Empty while the prefill is still running (a pipelined transfer sends them last)."""
    model_name: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "prompt_token_ids": self.prompt_token_ids,
            "num_tokens": self.num_tokens,
            "compatibility": self.compatibility,
            "seed": self.seed,
            "first_tokens": [sampled_token_to_json(t) for t in self.first_tokens],
            "model_name": self.model_name,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HandoffHeader:
        return cls(
            request_id=str(data["request_id"]),
            prompt_token_ids=[int(t) for t in data["prompt_token_ids"]],
            num_tokens=int(data["num_tokens"]),
            compatibility=dict(data["compatibility"]),
            seed=int(data["seed"]),
            first_tokens=[sampled_token_from_json(t) for t in data.get("first_tokens", [])],
            model_name=str(data.get("model_name", "")),
        )


@dataclass
class HeldKV:
    """A finished prefill whose KV stays in this engine's blocks until released (for a transfer)."""

    header: HandoffHeader
    block_table: list[int]


def sampled_token_to_json(token: SampledToken) -> dict[str, Any]:
    top = None if token.top_logprobs is None else [list(pair) for pair in token.top_logprobs]
    return {"token_id": token.token_id, "logprob": token.logprob, "top_logprobs": top}


def sampled_token_from_json(data: dict[str, Any]) -> SampledToken:
    top = data.get("top_logprobs")
    return SampledToken(
        token_id=int(data["token_id"]),
        logprob=None if data.get("logprob") is None else float(data["logprob"]),
        top_logprobs=None if top is None else tuple((int(i), float(lp)) for i, lp in top),
    )
