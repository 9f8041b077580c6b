"""Native decoder-layer kernels (CPU), built from ``native/*.cpp`` on first use, cached, and
registered as ``torch.ops.pdserve_<isa>.*``:

- ``paged_decode_attention`` (and ``_into``, writing into the caller's tensor): one query token
  per sequence attending over its context straight from the paged cache;
- ``rope_write_kv``: the rotary embedding of a layer's new queries and keys, in place in the QKV
  projection's output, and the new keys and values stored into their cache slots;
- ``rms_norm`` and ``silu_and_mul``: a layer's two norms and its SwiGLU activation, each one
  call where eager torch dispatches several ops;
- ``int8_linear``: x @ W.T for up to 4 rows against int8 weights, at memory speed (the LM head of
  quantized models, layers/lm_head.py);
- ``quantize_rows_int8`` and ``dequantize_int32``: the two ends of an int8 x int8 layer
  (layers/w8a8.py), activations to int8 by row before ``torch._int_mm``, its sums scaled back
  after it.
- ``int4_linear``: x @ W.T for a few rows against 4-bit weights, the activations as two int8
  digits multiplied in integer arithmetic (layers/int4.py); ``int4_dequantize``, the same
  weights as float32, for batches where a float GEMM is faster.

Why kernels of our own: decode attention in plain torch first gathers every sequence's context
out of the paged cache into a contiguous copy (``index_select``), then runs SDPA on it; the
kernel reads the blocks in place through the block table. The rotation and the cache write are
about eight small torch ops a layer, each costing more in dispatch than in arithmetic at decode
batch sizes; the kernel is one call. The same holds for the norms and the activation. Timings
are in docs/engine.md.

Instruction sets. Each source is built once per level of cpu_features.py (avx512, avx2,
portable) that the CPU runs, with that level's flags, as an extension of its own: a source that
fails to compile at one level falls back to the next for that source alone, and never disables
the others. The engine takes each source's best level (PDSERVE_KERNEL_ISA caps it); tests load
every level side by side, since each registers its ops under ``torch.ops.pdserve_<level>``.
Each source reports the path its build takes (``<source>_path``), e.g. "avx2 (no avx512_vnni)".

Builds are cached in ``<pdserve cache>/native/<source>-<level>-<key>/``, the key covering the
source and headers, the flags, torch's and Python's versions and the architecture. A source
takes ~10 s to compile, dominated by torch's headers; the sources of a level build in parallel.
``python -m pdserve.engine.native_kernels`` builds ahead of time (``scripts/bootstrap`` does).
Building needs a C++ compiler and ninja; a source that builds at no level leaves its ops None
and the engine on the torch path for them, with a warning that quotes the compiler.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pdserve import envs
from pdserve.engine.cpu_features import ISA_LEVELS, CpuFeatures, IsaLevel, cpu_features

log = logging.getLogger(__name__)

NATIVE_DIRECTORY = Path(__file__).parent / "native"
SOURCE_OPS = {
    "paged_decode_attention": ("paged_decode_attention", "paged_decode_attention_into"),
    "rope_write_kv": ("rope_write_kv",),
    "rms_norm": ("rms_norm",),
    "silu_and_mul": ("silu_and_mul",),
    "int8_linear": ("int8_linear",),
    "int8_rows": ("quantize_rows_int8", "dequantize_int32"),
    "int4_linear": ("int4_linear", "int4_dequantize"),
}
"""Each source (native/<name>.cpp, one extension) and the ops it registers."""
HEADERS = tuple(NATIVE_DIRECTORY / name for name in ("bf16.h", "int8_digits.h", "isa.h"))
BASE_CFLAGS = ("-O3", "-ffast-math", "-fopenmp")
LDFLAGS = ("-fopenmp",)
COMPILER_LINES = 40
"""Lines of the compiler's output a failed build's warning quotes (its first errors)."""


@dataclass(frozen=True)
class SourceBuild:
    """One source built for one instruction-set level."""

    source: str
    isa: str
    path: str
    """What its ops run in this build, in the source's own words ("avx512_vnni", "avx2", ...)."""


@dataclass(frozen=True)
class BuildFailure:
    source: str
    isa: str
    error: str
    """The first lines of the compiler's output."""


@dataclass(frozen=True)
class NativeKernels:
    """The registered ops (argument layouts in the sources' comments); an op is None where its
    source built at no level."""

    paged_decode_attention: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor
    ] | None
    """(q [seqs, heads, D], k_cache, v_cache [blocks, block_size, kv_heads, D], block_tables
    [seqs, max_blocks] int64, context_lens [seqs] int64, scale) -> [seqs, heads, D] float32."""
    paged_decode_attention_into: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor], None
    ] | None
    """The same into ``out`` ([seqs, heads, D] contiguous, float32 or the cache's dtype)."""
    rope_write_kv: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], None
    ] | None
    """(qkv [T, (heads + 2 kv_heads) D] rotated in place, cos, sin [T, D] float32, slots [T] int64,
    k_cache, v_cache, num_heads)."""
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None
    """(x [T, width] rows contiguous, weight [width] of x's dtype, eps) -> contiguous [T, width]."""
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor] | None
    """(gate_up [T, 2 width] contiguous, gate first) -> silu(gate) * up [T, width]."""
    int8_linear: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None
    """(x [T <= 4, in] contiguous, weight [out, in] int8, scales [out] float32) -> float32 [T, out]."""
    quantize_rows_int8: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None
    """(x [T, in] rows contiguous, digits 1 or 2) -> (q [digits * T, in] int8, scales [T] float32)
    (the arithmetic in native/int8_digits.h)."""
    dequantize_int32: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.dtype, int], torch.Tensor
    ] | None
    """(sums [digits * T, out] int32, row_scales [T], column_scales [out] float32, residual [T, out]
    or None, dtype, digits) -> the rescaled sums (+ residual) [T, out] in dtype."""
    int4_linear: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] | None
    """(x [T, in] contiguous float32/bf16, packed [out / 16, in / 32, 320] uint8, residual [T, out]
    or None) -> [T, out] in x's dtype (layers/int4.py packs)."""
    int4_dequantize: Callable[[torch.Tensor], torch.Tensor] | None
    """(packed) -> the float32 weights [out, in] it holds."""
    builds: dict[str, SourceBuild] = field(default_factory=dict)
    """Each source that built, by name: the level it was built for and the path it takes."""
    failures: tuple[BuildFailure, ...] = ()

    def path(self, source: str) -> str:
        """The path a source's ops take here, or why they do not run."""
        build = self.builds.get(source)
        if build is not None:
            return build.path
        failed = [failure.isa for failure in self.failures if failure.source == source]
        return f"torch (no native build: {', '.join(failed)} failed)" if failed else "torch (not built)"

    def summary(self) -> list[str]:
        """A line a source: its ops and the path they take."""
        return [f"{', '.join(ops)}: {self.path(source)}" for source, ops in SOURCE_OPS.items()]


def cflags(cpu: CpuFeatures, level: IsaLevel) -> tuple[str, ...]:
    return BASE_CFLAGS + cpu.cflags(level) + (f"-DPDSERVE_OPS=pdserve_{level.name}",)


def build_directory(cache_root: Path, source: str, isa: str, flags: tuple[str, ...]) -> Path:
    """Where this source, built with these flags for this torch and architecture, lives."""
    key = hashlib.sha256()
    for path in (NATIVE_DIRECTORY / f"{source}.cpp",) + HEADERS:
        key.update(path.read_bytes())
    key.update(" ".join(flags + LDFLAGS).encode())
    key.update(f"{torch.__version__} {sys.version_info[:2]} {platform.machine()}".encode())
    return cache_root / "native" / f"{source}-{isa}-{key.hexdigest()[:12]}"


def _build(source: str, level: IsaLevel, cpu: CpuFeatures, cache_root: Path) -> SourceBuild:
    """Build (or find built) and load one source at one level; raises on a failed build."""
    from torch.utils.cpp_extension import load

    isa = level.name
    flags = cflags(cpu, level)
    directory = build_directory(cache_root, source, isa, flags)
    directory.mkdir(parents=True, exist_ok=True)
    with _exclusive(directory / "pdserve.lock"):
        # torch's own ``lock`` file marks a build in progress and makes every later build wait
        # for it to go, forever if its builder was killed. Holding the flock, no other pdserve
        # process builds here, so a ``lock`` left now is such a remnant.
        (directory / "lock").unlink(missing_ok=True)
        load(name=f"pdserve_{source}_{isa}", sources=[str(NATIVE_DIRECTORY / f"{source}.cpp")],
             extra_cflags=list(flags), extra_ldflags=list(LDFLAGS), build_directory=str(directory),
             is_python_module=False, verbose=False)
    path = getattr(getattr(torch.ops, f"pdserve_{isa}"), f"{source}_path")()
    return SourceBuild(source, isa, str(path))


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path``: released by the kernel when its holder dies, unlike a file
    whose existence is the lock."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compiler_lines(error: BaseException) -> str:
    """The compiler's first error lines out of a failed build's message."""
    lines = str(error).splitlines()
    errors = [index for index, line in enumerate(lines) if "error" in line]
    start = max(0, errors[0] - 2) if errors else 0
    return "\n".join(lines[start : start + COMPILER_LINES])


def build_best(source: str, levels: tuple[IsaLevel, ...], cpu: CpuFeatures,
               cache_root: Path) -> tuple[SourceBuild | None, list[BuildFailure]]:
    """The source at the first of ``levels`` that builds, and the failures before it."""
    failures: list[BuildFailure] = []
    for number, level in enumerate(levels):
        try:
            return _build(source, level, cpu, cache_root), failures
        except Exception as error:  # no compiler, no ninja, a failed build: try the next level
            failures.append(BuildFailure(source, level.name, _compiler_lines(error)))
            then = f"trying {levels[number + 1].name}" if number + 1 < len(levels) else "using the torch path"
            log.warning("native kernel %s did not build for %s; %s. The compiler said:\n%s", source, level.name,
                        then, failures[-1].error)
    return None, failures


def load_native_kernels(isa: str | None = None, exact: bool = False) -> NativeKernels | None:
    """The kernels at the best level this CPU runs, none above ``isa`` (default: PDSERVE_KERNEL_ISA),
    each source falling back a level where it fails to build. ``exact`` takes ``isa`` alone, no
    fallback (tests of one path). None where no source builds at all."""
    cpu = cpu_features()
    cap = isa if isa is not None else envs.kernel_isa()
    names = cpu.isa_levels(cap)
    if exact:
        if cap is None or cap not in names:
            raise ValueError(f"this CPU cannot run the {cap} kernels ({cpu.describe()})")
        names = (cap,)
    if platform.system() != "Linux" or not names:
        return None
    return _load(tuple(ISA_LEVELS[name] for name in names), cpu, envs.cache_dir())


@functools.cache  # the op registry it fills is process-wide; build and register once per process
def _load(levels: tuple[IsaLevel, ...], cpu: CpuFeatures, cache_root: Path) -> NativeKernels | None:
    started = time.monotonic()
    fresh = [source for source in SOURCE_OPS
             if not any(build_directory(cache_root, source, levels[0].name, cflags(cpu, levels[0])).glob("*.so"))]
    if fresh:
        print(f"pdserve: building {len(fresh)} native kernel source(s) for {levels[0].name} (once per machine, "
              f"~{10 * len(fresh) // max(1, os.cpu_count() or 1) + 10} s)", file=sys.stderr, flush=True)
    builds: dict[str, SourceBuild] = {}
    failures: list[BuildFailure] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        done = pool.map(lambda source: build_best(source, levels, cpu, cache_root), SOURCE_OPS)
        for source, (build, failed) in zip(SOURCE_OPS, done, strict=True):
            failures.extend(failed)
            if build is not None:
                builds[source] = build
    if fresh:
        print(f"pdserve: built in {time.monotonic() - started:.0f} s ({cache_root / 'native'})", file=sys.stderr,
              flush=True)
    if not builds:
        return None

    def op(name: str) -> Callable[..., Any] | None:
        # Each op's one overload, resolved now: calling the packet resolves it again on every
        # call, and a decode step makes a few hundred calls.
        build = builds.get(next(source for source, ops in SOURCE_OPS.items() if name in ops))
        return None if build is None else getattr(getattr(torch.ops, f"pdserve_{build.isa}"), name).default

    return NativeKernels(
        paged_decode_attention=op("paged_decode_attention"),
        paged_decode_attention_into=op("paged_decode_attention_into"),
        rope_write_kv=op("rope_write_kv"), rms_norm=op("rms_norm"), silu_and_mul=op("silu_and_mul"),
        int8_linear=op("int8_linear"), quantize_rows_int8=op("quantize_rows_int8"),
        dequantize_int32=op("dequantize_int32"), int4_linear=op("int4_linear"),
        int4_dequantize=op("int4_dequantize"),
        builds=builds, failures=tuple(failures),
    )


def compile_check(source: str, isa: str, compiler: str | None = None) -> str | None:
    """Compile ``source`` for ``isa`` without running it (syntax and types only), every optional
    flag of the level on: None if it compiles, else the compiler's first lines. For levels this
    CPU cannot run, so that a change breaking the AVX-512 path fails on an AVX2 machine too, and
    the other way round; with a cross ``compiler`` (aarch64-linux-gnu-g++), for another
    architecture's portable build."""
    from torch.utils.cpp_extension import include_paths

    flags = BASE_CFLAGS + ISA_LEVELS[isa].cflags + tuple(flag for _, flag in ISA_LEVELS[isa].optional)
    command = [compiler or os.environ.get("CXX", "c++"), "-std=c++20", "-fsyntax-only",
               "-DTORCH_API_INCLUDE_EXTENSION_H", f"-DPDSERVE_OPS=pdserve_{isa}", *flags,
               *(f"-isystem{path}" for path in include_paths()), str(NATIVE_DIRECTORY / f"{source}.cpp")]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode == 0:
        return None
    return "\n".join(result.stderr.splitlines()[:COMPILER_LINES])


def main() -> int:
    """Build the kernels now (bootstrap), so the first engine start does not wait for them."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    kernels = load_native_kernels()
    if kernels is None or kernels.failures:
        print("\n" + "!" * 78 + "\npdserve: WARNING: native kernels failed to build (the compiler's words above);"
              "\nthe ops 'pdserve env' marks 'torch' run on the slower torch path.\n" + "!" * 78, file=sys.stderr)
    if kernels is None:
        return 1
    print(f"pdserve: native kernels ready ({', '.join(sorted({b.isa for b in kernels.builds.values()}))})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
