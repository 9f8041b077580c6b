"""Kill -9 under load: the router, a prefill worker or a decode worker of `pdserve serve` dies at a
random moment while 16 greedy streams run (pdserve/bench/chaos.py does the work).

Every client must end with its whole, correct answer (the greedy text it gets unloaded) or an
explicit error, before its deadline: never a silently short or wrong answer, never a hang. A
worker's death costs no answer at all: a prefill worker's is recomputed, and the streams of a
decode worker resume on another (serving/resumption.py); only a router's death errors. The
survivors leak no KV blocks; a killed router takes its workers with it and they leave no KV pool
behind; once the last `serve` exits no shared-memory KV pool is left, not even the killed
processes'. Three rounds, one kill of each kind, within the suite's time budget.
"""

from __future__ import annotations

import random

from pdserve.bench.chaos import KINDS, ChaosConfig, ChaosRunner

STREAMS = 16
NEW_TOKENS = 48
SEED = 7


def test_kill_9_under_load_never_cuts_an_answer_silently() -> None:
    config = ChaosConfig(num_streams=STREAMS, max_tokens=NEW_TOKENS)
    order = list(KINDS)
    random.Random(SEED).shuffle(order)
    runner = ChaosRunner(config, seed=SEED)
    try:
        for kind in order:
            result = runner.run_round(kind)
            assert result.outcomes["truncated"] == result.outcomes["wrong"] == result.outcomes["hung"] == 0, result
            assert result.leaks == [], result.leaks
            assert result.recovery.orphans == () and result.recovery.leftover_segments == (), result.recovery
    finally:
        report = runner.finish()
    print(f"chaos:\n{report.to_markdown()}")
    assert report.kills == {kind: 1 for kind in KINDS}
    assert report.outcomes["complete"] + report.outcomes["error"] == len(KINDS) * STREAMS, report.outcomes
    # A router kill errors every stream in flight, by design. A worker kill errors none: a prefill
    # worker's death is recomputed, a decode worker's streams resume on the other decode worker.
    for worker_round in (r for r in report.rounds if r.kind != "router"):
        assert worker_round.outcomes["complete"] == STREAMS, worker_round
    # Every KV pool is gone: the live workers unlinked theirs at exit, the restarted ones removed
    # the killed workers' at start, and a killed router's workers unlinked theirs on their way out.
    assert report.final_orphans == [] and report.leftover_segments == [], report
