r"""Adagrad: per-coordinate step sizes from the sum of all past squared gradients.

Update at step t (1-based), for parameter θ with gradient g (Duchi, Hazan & Singer, Adaptive Subgradient
Methods for Online Learning and Stochastic Optimization, JMLR 12, 2011,
http://jmlr.org/papers/v12/duchi11a.html, diagonal version)::

    s   ← τ                                   at initialisation (τ + τi for a complex θ)
    g   ← −g                                  if maximize
    g   ← g + λ·θ                             if λ ≠ 0 (L2 penalty; refused for a sparse g)
    γ̃   ← γ / (1 + (t − 1)·η)                 decayed learning rate
    s   ← s + g²                              sum of squared gradients
    θ   ← θ − γ̃ · g / (√s + ε)

A sparse g updates only the rows it names: it is coalesced first (the update is non-linear in g, so
a repeated index must be summed before it is squared), then s and θ change at those indices only.

=========  ==================================  ================================
symbol     argument                            state key
=========  ==================================  ================================
θ          params
g          ``param.grad`` (dense or sparse)
γ          ``lr``
η          ``lr_decay``
λ          ``weight_decay``
τ          ``initial_accumulator_value``
ε          ``eps``
t          —                                   ``step`` (0-d float32 tensor)
s          —                                   ``sum``
γ̃          —                                   — (a temporary)
=========  ==================================  ================================

Deliberate differences from the paper, all torch's: ε is added outside the square root; the learning
rate decays as γ/(1 + (t − 1)η); the accumulator starts at τ rather than 0. As in torch, the state is
created eagerly in ``__init__`` for every parameter (frozen ones too), and τ is always the constructor's
``initial_accumulator_value`` (``self.defaults``), even for a param group that sets its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from scratchopt.checks import check_eps, check_lr, check_nonnegative
from scratchopt.ops import as_real
from scratchopt.optimizer import ScratchOptimizer, new_step_counter

SPARSE_WEIGHT_DECAY_ERROR = "weight_decay option is not compatible with sparse gradients"


def update(
    param: Tensor,
    grad: Tensor,
    state_sum: Tensor,
    *,
    step: Any,
    lr: Any,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
) -> None:
    if maximize:
        grad = -grad  # g ← −g
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)  # g ← g + λθ (never sparse: see check_inputs)
    clr = lr / (1 + (step - 1) * lr_decay)  # γ̃ ← γ/(1 + (t − 1)η)
    if grad.is_sparse:
        # Per-tensor only (a sparse gradient is one tensor; the batched strategies never see one).
        grad = grad.coalesce()  # unique indices: g² must square the summed entries
        grad_values = grad._values()
        # torch adds sparse tensors built with sparse_coo_tensor, flagged uncoalesced; dense += sparse
        # rounds differently on the coalesced path (1 ulp for a 1-d param), so ours carry that flag too.
        state_sum.add_(grad.pow(2)._coalesced_(False))  # s ← s + g²   (at g's indices)
        std = state_sum.sparse_mask(grad)  # s at g's indices, in g's order
        std_values = std._values().sqrt_().add_(eps)  # √s + ε   (at g's indices)
        std_values.copy_(grad_values / std_values)  # g/(√s + ε), in std's storage
        param.add_(std._coalesced_(False), alpha=-clr)  # θ ← θ − γ̃·g/(√s + ε)   (at g's indices)
        return
    param, grad, state_sum = as_real(param, grad, state_sum)
    state_sum.addcmul_(grad, grad, value=1)  # s ← s + g²
    std = state_sum.sqrt().add_(eps)  # √s + ε
    param.addcdiv_(grad, std, value=-clr)  # θ ← θ − γ̃·g/(√s + ε)


class Adagrad(ScratchOptimizer):
    __doc__ = __doc__
    state_keys = ("sum",)
    nonnegative_state = frozenset({"sum"})
    hyperparameter_keys = ("lr", "lr_decay", "weight_decay", "eps", "maximize")
    group_defaults = {"maximize": False}
    update = staticmethod(update)
    elementwise = True
    torch_twin = "Adagrad"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        impl: str | None = None,
    ) -> None:
        check_lr(lr)
        check_nonnegative(lr_decay, "lr_decay")
        check_nonnegative(weight_decay, "weight_decay")
        check_nonnegative(initial_accumulator_value, "initial_accumulator_value")
        check_eps(eps)
        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "maximize": maximize,
        }
        super().__init__(params, defaults, impl, foreach=foreach, differentiable=differentiable, fused=fused)
        # torch creates Adagrad's state eagerly, for every parameter, at construction.
        for group in self.param_groups:
            for param in group["params"]:
                self.state[param].update(self.new_state(param, group))

    def check_sparse_gradients(self, group: dict[str, Any]) -> None:
        # torch raises this inside its loop, after updating the params before the sparse one; we raise
        # it before any change.
        if group["weight_decay"] != 0:
            raise RuntimeError(SPARSE_WEIGHT_DECAY_ERROR)

    def share_memory(self) -> None:
        """Calls ``tensor.share_memory_()`` on the state ``sum`` tensors, as torch's Adagrad does."""
        for group in self.param_groups:
            for param in group["params"]:
                self.state[param]["sum"].share_memory_()

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        tau = self.defaults["initial_accumulator_value"]  # torch reads the defaults, not the group
        init_value = complex(tau, tau) if param.is_complex() else tau
        return {
            "step": new_step_counter(param, group),
            "sum": torch.full_like(param, init_value, memory_format=torch.preserve_format),
        }
