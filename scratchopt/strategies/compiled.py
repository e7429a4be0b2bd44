"""``impl="compiled"``: each parameter's ``update`` replayed by a ``torch.compile``-d kernel.

The update is recorded (:mod:`~scratchopt.strategies.kernels.recording`) and its kernel, one per program
structure, is called on the param, its gradient and its state viewed as 1-d in memory order (FSDP2's
DTensors as their local shards). Scheduled hyperparameters and step-dependent scalars travel on a
float64 tape, so they never recompile. Params whose per-parameter scalars and dtypes agree share one
recording per step.

A tensor shorter than :data:`~scratchopt.strategies.kernels.cache.MIN_KERNEL_NUMEL`, a complex one, or
one whose tensors cannot be viewed as 1-d alike runs the eager ``update``. Within a few ulp of the loop
in float32 and float64: the kernel reproduces ATen's operation order and FMAs, but ATen's float32
``sqrt`` is not always the correctly rounded one Inductor emits; in 16-bit dtypes the kernel keeps
float32 intermediates where eager rounds every operation, as torch's own fused kernels do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from scratchopt.distributed.dtensor import local_shards
from scratchopt.strategies.base import Hyperparameters, Strategy, count_step, state_tensors
from scratchopt.strategies.kernels import cache
from scratchopt.strategies.kernels.recording import Program

if TYPE_CHECKING:
    from scratchopt.optimizer import ScratchOptimizer

#: The ulp bound the compiled strategies' tests hold against the loop (float32 and float64).
KERNEL_ULP = 8


def is_dense(tensor: Tensor) -> bool:
    """Its elements fill ``numel`` consecutive memory slots in some order (a permuted contiguous tensor)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(tensor.shape, tensor.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def memory_order_1d(tensor: Tensor) -> Tensor | None:
    """A 1-d view of a dense tensor's elements in the order they lie in memory, or None if not dense."""
    if tensor.is_contiguous():
        return tensor.view(-1)
    if not is_dense(tensor):
        return None
    return tensor.as_strided((tensor.numel(),), (1,), tensor.storage_offset())


def as_1d(tensors: list[Tensor | None]) -> list[Tensor | None] | None:
    """The tensors as 1-d views over the same elements in the same order, or None if they cannot be:
    each in its memory order, which is one order for all when they are contiguous or strided alike."""
    present = [t for t in tensors if t is not None]
    alike = all(t.is_contiguous() for t in present) or all(
        t.stride() == present[0].stride() and t.shape == present[0].shape for t in present
    )
    views = [None if t is None else memory_order_1d(t) for t in tensors]
    if not alike or any(view is None for view, t in zip(views, tensors) if t is not None):
        return None
    return views


class Compiled(Strategy):
    name = "compiled"
    ulp = KERNEL_ULP
    order = 30
    summary = "the update recorded once and replayed per tensor by a torch.compile'd kernel"

    def update(
        self, optimizer: ScratchOptimizer, group: dict[str, Any], params: list[Tensor], hyperparameters: Hyperparameters
    ) -> None:
        # A recording serves every param with the same per-parameter scalars and input kinds; None
        # remembers that such a program cannot be compiled (those params run the eager update).
        recordings: dict[tuple[Any, ...], Program | None] = {}
        for p in params:
            values = count_step(optimizer, p, group)
            states = state_tensors(optimizer, p)
            scalars = {**hyperparameters, **values}
            views = as_1d(local_shards([p, p.grad, *states]))
            if views is not None and cache.worth_a_kernel(views):
                key = (tuple(sorted(values.items())), tuple(None if t is None else (t.dtype, t.device) for t in views))
                if key not in recordings or recordings[key] is not None:
                    recordings[key] = cache.run(optimizer.update, views, scalars, recordings.get(key))
                    if recordings[key] is not None:
                        continue
            optimizer.update(p, p.grad, *states, **scalars)


STRATEGY = Compiled()
