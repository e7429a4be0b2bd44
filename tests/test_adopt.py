"""ADOPT against the authors' implementation (``torch-adopt``'s ``adopt.ADOPT``, its for-loop), bit for bit
on the hard parameter set, every step, with a scheduler; and the paper's first two steps by hand."""

from __future__ import annotations

import pickle

import adopt
import pytest
import torch
from parity import run_side_by_side

import scratchopt

# The reference package calls torch helpers that torch 2.13 deprecates.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*is_compiling.*:UserWarning", "ignore:Use _accelerator_graph_capture_health_check:DeprecationWarning"
)

CONFIGS = {
    "default": {},
    "L2 decay": {"weight_decay": 0.1},
    "decoupled decay, maximize": {"weight_decay": 0.1, "decouple": True, "maximize": True},
    "no clip, small eps": {"clip_lambda": None, "eps": 1e-10, "betas": (0.8, 0.95)},
    "tensor lr": {"lr": torch.tensor(0.01)},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_the_loop_is_the_authors_for_loop(config, dtype):
    run_side_by_side(
        "ADOPT",
        CONFIGS[config],
        dtype,
        steps=8,
        reference=lambda params, **kwargs: adopt.ADOPT(params, **kwargs, foreach=False),
        schedule=True,
    )


def test_the_first_two_steps_follow_the_paper():
    """t = 1 only sets v = g²; t = 2 moves θ by γ·(1 − β₁)·clamp(g₂/|g₁|, ±1)."""
    x = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64, requires_grad=True)
    optimizer = scratchopt.ADOPT([x], lr=0.1, betas=(0.9, 0.99))
    first, second = (
        torch.tensor([0.5, 2.0, -0.1], dtype=torch.float64),
        torch.tensor([1.0, 0.5, 4.0], dtype=torch.float64),
    )
    x.grad = first
    optimizer.step()
    assert torch.equal(x.detach(), torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64))
    assert torch.equal(optimizer.state[x]["exp_avg_sq"], first**2)
    x.grad = second
    optimizer.step()
    m = 0.1 * (second / first.abs()).clamp(-1.0, 1.0)  # c(1) = 1
    torch.testing.assert_close(x.detach(), torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64) - 0.1 * m)
    torch.testing.assert_close(optimizer.state[x]["exp_avg_sq"], 0.99 * first**2 + 0.01 * second**2)


def test_a_state_dict_moves_between_scratchopt_and_the_reference():
    params = [torch.randn(4, 3, requires_grad=True)]
    ours = scratchopt.ADOPT(params, lr=0.01)
    for _ in range(3):
        params[0].grad = torch.randn(4, 3)
        ours.step()
    theirs = adopt.ADOPT([p.detach().clone().requires_grad_() for p in params], lr=0.01, foreach=False)
    theirs.load_state_dict(ours.state_dict())
    assert theirs.state[theirs.param_groups[0]["params"][0]]["step"].item() == 3
    assert pickle.loads(pickle.dumps(ours)).clip_lambda is scratchopt.algorithms.adopt.default_clip
    unclipped = scratchopt.ADOPT(params, lr=0.01, clip_lambda=None)
    unclipped.load_state_dict(ours.state_dict())  # torch's load_state_dict keeps what is not state
    assert unclipped.clip_lambda is None and pickle.loads(pickle.dumps(unclipped)).clip_lambda is None
