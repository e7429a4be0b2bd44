"""How an algorithm's ``update`` is executed. A strategy never changes the math.

Every strategy calls the algorithm's one ``update(param, grad, *state_tensors, **scalars)``; they differ
in what they hand it:

``loop``
    One call per parameter tensor, with the per-parameter scalars (``step`` …) as Python numbers,
    exactly as torch's for-loop (``foreach=False``) computes them: bit-for-bit equal to ``torch.optim``.
``foreach``
    One call per bucket of parameters sharing a device, a dtype and every non-numeric per-parameter
    argument, on :class:`~scratchopt._tensorlist.TensorList` objects whose methods are
    ``torch._foreach_*`` calls; per-parameter numbers that differ (a param that skipped steps) become a
    :class:`~scratchopt._tensorlist.ScalarList`. Complex parameters and sparse gradients run per tensor.
    On the CPU bit-exact with ``loop`` (torch's CPU foreach ops run the single-tensor kernels).
``flat``
    The parameters of a group live in one buffer per (device, dtype), gradients and state too (see
    :mod:`scratchopt._flat`); ``update`` runs once on each whole buffer with Python scalars. Bit-exact
    with ``loop`` on the CPU. Steps where only some params have a gradient run on their views through the
    ``foreach`` machinery.
``compiled``
    ``update`` is recorded once per step and replayed by a ``torch.compile``-d kernel (see
    :mod:`scratchopt._compiled`), called per parameter tensor viewed as 1-d. Scheduled hyperparameters and
    step-dependent scalars travel on a float64 tape, so they never recompile.
``fused``
    ``flat`` + ``compiled``: one generated kernel per buffer — the fastest path; ``fused=True`` maps here.

``compiled`` and ``fused`` are within a few ulp of ``loop``, not bit-exact: the kernel reproduces ATen's
operation order and FMAs, but ATen's float32 ``sqrt`` (Sleef, ≤ 0.5001 ulp) is not always the correctly
rounded one Inductor emits. One-element tensors and complex buffers run the eager ``update`` (a 0-d
tensor never reaches a compiled kernel: Inductor was seen to drop in-place updates of 0-d float64 inputs).

Only elementwise algorithms (``elementwise = True`` on the class) can run on lists, buffers or compiled
kernels. For the others every strategy runs the loop, which is correct by construction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from scratchopt import _compiled, _flat
from scratchopt._tensorlist import RaggedBranch, ScalarList, TensorList, uniform_or_list

if TYPE_CHECKING:
    from scratchopt._base import ScratchOptimizer


def _python_scalar(value: Any) -> Any:
    return value.item() if isinstance(value, Tensor) else value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _params_with_grad(optimizer: ScratchOptimizer, group: dict[str, Any]) -> list[Tensor]:
    params = [p for p in group["params"] if p.grad is not None]
    for p in params:
        optimizer._check_grad(p)
    return params


def _state_tensors(optimizer: ScratchOptimizer, param: Tensor) -> list[Tensor | None]:
    state = optimizer.state.get(param, {})
    return [state.get(key) for key in optimizer.state_keys]


def _prepare(optimizer: ScratchOptimizer, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    return {name: _python_scalar(value) for name, value in optimizer._prepare(param, group).items()}


def _needs_per_tensor(param: Tensor, grad: Tensor) -> bool:
    return param.is_complex() or grad.layout != torch.strided or param.layout != torch.strided


# ------------------------------------------------------------------------------------------------------
# loop
# ------------------------------------------------------------------------------------------------------


def _loop(optimizer: ScratchOptimizer, group: dict[str, Any], params: list[Tensor],
          hyperparameters: dict[str, Any] | None = None) -> None:
    if hyperparameters is None:
        hyperparameters = optimizer._hyperparameters(group)
    for param in params:
        per_param = _prepare(optimizer, param, group)
        optimizer.update(param, param.grad, *_state_tensors(optimizer, param), **hyperparameters, **per_param)


def run_loop(optimizer: ScratchOptimizer, group: dict[str, Any]) -> None:
    params = _params_with_grad(optimizer, group)
    if params:
        _loop(optimizer, group, params)


# ------------------------------------------------------------------------------------------------------
# foreach
# ------------------------------------------------------------------------------------------------------


class _Member:
    __slots__ = ("grad", "param", "states", "values")

    def __init__(self, param: Tensor, grad: Tensor, states: list[Tensor | None], values: dict[str, Any]) -> None:
        self.param, self.grad, self.states, self.values = param, grad, states, values


def _bucket_key(member: _Member) -> tuple:
    p, g = member.param, member.grad
    states = tuple(None if s is None else (s.dtype, s.device) for s in member.states)
    fixed = tuple(sorted((k, v) for k, v in member.values.items() if not _is_number(v)))
    numeric = tuple(sorted(k for k, v in member.values.items() if _is_number(v)))
    return (p.device, p.dtype, g.dtype, g.device, states, fixed, numeric)


def _as_lists(members: list[_Member], optimizer: ScratchOptimizer) -> tuple[TensorList, TensorList, list[Any]]:
    params = TensorList([m.param for m in members])
    grads = TensorList([m.grad for m in members])
    states = []
    for index in range(len(optimizer.state_keys)):
        column = [m.states[index] for m in members]
        states.append(None if column[0] is None else TensorList(column))
    return params, grads, states


def _run_bucket(optimizer: ScratchOptimizer, hyperparameters: dict[str, Any], members: list[_Member]) -> None:
    values = members[0].values
    per_param = {}
    ragged = False
    for name, value in values.items():
        if _is_number(value):
            combined = uniform_or_list([m.values[name] for m in members])
            ragged = ragged or isinstance(combined, ScalarList)
            per_param[name] = combined
        else:
            per_param[name] = value
    if ragged:
        # Per-tensor scalars differ (a param skipped steps). Run the update once on empty lists first:
        # its scalar arithmetic runs in full, so a branch on a per-tensor value that the tensors disagree
        # on shows up here, before anything was modified; then split by value instead.
        first = members[0]
        empty = [TensorList([], first.param.dtype, first.param.device),
                 TensorList([], first.grad.dtype, first.grad.device)]
        empty_states = [None if s is None else TensorList([], s.dtype, s.device) for s in first.states]
        try:
            optimizer.update(*empty, *empty_states, **hyperparameters, **per_param)
        except RaggedBranch:
            by_value: dict[tuple, list[_Member]] = {}
            for m in members:
                by_value.setdefault(tuple(sorted(m.values.items())), []).append(m)
            for part in by_value.values():
                _run_bucket(optimizer, hyperparameters, part)
            return
    params, grads, states = _as_lists(members, optimizer)
    optimizer.update(params, grads, *states, **hyperparameters, **per_param)


def _foreach_prepared(optimizer: ScratchOptimizer, hyperparameters: dict[str, Any], members: list[_Member]) -> None:
    """Run ``update`` on lists for members whose ``_prepare`` already ran (complex/sparse: per tensor)."""
    buckets: dict[tuple, list[_Member]] = {}
    for member in members:
        if _needs_per_tensor(member.param, member.grad):
            optimizer.update(member.param, member.grad, *member.states, **hyperparameters, **member.values)
            continue
        buckets.setdefault(_bucket_key(member), []).append(member)
    for bucket in buckets.values():
        _run_bucket(optimizer, hyperparameters, bucket)


def _foreach(optimizer: ScratchOptimizer, group: dict[str, Any], params: list[Tensor],
             hyperparameters: dict[str, Any]) -> None:
    per_tensor = [p for p in params if _needs_per_tensor(p, p.grad)]
    if per_tensor:
        _loop(optimizer, group, per_tensor, hyperparameters)
        params = [p for p in params if not _needs_per_tensor(p, p.grad)]
    members = []
    for p in params:
        values = _prepare(optimizer, p, group)
        members.append(_Member(p, p.grad, _state_tensors(optimizer, p), values))
    _foreach_prepared(optimizer, hyperparameters, members)


def run_foreach(optimizer: ScratchOptimizer, group: dict[str, Any]) -> None:
    params = _params_with_grad(optimizer, group)
    if not params:
        return
    if not optimizer.elementwise:
        _loop(optimizer, group, params)
        return
    _foreach(optimizer, group, params, optimizer._hyperparameters(group))


# ------------------------------------------------------------------------------------------------------
# compiled: one recorded program per step, replayed by a compiled kernel per tensor
# ------------------------------------------------------------------------------------------------------


def _as_1d(tensors: list[Tensor | None]) -> list[Tensor | None] | None:
    """The tensors as 1-d views over the same elements, or None when they cannot all be viewed so."""
    present = [t for t in tensors if t is not None]
    first = present[0]
    if first.dim() == 0:
        return [None if t is None else t.view(1) for t in tensors]
    if any(t.stride() != first.stride() or t.shape != first.shape for t in present):
        if all(t.is_contiguous() for t in present):
            return [None if t is None else t.view(-1) for t in tensors]
        return None
    if all(t.is_contiguous() for t in present):
        return [None if t is None else t.view(-1) for t in tensors]
    if not all(_flat.is_dense(t) and min(t.stride()) > 0 for t in present):
        return None
    return [None if t is None else t.as_strided((t.numel(),), (1,), t.storage_offset()) for t in tensors]


def _run_recorded(optimizer: ScratchOptimizer, tensors: list[Tensor | None], scalars: dict[str, Any],
                  program: _compiled.Program | None = None) -> _compiled.Program | None:
    """Record (or reuse ``program``'s recording) and run the compiled kernel; None if not compilable.

    One-element tensors are left to the eager update (None): a kernel would be compiled again for them
    (Dynamo specialises a length of 1) for no gain, and 0-d inputs never reach a compiled kernel.
    """
    if tensors[0].numel() <= 1:
        return None
    if program is None:
        try:
            program = _compiled.record(optimizer.update, tensors, scalars)
        except _compiled.NotCompilable:
            return None
    kernel = _compiled.kernel_for(program)
    device = next(t.device for t in tensors if t is not None)
    tape = _compiled.tape_tensor(program, device)
    kernel(*[t for t in tensors if t is not None], tape)
    return program


def run_compiled(optimizer: ScratchOptimizer, group: dict[str, Any]) -> None:
    params = _params_with_grad(optimizer, group)
    if not params:
        return
    if not optimizer.elementwise:
        _loop(optimizer, group, params)
        return
    hyperparameters = optimizer._hyperparameters(group)
    programs: dict[tuple, _compiled.Program | None] = {}
    for p in params:
        grad = p.grad
        values = _prepare(optimizer, p, group)
        states = _state_tensors(optimizer, p)
        tensors = [p, grad, *states]
        views = None if _needs_per_tensor(p, grad) else _as_1d(tensors)
        if views is None:
            optimizer.update(p, grad, *states, **hyperparameters, **values)
            continue
        key = (tuple(sorted(values.items())), tuple(None if t is None else (t.dtype, t.device) for t in views))
        if key in programs and programs[key] is None:
            optimizer.update(p, grad, *states, **hyperparameters, **values)
            continue
        program = _run_recorded(optimizer, views, {**hyperparameters, **values}, programs.get(key))
        if program is None:
            optimizer.update(p, grad, *states, **hyperparameters, **values)
        programs[key] = program


# ------------------------------------------------------------------------------------------------------
# flat and fused
# ------------------------------------------------------------------------------------------------------


def _run_buffer_update(optimizer: ScratchOptimizer, buffer: _flat.Buffer, scalars: dict[str, Any],
                       compiled: bool) -> None:
    tensors = [buffer.flat, buffer.flat_grad, *buffer.flat_states(optimizer)]
    if compiled and not buffer.dtype.is_complex:
        if _run_recorded(optimizer, tensors, scalars) is not None:
            return
    optimizer.update(*tensors, **scalars)


def _fast_step(optimizer: ScratchOptimizer, group: dict[str, Any], buffer: _flat.Buffer,
               hyperparameters: dict[str, Any], compiled: bool) -> None:
    """One update over the whole buffer (the caller checked ``buffer.fast_ready()``)."""
    first = buffer.params[0]
    before = {k: v for k, v in optimizer.state.get(first, {}).items() if isinstance(v, Tensor)}
    values = optimizer._prepare(first, group)
    state = optimizer.state.get(first, {})
    if state.keys() != before.keys() or any(state[k] is not v for k, v in before.items()):
        # _prepare created or replaced state tensors (a first step): give the other params theirs too.
        members = [first] + [p for p in buffer.params[1:]]
        per_param = [_prepare(optimizer, p, group) for p in members[1:]]
        buffer.adopt_state(optimizer, range(buffer.n))
        values = {k: _python_scalar(v) for k, v in values.items()}
        if not buffer.check_synced(optimizer) or any(v != values for v in per_param):
            hyper = hyperparameters
            _foreach_prepared(optimizer, hyper, [
                _Member(p, p.grad, _state_tensors(optimizer, p), v)
                for p, v in zip(members, [values, *per_param])
            ])
            return
    else:
        buffer.broadcast_scalars(optimizer, state)
        values = {k: _python_scalar(v) for k, v in values.items()}
    _run_buffer_update(optimizer, buffer, {**hyperparameters, **values}, compiled)


def _slow_step(optimizer: ScratchOptimizer, group: dict[str, Any], buffer: _flat.Buffer,
               hyperparameters: dict[str, Any], compiled: bool) -> None:
    inside, outside = buffer.take_grads()
    for index in inside + outside:
        optimizer._check_grad(buffer.params[index])
    if outside:
        _loop(optimizer, group, [buffer.params[i] for i in outside], hyperparameters)
    if inside:
        members = []
        for index in inside:
            p = buffer.params[index]
            members.append((p, _prepare(optimizer, p, group)))
        buffer.adopt_state(optimizer, inside)
        whole = len(inside) == buffer.n and buffer.check_synced(optimizer) and all(
            values == members[0][1] for _, values in members)
        if whole:
            _run_buffer_update(optimizer, buffer, {**hyperparameters, **members[0][1]}, compiled)
        else:
            _foreach_prepared(optimizer, hyperparameters, [
                _Member(p, p.grad, _state_tensors(optimizer, p), values) for p, values in members
            ])
    buffer.check_synced(optimizer)
    buffer.refresh_counts()


def _run_flat(optimizer: ScratchOptimizer, group: dict[str, Any], compiled: bool) -> None:
    if not optimizer.elementwise:
        run_loop(optimizer, group)
        return
    if not group["params"]:
        return
    layout = _flat.layout_for(optimizer, group)
    hyperparameters = optimizer._hyperparameters(group)
    ready = [buffer.fast_ready() for buffer in layout.buffers]
    outsiders = [p for p in layout.outsiders if p.grad is not None]
    if outsiders or not all(ready):
        if not all(buffer.params_still_ours() for buffer in layout.buffers) or layout.membership_changed():
            # model.to(), or params frozen/unfrozen (requires_grad) since the buffers were made.
            layout = _flat.rebuild(optimizer, group)
            ready = [buffer.fast_ready() for buffer in layout.buffers]
            outsiders = [p for p in layout.outsiders if p.grad is not None]
        # torch checks every gradient (sparse ones) before it updates anything.
        for p in group["params"]:
            if p.grad is not None:
                optimizer._check_grad(p)
    for buffer, fast in zip(layout.buffers, ready):
        if fast:
            _fast_step(optimizer, group, buffer, hyperparameters, compiled)
        else:
            _slow_step(optimizer, group, buffer, hyperparameters, compiled)
    if outsiders:  # params kept out of the buffers (requires_grad=False) that have a gradient anyway
        _foreach(optimizer, group, outsiders, hyperparameters)


def run_flat(optimizer: ScratchOptimizer, group: dict[str, Any]) -> None:
    _run_flat(optimizer, group, compiled=False)


def run_fused(optimizer: ScratchOptimizer, group: dict[str, Any]) -> None:
    _run_flat(optimizer, group, compiled=True)


AVAILABLE = {
    "loop": run_loop,
    "foreach": run_foreach,
    "compiled": run_compiled,
    "flat": run_flat,
    "fused": run_fused,
}


def run(impl: str, optimizer: ScratchOptimizer, group: dict[str, Any]) -> None:
    """Run one param group's update with the strategy named ``impl``.

    Each strategy finds (and checks) the params with a gradient itself: the flat ones can tell that from
    their buffers without a Python call per parameter.
    """
    AVAILABLE[impl](optimizer, group)
