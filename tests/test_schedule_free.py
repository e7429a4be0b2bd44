"""Schedule-Free SGD and AdamW against the authors' ``schedulefree`` package (both its foreach and its
per-parameter path), bit for bit at every step on the hard parameter set with a scheduler, through
``train()``/``eval()`` switches; and against the paper's x, y, z sequences."""

from __future__ import annotations

import copy

import parity
import pytest
import schedulefree
import torch

import scratchopt
from scratchopt.testing import compare_with_loop, grad_like, gradients, hard_groups, hard_params

REFERENCES = {"ScheduleFreeSGD": schedulefree.SGDScheduleFree, "ScheduleFreeAdamW": schedulefree.AdamWScheduleFree}
CONFIGS = {
    "ScheduleFreeSGD": {
        "default": {},
        "decay, warmup": {"lr": 0.5, "weight_decay": 0.05, "warmup_steps": 4},
        "r, weight_lr_power": {"momentum": 0.8, "r": 0.5, "weight_lr_power": 1.0, "warmup_steps": 2},
    },
    "ScheduleFreeAdamW": {
        "default": {},
        "decay, warmup": {"lr": 0.01, "weight_decay": 0.05, "warmup_steps": 4},
        "r, weight_lr_power, betas": {"betas": (0.8, 0.99), "eps": 1e-6, "r": 0.5, "weight_lr_power": 0.0},
    },
}
#: The schedule's group keys (the reference keeps them in the group too).
GROUP_KEYS = ("k", "lr_max", "weight_sum", "scheduled_lr", "train_mode")
CASES = [(name, config) for name, configs in CONFIGS.items() for config in configs]


def assert_groups_equal(ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer, what: str) -> None:
    for index, (a, b) in enumerate(zip(ours.param_groups, theirs.param_groups, strict=True)):
        for key in GROUP_KEYS:
            parity.assert_same(a[key], b[key], f"{what}: group {index} {key}")


@pytest.mark.parametrize("foreach", [True, False], ids=["reference foreach", "reference loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "config"), CASES)
def test_the_loop_is_the_reference_through_train_and_eval(name, config, dtype, foreach):
    kwargs = CONFIGS[name][config]
    their_params = hard_params(dtype)
    our_params = [p.detach().clone().requires_grad_(p.requires_grad) for p in their_params]
    theirs = REFERENCES[name](hard_groups(their_params), **copy.deepcopy(kwargs), foreach=foreach)
    ours = getattr(scratchopt, name)(hard_groups(our_params), **copy.deepcopy(kwargs))
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (theirs, ours)]
    theirs.train()
    ours.train()
    for step in range(8):
        for p_ours, p_theirs, grad in zip(our_params, their_params, gradients(their_params, step)):
            p_theirs.grad = None if grad is None else grad.clone()
            p_ours.grad = None if grad is None else grad_like(grad, p_ours)
        theirs.step()
        ours.step()
        for scheduler in schedulers:
            scheduler.step()
        what = f"{name} step {step}"
        parity.assert_optimizers_equal(ours, theirs, our_params, their_params, what)
        assert_groups_equal(ours, theirs, what)
        if step % 3 == 2:  # evaluate at x, then go on training from y
            for optimizer in (theirs, ours):
                optimizer.eval()
            parity.assert_optimizers_equal(ours, theirs, our_params, their_params, f"{what}, eval")
            assert_groups_equal(ours, theirs, f"{what}, eval")
            for optimizer in (theirs, ours):
                optimizer.train()
            parity.assert_optimizers_equal(ours, theirs, our_params, their_params, f"{what}, train")


def paper_sequences(lr: float, beta: float, grads_at: callable, steps: int, x0: torch.Tensor):
    """The paper's Schedule-Free SGD (Defazio et al., 2024, eq. 1) with c = 1/(t + 1), no warmup."""
    z = x0.clone()
    x = x0.clone()
    for t in range(steps):
        y = (1 - beta) * z + beta * x
        z = z - lr * grads_at(y)
        c = 1 / (t + 1)  # the first average is z itself
        x = (1 - c) * x + c * z
    return x, (1 - beta) * z + beta * x, z


def test_sgd_follows_the_papers_three_sequences():
    """With r = 0 and weight_lr_power = 0 every iterate weighs the same: x is the running mean of z; the
    param holds y while training and x after ``eval()``."""
    target = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def grad_at(y):
        return 2 * (y - target)  # ∇‖y − target‖²

    x0 = torch.tensor([0.3, 0.1, -0.4], dtype=torch.float64)
    param = x0.clone().requires_grad_()
    optimizer = scratchopt.ScheduleFreeSGD([param], lr=0.1, momentum=0.9, weight_lr_power=0.0)
    for _ in range(5):
        param.grad = grad_at(param.detach())
        optimizer.step()
    x, y, z = paper_sequences(0.1, 0.9, grad_at, 5, x0)
    torch.testing.assert_close(param.detach(), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(optimizer.state[param]["z"], z, rtol=1e-12, atol=1e-12)
    optimizer.eval()
    torch.testing.assert_close(param.detach(), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_step_in_eval_mode_is_refused_before_anything_changes(name):
    param = torch.randn(4, requires_grad=True)
    optimizer = getattr(scratchopt, name)([param])
    param.grad = torch.ones(4)
    optimizer.step()
    optimizer.eval()
    before = param.detach().clone(), {k: v.clone() for k, v in optimizer.state[param].items()}
    with pytest.raises(RuntimeError, match=r"optimizer\.train\(\)"):
        optimizer.step()
    assert torch.equal(param.detach(), before[0])
    assert all(torch.equal(optimizer.state[param][k], v) for k, v in before[1].items())
    assert optimizer.param_groups[0]["k"] == 1


@pytest.mark.parametrize("name", list(REFERENCES))
def test_the_gradient_is_left_as_it_was(name):
    """The reference normalises ``param.grad`` in place; this one reads it only."""
    param = torch.randn(4, requires_grad=True)
    optimizer = getattr(scratchopt, name)([param], weight_decay=0.1)
    grad = torch.randn(4)
    param.grad = grad.clone()
    optimizer.step()
    assert torch.equal(param.grad, grad)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_state_dict_round_trips_with_the_reference(name):
    """A reference checkpoint (saved in eval mode, as its docs ask) resumes here, and ours there."""
    torch.manual_seed(0)
    steps = [torch.randn(6, 5, dtype=torch.float64) for _ in range(6)]

    def run(first: type, second: type) -> torch.Tensor:
        param = torch.zeros(6, 5, dtype=torch.float64, requires_grad=True)
        optimizer = first([param], weight_decay=0.01, warmup_steps=2)
        optimizer.train()
        for grad in steps[:3]:
            param.grad = grad.clone()
            optimizer.step()
        optimizer.eval()
        saved = copy.deepcopy(optimizer.state_dict())
        resumed = second([param])
        resumed.load_state_dict(saved)
        resumed.train()
        for grad in steps[3:]:
            param.grad = grad.clone()
            resumed.step()
        resumed.eval()
        return param.detach().clone()

    ours_cls, their_cls = getattr(scratchopt, name), REFERENCES[name]
    reference = run(their_cls, their_cls)
    assert torch.equal(run(ours_cls, their_cls), reference)
    assert torch.equal(run(their_cls, ours_cls), reference)


def kernel_sized(dtype: torch.dtype) -> list[torch.Tensor]:
    """Params above the kernel threshold, so that compiled and fused run their kernels."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen, dtype=dtype).requires_grad_() for shape in ((300, 70), (70,), (90, 40))]


@pytest.mark.parametrize("impl", [name for name in scratchopt.strategies.NAMES if name != "loop"])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_every_strategy_matches_the_loop_at_kernel_sizes(name, impl):
    kwargs = {"weight_decay": 0.01, "warmup_steps": 2}
    compare_with_loop(getattr(scratchopt, name), kwargs, impl, steps=5, make_params=kernel_sized, make_groups=list)
