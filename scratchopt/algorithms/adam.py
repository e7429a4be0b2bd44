r"""Adam: adaptive moment estimation (Kingma & Ba, 2015, https://arxiv.org/abs/1412.6980).

Update at step t (1-based), for parameter θ with gradient g::

    g   ← −g                                  if maximize
    g   ← g + λ·θ                             if λ ≠ 0 and not decoupled (L2 penalty)
    θ   ← θ·(1 − γ·λ)                         if λ ≠ 0 and decoupled   (AdamW, Loshchilov & Hutter 2019)
    m   ← m + (1 − β₁)·(g − m)                 first moment   (lerp: β₁·m + (1−β₁)·g)
    v   ← β₂·v + (1 − β₂)·g²                   second moment
    v̂   ← max(v̂, v)                           if amsgrad (Reddi et al., 2018), and v̂ replaces v below
    θ   ← θ − γ/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)

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
v          —                           ``exp_avg_sq``
v̂          — (``amsgrad=True``)        ``max_exp_avg_sq``
=========  ==========================  ================================

Deliberate differences from the paper, all torch's: ε is added after the bias correction of √v and
outside the root; the bias correction of m is folded into the step size.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from scratchopt.checks import check_adam_arguments, check_tensor_hyperparameter
from scratchopt.ops import as_real, cast_like, zeros_like
from scratchopt.optimizer import ScratchOptimizer, new_step_counter, squeeze_scalar


def update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    *,
    step: Any,
    lr: Any,
    beta1: Any,
    beta2: Any,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
) -> None:
    if maximize:
        grad = -grad
    if weight_decay != 0:
        if decoupled_weight_decay:
            param.mul_(1 - lr * weight_decay)  # θ ← θ·(1 − γλ)
        else:
            grad = grad.add(param, alpha=weight_decay)  # g ← g + λθ
    param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq = as_real(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq)
    exp_avg.lerp_(grad, 1 - cast_like(beta1, param))  # m ← m + (1 − β₁)(g − m)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v ← β₂v + (1 − β₂)g²
    bias_correction1 = 1 - beta1**step  # 1 − β₁ᵗ
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5  # √(1 − β₂ᵗ)
    if amsgrad:
        assert max_exp_avg_sq is not None  # init_state creates it with amsgrad
        max_exp_avg_sq.copy_(max_exp_avg_sq.maximum(exp_avg_sq))  # v̂ ← max(v̂, v)
        exp_avg_sq = max_exp_avg_sq
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)  # √v/√(1 − β₂ᵗ) + ε
    param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))  # θ ← θ − γ/(1 − β₁ᵗ)·m/denom


class Adam(ScratchOptimizer):
    __doc__ = __doc__
    state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    nonnegative_state = frozenset({"exp_avg_sq", "max_exp_avg_sq"})
    hyperparameter_keys = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay")
    split_keys = {"betas": ("beta1", "beta2")}
    group_defaults = {"amsgrad": False, "maximize": False, "decoupled_weight_decay": False}
    sparse_error = "Adam does not support sparse gradients, please consider SparseAdam instead"
    update = staticmethod(update)
    elementwise = True
    torch_twin = "Adam"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        impl: str | None = None,
    ) -> None:
        check_tensor_hyperparameter(lr, "lr", foreach=foreach, capturable=capturable)
        check_adam_arguments(lr, eps, betas, weight_decay)
        if not all(isinstance(beta, float) for beta in betas) and not all(isinstance(beta, Tensor) for beta in betas):
            raise ValueError("betas must be either both floats or both Tensors")
        for index, beta in enumerate(betas):
            check_tensor_hyperparameter(beta, f"betas[{index}]", foreach=foreach, capturable=capturable)
        defaults = {
            "lr": lr,
            "betas": tuple(map(squeeze_scalar, betas)),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(
            params, defaults, impl, foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused
        )

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = {"step": new_step_counter(param, group), "exp_avg": zeros_like(param), "exp_avg_sq": zeros_like(param)}
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = zeros_like(param)
        return state
