"""``impl="flat"``: the optimizer's state in one buffer per key, ``update`` run once per buffer.

For each param group the state of the params of one device and dtype lives in flat buffers
(:class:`~scratchopt.strategies.flat_state.FlatState`; ``optimizer.state[p][key]`` is a view of them). A
step gathers the small params and their gradients into scratch buffers with one multi-tensor copy each,
runs ``update`` once on the buffers and copies the params back, and runs ``update`` on each large param
(at least :data:`~scratchopt.strategies.flat_state.DIRECT_NUMEL` elements) where it lies. Bit-exact with
the loop in float32 and float64 on the CPU.

The steady state — the same params have a gradient at every step, as after ``zero_grad()`` — costs a
constant number of Python calls per group. Any other step (a param without a gradient, per-parameter
scalars that no longer agree, ``model.to()``, ``load_state_dict``, a new param) runs ``foreach`` on the
params and views of the state buffers, and rebuilds the layout when the membership changed.
"""

from __future__ import annotations

import operator
import weakref
from typing import TYPE_CHECKING, Any, cast

from torch import Tensor

from scratchopt.strategies.base import Hyperparameters, Strategy, count_step, python_scalar
from scratchopt.strategies.flat_state import FlatState, GroupLayout
from scratchopt.strategies.foreach import update_counted

if TYPE_CHECKING:
    from scratchopt.optimizer import ScratchOptimizer

_grad_of = operator.attrgetter("grad")


class Flat(Strategy):
    name = "flat"
    ulp = 0
    order = 20
    summary = "state in one buffer per key; the update runs once per buffer (gathered small params)"

    def __init__(self) -> None:
        # Each optimizer's layouts, by ``id`` of their param group; dropped with the optimizer.
        self._layouts: weakref.WeakKeyDictionary[ScratchOptimizer, dict[int, GroupLayout]] = weakref.WeakKeyDictionary()

    def layouts(self, optimizer: ScratchOptimizer) -> dict[int, GroupLayout]:
        return self._layouts.setdefault(optimizer, {})

    def reset(self, optimizer: ScratchOptimizer) -> None:
        self._layouts.pop(optimizer, None)

    def update(
        self, optimizer: ScratchOptimizer, group: dict[str, Any], params: list[Tensor], hyperparameters: Hyperparameters
    ) -> None:
        if self._steady_step(optimizer, group, params, hyperparameters):
            return
        values = {p: count_step(optimizer, p, group) for p in params}
        layout = self._current_layout(optimizer, group, params)
        for flat in layout.flats:
            present = [p for p in flat.members if p in values]
            first = values[present[0]] if present else None
            if flat.adopted and len(present) == len(flat.members) and all(values[p] == first for p in present):
                assert first is not None
                grads = cast(list[Tensor], [p.grad for p in flat.members])  # all present: checked above
                flat.gather(grads)
                self._update_buffers(optimizer, flat, grads, {**hyperparameters, **first})
            elif present:
                update_counted(optimizer, hyperparameters, present, values)

    def _steady_step(
        self, optimizer: ScratchOptimizer, group: dict[str, Any], params: list[Tensor], hyperparameters: Hyperparameters
    ) -> bool:
        """The steady state: the group's members, and only they, have gradients, and their per-parameter
        scalars agree; False if not so (then nothing has changed)."""
        layout = self.layouts(optimizer).get(id(group))
        # ``params`` lacks a member's sparse gradient, which the dispatcher sent to the loop.
        if layout is None or not layout.covers(group) or len(params) != layout.n_members:
            return False
        grads = layout.member_grads(list(map(_grad_of, group["params"])))
        if grads is None:
            return False
        for flat, flat_grads in zip(layout.flats, grads):
            flat.gather(flat_grads)
        for flat, flat_grads in zip(layout.flats, grads):
            values = {k: python_scalar(v) for k, v in flat.advance_scalars(optimizer, group).items()}
            self._update_buffers(optimizer, flat, flat_grads, {**hyperparameters, **values})
        return True

    def _update_buffers(
        self, optimizer: ScratchOptimizer, flat: FlatState, grads: Any, scalars: dict[str, Any]
    ) -> None:
        """``update`` on the gathered buffers and on each large param where it lies, then the small params
        get their new values."""
        for tensors in flat.update_arguments(optimizer, grads):
            optimizer.update(*tensors, **scalars)
        flat.scatter()

    def _current_layout(self, optimizer: ScratchOptimizer, group: dict[str, Any], params: list[Tensor]) -> GroupLayout:
        """The group's layout, rebuilt when these params are not all its members."""
        layouts = self.layouts(optimizer)
        layout = layouts.get(id(group))
        if layout is not None and layout.covers(group):
            members = {id(p): flat for flat in layout.flats for p in flat.members}
            if all(
                id(p) in members and members[id(p)].dtype == p.dtype and members[id(p)].device == p.device
                for p in params
            ) and all(flat.params_in_place() for flat in layout.flats):
                return layout
        alive = {id(g) for g in optimizer.param_groups}
        for stale in [key for key in layouts if key not in alive]:
            del layouts[stale]
        layout = layouts[id(group)] = GroupLayout(optimizer, group, params)
        return layout


STRATEGY = Flat()
