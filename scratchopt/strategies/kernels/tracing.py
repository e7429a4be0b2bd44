"""Tracing: an ``update``'s scalar arithmetic, written down once as a small Python function.

A kernel's tape (:mod:`~scratchopt.strategies.kernels.recording`) depends on the step and the
hyperparameters, so it changes at every step; recording the whole ``update`` again to recompute it costs
more than the kernel of a small model. So the first recording runs with :class:`Symbol`
stand-ins for the float arguments. A symbol computes its value for real, exactly as the float would, and
writes down each operation; where the update branches on one (``if weight_decay != 0``, ``max(a, b)``,
ATen's choice of ``lerp`` formula), the outcome becomes a *guard*. The result is :class:`Trace`: the
recorded program, and a generated function that recomputes the tape from new arguments with the same
Python float operations in the same order (so bit for bit the tape a new recording would give), or
returns None when a guard fails (the update would take another path: record again).

An update a symbol cannot follow (``float(x)``, ``math.sqrt(x)``, a float used as a dict key, a tensor
hyperparameter) is recorded at every step instead; so is one that reads anything but its arguments and
module-level names (a closure). Non-float arguments (bools, ints, strings, None) and each argument's
type are part of the trace's key, not of its guards.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from scratchopt.strategies.kernels.recording import Program


class Untraceable(Exception):
    """The update did something with a symbol that a generated function cannot repeat."""


class Tracer:
    """The generated function's lines, in the order the update computed them."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.count = 0

    def value(self, value: Any, expression: str) -> Symbol:
        name = f"v{self.count}"
        self.count += 1
        self.lines.append(f"    {name} = {expression}")
        return Symbol(self, value, name)

    def guard(self, expression: str, outcome: bool) -> None:
        self.lines.append(f"    if ({expression}) is not {outcome}: return None")


def _literal(value: Any) -> str | None:
    if type(value) is float:
        if math.isfinite(value):
            return repr(value)
        return "_nan" if math.isnan(value) else ("_inf" if value > 0 else "(-_inf)")
    if type(value) in (int, bool):
        return repr(value)
    return None


class Symbol:
    """A float argument of ``update`` (or a value computed from one) that writes down what is done with it."""

    __slots__ = ("name", "tracer", "value")

    def __init__(self, tracer: Tracer, value: Any, name: str) -> None:
        self.tracer = tracer
        self.value = value
        self.name = name

    def _operand(self, other: Any) -> tuple[Any, str] | None:
        if isinstance(other, Symbol):
            return (other.value, other.name) if other.tracer is self.tracer else None
        literal = _literal(other)
        return None if literal is None else (other, literal)

    def __bool__(self) -> bool:
        outcome = bool(self.value)
        self.tracer.guard(f"bool({self.name})", outcome)
        return outcome

    def __float__(self) -> float:
        raise Untraceable("the update converts a traced scalar with float() or math.*")

    def __int__(self) -> int:
        raise Untraceable("the update converts a traced scalar to an int")

    __index__ = __round__ = __trunc__ = __floor__ = __ceil__ = __int__

    def __hash__(self) -> int:
        raise Untraceable("the update hashes a traced scalar")

    def __repr__(self) -> str:
        return f"Symbol({self.name}={self.value!r})"


def _binary(symbol: str, function: Callable[[Any, Any], Any], reflected: bool) -> Callable[[Symbol, Any], Any]:
    def method(self: Symbol, other: Any) -> Any:
        operand = self._operand(other)
        if operand is None:
            return NotImplemented
        value, text = operand
        if reflected:
            return self.tracer.value(function(value, self.value), f"{text} {symbol} {self.name}")
        return self.tracer.value(function(self.value, value), f"{self.name} {symbol} {text}")

    return method


def _unary(template: str, function: Callable[[Any], Any]) -> Callable[[Symbol], Any]:
    def method(self: Symbol) -> Any:
        return self.tracer.value(function(self.value), template.format(self.name))

    return method


# (name, Python operator, function, whether a reflected form exists: comparisons reflect into each other)
_BINARY: tuple[tuple[str, str, Callable[[Any, Any], Any], bool], ...] = (
    ("add", "+", operator.add, True),
    ("sub", "-", operator.sub, True),
    ("mul", "*", operator.mul, True),
    ("truediv", "/", operator.truediv, True),
    ("floordiv", "//", operator.floordiv, True),
    ("mod", "%", operator.mod, True),
    ("pow", "**", operator.pow, True),
    ("lt", "<", operator.lt, False),
    ("le", "<=", operator.le, False),
    ("gt", ">", operator.gt, False),
    ("ge", ">=", operator.ge, False),
    ("eq", "==", operator.eq, False),
    ("ne", "!=", operator.ne, False),
)
for _name, _symbol, _function, _reflects in _BINARY:
    setattr(Symbol, f"__{_name}__", _binary(_symbol, _function, reflected=False))
    if _reflects:
        setattr(Symbol, f"__r{_name}__", _binary(_symbol, _function, reflected=True))
for _name, _template, _unary_function in (
    ("neg", "-{}", operator.neg),
    ("pos", "+{}", operator.pos),
    ("abs", "abs({})", abs),
):
    setattr(Symbol, f"__{_name}__", _unary(_template, _unary_function))
del _name, _symbol, _function, _reflects, _template, _unary_function


def traceable(update: Callable[..., Any]) -> bool:
    """Whether ``update`` reads nothing but its arguments and module-level names (no closure)."""
    code = getattr(update, "__code__", None)
    return code is not None and not code.co_freevars


class Trace:
    """A recorded program and the function that recomputes its tape from new arguments."""

    __slots__ = ("kernel", "program", "tape_of")

    def __init__(self, program: Program, tape_of: Callable[[dict[str, Any]], list[float] | None]) -> None:
        self.program = program
        self.tape_of = tape_of
        #: What the caller compiled for the program (its native kernel), kept with it.
        self.kernel: Any = None


def trace(
    update: Callable[..., None],
    tensors: Sequence[Tensor | None],
    arguments: dict[str, Any],
    record: Callable[[Callable[..., None], Sequence[Tensor | None], dict[str, Any]], Program],
) -> tuple[Program, Trace | None]:
    """Record ``update`` (with ``record``) with symbols for its float arguments. Returns the program,
    exactly as a plain recording gives it, and its trace, or None where the update cannot be traced."""
    if not traceable(update) or any(isinstance(v, Tensor) for v in arguments.values()):
        return record(update, tensors, arguments), None
    tracer = Tracer()
    symbolic = {
        name: tracer.value(value, f"arguments[{name!r}]") if type(value) is float else value
        for name, value in arguments.items()
    }
    try:
        program = record(update, tensors, symbolic)
    except Untraceable:
        return record(update, tensors, arguments), None
    if program.untraceable:
        return program, None
    tape = [_literal(source) if not isinstance(source, Symbol) else source.name for source in program.tape_sources]
    if any(text is None for text in tape):
        return program, None
    source = "def tape_of(arguments):\n" + "\n".join(tracer.lines) + f"\n    return [{', '.join(tape)}]\n"  # type: ignore[arg-type]
    namespace: dict[str, Any] = {"_inf": math.inf, "_nan": math.nan, **recording_helpers}
    exec(compile(source, f"<tape of {getattr(update, '__qualname__', 'update')}>", "exec"), namespace)
    return program, Trace(program, namespace["tape_of"])


def key_of(arguments: dict[str, Any]) -> tuple[Any, ...] | None:
    """What a trace assumes of the arguments besides its guards: each one's type, and the value of
    every argument that is not a float; None where an argument cannot be part of a key (a tensor)."""
    key = tuple((name, type(v), None if type(v) is float else v) for name, v in arguments.items())
    try:
        hash(key)
    except TypeError:
        return None
    return None if any(isinstance(v, Tensor) for v in arguments.values()) else key


#: Functions the generated guards call (registered by the recording).
recording_helpers: dict[str, Any] = {}
