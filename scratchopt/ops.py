"""The few helpers an ``update`` may call besides Tensor methods and Python arithmetic."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

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
