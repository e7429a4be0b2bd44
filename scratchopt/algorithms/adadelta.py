r"""Adadelta: an adaptive learning rate from running means of squared gradients and squared updates.

Update at step t, for parameter θ with gradient g (Zeiler, ADADELTA: An Adaptive Learning Rate Method,
2012, https://arxiv.org/abs/1212.5701, Algorithm 1)::

    g   ← −g                                  if maximize
    g   ← g + λ·θ                             if λ ≠ 0 (L2 penalty)
    v   ← ρ·v + (1 − ρ)·g²                     running mean of the squared gradient
    Δ   ← √(u + ε) / √(v + ε) · g              the update (u from the previous step)
    u   ← ρ·u + (1 − ρ)·Δ²                     running mean of the squared update
    θ   ← θ − γ·Δ

=========  ==================  ===================================================
symbol     argument            state key
=========  ==================  ===================================================
θ          params
g          ``param.grad``
γ          ``lr``
ρ          ``rho``
ε          ``eps``
λ          ``weight_decay``
t          —                   ``step`` (0-d float32 tensor; counted, unused by the update)
v          —                   ``square_avg``
u          —                   ``acc_delta``
Δ          —                   — (a temporary)
=========  ==================  ===================================================

Deliberate differences from the paper, all torch's: the update is scaled by a learning rate γ (the
paper has none; the default γ = 1 gives the paper's rule); the L2 penalty and maximize are additions.
For a complex θ the moments are kept per real and imaginary part, and θ is updated in complex
arithmetic (torch views Δ back as complex before θ ← θ − γΔ).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from scratchopt.checks import check_eps, check_lr, check_nonnegative, require
from scratchopt.ops import as_real, zeros_like
from scratchopt.optimizer import ScratchOptimizer, new_step_counter


def update(
    param: Tensor,
    grad: Tensor,
    square_avg: Tensor,
    acc_delta: Tensor,
    *,
    step: Any,
    lr: Any,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    del step  # counted by the optimizer as torch counts it; Adadelta's arithmetic does not use it
    if maximize:
        grad = -grad  # g ← −g
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)  # g ← g + λθ
    # Δ's storage, typed like θ: torch computes Δ on real views and updates θ with Δ viewed as complex again.
    delta = acc_delta.clone()  # Δ ← u (for now)
    square_avg, acc_delta, grad, delta_real = as_real(square_avg, acc_delta, grad, delta)
    square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)  # v ← ρv + (1 − ρ)g²
    std = square_avg.add(eps).sqrt_()  # √(v + ε)
    delta_real.add_(eps).sqrt_().div_(std).mul_(grad)  # Δ ← √(u + ε)/√(v + ε)·g
    acc_delta.mul_(rho).addcmul_(delta_real, delta_real, value=1 - rho)  # u ← ρu + (1 − ρ)Δ²
    param.add_(delta, alpha=-lr)  # θ ← θ − γΔ


class Adadelta(ScratchOptimizer):
    __doc__ = __doc__
    state_keys = ("square_avg", "acc_delta")
    nonnegative_state = frozenset({"square_avg", "acc_delta"})
    hyperparameter_keys = ("lr", "rho", "eps", "weight_decay", "maximize")
    group_defaults = {"maximize": False}
    sparse_error = "Adadelta does not support sparse gradients"
    update = staticmethod(update)
    elementwise = True
    torch_twin = "Adadelta"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
        impl: str | None = None,
    ) -> None:
        check_lr(lr)
        require(0.0 <= rho <= 1.0, "rho value", rho, "0 <= rho <= 1")
        check_eps(eps)
        check_nonnegative(weight_decay, "weight_decay")
        defaults = {
            "lr": lr,
            "rho": rho,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
        }
        super().__init__(params, defaults, impl, capturable=capturable, foreach=foreach, differentiable=differentiable)

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": new_step_counter(param, group),
            "square_avg": zeros_like(param),
            "acc_delta": zeros_like(param),
        }
