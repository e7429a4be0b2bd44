r"""Prodigy: Adam whose step size is estimated online (Mishchenko & Defazio, 2023, "Prodigy: An
Expeditiously Adaptive Parameter-Free Learner", https://arxiv.org/abs/2306.06101, the Adam version).

Step k (the group counter, 0-based) of the reference; γ is the largest lr of the groups, and each
group's lr must be γ or 0. The sums run over every param with a gradient in every group whose lr is
positive; ĝ, θ̂, θ̂₀ are every p-th element of g, θ, θ₀ flattened::

    b    = √(1 − β₂ᵏ⁺¹) / (1 − β₁ᵏ⁺¹)     if use_bias_correction, else 1
    η    = d·γ·b                          the step size (dlr), from the estimate d before the step
    g    ← g + λ·θ                        if λ ≠ 0 and not decoupled (L2 penalty)
    r    ← β₃·r + Σ (d/d₀)·η·⟨ĝ, θ̂₀ − θ̂⟩
    s    ← β₃·s + (d/d₀)·η·ĝ              (d/d₀)·d·ĝ with safeguard_warmup
    m    ← β₁·m + (1 − β₁)·d·g             if β₁ > 0
    v    ← β₂·v + (1 − β₂)·d²·g²
    if Σ ‖s‖₁ = 0: the step ends here (θ, d and k stay)
    d̂    = c·r / Σ ‖s‖₁
    D    ← max(D, d̂)
    d'   = min(D, ρ·max(d, d̂))            on the first estimate (while d = d₀)
    d'   = min(D, ρ·d)                    afterwards
    θ    ← θ − λ·η·θ                      if λ ≠ 0 and decoupled
    θ    ← θ − η·m / (√v + d'·ε)          if β₁ > 0
    θ    ← θ − η·d'·g / (√v + d'·ε)       if β₁ = 0
    d ← d', k ← k + 1

==============  ================================  ==========================================
symbol          argument                          group key or state key
==============  ================================  ==========================================
θ               params
g               ``param.grad``
γ               ``lr`` (a multiplier of d)        ``lr``
β₁, β₂          ``betas``                         ``betas``
β₃              ``beta3`` (None: √β₂)             ``beta3``
ε               ``eps``                           ``eps``
λ               ``weight_decay``, ``decouple``    ``weight_decay``, ``decouple``
b               ``use_bias_correction``           ``use_bias_correction``
—               ``safeguard_warmup``              ``safeguard_warmup``
d₀              ``d0``                            ``d0``
c               ``d_coef``                        ``d_coef``
ρ               ``growth_rate``                   ``growth_rate``
p               ``slice_p``                       ``slice_p``
—               ``fsdp_in_use``                   ``fsdp_in_use``
d               —                                 ``d`` (every group)
D               —                                 ``d_max`` (every group)
d̂               —                                 ``d_hat`` (every group, after a step)
r               —                                 ``d_numerator`` (every group)
Σ ‖s‖₁          —                                 ``d_denom`` (every group, after a step)
k               —                                 ``k`` (each group's own count)
t               —                                 state ``step`` (0-d float32 tensor)
s               —                                 state ``s`` (every p-th element)
θ₀              —                                 state ``p0`` (every p-th element of θ at its
                                                  first step; 0-d zero where θ was all zeros)
m               —                                 state ``exp_avg`` (absent where β₁ = 0)
v               —                                 state ``exp_avg_sq``
==============  ================================  ==========================================

The reference is the authors' implementation (the ``prodigyopt`` package, ``prodigyopt.Prodigy``), whose
signature, defaults, errors, group keys, state keys and operation order this module follows, so that
the loop is bit for bit equal to it, d, D and d̂ included (``tests/test_prodigy.py``). As there, β₁, β₂,
β₃, b, c, ρ, ``decouple``, ``fsdp_in_use``, d, D, r and k are read from the first group only (each group
keeps a copy of d, D, d̂, r and Σ ‖s‖₁, written at every step); the first-estimate test compares d with
the last group's d₀; λ, ε, p, ``safeguard_warmup``, the d₀ of d/d₀ and whether the lr is positive are
each group's own. A group with lr 0 adds nothing to r and s and leaves m and v, but its params still
take the step η of the others (and, with β₁ = 0, the gradient step η·d'·g/(√v + d'·ε)), as the
reference's second loop does. Where a param's first step finds it all zeros, θ₀ is a 0-d zero, as in
the reference (a meta-device param, whose data cannot be read, is taken as not all zeros).

The estimate is a sum over every param of every group, so it is made by :meth:`Prodigy.reduce`, once per
step, after every group is checked and before any is updated (state is initialised there); ``update``
is the elementwise rest and runs under every ``impl``. The reference's first loop also makes the m and
v updates; ``update`` makes them instead, just before the param update of its second loop. That changes
no number: a param's m and v depend only on its own gradient and on d before the step, and nothing in
the estimate reads them. Where the reference stops early (Σ ‖s‖₁ = 0, which needs every sliced
gradient to be zero), :meth:`Prodigy.reduce` makes those m and v updates itself before it skips the
step, as the reference's first loop made them. The L2 penalty is added to a copy of the gradient (in
the estimate and in the update, with the same rounding): the reference adds it to ``param.grad`` in
place, ours leaves the user's gradients as they are. k is advanced by :meth:`Prodigy.advance_group`
and t per param by the strategies; the reference keeps t as a Python int (a loaded one is converted).

Differences from the paper, all the reference's: the paper's r and s add (1 − β₃)·γ·d²·⟨g, θ₀ − θ⟩ and
(1 − β₃)·γ·d²·g; the reference leaves out 1 − β₃ and scales both by 1/d₀ (the factors cancel in d̂,
only the rounding differs), uses η, with b, in place of γ·d, and multiplies d̂ by c; the paper's
d ← max(d, d̂) becomes D and the growth limit ρ (equal to the paper's with ρ = ∞, the default); ε is
scaled by the new estimate d' where the paper scales it by d, and with β₁ = 0 the step is η·d'·g, not
the paper's γ·d·(d·g); weight decay, bias correction, the safeguard and slicing are the reference's
additions. ``tests/test_prodigy.py`` pins the paper's first two steps by hand.

With ``fsdp_in_use`` (or a param FSDP flattened), the two sums are added over the processes with
``torch.distributed.all_reduce``, in float64 on the params' device (the reference sums them in a tensor
of the default dtype, float32, on ``cuda``, and keeps the results as 0-d tensors in the groups; here
they stay Python floats, so that one process per shard gives the numbers of one process with every
param), and the step never stops early, as in the reference: Σ ‖s‖₁ = 0 gives d̂ = c·r/0, NaN (which
leaves d and D as they are) or ±inf, as the reference's tensor division does. Where every lr is 0 the
step is skipped (the reference fails there, with ``fsdp_in_use``).
Errors are raised before anything changes: the reference raises its RuntimeError for an lr that is
neither γ nor 0 when its first loop reaches that group, having updated the groups before it. Complex
params are refused with a TypeError (the reference fails half-way through the step), and so are sparse
gradients. The reference prints a line when it is built with
decoupled weight decay; ours prints nothing.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from scratchopt.checks import require
from scratchopt.ops import zeros_like
from scratchopt.optimizer import ScratchOptimizer, new_step_counter
from scratchopt.step_checks import check_state_matches


def update_moments(grad: Any, exp_avg: Any, exp_avg_sq: Any, *, d: float, beta1: float, beta2: float) -> None:
    """The m and v updates of one step, with the estimate d before the step."""
    if beta1 > 0:
        assert exp_avg is not None  # init_state creates it whenever β₁ > 0
        exp_avg.mul_(beta1).add_(grad, alpha=d * (1 - beta1))  # m ← β₁m + (1 − β₁)·d·g
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=d * d * (1 - beta2))  # v ← β₂v + (1 − β₂)·d²·g²


def update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor | None,
    exp_avg_sq: Tensor,
    *,
    d: float,
    dlr: float,
    d_new: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decouple: bool,
    moments: bool,
) -> None:
    if weight_decay != 0 and not decouple:
        grad = grad.add(param, alpha=weight_decay)  # g ← g + λθ
    if moments:  # the group's lr is positive
        update_moments(grad, exp_avg, exp_avg_sq, d=d, beta1=beta1, beta2=beta2)
    denom = exp_avg_sq.sqrt().add_(d_new * eps)  # √v + d'ε
    if weight_decay != 0 and decouple:
        param.add_(param, alpha=-weight_decay * dlr)  # θ ← θ − λ·η·θ
    if beta1 > 0:
        assert exp_avg is not None  # init_state creates it whenever β₁ > 0
        param.addcdiv_(exp_avg, denom, value=-dlr)  # θ ← θ − η·m/(√v + d'ε)
    else:
        param.addcdiv_(grad, denom, value=-dlr * d_new)  # θ ← θ − η·d'·g/(√v + d'ε)


class Prodigy(ScratchOptimizer):
    __doc__ = __doc__
    state_keys = ("exp_avg", "exp_avg_sq")
    nonnegative_state = frozenset({"exp_avg_sq"})
    sparse_error = "Prodigy does not support sparse gradients"
    update = staticmethod(update)
    reduced_arguments = ("d", "dlr", "d_new")
    elementwise = True
    reference_class = "prodigyopt:Prodigy"
    #: One lr for every group, as the reference requires: the hard parameter set's second group sets
    #: lr = 0.37, so the first one takes it too.
    example_kwargs = {"lr": 0.37}

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0,
        decouple: bool = True,
        use_bias_correction: bool = False,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        growth_rate: float = float("inf"),
        fsdp_in_use: bool = False,
        slice_p: int = 1,
        *,
        impl: str | None = None,
    ) -> None:
        # The reference's checks, in its order.
        require(0.0 < d0, "d0 value", d0, "d0 > 0")
        require(0.0 < lr, "learning rate", lr, "lr > 0")
        require(0.0 < eps, "epsilon value", eps, "eps > 0")
        require(0.0 <= betas[0] < 1.0, "beta parameter at index 0", betas[0], "0 <= betas[0] < 1")
        require(0.0 <= betas[1] < 1.0, "beta parameter at index 1", betas[1], "0 <= betas[1] < 1")
        defaults = {
            "lr": lr,
            "betas": betas,
            "beta3": beta3,
            "eps": eps,
            "weight_decay": weight_decay,
            "d": d0,
            "d0": d0,
            "d_max": d0,
            "d_numerator": 0.0,
            "d_coef": d_coef,
            "k": 0,
            "growth_rate": growth_rate,
            "use_bias_correction": use_bias_correction,
            "decouple": decouple,
            "safeguard_warmup": safeguard_warmup,
            "fsdp_in_use": fsdp_in_use,
            "slice_p": slice_p,
        }
        self.d0 = d0
        super().__init__(params, defaults, impl)

    @property
    def supports_memory_efficient_fp16(self) -> bool:
        return False

    @property
    def supports_flat_params(self) -> bool:
        return True

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        sliced = param.detach().flatten()[:: group["slice_p"]]
        state: dict[str, Any] = {"step": new_step_counter(param, group), "s": torch.zeros_like(sliced)}
        # A meta-device param has no data to read: its θ₀ is the slice, as for a param that is not all zeros.
        if param.device.type == "meta" or param.any():
            state["p0"] = sliced.clone()
        else:  # all zeros: θ₀ is a 0-d zero, which saves the memory of the slice
            state["p0"] = torch.tensor(0, device=param.device, dtype=param.dtype)
        if self.param_groups[0]["betas"][0] > 0:  # β₁ of the first group, as the reference reads it
            state["exp_avg"] = zeros_like(param)
        state["exp_avg_sq"] = zeros_like(param)
        return state

    def step_arguments(self, step: Any, group: dict[str, Any]) -> dict[str, Any]:
        return {}  # t is counted, and read by nothing

    def advance_group(self, group: dict[str, Any]) -> None:
        group["k"] += 1  # k ← k + 1, each group's own, at the end of the step as in the reference

    def update_arguments(self, group: dict[str, Any]) -> dict[str, Any]:
        """The arguments of ``update`` that the groups give (β₁, β₂ and ``decouple`` the first group's, as
        in the reference); :meth:`reduce` adds d, η and d'."""
        first = self.param_groups[0]
        beta1, beta2 = first["betas"]
        return {
            "beta1": beta1,
            "beta2": beta2,
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
            "decouple": first["decouple"],
            "moments": group["lr"] > 0.0,
        }

    def reduce(self, groups: list[tuple[dict[str, Any], list[Tensor]]]) -> list[dict[str, Any]] | None:
        """The new estimate d' from every param of every group (the reference's first loop, but for the m
        and v updates, which ``update`` makes), written into every group; for each group, the step's d, η
        and d'. None where the reference stops early (every sliced gradient zero)."""
        lr = max(group["lr"] for group, _ in groups)
        for group, params in groups:  # the checks first: an error leaves everything as it was
            if group["lr"] not in [lr, 0.0]:
                raise RuntimeError(
                    "Setting different lr values in different parameter groups is only supported for values "
                    f"of 0 (got lr={group['lr']} beside lr={lr}; allowed: every group's lr equal, or 0)"
                )
            if any(p.is_complex() for p in params):
                raise TypeError("Prodigy does not support complex parameters")
            check_state_matches(self, params, ("s", "p0"))
        first = self.param_groups[0]
        beta1, beta2 = first["betas"]
        beta3 = first["beta3"]
        if beta3 is None:
            beta3 = math.sqrt(beta2)
        d, d_max, d_coef, growth_rate = first["d"], first["d_max"], first["d_coef"], first["growth_rate"]
        dlr = d * lr * _bias_correction(first)  # η, from d before the step
        decouple, fsdp_in_use = first["decouple"], first["fsdp_in_use"]
        d_numerator = first["d_numerator"] * beta3  # β₃·r
        delta_numerator = 0.0
        d_denom = 0.0
        for group, params in groups:
            decay, d0, slice_p = group["weight_decay"], group["d0"], group["slice_p"]
            for p, state in zip(params, self.states_of(params, group), strict=True):
                if hasattr(p, "_fsdp_flattened"):
                    fsdp_in_use = True
                if not group["lr"] > 0.0:
                    continue
                grad = _penalised(p, decay, decouple)
                sliced_grad = grad.flatten()[::slice_p]
                # (d/d₀)·η·⟨ĝ, θ̂₀ − θ̂⟩; d/d₀ keeps the terms from getting too small
                delta_numerator += (d / d0) * dlr * torch.dot(sliced_grad, state["p0"] - p.flatten()[::slice_p]).item()
                alpha = (d / d0) * d if group["safeguard_warmup"] else (d / d0) * dlr
                state["s"].mul_(beta3).add_(sliced_grad, alpha=alpha)  # s ← β₃s + (d/d₀)·η·ĝ
                d_denom += state["s"].abs().sum().item()  # Σ ‖s‖₁

        if d_denom == 0 and not fsdp_in_use:
            # No progress (no gradient in the slices): the reference's first loop has updated m and v.
            for group, params in groups:
                if group["lr"] > 0.0:
                    for p in params:
                        state = self.state[p]
                        grad = _penalised(p, group["weight_decay"], decouple)
                        update_moments(grad, state.get("exp_avg"), state["exp_avg_sq"], d=d, beta1=beta1, beta2=beta2)
            return None
        if not lr > 0.0:
            return None  # only with fsdp_in_use: nothing to estimate

        if fsdp_in_use:
            # every process takes part, one without gradients too: the device of its first param
            device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
            sums = torch.tensor([delta_numerator, d_denom], dtype=torch.float64, device=device)
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            global_d_numerator = d_numerator + sums[0].item()
            global_d_denom = sums[1].item()
            # IEEE division: a zero sum gives inf or NaN where Python would raise
            d_hat = (torch.tensor(d_coef * global_d_numerator, dtype=torch.float64) / global_d_denom).item()
        else:
            global_d_numerator = d_numerator + delta_numerator
            global_d_denom = d_denom
            d_hat = d_coef * global_d_numerator / global_d_denom  # d̂ = c·r/Σ‖s‖₁
        d_new = d
        if d_new == self.param_groups[-1]["d0"]:  # the first estimate (the reference tests the last group)
            d_new = max(d_new, d_hat)
        d_max = max(d_max, d_hat)  # D ← max(D, d̂)
        d_new = min(d_max, d_new * growth_rate)  # d' = min(D, ρ·d)

        for group, _ in groups:
            group["d_numerator"] = global_d_numerator
            group["d_denom"] = global_d_denom
            group["d"] = d_new
            group["d_max"] = d_max
            group["d_hat"] = d_hat
        step = {"d": d, "dlr": dlr, "d_new": d_new}
        return [step] * len(groups)


def _bias_correction(first: dict[str, Any]) -> float:
    """b = √(1 − β₂ᵏ⁺¹)/(1 − β₁ᵏ⁺¹) with the first group's betas and k, or 1."""
    if not first["use_bias_correction"]:
        return 1
    beta1, beta2 = first["betas"]
    k = first["k"]
    return ((1 - beta2 ** (k + 1)) ** 0.5) / (1 - beta1 ** (k + 1))


def _penalised(param: Tensor, decay: float, decouple: bool) -> Tensor:
    """The gradient with the L2 penalty (a new tensor; the reference adds it to ``param.grad`` in place)."""
    grad = param.grad
    assert grad is not None  # reduce sees the params with a gradient
    if decay != 0 and not decouple:
        return grad.add(param, alpha=decay)  # g ← g + λθ
    return grad
