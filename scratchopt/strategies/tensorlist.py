"""The list type an ``update`` runs on under ``impl="foreach"``.

:class:`TensorList` is a list of tensors of one device and dtype that answers the Tensor methods an
``update`` calls (``mul_``, ``addcmul_``, ``lerp_``, ``sqrt``, ``/`` …) with one ``torch._foreach_*``
call over the whole list. Where torch has no foreach op for a call (or not for that combination of
arguments) the method runs tensor by tensor, so any Tensor method keeps working. The strategy puts
only tensors whose per-parameter scalars (``step``…) are equal into one list, so every scalar an update
computes is one Python number, exactly the one the loop computes.

On the CPU torch's foreach ops run tensor by tensor with the same kernels as the single-tensor ops, so
an ``update`` run on a :class:`TensorList` is bit-for-bit equal to the loop. On CUDA they are
horizontally fused kernels (a few ulp from the loop).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------------
# TensorList
# --------------------------------------------------------------------------------------------------

#: Keyword arguments that torch types as ``Scalar`` (a 0-d tensor there is read with ``.item()``).
_SCALAR_KEYWORDS = ("alpha", "value")


def _as_foreach_scalar(value: Any) -> Any:
    """A Python scalar for a foreach ``Scalar`` argument (torch reads a 0-d tensor there with ``.item()``)."""
    if isinstance(value, Tensor):
        return value.item()
    return value


class TensorList:
    """Tensors of one device and dtype, operated on together through ``torch._foreach_*``."""

    __slots__ = ("device", "dtype", "tensors")

    def __init__(
        self, tensors: Iterable[Tensor], dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> None:
        self.tensors = list(tensors)
        if self.tensors:
            dtype = self.tensors[0].dtype if dtype is None else dtype
            device = self.tensors[0].device if device is None else device
        self.dtype = dtype
        self.device = device

    # ----- metadata an update may ask for --------------------------------------------------------
    is_sparse = False
    layout = torch.strided

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self):
        return iter(self.tensors)

    def __repr__(self) -> str:
        return f"TensorList(n={len(self.tensors)}, dtype={self.dtype}, device={self.device})"

    def is_complex(self) -> bool:
        return self.dtype is not None and self.dtype.is_complex

    def is_floating_point(self) -> bool:
        return self.dtype is not None and self.dtype.is_floating_point

    @property
    def is_cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    def __bool__(self) -> bool:
        raise TypeError("a TensorList has no truth value; an update must not branch on tensor data")

    # ----- the engine ------------------------------------------------------------------------------
    def _new(self, tensors: Iterable[Tensor]) -> TensorList:
        tensors = list(tensors)
        if not tensors:
            return TensorList([], self.dtype, self.device)
        return TensorList(tensors)

    def _per_tensor(self, name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        """Run the Tensor method ``name`` tensor by tensor (the fallback for any call)."""
        n = len(self.tensors)

        def pick(value: Any, index: int) -> Any:
            if isinstance(value, TensorList):
                return value.tensors[index]
            return value

        results = []
        for index, tensor in enumerate(self.tensors):
            call_args = [pick(a, index) for a in args]
            call_kwargs = {k: pick(v, index) for k, v in kwargs.items()}
            results.append(getattr(tensor, name)(*call_args, **call_kwargs))
        if name.endswith("_") and not name.endswith("__"):
            return self
        if n == 0:
            return self._new([])
        if all(isinstance(r, Tensor) for r in results):
            return self._new(results)
        return results

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``name`` through ``torch._foreach_<name>`` where torch has it for these arguments."""
        if not self.tensors:
            return self if name.endswith("_") else self._new([])
        foreach = _FOREACH.get(name)
        if foreach is not None and self.dtype in _REDUCED and _has_scalar(args, kwargs):
            # torch's CPU foreach ops round a Python scalar for 16-bit floats differently from the
            # single-tensor op (``_foreach_mul_(l, 0.9)`` ≠ ``t.mul_(0.9)`` in bfloat16): run per tensor.
            foreach = None
        if foreach is not None:
            converted_args = []
            ok = True
            for a in args:
                if isinstance(a, TensorList):
                    if len(a.tensors) != len(self.tensors):
                        raise ValueError("TensorList lengths differ")
                    converted_args.append(a.tensors)
                elif isinstance(a, Tensor):
                    # A 0-d tensor where the single-tensor op takes a Tensor: the per-tensor op is the
                    # loop's own call, so keep its exact semantics (type promotion included).
                    ok = False
                    break
                else:
                    converted_args.append(a)
            converted_kwargs = {}
            for k, v in kwargs.items():
                if isinstance(v, TensorList):
                    ok = False
                    break
                converted_kwargs[k] = _as_foreach_scalar(v) if k in _SCALAR_KEYWORDS else v
            if ok:
                try:
                    result = foreach(self.tensors, *converted_args, **converted_kwargs)
                except (TypeError, NotImplementedError):
                    # No overload for these argument types, or none for these tensors (DTensor has no
                    # sharding rule for some foreach ops): raised before any work.
                    result = _NO_OVERLOAD
                if result is not _NO_OVERLOAD:
                    if name.endswith("_"):
                        return self
                    return self._new(result)
        return self._per_tensor(name, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if not callable(getattr(Tensor, name, None)):
            raise AttributeError(f"TensorList has no attribute {name!r}")
        return lambda *args, **kwargs: self._call(name, *args, **kwargs)

    # Methods spelled out because an update calls them all the time (saves a closure per call).
    def mul_(self, other: Any) -> TensorList:
        return self._call("mul_", other)

    def add_(self, other: Any, *, alpha: Any = 1) -> TensorList:
        if _is_default_one(alpha):
            return self._call("add_", other)
        return self._call("add_", other, alpha=alpha)

    def add(self, other: Any, *, alpha: Any = 1) -> TensorList:
        if _is_default_one(alpha):
            return self._call("add", other)
        return self._call("add", other, alpha=alpha)

    def addcmul_(self, tensor1: Any, tensor2: Any, *, value: Any = 1) -> TensorList:
        return self._call("addcmul_", tensor1, tensor2, value=value)

    def addcdiv_(self, tensor1: Any, tensor2: Any, *, value: Any = 1) -> TensorList:
        return self._call("addcdiv_", tensor1, tensor2, value=value)

    def lerp_(self, end: Any, weight: Any) -> TensorList:
        return self._call("lerp_", end, weight)

    def copy_(self, src: Any, non_blocking: bool = False) -> TensorList:
        if isinstance(src, TensorList) and self.tensors:
            try:
                torch._foreach_copy_(self.tensors, src.tensors, non_blocking=non_blocking)
                return self
            except NotImplementedError:  # DTensor has no sharding rule for it: raised before any copy
                pass
        return self._per_tensor("copy_", (src,), {"non_blocking": non_blocking})

    def sqrt(self) -> TensorList:
        return self._call("sqrt")

    # ----- operators ---------------------------------------------------------------------------------
    def __neg__(self) -> TensorList:
        return self._call("neg")

    def __add__(self, other: Any) -> TensorList:
        return self._call("add", other)

    def __radd__(self, other: Any) -> TensorList:
        return self._per_tensor("__radd__", (other,), {})

    def __sub__(self, other: Any) -> TensorList:
        return self._call("sub", other)

    def __rsub__(self, other: Any) -> TensorList:
        return self._per_tensor("__rsub__", (other,), {})

    def __mul__(self, other: Any) -> TensorList:
        return self._call("mul", other)

    def __rmul__(self, other: Any) -> TensorList:
        return self._per_tensor("__rmul__", (other,), {})

    def __truediv__(self, other: Any) -> TensorList:
        return self._call("div", other)

    def __rtruediv__(self, other: Any) -> TensorList:
        return self._per_tensor("__rtruediv__", (other,), {})

    def __pow__(self, other: Any) -> TensorList:
        return self._call("pow", other)

    def __rpow__(self, other: Any) -> TensorList:
        return self._per_tensor("__rpow__", (other,), {})

    def __abs__(self) -> TensorList:
        return self._call("abs")

    def __iadd__(self, other: Any) -> TensorList:
        return self._call("add_", other)

    def __isub__(self, other: Any) -> TensorList:
        return self._call("sub_", other)

    def __imul__(self, other: Any) -> TensorList:
        return self._call("mul_", other)

    def __itruediv__(self, other: Any) -> TensorList:
        return self._call("div_", other)

    __hash__ = object.__hash__

    # ----- free functions: torch.maximum(a, b), torch.sqrt(a, out=...) … run tensor by tensor --------
    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        lists = [a for a in list(args) + list(kwargs.values()) if isinstance(a, TensorList)]
        if not lists:
            return NotImplemented
        n = len(lists[0].tensors)

        def pick(value: Any, index: int) -> Any:
            if isinstance(value, TensorList):
                return value.tensors[index]
            if isinstance(value, (list, tuple)) and any(isinstance(v, TensorList) for v in value):
                return type(value)(pick(v, index) for v in value)
            return value

        results = [func(*[pick(a, i) for a in args], **{k: pick(v, i) for k, v in kwargs.items()}) for i in range(n)]
        out = kwargs.get("out")
        if isinstance(out, TensorList):
            return out
        if results and all(isinstance(r, Tensor) for r in results):
            return TensorList(results)
        if not results:
            return TensorList([], lists[0].dtype, lists[0].device)
        return results


def _per_tensor_operator(name: str) -> Callable[..., Any]:
    return lambda self, *args: self._per_tensor(name, args, {})


for _name in (
    "__lt__",
    "__le__",
    "__gt__",
    "__ge__",
    "__eq__",
    "__ne__",
    "__and__",
    "__or__",
    "__xor__",
    "__invert__",
    "__mod__",
    "__floordiv__",
):
    setattr(TensorList, _name, _per_tensor_operator(_name))
del _name

_NO_OVERLOAD = object()
_REDUCED = (torch.float16, torch.bfloat16)


def _has_scalar(args: tuple, kwargs: dict[str, Any]) -> bool:
    values = list(args) + [v for k, v in kwargs.items() if not (k in _SCALAR_KEYWORDS and _is_default_one(v))]
    return any(not isinstance(v, TensorList) for v in values)


def _is_default_one(alpha: Any) -> bool:
    return type(alpha) is int and alpha == 1


def _foreach_table() -> dict[str, Callable[..., Any]]:
    table = {}
    for attribute in dir(torch):
        if attribute.startswith("_foreach_"):
            table[attribute.removeprefix("_foreach_")] = getattr(torch, attribute)
    # ``_foreach_max``/``_foreach_norm`` reduce each tensor to a 0-d result; the methods of the same name
    # take optional dims and differ in meaning, so keep them per tensor.
    for name in ("max", "norm", "powsum", "mm", "copy_", "clone", "zero_"):
        table.pop(name, None)
    return table


_FOREACH = _foreach_table()
