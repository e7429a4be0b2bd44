r"""AdEMAMix: Adam with a second, slow EMA of the gradients mixed into the step (Pagliardini, Ablin &
Grangier, 2024, "The AdEMAMix Optimizer: Better, Faster, Older", https://arxiv.org/abs/2409.03137,
Algorithm 1).

Step t (1-based), for parameter θ with gradient g::

    g    ← −g                                   if maximize
    θ    ← θ·(1 − γ·λ)                          if λ ≠ 0 and decoupled (γλ → λ with fixed_decay)
    g    ← g + λ·θ                              if λ ≠ 0 and not decoupled (L2 penalty)
    αₜ   = min(t·α / T, α)                       the slow EMA's weight, warmed up over T steps
    β₃ₜ  = min(exp(ln β₁·ln β₃ / ((1 − t/T)·ln β₃ + (t/T)·ln β₁)), β₃)   its decay, warmed up likewise
    m₁   ← m₁ + (1 − β₁)·(g − m₁)               fast EMA (lerp)
    ν    ← β₂·ν + (1 − β₂)·g²                   second moment
    m₂   ← m₂ + (1 − β₃ₜ)·(g − m₂)              slow EMA (lerp)
    d    = √ν / √(1 − β₂ᵗ) + ε
    θ    ← θ − γ·(m₁ / (1 − β₁ᵗ) + αₜ·m₂) / d

Without T (``t_alpha_beta3=None``) αₜ = α and β₃ₜ = β₃ from the first step.

=========  ===============================  ================================
symbol     argument                         state key
=========  ===============================  ================================
θ          params
g          ``param.grad``
γ          ``lr``
β₁, β₂, β₃ ``betas``
α          ``alpha``
T          ``t_alpha_beta3``
ε          ``eps``
λ          ``weight_decay``
—          ``weight_decouple``, ``fixed_decay``
t          —                                ``step`` (0-d float32 tensor)
m₁         —                                ``exp_avg``
ν          —                                ``exp_avg_sq``
m₂         —                                ``exp_avg_slow``
=========  ===============================  ================================

The schedules and the bias corrections are Python arithmetic of t, computed once per step in
:meth:`AdEMAMix.step_arguments` and passed to ``update`` as numbers, as the reference computes them once per
group. The reference is ``pytorch-optimizer``'s AdEMAMix, whose signature, defaults, state keys and
operation order this module follows: bit for bit equal to its per-parameter path where every param has a
gradient at every step (``tests/test_ademamix.py``). Where a param misses steps the two differ by design:
``pytorch-optimizer`` counts t per param group, this module (like the authors' code and torch) per
param, so a param that missed steps keeps its own bias correction; the test kit checks that against the
paper's equations on the hard parameter set. The state_dict also says each group's t, and one of the
reference's gives each param its group's, so a run moves between the two (``tests/test_adan.py``). In float16 and bfloat16 the step is divided first and added
after, as the reference does. A complex parameter is updated as its real and imaginary parts (the
reference refuses one).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from scratchopt.checks import check_betas, check_lr, check_nonnegative
from scratchopt.ops import as_real, get_value, zeros_like
from scratchopt.optimizer import ScratchOptimizer, new_step_counter


def schedules(step: float, alpha: float, beta1: float, beta3: float, warmup: float | None) -> tuple[float, float]:
    """(αₜ, β₃ₜ): the slow EMA's weight and decay at step t, in the reference's arithmetic."""
    if warmup is None:
        return alpha, beta3
    alpha_t = min(step * alpha / warmup, alpha)
    log_beta1, log_beta3 = math.log(beta1), math.log(beta3)
    fraction = step / warmup
    beta3_t = min(math.exp(log_beta1 * log_beta3 / ((1.0 - fraction) * log_beta3 + fraction * log_beta1)), beta3)
    return alpha_t, beta3_t


def update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    exp_avg_slow: Tensor,
    *,
    bias_correction1: float,
    bias_correction2_sqrt: float,
    alpha_t: float,
    beta3_t: float,
    lr: Any,
    beta1: float,
    beta2: float,
    beta3: float,  # enters through β₃ₜ, its warmed-up value
    eps: float,
    weight_decay: float,
    weight_decouple: bool,
    fixed_decay: bool,
    maximize: bool,
) -> None:
    if maximize:
        grad = -grad  # g ← −g
    param, grad, exp_avg, exp_avg_sq, exp_avg_slow = as_real(param, grad, exp_avg, exp_avg_sq, exp_avg_slow)
    if weight_decay != 0:
        if weight_decouple:
            param.mul_(1.0 - weight_decay * (1.0 if fixed_decay else lr))  # θ ← θ(1 − γλ)
        else:
            grad = grad.add(param, alpha=weight_decay)  # g ← g + λθ
    exp_avg.lerp_(grad, 1.0 - beta1)  # m₁ ← m₁ + (1 − β₁)(g − m₁)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)  # ν ← β₂ν + (1 − β₂)g²
    exp_avg_slow.lerp_(grad, 1.0 - beta3_t)  # m₂ ← m₂ + (1 − β₃ₜ)(g − m₂)
    denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)  # d = √ν/√(1 − β₂ᵗ) + ε
    direction = exp_avg.div(bias_correction1).add_(exp_avg_slow, alpha=alpha_t)  # m₁/(1 − β₁ᵗ) + αₜm₂
    if param.dtype in (torch.float16, torch.bfloat16):  # the reference divides first in 16 bits
        param.add_(direction.div_(denom), alpha=-lr)
    else:
        param.addcdiv_(direction, denom, value=-lr)  # θ ← θ − γ·direction/d


class AdEMAMix(ScratchOptimizer):
    __doc__ = __doc__
    state_keys = ("exp_avg", "exp_avg_sq", "exp_avg_slow")
    nonnegative_state = frozenset({"exp_avg_sq"})
    hyperparameter_keys = ("lr", "betas", "eps", "weight_decay", "weight_decouple", "fixed_decay", "maximize")
    split_keys = {"betas": ("beta1", "beta2", "beta3")}
    group_defaults = {"maximize": False}
    sparse_error = "AdEMAMix does not support sparse gradients"
    update = staticmethod(update)
    elementwise = True
    reference_counts_per_group = True
    reference_class = "pytorch_optimizer:AdEMAMix"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        weight_decay: float = 0.0,
        weight_decouple: bool = False,
        fixed_decay: bool = False,
        alpha: float = 5.0,
        t_alpha_beta3: float | None = None,
        eps: float = 1e-8,
        maximize: bool = False,
        foreach: bool | None = None,
        *,
        impl: str | None = None,
    ) -> None:
        check_lr(lr)
        check_betas(betas)
        check_nonnegative(alpha, "alpha")
        if t_alpha_beta3 is not None:
            check_nonnegative(t_alpha_beta3, "t_alpha_beta3")
        check_nonnegative(weight_decay, "weight_decay")
        check_nonnegative(eps, "eps")
        defaults = {
            "lr": lr,
            "betas": betas,
            "weight_decay": weight_decay,
            "weight_decouple": weight_decouple,
            "fixed_decay": fixed_decay,
            "alpha": alpha,
            "t_alpha_beta3": t_alpha_beta3,
            "eps": eps,
            "maximize": maximize,
        }
        super().__init__(params, defaults, impl, foreach=foreach)

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": new_step_counter(param, group),
            "exp_avg": zeros_like(param),
            "exp_avg_sq": zeros_like(param),
            "exp_avg_slow": zeros_like(param),
        }

    def step_arguments(self, step: Any, group: dict[str, Any]) -> dict[str, Any]:
        step = get_value(step)
        beta1, beta2, beta3 = group["betas"]
        alpha_t, beta3_t = schedules(step, group["alpha"], beta1, beta3, group["t_alpha_beta3"])
        return {
            "bias_correction1": 1.0 - math.pow(beta1, step),  # 1 − β₁ᵗ
            "bias_correction2_sqrt": math.sqrt(1.0 - math.pow(beta2, step)),  # √(1 − β₂ᵗ)
            "alpha_t": alpha_t,
            "beta3_t": beta3_t,
        }
