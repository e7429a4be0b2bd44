"""Hyperparameter validation with torch's exception types and message prefixes.

Each message starts as torch's does (so code matching torch's errors keeps working) and then names the
argument and the range it must lie in.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def require_message(ok: Any, message: str, allowed: str) -> None:
    """Raise ``ValueError("{message} (allowed: {allowed})")`` unless ``ok``; ``message`` is torch's."""
    if not ok:
        raise ValueError(f"{message} (allowed: {allowed})")


def require(ok: Any, what: str, value: Any, allowed: str) -> None:
    """Raise ``ValueError("Invalid {what}: {value} (allowed: {allowed})")`` unless ``ok``."""
    require_message(ok, f"Invalid {what}: {value}", allowed)


def require_should_be(ok: Any, subject: str, relation: str, value: Any, argument: str) -> None:
    """torch's newer phrasing (Adafactor, Muon): ``"{subject} should be {relation} but is: {value}"``."""
    require_message(ok, f"{subject} should be {relation} but is: {value}", f"{argument} {relation}")


def check_tensor_hyperparameter(value: Any, name: str, *, foreach: bool | None, capturable: bool) -> None:
    """A tensor hyperparameter must have one element, and torch's foreach path refuses it."""
    if not isinstance(value, Tensor):
        return
    if foreach and not capturable:
        raise ValueError(f"{name} as a Tensor is not supported for capturable=False and foreach=True")
    if value.numel() != 1:
        raise ValueError(f"Tensor {name} must be 1-element")


def check_one_element_lr(lr: Any) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")


def check_lr(lr: Any) -> None:
    check_one_element_lr(lr)
    require(0.0 <= lr, "learning rate", lr, "lr >= 0")


def check_nonnegative(value: Any, name: str) -> None:
    require(0.0 <= value, f"{name} value", value, f"{name} >= 0")


def check_eps(eps: Any) -> None:
    require(0.0 <= eps, "epsilon value", eps, "eps >= 0")


def check_betas(betas: tuple[Any, ...]) -> None:
    for index, beta in enumerate(betas):
        require(0.0 <= beta < 1.0, f"beta parameter at index {index}", beta, f"0 <= betas[{index}] < 1")


def check_adam_arguments(lr: Any, eps: float, betas: tuple[Any, Any], weight_decay: float) -> None:
    """The checks every Adam-like constructor makes, in torch's order: lr, eps, betas, weight_decay."""
    check_lr(lr)
    check_eps(eps)
    check_betas(betas)
    check_nonnegative(weight_decay, "weight_decay")


def require_closure(optimizer: torch.optim.Optimizer, closure: Any, returns: str) -> None:
    """torch's LBFGS raises TypeError for a missing closure; so do we, with a message that says why."""
    if closure is None or not callable(closure):
        name = type(optimizer).__name__
        raise TypeError(
            f"{name}.step() requires a closure ({returns}); got {closure!r}. "
            f"Call {name}.step(closure), as with torch.optim.LBFGS."
        )
