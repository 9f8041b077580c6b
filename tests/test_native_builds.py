"""How the native kernels are built: the instruction-set levels a CPU's flags allow, a source
falling back a level alone when it fails to compile, every source compiling for the levels this
CPU cannot run, and ``pdserve env`` saying which path each op takes."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys

import pytest

from pdserve import envs
from pdserve.engine.cpu_features import ISA_LEVELS, ISA_ORDER, IsaLevel, cpu_features, parse_cpuinfo
from pdserve.engine.native_kernels import (
    SOURCE_OPS,
    BuildFailure,
    NativeKernels,
    build_best,
    build_directory,
    cflags,
    compile_check,
    load_native_kernels,
)

# Flags lines as the two CPUs this project runs on print them (trimmed to the ones that matter).
XEON = "model name\t: Intel(R) Xeon(R) Platinum\nflags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512dq " \
       "avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16\n"
EPYC = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma f16c\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp sve\n" \
           "CPU part\t: 0xd40\n"


def test_a_cpu_runs_the_levels_its_flags_allow() -> None:
    xeon, epyc, graviton = (parse_cpuinfo(XEON, "x86_64"), parse_cpuinfo(EPYC, "x86_64"),
                            parse_cpuinfo(GRAVITON, "aarch64"))
    assert xeon.isa_levels() == ("avx512", "avx2", "portable")
    assert epyc.isa_levels() == ("avx2", "portable")
    assert graviton.isa_levels() == ("portable",)  # no x86 level, whatever its flags
    assert xeon.isa_levels("avx2") == ("avx2", "portable") and epyc.isa_levels("avx512") == ("avx2", "portable")
    with pytest.raises(ValueError, match="unknown kernel ISA 'sse9'"):
        epyc.isa_levels("sse9")
    # VNNI and BF16 join the AVX-512 build only where the CPU has them.
    assert {"-mavx512vnni", "-mavx512bf16"} <= set(xeon.cflags(ISA_LEVELS["avx512"]))
    assert not {"-mavx512vnni", "-mavx512bf16"} & set(parse_cpuinfo(XEON.replace("avx512_vnni avx512_bf16", ""),
                                                                    "x86_64").cflags(ISA_LEVELS["avx512"]))
    assert xeon.model.startswith("Intel") and "avx512_vnni" in xeon.describe()
    assert graviton.model == "0xd40" and "asimd" in graviton.describe()


def test_a_source_that_fails_at_one_level_falls_back_to_the_next_alone() -> None:
    broken = IsaLevel("broken", requires=(), cflags=("-mno-such-instruction-set",), x86_only=False)
    build, failures = build_best("rms_norm", (broken, ISA_LEVELS["portable"]), cpu_features(), envs.cache_dir())
    assert build is not None and build.isa == "portable" and build.path == "portable"
    assert [failure.isa for failure in failures] == ["broken"]
    assert "no-such-instruction-set" in failures[0].error  # the compiler's own words
    # A source that built nowhere says so, and its ops are None (the engine's torch path).
    kernels = NativeKernels(*([None] * 10), builds={"rms_norm": build},
                            failures=(BuildFailure("int4_linear", "avx2", "error: ..."),))
    assert kernels.path("rms_norm") == "portable"
    assert kernels.path("int4_linear") == "torch (no native build: avx2 failed)"


FOREIGN_LEVELS = [isa for isa in ISA_ORDER if isa not in cpu_features().isa_levels()
                  and (cpu_features().is_x86 or not ISA_LEVELS[isa].x86_only)]


@pytest.mark.skipif(not FOREIGN_LEVELS, reason="this CPU runs every level: the kernel tests build and run them all")
@pytest.mark.parametrize("isa", FOREIGN_LEVELS)
def test_every_source_compiles_for_the_levels_this_cpu_cannot_run(isa: str) -> None:
    """A change that breaks the AVX-512 path fails here on an AVX2 machine (compiled, not run)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        errors = dict(zip(SOURCE_OPS, pool.map(lambda source: compile_check(source, isa), SOURCE_OPS), strict=True))
    assert errors == dict.fromkeys(SOURCE_OPS), {source: error for source, error in errors.items() if error}


AARCH64_COMPILER = "aarch64-linux-gnu-g++"


@pytest.mark.skipif(shutil.which(AARCH64_COMPILER) is None or not cpu_features().is_x86,
                    reason=f"no {AARCH64_COMPILER} (.ci/run installs Debian's g++-aarch64-linux-gnu)")
def test_the_portable_build_compiles_for_aarch64() -> None:
    """ARM servers (Graviton, Ampere) run the portable level: no x86 intrinsic may leak into it."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        errors = dict(zip(SOURCE_OPS, pool.map(lambda source: compile_check(source, "portable", AARCH64_COMPILER),
                                               SOURCE_OPS), strict=True))
    assert errors == dict.fromkeys(SOURCE_OPS), {source: error for source, error in errors.items() if error}


def run_env(isa: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PDSERVE_KERNEL_ISA": isa}
    return subprocess.run([sys.executable, "-m", "pdserve.cli", "env"], capture_output=True, text=True,
                          env=environment, timeout=600, check=False)


def test_pdserve_env_names_the_path_of_every_op() -> None:
    result = run_env("portable")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("cpu: ") and cpu_features().model in lines[0]
    assert "PDSERVE_KERNEL_ISA=portable" in result.stdout
    for ops in SOURCE_OPS.values():
        assert f"  {', '.join(ops)}: portable" in lines
    # The layers' crossover rows, from the table's section for the CPU's own level.
    assert any(line.startswith(f"crossover rows ({cpu_features().isa_levels()[0]}") for line in lines)
    refused = run_env("sse9")
    assert refused.returncode == 2 and "unknown kernel ISA 'sse9'" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_build_killed_mid_way_never_blocks_the_next_process() -> None:
    """torch's cpp_extension marks a build in progress with a ``lock`` file, and a later build
    of the same directory waits for it to go: forever, when its builder was killed (seen in
    CI-like runs: workers hung at start-up). pdserve holds an flock instead and clears it."""
    cpu = cpu_features()
    level = ISA_LEVELS[cpu.isa_levels()[0]]
    load_native_kernels()  # built, so that the next process only loads
    directory = build_directory(envs.cache_dir(), "rms_norm", level.name, cflags(cpu, level))
    (directory / "lock").write_text("")  # what a killed build leaves
    done = subprocess.run(
        [sys.executable, "-c", "from pdserve.engine.native_kernels import load_native_kernels as load; "
         "assert load() is not None"],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (directory / "lock").exists()
