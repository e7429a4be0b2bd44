r"""ASGD: averaged stochastic gradient descent (Polyak & Juditsky, "Acceleration of Stochastic
Approximation by Averaging", SIAM J. Control Optim. 30(4), 1992, https://doi.org/10.1137/0330046).

Step t (1-based), for parameter θ with gradient g; ηₜ and μₜ are the values left by step t − 1::

    g     ← −g                                  if maximize
    g     ← g + λ·θ                             if λ ≠ 0 (L2 penalty)
    θ     ← θ·(1 − κ·ηₜ)                        decay term
    θ     ← θ − ηₜ·g
    θ̄     ← θ̄ + μₜ·(θ − θ̄)                      if μₜ ≠ 1 (running average of the iterates)
    θ̄     ← θ                                   if μₜ = 1
    ηₜ₊₁  = γ / (1 + κ·γ·t)^α                   step size for the next step
    μₜ₊₁  = 1 / max(1, t − t₀)                  averaging weight for the next step

with η₁ = γ and μ₁ = 1.

=========  ===============================  ==========================================
symbol     argument                         state key
=========  ===============================  ==========================================
θ          params
g          ``param.grad``
γ          ``lr``
κ          ``lambd``
α          ``alpha``
t₀         ``t0``
λ          ``weight_decay``
t          —                                ``step`` (0-d float32 tensor)
ηₜ         —                                ``eta`` (0-d float32 tensor)
μₜ         —                                ``mu`` (0-d float32 tensor)
θ̄          —                                ``ax``
=========  ===============================  ==========================================

ηₜ and μₜ are bookkeeping like ``step``, not state tensors of ``update``: :meth:`ASGD.count_step` reads them
as Python numbers (float32 values, as torch's ``.item()`` does), then stores ηₜ₊₁ and μₜ₊₁ for the next
step, rounded through a tensor of the default dtype as torch rounds them. The update itself is
elementwise, so ``impl`` may run it on lists or compiled kernels. As in torch, ``step``,
``eta`` and ``mu`` live on the parameter's device, and ``load_state_dict`` casts ``eta`` and ``mu`` to the
parameter's dtype (which changes their rounding from then on, in torch and here alike).

Deliberate differences from the paper, all torch's: the step size decays as γ/(1 + κγt)^α (the paper
leaves the schedule open, asking only for a slow decay); averaging starts after t₀ steps (before it θ̄ just
tracks θ); the decay term θ·(1 − κηₜ) and the L2 penalty are torch's additions; the averaged iterate θ̄ is
kept in the state and never written into the parameter — read it from ``state["ax"]``. A complex
parameter is updated as its real and imaginary parts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from scratchopt.checks import check_lr, check_nonnegative
from scratchopt.ops import as_real, count_counters, get_value, read_scalars, store_scalars, zeros_like
from scratchopt.optimizer import (
    ScratchOptimizer,
    scalar_dtype,
    shared_arguments,
    squeeze_scalar,
)


def update(
    param: Tensor,
    grad: Tensor,
    ax: Tensor,
    *,
    eta: float,
    mu: float,
    lambd: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    if maximize:
        grad = -grad  # g ← −g
    param, grad, ax = as_real(param, grad, ax)
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)  # g ← g + λθ
    param.mul_(1 - lambd * eta)  # θ ← θ(1 − κη)
    param.add_(grad, alpha=-eta)  # θ ← θ − ηg
    if mu != 1:
        ax.add_(param.sub(ax).mul_(mu))  # θ̄ ← θ̄ + μ(θ − θ̄)
    else:
        ax.copy_(param)  # θ̄ ← θ


def _as_stored(value: Any) -> Tensor:
    """A scalar as torch stores a freshly computed one: rounded to a tensor of the default dtype."""
    return torch.as_tensor(value)


class ASGD(ScratchOptimizer):
    __doc__ = __doc__
    state_keys = ("ax",)
    weight_like_state = frozenset({"ax"})
    hyperparameter_keys = ("lambd", "weight_decay", "maximize")
    group_defaults = {"maximize": False}
    scalar_state_keys = ("step", "eta", "mu")
    sparse_error = "ASGD does not support sparse gradients"
    update = staticmethod(update)
    elementwise = True
    torch_twin = "ASGD"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-2,
        lambd: float = 1e-4,
        alpha: float = 0.75,
        t0: float = 1e6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        *,
        impl: str | None = None,
    ) -> None:
        check_lr(lr)
        check_nonnegative(weight_decay, "weight_decay")
        defaults = {
            "lr": lr,
            "lambd": lambd,
            "alpha": alpha,
            "t0": t0,
            "weight_decay": weight_decay,
            "maximize": maximize,
        }
        super().__init__(params, defaults, impl, foreach=foreach, differentiable=differentiable, capturable=capturable)

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        # torch keeps all three scalars on the parameter's device, capturable or not.
        def scalar(value: Any) -> Tensor:
            return torch.tensor(value, dtype=scalar_dtype(), device=param.device)

        return {
            "step": scalar(0.0),
            "eta": scalar(get_value(squeeze_scalar(group["lr"]))),  # η₁ = γ
            "mu": scalar(1.0),  # μ₁ = 1
            "ax": zeros_like(param),
        }

    def count_step(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        step = get_value(super().count_step(param, group)["step"])  # t ← t + 1
        state = self.state[param]
        eta, mu = state["eta"], state["mu"]
        values = {"eta": get_value(eta), "mu": get_value(mu)}  # ηₜ, μₜ, before they move on
        lr, lambd = squeeze_scalar(group["lr"]), group["lambd"]
        # A tensor lr keeps this arithmetic in its dtype, as in torch.
        eta.copy_(_as_stored(lr / ((1 + lambd * lr * step) ** group["alpha"])))  # ηₜ₊₁
        mu.copy_(_as_stored(1 / max(1, step - group["t0"])))  # μₜ₊₁
        return values

    def count_steps(self, params: list[Tensor], group: dict[str, Any]) -> list[dict[str, Any]]:
        # count_step for a whole group: t, η and μ read and written by multi-tensor ops, ηₜ₊₁ and μₜ₊₁
        # computed once per distinct t.
        lr, lambd, alpha, t0 = squeeze_scalar(group["lr"]), group["lambd"], group["alpha"], group["t0"]
        states = self.states_of(params, group)
        etas, mus = [state["eta"] for state in states], [state["mu"] for state in states]
        eta_values, mu_values = read_scalars(etas), read_scalars(mus)
        if isinstance(lr, Tensor) or eta_values is None or mu_values is None:
            return super().count_steps(params, group)
        steps = count_counters([state["step"] for state in states])
        if steps is None:
            return super().count_steps(params, group)
        # Each value rounded as torch stores a fresh scalar, then stored in the state's own dtype.
        following = {
            t: (_as_stored(lr / ((1 + lambd * lr * t) ** alpha)).item(), _as_stored(1 / max(1, t - t0)).item())
            for t in set(steps)
        }
        store_scalars(etas, [following[t][0] for t in steps])  # ηₜ₊₁
        store_scalars(mus, [following[t][1] for t in steps])  # μₜ₊₁
        return shared_arguments([{"eta": eta, "mu": mu} for eta, mu in zip(eta_values, mu_values)])
