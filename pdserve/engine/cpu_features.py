"""What this CPU can run: its model, its instruction-set flags, and the native kernels' ISA levels.

The native kernels (native_kernels.py) are built once per instruction-set level, each with the
compiler flags of that level, so that the same sources run fast on an AVX-512 Xeon, fast enough
on an AVX2-only EPYC, and correctly anywhere else. A CPU runs every level whose flags it has;
the engine takes the best of them unless PDSERVE_KERNEL_ISA caps it (to test a lower path, or to
rule one out).
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

ISA_ORDER = ("avx512", "avx2", "portable")
"""The kernels' instruction-set levels, best first."""


@dataclass(frozen=True)
class IsaLevel:
    """One instruction-set level the kernels are built for."""

    name: str
    requires: tuple[str, ...]
    """CPU flags (as /proc/cpuinfo spells them) a CPU needs to run this level."""
    cflags: tuple[str, ...]
    """Compiler flags that enable it."""
    optional: tuple[tuple[str, str], ...] = ()
    """(CPU flag, compiler flag) pairs added where the CPU has the flag: VNNI and BF16 on AVX-512."""
    x86_only: bool = True


ISA_LEVELS = {
    "avx512": IsaLevel(
        "avx512",
        requires=("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"),
        cflags=("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"),
        optional=(("avx512_vnni", "-mavx512vnni"), ("avx512_bf16", "-mavx512bf16")),
    ),
    "avx2": IsaLevel("avx2", requires=("avx2", "fma", "f16c"), cflags=("-mavx2", "-mfma", "-mf16c")),
    # No instruction-set flag: the compiler's baseline for the target (SSE2 on x86-64, NEON on
    # aarch64), its loops vectorized as far as that allows.
    "portable": IsaLevel("portable", requires=(), cflags=(), x86_only=False),
}

REPORTED_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                  "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8", "asimd", "asimddp", "sve", "bf16")
"""The flags that decide a kernel path or a dtype, printed by ``pdserve env``."""


@dataclass(frozen=True)
class CpuFeatures:
    model: str
    machine: str
    """platform.machine(): x86_64, aarch64, ..."""
    flags: frozenset[str]

    def has(self, *names: str) -> bool:
        return all(name in self.flags for name in names)

    @property
    def is_x86(self) -> bool:
        return self.machine in ("x86_64", "AMD64", "i686")

    def runs(self, level: IsaLevel) -> bool:
        return (self.is_x86 or not level.x86_only) and self.has(*level.requires)

    def isa_levels(self, cap: str | None = None) -> tuple[str, ...]:
        """The levels this CPU runs, best first, none above ``cap`` (a name from ISA_ORDER)."""
        if cap is not None and cap not in ISA_LEVELS:
            raise ValueError(f"unknown kernel ISA {cap!r}; choose one of {', '.join(ISA_ORDER)}")
        start = ISA_ORDER.index(cap) if cap is not None else 0
        return tuple(name for name in ISA_ORDER[start:] if self.runs(ISA_LEVELS[name]))

    def cflags(self, level: IsaLevel) -> tuple[str, ...]:
        """The compiler flags for ``level`` on this CPU: its own, plus the optional ones it has."""
        return level.cflags + tuple(flag for cpu_flag, flag in level.optional if cpu_flag in self.flags)

    @property
    def multiplies_bf16(self) -> bool:
        """Whether bf16 products run in hardware (AVX512-BF16 or AMX), not emulated by torch."""
        return self.has("avx512_bf16") or self.has("amx_bf16")

    def crossover_section(self, level: str) -> str:
        """The crossover table's section for kernels of ``level`` on this CPU. AVX-512 CPUs with
        and without bf16 hardware route differently (bf16 GEMMs are ~10x slower emulated), so
        they have a section each: ``avx512_bf16`` and ``avx512``."""
        return "avx512_bf16" if level == "avx512" and self.multiplies_bf16 else level

    def reported_flags(self) -> list[str]:
        return [name for name in REPORTED_FLAGS if name in self.flags]

    def describe(self) -> str:
        """One line: the model, the architecture and the flags that matter here."""
        flags = " ".join(self.reported_flags()) or "none of the flags pdserve uses"
        return f"{self.model} ({self.machine}; {flags})"


def parse_cpuinfo(text: str, machine: str) -> CpuFeatures:
    """CpuFeatures from the text of /proc/cpuinfo (the first processor's entry)."""
    model = ""
    flags: frozenset[str] = frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "CPU part") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 says flags; aarch64, Features
            flags = frozenset(value.split())
    return CpuFeatures(model=model or platform.processor() or machine, machine=machine, flags=flags)


@functools.cache  # the CPU does not change under a running process
def cpu_features() -> CpuFeatures:
    machine = platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags known, so only the portable kernels
        text = ""
    return parse_cpuinfo(text, machine)
