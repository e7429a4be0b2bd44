"""``torch.compile(opt.step)`` and compiled training steps give the numbers of eager steps.

A scratchopt step runs eagerly inside a compiled region (:func:`scratchopt.optimizer.runs_eagerly`): each
test runs the same steps with and without ``torch.compile`` and requires the same params and state, bit
for bit, for every algorithm under every strategy it runs.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import scratchopt
from scratchopt.algorithms import ALGORITHMS
from scratchopt.strategies import NAMES
from scratchopt.testing import assert_same_state, copy_params, gradients, hard_groups, hard_params_for, set_gradients

_CLOSURE_FREE = [name for name, cls in ALGORITHMS.items() if not cls.needs_closure]
_CASES = [(name, impl) for name in _CLOSURE_FREE for impl in (NAMES if ALGORITHMS[name].elementwise else ("loop",))]


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _gradients_for(cls: type[Any], params: list[Tensor], step: int) -> list[Tensor | None]:
    grads = gradients(params, step)
    if cls.takes == "sparse gradients":
        return [None if g is None else g.to_sparse() for g in grads]
    return grads


@pytest.mark.parametrize(("name", "impl"), _CASES)
def test_a_compiled_step_gives_the_eager_numbers(name, impl):
    cls = ALGORITHMS[name]
    params = hard_params_for(cls)(torch.float32)
    if cls.takes == "sparse gradients":
        params = [p for p in params if p.dim() > 0]
    twins = copy_params(params)
    kwargs = {**cls.example_kwargs, "impl": impl}
    eager, compiled = cls(hard_groups(params), **kwargs), cls(hard_groups(twins), **kwargs)
    step = torch.compile(compiled.step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no graph-break or recompile warnings either
        for index in range(5):
            grads = _gradients_for(cls, params, index)
            for group in (params, twins):
                if cls.takes == "sparse gradients":
                    for p, g in zip(group, grads):
                        p.grad = None if g is None else g.clone()
                else:
                    set_gradients(group, grads)
            eager.step()
            step()
    assert_same_state(compiled, eager, twins, params, f"{name} impl={impl!r} under torch.compile")
    counters = [[float(s["step"]) for s in o.state.values() if "step" in s] for o in (compiled, eager)]
    assert counters[0] == counters[1], counters


@pytest.mark.parametrize("name", [name for name, cls in ALGORITHMS.items() if cls.needs_closure])
def test_a_compiled_closure_step_gives_the_eager_numbers(name):
    cls = ALGORITHMS[name]
    target = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def run(compile_step: bool) -> tuple[Tensor, list[Any]]:
        x = torch.tensor([0.3, 0.1, -0.4], dtype=torch.float64, requires_grad=True)
        optimizer = cls([x], **cls.example_kwargs)

        def closure() -> Tensor:
            loss = ((x - target) ** 4).sum() + (x**2).sum()
            if name != "Newton":  # Newton differentiates the loss itself
                optimizer.zero_grad()
                loss.backward()
            return loss

        step = torch.compile(optimizer.step) if compile_step else optimizer.step
        losses = [step(closure) for _ in range(4)]
        return x.detach(), [float(loss.detach()) for loss in losses]

    eager_x, eager_losses = run(False)
    compiled_x, compiled_losses = run(True)
    assert torch.equal(compiled_x, eager_x) and compiled_losses == eager_losses
    assert not torch.equal(eager_x, torch.tensor([0.3, 0.1, -0.4], dtype=torch.float64))  # it moved


@pytest.mark.parametrize(("name", "impl"), [("AdamW", "fused"), ("AdamW", "loop"), ("SGD", "foreach")])
def test_a_compiled_training_step_that_calls_step_gives_the_eager_numbers(name, impl):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    twin = copy.deepcopy(model)
    kwargs = {"lr": 0.05, "momentum": 0.9} if name == "SGD" else {"lr": 0.05}
    optimizers = [getattr(scratchopt, name)(m.parameters(), **kwargs, impl=impl) for m in (model, twin)]
    data = torch.randn(16, 6), torch.randn(16, 1)

    def train_step(m: nn.Module, optimizer: torch.optim.Optimizer) -> Tensor:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(m(data[0]), data[1])
        loss.backward()
        optimizer.step()
        return loss.detach()

    # aot_eager: Dynamo and AOTAutograd capture the graph around the step, and ATen's own kernels run it,
    # so the forward and backward are bit-exact with eager and any difference would be the step's.
    compiled_step = torch.compile(train_step, backend="aot_eager")
    for _ in range(4):
        train_step(model, optimizers[0])
        compiled_step(twin, optimizers[1])
    assert_same_state(optimizers[1], optimizers[0], list(twin.parameters()), list(model.parameters()), "compiled")


def test_the_compiled_step_of_the_torch_tutorial_counts_every_param():
    """The pattern of torch's compiled-optimizer tutorial: each param's step counter is the step count."""
    params = [torch.randn(64, 64, requires_grad=True), torch.randn(64, requires_grad=True)]
    for impl in NAMES:
        optimizer = scratchopt.AdamW(params, lr=1e-3, impl=impl)
        step = torch.compile(optimizer.step, fullgraph=False)
        for _ in range(4):
            for p in params:
                p.grad = torch.ones_like(p)
            step()
        assert [optimizer.state[p]["step"].item() for p in params] == [4.0, 4.0], impl
