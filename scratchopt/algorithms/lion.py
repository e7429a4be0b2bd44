r"""Lion: evolved sign momentum (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms",
https://arxiv.org/abs/2302.06675, Algorithm 2).

Update for parameter θ with gradient g::

    g   ← −g                                  if maximize
    c   = β₁·m + (1 − β₁)·g                    the interpolation the sign is taken of
    θ   ← θ·(1 − γ·λ) − γ·sign(c)              decoupled weight decay, then the sign step
    m   ← β₂·m + (1 − β₂)·g                    the momentum, tracked with the other β

=========  ==================  ===================
symbol     argument            state key
=========  ==================  ===================
θ          params
g          ``param.grad``
γ          ``lr``
β₁, β₂     ``betas``
λ          ``weight_decay``
c          —                   — (a temporary)
m          —                   ``exp_avg``
=========  ==================  ===================

This module is the worked example of the public API (:mod:`scratchopt.optimizer`): the equations above,
one ``update`` and a class that declares its state, its hyperparameters and that the update is
elementwise, so every ``impl`` runs it. It is tested with :func:`scratchopt.testing.check_optimizer`
against a reference written from the paper's Algorithm 2 (``tests/test_extending.py``).

Differences from the paper: none in the update; ``maximize`` is added as torch's optimizers have it. As
in the paper, there is no step counter and no bias correction, so the state holds ``exp_avg`` alone.
The defaults are the paper's suggestion for a drop-in replacement of AdamW: an lr 3–10× smaller and a
weight decay 3–10× larger than AdamW's.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from scratchopt.checks import check_betas, check_lr, check_nonnegative
from scratchopt.ops import zeros_like
from scratchopt.optimizer import ScratchOptimizer


def update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    *,
    lr: Any,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    if maximize:
        grad = -grad  # g ← −g
    direction = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1).sign_()  # sign(β₁m + (1 − β₁)g)
    param.mul_(1 - lr * weight_decay)  # θ ← θ(1 − γλ)
    param.add_(direction, alpha=-lr)  # θ ← θ − γ·sign(c)
    exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)  # m ← β₂m + (1 − β₂)g


class Lion(ScratchOptimizer):
    __doc__ = __doc__
    state_keys = ("exp_avg",)
    hyperparameter_keys = ("lr", "betas", "weight_decay", "maximize")
    split_keys = {"betas": ("beta1", "beta2")}
    group_defaults = {"maximize": False}
    scalar_state_keys = ()
    sparse_error = "Lion does not support sparse gradients"
    update = staticmethod(update)
    elementwise = True
    #: AdamW's default lr, 10× Lion's own: enough for a short run of a small model to make progress.
    example_kwargs = {"lr": 1e-3}

    def __init__(
        self,
        params: Any,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        impl: str | None = None,
    ) -> None:
        check_lr(lr)
        check_betas(betas)
        check_nonnegative(weight_decay, "weight_decay")
        defaults = {"lr": lr, "betas": betas, "weight_decay": weight_decay, "maximize": maximize}
        super().__init__(params, defaults, impl)

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return {"exp_avg": zeros_like(param)}
