"""Every execution strategy against ``impl="loop"`` (itself bit-for-bit torch's for-loop).

Which strategies are bit-exact with the loop on this CPU, and why:

* ``foreach`` — bit-exact: torch's CPU foreach ops run the single-tensor kernels tensor by tensor.
* ``flat`` — bit-exact: the same eager kernels on one long buffer (elementwise ops do not depend on where
  an element sits; ATen's vectorised body and scalar tail compute the same formula).
* ``compiled`` and ``fused`` — a few ulp: the generated kernel reproduces ATen's operation order and its
  FMAs, but ATen's float32 ``sqrt`` is Sleef's (within 0.5001 ulp, so not always correctly rounded) while
  Inductor's is the exact instruction, and one-ulp differences then travel through later steps. On the
  hard parameter set they stay within 4 ulp over 20 steps; ``FEW_ULP`` allows 8.

Compiles dominate the run time (about 1.5 s per generated kernel on 2 cores, after a one-off ~18 s
in a process with a cold Inductor cache), so the compiled strategies are checked on a subset of
configurations: each algorithm's default in float32 and float64, its richest optim_db configuration
(plus tensor lr and tensor betas for Adam) in float32. ``foreach`` and ``flat`` run all of them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from parity import (
    _like,
    cpu_kwargs,
    gradients,
    hard_groups,
    hard_params,
    implemented,
    optim_db_configs,
)
from torch import nn

import scratchopt
from scratchopt import _compiled

ALGORITHMS = implemented()
EXACT = ("foreach", "flat")
COMPILED = ("compiled", "fused")
DTYPES = (torch.float32, torch.float64)
FEW_ULP = 8


def _ulp_distance(actual: torch.Tensor, expected: torch.Tensor) -> int:
    """Largest distance in units in the last place between two float tensors (0 when equal)."""
    if actual.numel() == 0:
        return 0
    if actual.is_complex():
        return max(_ulp_distance(torch.view_as_real(actual), torch.view_as_real(expected)), 0)
    bits = {torch.float32: (torch.int32, 32), torch.float64: (torch.int64, 64),
            torch.float16: (torch.int16, 16), torch.bfloat16: (torch.int16, 16)}
    int_dtype, width = bits[actual.dtype]
    a = actual.detach().contiguous().view(int_dtype).to(torch.int64)
    b = expected.detach().contiguous().view(int_dtype).to(torch.int64)
    magnitude = (1 << (width - 1)) - 1
    a = torch.where(a < 0, -(a & magnitude), a)
    b = torch.where(b < 0, -(b & magnitude), b)
    return int((a - b).abs().max())


def _assert_close(actual, expected, what: str, exact: bool) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if exact:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")
        return
    real = expected.real if expected.is_complex() else expected
    eps = torch.finfo(real.dtype).eps
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=FEW_ULP * eps, atol=FEW_ULP * eps * scale, equal_nan=True,
                               msg=lambda m: f"{what} ({_ulp_distance(actual, expected)} ulp): {m}")


def _assert_same_as_loop(ours, loop, ours_params, loop_params, what: str, exact: bool) -> None:
    for index, (a, b) in enumerate(zip(ours_params, loop_params)):
        _assert_close(a.detach(), b.detach(), f"{what}: param {index}", exact)
        state_a, state_b = ours.state.get(a, {}), loop.state.get(b, {})
        assert set(state_a) == set(state_b), f"{what}: param {index} state keys {set(state_a)} != {set(state_b)}"
        for key, value in state_b.items():
            if isinstance(value, torch.Tensor):
                _assert_close(state_a[key], value, f"{what}: param {index} state[{key!r}]", exact)
            else:
                assert state_a[key] == value, f"{what}: param {index} state[{key!r}]"


def _side_by_side(name: str, kwargs: dict, dtype: torch.dtype, impl: str, steps: int = 20,
                  make_params=hard_params, make_groups=hard_groups, exact: bool = True):
    loop_params = make_params(dtype)
    ours_params = [p.detach().clone().requires_grad_(p.requires_grad) for p in loop_params]
    cls = getattr(scratchopt, name)
    loop = cls(make_groups(loop_params), **cpu_kwargs(copy.deepcopy(kwargs)))
    ours = cls(make_groups(ours_params), **cpu_kwargs(copy.deepcopy(kwargs)), impl=impl)
    for step in range(steps):
        for p_loop, p_ours, grad in zip(loop_params, ours_params, gradients(loop_params, step)):
            p_loop.grad = None if grad is None else grad.clone()
            p_ours.grad = None if grad is None else _like(grad, p_ours)
        loop.step()
        ours.step()
    _assert_same_as_loop(ours, loop, ours_params, loop_params, f"{name} impl={impl}", exact)
    return ours, loop, ours_params, loop_params


# ---------------------------------------------------------------------------------------------------
# The core comparison: 20 steps on the hard parameter set, float32 and float64
# ---------------------------------------------------------------------------------------------------


def test_every_algorithm_declares_whether_it_is_elementwise():
    """The torch twins are all elementwise; a non-elementwise one would run the loop under every impl."""
    for name in ALGORITHMS:
        assert getattr(scratchopt, name).elementwise, f"{name} does not set elementwise = True"


def _exact_cases() -> list:
    return [
        pytest.param(name, desc, kwargs, impl, dtype, id=f"{name}-{desc}-{impl}-{str(dtype)[6:]}")
        for name in ALGORITHMS
        for desc, kwargs in optim_db_configs(name)
        for impl in EXACT
        for dtype in DTYPES
    ]


@pytest.mark.parametrize("name,desc,kwargs,impl,dtype", _exact_cases())
def test_foreach_and_flat_are_bit_exact_with_loop(name, desc, kwargs, impl, dtype):
    _side_by_side(name, kwargs, dtype, impl, exact=True)


def _compiled_configs(name: str) -> list[tuple[str, dict]]:
    configs = optim_db_configs(name)
    chosen = [configs[0], max(configs[1:], key=lambda c: len(c[1]))] if len(configs) > 1 else configs
    if name == "Adam":
        chosen += [c for c in configs if c[0] in ("tensor lr", "tensor betas")]
    unique = {c[0]: c for c in chosen}
    return list(unique.values())


def _compiled_cases() -> list:
    """Defaults in both dtypes, the other chosen configurations in float32 (each is a new compile)."""
    return [
        pytest.param(name, desc, kwargs, impl, dtype, id=f"{name}-{desc}-{impl}-{str(dtype)[6:]}")
        for name in ALGORITHMS
        for index, (desc, kwargs) in enumerate(_compiled_configs(name))
        for impl in COMPILED
        for dtype in (DTYPES if index == 0 else DTYPES[:1])
    ]


@pytest.mark.parametrize("name,desc,kwargs,impl,dtype", _compiled_cases())
def test_compiled_and_fused_are_within_a_few_ulp_of_loop(name, desc, kwargs, impl, dtype):
    _side_by_side(name, kwargs, dtype, impl, exact=False)


# ---------------------------------------------------------------------------------------------------
# Per-tensor scalars that differ inside one list (a param that skipped steps)
# ---------------------------------------------------------------------------------------------------


def _staggered_params(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
            for shape in ((4, 3), (5,), (2, 2), ())]


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
    _assert_same_as_loop(ours, loop, ours_params, loop_params, f"{name} staggered impl={impl}", exact)


@pytest.mark.parametrize("impl", EXACT)
@pytest.mark.parametrize("name", ALGORITHMS)
def test_params_with_different_step_counts_in_one_list(name, impl):
    _staggered_run(name, impl, torch.float64)


def test_ragged_scalars_become_per_tensor_scalar_lists(monkeypatch):
    """Adam with three step counts in one bucket runs one foreach call per op, with a list of scalars."""
    calls = []
    original = torch._foreach_addcdiv_

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_addcdiv_", spy)
    from scratchopt import _tensorlist

    monkeypatch.setitem(_tensorlist._FOREACH, "addcdiv_", spy)
    _staggered_run("Adam", "foreach", torch.float64)
    ragged = [c for c in calls if isinstance(c[-1], list) and len(set(c[-1])) > 1]
    assert ragged, "no foreach call received per-tensor scalars"


def test_radam_branch_on_ragged_step_splits_the_list():
    """RAdam branches on ρₜ > 5, a function of the step: steps 4 and 8 disagree, so the list is split."""
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
        for step in range(5):
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
        _assert_same_as_loop(ours, loop, ours_params, loop_params, f"{name} impl={impl} 0-d {dtype}", exact)
        assert all(not torch.equal(a.detach(), v.to(dtype)) for a, v in zip(ours_params, values)), \
            f"{name} impl={impl} {dtype}: a 0-d param was not updated"


# ---------------------------------------------------------------------------------------------------
# Complex params and sparse gradients fall back to per-tensor where needed
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", EXACT + COMPILED)
@pytest.mark.parametrize("name", ["Adam", "RMSprop"])
def test_complex_params(name, impl):
    _side_by_side(name, {"weight_decay": 0.1}, torch.complex64, impl, steps=6, exact=True)


@pytest.mark.parametrize("impl", EXACT + COMPILED)
@pytest.mark.parametrize("name,kwargs", [("SGD", {"lr": 0.1}), ("SGD", {"lr": 0.1, "momentum": 0.9}),
                                         ("Adagrad", {"lr": 0.1})])
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
        _assert_close(a.detach(), b.detach(), f"{name} sparse impl={impl}", exact=impl in EXACT)


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

    for step in range(2):  # warm-up: every kernel this run needs is compiled here
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
        _assert_close(a.detach(), b.detach(), f"AdamW {impl} under OneCycleLR", exact=False)


# ---------------------------------------------------------------------------------------------------
# The flat layout under what users do
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


def _assert_flat(optimizer, group_index: int = 0) -> None:
    """Every param of the group is a view of one buffer, and so is every gradient and state tensor."""
    params = optimizer.param_groups[group_index]["params"]
    storages = {p.untyped_storage().data_ptr() for p in params}
    assert len(storages) == 1, "params do not share one buffer"
    grads = {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}
    assert len(grads) <= 1, "gradients do not share one buffer"
    for key in optimizer.state_keys:
        states = {optimizer.state[p][key].untyped_storage().data_ptr() for p in params
                  if key in optimizer.state.get(p, {})}
        assert len(states) <= 1, f"state {key!r} is not one buffer"


@pytest.mark.parametrize("impl", ["flat", "fused"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_flat_training_loop_matches_loop(impl, set_to_none):
    model, reference = _mlp(), _mlp()
    ours = scratchopt.Adam(model.parameters(), lr=0.01, impl=impl)
    loop = scratchopt.Adam(reference.parameters(), lr=0.01)
    for step in range(6):
        for net, opt in ((model, ours), (reference, loop)):
            opt.zero_grad(set_to_none=set_to_none)
            _backward(net, step)
            opt.step()
        _assert_flat(ours)
    if not set_to_none:  # autograd accumulated into the flat gradient buffer: no copy was needed
        layout = ours._scratchopt_layouts[id(ours.param_groups[0])]
        assert all(p.grad is view for p, view in zip(layout.buffers[0].params, layout.buffers[0].grad_views))
    _assert_same_as_loop(ours, loop, list(model.parameters()), list(reference.parameters()), impl, impl == "flat")


@pytest.mark.parametrize("impl", ["flat", "fused"])
def test_flat_replaced_missing_and_frozen_grads(impl):
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
    _assert_same_as_loop(ours, loop, list(model.parameters()), list(reference.parameters()), impl, impl == "flat")
    _assert_flat(ours)


@pytest.mark.parametrize("impl", ["flat", "fused"])
def test_flat_add_param_group(impl):
    model, reference = _mlp(), _mlp()
    ours = scratchopt.Adam(list(model[0].parameters()), lr=0.01, impl=impl)
    loop = scratchopt.Adam(list(reference[0].parameters()), lr=0.01)
    for step in range(6):
        if step == 3:
            ours.add_param_group({"params": list(model[2].parameters()) + list(model[4].parameters()), "lr": 0.02})
            loop.add_param_group({"params": list(reference[2].parameters()) + list(reference[4].parameters()),
                                  "lr": 0.02})
        for net, opt in ((model, ours), (reference, loop)):
            opt.zero_grad()
            _backward(net, step)
            opt.step()
    _assert_flat(ours, 0)
    _assert_flat(ours, 1)
    _assert_same_as_loop(ours, loop, list(model.parameters()), list(reference.parameters()), impl, impl == "flat")


@pytest.mark.parametrize("impl", ["flat", "fused"])
def test_flat_load_state_dict_both_ways(impl):
    model, reference = _mlp(), _mlp()
    ours = scratchopt.Adam(model.parameters(), lr=0.01, amsgrad=True, impl=impl)
    loop = scratchopt.Adam(reference.parameters(), lr=0.01, amsgrad=True)
    for step in range(8):
        if step == 3:  # the loop's state goes into the flat optimizer
            ours.load_state_dict(copy.deepcopy(loop.state_dict()))
        if step == 5:  # and the flat optimizer's state into a new loop optimizer
            loop = scratchopt.Adam(reference.parameters(), lr=0.01, amsgrad=True)
            loop.load_state_dict(copy.deepcopy(ours.state_dict()))
        for net, opt in ((model, ours), (reference, loop)):
            opt.zero_grad()
            _backward(net, step)
            opt.step()
        if step >= 3:
            _assert_flat(ours)
    _assert_same_as_loop(ours, loop, list(model.parameters()), list(reference.parameters()), impl, impl == "flat")
    # torch.optim reads our state_dict too.
    theirs = torch.optim.Adam(_mlp().parameters(), lr=0.01, amsgrad=True)
    theirs.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("impl", ["flat", "fused"])
def test_flat_model_to_another_dtype(impl):
    """model.to(float64) mid-training: the buffers are rebuilt and the state follows the params."""
    model, reference = _mlp(), _mlp()
    ours = scratchopt.Adam(model.parameters(), lr=0.01, impl=impl)
    loop = scratchopt.Adam(reference.parameters(), lr=0.01)
    for step in range(7):
        if step == 3:
            model.to(torch.float64)
            reference.to(torch.float64)
            # The loop's state stays float32 under model.to(); torch's load_state_dict casts it, as we do.
            loop.load_state_dict(loop.state_dict())
        for net, opt in ((model, ours), (reference, loop)):
            opt.zero_grad(set_to_none=False)
            _backward(net, step)
            opt.step()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(ours.state[p]["exp_avg"].dtype == torch.float64 for p in model.parameters())
    _assert_flat(ours)
    _assert_same_as_loop(ours, loop, list(model.parameters()), list(reference.parameters()), impl, impl == "flat")


def test_flat_params_keep_their_strides_and_values():
    params = hard_params(torch.float32)
    copies = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    grads = gradients(params, 0)
    strides = [p.stride() for p in params]
    flat, loop = scratchopt.Adam(hard_groups(params), impl="flat"), scratchopt.Adam(hard_groups(copies))
    for p, q, grad in zip(params, copies, grads):
        p.grad = None if grad is None else grad.clone()
        q.grad = None if grad is None else grad.clone()
    flat.step()
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
    """An algorithm without ``elementwise = True`` gets the loop under every impl: one tensor per call."""
    monkeypatch.setattr(scratchopt.Adam, "elementwise", False)
    original = scratchopt.Adam.update
    seen = set()

    def spy(param, *args, **kwargs):
        seen.add(type(param))
        return original(param, *args, **kwargs)

    monkeypatch.setattr(scratchopt.Adam, "update", staticmethod(spy))
    for impl in ("foreach", "flat", "compiled", "fused"):
        _side_by_side("Adam", {}, torch.float32, impl, steps=3)
    assert seen == {torch.Tensor}


def test_bench_command_writes_its_table(tmp_path, capsys):
    """``scratchopt bench`` end to end on a toy size (the real run is a command, not a timed test)."""
    from scratchopt.cli import main

    main(["bench", "--preset", "quick", "--algorithms", "SGD+momentum", "--workloads", "mlp", "--mlp-layers", "3",
          "--columns", "ours loop,ours flat,torch loop,torch fused", "--min-run-time", "0.001", "--rounds", "1",
          "--no-warmup", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "SGD+momentum" in printed and "targets" in printed
    for name in ("bench.csv", "bench.json", "bench.png"):
        assert (tmp_path / name).stat().st_size > 0
    import json

    results = json.loads((tmp_path / "bench.json").read_text())
    row = results["rows"][0]
    assert row["traffic_B_per_param"] == 20 and row["times_ms"]["ours flat"] > 0
