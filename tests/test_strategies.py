"""Every execution strategy against ``impl="loop"`` (itself bit-for-bit torch's for-loop).

Which strategies are bit-exact with the loop on this CPU, and why:

* ``foreach`` — bit-exact: torch's CPU foreach ops run the single-tensor kernels tensor by tensor.
* ``compiled`` and ``fused`` — a few ulp: the generated kernel reproduces ATen's operation order and its
  FMAs, but ATen's float32 ``sqrt`` is Sleef's (within 0.5001 ulp, so not always correctly rounded) while
  Inductor's is the exact instruction, and one-ulp differences then travel through later steps. On the
  hard parameter set they stay within 4 ulp over 20 steps; ``FEW_ULP`` allows 8.

Inductor's compiles dominate the run time (about 1.5 s per generated kernel on 2 cores, after a one-off
~18 s in a process with a cold Inductor cache), so ``compiled`` is checked on a subset of configurations:
each algorithm's default in float32 and float64, its richest optim_db configuration (plus tensor lr and
tensor betas for Adam) in float32. ``foreach`` and ``fused`` (whose native kernels compile in a fraction
of a second, once per machine) run every configuration in both dtypes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from parity import (
    cpu_kwargs,
    gradients,
    hard_groups,
    hard_params,
    implemented,
    optim_db_configs,
)
from torch import nn

import scratchopt
from scratchopt.strategies.kernels import cache as _compiled
from scratchopt.testing import (
    COMPILED_IMPLS,
    EXACT_IMPLS,
    assert_close,
    assert_same_state,
    compare_with_loop,
    set_gradients,
)

# Small test tensors must reach the compiled kernels (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("kernels_at_every_size")

#: The strategies differ only for elementwise algorithms; the others run the loop under every impl
#: (test_non_elementwise_algorithms_run_the_loop).
ALGORITHMS = [name for name in implemented() if getattr(scratchopt, name).elementwise]
EXACT = EXACT_IMPLS
COMPILED = COMPILED_IMPLS
DTYPES = (torch.float32, torch.float64)


def _side_by_side(
    name: str,
    kwargs: dict,
    dtype: torch.dtype,
    impl: str,
    steps: int = 20,
    make_params=hard_params,
    make_groups=hard_groups,
    exact: bool = True,
) -> None:
    compare_with_loop(
        getattr(scratchopt, name),
        cpu_kwargs(kwargs),
        impl,
        dtype,
        steps,
        make_params=make_params,
        make_groups=make_groups,
        exact=exact,
    )


# ---------------------------------------------------------------------------------------------------
# The core comparison: 20 steps on the hard parameter set, float32 and float64
# ---------------------------------------------------------------------------------------------------


def test_every_algorithm_declares_whether_it_is_elementwise():
    """Each algorithm says it, rather than inheriting the base class's safe default by omission."""
    from scratchopt.optimizer import ScratchOptimizer

    for name in implemented():
        declared = [c for c in getattr(scratchopt, name).__mro__ if "elementwise" in vars(c)]
        assert declared[0] is not ScratchOptimizer, f"{name} does not declare elementwise"


def _exact_cases() -> list:
    return [
        pytest.param(name, desc, kwargs, impl, dtype, id=f"{name}-{desc}-{impl}-{str(dtype)[6:]}")
        for name in ALGORITHMS
        for desc, kwargs in optim_db_configs(name)
        for impl in EXACT
        for dtype in DTYPES
    ]


@pytest.mark.parametrize("name,desc,kwargs,impl,dtype", _exact_cases())
def test_the_exact_strategies_are_bit_exact_with_loop(name, desc, kwargs, impl, dtype):
    _side_by_side(name, kwargs, dtype, impl, exact=True)


def _compiled_configs(name: str) -> list[tuple[str, dict]]:
    configs = optim_db_configs(name)
    chosen = [configs[0], max(configs[1:], key=lambda c: len(c[1]))] if len(configs) > 1 else configs
    if name == "Adam":
        chosen += [c for c in configs if c[0] in ("tensor lr", "tensor betas")]
    unique = {c[0]: c for c in chosen}
    return list(unique.values())


#: Algorithms whose defaults ``compiled`` also checks in float64 (each case is a new Inductor compile;
#: between them they use every kind of operation the others do: the moments' products and square roots,
#: a momentum buffer, an accumulated square).
_COMPILED_FLOAT64 = ("AdamW", "SGD", "Adagrad", "RAdam", "Rprop")


def _compiled_cases() -> list:
    """``compiled``: defaults in float32 (and in float64 for :data:`_COMPILED_FLOAT64`), the other chosen
    configurations in float32; ``fused``: every optim_db configuration in float32, and in float64 the
    defaults and the configuration that sets the most arguments (a float64 kernel differs from the float32
    one only in its arithmetic type)."""
    return [
        pytest.param(name, desc, kwargs, impl, dtype, id=f"{name}-{desc}-{impl}-{str(dtype)[6:]}")
        for name in ALGORITHMS
        for impl in COMPILED
        for index, (desc, kwargs) in enumerate(optim_db_configs(name) if impl == "fused" else _compiled_configs(name))
        for dtype in (
            DTYPES
            if (index == 0 and (impl == "fused" or name in _COMPILED_FLOAT64))
            or (impl == "fused" and desc in {d for d, _ in _compiled_configs(name)})
            else DTYPES[:1]
        )
    ]


@pytest.mark.parametrize("name,desc,kwargs,impl,dtype", _compiled_cases())
def test_compiled_and_fused_are_within_a_few_ulp_of_loop(name, desc, kwargs, impl, dtype):
    _side_by_side(name, kwargs, dtype, impl, exact=False)


# ---------------------------------------------------------------------------------------------------
# Per-tensor scalars that differ inside one list (a param that skipped steps)
# ---------------------------------------------------------------------------------------------------


def _staggered_params(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [
        torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        for shape in ((4, 3), (5,), (2, 2), ())
    ]


def _staggered_run(name: str, impl: str, dtype: torch.dtype, steps: int = 12, exact: bool = True) -> None:
    """Param 1 has no gradient on steps 0–3 and param 2 none on steps 0–6: three step counts in a group."""
    loop_params = _staggered_params(dtype)
    ours_params = [p.detach().clone().requires_grad_() for p in loop_params]
    cls = getattr(scratchopt, name)
    loop, ours = cls(loop_params), cls(ours_params, impl=impl)
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        for index, (a, b) in enumerate(zip(loop_params, ours_params)):
            skip = (index == 1 and step < 4) or (index == 2 and step < 7)
            grad = None if skip else torch.randn(a.shape, generator=gen, dtype=torch.float64).to(dtype)
            a.grad = grad
            b.grad = None if grad is None else grad.clone()
        loop.step()
        ours.step()
    assert_same_state(ours, loop, ours_params, loop_params, f"{name} staggered impl={impl}", exact)


@pytest.mark.parametrize("impl", EXACT)
@pytest.mark.parametrize("name", ALGORITHMS)
def test_params_with_different_step_counts_in_one_list(name, impl):
    _staggered_run(name, impl, torch.float64)


def test_radam_branch_on_ragged_step_splits_the_list():
    """RAdam branches on ρₜ > 5, a function of the step: params at steps 4 and 8 go in different lists."""
    _staggered_run("RAdam", "foreach", torch.float64, steps=9)


# ---------------------------------------------------------------------------------------------------
# 0-d params in every dtype (Inductor was seen to drop in-place updates of 0-d float64 inputs)
# ---------------------------------------------------------------------------------------------------

ZERO_D_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)


@pytest.mark.parametrize("impl", EXACT + COMPILED)
@pytest.mark.parametrize("name,kwargs", [("Adam", {"lr": 0.1}), ("SGD", {"lr": 0.1, "momentum": 0.9})])
def test_zero_dim_params_in_every_dtype(name, kwargs, impl):
    for dtype in ZERO_D_DTYPES:
        gen = torch.Generator().manual_seed(7)
        values = [torch.randn((), generator=gen, dtype=torch.float64) for _ in range(3)]
        loop_params = [v.to(dtype).clone().requires_grad_() for v in values]
        ours_params = [p.detach().clone().requires_grad_() for p in loop_params]
        cls = getattr(scratchopt, name)
        loop, ours = cls(loop_params, **kwargs), cls(ours_params, **kwargs, impl=impl)
        for _ in range(5):
            for a, b in zip(loop_params, ours_params):
                grad = torch.randn((), generator=gen, dtype=torch.float64).to(dtype)
                a.grad, b.grad = grad, grad.clone()
            loop.step()
            ours.step()
        exact = impl in EXACT or dtype in (torch.complex64, torch.complex128)
        if not exact and dtype in (torch.float16, torch.bfloat16):
            # The compiled kernel keeps float32 intermediates where eager rounds every op to 16 bits.
            for a, b in zip(ours_params, loop_params):
                torch.testing.assert_close(a.detach(), b.detach(), rtol=4 * torch.finfo(dtype).eps, atol=1e-3)
            moved = [not torch.equal(a.detach(), v.to(dtype)) for a, v in zip(ours_params, values)]
            assert all(moved), f"{name} impl={impl} {dtype}: a 0-d param was not updated"
            continue
        assert_same_state(ours, loop, ours_params, loop_params, f"{name} impl={impl} 0-d {dtype}", exact)
        assert all(not torch.equal(a.detach(), v.to(dtype)) for a, v in zip(ours_params, values)), (
            f"{name} impl={impl} {dtype}: a 0-d param was not updated"
        )


# ---------------------------------------------------------------------------------------------------
# Complex params and sparse gradients fall back to per-tensor where needed
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", EXACT + COMPILED)
@pytest.mark.parametrize("name", ["Adam", "RMSprop"])
def test_complex_params(name, impl):
    _side_by_side(name, {"weight_decay": 0.1}, torch.complex64, impl, steps=6, exact=True)


@pytest.mark.parametrize("impl", EXACT + COMPILED)
@pytest.mark.parametrize(
    "name,kwargs", [("SGD", {"lr": 0.1}), ("SGD", {"lr": 0.1, "momentum": 0.9}), ("Adagrad", {"lr": 0.1})]
)
def test_sparse_gradients_run_per_tensor(name, kwargs, impl):
    dense_loop = torch.randn(4, dtype=torch.float64, requires_grad=True)
    dense_ours = dense_loop.detach().clone().requires_grad_()
    table = torch.randn(6, 3, dtype=torch.float64)
    loop_params = [table.clone().requires_grad_(), dense_loop]
    ours_params = [table.clone().requires_grad_(), dense_ours]
    cls = getattr(scratchopt, name)
    loop, ours = cls(loop_params, **kwargs), cls(ours_params, **kwargs, impl=impl)
    for step in range(4):
        gen = torch.Generator().manual_seed(step)
        indices = torch.randint(0, 6, (1, 4), generator=gen)
        values = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        dense = torch.randn(4, generator=gen, dtype=torch.float64)
        for params in (loop_params, ours_params):
            params[0].grad = torch.sparse_coo_tensor(indices, values, (6, 3))
            params[1].grad = dense.clone()
        loop.step()
        ours.step()
    for a, b in zip(ours_params, loop_params):
        assert_close(a.detach(), b.detach(), f"{name} sparse impl={impl}", exact=impl in EXACT)


# ---------------------------------------------------------------------------------------------------
# Scheduled hyperparameters do not recompile
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", COMPILED)
def test_fifty_scheduled_steps_without_a_recompile(impl):
    """OneCycleLR changes lr and beta1 at every step; the bias corrections change with the step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    reference = copy.deepcopy(model)
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    ours = scratchopt.AdamW(model.parameters(), lr=0.01, impl=impl)
    loop = scratchopt.AdamW(reference.parameters(), lr=0.01)
    schedulers = [torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=60) for opt in (ours, loop)]

    def train_step(net, opt):
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()

    for _ in range(2):  # warm-up: every kernel this run needs is compiled here
        train_step(model, ours)
        train_step(reference, loop)
        for scheduler in schedulers:
            scheduler.step()
    compiles = len(_compiled.COMPILE_SECONDS)
    seen = set()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(50):
            seen.add((ours.param_groups[0]["lr"], ours.param_groups[0]["betas"][0]))
            train_step(model, ours)
            train_step(reference, loop)
            for scheduler in schedulers:
                scheduler.step()
    assert len(_compiled.COMPILE_SECONDS) == compiles, "a new kernel was compiled after warm-up"
    assert len({lr for lr, _ in seen}) == 50 and len({beta1 for _, beta1 in seen}) == 50
    for a, b in zip(model.parameters(), reference.parameters()):
        assert_close(a.detach(), b.detach(), f"AdamW {impl} under OneCycleLR", exact=False)


# ---------------------------------------------------------------------------------------------------
# The batched strategies under what users do
# ---------------------------------------------------------------------------------------------------


def _mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1)).to(dtype)


def _batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 5, generator=gen).to(dtype), torch.randn(8, 1, generator=gen).to(dtype)


def _backward(model: nn.Module, step: int) -> None:
    dtype = next(model.parameters()).dtype
    x, y = _batch(step, dtype)
    nn.functional.mse_loss(model(x), y).backward()


def _storage_of(params) -> list[tuple[int, int]]:
    return [(p.untyped_storage().data_ptr(), p.storage_offset()) for p in params]


@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_training_loop_matches_the_loop(impl, set_to_none):
    model, reference = _mlp(), _mlp()
    storage = _storage_of(model.parameters())
    ours = scratchopt.Adam(model.parameters(), lr=0.01, impl=impl)
    loop = scratchopt.Adam(reference.parameters(), lr=0.01)
    for step in range(6):
        for net, opt in ((model, ours), (reference, loop)):
            opt.zero_grad(set_to_none=set_to_none)
            _backward(net, step)
            opt.step()
    assert _storage_of(model.parameters()) == storage, "a parameter was moved to other storage"
    assert_same_state(ours, loop, list(model.parameters()), list(reference.parameters()), impl, impl == "foreach")


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_replaced_missing_and_frozen_grads(impl):
    model, reference = _mlp(), _mlp()
    ours = scratchopt.SGD(model.parameters(), lr=0.05, momentum=0.9, impl=impl)
    loop = scratchopt.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    for step in range(10):
        for net, opt in ((model, ours), (reference, loop)):
            opt.zero_grad(set_to_none=False)
            frozen = 2 <= step < 5
            net[2].weight.requires_grad_(not frozen)
            _backward(net, step)
            if frozen:
                net[2].weight.grad = None  # frozen: no gradient at all for a few steps
            if step == 6:
                net[0].bias.grad = net[0].bias.grad.clone() * 1.0  # replaced by a fresh tensor
            if step == 7:
                net[4].bias.grad = None  # one missing gradient
            opt.step()
    assert_same_state(ours, loop, list(model.parameters()), list(reference.parameters()), impl, impl == "foreach")


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_add_param_group(impl):
    model, reference = _mlp(), _mlp()
    ours = scratchopt.Adam(list(model[0].parameters()), lr=0.01, impl=impl)
    loop = scratchopt.Adam(list(reference[0].parameters()), lr=0.01)
    for step in range(6):
        if step == 3:
            ours.add_param_group({"params": list(model[2].parameters()) + list(model[4].parameters()), "lr": 0.02})
            loop.add_param_group(
                {"params": list(reference[2].parameters()) + list(reference[4].parameters()), "lr": 0.02}
            )
        for net, opt in ((model, ours), (reference, loop)):
            opt.zero_grad()
            _backward(net, step)
            opt.step()
    assert_same_state(ours, loop, list(model.parameters()), list(reference.parameters()), impl, impl == "foreach")


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_load_state_dict_both_ways(impl):
    model, reference = _mlp(), _mlp()
    ours = scratchopt.Adam(model.parameters(), lr=0.01, amsgrad=True, impl=impl)
    loop = scratchopt.Adam(reference.parameters(), lr=0.01, amsgrad=True)
    for step in range(8):
        if step == 3:  # the loop's state goes into ours
            ours.load_state_dict(copy.deepcopy(loop.state_dict()))
        if step == 5:  # and ours into a new loop optimizer
            loop = scratchopt.Adam(reference.parameters(), lr=0.01, amsgrad=True)
            loop.load_state_dict(copy.deepcopy(ours.state_dict()))
        for net, opt in ((model, ours), (reference, loop)):
            opt.zero_grad()
            _backward(net, step)
            opt.step()
    assert_same_state(ours, loop, list(model.parameters()), list(reference.parameters()), impl, impl == "foreach")
    # torch.optim reads our state_dict too, and continues from it as we do.
    theirs_model = copy.deepcopy(model)
    theirs = torch.optim.Adam(theirs_model.parameters(), lr=0.01, amsgrad=True, foreach=False)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    for net, opt in ((model, ours), (theirs_model, theirs)):
        opt.zero_grad()
        _backward(net, 8)
        opt.step()
    assert_same_state(
        ours,
        theirs,
        list(model.parameters()),
        list(theirs_model.parameters()),
        f"{impl} then torch.optim",
        impl == "foreach",
    )


def test_batched_params_keep_their_strides_and_values():
    params = hard_params(torch.float32)
    copies = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    grads = gradients(params, 0)
    strides = [p.stride() for p in params]
    ours, loop = scratchopt.Adam(hard_groups(params), impl="foreach"), scratchopt.Adam(hard_groups(copies))
    for p, q, grad in zip(params, copies, grads):
        p.grad = None if grad is None else grad.clone()
        q.grad = None if grad is None else grad.clone()
    ours.step()
    loop.step()
    assert [p.stride() for p in params] == strides  # the transposed param is still transposed
    for a, b in zip(params, copies):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)


def test_pickled_optimizer_keeps_its_impl():
    import pickle

    p = torch.zeros(3, requires_grad=True)
    optimizer = scratchopt.Adam([p], impl="foreach")
    clone = pickle.loads(pickle.dumps(optimizer))
    assert clone.impl == "foreach"


def test_non_elementwise_algorithms_run_the_loop(monkeypatch):
    """An algorithm without ``elementwise = True`` refuses another impl, and under torch's ``foreach=True``
    flag runs the loop: one tensor per call."""
    monkeypatch.setattr(scratchopt.Adam, "elementwise", False)
    original = scratchopt.Adam.update
    seen = set()

    def spy(param, *args, **kwargs):
        seen.add(type(param))
        return original(param, *args, **kwargs)

    monkeypatch.setattr(scratchopt.Adam, "update", staticmethod(spy))
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    for impl in scratchopt.strategies.NAMES[1:]:
        with pytest.raises(ValueError, match=f"Adam runs only impl='loop' \\(got impl='{impl}'\\)"):
            scratchopt.Adam(params, impl=impl)
    optimizer = scratchopt.Adam(params, foreach=True)
    assert optimizer.impl == "loop"
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert seen == {torch.Tensor}


# ---------------------------------------------------------------------------------------------------
# Ways a strategy broke in real training loops, each a test
# ---------------------------------------------------------------------------------------------------

ALL_IMPLS = ("loop",) + EXACT + COMPILED


def _issue_params() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(), (5,), (4, 3), None, (2, 3, 2), (3,)]
    return [
        torch.nn.Parameter(torch.randn(3, 4, 2, generator=gen)[..., 0] if s is None else torch.randn(s, generator=gen))
        for s in shapes
    ]


def _issue_sparse_grads(params: list[torch.Tensor], step: int) -> list[torch.Tensor | None]:
    gen = torch.Generator().manual_seed(100 + step)
    grads = []
    for index, p in enumerate(params):
        values = torch.randn(p.shape, generator=gen)
        has = index != 5 and not (index == 1 and (step == 0 or step % 5 == 4)) and not (index == 2 and step % 3 == 1)
        grads.append(values.to_sparse() if has else None)
    return grads


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_sparse_gradients_of_every_shape_match_torch(impl):
    """Sparse gradients run per tensor under every strategy (no list or kernel takes them)."""
    ours_params, their_params = _issue_params(), _issue_params()
    ours = scratchopt.SGD(ours_params, lr=0.0048, impl=impl)
    theirs = torch.optim.SGD(their_params, lr=0.0048, foreach=False)
    for step in range(20):
        for params in (ours_params, their_params):
            for p, grad in zip(params, _issue_sparse_grads(params, step)):
                p.grad = grad
        ours.step()
        theirs.step()
        for a, b in zip(ours_params, their_params):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("impl", COMPILED)
def test_kernel_cache_is_keyed_by_everything_the_kernel_depends_on(impl):
    """β₁ ≤ 0.5 and centered RMSprop with α ≤ 0.5 take the other branch of ATen's
    lerp; they used to poison the process-wide kernel cache. Both sides of each branch, in one process."""
    cases = [
        ("Adam", {"betas": (0.5, 0.999)}),
        ("Adam", {}),
        ("Adam", {"betas": (0.3, 0.9)}),
        ("RMSprop", {"centered": True, "alpha": 0.4}),
        ("RMSprop", {"centered": True}),
        ("Adam", {"betas": (0.5, 0.999)}),
    ]
    for name, kwargs in cases:
        _side_by_side(name, kwargs, torch.float32, impl, steps=6, exact=False)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_parameters_are_updated_in_their_own_storage(impl):
    """Params are updated in their own storage (rebinding p.data would break what follows). An EMA-style alias taken before training, the
    storage pointers and a one-layer torch.save must all see the params where they were."""
    import io

    model, reference = _mlp(), _mlp()
    aliases = [p.detach() for p in model.parameters()]
    storage = _storage_of(model.parameters())
    ours = scratchopt.AdamW(model.parameters(), lr=0.01, impl=impl)
    loop = scratchopt.AdamW(reference.parameters(), lr=0.01)
    for step in range(4):
        for net, opt in ((model, ours), (reference, loop)):
            opt.zero_grad()
            _backward(net, step)
            opt.step()
    assert _storage_of(model.parameters()) == storage
    initial = _mlp()
    for alias, p, start in zip(aliases, model.parameters(), initial.parameters()):
        assert not torch.equal(p, start), "a parameter was not updated"
        assert torch.equal(alias, p.detach()), "an alias taken before training stopped seeing the updates"
    layer = io.BytesIO()
    torch.save(model[2].state_dict(), layer)
    own_bytes = sum(p.numel() * p.element_size() for p in model[2].parameters())
    assert layer.tell() < own_bytes + 2000, "saving one layer wrote more than its own parameters"
    assert_same_state(ours, loop, list(model.parameters()), list(reference.parameters()), impl, impl not in COMPILED)


def _snapshot(model: nn.Module, optimizer) -> tuple:
    return copy.deepcopy(([p.detach().clone() for p in model.parameters()], optimizer.state_dict()))


def _assert_snapshot_unchanged(before: tuple, after: tuple, what: str) -> None:
    for a, b in zip(before[0], after[0]):
        assert torch.equal(a, b), f"{what}: a parameter changed"
    for index, state in before[1]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, after[1]["state"][index][key]), f"{what}: state[{index}][{key!r}] changed"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bfloat16", "float64"])
@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_model_to_another_dtype_mid_training_raises_before_any_change(impl, dtype):
    """Every strategy raises torch's error type before changing anything (torch's
    own for-loop fails halfway through the step), and resumes once the state is cast like the params."""
    model, reference = _mlp(), _mlp()
    ours = scratchopt.AdamW(model.parameters(), lr=0.01, impl=impl)
    loop = scratchopt.AdamW(reference.parameters(), lr=0.01)
    for step in range(3):
        for net, opt in ((model, ours), (reference, loop)):
            opt.zero_grad()
            _backward(net, step)
            opt.step()
    for net, opt in ((model, ours), (reference, loop)):
        net.to(dtype)
        opt.zero_grad()
        _backward(net, 3)
        before = _snapshot(net, opt)
        with pytest.raises(RuntimeError, match=r"state\['exp_avg'\] .* was the model moved with \.to\(\)"):
            opt.step()
        _assert_snapshot_unchanged(before, _snapshot(net, opt), f"{impl} after the refused step")
        opt.load_state_dict(opt.state_dict())  # casts the state like the params, as torch does
        opt.step()
    assert all(ours.state[p]["exp_avg"].dtype == dtype for p in model.parameters())
    if dtype == torch.float64 or impl not in COMPILED:
        assert_same_state(
            ours, loop, list(model.parameters()), list(reference.parameters()), impl, impl not in COMPILED
        )


@pytest.mark.parametrize("impl", EXACT + COMPILED)
def test_a_parameter_listed_twice_is_updated_twice_as_by_the_loop(impl):
    """A param listed twice in a group: torch warns and its for-loop applies the update twice, in order."""

    def build(params):
        return [{"params": [params[0], params[1], params[0]]}, {"params": params[2:4]}]

    with pytest.warns(UserWarning, match="duplicate parameters"):
        _side_by_side("Adam", {}, torch.float64, impl, steps=10, make_groups=build, exact=impl in EXACT)


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_many_small_tensors_train_like_the_loop(impl):
    """80 tensors: enough for the gradient and parameter copies to be split across threads."""

    def build(seed):
        torch.manual_seed(seed)
        return nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(40)])

    model, reference = build(0), build(0)
    ours = scratchopt.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, impl=impl)
    loop = scratchopt.SGD(reference.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for net, opt in ((model, ours), (reference, loop)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    assert_same_state(ours, loop, list(model.parameters()), list(reference.parameters()), impl, impl == "foreach")


@pytest.mark.parametrize("impl", EXACT + COMPILED)
def test_impl_says_what_runs(impl):
    """An elementwise algorithm runs the strategy asked for; every one that runs only the loop refuses it
    with the same ValueError (torch's flags are accepted, and run the loop)."""
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    for name in implemented():
        cls = getattr(scratchopt, name)
        if not cls.elementwise:
            with pytest.raises(ValueError, match=f"{name} runs only impl='loop'"):
                cls(params, impl=impl)
            continue
        assert cls(params, impl=impl).impl == impl, name


def test_small_buffers_run_the_eager_update(monkeypatch):
    """Below ``MIN_KERNEL_NUMEL`` elements the compiled strategy runs the eager update (bit-exact with the
    loop, and faster there than recording and calling a kernel); above it, a kernel."""
    monkeypatch.setattr(_compiled, "MIN_KERNEL_NUMEL", 16384)
    for width, compiles in ((8, False), (160, True)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))
        reference = copy.deepcopy(model)
        ours = scratchopt.Adam(model.parameters(), lr=0.01, impl="compiled")
        loop = scratchopt.Adam(reference.parameters(), lr=0.01)
        before = len(_compiled.COMPILE_SECONDS)
        _compiled.clear_kernels()
        for step in range(3):
            # The same gradients for both (a backward pass would amplify the kernel's few ulp).
            grads = gradients(list(model.parameters()), step)
            for net, opt in ((model, ours), (reference, loop)):
                set_gradients(list(net.parameters()), grads)
                opt.step()
        assert (len(_compiled.COMPILE_SECONDS) > before) == compiles, f"width {width}"
        assert_same_state(
            ours, loop, list(model.parameters()), list(reference.parameters()), f"width {width}", exact=not compiles
        )


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_large_params_are_updated_where_they_lie(impl):
    """Large params, a transposed one and a gradient laid out otherwise, beside small ones: each is
    updated in place, in its own storage."""

    def build():
        gen = torch.Generator().manual_seed(5)
        big = torch.randn(1030, 256, generator=gen)
        return [
            big.clone().requires_grad_(),
            big.t().contiguous().t().requires_grad_(),
            torch.randn(7, generator=gen).requires_grad_(),
            torch.randn((), generator=gen).requires_grad_(),
        ]

    ours_params, loop_params = build(), build()
    assert not ours_params[1].is_contiguous()
    storage = _storage_of(ours_params)
    ours = scratchopt.AdamW(ours_params, lr=0.01, impl=impl)
    loop = scratchopt.AdamW(loop_params, lr=0.01)
    for step in range(4):
        gen = torch.Generator().manual_seed(step)
        for a, b in zip(ours_params, loop_params):
            grad = torch.randn(a.shape, generator=gen)
            a.grad = grad.clone() if step % 2 else grad.t().contiguous().t() if grad.dim() == 2 else grad.clone()
            b.grad = grad.clone()
        ours.step()
        loop.step()
    assert _storage_of(ours_params) == storage
    assert_same_state(ours, loop, ours_params, loop_params, f"large params {impl}", exact=impl == "foreach")
