"""Each pool on the kernels that suit its phase: the weight format a role's workers load.

A prefill chunk multiplies hundreds of rows by every weight, so it is bound by arithmetic: it
runs on dense weights in the model's dtype, except on AVX-512 CPUs with VNNI but no bf16 hardware,
whose model dtype is float32 and whose int8 dot products (``vpdpbusd``) are the fastest arithmetic
they have: there prefill workers load ``w8a16`` (int8 weights, activations carried in two int8
digits). Measured on such a Xeon (docs/engine.md, *Per-role formats on an AVX-512 VNNI CPU*):
prefill 1.45-1.66x dense float32's at 512 tokens (1.0-1.16x at 2,048), served TTFT 1.22-1.44x,
and the w8a16-prefill, int4-decode pair agrees with float32 on 98.3% of teacher-forced tokens
(dense prefill: 99.1%; bf16, the default where the CPU has bf16 hardware: 98.1%). ``w8a8`` is
faster still (~2x) at 97.2%, an opt-in.

A decode step multiplies a few rows and is bound by reading the weights, so it runs fastest on
the fewest bytes: int4, where the CPU has a vectorized native int4 kernel (AVX2 or AVX-512; on
the AVX2 EPYC, served one stream at a time, TPOT 11.1 ms in int4 against 43.7 ms dense at the
same TTFT, docs/engine.md). A colocated worker does both phases and keeps one format, dense
unless asked. For SmolLM2's Q4_1 file the int4
weights are the file's own; teacher-forced agreement of the dense-prefill, int4-decode pair with
float32 is in docs/engine.md.

Precedence: a role's own flag (``--prefill-weight-format``, ``--decode-weight-format``), then
``--weight-format`` for every role, then the default below.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve import envs
from pdserve.engine.cpu_features import CpuFeatures

AUTO = "auto"


@dataclass(frozen=True)
class RoleFormat:
    weight_format: str
    why: str


def default_weight_format(role: str, cpu: CpuFeatures) -> RoleFormat:
    """The format ``role``'s workers load when nothing is asked for, and why."""
    if role == "prefill":
        if cpu.has("avx512_vnni") and not cpu.multiplies_bf16:
            return RoleFormat("w8a16", "prefill is bound by arithmetic: int8 GEMMs on avx512_vnni (no bf16 hardware)")
        return RoleFormat("dense", "prefill is bound by arithmetic: dense GEMMs in the model's dtype")
    if role == "decode":
        level = cpu.isa_levels(envs.kernel_isa())[0]
        if level != "portable":
            return RoleFormat("int4", f"decode is bound by reading weights: int4 on the native {level} kernel")
        return RoleFormat("dense", "no vectorized native int4 kernel on this CPU: dense")
    return RoleFormat("dense", "a colocated worker runs both phases: dense")


def role_format(role: str, role_flag: str, shared_flag: str | None, cpu: CpuFeatures) -> RoleFormat:
    """The format for ``role`` from its own flag (or "auto"), the shared --weight-format (None
    when not given), and the CPU."""
    if role_flag != AUTO:
        return RoleFormat(role_flag, f"--{role}-weight-format")
    if shared_flag is not None:
        return RoleFormat(shared_flag, "--weight-format")
    return default_weight_format(role, cpu)
