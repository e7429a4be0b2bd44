"""``impl="fused"``: one generated native kernel per param group and step, over torch's own state.

The update is recorded once per distinct set of per-parameter scalars (in the steady state, once per
step), written out as C++ and compiled once per program (:mod:`~scratchopt.strategies.kernels.native`),
then called once on a table of every param of the group: its data, its gradient and its state tensors
where they are, in ``optimizer.state`` as torch keeps it, read afresh at every step. So the optimizer
keeps nothing but its state, and any edit a user makes to ``optimizer.state`` or ``param_groups`` takes
effect on the next step as in torch. ``fused=True`` maps here.

Each param's own scalars (its ``step``: a param that missed steps has another bias correction) are a
row of the kernel's scalar table: params that disagree still share one call. The counters advance with
one multi-tensor add (:meth:`~scratchopt.optimizer.ScratchOptimizer.count_steps`).

A param whose tensors are not one dense run each, laid out alike (a non-contiguous gradient of a
contiguous param), or that is complex or in a dtype the generator does not write (float16, bfloat16),
runs the eager ``update``; a program the generator cannot write, or a machine without a working C++
compiler (one warning), runs each tensor through the ``torch.compile``'d kernels of ``compiled``. Within
a few ulp of the loop: the kernel's ``sqrt`` is correctly rounded, ATen's float32 ``sqrt`` not always.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from scratchopt.distributed.dtensor import local_shards
from scratchopt.strategies.base import Hyperparameters, Strategy, state_tensors
from scratchopt.strategies.compiled import KERNEL_ULP, as_1d
from scratchopt.strategies.kernels import cache, native, runtime
from scratchopt.strategies.kernels.recording import NotCompilable, Program, record

if TYPE_CHECKING:
    from scratchopt.optimizer import ScratchOptimizer

_NATIVE_DTYPES = (torch.float32, torch.float64)


#: The classes whose data a kernel may read directly (a DTensor is read through its local shard).
_PLAIN = (Tensor, torch.nn.Parameter)


def _kernel_tensors(param: Tensor, grad: Tensor, states: list[Tensor | None]) -> list[Tensor | None] | None:
    """The param's tensors as the kernel reads them (1-d views in memory order of local shards), or None
    when it must run eagerly."""
    dtype = param.dtype
    if dtype not in _NATIVE_DTYPES:
        return None
    tensors = [param, grad, *states]
    if all(t is None or (t.__class__ in _PLAIN and t.dtype is dtype and t.is_contiguous()) for t in tensors):
        return tensors if param.is_cpu else None
    views = as_1d(local_shards(tensors))
    if views is None or not all(t is None or (t.__class__ in _PLAIN and t.dtype is dtype and t.is_cpu) for t in views):
        return None
    return views


class Fused(Strategy):
    name = "fused"
    ulp = KERNEL_ULP
    order = 40
    summary = "one generated native kernel per group and step, over torch's own per-parameter state"

    def update(
        self, optimizer: ScratchOptimizer, group: dict[str, Any], params: list[Tensor], hyperparameters: Hyperparameters
    ) -> None:
        values: list[dict[str, Any]] | None = None
        module = runtime.get()
        if module is not None:
            done, values = _runtime_step(module, optimizer, group, params, hyperparameters)
            if done:
                return
        if values is None:
            values = optimizer.count_steps(params, group)
        buckets: dict[tuple[Any, ...], list[int]] = {}
        for index, value in enumerate(values):
            buckets.setdefault(tuple(value.items()), []).append(index)
        # One kernel call per program structure: its first recording, and each param's tensors, tape and
        # scalars (the scalars only for a fallback that records again).
        calls: dict[tuple[Any, ...], tuple[Program, list[tuple[list[Tensor | None], list[float], dict[str, Any]]]]] = {}
        for members in buckets.values():
            scalars = {**hyperparameters, **values[members[0]]}
            # A recording is valid for params of its dtype whose state has the same keys: the kernel reads
            # one pointer per present tensor, in its dtype.
            programs: dict[tuple[Any, ...], Program | None] = {}
            for index in members:
                param = params[index]
                states = state_tensors(optimizer, param)
                tensors = _kernel_tensors(param, param.grad, states)  # type: ignore[arg-type]  # has a grad
                program = None
                if tensors is not None:
                    kind = (param.dtype, tuple(t is None for t in tensors))
                    if kind not in programs:
                        try:
                            programs[kind] = record(optimizer.update, tensors, scalars)
                        except NotCompilable:
                            programs[kind] = None
                    program = programs[kind]
                if tensors is None or program is None:
                    optimizer.update(param, param.grad, *states, **scalars)
                    continue
                calls.setdefault(program.structure(), (program, []))[1].append((tensors, program.tape, scalars))
        for program, rows in calls.values():
            kernel = native.kernel_for(program)
            if kernel is None:
                for tensors, _, scalars in rows:  # torch.compile'd kernels, or eager for small tensors
                    if cache.run(optimizer.update, tensors, scalars) is None:
                        optimizer.update(*tensors, **scalars)
                continue
            first_tape = rows[0][1]
            shared = all(tape is first_tape for _, tape, _ in rows)
            pointers = [t.data_ptr() for tensors, _, _ in rows for t in tensors if t is not None]
            numels = [tensors[0].numel() for tensors, _, _ in rows]  # type: ignore[union-attr]  # the param
            kernel(numels, pointers, first_tape if shared else [v for _, tape, _ in rows for v in tape], shared)


def _runtime_step(
    module: Any,
    optimizer: ScratchOptimizer,
    group: dict[str, Any],
    params: list[Tensor],
    hyperparameters: Hyperparameters,
) -> tuple[bool, list[dict[str, Any]] | None]:
    """The steady step through the native runtime: the table built (and the default ``step`` counted) in
    C++, one recording per distinct set of per-parameter scalars, one kernel call. Returns whether it ran,
    and the per-parameter scalars if they were counted but the step must take the Python path."""
    from scratchopt.optimizer import ScratchOptimizer

    first_state = optimizer.state.get(params[0])
    if not first_state:
        return False, None  # the state is created by the first step's count_step
    default_count = type(optimizer).count_step is ScratchOptimizer.count_step
    count_here = default_count and "step" in first_state
    values = None if default_count else optimizer.count_steps(params, group)
    tables = module.Tables(params, optimizer.state, optimizer.state_keys, count_here, _PLAIN)
    if tables.status != -1:
        return False, values
    if count_here:
        steps = tables.steps
        values = [{"step": steps[0]}] * len(params) if tables.uniform else [{"step": step} for step in steps]
    elif values is None:
        values = [{} for _ in params]
    rows: dict[tuple[Any, ...], list[float]] = {}
    program: Program | None = None
    for index, value in enumerate(values):
        key = tuple(value.items())
        if key in rows:
            continue
        param = params[index]
        states = state_tensors(optimizer, param)
        tensors = [t if t is None else t.view(-1) for t in (param, param.grad, *states)]
        try:
            recorded = record(optimizer.update, tensors, {**hyperparameters, **value})
        except NotCompilable:
            return False, values
        if program is not None and recorded.structure() != program.structure():
            return False, values  # the params take different paths through the update: the Python path
        program = program or recorded
        rows[key] = recorded.tape
    assert program is not None
    kernel = native.kernel_for(program)
    if kernel is None:
        return False, values
    threads = native.threads_for(tables.total)
    native.LAUNCHES[0] += 1
    if len(rows) == 1:
        tables.launch(kernel.address, program.tape or [0.0], 0, threads)
    else:
        tapes = [x for value in values for x in rows[tuple(value.items())]]
        tables.launch(kernel.address, tapes or [0.0], len(program.tape), threads)
    return True, None


STRATEGY = Fused()
