r"""ADOPT: Adam that normalises the gradient by the previous second moment (Taniguchi et al., 2024, "ADOPT:
Modified Adam Can Converge with Any β₂ with the Optimal Rate", https://arxiv.org/abs/2411.02853,
Algorithm 1 with the clipping of the updated paper).

Step t (1-based), for parameter θ with gradient g; s = t − 1 is the number of earlier steps::

    g   ← −g                                   if maximize
    g   ← g + λ·θ                              if λ ≠ 0 and not decoupled (L2 penalty)
    at t = 1:   v ← v + g²                     the second moment starts from the first gradient; θ stays
    for t > 1:
    θ   ← θ − γ·λ·θ                            if λ ≠ 0 and decoupled
    n   = g / max(√v, ε)                        the gradient normalised by the *previous* v
    n   ← clamp(n, −c(s), c(s))                 where a clip schedule c is given (default c(s) = s^¼)
    m   ← m + (1 − β₁)·(n − m)                  first moment of the normalised gradient (lerp)
    θ   ← θ − γ·m
    v   ← β₂·v + (1 − β₂)·g²                    second moment, updated after it was used

=========  ===============================  ================================
symbol     argument                         state key
=========  ===============================  ================================
θ          params
g          ``param.grad``
γ          ``lr``
β₁, β₂     ``betas``
ε          ``eps``
c          ``clip_lambda`` (a callable of s, or None)
λ          ``weight_decay``
—          ``decouple``
t          —                                ``step`` (0-d float32 tensor)
m          —                                ``exp_avg``
v          —                                ``exp_avg_sq``
=========  ===============================  ================================

The reference is the authors' implementation (the ``torch-adopt`` package, ``adopt.ADOPT``), whose
signature, defaults, state keys and operation order this module follows, so the loop is bit-for-bit equal
to its for-loop (``tests/test_adopt.py``). Like torch's optimizers it counts ``step`` per parameter (a
param that misses steps keeps its own count); it evaluates ``c`` at the count of earlier steps s, as the
reference reads its counter before advancing it. ``clip_lambda`` is kept on the optimizer, as in the
reference, not in the param groups (a callable is not a state_dict value); the default is a module-level
function, so the optimizer pickles. Differences from the paper, all the reference's: ε bounds √v from
below instead of being added to it; the decoupled decay is γλθ subtracted before the update; the clip is
the updated paper's; ``maximize`` is torch's. A complex parameter is updated as its real and imaginary
parts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from scratchopt.checks import check_adam_arguments
from scratchopt.ops import as_real, get_value, zeros_like
from scratchopt.optimizer import ScratchOptimizer, new_step_counter


def default_clip(step: float) -> float:
    """c(s) = s^¼, the clip of the updated paper (and the reference's default)."""
    return float(step**0.25)


def update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: Any,
    clip: Any,
    lr: Any,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decouple: bool,
    maximize: bool,
) -> None:
    if maximize:
        grad = -grad  # g ← −g
    if weight_decay != 0 and not decouple:
        grad = grad.add(param, alpha=weight_decay)  # g ← g + λθ
    param, grad, exp_avg, exp_avg_sq = as_real(param, grad, exp_avg, exp_avg_sq)
    if step == 1:
        exp_avg_sq.addcmul_(grad, grad)  # v ← v + g²
        return
    if weight_decay != 0 and decouple:
        param.add_(param, alpha=-lr * weight_decay)  # θ ← θ − γλθ
    normed = grad.div(exp_avg_sq.sqrt().clamp(eps))  # n = g / max(√v, ε)
    if clip is not None:
        normed.clamp_(-clip, clip)  # n ← clamp(n, −c(s), c(s))
    exp_avg.lerp_(normed, 1 - beta1)  # m ← m + (1 − β₁)(n − m)
    param.add_(exp_avg, alpha=-lr)  # θ ← θ − γm
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v ← β₂v + (1 − β₂)g²


class ADOPT(ScratchOptimizer):
    __doc__ = __doc__
    state_keys = ("exp_avg", "exp_avg_sq")
    nonnegative_state = frozenset({"exp_avg_sq"})
    hyperparameter_keys = ("lr", "betas", "eps", "weight_decay", "decouple", "maximize")
    split_keys = {"betas": ("beta1", "beta2")}
    group_defaults = {"maximize": False}
    sparse_error = "ADOPT does not support sparse gradients"
    update = staticmethod(update)
    elementwise = True
    reference_class = "adopt:ADOPT"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        clip_lambda: Callable[[float], float] | None = default_clip,
        weight_decay: float = 0.0,
        decouple: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        impl: str | None = None,
    ) -> None:
        check_adam_arguments(lr, eps, betas, weight_decay)
        self.clip_lambda = clip_lambda
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "decouple": decouple,
            "maximize": maximize,
        }
        super().__init__(
            params,
            defaults,
            impl,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "clip_lambda": self.clip_lambda}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict calls this with the state and groups only: the clip stays as it is.
        if "clip_lambda" in state:
            self.clip_lambda = state.pop("clip_lambda")
        elif not hasattr(self, "clip_lambda"):
            self.clip_lambda = default_clip
        super().__setstate__(state)

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return {"step": new_step_counter(param, group), "exp_avg": zeros_like(param), "exp_avg_sq": zeros_like(param)}

    def step_arguments(self, step: Any, group: dict[str, Any]) -> dict[str, Any]:
        clip = None if self.clip_lambda is None else self.clip_lambda(get_value(step) - 1)  # c(s), s = t − 1
        return {"step": step, "clip": clip}
