"""``impl="fused"``: ``flat`` with each buffer's update replayed by its compiled kernel.

One generated kernel per buffer (and per large param where it lies), the same kernels as ``compiled``
(:mod:`~scratchopt.strategies.kernels`): within a few ulp of the loop. ``fused=True`` maps here. A
buffer shorter than :data:`~scratchopt.strategies.kernels.cache.MIN_KERNEL_NUMEL` runs the eager update,
as ``flat`` does.
"""

from __future__ import annotations

from scratchopt.strategies.compiled import KERNEL_ULP
from scratchopt.strategies.flat import Flat


class Fused(Flat):
    name = "fused"
    ulp = KERNEL_ULP
    order = 40
    summary = "flat + compiled: one generated kernel per state buffer"
    compiled = True


STRATEGY = Fused()
