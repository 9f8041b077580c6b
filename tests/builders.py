"""Small builders for tests of the pure-Python scheduling layer."""

from __future__ import annotations

import itertools

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import SchedulerConfig
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import Sequence

_ids = itertools.count()


def make_sequence(
    prompt: list[int], max_tokens: int = 8, priority: int = 0, block_size: int = 4, salt: str | None = None
) -> Sequence:
    number = next(_ids)
    return Sequence(
        seq_id=f"r{number}#0",
        request_id=f"r{number}",
        choice_index=0,
        prompt_token_ids=list(prompt),
        max_tokens=max_tokens,
        arrival_time=float(number),
        priority=priority,
        cache_salt=salt,
        block_size=block_size,
    )


def make_scheduler(
    num_blocks: int = 32,
    block_size: int = 4,
    max_num_batched_tokens: int = 16,
    max_num_seqs: int = 8,
    prefix_caching: bool = True,
    long_prefill_token_threshold: int | None = None,
) -> Scheduler:
    manager = BlockManager(num_blocks, block_size, prefix_caching)
    config = SchedulerConfig(
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        long_prefill_token_threshold=long_prefill_token_threshold,
    )
    return Scheduler(config, manager)
