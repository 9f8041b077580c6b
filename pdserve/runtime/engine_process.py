"""An engine in a process of its own, with a ZeroMQ control channel and a KV connector.

``python -m pdserve.runtime.engine_process --config JSON`` loads the model, starts the KV
server, warms up with one tiny request, binds a ROUTER socket on loopback and prints one line,
``PDSERVE_ENGINE_READY {"control": ..., "kv_address": ..., "pid": ...}``, to stdout. Clients
(:class:`pdserve.runtime.engine_client.EngineProcess`) then send the ops described in
:mod:`pdserve.runtime.protocol`. The process exits on the ``shutdown`` op, on SIGTERM/SIGINT,
and when its parent dies (Linux parent-death signal), releasing its KV and shared memory.
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import json
import logging
import os
import queue
import signal
import sys
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import zmq

from pdserve.engine.config import EngineConfig
from pdserve.logs import configure_logging
from pdserve.runtime.engine_service import EngineService, warmed_up_engine
from pdserve.transfer.config import TransferConfig

log = logging.getLogger("pdserve.engine_process")
READY_PREFIX = "PDSERVE_ENGINE_READY "


@dataclass(frozen=True)
class EngineProcessConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    control_host: str = "127.0.0.1"

    def to_json(self) -> str:
        return json.dumps(
            {"engine": self.engine.to_dict(), "transfer": asdict(self.transfer), "control_host": self.control_host}
        )

    @classmethod
    def from_json(cls, text: str) -> EngineProcessConfig:
        data = json.loads(text)
        return cls(
            engine=EngineConfig.from_dict(data["engine"]),
            transfer=TransferConfig(**data["transfer"]),
            control_host=data.get("control_host", "127.0.0.1"),
        )


def serve(config: EngineProcessConfig) -> None:
    service = EngineService(lambda: warmed_up_engine(config.engine), config.transfer)
    kv_address = service.start()
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port(f"tcp://{config.control_host}")
    control = f"tcp://{config.control_host}:{port}"
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(READY_PREFIX + json.dumps({"control": control, "kv_address": kv_address, "pid": os.getpid()}), flush=True)

    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(service.wake_fd, zmq.POLLIN)
    try:
        while not stop.is_set():
            for item, _ in poller.poll(200):
                if item is router:
                    client, raw = router.recv_multipart()
                    reply = _dispatch(service, client, raw, stop)
                    router.send_multipart([client, json.dumps(reply).encode()])
                else:
                    os.read(service.wake_fd, 4096)
            while True:
                try:
                    client, event = service.events.get_nowait()
                except queue.Empty:
                    break
                router.send_multipart([client, json.dumps(event).encode()])
    finally:
        service.close()
        router.close()
        context.term()


def _dispatch(service: EngineService, client: bytes, raw: bytes, stop: threading.Event) -> dict[str, Any]:
    op_id: Any = None
    try:
        message = json.loads(raw)
        op_id = message.get("id")
        if message.get("op") == "shutdown":
            stop.set()
            return {"event": "reply", "id": op_id, "ok": True, "result": {}}
        return {"event": "reply", "id": op_id, "ok": True, "result": service.handle(client, message)}
    except (ValueError, TypeError, KeyError) as error:
        return {"event": "reply", "id": op_id, "ok": False, "error": str(error), "status": 400}
    except Exception as error:
        log.exception("op failed")
        return {"event": "reply", "id": op_id, "ok": False, "error": str(error), "status": 500}


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies, so no worker outlives its supervisor."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one pdserve engine with a control channel.")
    parser.add_argument("--config", required=True, help="EngineProcessConfig as JSON")
    args = parser.parse_args(argv)
    die_with_parent()
    # A crash in native code (a kernel, a mapping) then prints every thread's Python stack.
    faulthandler.enable()
    configure_logging("engine")
    serve(EngineProcessConfig.from_json(args.config))


if __name__ == "__main__":
    main()
