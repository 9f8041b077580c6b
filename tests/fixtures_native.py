"""Shared fixtures of the native kernel tests: the built kernels, and seeded random tensors.

conftest.py imports the ``native`` fixture for every test module.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.native_kernels import NativeKernels, load_native_kernels


@pytest.fixture(scope="module")
def native() -> NativeKernels:
    loaded = load_native_kernels()
    assert loaded is not None, "the kernels must build here (gcc and ninja are installed by bootstrap)"
    return loaded


def seeded_randn(*shape: int, seed: int = 0) -> torch.Tensor:
    """Standard normal float32 values, the same for the same seed."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
