"""AdEMAMix against ``pytorch-optimizer``'s AdEMAMix (its per-parameter path), bit for bit at every step
on the hard parameter set with a scheduler, and against the paper's Algorithm 1 written element by element
on the full hard set (a param that misses steps keeps its own t here; the package counts per group)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import pytorch_optimizer
import torch
from parity import run_side_by_side
from torch import Tensor

import scratchopt
from scratchopt.testing import check_optimizer, hard_params

CONFIGS = {
    "default": {},
    "warm-up": {"t_alpha_beta3": 5.0, "alpha": 8.0, "betas": (0.8, 0.95, 0.999)},
    "L2 decay, maximize": {"weight_decay": 0.1, "maximize": True},
    "decoupled decay": {"weight_decay": 0.1, "weight_decouple": True},
    "fixed decay, tensor lr": {
        "weight_decay": 0.01,
        "weight_decouple": True,
        "fixed_decay": True,
        "lr": torch.tensor(0.01),
    },
}


def _reference(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    return pytorch_optimizer.AdEMAMix(params, **kwargs, foreach=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_the_loop_is_pytorch_optimizers_per_parameter_path(config, dtype, monkeypatch):
    import parity

    monkeypatch.setattr(parity, "gradients", parity.gradients_every_step)
    run_side_by_side(
        "AdEMAMix", CONFIGS[config], dtype, steps=8, reference=_reference, schedule=True, ours_only=("step",)
    )


def paper_reference(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    betas: tuple[float, float, float],
    alpha: float,
    t_alpha_beta3: float | None,
    eps: float,
    weight_decay: float,
    weight_decouple: bool,
    fixed_decay: bool,
    maximize: bool,
    **_: Any,
) -> None:
    """Algorithm 1 of Pagliardini et al. (2024), element by element in Python floats, its own t per tensor."""
    beta1, beta2, beta3 = betas
    t = state["t"] = state.get("t", 0) + 1
    if t_alpha_beta3 is None:
        alpha_t, beta3_t = alpha, beta3
    else:
        alpha_t = min(t * alpha / t_alpha_beta3, alpha)
        ratio = t / t_alpha_beta3
        exponent = math.log(beta1) * math.log(beta3) / ((1 - ratio) * math.log(beta3) + ratio * math.log(beta1))
        beta3_t = min(math.exp(exponent), beta3)
    theta = param.detach().double().flatten().tolist()
    g = (-grad if maximize else grad).double().flatten().tolist()
    size = len(theta)
    m1, nu, m2 = (state.get(k, [0.0] * size) for k in ("m1", "nu", "m2"))
    out = []
    for i in range(size):
        th, gi = theta[i], g[i]
        if weight_decay and weight_decouple:
            th *= 1 - weight_decay * (1 if fixed_decay else lr)
        elif weight_decay:
            gi += weight_decay * th
        m1[i] = beta1 * m1[i] + (1 - beta1) * gi
        nu[i] = beta2 * nu[i] + (1 - beta2) * gi * gi
        m2[i] = beta3_t * m2[i] + (1 - beta3_t) * gi
        denom = math.sqrt(nu[i]) / math.sqrt(1 - beta2**t) + eps
        out.append(th - lr * (m1[i] / (1 - beta1**t) + alpha_t * m2[i]) / denom)
    state.update(m1=m1, nu=nu, m2=m2)
    param.copy_(torch.tensor(out, dtype=torch.float64).reshape(param.shape))


@pytest.mark.parametrize("config", ["default", "warm-up", "decoupled decay"])
def test_every_strategy_and_the_paper_on_the_hard_set(config):
    """The kit: every strategy against the loop (real kernels), state_dict, scheduler, and the paper's
    equations on the hard set, where param 3 misses every third step."""
    ran = check_optimizer(
        scratchopt.AdEMAMix, CONFIGS[config], reference=paper_reference, dtypes=(torch.float64,), steps=10
    )
    assert "reference" in ran and any("fused == loop" in check and "a kernel ran" in check for check in ran), ran


def test_the_package_counts_steps_per_group_and_this_module_per_param():
    """Why the package is compared on gradients at every step: with a param that misses steps, the two
    conventions part (and the paper's per-tensor equations side with this module, above)."""
    params = hard_params(torch.float64)
    twins = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    ours, theirs = scratchopt.AdEMAMix(params), _reference(twins)
    for step in range(4):
        for group in (params, twins):
            for index, p in enumerate(group):
                p.grad = None if not p.requires_grad or (index == 3 and step == 1) else torch.ones_like(p)
        ours.step()
        theirs.step()
    assert ours.state[params[3]]["step"].item() == 3 and theirs.param_groups[0]["step"] == 4
    assert not torch.equal(params[3], twins[3]) and torch.equal(params[0], twins[0])
