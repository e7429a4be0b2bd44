r"""Adan: adaptive Nesterov momentum (Xie et al., 2022, "Adan: Adaptive Nesterov Momentum Algorithm for
Faster Optimizing Deep Models", https://arxiv.org/abs/2208.06677, Algorithm 1).

Step t (1-based), for parameter θ with gradient g; p holds −gₜ₋₁ (−g₁ before the first step, so that
the first difference is zero)::

    g    ← −g                                   if maximize
    Δ    = g + p                                the gradient difference gₜ − gₜ₋₁
    m    ← m + (1 − β₁)·(g − m)                  first moment (lerp)
    n    ← n + (1 − β₂)·(Δ − n)                  moment of the differences (lerp)
    u    = g + β₂·Δ                             the Nesterov-corrected gradient
    v    ← β₃·v + (1 − β₃)·u²                   second moment of it
    d    = √v / √(1 − β₃ᵗ) + ε
    θ    ← θ·(1 − γ·λ)                          if λ ≠ 0 and decoupled
    θ    ← θ − γ/(1 − β₁ᵗ)·m/d − γ·β₂/(1 − β₂ᵗ)·n/d
    θ    ← θ / (1 + γ·λ)                        if λ ≠ 0 and not decoupled (the paper's proximal decay)
    p    ← −g

=========  ===============================  ================================
symbol     argument                         state key
=========  ===============================  ================================
θ          params
g          ``param.grad``
γ          ``lr``
β₁, β₂, β₃ ``betas``
ε          ``eps``
λ          ``weight_decay``
—          ``weight_decouple``
t          —                                ``step`` (0-d float32 tensor)
m          —                                ``exp_avg``
n          —                                ``exp_avg_diff``
v          —                                ``exp_avg_sq``
p          —                                ``previous_grad`` (−gₜ₋₁, as the reference keeps it)
=========  ===============================  ================================

The reference is ``pytorch-optimizer``'s Adan (its per-parameter path), whose signature, defaults, state
keys and operation order this module follows: bit for bit equal to it where every param has a gradient
at every step (``tests/test_adan.py``); like AdEMAMix here, t is counted per param, the reference counts
per group (the state_dict also says each group's t, and one of the reference's gives each param its
group's, so a run moves between the two). Its global gradient-norm clipping (``max_grad_norm > 0``) scales every gradient by
c = min(1, max_grad_norm/(G + ε)), G the 2-norm of every gradient of every group summed as the
reference sums it (:meth:`Adan.reduce`; p starts from −c·g₁, so the first difference is still zero);
each group uses its own ``max_grad_norm`` and ε, where the reference reads its constructor's (the same
unless a group overrides them). The reference cannot clip a 0-d parameter (its c has shape (1,)); this
one can. As in the reference, p starts from the first gradient before ``maximize`` negates it, so
with ``maximize`` the first difference is −2g rather than zero. A complex parameter is updated as its
real and imaginary parts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from scratchopt.checks import check_betas, check_lr, check_nonnegative
from scratchopt.ops import as_real, get_value, global_gradient_norm, zeros_like
from scratchopt.optimizer import ScratchOptimizer, new_step_counter


def update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    exp_avg_diff: Tensor,
    previous_grad: Tensor,
    *,
    bias_correction1: float,
    bias_correction2: float,
    bias_correction3_sqrt: float,
    lr: Any,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    weight_decay: float,
    weight_decouple: bool,
    maximize: bool,
    grad_scale: Any = None,
) -> None:
    if maximize:
        grad = -grad  # g ← −g
    param, grad, exp_avg, exp_avg_sq, exp_avg_diff, previous_grad = as_real(
        param, grad, exp_avg, exp_avg_sq, exp_avg_diff, previous_grad
    )
    if grad_scale is not None:
        grad = grad.clone().mul_(grad_scale)  # g ← c·g (global norm clipping), in the gradient's dtype
    difference = previous_grad.add(grad)  # Δ = g + p = gₜ − gₜ₋₁
    exp_avg.lerp_(grad, 1.0 - beta1)  # m ← m + (1 − β₁)(g − m)
    exp_avg_diff.lerp_(difference, 1.0 - beta2)  # n ← n + (1 − β₂)(Δ − n)
    corrected = difference.mul_(beta2).add_(grad)  # u = g + β₂Δ
    exp_avg_sq.mul_(beta3).addcmul_(corrected, corrected, value=1.0 - beta3)  # v ← β₃v + (1 − β₃)u²
    denom = exp_avg_sq.sqrt().div_(bias_correction3_sqrt).add_(eps)  # d = √v/√(1 − β₃ᵗ) + ε
    if weight_decay != 0 and weight_decouple:
        param.mul_(1.0 - lr * weight_decay)  # θ ← θ(1 − γλ)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)  # θ ← θ − γ/(1 − β₁ᵗ)·m/d
    param.addcdiv_(exp_avg_diff, denom, value=-lr * beta2 / bias_correction2)  # θ ← θ − γβ₂/(1 − β₂ᵗ)·n/d
    if weight_decay != 0 and not weight_decouple:
        param.div_(1.0 + lr * weight_decay)  # θ ← θ/(1 + γλ)
    previous_grad.copy_(grad.neg())  # p ← −g


class Adan(ScratchOptimizer):
    __doc__ = __doc__
    state_keys = ("exp_avg", "exp_avg_sq", "exp_avg_diff", "previous_grad")
    nonnegative_state = frozenset({"exp_avg_sq"})
    hyperparameter_keys = ("lr", "betas", "eps", "weight_decay", "weight_decouple", "maximize")
    split_keys = {"betas": ("beta1", "beta2", "beta3")}
    group_defaults = {"maximize": False}
    sparse_error = "Adan does not support sparse gradients"
    update = staticmethod(update)
    elementwise = True
    reference_counts_per_group = True
    reference_class = "pytorch_optimizer:Adan"
    reduced_arguments = ("grad_scale",)

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
        weight_decay: float = 0.0,
        weight_decouple: bool = False,
        max_grad_norm: float = 0.0,
        foreach: bool | None = None,
        eps: float = 1e-8,
        maximize: bool = False,
        *,
        impl: str | None = None,
    ) -> None:
        check_lr(lr)
        check_betas(betas)
        check_nonnegative(weight_decay, "weight_decay")
        check_nonnegative(max_grad_norm, "max_grad_norm")
        check_nonnegative(eps, "eps")
        defaults = {
            "lr": lr,
            "betas": betas,
            "weight_decay": weight_decay,
            "weight_decouple": weight_decouple,
            "max_grad_norm": max_grad_norm,
            "eps": eps,
            "maximize": maximize,
        }
        super().__init__(params, defaults, impl, foreach=foreach)

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        grad = param.grad
        assert grad is not None  # the first step of a param with a gradient creates its state
        return {
            "step": new_step_counter(param, group),
            "exp_avg": zeros_like(param),
            "exp_avg_sq": zeros_like(param),
            "exp_avg_diff": zeros_like(param),
            "previous_grad": grad.clone().mul_(-1.0),  # −g₁: the first difference is zero
        }

    @property
    def reduces(self) -> bool:
        """Only where a group clips by the global gradient norm."""
        return any(group.get("max_grad_norm", 0) != 0 for group in self.param_groups)

    def reduce(self, groups: list[tuple[dict[str, Any], list[Tensor]]]) -> list[dict[str, Any]] | None:
        """c for each group that clips, from G over the gradients of all groups; a param's state starts
        here where it clips, with p = −c·g₁."""
        grads = [p.grad for _, params in groups for p in params if p.grad is not None]
        device = next((p.device for group, _ in groups for p in group["params"]), torch.device("cpu"))
        norm = global_gradient_norm(grads, device)  # G
        found: list[dict[str, Any]] = []
        for group, params in groups:
            if group["max_grad_norm"] == 0:
                found.append({})
                continue
            clip = torch.clamp(group["max_grad_norm"] / norm.add(group["eps"]), max=1.0).squeeze(0)  # c
            for p in params:
                state = self.state[p]
                if not state:
                    state.update(self.new_state(p, group))
                    state["previous_grad"].mul_(clip)  # p = −c·g₁
            found.append({"grad_scale": clip})
        return found

    def step_arguments(self, step: Any, group: dict[str, Any]) -> dict[str, Any]:
        t = get_value(step)
        beta1, beta2, beta3 = group["betas"]
        return {
            "bias_correction1": 1.0 - math.pow(beta1, t),  # 1 − β₁ᵗ
            "bias_correction2": 1.0 - math.pow(beta2, t),  # 1 − β₂ᵗ
            "bias_correction3_sqrt": math.sqrt(1.0 - math.pow(beta3, t)),  # √(1 − β₃ᵗ)
        }
