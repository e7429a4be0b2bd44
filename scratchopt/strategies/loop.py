"""``impl="loop"``: one ``update`` call per parameter tensor — the reference every other strategy is
tested against.

The per-parameter scalars (``step`` …) reach ``update`` as Python numbers, exactly as torch's for-loop
(``foreach=False``, torch's CPU default) computes them, so the loop is bit-for-bit equal to
``torch.optim``. It is also what runs whatever another strategy cannot take: sparse gradients, a param
listed twice in a group (its update is applied twice, in order, as torch's for-loop does) and every
algorithm that is not elementwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from scratchopt.strategies.base import Hyperparameters, Strategy, count_step, state_tensors

if TYPE_CHECKING:
    from scratchopt.optimizer import ScratchOptimizer


class Loop(Strategy):
    name = "loop"
    ulp = 0
    order = 0
    summary = "one update call per tensor, torch's for-loop order: bit-for-bit torch.optim(foreach=False)"

    def update(
        self, optimizer: ScratchOptimizer, group: dict[str, Any], params: list[Tensor], hyperparameters: Hyperparameters
    ) -> None:
        for param in params:
            values = count_step(optimizer, param, group)
            optimizer.update(param, param.grad, *state_tensors(optimizer, param), **hyperparameters, **values)


STRATEGY = Loop()
