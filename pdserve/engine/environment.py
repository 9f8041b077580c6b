"""What runs here, and why: the CPU's features, the dtype ``auto`` resolves to, and the path each
native op takes. ``pdserve env`` prints it, ``scripts/bootstrap`` ends with it, and every engine
logs the kernels it took at start (model.py), so that a slow machine says why it is slow.
"""

from __future__ import annotations

import torch

from pdserve import envs
from pdserve.engine.cpu_features import CpuFeatures, cpu_features
from pdserve.engine.device import cpu_has_fast_bf16
from pdserve.engine.layers.formats import crossover_table
from pdserve.engine.native_kernels import NativeKernels, load_native_kernels


def auto_dtype_reason(cpu: CpuFeatures) -> str:
    """What dtype "auto" takes on this CPU, and why."""
    if cpu_has_fast_bf16():
        bf16 = "amx_bf16" if cpu.has("amx_bf16") else "avx512_bf16"
        return f"bfloat16 ({bf16}: bf16 multiplied in hardware)"
    return "float32 (no avx512_bf16 or amx_bf16: torch emulates bf16 GEMMs, ~10x slower than float32 here)"


def kernels_line(kernels: NativeKernels | None) -> str:
    """One line naming each native op's path, for an engine's start-up log."""
    if kernels is None:
        return "none (torch path)"
    return "; ".join(f"{source} {kernels.path(source)}" for source in kernels.builds) or "none"


def crossover_lines(level: str) -> list[str]:
    """The crossover table's section for this level: which kernel takes a batch of how many rows."""
    section = crossover_table().get(level)
    if section is None:
        return [f"crossover rows: none measured for {level}; the nearest level's are used "
                "(python benchmarks/crossover_rows.py measures them)"]
    lines = [f"crossover rows ({level}, measured on {section['cpu']}):"]
    lines.extend(f"  {small} up to {rows} rows, then {large}"
                 for small, larges in sorted(section["rows"].items()) for large, rows in sorted(larges.items()))
    return lines


def environment_report(build: bool = True) -> list[str]:
    """The lines ``pdserve env`` prints. ``build`` builds the kernels if they are not yet (else
    only what the CPU could run is shown)."""
    cpu = cpu_features()
    cap = envs.kernel_isa()
    levels = cpu.isa_levels(cap)
    lines = [
        f"cpu: {cpu.describe()}",
        f"torch: {torch.__version__}, {torch.get_num_threads()} threads",
        f"kernel levels this CPU runs: {', '.join(levels)} "
        f"(PDSERVE_KERNEL_ISA={cap or 'auto'}; the engine takes the first)",
        f"dtype auto: {auto_dtype_reason(cpu)}",
        "native kernels with --attention auto: " + ("no (only the portable level here; --attention native "
                                                    "takes it)" if levels[0] == "portable" else f"yes, {levels[0]}"),
    ]
    # The CPU's own level, not the kernel cap: torch's kernels in the table run at the CPU's.
    lines.extend(crossover_lines(cpu.crossover_section(cpu.isa_levels()[0])))
    if not build:
        return lines
    kernels = load_native_kernels()
    if kernels is None:
        lines.append("native kernels: none built (no C++ compiler or ninja?); every op on the torch path")
        return lines
    lines.append("native kernels (op: path):")
    lines.extend(f"  {line}" for line in kernels.summary())
    for failure in kernels.failures:
        lines.append(f"build failure: {failure.source} for {failure.isa}:")
        lines.extend(f"    {line}" for line in failure.error.splitlines())
    return lines
