"""Recording: what an ``update`` does, written down by running it on stand-ins.

``torch.compile`` of ``update`` itself would specialise on every Python float (a new ``lr`` or bias
correction recompiles), and with the scalars passed as 0-d tensors instead Inductor evaluates ``beta1 **
step`` & co. inside the element loop. So the compiled strategies split a step in two:

1. **Record** (this module). ``update`` runs eagerly on :class:`Recorded` stand-ins for its tensors.
   They compute nothing; they write down each Tensor method (or ``torch.*`` function) the update calls.
   The update's scalar arithmetic runs for real, in Python, exactly as in the loop, and every float (or
   0-d tensor) that reaches a tensor operation is put on a *tape*. Branches on scalars are taken for
   real, so they pick which operations get recorded; so is ATen's choice of ``lerp`` formula by
   |weight| < ½, which becomes part of the program.
2. **Replay** (:mod:`~scratchopt.strategies.kernels.codegen` writes the kernel's source,
   :mod:`~scratchopt.strategies.kernels.cache` compiles it once per program structure and calls it with
   the real tensors and the tape as a float64 tensor).

A new ``lr``, beta or step changes only the tape. A different program (``amsgrad`` switched on, the
first step of SGD's momentum buffer) is a different kernel, compiled once. An update that reads tensor
data into Python (``.item()``, ``if (x > 0).any()``) cannot be recorded: :class:`NotCompilable` is raised
before anything ran, and the strategy runs the eager update. :func:`non_elementwise_operation` names the
first operation of an update that is not elementwise: the check behind ``elementwise = True``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from scratchopt.strategies.kernels.tracing import Symbol, recording_helpers


class NotCompilable(Exception):
    """The update did something a recorded program cannot express."""


_SCALAR_TYPES = (float,)
_CONSTANT_TYPES = (bool, int, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


class Program:
    """The operations one ``update`` call recorded, and the tape of scalars it used."""

    def __init__(self, inputs: Sequence[Tensor | None]) -> None:
        self.ops: list[tuple] = []
        self.tape: list[float] = []
        # Where each tape value came from: a traced Symbol, or the value itself (a constant).
        self.tape_sources: list[Any] = []
        # Set when a tape value or a constant came from something a trace cannot recompute.
        self.untraceable = False
        # Meta tensor per recorded value, made only when asked (a steady step never asks: it records
        # only to compute the tape and to look its kernel up).
        self.metas: list[Tensor | None] = []
        self.input_keys = tuple(None if t is None else (t.dtype, t.device.type, t.dim()) for t in inputs)
        self.inputs = [t for t in inputs if t is not None]
        self.devices: list[torch.device | None] = []
        self.recorded: list[Recorded | None] = []
        for t in inputs:
            if t is None:
                self.recorded.append(None)
                continue
            self.recorded.append(Recorded(self, len(self.metas)))
            self.metas.append(None)
            self.devices.append(t.device)
        self.n_inputs = len(self.metas)
        self.kernel: Callable[..., Any] | None = None
        self.tape_tensor: Tensor | None = None

    # ---- recording -------------------------------------------------------------------------------
    def encode(self, value: Any) -> Any:
        if isinstance(value, Recorded):
            if value.program is not self:
                raise NotCompilable("a value recorded by another program")
            return ("r", value.rid)
        if isinstance(value, Symbol):
            if type(value.value) is float:
                self.tape.append(value.value)
                self.tape_sources.append(value)
                return ("s", len(self.tape) - 1)
            self.untraceable = True  # a traced comparison used as a constant: the program depends on it
            value = value.value
        if isinstance(value, _CONSTANT_TYPES):
            return ("c", value)
        if isinstance(value, _SCALAR_TYPES):
            self.tape.append(float(value))
            self.tape_sources.append(float(value))
            return ("s", len(self.tape) - 1)
        if isinstance(value, Tensor):
            if value.dim() != 0 or value.is_complex() or value.requires_grad:
                raise NotCompilable("a tensor that is not a scalar hyperparameter reached the update")
            self.tape.append(float(value.item()))
            self.tape_sources.append(None)
            self.untraceable = True
            return ("s", len(self.tape) - 1)
        if isinstance(value, (tuple, list)):
            return ("l", type(value).__name__, tuple(self.encode(v) for v in value))
        raise NotCompilable(f"cannot record an argument of type {type(value).__name__}")

    def _new_value(self, device: torch.device | None) -> Recorded:
        rid = len(self.metas)
        self.metas.append(None)
        self.devices.append(device)
        return Recorded(self, rid)

    def call_method(self, receiver: Recorded, name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        encoded = (tuple(self.encode(a) for a in args), tuple((k, self.encode(v)) for k, v in sorted(kwargs.items())))
        if name in ("lerp", "lerp_") and len(args) == 2 and not kwargs and encoded[0][1][0] == "s":
            # ATen picks one of two formulas from |weight| < ½ in the tensor's arithmetic type: the choice
            # is part of the program (and of its kernel's key), as any branch taken while recording is.
            index = encoded[0][1][1]
            in_float32 = opmath(self.dtype_of(receiver)) == torch.float32
            below_half = lerp_weight_below_half(self.tape[index], in_float32)
            source = self.tape_sources[index]
            if isinstance(source, Symbol):
                source.tracer.guard(f"_lerp_weight_below_half({source.name}, {in_float32})", below_half)
            encoded = (encoded[0], (("lerp_weight_below_half", ("c", below_half)),))
        if name.endswith("_") and not name.endswith("__"):
            self.ops.append(("m", name, ("r", receiver.rid), encoded, None))
            return receiver
        out = self._new_value(self.devices[receiver.rid])
        self.ops.append(("m", name, ("r", receiver.rid), encoded, out.rid))
        return out

    def call_function(self, func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        if "out" in kwargs:
            raise NotCompilable("out= is not recorded")
        encoded = (tuple(self.encode(a) for a in args), tuple((k, self.encode(v)) for k, v in sorted(kwargs.items())))
        device = next((self.devices[a.rid] for a in args if isinstance(a, Recorded)), None)
        out = self._new_value(device)
        self.ops.append(("f", func, None, encoded, out.rid))
        return out

    def structure(self) -> tuple:
        return (self.input_keys, len(self.tape), tuple(self.ops))

    def keep_metadata_only(self) -> None:
        """Let go of the recorded tensors, keeping their dtypes, shapes and strides: a program kept
        across steps must not keep a step's gradient (and its memory) alive."""
        self.inputs = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in self.inputs]

    # ---- metadata (computed only when asked) --------------------------------------------------------
    def dtype_of(self, value: Recorded) -> torch.dtype:
        return self.inputs[value.rid].dtype if value.rid < self.n_inputs else self.meta(value.rid).dtype

    def meta(self, rid: int) -> Tensor:
        if self.metas[rid] is None:
            self.compute_metas()
        meta = self.metas[rid]
        if meta is None:
            raise NotCompilable("an operation's result has no tensor metadata")
        return meta

    def _decode_meta(self, spec: Any) -> Any:
        kind = spec[0]
        if kind == "r":
            return self.metas[spec[1]]
        if kind == "c":
            return spec[1]
        if kind == "s":
            return self.tape[spec[1]]
        items = [self._decode_meta(s) for s in spec[2]]
        return tuple(items) if spec[1] == "tuple" else items

    def compute_metas(self) -> None:
        for rid, t in enumerate(self.inputs):
            if self.metas[rid] is None:
                self.metas[rid] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        for kind, target, receiver, (args, kwargs), out in self.ops:
            if out is None or self.metas[out] is not None:
                continue
            margs = [self._decode_meta(a) for a in args]
            mkwargs = {k: self._decode_meta(v) for k, v in kwargs if k != "lerp_weight_below_half"}
            try:
                if kind == "m":
                    result = getattr(self._decode_meta(receiver), target)(*margs, **mkwargs)
                else:
                    result = target(*margs, **mkwargs)
            except Exception as error:  # pragma: no cover - depends on the update
                raise NotCompilable(f"cannot propagate metadata through {target}: {error}") from error
            if not isinstance(result, Tensor):
                raise NotCompilable(f"{target} does not return a tensor")
            self.metas[out] = result


def lerp_weight_below_half(weight: float, in_float32: bool) -> bool:
    """ATen's choice of ``lerp`` formula: |weight| < ½ in the tensor's arithmetic type."""
    if in_float32 and 0.4999 < abs(weight) < 0.5:
        weight = struct.unpack("f", struct.pack("f", weight))[0]  # rounded to float32, as ATen does
    return abs(weight) < 0.5


recording_helpers["_lerp_weight_below_half"] = lerp_weight_below_half


def opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class Recorded:
    """A stand-in for a tensor while ``update`` is recorded: Tensor methods are written down, not run."""

    __slots__ = ("program", "rid")

    def __init__(self, program: Program, rid: int) -> None:
        self.program = program
        self.rid = rid

    is_sparse = False
    layout = torch.strided

    @property
    def dtype(self) -> torch.dtype:
        return self.program.meta(self.rid).dtype

    @property
    def device(self) -> torch.device | None:
        return self.program.devices[self.rid]

    @property
    def shape(self) -> torch.Size:
        raise NotCompilable("the update reads a tensor's shape")

    # A kernel runs on 1-d views of many tensors, or on a buffer of them: an update that reads shapes or
    # sizes would compute with the kernel's metadata, not the parameter's.
    def size(self, dim: int | None = None) -> Any:
        raise NotCompilable("the update reads a tensor's size()")

    def dim(self) -> int:
        raise NotCompilable("the update reads a tensor's dim()")

    def numel(self) -> int:
        raise NotCompilable("the update reads a tensor's numel()")

    def is_complex(self) -> bool:
        return self.dtype.is_complex

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def __bool__(self) -> bool:
        raise NotCompilable("the update branches on tensor data")

    def __float__(self) -> float:
        raise NotCompilable("the update reads tensor data into Python")

    __int__ = __index__ = __float__

    def item(self) -> Any:
        raise NotCompilable("the update reads tensor data into Python")

    tolist = item

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or not callable(getattr(Tensor, name, None)):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.program.call_method(self, name, args, kwargs)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        program = _program_of([*args, *kwargs.values()])
        if program is None:
            return NotImplemented
        if any(isinstance(a, (list, tuple)) and _program_of(a) is not None for a in [*args, *kwargs.values()]):
            # A list holding stand-ins (``torch.stack([...])``, ``torch._foreach_add([...])``): a call over
            # several tensors, recorded as such so that the elementwise check names it.
            return program.call_function(func, tuple(args), kwargs)
        name = getattr(func, "__name__", "")
        if name.startswith("__") and args and isinstance(args[0], Recorded):
            # Tensor.__rsub__(tensor0d, recorded) & co. arrive here: record them as methods.
            return program.call_method(args[0], name, tuple(args[1:]), kwargs)
        if name.startswith("__") and len(args) == 2 and isinstance(args[1], Recorded):
            reflected = {
                "__add__": "__radd__",
                "__sub__": "__rsub__",
                "__mul__": "__rmul__",
                "__truediv__": "__rtruediv__",
                "__pow__": "__rpow__",
                "__div__": "__rtruediv__",
            }
            if name in reflected:
                return program.call_method(args[1], reflected[name], (args[0],), kwargs)
        return program.call_function(func, tuple(args), kwargs)


def _program_of(values: Any) -> Program | None:
    """The program of the first stand-in among ``values``, looking inside lists and tuples."""
    for value in values:
        if isinstance(value, Recorded):
            return value.program
        if isinstance(value, (list, tuple)):
            program = _program_of(value)
            if program is not None:
                return program
    return None


def _operator(name: str) -> Callable[..., Any]:
    def method(self: Recorded, *args: Any) -> Any:
        return self.program.call_method(self, name, args, {})

    method.__name__ = name
    return method


for _name in (
    "__neg__",
    "__pos__",
    "__abs__",
    "__add__",
    "__radd__",
    "__sub__",
    "__rsub__",
    "__mul__",
    "__rmul__",
    "__truediv__",
    "__rtruediv__",
    "__pow__",
    "__rpow__",
    "__lt__",
    "__le__",
    "__gt__",
    "__ge__",
    "__eq__",
    "__ne__",
    "__and__",
    "__or__",
    "__invert__",
    "__mod__",
    "__floordiv__",
):
    setattr(Recorded, _name, _operator(_name))
for _name, _target in (("__iadd__", "add_"), ("__isub__", "sub_"), ("__imul__", "mul_"), ("__itruediv__", "div_")):
    setattr(Recorded, _name, _operator(_target))
Recorded.__hash__ = object.__hash__  # type: ignore[method-assign]  # identity, as Tensor's
del _name, _target


def record(update: Callable[..., None], tensors: Sequence[Tensor | None], kwargs: dict[str, Any]) -> Program:
    """Run ``update`` on stand-ins for ``tensors`` (``None`` stays ``None``) and return what it did."""
    program = Program(tensors)
    try:
        update(*program.recorded, **kwargs)
    finally:
        # The stand-ins point back at the program: dropping them leaves no reference cycle, so the
        # program (and the tensors it recorded, a gradient among them) is freed as soon as it is unused,
        # not at the next garbage collection.
        program.recorded = []
    return program


#: Operations that treat every element independently: the only ones an ``elementwise = True`` update
#: may call (a declaration is checked, not trusted).

_ELEMENTWISE = frozenset(
    base + suffix
    for base in (
        "add",
        "sub",
        "mul",
        "div",
        "true_divide",
        "lerp",
        "addcmul",
        "addcdiv",
        "sqrt",
        "rsqrt",
        "reciprocal",
        "neg",
        "abs",
        "sign",
        "sgn",
        "copy",
        "clone",
        "maximum",
        "minimum",
        "fmax",
        "fmin",
        "clamp",
        "clamp_min",
        "clamp_max",
        "clip",
        "masked_fill",
        "where",
        "pow",
        "square",
        "exp",
        "expm1",
        "log",
        "log1p",
        "log2",
        "sigmoid",
        "tanh",
        "sin",
        "cos",
        "atan2",
        "hypot",
        "fill",
        "zero",
        "to",
        "float",
        "double",
        "half",
        "bfloat16",
        "type_as",
        "eq",
        "ne",
        "gt",
        "ge",
        "lt",
        "le",
        "logical_and",
        "logical_or",
        "logical_not",
        "logical_xor",
        "isfinite",
        "isnan",
        "nan_to_num",
        "floor",
        "ceil",
        "round",
        "trunc",
        "frac",
        "erf",
        "view_as_real",
        "view_as_complex",
        "conj",
        "real",
        "imag",
    )
    for suffix in ("", "_")
) | frozenset(
    f"__{name}__"
    for name in (
        "neg",
        "pos",
        "abs",
        "add",
        "radd",
        "sub",
        "rsub",
        "mul",
        "rmul",
        "truediv",
        "rtruediv",
        "pow",
        "rpow",
        "lt",
        "le",
        "gt",
        "ge",
        "eq",
        "ne",
        "and",
        "or",
        "invert",
    )
)


def non_elementwise_operation(
    update: Callable[..., None], tensors: Sequence[Tensor | None], scalars: dict[str, Any]
) -> str | None:
    """The first operation of ``update`` that is not elementwise (a reduction, a reshape, anything that
    mixes elements or reads tensor data into Python), described in words; None when there is none.

    ``update`` runs on stand-ins, so nothing is computed or changed.
    """
    try:
        program = record(update, tensors, scalars)
    except NotCompilable as error:
        return f"does what a stand-in cannot follow ({error})"
    except (AttributeError, TypeError) as error:  # .mT, @ and other operations a stand-in does not have
        return f"uses an operation stand-ins do not have ({type(error).__name__}: {error})"
    operation = first_non_elementwise(program)
    return None if operation is None else f"calls {operation}"


def first_non_elementwise(program: Program) -> str | None:
    for kind, target, _, _, _ in program.ops:
        name = target if kind == "m" else getattr(target, "__name__", repr(target))
        if name not in _ELEMENTWISE:
            return f"{'Tensor.' if kind == 'm' else 'torch.'}{name}"
    return None
