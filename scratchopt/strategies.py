"""How an algorithm's ``update`` is executed. A strategy never changes the math.

``loop`` is the reference: one call of ``update`` per parameter tensor, with the per-parameter scalars
(``step`` …) as Python numbers, exactly as torch's for-loop (``foreach=False``) path computes them. That is
why it is bit-for-bit equal to ``torch.optim``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from scratchopt._base import ScratchOptimizer


def _python_scalar(value: Any) -> Any:
    return value.item() if isinstance(value, Tensor) else value


def run_loop(optimizer: ScratchOptimizer, group: dict[str, Any], params: list[Tensor]) -> None:
    hyperparameters = optimizer._hyperparameters(group)
    for param in params:
        per_param = optimizer._prepare(param, group)
        per_param = {name: _python_scalar(value) for name, value in per_param.items()}
        state = optimizer.state.get(param, {})
        state_tensors = [state.get(key) for key in optimizer.state_keys]
        optimizer.update(param, param.grad, *state_tensors, **hyperparameters, **per_param)


AVAILABLE = {"loop": run_loop}


def run(impl: str, optimizer: ScratchOptimizer, group: dict[str, Any], params: list[Tensor]) -> None:
    """Run one param group's update with the strategy named ``impl``."""
    AVAILABLE[impl](optimizer, group, params)
