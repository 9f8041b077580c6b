"""The paged KV pool: one tensor holding every layer's K and V blocks, from a pluggable allocator.

Layout (documented because peers copy blocks straight out of it):
    pool: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
``pool[layer, 0]`` are the keys and ``pool[layer, 1]`` the values of that layer. Keys are stored
after RoPE was applied.

Allocators, chosen by name:
    "heap": an ordinary tensor on the configured device.
    "shm":  a named POSIX shared-memory segment (CPU only), so a same-host peer can map the pool
            and copy blocks out of it in one step, without serializing tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import shared_memory

import torch

from pdserve.engine.architecture import LlamaArchitecture
from pdserve.engine.config import CacheConfig
from pdserve.engine.shm_segments import segment_name


@dataclass(frozen=True)
class KVLayout:
    """Shape facts of a KV pool."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * element_size

    @property
    def num_bytes(self) -> int:
        return self.bytes_per_block * self.num_blocks


def plan_layout(
    architecture: LlamaArchitecture, cache: CacheConfig, dtype: torch.dtype
) -> KVLayout:
    """How many blocks the memory budget (or the explicit count) gives."""
    unit = KVLayout(
        architecture.num_layers, 1, cache.block_size, architecture.num_kv_heads,
        architecture.head_dim, dtype,
    )
    num_blocks = cache.num_blocks or cache.memory_bytes // unit.bytes_per_block
    if num_blocks < 2:
        raise ValueError(
            f"KV memory budget of {cache.memory_bytes} bytes holds fewer than 2 blocks "
            f"of {unit.bytes_per_block} bytes; raise CacheConfig.memory_bytes"
        )
    return KVLayout(
        architecture.num_layers, num_blocks, cache.block_size, architecture.num_kv_heads,
        architecture.head_dim, dtype,
    )


class KVCachePool:
    """Owns the pool tensor and releases its memory on :meth:`close`."""

    def __init__(self, layout: KVLayout, tensor: torch.Tensor, shm: shared_memory.SharedMemory | None):
        self.layout = layout
        self.tensor = tensor
        self._shm = shm
        self._slots_memo: tuple[tuple[tuple[int, ...], int, int] | None, torch.Tensor] = (None, torch.empty(0))

    @property
    def shm_name(self) -> str | None:
        """Name a same-host peer passes to :func:`attach_shared_pool`, when shared."""
        return self._shm.name if self._shm is not None else None

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of one layer, each [num_blocks, block_size, num_kv_heads, head_dim]."""
        return self.tensor[index, 0], self.tensor[index, 1]

    def read_tokens(
        self, block_table: list[int], start: int, end: int, layers: slice = slice(None)
    ) -> torch.Tensor:
        """KV of positions [start, end) of a block table: [layers, 2, n, kv_heads, D] on the CPU.

        Safe from any thread while the blocks are referenced (so no step can reuse them).
        """
        slots = self._slots(block_table, start, end)
        return self._token_view()[layers].index_select(2, slots).cpu()

    def read_layers(
        self, block_table: list[int], start: int, end: int, layers: Sequence[int]
    ) -> Iterator[torch.Tensor]:
        """One layer at a time, [2, n, kv_heads, D] of positions [start, end) (slots computed
        once): for streaming a held KV without copying all layers at once."""
        slots = self._slots(block_table, start, end)
        view = self._token_view()
        for layer in layers:
            yield view[layer].index_select(1, slots).cpu()

    def write_tokens(
        self, block_table: list[int], kv: torch.Tensor, start: int = 0, layers: slice = slice(None)
    ) -> None:
        """Place token-major KV [layers, 2, n, kv_heads, D] at positions [start, start + n).

        Safe from any thread for blocks reserved for a request that is not scheduled yet.
        """
        slots = self._slots(block_table, start, start + kv.shape[2])
        view = self._token_view()[layers]
        view.index_copy_(2, slots, kv.to(device=view.device, dtype=self.layout.dtype))

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        for source, destination in copies:
            self.tensor[:, :, destination].copy_(self.tensor[:, :, source])

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        # A transfer writes every layer of the same positions in turn: compute their slots once.
        # (The memo is one tuple, read and replaced atomically, so threads cannot mix entries.)
        key = (tuple(block_table), start, end)
        memo_key, memo_slots = self._slots_memo
        if memo_key == key:
            return memo_slots
        block_size = self.layout.block_size
        positions = torch.arange(start, end)
        blocks = torch.tensor(block_table, dtype=torch.long)[positions // block_size]
        slots = (blocks * block_size + positions % block_size).to(self.tensor.device)
        self._slots_memo = (key, slots)
        return slots

    def _token_view(self) -> torch.Tensor:
        """The pool as [layers, 2, num_blocks * block_size, kv_heads, D]: one row per token slot."""
        layout = self.layout
        return self.tensor.view(
            layout.num_layers, 2, layout.num_blocks * layout.block_size, layout.num_kv_heads, layout.head_dim
        )

    def close(self) -> None:
        """Free the pool; a shared segment is unlinked, since this process created it."""
        self.tensor = torch.empty(0)
        if self._shm is not None:
            self._shm.close()
            self._shm.unlink()
            self._shm = None


def allocate_pool(layout: KVLayout, cache: CacheConfig, device: torch.device) -> KVCachePool:
    if cache.allocator == "heap":
        return KVCachePool(layout, torch.zeros(layout.shape, dtype=layout.dtype, device=device), None)
    if device.type != "cpu":
        raise ValueError("the 'shm' KV allocator maps host memory; use 'heap' on an accelerator")
    # Always this naming: stale pools are found by it, and peers may copy only from pools so named.
    shm = shared_memory.SharedMemory(name=segment_name(), create=True, size=layout.num_bytes)
    return KVCachePool(layout, _tensor_over(shm, layout), shm)


def attach_shared_pool(name: str, layout: KVLayout) -> tuple[torch.Tensor, shared_memory.SharedMemory]:
    """Map a peer's shared pool read/write; the caller closes (never unlinks) the segment."""
    shm = shared_memory.SharedMemory(name=name, create=False)
    return _tensor_over(shm, layout), shm


def _tensor_over(shm: shared_memory.SharedMemory, layout: KVLayout) -> torch.Tensor:
    num_elements = math.prod(layout.shape)
    flat = torch.frombuffer(shm.buf, dtype=layout.dtype, count=num_elements)
    return flat.view(layout.shape)
