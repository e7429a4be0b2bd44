"""How an algorithm's ``update`` is executed. A strategy never changes the math.

Every strategy calls the algorithm's one ``update(param, grad, *state_tensors, **scalars)``, updates the
parameters in place in the storage they had, and checks its inputs (sparse gradients, state that no
longer matches its parameter after ``model.to()``) before it changes anything. They differ in what they
hand ``update``:

``loop``
    One call per parameter tensor, with the per-parameter scalars (``step`` …) as Python numbers,
    exactly as torch's for-loop (``foreach=False``) computes them: bit-for-bit equal to ``torch.optim``.
``foreach``
    One call per bucket of parameters that share a device, a dtype and every per-parameter scalar, on
    :class:`~scratchopt._tensorlist.TensorList` objects whose methods are ``torch._foreach_*`` calls.
    On the CPU bit-exact with ``loop`` (torch's CPU foreach ops run the single-tensor kernels).
``flat``
    The state lives in one buffer per key (see :mod:`scratchopt._flat`); a step gathers the small
    params and their gradients into buffers, runs ``update`` once on them and copies the params back,
    and runs ``update`` on each large param (≥ ``DIRECT_NUMEL`` elements) where it lies. Bit-exact with
    ``loop`` on the CPU. A step that cannot run whole runs ``foreach`` on the params and views of the
    state buffers.
``compiled``
    ``update`` is recorded and replayed by a ``torch.compile``-d kernel (see :mod:`scratchopt._compiled`),
    called per parameter tensor viewed as 1-d. Scheduled hyperparameters and step-dependent scalars
    travel on a float64 tape, so they never recompile.
``fused``
    ``flat`` + ``compiled``: one generated kernel per buffer — the fastest path; ``fused=True`` maps here.

A tensor or buffer of fewer than ``_compiled.MIN_KERNEL_NUMEL`` elements runs the eager ``update``
under ``compiled`` and ``fused``: recording it and calling a kernel costs more than it saves there.
``compiled`` and ``fused`` are within a few ulp of ``loop`` in float32 and float64, not bit-exact: the
kernel reproduces ATen's operation order and FMAs, but ATen's float32 ``sqrt`` (Sleef, ≤ 0.5001 ulp) is
not always the correctly rounded one Inductor emits; in 16-bit dtypes the kernel keeps float32
intermediates where eager rounds every operation (as torch's own fused kernels do). One-element tensors
and complex buffers run the eager ``update``.

Sparse gradients run per tensor under every strategy. Only elementwise algorithms (``elementwise = True``)
run on lists, buffers or compiled kernels, and a group that lists a parameter twice runs the loop (the
update is applied twice, in order, as torch's for-loop does). For the others every strategy runs the
loop, which is correct by construction.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from scratchopt import _compiled
from scratchopt._flat import DTensor, GroupLayout, memory_order_1d
from scratchopt._tensorlist import TensorList

if TYPE_CHECKING:
    from scratchopt.optimizer import ScratchOptimizer

_grad_of = operator.attrgetter("grad")


def _python_scalar(value: Any) -> Any:
    return value.item() if isinstance(value, Tensor) else value


def _params_with_grad(optimizer: ScratchOptimizer, group: dict[str, Any]) -> list[Tensor]:
    """The params this step updates, checked (torch's errors, raised before anything changes)."""
    params = [p for p in group["params"] if p.grad is not None]
    if params:
        optimizer.check_inputs(group, params)
    return params


def _state_tensors(optimizer: ScratchOptimizer, param: Tensor) -> list[Tensor | None]:
    state = optimizer.state.get(param, {})
    return [state.get(key) for key in optimizer.state_keys]


def _count_step(optimizer: ScratchOptimizer, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    return {name: _python_scalar(value) for name, value in optimizer.count_step(param, group).items()}


def _has_duplicates(params: list[Tensor]) -> bool:
    return len({id(p) for p in params}) != len(params)


def _loop(optimizer: ScratchOptimizer, group: dict[str, Any], params: list[Tensor],
          hyperparameters: dict[str, Any]) -> None:
    for param in params:
        values = _count_step(optimizer, param, group)
        optimizer.update(param, param.grad, *_state_tensors(optimizer, param), **hyperparameters, **values)


def run_loop(optimizer: ScratchOptimizer, group: dict[str, Any]) -> None:
    params = _params_with_grad(optimizer, group)
    if params:
        _loop(optimizer, group, params, optimizer.update_arguments(group))


def _foreach_counted(optimizer: ScratchOptimizer, hyperparameters: dict[str, Any], params: list[Tensor],
                      values: dict[Tensor, dict[str, Any]]) -> None:
    """``update`` on lists, one per bucket of params whose ``count_step`` already ran and agreed."""
    buckets: dict[tuple, list[Tensor]] = {}
    for p in params:
        states = _state_tensors(optimizer, p)
        kind = tuple(None if s is None else (s.dtype, s.device) for s in states)
        key = (p.device, p.dtype, kind, tuple(sorted(values[p].items())))
        buckets.setdefault(key, []).append(p)
    for members in buckets.values():
        columns = zip(*[_state_tensors(optimizer, p) for p in members])
        states = [None if column[0] is None else TensorList(column) for column in columns]
        optimizer.update(TensorList(members), TensorList([p.grad for p in members]), *states,
                         **hyperparameters, **values[members[0]])


def _foreach(optimizer: ScratchOptimizer, group: dict[str, Any], params: list[Tensor],
             hyperparameters: dict[str, Any]) -> None:
    sparse = [p for p in params if p.grad.layout != torch.strided]
    if sparse:
        _loop(optimizer, group, sparse, hyperparameters)
        params = [p for p in params if p.grad.layout == torch.strided]
    values = {p: _count_step(optimizer, p, group) for p in params}
    _foreach_counted(optimizer, hyperparameters, params, values)


def run_foreach(optimizer: ScratchOptimizer, group: dict[str, Any]) -> None:
    params = _params_with_grad(optimizer, group)
    if not params:
        return
    hyperparameters = optimizer.update_arguments(group)
    if not optimizer.elementwise or _has_duplicates(params):
        _loop(optimizer, group, params, hyperparameters)
    else:
        _foreach(optimizer, group, params, hyperparameters)


def _as_1d(tensors: list[Tensor | None]) -> list[Tensor | None] | None:
    """The tensors as 1-d views over the same elements in the same order, or None if they cannot be:
    each in its memory order, which is one order for all when they are contiguous or strided alike."""
    present = [t for t in tensors if t is not None]
    alike = all(t.is_contiguous() for t in present) or all(
        t.stride() == present[0].stride() and t.shape == present[0].shape for t in present)
    views = [None if t is None else memory_order_1d(t) for t in tensors]
    if not alike or any(view is None for view, t in zip(views, tensors) if t is not None):
        return None
    return views


def _local_shards(tensors: list[Tensor | None]) -> list[Tensor | None]:
    """DTensors placed alike (FSDP2's param, grad and state) as their local shards: an elementwise update
    of each shard is the update of the whole. Tensors placed differently are kept as they are."""
    present = [t for t in tensors if t is not None]
    if DTensor is None or not isinstance(present[0], DTensor) or not all(
            isinstance(t, DTensor) and t.placements == present[0].placements for t in present):
        return tensors
    return [None if t is None else t.to_local() for t in tensors]


def run_compiled(optimizer: ScratchOptimizer, group: dict[str, Any]) -> None:
    params = _params_with_grad(optimizer, group)
    if not params:
        return
    hyperparameters = optimizer.update_arguments(group)
    if not optimizer.elementwise:
        _loop(optimizer, group, params, hyperparameters)
        return
    recordings: dict[tuple, _compiled.Program | None] = {}
    for p in params:
        values = _count_step(optimizer, p, group)
        states = _state_tensors(optimizer, p)
        scalars = {**hyperparameters, **values}
        views = _as_1d(_local_shards([p, p.grad, *states])) if p.grad.layout == torch.strided else None
        if views is not None:
            key = (tuple(sorted(values.items())), tuple(None if t is None else (t.dtype, t.device) for t in views))
            known = recordings.get(key, False)
            if known is not None:
                recordings[key] = _compiled.run(optimizer.update, views, scalars, known or None)
                if recordings[key] is not None:
                    continue
        optimizer.update(p, p.grad, *states, **scalars)


def _update_flat(optimizer: ScratchOptimizer, flat: Any, grads: Any, scalars: dict[str, Any], compiled: bool) -> None:
    """``update`` on the gathered buffers and on each large param where it lies (one recording serves
    every call of a step: they differ only in length), then the small params get their new values."""
    program = None
    for tensors in flat.update_arguments(optimizer, grads):
        if compiled:
            program = _compiled.run(optimizer.update, tensors, scalars, program)
            if program is not None:
                continue
        optimizer.update(*tensors, **scalars)
    flat.scatter()


def _layouts(optimizer: ScratchOptimizer) -> dict[int, GroupLayout]:
    return optimizer.__dict__.setdefault("_flat_layouts", {})


def _flat_fast_step(optimizer: ScratchOptimizer, group: dict[str, Any], compiled: bool) -> bool:
    """The steady state: the group's members, and only they, have dense gradients; False if not so
    (then nothing has changed but the layout's scratch buffers)."""
    layout = _layouts(optimizer).get(id(group))
    if layout is None or not layout.covers(group):
        return False
    grads = layout.member_grads(list(map(_grad_of, group["params"])))
    if grads is None:
        return False
    try:
        for flat, flat_grads in zip(layout.flats, grads):
            flat.gather(flat_grads)
    except RuntimeError:  # a sparse gradient: copy_ refuses it before writing; the slow path handles it
        return False
    hyperparameters = optimizer.update_arguments(group)
    for flat, flat_grads in zip(layout.flats, grads):
        values = {k: _python_scalar(v) for k, v in flat.advance_scalars(optimizer, group).items()}
        _update_flat(optimizer, flat, flat_grads, {**hyperparameters, **values}, compiled)
    return True


def _current_layout(optimizer: ScratchOptimizer, group: dict[str, Any], params: list[Tensor]) -> GroupLayout:
    """The group's layout, rebuilt when these params (with a dense gradient) are not all its members."""
    layouts = _layouts(optimizer)
    layout = layouts.get(id(group))
    if layout is not None and layout.covers(group):
        members = {id(p): flat for flat in layout.flats for p in flat.members}
        if all(id(p) in members and members[id(p)].dtype == p.dtype and members[id(p)].device == p.device
               for p in params) and all(flat.params_in_place() for flat in layout.flats):
            return layout
    alive = {id(g) for g in optimizer.param_groups}
    for stale in [key for key in layouts if key not in alive]:
        del layouts[stale]
    layout = layouts[id(group)] = GroupLayout(optimizer, group, params)
    return layout


def _run_flat(optimizer: ScratchOptimizer, group: dict[str, Any], compiled: bool) -> None:
    if optimizer.elementwise and _flat_fast_step(optimizer, group, compiled):
        return
    params = _params_with_grad(optimizer, group)
    if not params:
        return
    hyperparameters = optimizer.update_arguments(group)
    if not optimizer.elementwise or _has_duplicates(params):
        _loop(optimizer, group, params, hyperparameters)
        return
    dense = [p for p in params if p.grad.layout == torch.strided]
    if len(dense) < len(params):
        _loop(optimizer, group, [p for p in params if p.grad.layout != torch.strided], hyperparameters)
    values = {p: _count_step(optimizer, p, group) for p in dense}
    layout = _current_layout(optimizer, group, dense)
    for flat in layout.flats:
        present = [p for p in flat.members if p in values]
        first = values[present[0]] if present else None
        if flat.adopted and len(present) == len(flat.members) and all(values[p] == first for p in present):
            grads = [p.grad for p in flat.members]
            flat.gather(grads)
            _update_flat(optimizer, flat, grads, {**hyperparameters, **first}, compiled)
        elif present:
            _foreach_counted(optimizer, hyperparameters, present, values)
        flat.uniform = None


def run_flat(optimizer: ScratchOptimizer, group: dict[str, Any]) -> None:
    _run_flat(optimizer, group, compiled=False)


def run_fused(optimizer: ScratchOptimizer, group: dict[str, Any]) -> None:
    _run_flat(optimizer, group, compiled=True)


_RUNNERS = {"loop": run_loop, "foreach": run_foreach, "compiled": run_compiled, "flat": run_flat,
            "fused": run_fused}
#: The strategy names ``impl=`` accepts.
NAMES: tuple[str, ...] = tuple(_RUNNERS)


def run(impl: str, optimizer: ScratchOptimizer, group: dict[str, Any]) -> None:
    """Run one param group's update with the strategy named ``impl``."""
    _RUNNERS[impl](optimizer, group)


def forget_layouts(optimizer: ScratchOptimizer) -> None:
    """Drop the flat layouts (after ``load_state_dict``): the next step rebuilds them from the state."""
    _layouts(optimizer).clear()
