r"""Adamax: Adam with an infinity-norm second moment (Kingma & Ba, 2015, §7.1, https://arxiv.org/abs/1412.6980).

Update at step t (1-based), for parameter θ with gradient g::

    g   ← −g                                  if maximize
    g   ← g + λ·θ                             if λ ≠ 0 (L2 penalty)
    m   ← m + (1 − β₁)·(g − m)                 first moment   (lerp: β₁·m + (1−β₁)·g)
    u   ← max(β₂·u, |g| + ε)                   exponentially weighted infinity norm
    θ   ← θ − γ/(1 − β₁ᵗ) · m / u

=========  ==========================  ================================
symbol     argument                    state key
=========  ==========================  ================================
θ          params
g          ``param.grad``
γ          ``lr``
β₁, β₂     ``betas``
ε          ``eps``
λ          ``weight_decay``
t          —                           ``step`` (0-d float32 tensor)
m          —                           ``exp_avg``
u          —                           ``exp_inf``
=========  ==========================  ================================

Deliberate differences from the paper (Algorithm 2), all torch's: ε is added to |g| inside the max, so u
is never 0 and the division needs no guard (the paper has u ← max(β₂·u, |g|)); the bias correction of m
is folded into the step size. A complex parameter is updated as its real and imaginary parts, so |g| is
taken per part, not as the complex modulus; the L2 term is added before that split, in complex arithmetic.
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
    exp_inf: Tensor,
    *,
    step: Any,
    lr: Any,
    beta1: Any,
    beta2: Any,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    if maximize:
        grad = -grad  # g ← −g
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)  # g ← g + λθ
    param, grad, exp_avg, exp_inf = as_real(param, grad, exp_avg, exp_inf)
    exp_avg.lerp_(grad, 1 - beta1)  # m ← m + (1 − β₁)(g − m)
    exp_inf.mul_(beta2)  # u ← β₂u
    exp_inf.copy_(exp_inf.maximum(grad.abs().add_(eps)))  # u ← max(β₂u, |g| + ε)
    param.addcdiv_(exp_avg, exp_inf, value=-(lr / (1 - beta1**step)))  # θ ← θ − γ/(1 − β₁ᵗ)·m/u


class Adamax(ScratchOptimizer):
    __doc__ = __doc__
    state_keys = ("exp_avg", "exp_inf")
    nonnegative_state = frozenset({"exp_inf"})
    hyperparameter_keys = ("lr", "betas", "eps", "weight_decay", "maximize")
    split_keys = {"betas": ("beta1", "beta2")}
    group_defaults = {"maximize": False}
    sparse_error = "Adamax does not support sparse gradients"
    update = staticmethod(update)
    elementwise = True
    torch_twin = "Adamax"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        impl: str | None = None,
    ) -> None:
        check_adam_arguments(lr, eps, betas, weight_decay)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
        }
        super().__init__(params, defaults, impl, foreach=foreach, differentiable=differentiable, capturable=capturable)

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return {"step": new_step_counter(param, group), "exp_avg": zeros_like(param), "exp_inf": zeros_like(param)}
