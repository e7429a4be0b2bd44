"""The few helpers an ``update`` may call besides Tensor methods and Python arithmetic."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from scratchopt.strategies.kernels import runtime
from scratchopt.strategies.tensorlist import TensorList


def cast_like(value: Any, reference: Tensor) -> Any:
    """A tensor hyperparameter moved to the reference's device and dtype (a number is left alone)."""
    if isinstance(value, Tensor):
        return value.to(device=reference.device, dtype=reference.dtype)
    return value


def zeros_like(param: Tensor) -> Tensor:
    """Zero state shaped, typed and strided like the parameter, as torch allocates it."""
    return torch.zeros_like(param, memory_format=torch.preserve_format)


def as_real(*tensors: Any) -> tuple[Any, ...]:
    """Complex tensors viewed as real ones with a trailing dimension of 2 (others and None pass through).

    An ``update`` receives complex parameters as they are and calls this where torch's for-loop does:
    the rounding of the weight-decay term depends on whether it is computed in complex or real arithmetic.
    """
    # A TensorList answers torch.view_as_real through __torch_function__, tensor by tensor.
    return tuple(
        torch.view_as_real(t) if isinstance(t, (Tensor, TensorList)) and t.is_complex() else t  # type: ignore[arg-type]
        for t in tensors
    )


def get_value(value: Any) -> Any:
    """A 0-d tensor read as a Python number (``.item()``), as torch's ``_get_value`` reads ``step`` or
    NAdam's ``mu_product`` outside ``torch.compile``; anything else is returned unchanged.

    Use it where torch turns a state tensor into a Python scalar before doing scalar arithmetic with it:
    the arithmetic is then done in Python float64, not in the tensor's dtype.
    """
    return value.item() if isinstance(value, Tensor) else value


# Bookkeeping scalars: an algorithm's 0-d per-parameter state (``step``, NAdam's μ product, ASGD's η and
# μ), read and changed for a whole group at once by its ``count_steps``. The native runtime, once built,
# does each in one pass in C++ (a multi-tensor op on thousands of 0-d tensors costs microseconds per
# tensor); torch's multi-tensor ops do it otherwise, with the same rounding: each value in the tensor's
# dtype, as ``t += x`` with a Python number rounds it. Each returns the values after it as Python numbers,
# or None with nothing changed unless every tensor is a 0-d float tensor on one device.

_PLAIN = (Tensor, torch.nn.Parameter)
_READ, _ADD, _MULTIPLY, _STORE = 0, 1, 2, 3


def read_scalars(tensors: list[Any]) -> list[float] | None:
    """The values of the 0-d tensors."""
    return _scalars(tensors, _READ, [])


def count_counters(counters: list[Any]) -> list[float] | None:
    """Each counter advanced by one (``step += 1``)."""
    return _scalars(counters, _ADD, [1.0])


def scale_scalars(tensors: list[Any], factors: list[float]) -> list[float] | None:
    """Each tensor multiplied in place by its factor (``t *= factor``)."""
    return _scalars(tensors, _MULTIPLY, factors)


def store_scalars(tensors: list[Any], values: list[float]) -> list[float] | None:
    """Each tensor set to its value (``t.fill_(value)``)."""
    return _scalars(tensors, _STORE, values)


def _scalars(tensors: list[Any], op: int, values: list[float]) -> list[float] | None:
    module = runtime.ready()
    if module is not None:
        found = module.scalars(tensors, op, values, _PLAIN)
        if found is not None:
            return found
    if not tensors or not all(isinstance(t, Tensor) and t.dim() == 0 and t.is_floating_point() for t in tensors):
        return None
    if len({t.device for t in tensors}) != 1:
        return None
    if op == _ADD:
        torch._foreach_add_(tensors, values[0])
    elif op == _MULTIPLY:
        torch._foreach_mul_(tensors, values)
    elif op == _STORE:
        for tensor, value in zip(tensors, values):
            tensor.fill_(value)
    return torch.stack(tensors).tolist()


def global_gradient_norm(grads: list[Tensor], device: torch.device) -> Tensor:
    """G = the 2-norm of all the gradients, as ``pytorch-optimizer`` sums it (for the global norm of its
    LAMB and Adan): each tensor's norm (batched where
    all share a device and a dtype other than float16/bfloat16), squared and summed in float32."""
    if not grads:
        return torch.zeros(1, dtype=torch.float32, device=device)
    half = (torch.float16, torch.bfloat16)
    first = grads[0]
    batched = first.dtype not in half and all(
        g.device == first.device and g.dtype == first.dtype and not g.is_sparse for g in grads
    )
    norms = torch._foreach_norm(grads) if batched else [(g.float() if g.dtype in half else g).norm() for g in grads]
    # A sharded gradient's norm (FSDP2) is a partial DTensor: its value over every rank, as a plain tensor.
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    squared = torch.stack([norm.to(device) for norm in norms]).float().square_()
    return squared.sum().reshape(1).sqrt_()
