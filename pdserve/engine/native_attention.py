"""The native decode attention kernel (CPU): built from ``native/paged_decode_attention.cpp`` on
first use, cached, and registered as ``torch.ops.pdserve.paged_decode_attention``.

Why a kernel of our own: decode attention in plain torch first gathers every sequence's context
out of the paged cache into a contiguous copy (``index_select``), then runs SDPA on it. At batch 8
on one core that is about a quarter of a decode step (the gather 12%, SDPA 15%, measured with
``benchmarks/profile_decode.py``). The kernel reads the blocks in place through the block table.

It is compiled for the CPU it runs on (``-march=native``) into
``<pdserve cache>/native/<key>/``, the key covering the source, the flags, torch's version and the
CPU's feature flags, so a cache shared between machines never hands one the other's binary. The
first build takes 15-30 s; ``python -m pdserve.engine.native_attention`` builds ahead of time
(``scripts/bootstrap`` does). Building needs a C++ compiler and ninja; without them, or on a
failed build, :func:`load_paged_decode_attention` returns None and the engine keeps the torch path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pdserve import envs

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "native" / "paged_decode_attention.cpp"
CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp")
LDFLAGS = ("-fopenmp",)
EXTENSION_NAME = "pdserve_paged_decode_attention"

PagedDecodeAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor
]
"""(q [seqs, heads, D], k_cache, v_cache [blocks, block_size, kv_heads, D], block_tables
[seqs, max_blocks] int64, context_lens [seqs] int64, scale) -> [seqs, heads, D] float32."""


def build_directory(cache_root: Path) -> Path:
    """Where this source, built with these flags for this torch and this CPU, lives."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join(CFLAGS + LDFLAGS).encode())
    key.update(f"{torch.__version__} {sys.version_info[:2]} {platform.machine()}".encode())
    key.update(_cpu_flags().encode())
    return cache_root / "native" / key.hexdigest()[:16]


@functools.cache  # the op registry it fills is process-wide; build and register once per process
def load_paged_decode_attention() -> PagedDecodeAttention | None:
    """The kernel, built if needed; None (and a warning, once) when it cannot be built here."""
    if platform.system() != "Linux":
        return None
    directory = build_directory(envs.cache_dir())
    try:
        from torch.utils.cpp_extension import load

        directory.mkdir(parents=True, exist_ok=True)
        fresh = not any(directory.glob("*.so"))
        started = time.monotonic()
        if fresh:
            print("pdserve: building the native decode attention kernel (once per machine, ~20 s)",
                  file=sys.stderr, flush=True)
        load(name=EXTENSION_NAME, sources=[str(SOURCE)], extra_cflags=list(CFLAGS),
             extra_ldflags=list(LDFLAGS), build_directory=str(directory), is_python_module=False,
             verbose=False)
        if fresh:
            print(f"pdserve: built in {time.monotonic() - started:.0f} s ({directory})", file=sys.stderr, flush=True)
    except Exception as error:  # no compiler, no ninja, a failed build: the torch path still works
        log.warning("native decode attention unavailable, using the torch path: %s", error)
        return None
    op: PagedDecodeAttention = torch.ops.pdserve.paged_decode_attention
    return op


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def main() -> int:
    """Build the kernel now (bootstrap), so the first engine start does not wait for it."""
    logging.basicConfig(level=logging.WARNING)
    if load_paged_decode_attention() is None:
        print("pdserve: the native decode attention kernel could not be built; the engine will use "
              "the torch path", file=sys.stderr)
        return 1
    print(f"pdserve: native decode attention ready ({build_directory(envs.cache_dir())})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
