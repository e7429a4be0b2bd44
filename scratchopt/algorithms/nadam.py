r"""NAdam: Adam with Nesterov momentum (Dozat, 2016, "Incorporating Nesterov Momentum into Adam",
https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ).

Update at step t (1-based), for parameter θ with gradient g::

    g    ← −g                                  if maximize
    θ    ← θ·(1 − γ·λ)                         if λ ≠ 0 and decoupled (NAdamW)
    g    ← g + λ·θ                             if λ ≠ 0 and not decoupled (L2 penalty)
    μₜ   = β₁·(1 − ½·0.96^(t·ψ))               momentum schedule, and μₜ₊₁ likewise at t + 1
    Πₜ   ← Πₜ₋₁·μₜ                             product of the schedule (Π₀ = 1)
    m    ← m + (1 − β₁)·(g − m)                 first moment   (lerp: β₁·m + (1−β₁)·g)
    v    ← β₂·v + (1 − β₂)·g²                   second moment
    d    = √(v / (1 − β₂ᵗ)) + ε
    θ    ← θ − γ·(1 − μₜ)/(1 − Πₜ) · g/d
    θ    ← θ − γ·μₜ₊₁/(1 − Πₜ·μₜ₊₁) · m/d       Nesterov look-ahead on the momentum

=========  ===============================  ================================
symbol     argument                         state key
=========  ===============================  ================================
θ          params
g          ``param.grad``
γ          ``lr``
β₁, β₂     ``betas``
ε          ``eps``
λ          ``weight_decay``
—          ``decoupled_weight_decay``
ψ          ``momentum_decay``
t          —                                ``step`` (0-d float32 tensor)
Πₜ         —                                ``mu_product`` (0-d float32 tensor)
m          —                                ``exp_avg``
v          —                                ``exp_avg_sq``
=========  ===============================  ================================

Πₜ is not a state tensor of ``update``: like ``step`` it is bookkeeping, multiplied by μₜ in
:meth:`NAdam.count_step` and handed to ``update`` as a per-parameter scalar (a Python number in the loop).
It is stored as a float32 0-d tensor and so rounded to float32 at every step, as torch does; the step
sizes above are then computed from it in Python float64.

Deliberate differences from the paper, all torch's (and Keras's): the schedule decays with ψ
(``momentum_decay``, 0.004 by default) in the exponent; m is averaged with the constant β₁, so μₜ enters
only the two step sizes; ε is added after the bias correction of v, outside the root; the decoupled decay
(NAdamW) is an option the paper does not have. A complex parameter is updated as its real and imaginary
parts, the weight decay included.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from scratchopt.checks import check_adam_arguments, check_nonnegative
from scratchopt.ops import as_real, count_counters, get_value, read_scalars, scale_scalars, zeros_like
from scratchopt.optimizer import (
    ScratchOptimizer,
    new_step_counter,
    scalar_dtype,
    shared_arguments,
)


def momentum_cache(beta1: Any, step: Any, momentum_decay: float) -> Any:
    """μₜ = β₁·(1 − ½·0.96^(t·ψ)), in torch's operation order."""
    return beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))


def update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: Any,
    mu_product: Any,
    lr: Any,
    beta1: Any,
    beta2: Any,
    eps: float,
    weight_decay: float,
    momentum_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    if maximize:
        grad = -grad  # g ← −g
    param, grad, exp_avg, exp_avg_sq = as_real(param, grad, exp_avg, exp_avg_sq)
    bias_correction2 = 1 - beta2**step  # 1 − β₂ᵗ
    if weight_decay != 0:
        if decoupled_weight_decay:
            param.mul_(1 - lr * weight_decay)  # θ ← θ·(1 − γλ)
        else:
            grad = grad.add(param, alpha=weight_decay)  # g ← g + λθ
    mu = momentum_cache(beta1, step, momentum_decay)  # μₜ
    mu_next = momentum_cache(beta1, step + 1, momentum_decay)  # μₜ₊₁
    mu_product_next = mu_product * mu_next  # Πₜ·μₜ₊₁
    exp_avg.lerp_(grad, 1 - beta1)  # m ← m + (1 − β₁)(g − m)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v ← β₂v + (1 − β₂)g²
    denom = exp_avg_sq.div(bias_correction2).sqrt().add_(eps)  # d = √(v/(1 − β₂ᵗ)) + ε
    # θ ← θ − γ(1 − μₜ)/(1 − Πₜ)·g/d
    param.addcdiv_(grad, denom, value=(-lr * (1.0 - mu) / (1.0 - mu_product)))
    # θ ← θ − γμₜ₊₁/(1 − Πₜμₜ₊₁)·m/d
    param.addcdiv_(exp_avg, denom, value=(-lr * mu_next) / (1.0 - mu_product_next))


class NAdam(ScratchOptimizer):
    __doc__ = __doc__
    state_keys = ("exp_avg", "exp_avg_sq")
    nonnegative_state = frozenset({"exp_avg_sq"})
    hyperparameter_keys = ("lr", "betas", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay", "maximize")
    split_keys = {"betas": ("beta1", "beta2")}
    group_defaults = {"maximize": False, "decoupled_weight_decay": False}
    scalar_state_keys = ("step", "mu_product")
    sparse_error = "NAdam does not support sparse gradients"
    update = staticmethod(update)
    elementwise = True
    torch_twin = "NAdam"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        impl: str | None = None,
    ) -> None:
        check_adam_arguments(lr, eps, betas, weight_decay)
        check_nonnegative(momentum_decay, "momentum_decay")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "momentum_decay": momentum_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "maximize": maximize,
        }
        super().__init__(params, defaults, impl, foreach=foreach, capturable=capturable, differentiable=differentiable)

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        # mu_product lives where step lives: on the CPU unless capturable.
        mu_product = (
            torch.ones((), dtype=scalar_dtype(), device=param.device)
            if group["capturable"]
            else torch.tensor(1.0, dtype=scalar_dtype())
        )
        return {
            "step": new_step_counter(param, group),
            "mu_product": mu_product,
            "exp_avg": zeros_like(param),
            "exp_avg_sq": zeros_like(param),
        }

    def count_step(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        prepared = super().count_step(param, group)  # t ← t + 1
        mu_product = self.state[param]["mu_product"]
        # torch reads t as a Python number to compute μₜ, then multiplies the tensor in place.
        mu = momentum_cache(group["betas"][0], get_value(prepared["step"]), group["momentum_decay"])  # μₜ
        mu_product.mul_(mu)  # Πₜ ← Πₜ₋₁·μₜ
        return {**prepared, "mu_product": mu_product}

    def count_steps(self, params: list[Tensor], group: dict[str, Any]) -> list[dict[str, Any]]:
        # count_step for a whole group: every t and Π advanced by two multi-tensor ops and read back at
        # once, each μₜ computed once per distinct t.
        beta1 = group["betas"][0]
        states = self.states_of(params, group)
        products = [state["mu_product"] for state in states]
        if isinstance(beta1, Tensor) or read_scalars(products) is None:
            return super().count_steps(params, group)
        steps = count_counters([state["step"] for state in states])
        if steps is None:
            return super().count_steps(params, group)
        mu = {t: momentum_cache(beta1, t, group["momentum_decay"]) for t in set(steps)}  # μₜ
        products_now = scale_scalars(products, [mu[t] for t in steps])  # Πₜ ← Πₜ₋₁·μₜ
        assert products_now is not None  # they were read as scalars above
        return shared_arguments([{"step": t, "mu_product": product} for t, product in zip(steps, products_now)])
