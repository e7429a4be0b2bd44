"""Adan against ``pytorch-optimizer``'s Adan (its per-parameter path), bit for bit at every step on the
hard parameter set with a scheduler, where every param has a gradient at every step (the package counts
t per group, this module per param: ``tests/test_ademamix.py`` pins the same difference)."""

from __future__ import annotations

import copy

import parity
import pytest
import pytorch_optimizer
import torch

import scratchopt
from scratchopt.testing import compare_with_loop, hard_params

CONFIGS = {
    "default": {},
    "proximal decay, maximize": {"weight_decay": 0.05, "maximize": True},
    "decoupled decay, betas": {"weight_decay": 0.05, "weight_decouple": True, "betas": (0.9, 0.8, 0.95)},
    "small eps, lr": {"eps": 1e-12, "lr": 0.02},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_the_loop_is_pytorch_optimizers_per_parameter_path(config, dtype, monkeypatch):
    monkeypatch.setattr(parity, "gradients", parity.gradients_every_step)
    parity.run_side_by_side(
        "Adan",
        CONFIGS[config],
        dtype,
        steps=8,
        reference=lambda params, **kwargs: pytorch_optimizer.Adan(params, **kwargs, foreach=False),
        schedule=True,
        ours_only=("step",),
    )


def test_the_first_step_is_adam_like_with_no_difference():
    """At t = 1 the difference is zero, n stays 0 and θ moves by γ·g/(|g| + ε) (m/(1 − β₁) = g, √v/√(1 − β₃) = |g|)."""
    x = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    optimizer = scratchopt.Adan([x], lr=0.1)
    g = torch.tensor([0.5, -4.0, 2.0], dtype=torch.float64)
    x.grad = g.clone()
    optimizer.step()
    torch.testing.assert_close(
        x.detach(), torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64) - 0.1 * g / (g.abs() + 1e-8)
    )
    assert torch.equal(optimizer.state[x]["exp_avg_diff"], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(optimizer.state[x]["previous_grad"], -g)


def without_0d(dtype: torch.dtype) -> list[torch.Tensor]:
    """The hard set less its 0-d param, which the reference cannot clip (its c has shape (1,))."""
    return [p for p in hard_params(dtype) if p.dim() > 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
@pytest.mark.parametrize(
    "kwargs",
    [{"max_grad_norm": 1.0}, {"max_grad_norm": 1e3}, {"max_grad_norm": 0.5, "maximize": True, "weight_decay": 0.05}],
    ids=["clipping", "norm below the limit", "clipping, maximize, decay"],
)
def test_global_gradient_clipping_is_the_references(kwargs, dtype, monkeypatch):
    monkeypatch.setattr(parity, "gradients", parity.gradients_every_step)
    parity.run_side_by_side(
        "Adan",
        kwargs,
        dtype,
        steps=6,
        make_params=without_0d,
        reference=lambda params, **kw: pytorch_optimizer.Adan(params, **kw, foreach=False),
        schedule=True,
        ours_only=("step",),
    )


def kernel_sized(dtype: torch.dtype) -> list[torch.Tensor]:
    """Params above the kernel threshold (so that compiled and fused run their kernels) and a 0-d one."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen, dtype=dtype).requires_grad_() for shape in ((200, 100), (), (100,))]


@pytest.mark.parametrize("impl", [name for name in scratchopt.strategies.NAMES if name != "loop"])
def test_global_gradient_clipping_under_every_strategy(impl):
    """c = min(1, max_grad_norm/(G + ε)) scales every gradient, 0-d params included: every strategy
    against the loop."""
    compare_with_loop(
        scratchopt.Adan, {"max_grad_norm": 1.0}, impl, steps=4, make_params=kernel_sized, make_groups=list
    )


def test_the_clip_is_the_global_norm_over_every_group():
    """One step from zero state: m = (1 − β₁)·c·g and p = −c·g with c = max_grad_norm/‖(g₁, g₂)‖."""
    a, b = (
        torch.zeros(3, requires_grad=True, dtype=torch.float64),
        torch.zeros(1, requires_grad=True, dtype=torch.float64),
    )
    optimizer = scratchopt.Adan([{"params": [a]}, {"params": [b]}], max_grad_norm=1.0, eps=0.0)
    a.grad = torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)
    b.grad = torch.tensor([4.0], dtype=torch.float64)
    optimizer.step()
    c = 1.0 / 5.0
    torch.testing.assert_close(optimizer.state[a]["previous_grad"], -c * a.grad)
    torch.testing.assert_close(optimizer.state[b]["exp_avg"], (1 - 0.98) * c * b.grad)
    assert torch.equal(optimizer.state[a]["exp_avg_diff"], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_clipping_keeps_a_0d_half_precision_gradient_in_its_dtype(dtype):
    params = [torch.ones((), dtype=dtype, requires_grad=True), torch.ones(3, dtype=dtype, requires_grad=True)]
    optimizer = scratchopt.Adan(params, max_grad_norm=0.5)
    for p in params:
        p.grad = torch.full_like(p, 2.0)
    optimizer.step()
    assert all(optimizer.state[p]["exp_avg"].dtype == dtype for p in params)


@pytest.mark.parametrize("name", ["Adan", "AdEMAMix"])
def test_a_run_moves_between_the_reference_and_ours_through_the_state_dict(name):
    """The reference counts t per group, this one per param: a state_dict of either resumes in the other
    (where every param has a gradient at every step, the numbers are the reference's own run)."""
    reference_cls = getattr(pytorch_optimizer, name)
    torch.manual_seed(0)
    grads = [[torch.randn(4, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)] for _ in range(6)]

    def run(first, second):
        params = [
            torch.zeros(4, 3, dtype=torch.float64, requires_grad=True),
            torch.ones(3, dtype=torch.float64, requires_grad=True),
        ]
        optimizer = first(params, lr=0.01)
        for step in grads[:3]:
            for p, g in zip(params, step):
                p.grad = g.clone()
            optimizer.step()
        resumed = second(params, lr=0.01)
        resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for step in grads[3:]:
            for p, g in zip(params, step):
                p.grad = g.clone()
            resumed.step()
        return [p.detach().clone() for p in params]

    def reference(params, **kwargs):
        return reference_cls(params, **kwargs, foreach=False)

    expected = run(reference, reference)
    ours = getattr(scratchopt, name)
    for got in (run(reference, ours), run(ours, reference), run(ours, ours)):
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
