"""What one optimizer step must move through memory, and how long that takes at the measured bandwidth.

Bytes per parameter element: read p, g and every state tensor, write p and every state tensor —
``(3 + 2·states)·itemsize`` — plus gathering the gradients into an optimizer's buffer (read g, write its
copy: ``2·itemsize``). AdamW in float32: 28 + 8 = 36 B. The state tensors are counted in the
optimizer's actual state after the steps. The roofline is those bytes divided by the bandwidth of
``y.add_(x, alpha=a)`` (12 B per element) measured in the same run.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils import benchmark


def _param_state_tensors(optimizer: torch.optim.Optimizer, param: Tensor) -> int:
    """State tensors the step reads and writes in full for ``param`` (not ``step`` or other scalars)."""
    state = optimizer.state.get(param, {})
    return sum(1 for v in state.values() if isinstance(v, Tensor) and v.dim() > 0 and v.numel() == param.numel())


def traffic_bytes_per_param(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """(update bytes, gradient-gathering bytes) per parameter element, from the optimizer's state.

    Update: read p, g and every state tensor, write p and every state tensor, ``(3 + 2·states)·itemsize``.
    Gathering the gradients into the optimizer's buffer: read g, write its copy, ``2·itemsize``.
    """
    update = gather = 0
    numel = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            update += (3 + 2 * _param_state_tensors(optimizer, p)) * p.element_size() * p.numel()
            gather += 2 * p.element_size() * p.numel()
            numel += p.numel()
    return (update / numel, gather / numel) if numel else (0.0, 0.0)


def measure_bandwidth(device: torch.device, numel: int = 50_000_000) -> dict[str, float]:
    """GB/s of ``y.add_(x, alpha=a)`` (12 B/element) and of ``y.copy_(x)`` (8 B/element)."""
    x = torch.randn(numel, device=device)
    y = torch.randn(numel, device=device)
    axpy = benchmark.Timer("y.add_(x, alpha=0.5)", globals={"x": x, "y": y}).blocked_autorange(min_run_time=0.5)
    copy_ = benchmark.Timer("y.copy_(x)", globals={"x": x, "y": y}).blocked_autorange(min_run_time=0.5)
    return {"axpy_GBps": 12 * numel / axpy.median / 1e9, "copy_GBps": 8 * numel / copy_.median / 1e9}


def roofline_ms(bytes_per_param: float, numel: int, bandwidth_GBps: float) -> float:
    """Milliseconds to move ``bytes_per_param`` for each of ``numel`` elements at ``bandwidth_GBps``."""
    return bytes_per_param * numel / (bandwidth_GBps * 1e9) * 1e3
