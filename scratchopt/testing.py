"""A test kit for optimizers written with :class:`scratchopt.ScratchOptimizer`, scratchopt's own included.

:func:`check_optimizer` is the whole proof in one call::

    from scratchopt.testing import check_optimizer

    check_optimizer(MyOptimizer, {"lr": 0.01}, reference=my_reference_step)

It runs the optimizer under every strategy that applies to it beside ``impl="loop"`` (the ground truth)
on the *hard parameter set* — a matrix, a 0-d param, a non-contiguous (transposed) param, a param
without a gradient on some steps and a frozen one, in two param groups whose second overrides ``lr``
and ``weight_decay`` — and compares the params and every state tensor after the run: bit for bit for
``foreach``, within a few ulp for ``compiled`` and ``fused``. It then checks a state_dict
round trip (k steps, save, load into a new optimizer, continue: equal to an uninterrupted run), a
learning-rate scheduler, and, when given, a reference step written straight from the paper's equations.

Each check raises :class:`AssertionError` saying which check, which strategy, which param and by how much.
The pieces (:func:`hard_params`, :func:`gradients`, :func:`assert_same_state` …) are public too.
"""

from __future__ import annotations

import copy
import functools
import io
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from scratchopt.strategies import STRATEGIES, approximate_names, exact_names
from scratchopt.strategies.kernels import cache, native

#: Strategies that must equal the loop bit for bit, and those allowed a few ulp (compiled kernels), as
#: each declares in the registry (:data:`scratchopt.strategies.STRATEGIES`).
EXACT_IMPLS: tuple[str, ...] = exact_names()
COMPILED_IMPLS: tuple[str, ...] = approximate_names()
#: The largest tolerance a strategy declares, in units in the last place of the compared values.
FEW_ULP = max(strategy.ulp for strategy in STRATEGIES.values())


def kernel_calls() -> int:
    """Calls of compiled and native kernels so far in this process."""
    return cache.CALLS[0] + native.LAUNCHES[0]


def is_exact(impl: str) -> bool:
    """The strategy named ``impl`` declares itself bit-exact with the loop."""
    return STRATEGIES[impl].exact


#: ``reference(param, grad, state, **hyperparameters)``: one step of the algorithm on one tensor, in place;
#: ``state`` is a dict the reference keeps for that tensor between steps.
ReferenceStep = Callable[..., None]


def hard_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[Tensor]:
    """A matrix, a 0-d param, a non-contiguous view, a bias (no gradient on some steps), a frozen param."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        if dtype.is_complex:
            real_dtype = torch.float64 if dtype == torch.complex128 else torch.float32
            return torch.complex(
                torch.randn(shape, generator=gen, dtype=real_dtype), torch.randn(shape, generator=gen, dtype=real_dtype)
            )
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    params = [rand(5, 4), rand(), rand(6, 3).t(), rand(4), rand(3)]
    return [p.detach().requires_grad_(index != 4) for index, p in enumerate(params)]


def hard_matrices(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[Tensor]:
    """The hard parameter set for an algorithm that takes matrices only (Muon): tall, wide, a
    non-contiguous (transposed) one, one that gets no gradient on some steps (index 3), a frozen one."""
    gen = torch.Generator().manual_seed(seed)
    shapes = ((5, 4), (3, 6), (6, 3), (2, 4), (3, 3))
    params = [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in shapes]
    params[2] = params[2].t()
    params = [p.detach().requires_grad_(i != 4) for i, p in enumerate(params)]
    assert not params[2].is_contiguous()
    return params


def hard_params_for(cls: type[Any]) -> Callable[[torch.dtype], list[Tensor]]:
    """The hard parameter set an algorithm accepts: :func:`hard_matrices` for one that declares
    ``takes = "matrices"``, :func:`hard_params` otherwise."""
    return hard_matrices if getattr(cls, "takes", "any") == "matrices" else hard_params


def hard_groups(params: list[Tensor]) -> list[dict[str, Any]]:
    """Two groups; the second overrides ``lr`` and ``weight_decay``."""
    return [{"params": params[:3]}, {"params": params[3:], "lr": 0.37, "weight_decay": 0.05}]


def grad_like(values: Tensor, param: Tensor) -> Tensor:
    """A gradient laid out like the param (autograd gives a non-contiguous param a matching grad)."""
    out = torch.empty_like(param, memory_format=torch.preserve_format)
    out.copy_(values)
    return out


def gradients(params: list[Tensor], step: int, seed: int = 1) -> list[Tensor | None]:
    """Deterministic gradients for ``step``: None for a frozen param and for param 3 every third step."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    grads: list[Tensor | None] = []
    for index, p in enumerate(params):
        if not p.requires_grad or (index == 3 and step % 3 == 1):
            grads.append(None)
            continue
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if p.is_complex():
            noise = torch.complex(noise, torch.randn(p.shape, generator=gen, dtype=torch.float64))
        grads.append(grad_like(noise.to(p.dtype) + 0.1 * p.detach(), p))
    return grads


def saved_and_loaded(obj: Any) -> Any:
    """``obj`` through ``torch.save`` and ``torch.load(weights_only=True)``, as a checkpoint takes it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def copy_params(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]


def ulp_distance(actual: Tensor, expected: Tensor) -> int:
    """The largest distance in units in the last place between two float tensors (0 when equal)."""
    if actual.numel() == 0:
        return 0
    if actual.is_complex():
        return ulp_distance(torch.view_as_real(actual), torch.view_as_real(expected))
    int_dtype, width = {
        torch.float32: (torch.int32, 32),
        torch.float64: (torch.int64, 64),
        torch.float16: (torch.int16, 16),
        torch.bfloat16: (torch.int16, 16),
    }[actual.dtype]
    a = actual.detach().contiguous().view(int_dtype).to(torch.int64)
    b = expected.detach().contiguous().view(int_dtype).to(torch.int64)
    magnitude = (1 << (width - 1)) - 1
    a = torch.where(a < 0, -(a & magnitude), a)
    b = torch.where(b < 0, -(b & magnitude), b)
    return int((a - b).abs().max())


def assert_close(actual: Tensor, expected: Tensor, what: str, exact: bool = True) -> None:
    """Bit-for-bit equal, or (``exact=False``) within :data:`FEW_ULP` ulp of the larger of 1 and the
    largest value."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
        f"{what}: {actual.dtype} {tuple(actual.shape)} != {expected.dtype} {tuple(expected.shape)}"
    )
    if exact:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")
        return
    real = expected.real if expected.is_complex() else expected
    eps = torch.finfo(real.dtype).eps
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual,
        expected,
        rtol=FEW_ULP * eps,
        atol=FEW_ULP * eps * scale,
        equal_nan=True,
        msg=lambda m: f"{what} ({ulp_distance(actual, expected)} ulp): {m}",
    )


def assert_same_state(
    ours: torch.optim.Optimizer,
    reference: torch.optim.Optimizer,
    ours_params: Sequence[Tensor],
    reference_params: Sequence[Tensor],
    what: str,
    exact: bool = True,
) -> None:
    """Equal params, and equal state (same keys, every tensor) for each pair of params."""
    for index, (a, b) in enumerate(zip(ours_params, reference_params)):
        assert_close(a.detach(), b.detach(), f"{what}: param {index}", exact)
        state_a, state_b = ours.state.get(a, {}), reference.state.get(b, {})
        assert set(state_a) == set(state_b), f"{what}: param {index} state keys {set(state_a)} != {set(state_b)}"
        for key, value in state_b.items():
            if isinstance(value, Tensor):
                assert_close(state_a[key], value, f"{what}: param {index} state[{key!r}]", exact)
            else:
                assert state_a[key] == value, f"{what}: param {index} state[{key!r}] {state_a[key]!r} != {value!r}"


def set_gradients(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    for p, grad in zip(params, grads):
        p.grad = None if grad is None else grad_like(grad, p)


def compare_with_loop(
    cls: type[Any],
    kwargs: dict[str, Any],
    impl: str,
    dtype: torch.dtype = torch.float32,
    steps: int = 20,
    make_params: Callable[[torch.dtype], list[Tensor]] = hard_params,
    make_groups: Callable[[list[Tensor]], Any] = hard_groups,
    exact: bool | None = None,
) -> None:
    """``cls(..., impl=impl)`` beside ``cls(...)`` (the loop) for ``steps`` steps on the same gradients."""
    exact = is_exact(impl) if exact is None else exact
    loop_params = make_params(dtype)
    ours_params = copy_params(loop_params)
    loop = cls(make_groups(loop_params), **copy.deepcopy(kwargs))
    ours = cls(make_groups(ours_params), **copy.deepcopy(kwargs), impl=impl)
    for step in range(steps):
        grads = gradients(loop_params, step)
        set_gradients(loop_params, grads)
        set_gradients(ours_params, grads)
        loop.step()
        ours.step()
    assert_same_state(ours, loop, ours_params, loop_params, f"{cls.__name__} impl={impl!r} {dtype}", exact)


def check_state_dict_round_trip(
    cls: type[Any],
    kwargs: dict[str, Any],
    impl: str = "loop",
    dtype: torch.dtype = torch.float32,
    steps: int = 8,
    make_params: Callable[[torch.dtype], list[Tensor]] = hard_params,
) -> None:
    """k steps, ``state_dict()`` saved and loaded into a new optimizer (on copies of the params), k more
    steps there: equal to an uninterrupted run.

    In float32 by default: torch's ``load_state_dict`` casts 0-d float state (ASGD's ``eta``, NAdam's
    ``mu_product``, kept in float32) to a float64 param's dtype, so a float64 run resumed in torch itself
    differs from an uninterrupted one."""
    params = make_params(dtype)
    uninterrupted_params = copy_params(params)
    uninterrupted = cls(hard_groups(uninterrupted_params), **copy.deepcopy(kwargs), impl=impl)
    first = cls(hard_groups(params), **copy.deepcopy(kwargs), impl=impl)
    resumed_params = None
    resumed = None
    for step in range(steps):
        grads = gradients(params, step)
        set_gradients(uninterrupted_params, grads)
        uninterrupted.step()
        if step < steps // 2:
            set_gradients(params, grads)
            first.step()
            continue
        if resumed is None:
            resumed_params = copy_params(params)
            resumed = cls(hard_groups(resumed_params), **copy.deepcopy(kwargs), impl=impl)
            resumed.load_state_dict(copy.deepcopy(first.state_dict()))
        assert resumed_params is not None
        set_gradients(resumed_params, grads)
        resumed.step()
    assert resumed is not None and resumed_params is not None
    assert_same_state(
        resumed,
        uninterrupted,
        resumed_params,
        uninterrupted_params,
        f"{cls.__name__} impl={impl!r} resumed from a state_dict",
        exact=is_exact(impl),
    )


def check_scheduler(
    cls: type[Any],
    kwargs: dict[str, Any],
    impl: str = "loop",
    steps: int = 8,
    make_params: Callable[[torch.dtype], list[Tensor]] = hard_params,
) -> None:
    """A ``StepLR`` halves ``lr`` every other step. The same run with ``lr`` set by hand in
    ``param_groups`` must give the same params, and a run at a constant ``lr`` other params: the
    optimizer reads its groups afresh at every step."""
    results = {}
    for mode in ("scheduler", "by hand", "constant"):
        params = make_params(torch.float64)
        optimizer = cls(hard_groups(params), **copy.deepcopy(kwargs), impl=impl)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5) if mode == "scheduler" else None
        initial = [group["lr"] for group in optimizer.param_groups]
        for step in range(steps):
            if mode == "by hand":
                for group, lr in zip(optimizer.param_groups, initial):
                    group["lr"] = lr * 0.5 ** (step // 2)
            set_gradients(params, gradients(params, step))
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        results[mode] = params
    for index, (a, b) in enumerate(zip(results["scheduler"], results["by hand"])):
        assert_close(
            a.detach(), b.detach(), f"{cls.__name__} impl={impl!r} under StepLR: param {index}", exact=is_exact(impl)
        )
    if "lr" not in getattr(cls, "hyperparameter_keys", ("lr",)):
        return  # lr is read only when the state starts (Rprop's initial step size): a schedule has no effect
    assert any(not torch.equal(a, b) for a, b in zip(results["scheduler"], results["constant"])), (
        f"{cls.__name__} impl={impl!r} under StepLR: the scheduler changed nothing (is lr read from param_groups?)"
    )


def check_reference(
    cls: type[Any],
    kwargs: dict[str, Any],
    reference: ReferenceStep,
    dtype: torch.dtype = torch.float64,
    steps: int = 10,
    rtol: float = 1e-12,
    atol: float = 1e-12,
    make_params: Callable[[torch.dtype], list[Tensor]] = hard_params,
) -> None:
    """The optimizer against ``reference``, a step written straight from the paper's equations, run
    per tensor as ``reference(param, grad, state, **group)`` with every key of the param's group but
    ``params`` (a param without a gradient is skipped, as torch does)."""
    params = make_params(dtype)
    reference_params = [p.detach().clone() for p in params]
    optimizer = cls(hard_groups(params), **copy.deepcopy(kwargs))
    reference_states: list[dict[str, Any]] = [{} for _ in params]
    for step in range(steps):
        grads = gradients(params, step)
        set_gradients(params, grads)
        optimizer.step()
        for group in optimizer.param_groups:
            hyperparameters = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                index = next(i for i, q in enumerate(params) if q is p)
                grad = grads[index]
                if grad is not None:
                    reference(reference_params[index], grad.clone(), reference_states[index], **hyperparameters)
    for index, (p, expected) in enumerate(zip(params, reference_params)):
        what = f"{cls.__name__} against the reference: param {index}"
        torch.testing.assert_close(p.detach(), expected, rtol=rtol, atol=atol, msg=functools.partial(_prefixed, what))


def _prefixed(what: str, message: str) -> str:
    return f"{what}: {message}"


def check_optimizer(
    cls: type[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    reference: ReferenceStep | None = None,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
    impls: Sequence[str] | None = None,
    steps: int = 20,
    make_params: Callable[[torch.dtype], list[Tensor]] | None = None,
) -> list[str]:
    """Every check above for ``cls(params, **kwargs)``; returns the names of the checks that ran, each
    strategy comparison saying whether a compiled or native kernel ran in it (``compiled`` runs tensors
    below ``MIN_KERNEL_NUMEL`` elements eagerly; ``fused`` runs its native kernel at every size).

    ``impls`` defaults to every strategy when ``cls.elementwise`` is true (then each must match the
    loop), and to the loop alone otherwise (the other strategies then refuse it with a ValueError, which
    is checked too). ``make_params(dtype)`` replaces the hard parameter set
    (five params: the fourth misses some gradients, the fifth is frozen); by default it is the one the
    class's ``takes`` declaration accepts (:func:`hard_params_for`).
    """
    kwargs = dict(kwargs or {})
    make_params = hard_params_for(cls) if make_params is None else make_params
    if impls is None:
        impls = EXACT_IMPLS + COMPILED_IMPLS if cls.elementwise else ()
    ran = []
    probe = [torch.zeros(2, 2, requires_grad=True)]
    for impl in EXACT_IMPLS + COMPILED_IMPLS:
        if not cls.elementwise:  # it runs only the loop, and says so rather than run it silently
            try:
                cls(probe, **copy.deepcopy(kwargs), impl=impl)
            except ValueError:
                continue
            raise AssertionError(f"{cls.__name__}(impl={impl!r}) constructed, but it runs only the loop")
        actual = cls(probe, **copy.deepcopy(kwargs), impl=impl).impl
        assert actual == impl, f"{cls.__name__}(impl={impl!r}).impl is {actual!r}, but {impl!r} runs"
    for impl in impls:
        for dtype in dtypes:
            before = kernel_calls()
            compare_with_loop(cls, kwargs, impl, dtype, steps, make_params=make_params)
            reached = "a kernel ran" if kernel_calls() > before else "no kernel ran: the eager update"
            ran.append(f"{impl} == loop ({dtype}; {reached})")
    for impl in ("loop", *impls):
        check_state_dict_round_trip(cls, kwargs, impl, make_params=make_params)
        check_scheduler(cls, kwargs, impl, make_params=make_params)
        ran += [f"state_dict round trip ({impl})", f"scheduler ({impl})"]
    if reference is not None:
        check_reference(cls, kwargs, reference, make_params=make_params)
        ran.append("reference")
    return ran
