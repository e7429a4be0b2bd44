"""The kernel cache: one ``torch.compile``-d kernel per program structure, shared by every optimizer
in the process, and :func:`run`, which replays an ``update`` through it.

A program's structure (its operations, input dtypes and the length of its tape) is the key; the tape's
values are not, so a new ``lr``, beta or step reuses the kernel. Kernels are compiled with
``dynamic=True``: one compile serves every buffer length.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from scratchopt.strategies.kernels.codegen import kernel_source
from scratchopt.strategies.kernels.recording import NotCompilable, Program, first_non_elementwise, record

#: Tensors shorter than this run the eager update: recording it and calling a ``torch.compile``'d kernel
#: costs more than the eager operations on a few thousand elements (``scratchopt bench``'s compiled column
#: on the tiny model shows the per-call cost).
MIN_KERNEL_NUMEL = 16384
_KERNELS: dict[tuple[Any, ...], Callable[..., Any]] = {}
_LOCK = threading.Lock()
#: Seconds spent compiling (first call of each new kernel), for the benchmark's warm-up column.
COMPILE_SECONDS: list[float] = []
#: Calls of compiled kernels in this process (the test kit reports whether a check reached one).
CALLS = [0]


def kernel_for(program: Program) -> Callable[..., Any]:
    """The compiled kernel of this program's structure, compiled on first use (a kernel whose compile
    fails runs the recorded operations eagerly, with a warning)."""
    key = program.structure()
    try:
        return _KERNELS[key]
    except KeyError:
        pass
    operation = first_non_elementwise(program)
    if operation is not None:
        raise TypeError(
            f"an update declared elementwise calls {operation}, which is not elementwise; "
            "declare elementwise = False to run it per tensor"
        )
    source, namespace = kernel_source(program)
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
        CALLS[0] += 1
        if self.state == "ok":
            return self.compiled(*args)
        if self.state == "failed":
            return self.eager(*args)
        start = time.perf_counter()
        try:
            result = self.compiled(*args)
        except Exception as error:  # compile errors are raised before the kernel touches any tensor
            self.state = "failed"
            warnings.warn(
                f"scratchopt: torch.compile failed ({type(error).__name__}: {error}); running the "
                "recorded update eagerly",
                RuntimeWarning,
                stacklevel=3,
            )
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


def worth_a_kernel(tensors: Sequence[Tensor | None]) -> bool:
    """A kernel beats the eager update on these tensors: real, and at least :data:`MIN_KERNEL_NUMEL`
    long (a one-element tensor never reaches a kernel: Dynamo specialises a length of 1)."""
    first = next(t for t in tensors if t is not None)
    return first.numel() >= MIN_KERNEL_NUMEL and not first.is_complex()


def run(
    update: Callable[..., None],
    tensors: Sequence[Tensor | None],
    scalars: dict[str, Any],
    program: Program | None = None,
) -> Program | None:
    """Run ``update`` on these 1-d tensors through its compiled kernel, recording it unless ``program``
    (a recording of the same call with the same scalars) is given.

    Returns the program, or None when the update cannot be compiled or is not worth a kernel: nothing
    ran then, and the caller runs it eagerly. Below :data:`MIN_KERNEL_NUMEL` elements the eager update is
    faster than recording it and calling a kernel (and a one-element tensor never reaches a kernel:
    Dynamo specialises a length of 1, and Inductor was seen to drop in-place updates of 0-d float64
    inputs).
    """
    if not worth_a_kernel(tensors):
        return None
    first = next(t for t in tensors if t is not None)
    if program is None:
        try:
            program = record(update, tensors, scalars)
        except NotCompilable:
            return None
    if program.kernel is None or program.tape_tensor is None:
        # A reused program keeps its kernel and its tape for every call of a step.
        program.kernel = kernel_for(program)
        program.tape_tensor = tape_tensor(program, first.device)
    program.kernel(*[t for t in tensors if t is not None], program.tape_tensor)
    return program
