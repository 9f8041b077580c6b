"""The interface between a cost model (roofline, calibrated profile) and the simulator.

The simulator only needs to know how long one engine step takes and how many bytes of KV a
token costs (for transfers and memory); keeping that a Protocol lets a roofline estimate, a
calibrated profile of this machine or an operator-supplied GPU profile drive the same simulation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class StepCostModel(Protocol):
    def step_seconds(self, prefill_chunks: Sequence[tuple[int, int]], decode_contexts: Sequence[int]) -> float:
        """One engine step.

        `prefill_chunks` are (new_tokens, tokens_already_in_context) pairs; `decode_contexts`
        are the context lengths of the sequences decoding one token each.
        """
        ...

    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token occupies (all layers, keys and values)."""
        ...
