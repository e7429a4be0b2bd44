"""Test-wide settings and fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Inductor caches compiled kernels on disk, keyed without the sizes they were compiled at; the tests
# compile at small sizes, so they keep their own cache (in the repository, ignored by git) rather than
# leave single-threaded kernels in the user's.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".inductor-cache"))

from scratchopt.strategies.kernels import cache  # noqa: E402  (after the environment is set)


@pytest.fixture
def kernels_at_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let tensors of any size reach the compiled kernels.

    The compiled strategies run tensors below ``MIN_KERNEL_NUMEL`` elements eagerly (faster there); the
    tests' tensors are small, and a test of a kernel must run one. Tests that need it ask for it by
    name (``pytestmark = pytest.mark.usefixtures("kernels_at_every_size")``);
    ``test_small_buffers_run_the_eager_update`` checks the threshold itself.
    """
    monkeypatch.setattr(cache, "MIN_KERNEL_NUMEL", 2)
