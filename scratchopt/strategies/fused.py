"""``impl="fused"``: one generated native kernel per param group and step, over torch's own state.

The update is recorded on stand-ins, written out as C++ and compiled once per program
(:mod:`~scratchopt.strategies.kernels.native`), then called once on a table of every param of the group:
its data, its gradient and its state tensors where they are, in ``optimizer.state`` as torch keeps it,
read afresh at every step. So the optimizer keeps nothing but its state, and any edit a user makes to
``optimizer.state`` or ``param_groups`` takes effect on the next step as in torch. ``fused=True`` maps
here.

In the steady step (:meth:`Fused.plan_group`) the native runtime reads the group in one pass, makes the
dispatcher's checks, builds the table and counts the default ``step``; the kernel's scalars come from
the update's traced scalar arithmetic (:mod:`~scratchopt.strategies.kernels.tracing`), so nothing is
recorded. Each param's own scalars (its ``step``: a param that missed steps has another bias
correction) are a row of the kernel's scalar table: params that disagree still share one call.

A group with low-precision state (:mod:`scratchopt.precision`) runs natively too: the kernel reads
bfloat16 state (and bfloat16 params trained with stochastic rounding), computes in float32 and rounds
stochastically as it writes, bit for bit the eager widened step at the same seeds
(:meth:`Fused.launch_or_update`); 8-bit state it dequantises block by block as it reads and quantises as
it writes, bit for bit the eager dequantise-update-quantise.

A param whose tensors are not one dense run each, laid out alike (a non-contiguous gradient of a
contiguous param), or that is complex or in a dtype the generator does not write (float16; bfloat16
outside a low-precision group), runs the eager ``update``; a program the generator cannot write, or a machine without a working C++
compiler (one warning), runs each tensor through the ``torch.compile``'d kernels of ``compiled``. Within
a few ulp of the loop: the kernel's ``sqrt`` is correctly rounded, ATen's float32 ``sqrt`` not always.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from scratchopt import precision, quantization
from scratchopt.distributed.dtensor import local_shards
from scratchopt.step_checks import group_settings, required_state_keys
from scratchopt.strategies.base import Hyperparameters, Strategy, state_tensors
from scratchopt.strategies.compiled import KERNEL_ULP, as_1d
from scratchopt.strategies.kernels import cache, native, runtime, tracing
from scratchopt.strategies.kernels.recording import NotCompilable, Program, record
from scratchopt.strategies.kernels.tracing import Trace, key_of

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


def _counted(optimizer: ScratchOptimizer, group: dict[str, Any], tables: Any) -> list[dict[str, Any]]:
    """Each param's arguments once the native pass counted its step (shared where the steps agree)."""
    if not tables.counted:
        return [{}] * tables.size()
    steps = tables.steps
    if tables.uniform:
        return [optimizer.step_arguments(steps[0], group)] * len(steps)
    return optimizer.arguments_of_steps(steps, group)


def _requirements(optimizer: ScratchOptimizer, group: dict[str, Any], count: bool) -> tuple[int, tuple[str, ...]]:
    """What the native pass requires of every param's state (so that it declines where the general path
    raises KeyError): a mask over the state keys (and the step, where it is counted) and the other keys."""
    params = group["params"]
    if not params:
        return 0, ()
    # An elementwise update's state keys do not depend on the param's dimensions: its first param tells.
    first = params[0]
    settings = group_settings(group)
    key = (type(optimizer), settings, first.dtype, first.dim(), count)
    try:
        return _REQUIREMENTS[key]
    except (KeyError, TypeError):
        pass
    required = required_state_keys(optimizer, group, first, settings)
    found: tuple[int, tuple[str, ...]] = (0, ())
    if required is not None:
        keys = optimizer.state_keys
        mask = sum(1 << index for index, name in enumerate(keys) if name in required)
        if count and "step" in required:
            mask |= 1 << len(keys)
        found = mask, tuple(sorted(required.difference(keys, ("step",) if count else ())))
    try:
        if len(_REQUIREMENTS) > 4096:
            _REQUIREMENTS.clear()
        _REQUIREMENTS[key] = found
    except TypeError:  # a setting that cannot be hashed
        pass
    return found


_REQUIREMENTS: dict[tuple[Any, ...], tuple[int, tuple[str, ...]]] = {}


def _float32_stand_in(tensor: Tensor) -> Tensor:
    """A float32 1-d tensor of ``tensor``'s size that holds no memory: what a bfloat16 tensor of a
    low-precision table is recorded as (recording reads no data)."""
    return torch.zeros((1,), dtype=torch.float32, device=tensor.device).expand(tensor.numel())


def _storage(
    optimizer: ScratchOptimizer, tables: Any
) -> tuple[tuple[native.Storage, ...] | None, tuple[int, ...] | None]:
    """How each input of the table's kernel is kept and its seed slot (see
    :func:`~scratchopt.strategies.kernels.native.cpp_source`), or (None, None) for a table in one dtype."""
    if not tables.narrow and not tables.narrow_params:
        return None, None
    keys = optimizer.state_keys
    present = [index for index in range(len(keys)) if tables.pattern >> index & 1]
    own = torch.bfloat16 if tables.narrow_params else torch.float32

    def kept(index: int) -> native.Storage:
        if not tables.narrow >> index & 1:
            return torch.float32
        if not tables.quantized:
            return torch.bfloat16
        return native.PACKED if precision.signed(keys[index], optimizer.nonnegative_state) else native.PACKED_UNSIGNED

    storage = (own, own, *(kept(index) for index in present))
    return storage, (0, -1, *(index + 1 for index in present))


class Fused(Strategy):
    name = "fused"
    ulp = KERNEL_ULP
    order = 40
    summary = "one generated native kernel per group and step, over torch's own per-parameter state"

    def __init__(self) -> None:
        # Traces of each update's scalar arithmetic (:mod:`~scratchopt.strategies.kernels.tracing`), by
        # update, dtype, the state tensors present and what the trace assumes of its arguments.
        self.traces: dict[tuple[Any, ...], list[Trace]] = {}

    def plan_group(
        self, optimizer: ScratchOptimizer, group: dict[str, Any], extra: dict[str, Any]
    ) -> Callable[[], None] | None:
        """The steady step, through the native runtime: one pass in C++ over the group makes the
        dispatcher's checks and builds the table; the step it returns counts the default ``step`` there
        and makes one kernel call."""
        module = runtime.get()
        if module is None:
            return None
        default_count = optimizer.default_count
        required, extra_keys = _requirements(optimizer, group, default_count)
        keys = optimizer.state_keys
        low = precision.low_mode(optimizer, group) if precision.is_low(group) else -1
        tables = module.Tables(
            group["params"], optimizer.state, keys, default_count, _PLAIN, required, extra_keys, max(low, 0)
        )
        if tables.status != -1:
            return None  # nothing changed: the general path decides (and raises for bad input)

        hyperparameters = {**optimizer.update_arguments(group), **extra}  # read while planning: it may raise

        def step() -> None:
            params = tables.params
            if not default_count:
                # The algorithm's own bookkeeping may create state (SGD's momentum buffer): the table is
                # read again after it.
                values = optimizer.count_steps(params, group)
                counted = module.Tables(params, optimizer.state, keys, False, _PLAIN, required, extra_keys, max(low, 0))
                if low >= 0 and (counted.status != -1 or counted.pattern != tables.pattern):
                    # The bookkeeping made state (in the param's dtype): stored as the group keeps it.
                    made = [key for i, key in enumerate(keys) if not tables.pattern >> i & 1]
                    for param in params:
                        precision.cast_state(
                            optimizer.state[param],
                            tuple(made),
                            param,
                            precision.state_dtype_for(param, group),
                            optimizer,
                        )
                    counted = module.Tables(
                        params, optimizer.state, keys, False, _PLAIN, required, extra_keys, max(low, 0)
                    )
                self.launch_or_update(optimizer, group, counted, params, hyperparameters, values, low >= 0)
                return
            tables.advance()
            values = _counted(optimizer, group, tables)
            self.launch_or_update(optimizer, group, tables, params, hyperparameters, values, low >= 0)

        return step

    def launch_or_update(
        self,
        optimizer: ScratchOptimizer,
        group: dict[str, Any],
        tables: Any,
        params: list[Tensor],
        hyperparameters: Hyperparameters,
        values: list[dict[str, Any]],
        low: bool = False,
    ) -> None:
        """The step of a table whose steps are counted: one kernel call, or the Python path where none
        runs. A low-precision group's kernel widens the bfloat16 tensors, updates and rounds them back,
        bit for bit :func:`scratchopt.precision.update` with the same seed, which is its Python path
        (with that seed and the counted steps)."""
        if not low:
            if tables.status != -1 or not self.launch(optimizer, tables, params, hyperparameters, values):
                self.update_counted(optimizer, group, params, hyperparameters, values)
            return
        seed = precision.step_seed() if precision.rounds_stochastically(group) else 0
        if tables.status == -1 and self.launch(optimizer, tables, params, hyperparameters, values, seed):
            return

        def counted_update(o: Any, g: dict[str, Any], shadows: list[Tensor], h: Any, chunk: Any) -> None:
            self.update_counted(o, g, shadows, h, chunk)

        precision.update(optimizer, group, params, hyperparameters, counted_update, base=seed, counted=values)

    def update(
        self, optimizer: ScratchOptimizer, group: dict[str, Any], params: list[Tensor], hyperparameters: Hyperparameters
    ) -> None:
        module = runtime.get()
        values: list[dict[str, Any]] | None = None
        if module is not None and optimizer.state.get(params[0]):
            default_count = optimizer.default_count
            values = None if default_count else optimizer.count_steps(params, group)
            # The dispatcher checked the state: no requirements here.
            tables = module.Tables(params, optimizer.state, optimizer.state_keys, default_count, _PLAIN, 0, (), 0)
            if tables.status == -1:
                tables.advance()
                if default_count:
                    values = _counted(optimizer, group, tables)
                assert values is not None
                if self.launch(optimizer, tables, params, hyperparameters, values):
                    return
        if values is None:
            values = optimizer.count_steps(params, group)
        self.update_counted(optimizer, group, params, hyperparameters, values)

    def launch(
        self,
        optimizer: ScratchOptimizer,
        tables: Any,
        params: list[Tensor],
        hyperparameters: Hyperparameters,
        values: list[dict[str, Any]],
        seed: int = 0,
    ) -> bool:
        """One kernel call over a native table whose steps are counted (``seed``: the step's, for the
        tensors it keeps in bfloat16); False (nothing changed) where the params take different paths
        through the update or no kernel can be written for it."""
        rows: dict[tuple[Any, ...], list[float]] = {}
        trace: Trace | None = None
        shared = all(value is values[0] for value in values)  # one dict for all: the steady state
        for index, value in enumerate(values[:1] if shared else values):
            key = tuple(value.items())
            if key in rows:
                continue
            found = self.tape(optimizer, params[index], tables, {**hyperparameters, **value})
            if found is None:
                return False
            if (
                trace is not None
                and found[0] is not trace
                and found[0].program.structure() != trace.program.structure()
            ):
                return False  # the params take different paths through the update: the Python path
            trace = trace or found[0]
            rows[key] = found[1]
        assert trace is not None
        if trace.kernel is None:
            trace.kernel = native.kernel_for(trace.program, *_storage(optimizer, tables)) or False
        if trace.kernel is False:
            return False
        threads = native.threads_for(tables.total)
        # What the kernel's low-precision tensors read: the quantisation tables, or the noise table (made on
        # first use: a float32 group's kernel reads neither, and its process never holds them).
        if tables.quantized:
            noise = quantization.native_tables().data_ptr()
        elif tables.narrow or tables.narrow_params:
            noise = precision.native_noise().data_ptr()
        else:
            noise = 0
        native.LAUNCHES[0] += 1
        if len(rows) == 1:
            tables.launch(trace.kernel.address, next(iter(rows.values())) or [0.0], 0, threads, seed, noise)
        else:
            tapes = [x for value in values for x in rows[tuple(value.items())]]
            tables.launch(trace.kernel.address, tapes or [0.0], len(trace.program.tape), threads, seed, noise)
        return True

    def tape(
        self, optimizer: ScratchOptimizer, param: Tensor, tables: Any, arguments: dict[str, Any]
    ) -> tuple[Trace, list[float]] | None:
        """The trace of the update for these arguments and its tape: a generated function's result in the
        steady state, a new recording (and trace) when none applies. None where it cannot be recorded."""
        assumptions = key_of(arguments)
        # A table keeping some tensors in bfloat16 runs the float32 program (the kernel widens them).
        storage = (tables.narrow, tables.narrow_params, tables.quantized)
        key = None if assumptions is None else (optimizer.update, param.dtype, tables.pattern, storage, assumptions)
        if key is not None:
            for trace in self.traces.get(key, ()):
                tape = trace.tape_of(arguments)
                if tape is not None:
                    return trace, tape
        tensors = [
            t
            if t is None
            else _float32_stand_in(param)
            if t.dtype == torch.uint8  # packed 8-bit state: the float32 values of the param's size
            else _float32_stand_in(t)
            if t.dtype == torch.bfloat16
            else t.view(-1)
            for t in (param, param.grad, *state_tensors(optimizer, param))
        ]
        try:
            program, found = tracing.trace(optimizer.update, tensors, arguments, record)
        except NotCompilable:
            return None
        if found is None:
            return Trace(program, lambda _: None), program.tape
        program.keep_metadata_only()
        if key is not None:
            if len(self.traces) > _MAX_TRACES:
                self.traces.clear()
            kept = self.traces.setdefault(key, [])
            kept.insert(0, found)
            del kept[_MAX_GUARDED:]
        return found, program.tape

    def update_counted(
        self,
        optimizer: ScratchOptimizer,
        group: dict[str, Any],
        params: list[Tensor],
        hyperparameters: Hyperparameters,
        values: list[dict[str, Any]],
    ) -> None:
        """The Python path, with each param's scalars already counted: the table built here (a param that
        cannot run in a kernel runs eagerly), one kernel call per program structure."""
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

    def reset(self, optimizer: ScratchOptimizer) -> None:
        """Traces depend on nothing an optimizer keeps: they stay."""


#: How many traces the strategy keeps in all, and per key (an update whose guards flip, as RAdam's
#: rectification does once, keeps a few).
_MAX_TRACES = 1024
_MAX_GUARDED = 4


STRATEGY = Fused()
