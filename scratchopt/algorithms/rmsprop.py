r"""RMSprop: divide the gradient by a running root mean square of recent gradients.

Update at step t, for parameter θ with gradient g (Hinton, Neural Networks for Machine Learning, lecture
6e, 2012, https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf; the centered
variant from Graves, 2013, https://arxiv.org/abs/1308.0850)::

    g   ← −g                                  if maximize
    g   ← g + λ·θ                             if λ ≠ 0 (L2 penalty)
    v   ← α·v + (1 − α)·g²                     running mean of the squared gradient
    ḡ   ← ḡ + (1 − α)·(g − ḡ)                  if centered: mean gradient (lerp: α·ḡ + (1 − α)·g)
    d   ← √(v − ḡ²) + ε                        if centered
    d   ← √v + ε                               otherwise
    b   ← μ·b + g/d                            if μ > 0
    θ   ← θ − γ·b                              if μ > 0
    θ   ← θ − γ·g/d                            otherwise

=========  =======================  =============================================================
symbol     argument                 state key
=========  =======================  =============================================================
θ          params
g          ``param.grad``
γ          ``lr``
α          ``alpha``
ε          ``eps``
λ          ``weight_decay``
μ          ``momentum``
t          —                        ``step`` (0-d float32 tensor; counted, unused by the update)
v          —                        ``square_avg``
b          — (``momentum > 0``)     ``momentum_buffer``
ḡ          — (``centered=True``)    ``grad_avg``
d          —                        — (a temporary: the denominator)
=========  =======================  =============================================================

Deliberate differences from the lecture and from Graves, all torch's: ε is added outside the square
root, after it (Graves, and TensorFlow, add it inside); with momentum, the buffer accumulates g/d
without the learning rate and γ multiplies the buffer when it is applied (Graves folds γ into the
buffer); the optional L2 penalty and maximize are torch's additions.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from scratchopt.checks import check_eps, check_lr, check_nonnegative
from scratchopt.ops import as_real, zeros_like
from scratchopt.optimizer import ScratchOptimizer, new_step_counter


def update(
    param: Tensor,
    grad: Tensor,
    square_avg: Tensor,
    momentum_buffer: Tensor | None,
    grad_avg: Tensor | None,
    *,
    step: Any,
    lr: Any,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
) -> None:
    del step  # counted by the optimizer as torch counts it; RMSprop's arithmetic does not use it
    if maximize:
        grad = -grad  # g ← −g
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)  # g ← g + λθ
    param, grad, square_avg, momentum_buffer, grad_avg = as_real(param, grad, square_avg, momentum_buffer, grad_avg)
    square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)  # v ← αv + (1 − α)g²
    if centered:
        grad_avg.lerp_(grad, 1 - alpha)  # ḡ ← ḡ + (1 − α)(g − ḡ)
        denom = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()  # √(v − ḡ²)
    else:
        denom = square_avg.sqrt()  # √v
    denom = denom.add_(eps)  # d ← … + ε
    if momentum > 0:
        momentum_buffer.mul_(momentum).addcdiv_(grad, denom)  # b ← μb + g/d
        param.add_(momentum_buffer, alpha=-lr)  # θ ← θ − γb
    else:
        param.addcdiv_(grad, denom, value=-lr)  # θ ← θ − γg/d


class RMSprop(ScratchOptimizer):
    __doc__ = __doc__
    state_keys = ("square_avg", "momentum_buffer", "grad_avg")
    nonnegative_state = frozenset({"square_avg"})
    hyperparameter_keys = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize")
    group_defaults = {"momentum": 0, "centered": False, "maximize": False}
    sparse_error = "RMSprop does not support sparse gradients"
    update = staticmethod(update)
    elementwise = True
    torch_twin = "RMSprop"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        impl: str | None = None,
    ) -> None:
        check_lr(lr)
        check_eps(eps)
        check_nonnegative(momentum, "momentum")
        check_nonnegative(weight_decay, "weight_decay")
        check_nonnegative(alpha, "alpha")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "centered": centered,
            "weight_decay": weight_decay,
            "maximize": maximize,
        }
        super().__init__(params, defaults, impl, capturable=capturable, foreach=foreach, differentiable=differentiable)

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = {"step": new_step_counter(param, group), "square_avg": zeros_like(param)}
        if group["momentum"] > 0:
            state["momentum_buffer"] = zeros_like(param)
        if group["centered"]:
            state["grad_avg"] = zeros_like(param)
        return state
