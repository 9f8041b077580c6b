"""Native decoder-layer kernels (CPU), built from ``native/*.cpp`` on first use, cached, and
registered as ``torch.ops.pdserve.*``:

- ``paged_decode_attention`` (and ``_into``, writing into the caller's tensor): one query token
  per sequence attending over its context straight from the paged cache;
- ``rope_write_kv``: the rotary embedding of a layer's new queries and keys, in place in the QKV
  projection's output, and the new keys and values stored into their cache slots;
- ``rms_norm`` and ``silu_and_mul``: a layer's two norms and its SwiGLU activation, each one
  call where eager torch dispatches several ops;
- ``int8_linear``: x @ W.T for up to 4 rows against int8 weights, at memory speed (the LM head of
  quantized models, lm_head.py);
- ``quantize_rows_int8`` and ``dequantize_int32``: the two ends of an int8 x int8 layer
  (w8a8_linear.py), activations to int8 by row before ``torch._int_mm``, its sums scaled back
  after it.
- ``int4_linear``: x @ W.T for a few rows against 4-bit weights, the activations as two int8
  digits multiplied in integer arithmetic (AVX512-VNNI; int4_linear.py).

Why kernels of our own: decode attention in plain torch first gathers every sequence's context
out of the paged cache into a contiguous copy (``index_select``), then runs SDPA on it. At batch 8
on one core that is about a quarter of a decode step (the gather 12%, SDPA 15%, measured with
``benchmarks/profile_decode.py``). The kernel reads the blocks in place through the block table.
The rotation and the cache write are about eight small torch ops a layer, each costing more in
dispatch than in arithmetic at decode batch sizes; the kernel is one call. The same holds for
the norms (61 of them were 4.6 ms of a 35 ms batch-1 step at two threads) and the activation.

They are compiled for the CPU they run on (``-march=native``) into
``<pdserve cache>/native/<key>/``, the key covering the sources and headers, the flags, torch's
version and the CPU's feature flags, so a cache shared between machines never hands one the other's binary. The
first build takes 15-30 s; ``python -m pdserve.engine.native_kernels`` builds ahead of time
(``scripts/bootstrap`` does). Building needs a C++ compiler and ninja; without them, or on a
failed build, :func:`load_native_kernels` returns None and the engine keeps the torch path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pdserve import envs

log = logging.getLogger(__name__)

NATIVE_DIRECTORY = Path(__file__).parent / "native"
SOURCES = tuple(
    NATIVE_DIRECTORY / name
    for name in (
        "paged_decode_attention.cpp", "rope_write_kv.cpp", "rms_norm.cpp", "silu_and_mul.cpp", "int8_linear.cpp",
        "int8_rows.cpp", "int4_linear.cpp",
    )
)
HEADERS = (NATIVE_DIRECTORY / "bf16.h", NATIVE_DIRECTORY / "int8_digits.h")
CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp")
LDFLAGS = ("-fopenmp",)
EXTENSION_NAME = "pdserve_native_kernels"


@dataclass(frozen=True)
class NativeKernels:
    """The registered ops (argument layouts in the sources' comments)."""

    paged_decode_attention: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor
    ]
    """(q [seqs, heads, D], k_cache, v_cache [blocks, block_size, kv_heads, D], block_tables
    [seqs, max_blocks] int64, context_lens [seqs] int64, scale) -> [seqs, heads, D] float32."""
    paged_decode_attention_into: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor], None
    ]
    """The same into ``out`` ([seqs, heads, D] contiguous, float32 or the cache's dtype)."""
    rope_write_kv: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], None
    ]
    """(qkv [T, (heads + 2 kv_heads) D] rotated in place, cos, sin [T, D] float32, slots [T] int64,
    k_cache, v_cache, num_heads)."""
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    """(x [T, width] rows contiguous, weight [width] of x's dtype, eps) -> contiguous [T, width]."""
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]
    """(gate_up [T, 2 width] contiguous, gate first) -> silu(gate) * up [T, width]."""
    int8_linear: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    """(x [T <= 4, in] contiguous, weight [out, in] int8, scales [out] float32) -> float32 [T, out]."""
    quantize_rows_int8: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
    """(x [T, in] rows contiguous, digits 1 or 2) -> (q [digits * T, in] int8, scales [T] float32)
    (the arithmetic in native/int8_rows.cpp)."""
    dequantize_int32: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.dtype, int], torch.Tensor
    ]
    """(sums [digits * T, out] int32, row_scales [T], column_scales [out] float32, residual [T, out]
    or None, dtype, digits) -> the rescaled sums (+ residual) [T, out] in dtype."""
    int4_linear: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    """(x [T, in] contiguous float32/bf16, packed [out / 16, in / 32, 320] uint8, residual [T, out]
    or None) -> [T, out] in x's dtype (int4_linear.py packs; needs ``int4_vnni``)."""
    int4_vnni: bool
    """Whether this build has the int4 kernel (AVX512-VNNI); without it int4_linear raises."""


def build_directory(cache_root: Path) -> Path:
    """Where these sources, built with these flags for this torch and this CPU, live."""
    key = hashlib.sha256()
    for source in SOURCES + HEADERS:
        key.update(source.read_bytes())
    key.update(" ".join(CFLAGS + LDFLAGS).encode())
    key.update(f"{torch.__version__} {sys.version_info[:2]} {platform.machine()}".encode())
    key.update(_cpu_flags().encode())
    return cache_root / "native" / key.hexdigest()[:16]


@functools.cache  # the op registry it fills is process-wide; build and register once per process
def load_native_kernels() -> NativeKernels | None:
    """The kernels, built if needed; None (and a warning, once) when they cannot be built here."""
    if platform.system() != "Linux":
        return None
    directory = build_directory(envs.cache_dir())
    try:
        from torch.utils.cpp_extension import load

        directory.mkdir(parents=True, exist_ok=True)
        fresh = not any(directory.glob("*.so"))
        started = time.monotonic()
        if fresh:
            print("pdserve: building the native kernels (once per machine, ~30 s)",
                  file=sys.stderr, flush=True)
        load(name=EXTENSION_NAME, sources=[str(source) for source in SOURCES], extra_cflags=list(CFLAGS),
             extra_ldflags=list(LDFLAGS), build_directory=str(directory), is_python_module=False,
             verbose=False)
        if fresh:
            print(f"pdserve: built in {time.monotonic() - started:.0f} s ({directory})", file=sys.stderr, flush=True)
    except Exception as error:  # no compiler, no ninja, a failed build: the torch path still works
        log.warning("native kernels unavailable, using the torch path: %s", error)
        return None
    ops = torch.ops.pdserve
    # Each op's one overload, resolved now: calling the packet resolves it again on every call,
    # and a decode step makes a few hundred calls.
    return NativeKernels(ops.paged_decode_attention.default, ops.paged_decode_attention_into.default,
                         ops.rope_write_kv.default, ops.rms_norm.default, ops.silu_and_mul.default,
                         ops.int8_linear.default, ops.quantize_rows_int8.default, ops.dequantize_int32.default,
                         ops.int4_linear.default, bool(ops.int4_vnni_available()))


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def main() -> int:
    """Build the kernels now (bootstrap), so the first engine start does not wait for them."""
    logging.basicConfig(level=logging.WARNING)
    if load_native_kernels() is None:
        print("pdserve: the native kernels could not be built; the engine will use "
              "the torch path", file=sys.stderr)
        return 1
    print(f"pdserve: native kernels ready ({build_directory(envs.cache_dir())})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
