"""A busy neighbour for `pdserve plan calibrate --neighbour-load`: the engine decoding on the cores
the calibrated engine leaves free.

A one-thread profile measured beside an idle core is optimistic for a disaggregated pair or two
replicas, whose workers run at once and share the memory bandwidth and the last-level cache: a
decode step is bound by reading the weights. With this load the calibration measures the core as
such a deployment sees it. The neighbour is a real engine in a process of its own (pinned to the
other cores), keeping a batch of requests decoding until it is stopped, its parent dies, or
``--max-seconds`` pass.

    python -m pdserve.planner.calibrate.neighbour_load --cores 1 [--batch 8] [--max-seconds 1800]
"""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from types import TracebackType

from pdserve.runtime.exit_status import describe_exit

READY = "pdserve-neighbour-load: decoding"


class NeighbourLoad:
    """``with NeighbourLoad(cores, model, dtype):`` the engine decodes on ``cores`` inside the block."""

    def __init__(self, cores: Sequence[int], model: str | None, dtype: str, batch: int = 8,
                 ready_timeout: float = 300.0) -> None:
        if not cores:
            raise ValueError("a neighbour load needs at least one core of its own")
        self.cores = list(cores)
        self._command = [sys.executable, "-m", "pdserve.planner.calibrate.neighbour_load", "--cores",
                         ",".join(map(str, self.cores)), "--dtype", dtype, "--batch", str(batch)]
        if model:
            self._command += ["--model", model]
        self._ready_timeout = ready_timeout
        self._process: subprocess.Popen[bytes] | None = None

    def describe(self) -> str:
        return f"an engine decoding a batch on core(s) {','.join(map(str, self.cores))}"

    def __enter__(self) -> NeighbourLoad:
        # Unbuffered: select() sees the pipe itself, so no line can wait unseen in a buffer.
        process = subprocess.Popen(self._command, stdout=subprocess.PIPE, bufsize=0)
        self._process = process
        deadline = time.monotonic() + self._ready_timeout
        assert process.stdout is not None
        # The child prints READY once its batch decodes; anything else on stdout is skipped. Wait
        # with a deadline: a child that hangs before printing must not hang the calibration.
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([process.stdout], [], [], left)
            if not readable:
                break
            line = process.stdout.readline()
            if not line:  # the child exited
                break
            if line.startswith(READY.encode()):
                return self
        self._stop()
        raise RuntimeError(f"the neighbour load did not start ({describe_exit(process.returncode)}): "
                           f"{' '.join(self._command)}")

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop()

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(cores: list[int], model: str | None, dtype: str, batch: int, max_seconds: float) -> None:
    from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.runtime.engine_process import die_with_parent

    die_with_parent()
    os.sched_setaffinity(0, cores)
    engine = LLMEngine(EngineConfig(model=ModelConfig(path=model, dtype=dtype, num_threads=len(cores)),
                                    cache=CacheConfig(enable_prefix_caching=False), show_progress=False))
    # 512-token prompts decoding 256 tokens, replaced as they finish: contexts of 512-768.
    params = SamplingParams(max_tokens=256, ignore_eos=True)
    started, added, announced = time.monotonic(), 0, False
    while time.monotonic() - started < max_seconds:
        while len(engine.request_ids()) < batch:
            engine.add_request([(added * 31 + i * 7) % 30000 + 100 for i in range(512)], params, f"neighbour-{added}")
            added += 1
        engine.step()
        if (
            not announced
            and not engine.scheduler.waiting
            and not any(s.is_prefilling for s in engine.scheduler.running)
        ):
            print(READY, flush=True)
            announced = True
    engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", required=True, help="comma-separated CPU ids to pin to (and use as threads)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="stop after this long in any case")
    args = parser.parse_args(argv)
    run([int(c) for c in args.cores.split(",")], args.model, args.dtype, args.batch, args.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
