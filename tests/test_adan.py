"""Adan against ``pytorch-optimizer``'s Adan (its per-parameter path), bit for bit at every step on the
hard parameter set with a scheduler, where every param has a gradient at every step (the package counts
t per group, this module per param: ``tests/test_ademamix.py`` pins the same difference)."""

from __future__ import annotations

import parity
import pytest
import pytorch_optimizer
import torch

import scratchopt

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


def test_global_gradient_clipping_is_refused():
    with pytest.raises(NotImplementedError, match="max_grad_norm > 0"):
        scratchopt.Adan([torch.zeros(2, requires_grad=True)], max_grad_norm=1.0)
