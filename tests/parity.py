"""Shared machinery for comparing a scratchopt optimizer with its torch.optim twin, step by step."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.testing._internal.common_optimizers import optim_db

import scratchopt
from scratchopt.algorithms import torch_twins
from scratchopt.testing import grad_like as _like
from scratchopt.testing import gradients, hard_groups, hard_matrices, hard_params

_OPTIM_DB = {info.optim_cls.__name__: info for info in optim_db}

#: Every torch.optim twin scratchopt implements, by class name (from the registry's declarations).
ALGORITHMS = list(torch_twins())
#: Algorithms whose torch class accepts sparse gradients, from optim_db's own flags (LBFGS densifies
#: them; SparseAdam takes no other).
SPARSE_ALGORITHMS = {
    name for name in ALGORITHMS if _OPTIM_DB[name].supports_sparse or _OPTIM_DB[name].only_supports_sparse_grads
}


def gradients_every_step(params: list[torch.Tensor], step: int) -> list[torch.Tensor | None]:
    """A gradient for every trainable param at every step: where a reference package counts t per param
    group, its t is then every param's t (``run_side_by_side`` takes them by monkeypatching
    ``gradients``)."""
    gen = torch.Generator().manual_seed(1000 + step)
    return [
        _like(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) + 0.1 * p.detach(), p)
        if p.requires_grad
        else None
        for p in params
    ]


def implemented() -> list[str]:
    return ALGORITHMS


def optim_db_info(name: str) -> Any:
    return _OPTIM_DB[name]


def harness_skip_reason(name: str) -> str | None:
    """Why the hard-parameter harness (dense gradients, two param groups, ``step()`` without a closure)
    cannot drive this algorithm, from optim_db's own flags; None where it can."""
    info = _OPTIM_DB[name]
    if info.only_supports_sparse_grads:
        return f"{name} takes sparse gradients only: tests/test_sparse_adam.py runs its optim_db configurations"
    if info.step_requires_closure or not info.supports_param_groups:
        return f"{name} needs a closure and one param group: tests/test_lbfgs.py runs its optim_db configurations"
    return None


def complex_skip_reason(name: str) -> str | None:
    """Why complex parameters are not compared (torch's class refuses them); None where they are."""
    if not _OPTIM_DB[name].supports_complex:
        return f"torch.optim.{name} does not support complex parameters (checked by the optim_db error inputs)"
    return None


def torch_loop_kwargs(name: str) -> dict[str, Any]:
    """What selects torch's for-loop: ``foreach=False`` where the class has the flag (the others only loop)."""
    takes_foreach = "foreach" in inspect.signature(getattr(torch.optim, name)).parameters
    return {"foreach": False} if takes_foreach else {}


def as_accepted_grad(name: str, grad: torch.Tensor) -> torch.Tensor:
    """The gradient in the layout the algorithm takes: sparse for one that takes sparse gradients only."""
    return grad.to_sparse() if _OPTIM_DB[name].only_supports_sparse_grads else grad


def small_model(name: str, in_features: int, out_features: int) -> torch.nn.Module:
    """A Linear layer; for an algorithm that takes matrices only (Muon), two bias-free ones."""
    if getattr(scratchopt, name).takes == "matrices":
        return torch.nn.Sequential(
            torch.nn.Linear(in_features, 4, bias=False), torch.nn.Linear(4, out_features, bias=False)
        )
    return torch.nn.Linear(in_features, out_features)


#: Branches optim_db's configurations never reach within a test's ten steps, added as configurations.
EXTRA_CONFIGS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "Adam": [("tensor betas", {"betas": (torch.tensor(0.8), torch.tensor(0.95)), "amsgrad": True})],
    "AdamW": [("tensor betas", {"betas": (torch.tensor(0.8), torch.tensor(0.95)), "amsgrad": True})],
    # averaging starts after t0 steps (optim_db's smallest t0 is 100)
    "ASGD": [("averaging from step 3", {"t0": 3, "lambd": 0.1, "alpha": 0.5})],
    # step sizes that hit both clamps
    "Rprop": [("tight step_sizes", {"lr": 0.05, "step_sizes": (0.02, 0.08)})],
    # an explicit ε₁ (optim_db leaves it None)
    "Adafactor": [("explicit eps1", {"eps": (1e-2, 1e-3), "lr": 0.05})],
    "Muon": [("no nesterov", {"nesterov": False}), ("match_rms_adamw", {"adjust_lr_fn": "match_rms_adamw"})],
}


def optim_db_configs(name: str, dtype: torch.dtype = torch.float32) -> list[tuple[str, dict[str, Any]]]:
    """torch's own test configurations for the algorithm on the CPU, plus a tensor lr for every one and
    the ``EXTRA_CONFIGS``."""
    info = _OPTIM_DB[name]
    configs = [(inp.desc, dict(inp.kwargs)) for inp in info.optim_inputs_func(device="cpu", dtype=dtype)]
    if not any(isinstance(kwargs.get("lr"), torch.Tensor) for _, kwargs in configs):
        configs.append(("tensor lr", {"lr": torch.tensor(0.01)}))
    return configs + EXTRA_CONFIGS.get(name, [])


def cpu_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop the flags that pick torch's implementation: torch runs its for-loop, ours runs ``impl``."""
    return {k: v for k, v in kwargs.items() if k not in ("foreach", "fused", "capturable", "differentiable")}


def params_for(name: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """The hard parameter set this algorithm accepts (matrices for one that takes matrices only)."""
    return hard_matrices(dtype) if getattr(scratchopt, name).takes == "matrices" else hard_params(dtype)


def assert_same(actual: Any, expected: Any, what: str, *, exact: bool = True, atol: float = 0, rtol: float = 0) -> None:
    """Equal values of the same type; tensors bit for bit (or within tolerance), lists item by item."""
    if isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected), f"{what}: {type(actual).__name__} != {type(expected).__name__}"
        assert len(actual) == len(expected), f"{what}: length {len(actual)} != {len(expected)}"
        for index, (a, b) in enumerate(zip(actual, expected)):
            assert_same(a, b, f"{what}[{index}]", exact=exact, atol=atol, rtol=rtol)
        return
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{what}: expected a tensor, got {type(actual)}"
        assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
        assert actual.device == expected.device, f"{what}: device {actual.device} != {expected.device}"
        if exact:
            torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")
        else:
            torch.testing.assert_close(
                actual, expected, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}"
            )
    else:
        assert type(actual) is type(expected), f"{what}: {type(actual).__name__} != {type(expected).__name__}"
        assert actual == expected, f"{what}: {actual!r} != {expected!r}"


def assert_optimizers_equal(
    ours: torch.optim.Optimizer,
    theirs: torch.optim.Optimizer,
    ours_params: list[torch.Tensor],
    their_params: list[torch.Tensor],
    what: str,
    ours_only: tuple[str, ...] = (),
    **tolerance: Any,
) -> None:
    """Equal params and state; ``ours_only``: state keys the other keeps elsewhere (a per-group count)."""
    for index, (a, b) in enumerate(zip(ours_params, their_params)):
        assert_same(a.detach(), b.detach(), f"{what}: param {index}", **tolerance)
        state_a = {k: v for k, v in ours.state.get(a, {}).items() if k not in ours_only}
        state_b = theirs.state.get(b, {})
        assert set(state_a) == set(state_b), f"{what}: param {index} state keys {set(state_a)} != {set(state_b)}"
        for key in state_b:
            assert_same(state_a[key], state_b[key], f"{what}: param {index} state[{key!r}]", **tolerance)


def run_side_by_side(
    name: str,
    kwargs: dict[str, Any],
    dtype: torch.dtype,
    steps: int = 10,
    make_params: Callable[[torch.dtype], list[torch.Tensor]] | None = None,
    ours_kwargs: dict[str, Any] | None = None,
    check_every_step: bool = True,
    reference: Callable[..., torch.optim.Optimizer] | None = None,
    schedule: bool = False,
    ours_only: tuple[str, ...] = (),
    **tolerance: Any,
) -> tuple[Any, Any, list[torch.Tensor], list[torch.Tensor]]:
    """Run ours and torch's for-loop (or ``reference``, a reference package's class, called with the same
    arguments) on identical params and gradients; compare after every step. ``schedule``: a StepLR
    halves every group's lr every two steps in both."""
    theirs_params = make_params(dtype) if make_params is not None else params_for(name, dtype)
    ours_params = [p.detach().clone().requires_grad_(p.requires_grad) for p in theirs_params]
    if reference is None:
        theirs = getattr(torch.optim, name)(
            hard_groups(theirs_params), **cpu_kwargs(copy.deepcopy(kwargs)), **torch_loop_kwargs(name)
        )
    else:
        theirs = reference(hard_groups(theirs_params), **copy.deepcopy(kwargs))
    ours = getattr(scratchopt, name)(
        hard_groups(ours_params), **cpu_kwargs(copy.deepcopy(kwargs)), **(ours_kwargs or {})
    )
    schedulers = (
        [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (theirs, ours)] if schedule else []
    )
    for step in range(steps):
        for p_ours, p_theirs, grad in zip(ours_params, theirs_params, gradients(theirs_params, step)):
            p_theirs.grad = None if grad is None else grad.clone()
            p_ours.grad = None if grad is None else _like(grad, p_ours)
        theirs.step()
        ours.step()
        for scheduler in schedulers:
            scheduler.step()
        if check_every_step or step == steps - 1:
            assert_optimizers_equal(
                ours, theirs, ours_params, theirs_params, f"{name} step {step}", ours_only, **tolerance
            )
    return ours, theirs, ours_params, theirs_params
