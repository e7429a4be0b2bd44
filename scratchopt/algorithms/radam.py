r"""RAdam: rectified Adam (Liu et al., 2020, "On the Variance of the Adaptive Learning Rate and Beyond",
https://arxiv.org/abs/1908.03265).

Update at step t (1-based), for parameter θ with gradient g::

    g    ← −g                                  if maximize
    θ    ← θ·(1 − γ·λ)                         if λ ≠ 0 and decoupled
    g    ← g + λ·θ                             if λ ≠ 0 and not decoupled (L2 penalty)
    m    ← m + (1 − β₁)·(g − m)                 first moment   (lerp: β₁·m + (1−β₁)·g)
    v    ← β₂·v + (1 − β₂)·g²                   second moment
    m̂    = m / (1 − β₁ᵗ)                        bias-corrected first moment
    ρ∞   = 2/(1 − β₂) − 1                       maximum length of the approximated SMA
    ρₜ   = ρ∞ − 2t·β₂ᵗ/(1 − β₂ᵗ)                length of the approximated SMA at step t
    r    = √((ρₜ−4)(ρₜ−2)ρ∞ / ((ρ∞−4)(ρ∞−2)ρₜ))   variance rectification, if ρₜ > 5
    l    = √(1 − β₂ᵗ) / (√v + ε)                adaptive learning rate, if ρₜ > 5
    θ    ← θ − γ·m̂·l·r                          if ρₜ > 5
    θ    ← θ − γ·m̂                              otherwise (un-adapted momentum SGD)

ρ∞, ρₜ and r depend only on β₂ and t, so the branch is taken on Python numbers, never on tensor data.

=========  ==========================  ================================
symbol     argument                    state key
=========  ==========================  ================================
θ          params
g          ``param.grad``
γ          ``lr``
β₁, β₂     ``betas``
ε          ``eps``
λ          ``weight_decay``
—          ``decoupled_weight_decay``
t          —                           ``step`` (0-d float32 tensor)
m          —                           ``exp_avg``
v          —                           ``exp_avg_sq``
=========  ==========================  ================================

Deliberate differences from the paper, all torch's: the rectified update is used when ρₜ > 5 (the paper's
Algorithm 2 tests ρₜ > 4); ε is added to √v before the bias correction (the paper has no ε); the
decoupled decay is an option the paper does not have. A complex parameter is updated as its real and
imaginary parts, the weight decay included.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from scratchopt.checks import check_adam_arguments
from scratchopt.ops import as_real, zeros_like
from scratchopt.optimizer import ScratchOptimizer, new_step_counter


def update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: Any,
    lr: Any,
    beta1: Any,
    beta2: Any,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    if maximize:
        grad = -grad  # g ← −g
    param, grad, exp_avg, exp_avg_sq = as_real(param, grad, exp_avg, exp_avg_sq)
    if weight_decay != 0:
        if decoupled_weight_decay:
            param.mul_(1 - lr * weight_decay)  # θ ← θ·(1 − γλ)
        else:
            grad = grad.add(param, alpha=weight_decay)  # g ← g + λθ
    exp_avg.lerp_(grad, 1 - beta1)  # m ← m + (1 − β₁)(g − m)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v ← β₂v + (1 − β₂)g²
    bias_correction1 = 1 - beta1**step  # 1 − β₁ᵗ
    bias_correction2 = 1 - beta2**step  # 1 − β₂ᵗ
    bias_corrected_exp_avg = exp_avg.div(bias_correction1)  # m̂ = m/(1 − β₁ᵗ)
    rho_inf = 2 / (1 - beta2) - 1  # ρ∞ = 2/(1 − β₂) − 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2  # ρₜ = ρ∞ − 2tβ₂ᵗ/(1 − β₂ᵗ)
    if rho_t > 5.0:
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5  # r
        # l = √(1 − β₂ᵗ)/(√v + ε), computed as torch's `number / tensor` is: a reciprocal, then a product
        adaptive_lr = exp_avg_sq.sqrt().add_(eps).reciprocal_().mul_(bias_correction2**0.5)  # l
        param.add_(bias_corrected_exp_avg.mul(lr).mul(adaptive_lr).mul(rect), alpha=-1.0)  # θ ← θ − γ·m̂·l·r
    else:
        param.add_(bias_corrected_exp_avg.mul(lr), alpha=-1.0)  # θ ← θ − γ·m̂


class RAdam(ScratchOptimizer):
    __doc__ = __doc__
    state_keys = ("exp_avg", "exp_avg_sq")
    nonnegative_state = frozenset({"exp_avg_sq"})
    hyperparameter_keys = ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "maximize")
    split_keys = {"betas": ("beta1", "beta2")}
    group_defaults = {"maximize": False, "decoupled_weight_decay": False}
    sparse_error = "RAdam does not support sparse gradients"
    update = staticmethod(update)
    elementwise = True
    torch_twin = "RAdam"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        impl: str | None = None,
    ) -> None:
        check_adam_arguments(lr, eps, betas, weight_decay)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults, impl, foreach=foreach, capturable=capturable, differentiable=differentiable)

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return {"step": new_step_counter(param, group), "exp_avg": zeros_like(param), "exp_avg_sq": zeros_like(param)}
