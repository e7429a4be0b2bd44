"""The public contract of torch.optim, kept: errors, state_dict interop both ways, hooks, names, closures."""

from __future__ import annotations

import copy
import inspect
import re

import pytest
import torch
from parity import (
    SPARSE_ALGORITHMS,
    as_accepted_grad,
    assert_optimizers_equal,
    gradients,
    hard_groups,
    harness_skip_reason,
    implemented,
    optim_db_configs,
    optim_db_info,
    params_for,
    small_model,
    torch_loop_kwargs,
)
from torch.testing._internal.common_optimizers import OptimizerErrorEnum as DbErrorEnum

import scratchopt
from scratchopt.testing import COMPILED_IMPLS, EXACT_IMPLS

# Small test tensors must reach the compiled kernels (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("kernels_at_every_size")

ALGORITHMS = implemented()


def _error_cases() -> list:
    cases = []
    for name in ALGORITHMS:
        for index, error in enumerate(optim_db_info(name).optim_error_inputs_func(device="cpu", dtype=torch.float32)):
            cases.append(pytest.param(name, index, id=f"{name}-{error.optimizer_error_input.desc}"))
    return cases


def _raise_or_warn(cls, error_input):
    params = error_input.optimizer_error_input.params
    if params is None:
        params = [torch.nn.Parameter(torch.randn(1, 1))]
    kwargs = copy.deepcopy(error_input.optimizer_error_input.kwargs)
    if error_input.error_on == DbErrorEnum.CONSTRUCTION_ERROR:
        cls(params, **kwargs)
    else:
        optimizer = cls(params, **kwargs)
        for p in optimizer.param_groups[0]["params"]:
            p.grad = torch.rand_like(p)
        optimizer.step()


@pytest.mark.parametrize("name,index", _error_cases())
def test_optim_db_error_inputs_raise_torchs_exception(name, index):
    error = optim_db_info(name).optim_error_inputs_func(device="cpu", dtype=torch.float32)[index]
    ours = getattr(scratchopt, name)
    if issubclass(error.error_type, Warning):
        with pytest.warns(error.error_type, match=error.error_regex):
            _raise_or_warn(ours, error)
    else:
        with pytest.raises(error.error_type, match=error.error_regex):
            _raise_or_warn(ours, error)
        # And torch raises the same type on the same input: the contract we copy.
        with pytest.raises(error.error_type, match=error.error_regex):
            _raise_or_warn(getattr(torch.optim, name), error)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_signature_and_defaults_match_torch(name):
    ours = inspect.signature(getattr(scratchopt, name).__init__).parameters
    theirs = inspect.signature(getattr(torch.optim, name).__init__).parameters
    own = {"impl": None, "state_dtype": torch.float32, "stochastic_rounding": False}
    ours_without_own = [(p.name, p.kind, p.default) for p in ours.values() if p.name not in own]
    assert ours_without_own == [(p.name, p.kind, p.default) for p in theirs.values()]
    for key, default in own.items():
        if key == "impl" or issubclass(getattr(scratchopt, name), scratchopt.ScratchOptimizer):
            assert ours[key].kind == inspect.Parameter.KEYWORD_ONLY and ours[key].default == default, key


#: The group keys scratchopt adds to torch's: the strategy and the state precision.
OWN_GROUP_KEYS = ("impl", "state_dtype", "stochastic_rounding")
#: The range of lr where it is not torch's usual lr >= 0.
LR_ALLOWED = {"SparseAdam": "lr > 0"}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_invalid_lr_names_argument_and_range(name):
    """torch's message, then the argument and its range."""
    params = [torch.zeros(2, 2, requires_grad=True)]
    with pytest.raises(ValueError) as theirs:
        getattr(torch.optim, name)(params, lr=-0.5)
    expected = f"{theirs.value} (allowed: {LR_ALLOWED.get(name, 'lr >= 0')})"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        getattr(scratchopt, name)(params, lr=-0.5)


def _harness_cases(names: list[str]) -> list:
    """One case per algorithm; those the hard-parameter harness cannot drive are skipped with the reason."""
    return [
        pytest.param(name, marks=pytest.mark.skip(harness_skip_reason(name)) if harness_skip_reason(name) else ())
        for name in names
    ]


#: Strategies that compile a kernel run on each algorithm's first optim_db configuration only: each new
#: configuration is a new compile (about 1.5 s on 2 cores). The eager strategies run all of them.
EAGER_IMPLS = ("loop", *EXACT_IMPLS)


def _state_dict_cases() -> list:
    cases = []
    for name in ALGORITHMS:
        if harness_skip_reason(name):
            cases.append(
                pytest.param(
                    name, "-", {}, "loop", id=f"{name}-skipped", marks=pytest.mark.skip(harness_skip_reason(name))
                )
            )
            continue
        # A state_dict does not depend on the strategy that made it: the kernels' impls run on one
        # configuration, and torch.compile's (the costliest to build) on AdamW alone.
        cases += [
            pytest.param(name, desc, kwargs, impl, id=f"{name}-{desc}-{impl}")
            for index, (desc, kwargs) in enumerate(optim_db_configs(name))
            for impl in (EAGER_IMPLS + COMPILED_IMPLS if index == 0 else EAGER_IMPLS)
            if (impl == "loop" or getattr(scratchopt, name).elementwise) and (impl != "compiled" or name == "AdamW")
        ]
    return cases


def _build(module, name, params, kwargs, impl="loop"):
    kwargs = copy.deepcopy(kwargs)
    if module is torch.optim:
        kwargs.update(torch_loop_kwargs(name))
    else:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("foreach", "fused")}
        kwargs["impl"] = impl
    return getattr(module, name)(hard_groups(params), **kwargs)


def _run(optimizer, params, steps):
    for step in steps:
        for p, grad in zip(params, gradients(params, step)):
            p.grad = grad
        optimizer.step()


def _clone_params(params):
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]


def _resume(first, second, name, kwargs, impl="loop"):
    """4 steps in ``first``, state_dict loaded into ``second``, 4 more steps there."""
    params = params_for(name, torch.float64)
    before = _build(first, name, params, kwargs, impl)
    _run(before, params, range(4))
    resumed_params = _clone_params(params)
    after = _build(second, name, resumed_params, kwargs, impl)
    after.load_state_dict(copy.deepcopy(before.state_dict()))
    _run(after, resumed_params, range(4, 8))
    return after, resumed_params


#: torch's load_state_dict casts every state tensor but ``step`` to the param's dtype, so NAdam's float32
#: ``mu_product`` (and ASGD's ``eta`` and ``mu``) become float64 and even a torch-to-torch resumption drifts
#: from the uninterrupted run (pytorch/pytorch#75224). There we require equality with torch's own resumed run.
RESUMPTION_CHANGES_TORCH = {"NAdam", "ASGD"}


@pytest.mark.parametrize(
    "first,second", [(torch.optim, scratchopt), (scratchopt, torch.optim)], ids=["torch-to-ours", "ours-to-torch"]
)
@pytest.mark.parametrize("name,desc,kwargs,impl", _state_dict_cases())
def test_state_dict_round_trip_with_torch(first, second, name, desc, kwargs, impl):
    """k steps in one library (ours under ``impl``), load into the other, continue: equal to an
    uninterrupted torch run (bit for bit; within a few ulp for the compiled strategies)."""
    reference_params = params_for(name, torch.float64)
    reference = _build(torch.optim, name, reference_params, kwargs)
    _run(reference, reference_params, range(8))
    if name in RESUMPTION_CHANGES_TORCH:
        reference, reference_params = _resume(torch.optim, torch.optim, name, kwargs)

    after, resumed_params = _resume(first, second, name, kwargs, impl)
    few_ulp = {} if impl in EAGER_IMPLS else {"exact": False, "rtol": 1e-14, "atol": 1e-14}
    assert_optimizers_equal(after, reference, resumed_params, reference_params, f"{name} resumed", **few_ulp)
    if second is scratchopt:
        for p in resumed_params:
            if after.state.get(p, {}).get("step") is not None:
                step = after.state[p]["step"]
                assert step.dtype == torch.float32 and step.dim() == 0 and step.device.type == "cpu"


@pytest.mark.parametrize("name", _harness_cases(ALGORITHMS))
def test_state_dict_has_torchs_form(name):
    params = params_for(name, torch.float32)
    ours, theirs = _build(scratchopt, name, params, {}), _build(torch.optim, name, _clone_params(params), {})
    _run(ours, ours.param_groups[0]["params"] + ours.param_groups[1]["params"], range(2))
    _run(theirs, theirs.param_groups[0]["params"] + theirs.param_groups[1]["params"], range(2))
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert set(ours_sd["state"]) == set(theirs_sd["state"])
    for index in theirs_sd["state"]:
        assert set(ours_sd["state"][index]) == set(theirs_sd["state"][index])
    for ours_group, theirs_group in zip(ours_sd["param_groups"], theirs_sd["param_groups"]):
        # torch's keys in torch's order, then ours: the strategy that ran and the state precision (torch
        # ignores a key it does not use).
        assert [key for key in ours_group if key not in OWN_GROUP_KEYS] == list(theirs_group)
        assert ours_group["impl"] == "loop" and ours_group.get("state_dtype", torch.float32) == torch.float32
        assert {k: v for k, v in ours_group.items() if k != "foreach" and k not in OWN_GROUP_KEYS} == {
            k: v for k, v in theirs_group.items() if k != "foreach"
        }


@pytest.mark.parametrize("name", ALGORITHMS)
def test_hooks_fire_once_per_step(name):
    p = torch.zeros(3, 2, requires_grad=True)
    optimizer = getattr(scratchopt, name)([p])
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    optimizer.register_state_dict_post_hook(lambda opt, sd: calls.append("state_dict"))

    def closure():  # a closure, for the algorithms that require one (LBFGS calls it more than once)
        p.grad = as_accepted_grad(name, torch.ones(3, 2))
        return torch.zeros(())

    optimizer.step(closure)
    optimizer.state_dict()
    assert calls == ["pre", "post", "state_dict"]


@pytest.mark.parametrize("name", ALGORITHMS)
def test_closure_loss_is_returned_and_grads_computed(name):
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8)
    w_ours = torch.zeros(3, 1, requires_grad=True)
    w_torch = torch.zeros(3, 1, requires_grad=True)
    ours = getattr(scratchopt, name)([w_ours], lr=0.01)
    theirs = getattr(torch.optim, name)([w_torch], lr=0.01, **torch_loop_kwargs(name))

    def closure_for(w, optimizer):
        def closure():
            optimizer.zero_grad()
            loss = (((x @ w).squeeze(1) - y) ** 2).mean()
            loss.backward()
            w.grad = as_accepted_grad(name, w.grad)
            return loss

        return closure

    for _ in range(3):
        loss_ours = ours.step(closure_for(w_ours, ours))
        loss_torch = theirs.step(closure_for(w_torch, theirs))
        assert torch.equal(loss_ours, loss_torch)
    assert torch.equal(w_ours, w_torch)


@pytest.mark.parametrize("name", ALGORITHMS)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(name, set_to_none):
    p = torch.zeros(3, 2, requires_grad=True)
    optimizer = getattr(scratchopt, name)([p])
    p.grad = torch.ones(3, 2)
    optimizer.zero_grad(set_to_none=set_to_none)
    if set_to_none:
        assert p.grad is None
    else:
        assert torch.equal(p.grad, torch.zeros(3, 2))


@pytest.mark.parametrize("name", ALGORITHMS)
def test_named_params_and_add_param_group(name):
    model, extra = small_model(name, 3, 2), small_model(name, 2, 1)
    model_names, extra_names = [[n for n, _ in m.named_parameters()] for m in (model, extra)]
    ours = getattr(scratchopt, name)(model.named_parameters())
    theirs = getattr(torch.optim, name)(copy.deepcopy(model).named_parameters(), **torch_loop_kwargs(name))
    assert ours.param_groups[0]["param_names"] == model_names
    ours.add_param_group({"params": list(extra.named_parameters()), "lr": 0.5})
    theirs.add_param_group({"params": list(copy.deepcopy(extra).named_parameters()), "lr": 0.5})
    assert ours.param_groups[1]["lr"] == 0.5 and ours.param_groups[1]["param_names"] == extra_names
    assert set(ours.param_groups[1]) - set(OWN_GROUP_KEYS) == set(theirs.param_groups[1])
    assert ours.state_dict()["param_groups"][1]["param_names"] == extra_names


@pytest.mark.parametrize("name", _harness_cases(ALGORITHMS))
def test_param_groups_are_read_at_every_step(name):
    """A scheduler (or a user) edits lr between steps; the next step uses the new value."""
    ours_params, theirs_params = params_for(name, torch.float64), params_for(name, torch.float64)
    ours = _build(scratchopt, name, ours_params, {})
    theirs = _build(torch.optim, name, theirs_params, {})
    schedulers = [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) for opt in (ours, theirs)]
    for step in range(6):
        for opt, params in ((ours, ours_params), (theirs, theirs_params)):
            for p, grad in zip(params, gradients(params, step)):
                p.grad = grad
            opt.step()
        for scheduler in schedulers:
            scheduler.step()
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"] < optim_db_default_lr(name)
    assert_optimizers_equal(ours, theirs, ours_params, theirs_params, f"{name} under StepLR")


def optim_db_default_lr(name):
    return inspect.signature(getattr(torch.optim, name).__init__).parameters["lr"].default


def test_impl_choice_and_contradictions():
    p = [torch.zeros(2, requires_grad=True)]
    assert scratchopt.Adam(p).impl == "loop"
    with pytest.raises(ValueError, match="impl must be one of"):
        scratchopt.Adam(p, impl="vectorized")
    with pytest.raises(ValueError, match="contradicts foreach=True"):
        scratchopt.Adam(p, foreach=True, impl="loop")
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together."):
        scratchopt.Adam(p, foreach=True, fused=True)
    with pytest.raises(RuntimeError, match="`fused` does not support `differentiable`"):
        scratchopt.SGD(p, fused=True, differentiable=True)
    with pytest.raises(NotImplementedError, match="differentiable=True is not supported"):
        scratchopt.SGD(p, differentiable=True)


@pytest.mark.parametrize("impl", EAGER_IMPLS + COMPILED_IMPLS)
def test_sparse_gradients_sgd_matches_torch(impl):
    def sparse_grad(step):
        gen = torch.Generator().manual_seed(step)
        indices = torch.randint(0, 6, (1, 4), generator=gen)
        return torch.sparse_coo_tensor(indices, torch.randn(4, 3, generator=gen, dtype=torch.float64), (6, 3))

    for kwargs in ({"lr": 0.1}, {"lr": 0.1, "momentum": 0.9}, {"lr": 0.1, "momentum": 0.9, "nesterov": True}):
        weight = torch.randn(6, 3, dtype=torch.float64)
        ours_p, theirs_p = weight.clone().requires_grad_(), weight.clone().requires_grad_()
        ours = scratchopt.SGD([ours_p], **kwargs, impl=impl)
        theirs = torch.optim.SGD([theirs_p], **kwargs, foreach=False)
        for step in range(5):
            ours_p.grad, theirs_p.grad = sparse_grad(step), sparse_grad(step)
            ours.step()
            theirs.step()
            # Without momentum: bit-exact. With it torch keeps an uncoalesced sparse buffer and adds its
            # entries one by one; ours is dense, so repeated rows are summed in another order (a few ulp).
            exact = "momentum" not in kwargs
            tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-14, "atol": 1e-15}
            torch.testing.assert_close(ours_p, theirs_p, **tolerance)
            if not exact:
                torch.testing.assert_close(
                    ours.state[ours_p]["momentum_buffer"],
                    theirs.state[theirs_p]["momentum_buffer"].to_dense(),
                    **tolerance,
                )


@pytest.mark.parametrize(
    ("name", "impl"),
    [
        (name, impl)
        for name in sorted(set(ALGORITHMS) - SPARSE_ALGORITHMS)
        if not getattr(scratchopt, name).needs_closure
        for impl in EAGER_IMPLS + COMPILED_IMPLS
        if impl == "loop" or getattr(scratchopt, name).elementwise
    ],
)
def test_sparse_gradients_rejected_like_torch(name, impl):
    """torch's error, raised before anything changed: the dense param beside it is left alone too."""

    def attempt(module, **kwargs):
        dense, p = torch.ones(3, 2, requires_grad=True), torch.zeros(4, 2, requires_grad=True)
        optimizer = getattr(module, name)([dense, p], **kwargs)
        dense.grad, p.grad = torch.ones(3, 2), torch.ones(4, 2)
        optimizer.step()
        before = copy.deepcopy((dense.detach(), p.detach(), optimizer.state_dict()["state"]))
        p.grad = torch.sparse_coo_tensor([[0, 2]], torch.ones(2, 2), (4, 2))
        with pytest.raises(RuntimeError) as error:
            optimizer.step()
        return str(error.value), before, (dense.detach(), p.detach(), optimizer.state_dict()["state"])

    their_error, _, _ = attempt(torch.optim)
    our_error, before, after = attempt(scratchopt, impl=impl)
    assert our_error == their_error
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1]), "a param changed before the error"
    for index, state in before[2].items():
        for key, value in state.items():
            assert torch.equal(after[2][index][key], value), f"state {index}[{key!r}] changed before the error"
