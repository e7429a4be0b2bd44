"""What one optimizer step must move through memory, and how long that takes at the measured bandwidth.

Bytes per parameter element: read p, g and every state tensor, write p and every state tensor —
``(3 + 2·states)·itemsize``; AdamW in float32: 28 B. The state tensors are counted in the optimizer's
actual state after the steps.

The bandwidth is that of the same access pattern with no arithmetic: a generated native kernel that
reads four float32 arrays and writes three (``p += g; m += g; v += g``), over arrays far larger than
the last-level cache, measured in the same run. Where no native kernel can be built (no C++ compiler,
a GPU) it is ``y.add_(x, alpha=a)``'s (12 B per element), which understates what a multi-stream kernel
reaches. A model whose tensors partly stay in the cache between backward and step (a few million
parameters) can beat this roofline: it is the cost of a step that streams from memory.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils import benchmark


def _param_state_tensors(optimizer: torch.optim.Optimizer, param: Tensor) -> int:
    """State tensors the step reads and writes in full for ``param`` (not ``step`` or other scalars)."""
    state = optimizer.state.get(param, {})
    return sum(1 for v in state.values() if isinstance(v, Tensor) and v.dim() > 0 and v.numel() == param.numel())


def traffic_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Bytes a step moves per parameter element, ``(3 + 2·states)·itemsize``, from the optimizer's state."""
    moved = numel = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            moved += (3 + 2 * _param_state_tensors(optimizer, p)) * p.element_size() * p.numel()
            numel += p.numel()
    return moved / numel if numel else 0.0


def _streams(p: Tensor, g: Tensor, m: Tensor, v: Tensor) -> None:
    """AdamW's memory traffic without its arithmetic: read p, g, m, v; write p, m, v."""
    p.add_(g)
    m.add_(g)
    v.add_(g)


def stream_GBps(numel: int = 40_000_000) -> float | None:
    """GB/s (28 B per element) of :func:`_streams` as one native kernel, or None where none builds.

    The arrays are far larger than the last-level cache, and not a power of two long: four arrays whose
    addresses agree in their low bits compete for the same cache sets and run markedly slower."""
    from scratchopt.strategies.kernels import native, recording

    tensors = [torch.zeros(numel) for _ in range(4)]
    kernel = native.kernel_for(recording.record(_streams, tensors, {}))
    if kernel is None:
        return None
    pointers = [t.data_ptr() for t in tensors]
    timer = benchmark.Timer(
        "kernel([n], pointers, [0.0], True)", globals={"kernel": kernel, "n": numel, "pointers": pointers}
    )
    return 28 * numel / timer.blocked_autorange(min_run_time=0.5).median / 1e9


def measure_bandwidth(device: torch.device, numel: int = 50_000_000) -> dict[str, float | None]:
    """GB/s of the step's access pattern (``stream_GBps``, CPU), of ``y.add_(x, alpha=a)`` (12 B/element)
    and of ``y.copy_(x)`` (8 B/element)."""
    x = torch.randn(numel, device=device)
    y = torch.randn(numel, device=device)
    axpy = benchmark.Timer("y.add_(x, alpha=0.5)", globals={"x": x, "y": y}).blocked_autorange(min_run_time=0.5)
    copy_ = benchmark.Timer("y.copy_(x)", globals={"x": x, "y": y}).blocked_autorange(min_run_time=0.5)
    del x, y
    return {
        "stream_GBps": stream_GBps() if device.type == "cpu" else None,
        "axpy_GBps": 12 * numel / axpy.median / 1e9,
        "copy_GBps": 8 * numel / copy_.median / 1e9,
    }


def roofline_bandwidth(measured: dict[str, float | None]) -> float:
    """The bandwidth the roofline is drawn at: the step's own access pattern where it was measured."""
    stream = measured.get("stream_GBps")
    return float(stream) if stream else float(measured["axpy_GBps"])  # type: ignore[arg-type]


def roofline_ms(bytes_per_param: float, numel: int, bandwidth_GBps: float) -> float:
    """Milliseconds to move ``bytes_per_param`` for each of ``numel`` elements at ``bandwidth_GBps``."""
    return bytes_per_param * numel / (bandwidth_GBps * 1e9) * 1e3
