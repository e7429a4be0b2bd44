"""``impl="foreach"``: ``update`` on lists of tensors whose methods are ``torch._foreach_*`` calls.

One call per bucket of params that share a device, a dtype, the dtypes and devices of their state and
every per-parameter scalar (so each scalar the update computes is one Python number, the loop's), on
:class:`~scratchopt.strategies.tensorlist.TensorList` objects. On the CPU torch's foreach ops run the
single-tensor kernels tensor by tensor, so this is bit-exact with the loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from torch import Tensor

from scratchopt.strategies.base import Hyperparameters, Strategy, count_step, state_tensors
from scratchopt.strategies.tensorlist import TensorList

if TYPE_CHECKING:
    from scratchopt.optimizer import ScratchOptimizer


def update_counted(
    optimizer: ScratchOptimizer,
    hyperparameters: Hyperparameters,
    params: list[Tensor],
    values: dict[Tensor, dict[str, Any]],
) -> None:
    """``update`` on lists, one per bucket of params whose ``count_step`` already ran (``values``)."""
    buckets: dict[tuple[Any, ...], list[Tensor]] = {}
    for p in params:
        states = state_tensors(optimizer, p)
        kind = tuple(None if s is None else (s.dtype, s.device) for s in states)
        key = (p.device, p.dtype, kind, tuple(sorted(values[p].items())))
        buckets.setdefault(key, []).append(p)
    for members in buckets.values():
        columns = zip(*[state_tensors(optimizer, p) for p in members])
        states_lists = [None if column[0] is None else TensorList(column) for column in columns]
        grads = cast(list[Tensor], [p.grad for p in members])  # the dispatcher passes params with a gradient
        optimizer.update(TensorList(members), TensorList(grads), *states_lists, **hyperparameters, **values[members[0]])


class Foreach(Strategy):
    name = "foreach"
    ulp = 0
    order = 10
    summary = "the same update on lists of tensors through torch._foreach_* ops; bit-exact with loop"

    def update(
        self, optimizer: ScratchOptimizer, group: dict[str, Any], params: list[Tensor], hyperparameters: Hyperparameters
    ) -> None:
        values = {p: count_step(optimizer, p, group) for p in params}
        update_counted(optimizer, hyperparameters, params, values)


STRATEGY = Foreach()
