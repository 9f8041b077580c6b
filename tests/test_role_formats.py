"""Each pool's default weight format follows the CPU (serving/role_formats.py)."""

from __future__ import annotations

import pytest

from pdserve.engine.cpu_features import ISA_LEVELS, CpuFeatures
from pdserve.serving.role_formats import default_weight_format, role_format

AVX512 = frozenset(ISA_LEVELS["avx512"].requires)
EPYC = CpuFeatures("AMD EPYC", "x86_64", frozenset(ISA_LEVELS["avx2"].requires))
XEON_VNNI = CpuFeatures("Xeon", "x86_64", AVX512 | {"avx512_vnni"})
XEON_BF16 = CpuFeatures("Xeon", "x86_64", AVX512 | {"avx512_vnni", "avx512_bf16"})
XEON_NO_VNNI = CpuFeatures("Xeon", "x86_64", AVX512)
ARM = CpuFeatures("Neoverse", "aarch64", frozenset({"asimd"}))


@pytest.mark.parametrize(("cpu", "prefill", "decode"), [
    (EPYC, "dense", "int4"),
    (XEON_VNNI, "w8a16", "int4"),  # float32 model, int8 dot products in hardware
    (XEON_BF16, "dense", "int4"),  # bf16 model on bf16 hardware
    (XEON_NO_VNNI, "dense", "int4"),
    (ARM, "dense", "dense"),  # only the portable kernels: no vectorized int4
])
def test_each_role_defaults_to_the_format_that_suits_its_phase_on_this_cpu(
    cpu: CpuFeatures, prefill: str, decode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PDSERVE_KERNEL_ISA", raising=False)
    assert default_weight_format("prefill", cpu).weight_format == prefill
    assert default_weight_format("decode", cpu).weight_format == decode
    assert default_weight_format("both", cpu).weight_format == "dense"
    assert default_weight_format("prefill", cpu).why


def test_a_flag_overrides_the_cpus_choice() -> None:
    assert role_format("prefill", "dense", None, XEON_VNNI).weight_format == "dense"
    assert role_format("prefill", "auto", "int8", XEON_VNNI) == role_format("decode", "auto", "int8", EPYC)
    assert role_format("prefill", "auto", None, XEON_VNNI).weight_format == "w8a16"
