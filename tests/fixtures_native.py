"""Shared fixtures of the native kernel tests: the built kernels at every instruction-set level
this CPU runs (AVX-512, AVX2 and the portable build, as it has them), and seeded random tensors.

conftest.py imports the ``native`` fixture for every test module, so each kernel test runs once
per level: a change that breaks the AVX2 or the portable path fails on an AVX-512 machine too.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.cpu_features import cpu_features
from pdserve.engine.native_kernels import SOURCE_OPS, NativeKernels, load_native_kernels

KERNEL_ISAS = cpu_features().isa_levels()
"""The levels this CPU runs, best first."""


@pytest.fixture(scope="module", params=KERNEL_ISAS)
def native(request: pytest.FixtureRequest) -> NativeKernels:
    isa = request.param
    loaded = load_native_kernels(isa, exact=True)
    assert loaded is not None, "the kernels must build here (gcc and ninja are installed by bootstrap)"
    built = {source: build.isa for source, build in loaded.builds.items()}
    assert built == dict.fromkeys(SOURCE_OPS, isa), f"every source must build for {isa}: {loaded.failures}"
    return loaded


def seeded_randn(*shape: int, seed: int = 0) -> torch.Tensor:
    """Standard normal float32 values, the same for the same seed."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
