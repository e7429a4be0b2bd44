"""Test-wide settings."""

from __future__ import annotations

import pytest

from scratchopt import _compiled


@pytest.fixture(autouse=True)
def compile_small_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled strategies run tensors below ``MIN_KERNEL_NUMEL`` elements eagerly (faster there).
    The tests' tensors are small, so let them reach the kernels: that is what the tests are for.
    ``test_small_buffers_run_the_eager_update`` checks the threshold itself."""
    monkeypatch.setattr(_compiled, "MIN_KERNEL_NUMEL", 2)
