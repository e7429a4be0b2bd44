"""The contract every strategy keeps, and the helpers they share.

A strategy is one object (an instance of a :class:`Strategy` subclass, bound to the name ``STRATEGY``
in its module) with a ``name``, what it guarantees against the loop (``ulp``: 0 for bit-exact), and one
method, :meth:`Strategy.update`, that runs the algorithm's ``update`` on a list of params of one group.
The dispatcher (:func:`scratchopt.strategies.step`) has already

* selected the params that have a gradient, in the group's order;
* called ``optimizer.check_inputs`` on them, so nothing a strategy does can fail half-way on bad input;
* sent to the loop what only the loop can take: sparse gradients, a param listed twice in a group, and
  every param of an algorithm that is not elementwise;
* read the group's hyperparameters once (``optimizer.update_arguments(group)``).

So :meth:`Strategy.update` receives dense, distinct params of an elementwise algorithm, and must update
them in place, in the storage they have, by calling the one ``update`` of the algorithm.

The dispatcher checks every group before it updates any, so a step is never half-done across groups
either: it plans each group (checks, nothing changed), then runs the plans. A strategy may plan a whole
group in one pass (:meth:`Strategy.plan_group`) when it makes those checks itself, natively, on the
group's own list: it returns the step that updates the group, exactly as the general path would, or
None having changed nothing, and the dispatcher then takes the general path (which raises torch's errors
for bad input). The dispatcher offers it only groups of an elementwise algorithm whose checks are the
default ones. A strategy
keeps the data it holds per optimizer inside itself (keyed weakly by the optimizer) and forgets it in
:meth:`Strategy.reset`, which runs after ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

if TYPE_CHECKING:
    from scratchopt.optimizer import ScratchOptimizer

#: The keyword arguments of ``update`` that come from a param group.
Hyperparameters = dict[str, Any]


class Strategy:
    """How the params of one group are updated with the algorithm's ``update``."""

    #: The value of ``impl=`` that selects it.
    name: ClassVar[str]
    #: The largest distance from ``impl="loop"`` its tests allow in float32 and float64, in units in the
    #: last place: 0 means bit for bit.
    ulp: ClassVar[int] = 0
    #: Where it stands in listings (``impl`` choices, benchmark columns): smaller first.
    order: ClassVar[int] = 100
    #: One sentence for listings.
    summary: ClassVar[str] = ""

    @property
    def exact(self) -> bool:
        """Bit for bit equal to the loop in float32 and float64."""
        return self.ulp == 0

    def update(
        self, optimizer: ScratchOptimizer, group: dict[str, Any], params: list[Tensor], hyperparameters: Hyperparameters
    ) -> None:
        """Update ``params`` (dense gradients, each listed once, in the group's order) in place."""
        raise NotImplementedError

    def plan_group(
        self, optimizer: ScratchOptimizer, group: dict[str, Any], extra: dict[str, Any]
    ) -> Callable[[], None] | None:
        """Check the whole group in one pass, changing nothing, and return the step that updates it
        (exactly as the general path would, ``extra`` added to the group's hyperparameters); None where it
        cannot."""
        return None

    def reset(self, optimizer: ScratchOptimizer) -> None:
        """Forget what is kept for ``optimizer`` (its state was replaced by ``load_state_dict``)."""

    def __repr__(self) -> str:
        return f"<strategy {self.name!r}: {'bit-exact' if self.exact else f'within {self.ulp} ulp'}>"


def python_scalar(value: Any) -> Any:
    """A 0-d tensor as a Python number (as torch's for-loop reads ``step``); anything else unchanged."""
    return value.item() if isinstance(value, Tensor) else value


def state_tensors(optimizer: ScratchOptimizer, param: Tensor) -> list[Tensor | None]:
    """The param's state tensors in the order ``update`` takes them (None for an absent key)."""
    state = optimizer.state.get(param, {})
    return [state.get(key) for key in optimizer.state_keys]


def count_step(optimizer: ScratchOptimizer, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    """The algorithm's per-parameter bookkeeping, with its scalars as Python numbers."""
    return {name: python_scalar(value) for name, value in optimizer.count_step(param, group).items()}
