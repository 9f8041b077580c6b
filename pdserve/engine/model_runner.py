"""Turns a :class:`SchedulerOutput` into tensors, runs the model, and returns logits.

The runner owns the KV pool and the model; it knows nothing of requests, sampling or stopping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdserve.engine.attention import AttentionMetadata, PrefillSpan
from pdserve.engine.kv_cache import KVCachePool
from pdserve.engine.model import LlamaModel
from pdserve.engine.scheduler import ScheduledChunk, SchedulerOutput

KVHook = Callable[[int, int, torch.Tensor, torch.Tensor], None]
"""Per-sequence layer hook: (layer index, start position, k [n, kv_heads, D], v [n, kv_heads, D])."""


@dataclass
class StepLogits:
    """Logits of the chunks that asked for a sample, row i belonging to ``seq_ids[i]``."""

    seq_ids: list[str]
    logits: torch.Tensor
    """[len(seq_ids), vocab] float32."""


class ModelRunner:
    def __init__(self, model: LlamaModel, pool: KVCachePool) -> None:
        self.model = model
        self.pool = pool
        self.block_size = pool.layout.block_size
        self.device = model.device
        self._kv_layers = [pool.layer(i) for i in range(pool.layout.num_layers)]

    def execute(self, output: SchedulerOutput, kv_hooks: dict[str, KVHook] | None = None) -> StepLogits:
        if output.block_copies:
            self.pool.copy_blocks(output.block_copies)
        if not output.chunks:
            return StepLogits([], torch.empty(0, self.model.arch.vocab_size))
        # Single-token chunks (decodes) first: they share one batched attention call.
        chunks = sorted(output.chunks, key=lambda c: c.num_tokens > 1)
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        sampled_ids: list[str] = []
        row_ranges: dict[str, tuple[int, int]] = {}
        for chunk in chunks:
            start_row = len(token_ids)
            token_ids.extend(chunk.token_ids)
            chunk_positions = range(chunk.start_position, chunk.context_length)
            positions.extend(chunk_positions)
            slots.extend(self._slot(chunk.block_table, p) for p in chunk_positions)
            row_ranges[chunk.seq_id] = (start_row, len(token_ids))
            if chunk.sample:
                logits_rows.append(len(token_ids) - 1)
                sampled_ids.append(chunk.seq_id)

        meta = self._attention_metadata(chunks, slots)
        hook = self._layer_callback(kv_hooks, row_ranges, chunks) if kv_hooks else None
        logits = self.model.forward(
            torch.tensor(token_ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            meta,
            self._kv_layers,
            torch.tensor(logits_rows, dtype=torch.long, device=self.device),
            hook,
        )
        return StepLogits(sampled_ids, logits)

    def read_kv(
        self, block_table: list[int], num_tokens: int, *, start: int = 0, layers: slice = slice(None)
    ) -> torch.Tensor:
        """KV of positions [start, num_tokens) as [layers, 2, n, kv_heads, D], on CPU."""
        return self.pool.read_tokens(block_table, start, num_tokens, layers)

    def write_kv(
        self, block_table: list[int], kv: torch.Tensor, *, start: int = 0, layers: slice = slice(None)
    ) -> None:
        """Place token-major KV [layers, 2, n, kv_heads, D] at positions [start, start + n)."""
        self.pool.write_tokens(block_table, kv, start, layers)

    def close(self) -> None:
        """Drop this runner's views of the pool so the pool's memory can be released."""
        self._kv_layers = []

    # -- internals -------------------------------------------------------------------------

    def _slot(self, block_table: list[int], position: int) -> int:
        return block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _attention_metadata(self, chunks: list[ScheduledChunk], slots: list[int]) -> AttentionMetadata:
        device = self.device
        decodes = [c for c in chunks if c.num_tokens == 1]
        decode_blocks = decode_mask = decode_lengths = None
        if decodes:
            max_blocks = max(-(-c.context_length // self.block_size) for c in decodes)
            padded = [c.block_table[:max_blocks] for c in decodes]
            decode_blocks = torch.tensor([t + [0] * (max_blocks - len(t)) for t in padded])
            offsets = torch.arange(max_blocks * self.block_size)
            lengths = torch.tensor([c.context_length for c in decodes])
            decode_mask = (offsets[None, :] < lengths[:, None])[:, None, None, :]
            decode_blocks, decode_mask, decode_lengths = (
                decode_blocks.to(device), decode_mask.to(device), lengths.to(device)
            )

        prefills: list[PrefillSpan] = []
        row = len(decodes)
        for chunk in chunks[len(decodes) :]:
            num_blocks = -(-chunk.context_length // self.block_size)
            context_blocks = torch.tensor(chunk.block_table[:num_blocks], device=device)
            mask = None
            if chunk.start_position > 0:
                query_positions = torch.arange(chunk.start_position, chunk.context_length, device=device)
                key_positions = torch.arange(chunk.context_length, device=device)
                mask = key_positions[None, :] <= query_positions[:, None]
            prefills.append(PrefillSpan(row, chunk.num_tokens, context_blocks, chunk.context_length, mask))
            row += chunk.num_tokens
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            num_decode_tokens=len(decodes),
            decode_blocks=decode_blocks,
            decode_mask=decode_mask,
            prefills=prefills,
            decode_context_lens=decode_lengths,
        )

    @staticmethod
    def _layer_callback(
        kv_hooks: dict[str, KVHook],
        row_ranges: dict[str, tuple[int, int]],
        chunks: list[ScheduledChunk],
    ) -> Callable[[int, torch.Tensor, torch.Tensor], None]:
        starts = {c.seq_id: c.start_position for c in chunks}
        active = {seq_id: hook for seq_id, hook in kv_hooks.items() if seq_id in row_ranges}

        def callback(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            for seq_id, hook in active.items():
                first, last = row_ranges[seq_id]
                hook(layer, starts[seq_id], k[first:last], v[first:last])

        return callback
