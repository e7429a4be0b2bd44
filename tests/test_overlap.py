"""``scratchopt.step_in_backward``: stepping each parameter inside backward equals stepping after it.

Compared over several steps with one optimizer stepping every parameter after backward, for every
strategy (bit-for-bit for loop and foreach; within ``FEW_ULP`` for compiled and fused, whose kernels
round ``sqrt`` correctly) and for a torch.optim class; then the hooks
leave no trace once removed, and the state_dict round trip resumes exactly.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import scratchopt
from scratchopt.testing import EXACT_IMPLS, assert_close

# Small test tensors must reach the compiled kernels (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("kernels_at_every_size")

STEPS = 4
EXACT = ("loop", *EXACT_IMPLS)


def model() -> nn.Module:
    """Two layers sharing nothing, one weight used twice (its gradient accumulates from both uses)."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(6, 8)
            self.shared = nn.Linear(8, 8)
            self.last = nn.Linear(8, 3)
            self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.last(torch.tanh(self.shared(torch.tanh(self.shared(torch.tanh(self.first(x))))))) + self.frozen

    return Net()


def loss(net: nn.Module, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    inputs, targets = torch.randn(5, 6, generator=generator), torch.randn(5, 3, generator=generator)
    return nn.functional.mse_loss(net(inputs), targets)


def train_after_backward(net: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        optimizer.zero_grad()
        loss(net, step).backward()
        optimizer.step()


def train_in_backward(net: nn.Module, steps: range) -> None:
    for step in steps:
        loss(net, step).backward()


def assert_params(actual: nn.Module, expected: nn.Module, what: str, exact: bool) -> None:
    for (name, a), b in zip(actual.named_parameters(), expected.parameters()):
        assert_close(a.detach(), b.detach(), f"{what}: {name}", exact)


@pytest.mark.parametrize("impl", scratchopt.strategies.NAMES)
@pytest.mark.parametrize(
    "algorithm,kwargs",
    [("AdamW", {"lr": 0.01, "weight_decay": 0.1}), ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True})],
)
def test_equals_stepping_after_backward(impl: str, algorithm: str, kwargs: dict) -> None:
    reference = model()
    net = copy.deepcopy(reference)
    make = functools.partial(getattr(scratchopt, algorithm), impl=impl, **kwargs)
    optimizer = make(reference.parameters())
    stepper = scratchopt.step_in_backward(net, make)
    for step in range(STEPS):
        train_after_backward(reference, optimizer, range(step, step + 1))
        train_in_backward(net, range(step, step + 1))
        assert all(p.grad is None for p in net.parameters()), "a gradient was left after backward"
        assert_params(net, reference, f"{algorithm} impl={impl} step {step}", exact=impl in EXACT)
    assert len(stepper.optimizers) == 6  # the frozen parameter has none
    trainable = [p for p in reference.parameters() if p.requires_grad]
    for p, per_param, reference_param in zip(stepper.params, stepper.optimizers, trainable, strict=True):
        state, expected = per_param.state[p], optimizer.state[reference_param]
        assert set(state) == set(expected)
        for key in expected:
            assert_close(state[key], expected[key], f"{algorithm} impl={impl} state[{key!r}]", exact=impl in EXACT)


def test_takes_torch_optimizers_and_parameter_lists() -> None:
    reference = model()
    net = copy.deepcopy(reference)
    make = functools.partial(torch.optim.Adam, lr=0.01, foreach=False)
    optimizer = make(reference.parameters())
    scratchopt.step_in_backward([p for p in net.parameters()] * 2, make)  # listed twice: one optimizer each
    train_after_backward(reference, optimizer, range(STEPS))
    train_in_backward(net, range(STEPS))
    assert_params(net, reference, "torch.optim.Adam", exact=True)


def test_remove_leaves_plain_backward() -> None:
    net = model()
    stepper = scratchopt.step_in_backward(net, functools.partial(scratchopt.SGD, lr=0.1))
    before = [p.detach().clone() for p in net.parameters()]
    with stepper:
        train_in_backward(net, range(1))
    assert not stepper.active
    stepped = [p.detach().clone() for p in net.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(stepped, before))
    loss(net, 1).backward()
    assert all(torch.equal(p.detach(), s) for p, s in zip(net.parameters(), stepped)), "a removed hook stepped"
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad), "a removed hook freed a gradient"


@pytest.mark.parametrize("impl", ["loop", "fused"])
def test_state_dict_round_trip_resumes_exactly(impl: str) -> None:
    make = functools.partial(scratchopt.AdamW, lr=0.01, impl=impl)
    net = model()
    stepper = scratchopt.step_in_backward(net, make)
    train_in_backward(net, range(2))
    saved_params, saved_state = copy.deepcopy(net.state_dict()), copy.deepcopy(stepper.state_dict())
    train_in_backward(net, range(2, 4))

    resumed = model()
    resumed.load_state_dict(saved_params)
    resumed_stepper = scratchopt.step_in_backward(resumed, make)
    resumed_stepper.load_state_dict(saved_state)
    train_in_backward(resumed, range(2, 4))
    assert_params(resumed, net, f"resumed impl={impl}", exact=True)
    with pytest.raises(ValueError, match="holds 6 optimizers; this has 1"):
        scratchopt.step_in_backward([net.first.weight], make).load_state_dict(saved_state)


def test_a_scheduler_per_optimizer() -> None:
    net = model()
    stepper = scratchopt.step_in_backward(net, functools.partial(scratchopt.SGD, lr=0.1))
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in stepper.optimizers]
    train_in_backward(net, range(1))
    for scheduler in schedulers:
        scheduler.step()
    assert {o.param_groups[0]["lr"] for o in stepper.optimizers} == {0.05}
