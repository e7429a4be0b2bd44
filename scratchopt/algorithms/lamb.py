r"""LAMB: Adam steps scaled per tensor by a trust ratio (You et al., "Large Batch Optimization for Deep
Learning: Training BERT in 76 minutes", ICLR 2020, https://arxiv.org/abs/1904.00962, Algorithm 2), as
``pytorch-optimizer`` implements it, with its RAdam-rectified, Adam and pre-normalised variants.

Step t (1-based, counted per param group), for parameter θ with gradient g; ‖·‖ is the 2-norm of a
whole tensor and G the 2-norm of every gradient of every group together::

    s   = min(1, M / (G + ε))                  computed in float32, once per step
    g   ← s·g                                  if pre_norm and M ≠ 0
    g   ← −g                                   if maximize
    m   ← β₁·m + β₃·g                          β₃ = 1 − β₁ with grad_averaging, else 1
    v   ← β₂·v + (1 − β₂)·g²
    θ   ← θ·(1 − γ·λ)                          if λ ≠ 0 and decoupled (γλ → λ with fixed_decay)
    η   = γ / (1 − β₁ᵗ)                         (γ without the division with adam_debias)
    u   = m / (√v + ε)
    u   ← u + λ·θ                              if λ ≠ 0 and not decoupled
    φ   = min(‖θ‖, 10)
    τ   = φ / (‖u‖ + ε), or 1 where φ = 0 or ‖u‖ = 0, or 1 with adam
    θ   ← θ − η·τ·u

With ``rectify`` the step is RAdam's, from ρ∞ = 2/(1 − β₂) − 1 and ρₜ = ρ∞ − 2tβ₂ᵗ/(1 − β₂ᵗ)::

    ρₜ ≥ N:               η = γ·√((1 − β₂ᵗ)(ρₜ − 4)(ρₜ − 2)ρ∞ / ((ρ∞ − 4)(ρ∞ − 2)ρₜ)) / (1 − β₁ᵗ),  u = m/(√v + ε)
    ρₜ < N, degenerated:  η = γ / (1 − β₁ᵗ),  u = m                 (momentum SGD)
    ρₜ < N otherwise:     no step: m, v and the decoupled decay only
    τ   = φ / (‖θ − η·u‖ + ε)                 (1 where a norm is 0, or with adam)
    θ   ← θ − η·τ·u                            and no coupled decay (λθ is never added to u)

=========  ======================================  ================================
symbol     argument                                state key
=========  ======================================  ================================
θ          params
g          ``param.grad``
γ          ``lr``
β₁, β₂     ``betas``
β₃         ``grad_averaging``
ε          ``eps``
λ          ``weight_decay``
—          ``weight_decouple``, ``fixed_decay``
M          ``max_grad_norm`` (with ``pre_norm``)
N          ``n_sma_threshold`` (with ``rectify``)
—          ``rectify``, ``degenerated_to_sgd``
—          ``adam``, ``adam_debias``
t          —                                       ``step`` of the param group
m          —                                       ``exp_avg``
v          —                                       ``exp_avg_sq``
s, η, u    —                                       — (temporaries)
φ, τ       —                                       — (the trust ratio; not kept)
=========  ======================================  ================================

Not elementwise: φ, τ and G are norms of whole tensors, so every ``impl`` runs this update once per
tensor, and the global norm is summed by :meth:`Lamb.reduce` before any tensor is updated.

The reference is ``pytorch-optimizer``'s Lamb (4.1.0, its per-parameter path, ``foreach=False``), whose
signature, defaults, state keys and operation order this module follows, so the loop is bit for bit equal
to it (``tests/test_lamb.py``); its batched path orders the same operations otherwise and differs by
rounding. Like the reference, t is the param group's count (``group["step"]``, advanced once per step
for every group, whether or not its params have gradients), so a param that misses steps takes the
group's bias correction, and the count travels in the state_dict's groups. Differences from the
reference, none of them in the numbers where the groups hold the constructor's values:

* the gradients are not changed: the reference scales and negates ``param.grad`` in place;
* ``pre_norm``, ``degenerated_to_sgd``, ``n_sma_threshold`` and ``maximize`` are group keys, and the
  M and ε of s are each group's own (G stays the norm over all groups), so editing ``param_groups``
  takes effect; the reference reads them from the optimizer and its constructor defaults. A group
  loaded from the reference's state_dict, which has none of them, takes the constructor's values;
* the reference's diagnostics ``weight_norm``, ``adam_norm`` and ``trust_ratio`` (φ, the norm τ divides
  by, τ) are not kept in the state: no step reads them, so each state_dict loads into the other, and
  those of a loaded reference state_dict are dropped rather than left stale;
* ``adanorm`` is not implemented (a group that asks for it is refused); ``adam_debias`` is, as a
  keyword-only argument; ``foreach``, ``maximize`` and ``impl`` are keyword-only.

Differences from the paper, all the reference's (``tests/test_lamb.py`` pins each):

* v is not bias-corrected, and m's correction 1/(1 − β₁ᵗ) scales the step outside the trust ratio: in
  the paper both corrections scale r = m̂/(√v̂ + ε) alone and cancel in τ·r (up to ε and λθ), so the
  reference's step is the paper's divided by 1 − β₁ᵗ, and its coupled λθ is added to the uncorrected u;
* weight decay is decoupled by default (the paper adds λθ to u, ``weight_decouple=False`` here);
* φ(z) = min(z, 10), ε is added to ‖u‖, and τ = 1 where either norm is 0 (the paper leaves φ's bounds
  open and the ratio undefined there);
* ``grad_averaging=False`` (m ← β₁m + g), ``pre_norm`` (NVIDIA's LAMB), ``rectify`` (RAdam, whose trust
  ratio divides by the norm of the updated parameter θ − ηu rather than of u, and which drops coupled
  decay) and ``adam`` (τ = 1) are not in the paper.

A complex parameter is updated as its real and imaginary parts (its norms are over both).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from scratchopt.checks import check_betas, check_eps, check_lr, check_nonnegative, require
from scratchopt.ops import as_real, global_gradient_norm, zeros_like
from scratchopt.optimizer import ScratchOptimizer

#: Group keys the reference keeps on the optimizer (from its constructor), not in its param groups.
OPTIMIZER_KEYS = ("pre_norm", "degenerated_to_sgd", "n_sma_threshold", "maximize")
#: The reference's per-parameter diagnostics, which no step reads.
DIAGNOSTICS = ("weight_norm", "adam_norm", "trust_ratio")


def rectified_step_size(
    lr: Any, beta2: float, step: int, n_sma_threshold: float, degenerated_to_sgd: bool
) -> tuple[Any, float]:
    """RAdam's γ·rₜ and ρₜ at step t, in the reference's operation order (rₜ = −1: no step)."""
    n_sma_max = 2.0 / (1.0 - beta2) - 1.0  # ρ∞
    beta2_t = beta2**step
    n_sma = n_sma_max - 2 * step * beta2_t / (1.0 - beta2_t)  # ρₜ
    if n_sma >= n_sma_threshold:
        rt = math.sqrt(
            (1.0 - beta2_t) * (n_sma - 4) / (n_sma_max - 4) * (n_sma - 2) / n_sma * n_sma_max / (n_sma_max - 2)
        )
    elif degenerated_to_sgd:
        rt = 1.0
    else:
        rt = -1.0
    return lr * rt, n_sma


def trust_ratio(param: Tensor, direction: Tensor, eps: float, clamp: float) -> Tensor | float:
    """τ = min(‖θ‖, clamp) / (‖direction‖ + ε), or 1 where either norm is 0.

    A 0-d tensor of the param's (real) dtype, and the Python number 1.0 where τ = 1, as the reference
    returns them: the step η·τ is then rounded in that dtype, or in Python's float64 for τ = 1.
    """
    weight_norm = torch.linalg.norm(param).clamp_(min=0, max=clamp)  # φ = min(‖θ‖, 10)
    direction_norm = torch.linalg.norm(direction)
    if weight_norm == 0 or direction_norm == 0:
        return 1.0
    return weight_norm / (direction_norm + eps)


def update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    lr: Any,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    weight_decay: float,
    weight_decouple: bool,
    fixed_decay: bool,
    rectify: bool,
    rectified: bool,
    step_size: Any,
    adam: bool,
    clamp: float,
    grad_scale: Tensor | None,
    maximize: bool,
) -> None:
    if grad_scale is not None:
        # In place on a copy, as the reference scales the gradient: a 0-d float16 or bfloat16 gradient
        # then keeps its dtype (out of place, it would be promoted to s's float32).
        grad = grad.clone().mul_(grad_scale)  # g ← s·g
    if maximize:
        grad = grad.neg()  # g ← −g
    param, grad, exp_avg, exp_avg_sq = as_real(param, grad, exp_avg, exp_avg_sq)
    exp_avg.mul_(beta1).add_(grad, alpha=beta3)  # m ← β₁m + β₃g
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)  # v ← β₂v + (1 − β₂)g²
    if weight_decay != 0 and weight_decouple:
        param.mul_(1.0 - weight_decay * (1.0 if fixed_decay else lr))  # θ ← θ(1 − γλ)
    if rectify:
        if step_size <= 0:
            return  # ρₜ < N without degenerated_to_sgd: no step yet
        denom = exp_avg_sq.sqrt().add_(eps) if rectified else None  # √v + ε
        ratio: Tensor | float = 1.0
        if not adam:
            stepped = param.clone()
            if denom is not None:
                stepped.addcdiv_(exp_avg, denom, value=-step_size)  # θ − η·m/(√v + ε)
            else:
                stepped.add_(exp_avg, alpha=-step_size)  # θ − η·m
            ratio = trust_ratio(param, stepped, eps, clamp)  # τ = φ/(‖θ − ηu‖ + ε)
        if denom is not None:
            param.addcdiv_(exp_avg, denom, value=-step_size * ratio)  # θ ← θ − ητ·m/(√v + ε)
        else:
            param.add_(exp_avg, alpha=-step_size * ratio)  # θ ← θ − ητ·m
        return
    direction = exp_avg_sq.sqrt().add_(eps)
    torch.div(exp_avg, direction, out=direction)  # u = m/(√v + ε)
    if not weight_decouple and weight_decay > 0:
        direction.add_(param, alpha=weight_decay)  # u ← u + λθ
    ratio = 1.0 if adam else trust_ratio(param, direction, eps, clamp)  # τ = φ/(‖u‖ + ε)
    param.add_(direction, alpha=-step_size * ratio)  # θ ← θ − ητ·u


class Lamb(ScratchOptimizer):
    __doc__ = __doc__
    state_keys = ("exp_avg", "exp_avg_sq")
    hyperparameter_keys = (
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "weight_decouple",
        "fixed_decay",
        "rectify",
        "adam",
        "maximize",
    )
    split_keys = {"betas": ("beta1", "beta2")}
    # The reference reads adam_debias from the group, False where it is absent.
    group_defaults = {"adam_debias": False}
    scalar_state_keys = ()
    sparse_error = "Lamb does not support sparse gradients"
    update = staticmethod(update)
    elementwise = False
    reference_class = "pytorch_optimizer:Lamb"
    #: The upper bound of φ, the clamped weight norm (the reference's class attribute of that name).
    clamp: ClassVar[float] = 10.0

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        weight_decouple: bool = True,
        fixed_decay: bool = False,
        rectify: bool = False,
        degenerated_to_sgd: bool = False,
        n_sma_threshold: int = 5,
        grad_averaging: bool = True,
        max_grad_norm: float = 1.0,
        adam: bool = False,
        pre_norm: bool = False,
        eps: float = 1e-6,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        adam_debias: bool = False,
        impl: str | None = None,
    ) -> None:
        check_lr(lr)
        require(len(betas) == 2, "betas", betas, "two values, (beta1, beta2)")
        check_betas(betas)
        check_nonnegative(weight_decay, "weight_decay")
        check_nonnegative(max_grad_norm, "max_grad_norm")
        check_eps(eps)
        defaults = {
            "lr": lr,
            "betas": betas,
            "weight_decay": weight_decay,
            "weight_decouple": weight_decouple,
            "fixed_decay": fixed_decay,
            "rectify": rectify,
            "grad_averaging": grad_averaging,
            "max_grad_norm": max_grad_norm,
            "adam": adam,
            "eps": eps,
            "pre_norm": pre_norm,
            "degenerated_to_sgd": degenerated_to_sgd,
            "n_sma_threshold": n_sma_threshold,
            "maximize": maximize,
            "adam_debias": adam_debias,
        }
        super().__init__(params, defaults, impl, foreach=foreach)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # A group of the reference's state_dict lacks the settings it keeps on the optimizer: they are
        # the constructor's, as the reference reads its own.
        defaults = getattr(self, "defaults", {})
        for group in self.param_groups:
            for key in OPTIMIZER_KEYS:
                if key in defaults:
                    group.setdefault(key, defaults[key])
        for param_state in self.state.values():
            for key in DIAGNOSTICS:
                param_state.pop(key, None)

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return {"exp_avg": zeros_like(param), "exp_avg_sq": zeros_like(param)}

    def advance_group(self, group: dict[str, Any]) -> None:
        group["step"] = group.get("step", 0) + 1

    def update_arguments(self, group: dict[str, Any]) -> dict[str, Any]:
        # Read before advance_group counts the step: the step about to run is the next one.
        if group.get("adanorm"):
            raise ValueError("Lamb: adanorm is not implemented (allowed: adanorm=False)")
        values = super().update_arguments(group)
        beta1, beta2 = group["betas"]
        t = group.get("step", 0) + 1
        step_size, n_sma = values["lr"], 0.0
        if group["rectify"]:
            step_size, n_sma = rectified_step_size(
                values["lr"], beta2, t, group["n_sma_threshold"], group["degenerated_to_sgd"]
            )
        if not group["adam_debias"]:
            step_size = step_size / (1.0 - math.pow(beta1, t))  # η = γ/(1 − β₁ᵗ)
        values.update(
            beta3=1.0 - beta1 if group["grad_averaging"] else 1.0,
            step_size=step_size,
            rectified=n_sma >= group["n_sma_threshold"],
            clamp=self.clamp,
            grad_scale=None,
        )
        return values

    def reduce(self, groups: list[tuple[dict[str, Any], list[Tensor]]]) -> list[dict[str, Any]] | None:
        """s for each group with ``pre_norm``, from G over the gradients of all groups."""
        scaled = [group["pre_norm"] and group["max_grad_norm"] != 0 for group, _ in groups]
        if not any(scaled):
            return [{} for _ in groups]
        grads = [p.grad for _, params in groups for p in params if p.grad is not None]
        device = next((p.device for group, _ in groups for p in group["params"]), torch.device("cpu"))
        norm = global_gradient_norm(grads, device)  # G
        return [
            {"grad_scale": torch.clamp(group["max_grad_norm"] / norm.add(group["eps"]), max=1.0).squeeze(0)}
            if scale
            else {}
            for (group, _), scale in zip(groups, scaled, strict=True)
        ]
