"""The dispatcher and the strategy contract: what every strategy is promised and must keep.

Each test here is a way a strategy once broke the contract: a step that skipped a subclass's checks, an
in-place edit of the state that a strategy overwrote, a false ``elementwise`` declaration that slipped
through, resources that piled up.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import pkgutil
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import scratchopt
from scratchopt.algorithms.adam import Adam
from scratchopt.strategies import NAMES, STRATEGIES
from scratchopt.testing import assert_same_state, gradients, set_gradients

pytestmark = pytest.mark.usefixtures("kernels_at_every_size")


def test_registry_lists_every_strategy_module_once_with_its_guarantee():
    modules = [info.name for info in pkgutil.iter_modules(scratchopt.strategies.__path__)]
    declared = [m for m in modules if hasattr(importlib.import_module(f"scratchopt.strategies.{m}"), "STRATEGY")]
    assert len(NAMES) == len(declared) and NAMES[0] == "loop"
    for name, strategy in STRATEGIES.items():
        assert strategy.name == name
        assert strategy.exact == (strategy.ulp == 0)
    assert STRATEGIES["loop"].exact and STRATEGIES["foreach"].exact


class CountingAdam(Adam):
    """Adam whose input checks count their calls (a subclass adding its own checks)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.check_inputs_calls = 0
        self.check_grad_calls = 0

    def check_inputs(self, group: dict[str, Any], params: list[Tensor]) -> None:
        self.check_inputs_calls += 1
        super().check_inputs(group, params)

    def check_grad(self, param: Tensor) -> None:
        self.check_grad_calls += 1
        super().check_grad(param)


@pytest.mark.parametrize("impl", NAMES)
def test_every_strategy_calls_the_checks_of_a_subclass_at_every_step(impl):
    params = [torch.randn(5, 4, requires_grad=True), torch.randn(4, requires_grad=True)]
    optimizer = CountingAdam(params, lr=0.01, impl=impl)
    for step in range(5):
        set_gradients(params, gradients(params, step))
        optimizer.step()
    assert optimizer.check_inputs_calls == 5, impl
    grads_given = sum(g is not None for step in range(5) for g in gradients(params, step))
    assert optimizer.check_grad_calls == grads_given, impl


@pytest.mark.parametrize("impl", NAMES)
def test_a_step_counter_reset_in_place_is_honoured(impl):
    """``state[p]["step"].fill_(0)`` restarts one param's bias correction, as in torch."""

    def run(impl_name: str | None) -> tuple[list[Tensor], Any]:
        gen = torch.Generator().manual_seed(0)
        params = [
            torch.randn(5, 4, dtype=torch.float64, generator=gen).requires_grad_(),
            torch.randn(3, dtype=torch.float64, generator=gen).requires_grad_(),
        ]
        optimizer = scratchopt.AdamW(params, lr=0.01, impl=impl_name)
        for step in range(4):
            if step == 2:
                optimizer.state[params[1]]["step"].fill_(0)
            set_gradients(params, [torch.full_like(p, 0.1 * (step + 1)) for p in params])
            optimizer.step()
        return params, optimizer

    loop_params, loop = run(None)
    params, optimizer = run(impl)
    assert [optimizer.state[p]["step"].item() for p in params] == [4.0, 2.0]
    assert_same_state(optimizer, loop, params, loop_params, impl, exact=STRATEGIES[impl].exact)


def stack_update(param: Tensor, grad: Tensor, *, lr: float) -> None:
    param.sub_(torch.stack([grad, grad]).mean(0), alpha=lr)


def numel_update(param: Tensor, grad: Tensor, *, lr: float) -> None:
    param.add_(grad, alpha=-lr / param.numel())  # a per-tensor scale: wrong on a buffer or a 1-d view


def shape_update(param: Tensor, grad: Tensor, *, lr: float) -> None:
    param.sub_(grad, alpha=lr * param.shape[0])


def foreach_update(param: Tensor, grad: Tensor, *, lr: float) -> None:
    torch._foreach_add_([param], [grad], alpha=-lr)


def falsely_elementwise(update_fn: Any) -> type:
    class Declared(scratchopt.ScratchOptimizer):
        hyperparameter_keys = ("lr",)
        elementwise = True
        update = staticmethod(update_fn)

        def __init__(self, params: Any, lr: float = 0.1, *, impl: str | None = None) -> None:
            super().__init__(params, {"lr": lr}, impl)

        def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
            return {}

    return Declared


@pytest.mark.parametrize(
    "update_fn,operation",
    [
        (stack_update, "torch.stack"),
        (foreach_update, "_foreach_add_"),
        (numel_update, r"numel\(\)"),
        (shape_update, "shape"),
    ],
)
def test_an_update_calling_a_function_on_a_list_is_refused_by_name(update_fn, operation):
    with pytest.raises(TypeError, match=f"declares elementwise = True, but its update .*{operation}"):
        falsely_elementwise(update_fn)([torch.zeros(3, requires_grad=True)])


@pytest.mark.parametrize("impl", NAMES)
def test_a_group_added_later_is_checked_against_the_declaration(impl):
    """The declaration is checked per group: a group added with ``add_param_group`` whose hyperparameters
    take another path through the update, one that reduces, is refused before any step."""

    def update_fn(param: Tensor, grad: Tensor, *, lr: float) -> None:
        if lr > 1:
            grad = grad / grad.abs().sum()  # a reduction on this path only
        param.sub_(grad, alpha=lr)

    Declared = falsely_elementwise(update_fn)
    optimizer = Declared([torch.zeros(3, requires_grad=True)], impl=impl)
    with pytest.raises(TypeError, match="calls Tensor.sum"):
        optimizer.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "lr": 2.0})


def test_dispatcher_sends_what_a_strategy_cannot_take_to_the_loop():
    """Sparse gradients and a param listed twice run the loop under every strategy, as torch does."""
    for impl in NAMES:
        dense = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        twice = torch.randn(3, dtype=torch.float64, requires_grad=True)
        reference = [dense.detach().clone().requires_grad_(), twice.detach().clone().requires_grad_()]
        ours = scratchopt.SGD([dense, twice, twice], lr=0.1, momentum=0.9, impl=impl)
        loop = torch.optim.SGD([reference[0], reference[1], reference[1]], lr=0.1, momentum=0.9, foreach=False)
        for step in range(3):
            for p in (dense, reference[0]):
                p.grad = torch.full_like(p, 0.5 + step)
            for p in (twice, reference[1]):
                p.grad = torch.full_like(p, -0.25 * step)
            ours.step()
            loop.step()
        assert torch.equal(dense, reference[0]) and torch.equal(twice, reference[1]), impl
    assert copy.deepcopy(ours).impl == impl


@pytest.fixture
def params_swapped_on_conversion():
    """``model.to_empty()`` keeps each Parameter object (swapping its contents), so an optimizer built on
    the meta-device model steps the real parameters, as FSDP2's meta-device init needs."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(before)


@pytest.mark.usefixtures("params_swapped_on_conversion")
@pytest.mark.parametrize("flags", [{}, {"capturable": True}, {"fused": True}], ids=["defaults", "capturable", "fused"])
@pytest.mark.parametrize("name", [n for n, c in scratchopt.algorithms.ALGORITHMS.items() if c.elementwise])
def test_an_optimizer_built_on_a_meta_device_model_steps_like_torchs(name, flags):
    """``with torch.device("meta")``, then ``model.to_empty(...)``: how large models are built. The
    optimizer constructs wherever torch's does, and then steps exactly as torch's."""
    if name == "Adagrad":
        pytest.skip("torch makes Adagrad's state at construction, on the meta device: neither steps after to_empty")
    cls = scratchopt.algorithms.ALGORITHMS[name]
    twin = getattr(torch.optim, name, None)
    kwargs = {**cls.example_kwargs, **flags}
    models = []
    for _ in range(2):
        with torch.device("meta"):
            models.append(nn.Linear(4, 3))
    if twin is None:
        if flags:
            pytest.skip(f"{name} has no torch twin to take {flags}")
        theirs = None
    else:
        try:
            theirs = twin(models[1].parameters(), **kwargs)
        except (TypeError, ValueError, RuntimeError):  # torch refuses: so do we
            with pytest.raises((TypeError, ValueError, RuntimeError)):
                cls(models[0].parameters(), **kwargs)
            return
    ours = cls(models[0].parameters(), **kwargs)
    for model in models:
        model.to_empty(device="cpu")
        with torch.no_grad():
            for index, p in enumerate(model.parameters()):
                p.copy_(torch.linspace(-1, 1, p.numel()).view_as(p) * (index + 1))
    start = [p.detach().clone() for p in models[0].parameters()]
    # torch's capturable path steps only on accelerators: there, the construction is what is compared.
    compared = theirs if not flags.get("capturable") else None
    for step in range(3):
        for model, optimizer in zip(models, (ours, compared)):
            if optimizer is not None:
                optimizer.zero_grad()
                model(torch.full((2, 4), 0.5 + step)).square().sum().backward()
                optimizer.step()
    assert all(not torch.equal(p, q) for p, q in zip(models[0].parameters(), start)), f"{name}: nothing moved"
    if compared is not None:
        assert_same_state(
            ours,
            compared,
            list(models[0].parameters()),
            list(models[1].parameters()),
            name,
            exact=not flags.get("fused"),
        )


@pytest.mark.parametrize("name", list(scratchopt.algorithms.ALGORITHMS))
def test_the_groups_and_repr_say_which_strategy_runs(name):
    """Each group records its strategy (``impl``, in torch's listing of the groups and the state_dict),
    with torch's flag that selects the same where torch has it; an algorithm that runs only the loop
    refuses any other impl, as every one of them does."""
    cls = scratchopt.algorithms.ALGORITHMS[name]
    params = [torch.zeros(3, 2, requires_grad=True)]
    if not cls.elementwise:
        if "impl" in inspect.signature(cls).parameters:
            with pytest.raises(ValueError, match=rf"{name} runs only impl='loop' \(got impl='fused'\)"):
                cls(params, **cls.example_kwargs, impl="fused")
        assert cls(params, **cls.example_kwargs).impl == "loop"
        return
    ours = cls(params, **cls.example_kwargs, impl="fused")
    group = ours.param_groups[0]
    assert ours.impl == group["impl"] == "fused" == ours.state_dict()["param_groups"][0]["impl"]
    assert "    impl: fused\n" in repr(ours)
    assert all(f"    {key}: " in repr(ours) for key in group if key != "params")
    if "fused" in group and cls.torch_twin:  # torch.optim loading this state_dict runs its fused kernel
        assert group["fused"] is True
        twin = getattr(torch.optim, cls.torch_twin)([torch.zeros(3, 2, requires_grad=True)])
        twin.load_state_dict(ours.state_dict())
        assert twin.param_groups[0]["fused"] is True


def test_each_group_runs_the_impl_it_records_and_an_edit_takes_effect(monkeypatch):
    """``group["impl"]`` is read at every step: groups may differ, an edit switches the next step, a
    state_dict of torch's (no ``impl``) runs what its ``fused`` flag selects, and a bad value raises
    before anything changes."""
    ran: list[str] = []
    for name, strategy in scratchopt.strategies.STRATEGIES.items():
        original = strategy.update

        def spy(optimizer, group, params, hyperparameters, name=name, original=original):
            ran.append(name)
            return original(optimizer, group, params, hyperparameters)

        monkeypatch.setattr(strategy, "update", spy)
        monkeypatch.setattr(strategy, "plan_group", lambda optimizer, group, extra: None)
    params = [torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)]
    optimizer = scratchopt.AdamW([{"params": params[:1]}, {"params": params[1:], "impl": "foreach"}], impl="fused")

    def step() -> list[str]:
        ran.clear()
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
        return list(ran)

    assert [g["impl"] for g in optimizer.param_groups] == ["fused", "foreach"]
    assert step() == ["fused", "foreach"]
    optimizer.param_groups[0]["impl"] = "loop"
    assert step() == ["loop", "foreach"]
    theirs = torch.optim.AdamW(
        [{"params": [torch.randn(4, requires_grad=True)]}, {"params": [torch.randn(3, requires_grad=True)]}], fused=True
    )
    optimizer.load_state_dict(theirs.state_dict())  # torch's groups: fused=True and no impl
    assert optimizer.impl == "fused" and step() == ["fused", "fused"]
    unflagged = scratchopt.AdamW([torch.randn(4, requires_grad=True)], impl="foreach")
    unflagged.load_state_dict(torch.optim.AdamW([torch.randn(4, requires_grad=True)]).state_dict())
    assert unflagged.default_impl == unflagged.impl == "foreach"  # torch's flags say nothing: ours stays
    optimizer.param_groups[1]["impl"] = "fast"
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="Invalid impl value: 'fast'"):
        step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    with pytest.raises(ValueError, match="Invalid impl value"):
        optimizer.add_param_group({"params": [torch.randn(2, requires_grad=True)], "impl": "fast"})


class NormalisedSGD(scratchopt.ScratchOptimizer):
    """θ ← θ − γ·g/‖g‖ with ‖g‖ over every param of every group (a reduction), and a step count kept in
    each group (group bookkeeping): the two optional hooks of the dispatcher."""

    state_keys = ()
    hyperparameter_keys = ("lr",)
    scalar_state_keys = ()
    reduced_arguments = ("norm",)
    elementwise = True

    def __init__(self, params: Any, lr: float = 0.1, *, impl: str | None = None) -> None:
        super().__init__(params, {"lr": lr, "k": 0}, impl)
        self.reduced: list[int] = []

    @staticmethod
    def update(param: Tensor, grad: Tensor, *, lr: float, norm: float) -> None:
        param.add_(grad, alpha=-lr / norm)

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return {}

    def reduce(self, groups: list[tuple[dict[str, Any], list[Tensor]]]) -> list[dict[str, Any]] | None:
        self.reduced.append(sum(len(params) for _, params in groups))
        norm = sum(float(p.grad.square().sum()) for _, params in groups for p in params) ** 0.5
        return None if norm == 0 else [{"norm": norm} for _ in groups]

    def advance_group(self, group: dict[str, Any]) -> None:
        group["k"] += 1


@pytest.mark.parametrize("impl", NAMES)
def test_reduce_and_advance_group_see_every_group_once_per_step(impl):
    params = [torch.full((3,), 1.0, requires_grad=True), torch.full((2,), 2.0, requires_grad=True)]
    optimizer = NormalisedSGD([{"params": params[:1]}, {"params": params[1:], "lr": 0.2}], impl=impl)
    params[0].grad = torch.tensor([3.0, 0.0, 0.0])
    params[1].grad = torch.tensor([0.0, 4.0])
    optimizer.step()
    assert optimizer.reduced == [2]
    assert [group["k"] for group in optimizer.param_groups] == [1, 1]
    torch.testing.assert_close(params[0].detach(), torch.tensor([1.0 - 0.1 * 3 / 5, 1.0, 1.0]))
    torch.testing.assert_close(params[1].detach(), torch.tensor([2.0, 2.0 - 0.2 * 4 / 5]))
    # A group without gradients is still counted; the reduction sees only the params with one.
    params[1].grad = None
    optimizer.step()
    assert optimizer.reduced == [2, 1]
    assert [group["k"] for group in optimizer.param_groups] == [2, 2]
    # The reduction may skip the step: nothing changes, nothing is counted.
    params[0].grad = torch.zeros(3)
    before = params[0].detach().clone()
    optimizer.step()
    assert torch.equal(params[0].detach(), before)
    assert [group["k"] for group in optimizer.param_groups] == [2, 2]


def test_bad_input_in_a_later_group_runs_neither_hook():
    params = [torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)]
    optimizer = NormalisedSGD([{"params": params[:1]}, {"params": params[1:]}])
    params[0].grad = torch.ones(3)
    params[1].grad = torch.ones(2)
    params[1].grad.data = torch.ones(2, dtype=torch.float64)  # another dtype than its param
    with pytest.raises(RuntimeError, match="parameter 0 of param group 1"):
        optimizer.step()
    assert optimizer.reduced == []
    assert [group["k"] for group in optimizer.param_groups] == [0, 0]
    assert torch.equal(params[0].detach(), torch.ones(3))


def test_an_invalid_impl_in_a_later_group_is_refused_before_the_reduction():
    params = [torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)]
    optimizer = NormalisedSGD([{"params": params[:1]}, {"params": params[1:]}])
    optimizer.param_groups[1]["impl"] = "no-such-impl"
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="no-such-impl"):
        optimizer.step()
    assert optimizer.reduced == [] and [group["k"] for group in optimizer.param_groups] == [0, 0]
