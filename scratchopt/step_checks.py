"""The checks a step makes before it changes anything: gradients and state that the update can use.

torch's for-loop finds a bad gradient or a bad state tensor only when an operation fails, after it has
changed the params and state before it: a half-done step. Every scratchopt step makes these checks on
the params it is about to update, first (the dispatcher calls them through
:meth:`~scratchopt.optimizer.ScratchOptimizer.check_inputs`), and raises torch's exception type with a
message naming the parameter and the key:

* a gradient of another dtype, device or shape than its param (slipped in through ``p.grad.data = ...``):
  ``RuntimeError``;
* a state tensor of another dtype or device (after ``model.to()``), or of another shape where the update
  is elementwise (a state_dict of another model): ``RuntimeError``;
* a state key the update needs that the state lacks (``amsgrad`` switched on after the first step, a
  state_dict saved without it): ``KeyError``, as torch raises it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from scratchopt import precision, quantization
from scratchopt.strategies.kernels import runtime

if TYPE_CHECKING:
    from torch.optim import Optimizer

    from scratchopt.optimizer import ScratchOptimizer


def describe(optimizer: Optimizer, param: Tensor) -> str:
    """``parameter 3 of param group 1`` (with its name where the groups have ``param_names``)."""
    for group_index, group in enumerate(optimizer.param_groups):
        for index, p in enumerate(group["params"]):
            if p is param:
                names = group.get("param_names")
                name = f" ({names[index]!r})" if names is not None and index < len(names) else ""
                where = f" of param group {group_index}" if len(optimizer.param_groups) > 1 else ""
                return f"parameter {index}{name}{where}"
    return "a parameter"


def check_gradients_match(optimizer: Optimizer, params: list[Tensor]) -> None:
    """Raise a RuntimeError naming the parameter when its gradient has another dtype, device or shape."""
    for param in params:
        grad = param.grad
        assert grad is not None  # the dispatcher passes the params with a gradient
        if grad.dtype != param.dtype or grad.device != param.device or grad.shape != param.shape:
            raise RuntimeError(
                f"{type(optimizer).__name__}: the gradient of {describe(optimizer, param)} is {grad.dtype} "
                f"{tuple(grad.shape)} on {grad.device}, but the parameter is {param.dtype} "
                f"{tuple(param.shape)} on {param.device}"
            )


def check_state_matches(
    optimizer: Optimizer,
    params: list[Tensor],
    keys: tuple[str, ...],
    same_shape: bool = False,
    state_dtype: torch.dtype | str | None = None,
) -> None:
    """Raise a RuntimeError naming the parameter and key when a state tensor no longer has its
    parameter's dtype or device (after ``model.to()``), or, with ``same_shape``, its shape.
    ``state_dtype``: the dtype a float32 parameter's state is kept in (:mod:`scratchopt.precision`)."""
    start = 0
    module = runtime.ready()
    if (
        module is not None and not same_shape and state_dtype is None
    ):  # the same check in C++; the loop below then words the error
        start = module.first_mismatch(params, optimizer.state, keys)
        if start == -1:
            return
    for param in params[start:]:
        state = optimizer.state.get(param)
        if not state:
            continue
        for key in keys:
            value = state.get(key)
            if not isinstance(value, Tensor):
                continue
            kept = (
                precision.kept_as(optimizer, key, precision.state_dtype_for(param, {"state_dtype": state_dtype}))
                if state_dtype is not None
                else None
            )
            packed = kept == precision.EIGHT_BIT and quantization.is_packed(value, param)
            low = kept is not None and param.dtype == torch.float32 and (value.shape == param.shape or packed)
            expected = precision.stored_dtype(kept) if low else param.dtype  # type: ignore[arg-type]
            if value.dtype != expected or value.device != param.device:
                raise RuntimeError(
                    f"{type(optimizer).__name__}: state[{key!r}] of {describe(optimizer, param)} is "
                    f"{value.dtype} on {value.device}, but "
                    + (f"the group's state_dtype is {kept} and " if low else "")
                    + f"the parameter is {param.dtype} on "
                    f"{param.device}; was the model moved with .to() after the first step? "
                    "optimizer.load_state_dict(optimizer.state_dict()) casts the state like the parameters"
                )
            if same_shape and value.shape != param.shape and not packed:
                raise RuntimeError(
                    f"{type(optimizer).__name__}: state[{key!r}] of {describe(optimizer, param)} has shape "
                    f"{tuple(value.shape)}, but the parameter has shape {tuple(param.shape)}; was the state "
                    "loaded from another model?"
                )


def check_state_keys(optimizer: ScratchOptimizer, group: dict[str, Any], params: list[Tensor]) -> None:
    """Raise a KeyError naming the parameter and the key when a param's state lacks a key its first step
    would have created (so the update or the bookkeeping would read it)."""
    settings = group_settings(group)
    for param in params:
        state = optimizer.state.get(param)
        if not state:
            continue  # its first step creates the state
        required = required_state_keys(optimizer, group, param, settings)
        if required is not None and not required <= state.keys():
            missing = sorted(required - state.keys())
            raise KeyError(
                f"{type(optimizer).__name__}: the state of {describe(optimizer, param)} has no "
                f"{missing[0]!r} (it has {sorted(state)}), which this step needs with the group's settings; "
                "was a setting such as amsgrad switched on after the first step, or the state loaded "
                "from a state_dict saved without it?"
            )


def required_state_keys(
    optimizer: ScratchOptimizer, group: dict[str, Any], param: Tensor, settings: Any = None
) -> frozenset[str] | None:
    """The keys ``init_state`` gives a param of this dtype and number of dimensions in this group, found on
    a meta-device stand-in (no memory) once per algorithm, group settings, dtype and dimensions; None
    where ``init_state`` cannot run on one (or the algorithm creates its state itself)."""
    key: tuple[Any, ...] | None = (
        type(optimizer),
        settings if settings is not None else group_settings(group),
        param.dtype,
        param.dim(),
    )
    try:
        return _REQUIRED[key]
    except KeyError:
        pass
    except TypeError:  # a setting that cannot be hashed: found afresh
        key = None
    stand_in = torch.empty((1,) * param.dim(), dtype=param.dtype, device="meta")
    stand_in.grad = torch.empty_like(stand_in)
    try:
        found: frozenset[str] | None = frozenset(optimizer.init_state(stand_in, group))
    except Exception:  # an init_state that reads data, or none (SGD creates its buffer as it counts)
        found = None
    if key is not None:
        if len(_REQUIRED) > 4096:
            _REQUIRED.clear()
        _REQUIRED[key] = found
    return found


def group_settings(group: dict[str, Any]) -> tuple[Any, ...]:
    """The group's settings (every key but its params) as a tuple, for :func:`required_state_keys`: a
    number by its sign only, a tensor by its dtype. The state an algorithm creates depends on its flags
    and on whether a coefficient is zero (``momentum > 0``), never on a magnitude that a scheduler moves
    every step (``lr``) or on a count kept in the group (Schedule-Free's ``k``), so the keys are found
    once."""
    return tuple((k, _setting(v)) for k, v in group.items() if k != "params" and k != "param_names")


def _setting(value: Any) -> Any:
    if isinstance(value, (float, int)) and not isinstance(value, bool):
        return (value > 0) - (value < 0)
    if isinstance(value, Tensor):
        return value.dtype
    if isinstance(value, tuple):
        return tuple(_setting(v) for v in value)
    return value


_REQUIRED: dict[Any, frozenset[str] | None] = {}
