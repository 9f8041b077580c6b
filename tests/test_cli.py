"""The pdserve command line, run as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fixtures_model import default_model_path


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pdserve.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_help_explains_every_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("generate", "export", "bench"):
        assert command in result.stdout
    assert "--max-tokens" in run_cli("generate", "--help").stdout


def test_generate_prints_the_greedy_completion() -> None:
    result = run_cli("generate", "The capital of France is", "--max-tokens", "8", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "loaded SmolLM2-135M-Instruct" in result.stderr  # the load report


def test_every_engine_command_takes_the_float32_copies_switch() -> None:
    for command in (("generate",), ("serve",), ("worker",), ("bench", "engine")):
        assert "--no-large-batch-float32" in run_cli(*command, "--help").stdout, command
    result = run_cli("generate", "The capital of France is", "--max-tokens", "8", "--no-large-batch-float32")
    assert result.returncode == 0 and "Paris" in result.stdout, result.stderr


def test_generate_reports_bad_input_without_a_traceback() -> None:
    result = run_cli("generate", "hi", "--max-tokens", "0")
    assert result.returncode == 2
    assert "max_tokens must be at least 1" in result.stderr and "Traceback" not in result.stderr
    missing = run_cli("generate", "hi", "--model", "/nonexistent/model.gguf")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_export_writes_a_hugging_face_directory(tmp_path: Path) -> None:
    out = tmp_path / "hf"
    result = run_cli("export", "--hf-dir", str(out), "--model", str(default_model_path()))
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (out / "model.safetensors").stat().st_size > 100_000_000
    assert (out / "tokenizer.json").exists()


def test_an_open_api_off_loopback_is_refused_unless_insecure() -> None:
    """`--host` off loopback without `--api-key` exits before binding anything (or starting
    workers); the message says what to do. Nothing here listens off loopback."""
    for command in (("router", "--decode", "http://127.0.0.1:9"), ("serve",)):
        result = run_cli(*command, "--host", "0.0.0.0", timeout=60)
        assert result.returncode == 2, result.stderr
        assert "off loopback" in result.stderr and "--api-key" in result.stderr and "--insecure" in result.stderr
        assert "Traceback" not in result.stderr


def test_kv_transfer_options_reach_workers_and_router() -> None:
    """serve forwards --kv-backend and --kv-codec to every worker, and --kv-pipeline to its router;
    the codec choices are the codecs that exist (cli_args spells them out to stay light)."""
    from pdserve.cli import _build_parser
    from pdserve.serving.cli_args import KV_CODECS, router_config_from_args
    from pdserve.serving.serve import worker_argv
    from pdserve.transfer.codec_choice import AUTO
    from pdserve.transfer.codecs import CODEC_NAMES

    assert (*CODEC_NAMES, AUTO) == KV_CODECS
    args = _build_parser().parse_args(["serve", "--kv-backend", "tcp", "--kv-codec", "int8", "--no-kv-pipeline"])
    argv = worker_argv(args, "decode", 8102, "1", "model.gguf", "dense")
    assert argv[argv.index("--kv-backend") + 1] == "tcp" and argv[argv.index("--kv-codec") + 1] == "int8"
    assert router_config_from_args(args).kv_pipeline is False
    defaults = _build_parser().parse_args(["serve"])
    assert (defaults.kv_backend, defaults.kv_codec) == ("shm", "none")
    assert router_config_from_args(defaults).kv_pipeline is True
    router = _build_parser().parse_args(["router", "--kv-codec", "fp8"])
    assert router.kv_codec == "fp8" and router.kv_pipeline is True
    worker = _build_parser().parse_args(["worker", "--kv-codec", "int8"])
    assert worker.kv_codec == "int8"


def test_serve_refuses_a_codec_over_shared_memory() -> None:
    result = run_cli("serve", "--kv-codec", "int8", timeout=60)
    assert result.returncode == 2 and "--kv-backend tcp" in result.stderr, result.stderr
