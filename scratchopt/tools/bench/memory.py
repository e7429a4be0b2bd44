"""What an optimizer holds and what one step allocates; the report's memory section measures with it too.

The extra memory of a step is the peak of the allocator's own events during the call: on CUDA
``max_memory_allocated`` after a reset; on the CPU the ``[memory]`` events ``torch.profiler`` records with
``profile_memory=True``, summed in time order (``tracemalloc`` does not see torch's allocations, and the
process's RSS mixes them with the allocator's cached pages and the interpreter).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Bytes of the storages behind the optimizer's state tensors (each storage once) per parameter element."""
    seen = set()
    total = numel = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            numel += p.numel()
            for value in optimizer.state.get(p, {}).values():
                for tensor in _storage_tensors(value):
                    key = (tensor.untyped_storage().data_ptr(), tensor.device)
                    if key not in seen:
                        seen.add(key)
                        total += tensor.untyped_storage().nbytes()
    return total / numel if numel else 0.0


def _storage_tensors(value: Any) -> list[Tensor]:
    """The tensors holding a state value's bytes: the value, or for a tensor subclass that wraps others
    (torchao's 8-bit state: codes, scales and map) the tensors it flattens into, as torch's subclass
    protocol (``__tensor_flatten__``) names them."""
    if not isinstance(value, Tensor):
        return []
    flatten = getattr(value, "__tensor_flatten__", None)
    if flatten is None:
        return [value]
    names, _ = flatten()
    return [tensor for name in names for tensor in _storage_tensors(getattr(value, name))]


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: the profiler's C++ side logs two lines per use there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_memory(step: Callable[[], Any], device: torch.device) -> int | None:
    """Largest amount of memory allocated during one call of ``step`` beyond what existed before; None on
    a device whose allocator cannot be read."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    results = prof.profiler.kineto_results if prof.profiler is not None else None
    if results is None:
        return None
    events = sorted((e for e in results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak
