"""The base class every scratchopt algorithm derives from.

An algorithm module supplies three small things and nothing about execution:

* ``update(param, grad, *state_tensors, **scalars)`` — the math, written once with Tensor methods
  (``add_``, ``mul_``, ``lerp_``, ``addcmul_``, ``addcdiv_``, ``sqrt`` …) and Python arithmetic on the
  scalars, so that a strategy can hand it a single tensor, a list of tensors or one flat buffer;
* ``state_keys`` — the names of the per-parameter state tensors, in the order ``update`` takes them;
* ``_init_state`` / ``_hyperparameters`` — torch's lazy state initialisation and the group's
  hyperparameters, read afresh at every step so schedulers and edited ``param_groups`` take effect.

:class:`ScratchOptimizer` (a real :class:`torch.optim.Optimizer`) owns the rest: which parameters take
part in a step, ``step`` counting, complex parameters, the closure, and the strategy chosen with ``impl=``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from scratchopt import strategies


def scalar_dtype(fused: bool | None = False) -> torch.dtype:
    """The dtype torch gives the ``step`` counter: float32, or float64 under a float64 default dtype."""
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def new_step_counter(param: Tensor, group: dict[str, Any]) -> Tensor:
    """A zero ``step`` placed as torch places it: on the CPU unless capturable or fused."""
    if group.get("capturable") or group.get("fused"):
        return torch.zeros((), dtype=scalar_dtype(group.get("fused")), device=param.device)
    return torch.tensor(0.0, dtype=scalar_dtype())


def squeeze_scalar(value: Any) -> Any:
    """A 1-element tensor hyperparameter becomes 0-d, as torch does before its arithmetic."""
    if isinstance(value, Tensor) and value.dim() != 0:
        return value.squeeze()
    return value


def resolve_impl(impl: str | None, foreach: bool | None, fused: bool | None) -> str:
    """Map ``impl=`` and torch's ``foreach=``/``fused=`` flags onto one strategy name."""
    if impl is not None and impl not in strategies.NAMES:
        raise ValueError(f"Invalid impl value: {impl!r}; impl must be one of {', '.join(strategies.NAMES)}")
    implied = "fused" if fused else "foreach" if foreach else None
    if impl is None:
        return implied or "loop"
    if implied is not None and implied != impl:
        raise ValueError(
            f"impl={impl!r} contradicts {'fused' if fused else 'foreach'}=True; pass one or the other"
        )
    return impl


class ScratchOptimizer(Optimizer):
    """A :class:`torch.optim.Optimizer` whose subclasses define only the math of one algorithm."""

    state_keys: ClassVar[tuple[str, ...]] = ()
    #: Group keys whose values ``update`` takes by the same name (``betas`` arrives as beta1, beta2).
    hyperparameter_keys: ClassVar[tuple[str, ...]] = ()
    #: Group keys torch fills in when it loads a state_dict saved by an older version (``__setstate__``).
    group_defaults: ClassVar[dict[str, Any]] = {}
    #: 0-d state tensors an older version saved as Python numbers.
    scalar_state_keys: ClassVar[tuple[str, ...]] = ("step",)
    #: torch's error for a sparse gradient, or None where the algorithm accepts sparse gradients.
    sparse_error: ClassVar[str | None] = None
    #: True when ``update`` treats every element independently (no reductions, no per-tensor shapes), so
    #: that it may run on a list of tensors, on one flat buffer per group or in a compiled kernel. False
    #: (the safe default) makes every ``impl`` run the per-tensor loop.
    elementwise: ClassVar[bool] = False
    update: ClassVar[Callable[..., None]]

    def __init__(self, params: Any, defaults: dict[str, Any], impl: str | None = None) -> None:
        super().__init__(params, defaults)
        if defaults.get("fused"):
            if defaults.get("differentiable"):
                raise RuntimeError("`fused` does not support `differentiable`")
            if defaults.get("foreach"):
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if defaults.get("differentiable"):
            # torch's differentiable path detaches and clones in algorithm-specific places; running our
            # update under autograd would give gradients that differ from torch's, so we refuse it.
            raise NotImplementedError("differentiable=True is not supported by scratchopt; use torch.optim")
        #: The strategy that runs: the one asked for, or "loop" for an algorithm that is not elementwise
        #: (its update reduces over or reshapes a tensor, so it may not run on lists, buffers or kernels).
        self.impl = resolve_impl(impl, defaults.get("foreach"), defaults.get("fused")) if self.elementwise else "loop"
        # torch's load_state_dict replaces the state tensors: flat layouts are rebuilt from the new ones.
        self.register_load_state_dict_post_hook(strategies.forget_layouts)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.register_load_state_dict_post_hook(strategies.forget_layouts)
        for group in self.param_groups:
            for key, value in self.group_defaults.items():
                group.setdefault(key, value)
            for param in group["params"]:
                param_state = self.state.get(param, {})
                for key in self.scalar_state_keys:
                    if key in param_state and not torch.is_tensor(param_state[key]):
                        param_state[key] = new_step_counter(param, group).fill_(float(param_state[key]))

    def _hyperparameters(self, group: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of ``update`` that come from the param group, read afresh at every step.

        A 1-element tensor hyperparameter is squeezed to 0-d and otherwise passed as it is (not as a
        Python number), because torch's arithmetic with it happens in the tensor's dtype.
        """
        values: dict[str, Any] = {}
        for key in self.hyperparameter_keys:
            if key == "betas":
                values["beta1"], values["beta2"] = (squeeze_scalar(beta) for beta in group["betas"])
            else:
                values[key] = squeeze_scalar(group[key])
        return values

    def _init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """The state of a parameter at its first step, keyed as torch keys it."""
        raise NotImplementedError

    def _prepare(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """Initialise state lazily, count the step, return the per-parameter arguments of ``update``.

        Values returned as 0-d tensors are converted by the strategy (a Python number in the loop, as
        torch does; a tensor where a compiled kernel must not specialise on them).
        """
        state = self.state[param]
        if len(state) == 0:
            state.update(self._init_state(param, group))
        if "step" not in state:
            return {}
        state["step"] += 1
        return {"step": state["step"]}

    def _check_grad(self, param: Tensor) -> None:
        """Raise torch's error for a gradient this algorithm refuses (sparse ones, unless it takes them)."""
        if param.grad.is_sparse and self.sparse_error is not None:
            raise RuntimeError(self.sparse_error)

    def _check_inputs(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Check the params a step will update, before it changes anything.

        Besides the gradients, each state tensor must still have its parameter's dtype and device. After
        ``model.to(dtype or device)`` it does not: torch's for-loop then fails halfway through a step (or,
        for some algorithms and dtypes, silently mixes precisions); every scratchopt strategy raises here
        instead, and ``optimizer.load_state_dict(optimizer.state_dict())`` casts the state like the params.
        """
        for index, param in enumerate(params):
            self._check_grad(param)
            state = self.state.get(param)
            if not state:
                continue
            for key in self.state_keys:
                value = state.get(key)
                if isinstance(value, Tensor) and (value.dtype != param.dtype or value.device != param.device):
                    raise RuntimeError(
                        f"{type(self).__name__}: state[{key!r}] of parameter {index} with a gradient is "
                        f"{value.dtype} on {value.device}, but the parameter is {param.dtype} on "
                        f"{param.device}; was the model moved with .to() after the first step? "
                        "optimizer.load_state_dict(optimizer.state_dict()) casts the state like the parameters"
                    )

    def _apply_updates(self) -> None:
        """Update every group with the strategy ``self.impl`` (under ``torch.no_grad()``)."""
        with torch.no_grad():
            for group in self.param_groups:
                strategies.run(self.impl, self, group)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step; with a closure, re-evaluate the loss first and return it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._apply_updates()
        return loss

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["impl"] = self.impl
        return state
