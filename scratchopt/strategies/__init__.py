"""How an algorithm's ``update`` is executed: the strategies, their registry and the one dispatcher.

A strategy never changes the math. Each module of this package that binds ``STRATEGY`` to a
:class:`~scratchopt.strategies.base.Strategy` is one strategy, registered by its ``name`` (the value of
``impl=``); :data:`STRATEGIES` is the registry every tool and test reads. ``docs/design.md`` describes
the contract, the data flow of one step and how to add a strategy.

:func:`run` is the dispatcher. For each param group it alone

1. selects the params that have a gradient;
2. calls ``optimizer.check_inputs`` on them, before anything changes;
3. reads the group's hyperparameters;
4. sends to the loop what only the loop can take — an algorithm that is not elementwise, a group that
   lists a param twice, params with sparse gradients — and the rest to the strategy named ``impl``.

A strategy that can do all of this natively in one pass over the group (:meth:`Strategy.step_group`)
is offered the group first; it declines, having changed nothing, whenever any of these rules applies.
"""

from __future__ import annotations

import importlib
import operator
import pkgutil
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from scratchopt.strategies.base import Strategy

if TYPE_CHECKING:
    from scratchopt.optimizer import ScratchOptimizer


def _discover() -> dict[str, Strategy]:
    found = []
    for module_info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        strategy = getattr(module, "STRATEGY", None)
        if isinstance(strategy, Strategy):
            found.append(strategy)
    return {strategy.name: strategy for strategy in sorted(found, key=lambda s: (s.order, s.name))}


#: Every strategy, by name, in listing order (``loop`` first).
STRATEGIES: dict[str, Strategy] = _discover()
#: The names ``impl=`` accepts.
NAMES: tuple[str, ...] = tuple(STRATEGIES)
LOOP = STRATEGIES["loop"]


def exact_names() -> tuple[str, ...]:
    """The strategies bit-exact with the loop in float32 and float64, loop excluded."""
    return tuple(name for name, strategy in STRATEGIES.items() if strategy.exact and strategy is not LOOP)


def approximate_names() -> tuple[str, ...]:
    """The strategies allowed a few ulp from the loop (compiled kernels)."""
    return tuple(name for name, strategy in STRATEGIES.items() if not strategy.exact)


def run(optimizer: ScratchOptimizer, group: dict[str, Any]) -> None:
    """Update one param group with the strategy ``optimizer.impl``."""
    strategy = STRATEGIES[optimizer.impl]
    if (
        strategy is not LOOP
        and optimizer.elementwise
        and optimizer.default_checks
        and strategy.step_group(optimizer, group)
    ):
        return
    with_grad = [(p, g) for p, g in zip(group["params"], map(_grad_of, group["params"])) if g is not None]
    if not with_grad:
        return
    params = [p for p, _ in with_grad]
    optimizer.check_inputs(group, params)
    hyperparameters = optimizer.update_arguments(group)
    if strategy is not LOOP and (not optimizer.elementwise or _has_duplicates(params)):
        strategy = LOOP
    if strategy is not LOOP and any(g.layout != torch.strided for _, g in with_grad):
        LOOP.update(optimizer, group, [p for p, g in with_grad if g.layout != torch.strided], hyperparameters)
        params = [p for p, g in with_grad if g.layout == torch.strided]
        if not params:
            return
    strategy.update(optimizer, group, params, hyperparameters)


def reset(optimizer: ScratchOptimizer) -> None:
    """Make every strategy forget what it keeps for ``optimizer`` (after ``load_state_dict``)."""
    for strategy in STRATEGIES.values():
        strategy.reset(optimizer)


_grad_of = operator.attrgetter("grad")


def _has_duplicates(params: list[Tensor]) -> bool:
    return len({id(p) for p in params}) != len(params)


__all__ = ["LOOP", "NAMES", "STRATEGIES", "Strategy", "approximate_names", "exact_names", "reset", "run"]
