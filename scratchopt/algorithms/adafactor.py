r"""Adafactor: adaptive step sizes from a factored second moment (Shazeer & Stern, "Adafactor: Adaptive
Learning Rates with Sublinear Memory Cost", ICML 2018, https://arxiv.org/abs/1804.04235).

Step t (1-based), for parameter θ with gradient G; a parameter of two or more dimensions keeps only a
row and a column mean of G² over its last two dimensions, a vector (or 0-d) parameter keeps all of it::

    G   ← −G                                      if maximize
    β̂   = 1 − t^τ                                 so 1 − β̂ = t^τ
    ρ   = min(γ, 1/√t)                            relative step size
    a   = max(ε₂, RMS(θ))·ρ                       absolute step size, from θ before the decay
    θ   ← θ·(1 − γ·λ)                             if λ ≠ 0 (decoupled weight decay)
    R   ← R + t^τ·(mean(G², last dim) − R)        if dim ≥ 2 (lerp)
    C   ← C + t^τ·(mean(G², dim −2) − C)          if dim ≥ 2 (lerp)
    V   = R·C / max(mean(R, dim −2), ε₁)          if dim ≥ 2 (outer product over the last two dims)
    V   ← V + t^τ·(G² − V)                        otherwise, and V is the state itself
    U   = G / √max(V, ε₁²)
    θ   ← θ − a / max(1, RMS(U)/d) · U            update clipping

with RMS(x) = ‖x‖₂/√numel(x) and ε₁ = the machine epsilon of the parameter's dtype when ``eps[0]`` is
None.

=========  ================================  ===============================================
symbol     argument                          state key
=========  ================================  ===============================================
θ          params
G          ``param.grad``
γ          ``lr``
τ          ``beta2_decay``
ε₁, ε₂     ``eps``
d          ``d``
λ          ``weight_decay``
t          —                                 ``step`` (0-d float32 tensor, on the CPU)
R          — (dim ≥ 2)                       ``row_var`` (G's shape with the last dim 1)
C          — (dim ≥ 2)                       ``col_var`` (G's shape with dim −2 of size 1)
V          — (dim ≤ 1)                       ``variance``
ρ, a, U    —                                 — (temporaries)
=========  ================================  ===============================================

Not elementwise: R, C and both RMS values are reductions over a whole tensor, so every ``impl`` runs this
update once per tensor.

Deliberate differences from the paper, all torch's:

* ``lr`` caps the relative step size, ρ = min(γ, 1/√t); the paper caps it at the constant 0.01 (``lr``'s
  default) and has no learning rate at all;
* weight decay is decoupled and scaled by ``lr`` (the paper has none);
* ε₁ is not added to G² before the factored means; it bounds the denominator of V from below
  (max(mean(R), ε₁)) and V itself (max(V, ε₁²)) instead;
* R and C are running means of G², not sums (the row/column normalisation makes this the same V);
* there is no first moment (the paper's optional β₁) and no relative-step-size switch: ρ is always
  relative and scaled by max(ε₂, RMS(θ));
* ε₁'s default is resolved once per param group and step, from the dtype of the group's first parameter
  with a gradient, and used for all the parameters of the group (torch's loop sets it on its first
  parameter and keeps it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from scratchopt.checks import check_one_element_lr, require_should_be
from scratchopt.ops import zeros_like
from scratchopt.optimizer import ScratchOptimizer, new_step_counter


def rms(tensor: Tensor) -> float:
    """‖x‖₂/√numel(x), read as a Python number, in torch's operation order."""
    return tensor.norm(2).item() / (tensor.numel() ** 0.5)


def update(
    param: Tensor,
    grad: Tensor,
    row_var: Tensor | None,
    col_var: Tensor | None,
    variance: Tensor | None,
    *,
    step: float,
    lr: Any,
    beta2_decay: float,
    eps1: float,
    eps2: float,
    d: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    if maximize:
        grad = -grad  # G ← −G
    one_minus_beta2 = step**beta2_decay  # 1 − β̂ = t^τ
    rho = min(lr, 1 / (step**0.5))  # ρ = min(γ, 1/√t)
    alpha = max(eps2, rms(param)) * rho  # a = max(ε₂, RMS(θ))ρ
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)  # θ ← θ(1 − γλ)
    if grad.dim() > 1:
        assert row_var is not None and col_var is not None  # init_state creates them for dim ≥ 2
        # mean(G²) along a dimension as a squared norm / size: no G²-sized temporary.
        row_var.lerp_(torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1)), one_minus_beta2)
        col_var.lerp_(torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2)), one_minus_beta2)
        var_estimate = row_var @ col_var  # R·C
        var_estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))  # V = R·C / max(mean R, ε₁)
    else:
        assert variance is not None  # init_state creates it for dim ≤ 1
        variance.lerp_(grad * grad, one_minus_beta2)  # V ← V + t^τ(G² − V)
        var_estimate = variance.clone()  # the square root below must not write into the state
    direction = var_estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad)  # U = G/√max(V, ε₁²)
    clipping = max(1.0, direction.norm(2).item() / ((direction.numel() ** 0.5) * d))  # max(1, RMS(U)/d)
    param.add_(direction, alpha=-alpha / clipping)  # θ ← θ − a/max(1, RMS(U)/d)·U


class Adafactor(ScratchOptimizer):
    __doc__ = __doc__
    state_keys = ("row_var", "col_var", "variance")
    hyperparameter_keys = ("lr", "beta2_decay", "d", "weight_decay", "maximize")
    sparse_error = "Adafactor does not support sparse gradients"
    update = staticmethod(update)
    elementwise = False
    torch_twin = "Adafactor"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        impl: str | None = None,
    ) -> None:
        check_one_element_lr(lr)
        require_should_be(0.0 <= lr, "Learning rate", ">= 0", lr, "lr")
        require_should_be(0.0 >= beta2_decay, "beta2_decay", "<= 0", beta2_decay, "beta2_decay")
        require_should_be(eps[0] is None or 0.0 <= eps[0], "epsilon1", ">= 0", eps[0], "eps[0]")
        require_should_be(0.0 <= eps[1], "epsilon2", ">= 0", eps[1], "eps[1]")
        require_should_be(1.0 <= d, "Clipping threshold d", ">= 1", d, "d")
        require_should_be(0.0 <= weight_decay, "weight_decay", ">= 0", weight_decay, "weight_decay")
        defaults = {
            "lr": lr,
            "beta2_decay": beta2_decay,
            "eps": eps,
            "d": d,
            "weight_decay": weight_decay,
            "maximize": maximize,
        }
        super().__init__(params, defaults, impl, foreach=foreach)

    def check_grad(self, param: Tensor) -> None:
        if param.is_complex():  # torch checks this before the layout of the gradient
            raise RuntimeError("Adafactor does not support complex parameters")
        super().check_grad(param)

    def update_arguments(self, group: dict[str, Any]) -> dict[str, Any]:
        eps1, eps2 = group["eps"]
        if eps1 is None:
            first = next((p for p in group["params"] if p.grad is not None), None)
            eps1 = None if first is None else torch.finfo(first.dtype).eps
        return {**super().update_arguments(group), "eps1": eps1, "eps2": eps2}

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        grad = param.grad
        assert grad is not None  # the first step of a param with a gradient creates its state
        state: dict[str, Any] = {"step": new_step_counter(param, group)}
        if grad.dim() > 1:
            state["row_var"] = grad.new_zeros((*grad.shape[:-1], 1))
            state["col_var"] = grad.new_zeros((*grad.shape[:-2], 1, grad.shape[-1]))
        else:
            state["variance"] = zeros_like(grad)
        return state
