"""Code generation: the Python source of a kernel that replays a recorded ``update``.

The recorded operations are written out as a function ``kernel(t0, t1, …, tape)`` in which every scalar
of the update is ``tape[i]``, an element of a float64 tensor; :mod:`scratchopt.strategies.kernels.cache`
compiles it with ``torch.compile``.

Rewrites made so that the kernel rounds as ATen's CPU kernels do (torch takes these scalars only as
numbers): ``add_(x, alpha=s)`` → ``fma(x, s, self)``, ``addcmul_(a, b, value=s)`` → ``fma(s·a, b,
self)``, ``addcdiv_(a, b, value=s)`` → ``self + s·a/b``, and ``lerp_(end, w)`` → ``fma(w, end − self,
self)`` or ``fma(self − end, 1 − w, end)``, ATen's choice by |w| < ½, made while recording and part of
the program's key. A scalar is converted to the tensor's arithmetic type before use, as ATen converts it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from scratchopt.strategies.kernels.recording import Program, opmath


def kernel_source(program: Program) -> tuple[str, dict[str, Any]]:
    """Python source of the kernel ``kernel(t0, t1, …, tape)`` and the globals it needs."""
    program.compute_metas()
    namespace: dict[str, Any] = {"torch": torch}
    names = [f"t{i}" for i in range(program.n_inputs)]

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
        namespace[name] = program.meta(rid).dtype
        return name

    lines = [f"def kernel({', '.join(names)}, tape):"]
    lines += [f"    v{i} = t{i}" for i in range(program.n_inputs)]
    namespace["fma"] = _fma()
    for kind, target, receiver, (args, kwargs), out in program.ops:
        if kind == "f":
            fname = f"f{len(namespace)}"
            namespace[fname] = target
            call = f"{fname}({', '.join([ref(a) for a in args] + [f'{k}={ref(v)}' for k, v in kwargs])})"
            lines.append(f"    v{out} = {call}")
            continue
        expression = _fused_expression(program, target, receiver, args, dict(kwargs), ref, dtype_name)
        inplace = target.endswith("_") and not target.endswith("__")
        if expression is not None:
            call = f"{ref(receiver)}.copy_({expression})" if inplace else expression
        else:
            # A scalar is converted to the tensor's arithmetic type first, as ATen converts it.
            # A number beside a tape scalar becomes a tensor too: torch has no overload that mixes
            # them (``clamp_(tensor_min, 50)``).
            opmath_name = dtype_name_of(opmath(program.meta(receiver[1]).dtype), ref)
            on_tape = any(spec[0] == "s" for spec in [*args, *(v for _, v in kwargs)])
            rendered = [_scalar_ref(a, ref, opmath_name, on_tape) for a in args] + [
                f"{k}={_scalar_ref(v, ref, opmath_name, on_tape)}" for k, v in kwargs
            ]
            call = f"{ref(receiver)}.{target}({', '.join(rendered)})"
        lines.append(f"    {call}" if out is None else f"    v{out} = {call}")
    lines.append("    return None")
    return "\n".join(lines) + "\n", namespace


def _fused_expression(
    program: Program,
    name: str,
    receiver: Any,
    args: tuple,
    kwargs: dict[str, Any],
    ref: Callable[[Any], str],
    dtype_name: Callable[[int], str],
) -> str | None:
    """The expression of ATen's CPU kernel for ops whose scalar torch takes only as a number.

    ATen computes ``add(a, b, alpha)`` as ``fma(b, alpha, a)``, ``addcmul(s, a, b, value)`` as
    ``fma(value·a, b, s)``, ``addcdiv`` as ``s + value·a/b`` and ``lerp`` as
    ``fma(w, e − s, s)`` (|w| < ½) or ``fma(s − e, 1 − w, e)``; the kernel does the same, so that
    only the fusion itself (no intermediate rounding is skipped or added) separates it from eager.
    """
    base = name[:-1] if name.endswith("_") and not name.endswith("__") else name
    self_ref = ref(receiver)
    arithmetic = opmath(program.meta(receiver[1]).dtype)
    opmath_name = dtype_name_of(arithmetic, ref)
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


def dtype_name_of(dtype: torch.dtype, ref: Callable[[Any], str]) -> str:
    return ref(("c", dtype))


def _fma() -> Callable[..., Any]:
    from torch._inductor import inductor_prims

    return inductor_prims.fma
