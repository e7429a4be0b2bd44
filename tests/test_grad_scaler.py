"""``torch.amp.GradScaler`` with scratchopt: torch's fused-optimizer contract (``_step_supports_amp_scaling``,
``grad_scale`` and ``found_inf`` read in the step), against torch's fused AdamW under the same scaler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import scratchopt
from scratchopt.strategies import NAMES
from scratchopt.testing import assert_same_state


def _train(make: Callable[[Any], torch.optim.Optimizer], unscale_first: bool = False) -> tuple[Any, ...]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = make(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    data = torch.randn(32, 8), torch.randn(32, 1)
    for step in range(6):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(data[0]), data[1])
        if step == 2:
            loss = loss * float("inf")  # the scaler finds an inf: the step is skipped, the scale halves
        scaler.scale(loss).backward()
        if unscale_first:  # the gradient-clipping pattern: unscale, clip, then step
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
    return model, optimizer, scaler


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaler.step", "unscale_ and clip first"])
@pytest.mark.parametrize("impl", NAMES)
def test_grad_scaler_steps_like_torch_fused(impl, unscale_first):
    assert scratchopt.AdamW._step_supports_amp_scaling
    theirs = _train(lambda p: torch.optim.AdamW(p, lr=0.01, fused=True), unscale_first)
    ours = _train(lambda p: scratchopt.AdamW(p, lr=0.01, impl=impl), unscale_first)
    params = [list(model.parameters()) for model in (ours[0], theirs[0])]
    assert_same_state(ours[1], theirs[1], params[0], params[1], f"{impl} under GradScaler", exact=False)
    assert [s["step"].item() for s in ours[1].state.values()] == [5.0] * 4  # the inf step was skipped
    assert ours[2].get_scale() == theirs[2].get_scale()
    assert not hasattr(ours[1], "grad_scale") and not hasattr(ours[1], "found_inf")  # the scaler removed them


def test_a_skipped_step_changes_nothing():
    param = torch.ones(3, requires_grad=True)
    optimizer = scratchopt.Adam([param], lr=0.1)
    param.grad = torch.ones(3)
    optimizer.step()
    before = param.detach().clone(), optimizer.state[param]["step"].clone()
    optimizer.found_inf, optimizer.grad_scale = torch.ones(()), torch.full((), 4.0)
    param.grad = torch.ones(3)
    optimizer.step()
    assert torch.equal(param.detach(), before[0]) and torch.equal(optimizer.state[param]["step"], before[1])
    assert torch.equal(param.grad, torch.ones(3))  # not unscaled either
