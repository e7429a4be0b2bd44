"""How an algorithm's ``update`` is executed: the strategies, their registry and the one dispatcher.

A strategy never changes the math. Each module of this package that binds ``STRATEGY`` to a
:class:`~scratchopt.strategies.base.Strategy` is one strategy, registered by its ``name`` (the value of
``impl=``); :data:`STRATEGIES` is the registry every tool and test reads. ``docs/design.md`` describes
the contract, the data flow of one step and how to add a strategy.

:func:`step` is the dispatcher. For each param group it alone (:func:`plan`)

1. selects the params that have a gradient;
2. calls ``optimizer.check_inputs`` on them, before anything changes;
3. reads the group's hyperparameters;
4. sends to the loop what only the loop can take — an algorithm that is not elementwise, a group that
   lists a param twice, params with sparse gradients — and the rest to the group's strategy
   (``group["impl"]``);

and only once every group is checked does it update them, so no step is half-done across groups either.
Two optional hooks of the algorithm run in between, once all groups are checked: :meth:`reduce
<scratchopt.optimizer.ScratchOptimizer.reduce>` (sums over every parameter that the updates need, such
as Prodigy's step size estimate; it may also skip the step) before the groups are planned, and
:meth:`advance_group <scratchopt.optimizer.ScratchOptimizer.advance_group>` (a group's own bookkeeping,
a counter kept in the group) just before each group's update.
A strategy that can do all of this natively in one pass over the group (:meth:`Strategy.plan_group`)
is offered the group first; it declines, having changed nothing, whenever any of these rules applies.
"""

from __future__ import annotations

import importlib
import operator
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from scratchopt import precision
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


def step(optimizer: ScratchOptimizer) -> None:
    """Update every group of the optimizer, each with its strategy (``optimizer.impl_of(group)``): every
    group is checked before any changes, so bad input in one group leaves the others as they were."""
    groups = optimizer.param_groups
    reduced: list[dict[str, Any]] = [{} for _ in groups]
    if optimizer.reduces:
        checked = [(group, check(optimizer, group)) for group in groups]
        found = optimizer.reduce(checked)
        if found is None:
            return  # the algorithm skips this step
        reduced = found
    plans = [plan(optimizer, group, extra) for group, extra in zip(groups, reduced, strict=True)]
    for group, planned in zip(groups, plans, strict=True):
        optimizer.advance_group(group)
        if planned is not None:
            planned()


def check(optimizer: ScratchOptimizer, group: dict[str, Any]) -> list[Tensor]:
    """Check one param group as :func:`plan` does, changing nothing; return its params with a gradient."""
    optimizer.impl_of(group)  # an invalid impl raises here, before the reduction changes anything
    params = [p for p in group["params"] if p.grad is not None]
    if params:
        optimizer.check_inputs(group, params)
        optimizer.update_arguments(group)
    return params


def plan(
    optimizer: ScratchOptimizer, group: dict[str, Any], extra: dict[str, Any] | None = None
) -> Callable[[], None] | None:
    """Check one param group, changing nothing, and return the step that updates it (None: no param of
    it has a gradient). ``extra``: arguments of ``update`` the algorithm's :meth:`reduce
    <scratchopt.optimizer.ScratchOptimizer.reduce>` computed for the group."""
    extra = extra or {}
    strategy = STRATEGIES[optimizer.impl_of(group)]
    low_precision = precision.is_low(group)
    if strategy is not LOOP and optimizer.elementwise and optimizer.default_checks:
        planned = strategy.plan_group(optimizer, group, extra)
        if planned is not None:
            return planned
    with_grad = [(p, g) for p, g in zip(group["params"], map(_grad_of, group["params"])) if g is not None]
    if not with_grad:
        return None
    params = [p for p, _ in with_grad]
    optimizer.check_inputs(group, params)
    hyperparameters = {**optimizer.update_arguments(group), **extra}
    if strategy is not LOOP and (not optimizer.elementwise or _has_duplicates(params)):
        strategy = LOOP
    sparse: list[Tensor] = []
    if strategy is not LOOP and any(g.layout != torch.strided for _, g in with_grad):
        sparse = [p for p, g in with_grad if g.layout != torch.strided]
        params = [p for p, g in with_grad if g.layout == torch.strided]

    def update() -> None:
        if sparse and low_precision:
            precision.update(optimizer, group, sparse, hyperparameters, LOOP.update)
        elif sparse:
            LOOP.update(optimizer, group, sparse, hyperparameters)
        if params and low_precision:
            precision.update(optimizer, group, params, hyperparameters, strategy.update)
        elif params:
            strategy.update(optimizer, group, params, hyperparameters)

    return update


def run(optimizer: ScratchOptimizer, group: dict[str, Any]) -> None:
    """Update one param group with its strategy (``optimizer.impl_of(group)``), for an algorithm without
    :meth:`reduce <scratchopt.optimizer.ScratchOptimizer.reduce>`."""
    planned = plan(optimizer, group)
    optimizer.advance_group(group)
    if planned is not None:
        planned()


def reset(optimizer: ScratchOptimizer) -> None:
    """Make every strategy forget what it keeps for ``optimizer`` (after ``load_state_dict``)."""
    for strategy in STRATEGIES.values():
        strategy.reset(optimizer)


_grad_of = operator.attrgetter("grad")


def _has_duplicates(params: list[Tensor]) -> bool:
    return len({id(p) for p in params}) != len(params)


__all__ = [
    "LOOP",
    "NAMES",
    "STRATEGIES",
    "Strategy",
    "approximate_names",
    "check",
    "exact_names",
    "plan",
    "reset",
    "run",
    "step",
]
