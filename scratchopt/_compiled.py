"""``torch.compile`` of an ``update`` without recompiles and without per-element scalar math.

Compiling ``update`` directly has two problems measured on this machine: Python floats are specialised
(every new ``lr`` or bias correction recompiles), and when the scalars are passed as 0-d tensors instead,
Inductor evaluates ``beta1 ** step`` & co. inside the element loop (a ``pow`` per vector: 48 ms instead of
6 ms for Adam on 8.3M params).

So a step runs in two parts:

1. **Record.** ``update`` runs eagerly on :class:`Recorded` stand-ins for its tensors. They compute
   nothing; they write down each Tensor method (or ``torch.*`` function) the update calls. The update's
   scalar arithmetic runs for real, in Python, exactly as in the loop, and every float (or 0-d tensor)
   that reaches a tensor operation is put on a *tape*. Branches on scalars are taken for real, so they
   pick which operations get recorded.
2. **Replay.** The recorded operations — with each scalar replaced by ``tape[i]`` — are generated as the
   source of a small Python function, compiled once per distinct program (``dynamic=True``, so one
   compile serves every buffer size) and called with the real tensors and the tape as a float64 tensor.

A new ``lr``, beta or step changes only the tape: the compiled kernel is reused. A different program
(``amsgrad`` switched on, the first step of SGD's momentum buffer) is a different function, compiled once.

Rewrites made while generating the kernel, so that it rounds as ATen's CPU kernels do (torch takes
these scalars only as numbers): ``add_(x, alpha=s)`` → ``fma(x, s, self)``, ``addcmul_(a, b, value=s)``
→ ``fma(s·a, b, self)``, ``addcdiv_(a, b, value=s)`` → ``self + s·a/b``, and ``lerp_(end, w)`` →
``fma(w, end − self, self)`` or ``fma(self − end, 1 − w, end)``, ATen's choice by |w| < ½, made while
recording and part of the program's key. An update that reads tensor data into Python (``.item()``,
``if (x > 0).any()``) cannot be recorded: :class:`NotCompilable` is raised before anything ran, and the
strategy falls back to the eager update. A program with an operation that is not elementwise is refused
(:func:`non_elementwise_operation`): on a buffer of many tensors it would give wrong numbers.
"""

from __future__ import annotations

import itertools
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


class NotCompilable(Exception):
    """The update did something a recorded program cannot express."""


_SCALAR_TYPES = (float,)
_CONSTANT_TYPES = (bool, int, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


class Program:
    """The operations one ``update`` call recorded, and the tape of scalars it used."""

    def __init__(self, inputs: Sequence[Tensor | None]) -> None:
        self.ops: list[tuple] = []
        self.tape: list[float] = []
        # Meta tensor per recorded value, made only when asked (a steady step never asks: it records
        # only to compute the tape and to look its kernel up).
        self.metas: list[Tensor | None] = []
        self.input_keys = tuple(
            None if t is None else (t.dtype, t.device.type, t.dim()) for t in inputs
        )
        self.inputs = [t for t in inputs if t is not None]
        self.devices: list[torch.device | None] = []
        self.recorded = []
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
        if isinstance(value, _CONSTANT_TYPES):
            return ("c", value)
        if isinstance(value, _SCALAR_TYPES):
            self.tape.append(float(value))
            return ("s", len(self.tape) - 1)
        if isinstance(value, Tensor):
            if value.dim() != 0 or value.is_complex() or value.requires_grad:
                raise NotCompilable("a tensor that is not a scalar hyperparameter reached the update")
            self.tape.append(float(value.item()))
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
            weight = torch.tensor(self.tape[encoded[0][1][1]], dtype=torch.float64).to(_opmath(self.dtype_of(receiver)))
            encoded = (encoded[0], (("lerp_weight_below_half", ("c", bool(weight.abs() < 0.5))),))
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

    # ---- metadata (computed only when asked) --------------------------------------------------------
    def dtype_of(self, value: Recorded) -> torch.dtype:
        return self.inputs[value.rid].dtype if value.rid < self.n_inputs else self.meta(value.rid).dtype

    def meta(self, rid: int) -> Tensor:
        if self.metas[rid] is None:
            self._compute_metas()
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

    def _compute_metas(self) -> None:
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

    # ---- code generation ----------------------------------------------------------------------------
    def source(self) -> tuple[str, dict[str, Any]]:
        """Python source of the kernel ``kernel(t0, t1, …, tape)`` and the globals it needs."""
        self._compute_metas()
        namespace: dict[str, Any] = {"torch": torch}
        names = [f"t{i}" for i in range(self.n_inputs)]

        def ref(spec: Any) -> str:
            kind = spec[0]
            if kind == "r":
                return f"v{spec[1]}"
            if kind == "s":
                return f"tape[{spec[1]}]"
            if kind == "c":
                value = spec[1]
                if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
                    name = f"k{len(namespace)}"
                    namespace[name] = value
                    return name
                return repr(value)
            inner = ", ".join(ref(s) for s in spec[2])
            return f"({inner},)" if spec[1] == "tuple" else f"[{inner}]"

        def dtype_name(rid: int) -> str:
            name = f"k{len(namespace)}"
            namespace[name] = self.meta(rid).dtype
            return name

        lines = [f"def kernel({', '.join(names)}, tape):"]
        lines += [f"    v{i} = t{i}" for i in range(self.n_inputs)]
        namespace["fma"] = _fma()
        for kind, target, receiver, (args, kwargs), out in self.ops:
            if kind == "f":
                fname = f"f{len(namespace)}"
                namespace[fname] = target
                call = f"{fname}({', '.join([ref(a) for a in args] + [f'{k}={ref(v)}' for k, v in kwargs])})"
                lines.append(f"    v{out} = {call}")
                continue
            expression = self._fused_expression(target, receiver, args, dict(kwargs), ref, dtype_name)
            inplace = target.endswith("_") and not target.endswith("__")
            if expression is not None:
                call = f"{ref(receiver)}.copy_({expression})" if inplace else expression
            else:
                # A scalar is converted to the tensor's arithmetic type first, as ATen converts it.
                # A number beside a tape scalar becomes a tensor too: torch has no overload that mixes
                # them (``clamp_(tensor_min, 50)``).
                opmath_name = dtype_name_of(_opmath(self.meta(receiver[1]).dtype), ref)
                on_tape = any(spec[0] == "s" for spec in [*args, *(v for _, v in kwargs)])
                rendered = [_scalar_ref(a, ref, opmath_name, on_tape) for a in args] + [
                    f"{k}={_scalar_ref(v, ref, opmath_name, on_tape)}" for k, v in kwargs]
                call = f"{ref(receiver)}.{target}({', '.join(rendered)})"
            lines.append(f"    {call}" if out is None else f"    v{out} = {call}")
        lines.append("    return None")
        return "\n".join(lines) + "\n", namespace


    def _fused_expression(self, name: str, receiver: Any, args: tuple, kwargs: dict[str, Any],
                          ref: Callable[[Any], str], dtype_name: Callable[[int], str]) -> str | None:
        """The expression of ATen's CPU kernel for ops whose scalar torch takes only as a number.

        ATen computes ``add(a, b, alpha)`` as ``fma(b, alpha, a)``, ``addcmul(s, a, b, value)`` as
        ``fma(value·a, b, s)``, ``addcdiv`` as ``s + value·a/b`` and ``lerp`` as
        ``fma(w, e − s, s)`` (|w| < ½) or ``fma(s − e, 1 − w, e)``; the kernel does the same, so that
        only the fusion itself (no intermediate rounding is skipped or added) separates it from eager.
        """
        base = name[:-1] if name.endswith("_") and not name.endswith("__") else name
        self_ref = ref(receiver)
        opmath = _opmath(self.meta(receiver[1]).dtype)
        opmath_name = dtype_name_of(opmath, ref)
        if base in ("add", "sub") and "alpha" in kwargs and set(kwargs) == {"alpha"} and len(args) == 1:
            alpha = kwargs["alpha"]
            if alpha[0] == "c" and alpha[1] == 1:
                return None
            if args[0][0] != "r":
                return None
            alpha_ref = f"{ref(alpha)}.to({opmath_name})" if alpha[0] == "s" else repr(alpha[1])
            sign = "-" if base == "sub" else ""
            return f"fma({ref(args[0])}, {sign}{alpha_ref}, {self_ref})"
        if base in ("addcmul", "addcdiv") and len(args) == 2 and set(kwargs) <= {"value"}:
            value = kwargs.get("value", ("c", 1))
            if value[0] not in ("s", "c") or args[0][0] != "r" or args[1][0] != "r":
                return None
            value_ref = f"{ref(value)}.to({opmath_name})" if value[0] == "s" else repr(value[1])
            t1, t2 = ref(args[0]), ref(args[1])
            scaled = t1 if value == ("c", 1) else f"({t1} * {value_ref})"
            if base == "addcmul":
                return f"fma({scaled}, {t2}, {self_ref})"
            return f"{self_ref} + {scaled} / {t2}"
        if base == "lerp" and len(args) == 2 and set(kwargs) == {"lerp_weight_below_half"}:
            weight = f"{ref(args[1])}.to({opmath_name})"
            end = ref(args[0])
            if kwargs["lerp_weight_below_half"][1]:
                return f"fma({weight}, {end} - {self_ref}, {self_ref})"
            return f"fma({self_ref} - {end}, 1 - {weight}, {end})"
        return None


def _scalar_ref(spec: Any, ref: Callable[[Any], str], opmath_name: str, numbers_as_tensors: bool = False) -> str:
    if spec[0] == "s":
        return f"{ref(spec)}.to({opmath_name})"
    if numbers_as_tensors and spec[0] == "c" and type(spec[1]) in (int, float):
        return f"torch.tensor({spec[1]!r}, dtype={opmath_name})"
    return ref(spec)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def dtype_name_of(dtype: torch.dtype, ref: Callable[[Any], str]) -> str:
    return ref(("c", dtype))


def _fma() -> Callable[..., Any]:
    from torch._inductor import inductor_prims

    return inductor_prims.fma


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
    def device(self) -> torch.device:
        return self.program.devices[self.rid]

    @property
    def shape(self) -> torch.Size:
        return self.program.meta(self.rid).shape

    def size(self, dim: int | None = None) -> Any:
        meta = self.program.meta(self.rid)
        return meta.size() if dim is None else meta.size(dim)

    def dim(self) -> int:
        return self.program.meta(self.rid).dim()

    def numel(self) -> int:
        return self.program.meta(self.rid).numel()

    def is_complex(self) -> bool:
        return self.dtype.is_complex

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def __bool__(self) -> bool:
        raise NotCompilable("the update branches on tensor data")

    def __float__(self) -> float:
        raise NotCompilable("the update reads tensor data into Python")

    __int__ = __index__ = __float__  # type: ignore[assignment]

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
        program = next(a.program for a in itertools.chain(args, kwargs.values()) if isinstance(a, Recorded))
        name = getattr(func, "__name__", "")
        if name.startswith("__") and args and isinstance(args[0], Recorded):
            # Tensor.__rsub__(tensor0d, recorded) & co. arrive here: record them as methods.
            return program.call_method(args[0], name, tuple(args[1:]), kwargs)
        if name.startswith("__") and len(args) == 2 and isinstance(args[1], Recorded):
            reflected = {"__add__": "__radd__", "__sub__": "__rsub__", "__mul__": "__rmul__",
                         "__truediv__": "__rtruediv__", "__pow__": "__rpow__", "__div__": "__rtruediv__"}
            if name in reflected:
                return program.call_method(args[1], reflected[name], (args[0],), kwargs)
        return program.call_function(func, tuple(args), kwargs)


def _operator(name: str) -> Callable[..., Any]:
    def method(self: Recorded, *args: Any) -> Any:
        return self.program.call_method(self, name, args, {})

    method.__name__ = name
    return method


for _name in ("__neg__", "__pos__", "__abs__", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
              "__truediv__", "__rtruediv__", "__pow__", "__rpow__", "__lt__", "__le__", "__gt__", "__ge__",
              "__eq__", "__ne__", "__and__", "__or__", "__invert__", "__mod__", "__floordiv__"):
    setattr(Recorded, _name, _operator(_name))
for _name, _target in (("__iadd__", "add_"), ("__isub__", "sub_"), ("__imul__", "mul_"), ("__itruediv__", "div_")):
    setattr(Recorded, _name, _operator(_target))
Recorded.__hash__ = object.__hash__  # type: ignore[assignment]
del _name, _target


def record(update: Callable[..., None], tensors: Sequence[Tensor | None], kwargs: dict[str, Any]) -> Program:
    """Run ``update`` on stand-ins for ``tensors`` (``None`` stays ``None``) and return what it did."""
    program = Program(tensors)
    update(*program.recorded, **kwargs)
    return program


# ------------------------------------------------------------------------------------------------------
# Compiled kernels, shared by every optimizer in the process
# ------------------------------------------------------------------------------------------------------

#: Tensors shorter than this run the eager update: recording it and calling a kernel costs about 100 µs,
#: more than the eager operations on a few thousand elements (measured on 2 cores, Adam).
MIN_KERNEL_NUMEL = 16384
_KERNELS: dict[tuple, Callable[..., Any] | None] = {}
_LOCK = threading.Lock()
#: Seconds spent compiling (first call of each new kernel), for the benchmark's warm-up column.
COMPILE_SECONDS: list[float] = []


def kernel_for(program: Program) -> Callable[..., Any] | None:
    """The compiled kernel of this program's structure (compiled on first use), or None if it failed."""
    key = program.structure()
    try:
        return _KERNELS[key]
    except KeyError:
        pass
    operation = _first_non_elementwise(program)
    if operation is not None:
        raise TypeError(f"an update declared elementwise calls {operation}, which is not elementwise; "
                        "declare elementwise = False to run it per tensor")
    source, namespace = program.source()
    code = compile(source, f"<scratchopt kernel {len(_KERNELS)}>", "exec")
    exec(code, namespace)
    compiled = torch.compile(namespace["kernel"], dynamic=True, fullgraph=True)
    entry = _FirstCall(compiled, namespace["kernel"], source)
    with _LOCK:
        _KERNELS[key] = entry
    return entry


class _FirstCall:
    """Calls the compiled kernel; times the first call (the compile) and falls back to eager on failure."""

    __slots__ = ("compiled", "eager", "source", "state")

    def __init__(self, compiled: Callable[..., Any], eager: Callable[..., Any], source: str) -> None:
        self.compiled = compiled
        self.eager = eager
        self.source = source
        self.state = "new"

    def __call__(self, *args: Any) -> Any:
        if self.state == "ok":
            return self.compiled(*args)
        if self.state == "failed":
            return self.eager(*args)
        start = time.perf_counter()
        try:
            result = self.compiled(*args)
        except Exception as error:  # compile errors are raised before the kernel touches any tensor
            self.state = "failed"
            warnings.warn(f"scratchopt: torch.compile failed ({type(error).__name__}: {error}); running the "
                          "recorded update eagerly", RuntimeWarning, stacklevel=3)
            return self.eager(*args)
        COMPILE_SECONDS.append(time.perf_counter() - start)
        self.state = "ok"
        return result


def tape_tensor(program: Program, device: torch.device) -> Tensor:
    values = program.tape or [0.0]
    return torch.tensor(values, dtype=torch.float64, device=device)


def clear_kernels() -> None:
    """Forget every compiled kernel (the benchmark uses it to time a cold compile)."""
    _KERNELS.clear()


def run(update: Callable[..., None], tensors: Sequence[Tensor | None], scalars: dict[str, Any],
        program: Program | None = None) -> Program | None:
    """Run ``update`` on these 1-d tensors through its compiled kernel, recording it unless ``program``
    (a recording of the same call with the same scalars) is given.

    Returns the program, or None when the update cannot be compiled or is not worth a kernel: nothing
    ran then, and the caller runs it eagerly. Below :data:`MIN_KERNEL_NUMEL` elements the eager update is
    faster than recording it and calling a kernel (and a one-element tensor never reaches a kernel:
    Dynamo specialises a length of 1, and Inductor was seen to drop in-place updates of 0-d float64
    inputs).
    """
    first = next(t for t in tensors if t is not None)
    if first.numel() < MIN_KERNEL_NUMEL or first.is_complex():
        return None
    if program is None:
        try:
            program = record(update, tensors, scalars)
        except NotCompilable:
            return None
    if program.kernel is None:  # a reused program keeps its kernel and its tape for every call of a step
        program.kernel = kernel_for(program)
        program.tape_tensor = tape_tensor(program, first.device)
    program.kernel(*[t for t in tensors if t is not None], program.tape_tensor)
    return program


# ------------------------------------------------------------------------------------------------------
# Is an update elementwise? (a declaration is checked, not trusted)
# ------------------------------------------------------------------------------------------------------

_ELEMENTWISE = frozenset(
    base + suffix
    for base in (
        "add", "sub", "mul", "div", "true_divide", "lerp", "addcmul", "addcdiv", "sqrt", "rsqrt", "reciprocal",
        "neg", "abs", "sign", "sgn", "copy", "clone", "maximum", "minimum", "fmax", "fmin", "clamp",
        "clamp_min", "clamp_max", "clip", "masked_fill", "where", "pow", "square", "exp", "expm1", "log",
        "log1p", "log2", "sigmoid", "tanh", "sin", "cos", "atan2", "hypot", "fill", "zero", "to", "float",
        "double", "half", "bfloat16", "type_as", "eq", "ne", "gt", "ge", "lt", "le", "logical_and",
        "logical_or", "logical_not", "logical_xor", "isfinite", "isnan", "nan_to_num", "floor", "ceil",
        "round", "trunc", "frac", "erf", "view_as_real", "view_as_complex", "conj", "real", "imag",
    )
    for suffix in ("", "_")
) | frozenset(
    f"__{name}__" for name in (
        "neg", "pos", "abs", "add", "radd", "sub", "rsub", "mul", "rmul", "truediv", "rtruediv", "pow", "rpow",
        "lt", "le", "gt", "ge", "eq", "ne", "and", "or", "invert",
    )
)


def non_elementwise_operation(update: Callable[..., None], tensors: Sequence[Tensor | None],
                              scalars: dict[str, Any]) -> str | None:
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
    operation = _first_non_elementwise(program)
    return None if operation is None else f"calls {operation}"


def _first_non_elementwise(program: Program) -> str | None:
    for kind, target, _, _, _ in program.ops:
        name = target if kind == "m" else getattr(target, "__name__", repr(target))
        if name not in _ELEMENTWISE:
            return f"{'Tensor.' if kind == 'm' else 'torch.'}{name}"
    return None
