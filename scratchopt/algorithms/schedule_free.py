r"""Schedule-Free SGD and AdamW (Defazio et al., 2024, "The Road Less Scheduled",
https://arxiv.org/abs/2405.15682): no learning-rate schedule, an average of the iterates instead.

Three sequences per parameter: z (the base optimizer's iterates), x (their weighted average, the weights
to evaluate) and y (where the gradient is taken, an interpolation of the two). The parameter holds y
while training and x while evaluating; ``optimizer.train()`` and ``optimizer.eval()`` switch it, and
``step()`` refuses to run in eval mode. Step k (0-based, counted per param group), with gradient g at y::

    s_k   = (k + 1)/W if k < W, else 1            linear warmup over W steps
    γ_k   = γ·s_k                                 the scheduled lr (``scheduled_lr``)
    γmax  = max(γmax, γ_k)                        (``lr_max``)
    w_k   = (k + 1)^r · γmax^p                    the weight of this iterate in the average
    Σw    = Σw + w_k                              (``weight_sum``)
    c     = w_k / Σw                              (0 where Σw = 0)
    AdamW only:
      v   ← β₂·v + (1 − β₂)·g²
      g   ← g / (√(v / (1 − β₂^(k+1))) + ε)        the gradient normalised by the bias-corrected √v
    g     ← g + λ·y                               if λ ≠ 0 (decay evaluated at y)
    y     ← y + c·(z − y)                         (lerp)
    y     ← y + γ_k·(β(1 − c) − 1)·g
    z     ← z − γ_k·g

The last three lines update y in place without forming x: with x = (y − (1 − β)z)/β they are the
paper's z ← z − γg, x ← (1 − c)x + cz, y ← (1 − β)z + βx. ``eval()`` sets θ ← θ + (1 − 1/β)(z − θ),
which is x; ``train()`` sets θ ← θ + (1 − β)(z − θ), which is y again.

=========  ===============================  ================================
symbol     argument                         state key / group key
=========  ===============================  ================================
y (or x)   params
g          ``param.grad``
γ          ``lr``
β          ``betas[0]`` (AdamW), ``momentum`` (SGD)
β₂         ``betas[1]`` (AdamW)
ε          ``eps`` (AdamW)
λ          ``weight_decay``
W          ``warmup_steps``
r          ``r``
p          ``weight_lr_power``
z          —                                ``z``
v          —                                ``exp_avg_sq`` (AdamW)
k          —                                group ``k``
γ_k        —                                group ``scheduled_lr``
γmax       —                                group ``lr_max``
Σw         —                                group ``weight_sum``
—          —                                group ``train_mode``
=========  ===============================  ================================

The reference is the authors' ``schedulefree`` package (``SGDScheduleFree`` and ``AdamWScheduleFree``,
the memory-efficient forms that keep y in the parameter): signature, defaults, state and group keys and
operation order follow it, so the loop is bit for bit equal to both its paths (``tests/test_schedule_free.py``).
Like the reference, the step count k, the running weight sum and γmax are kept in the param group, and
the warmup and bias correction use k, so a param that misses steps still follows the group's schedule;
``train_mode`` of the first group decides whether ``step()`` may run. Differences: the optimizer starts
in train mode, so that it steps after construction like every torch optimizer (before the first step
x = y = z, so this changes no number; the reference starts in eval mode and refuses to step until
``train()``, which here changes nothing at that point); the reference writes the normalised gradient into
``param.grad`` (to save memory); this one leaves the gradient as it was, with the same numbers;
``step()`` in eval mode raises RuntimeError (the reference raises a bare Exception); a complex parameter
is updated as its real and imaginary parts, as torch's optimizers do (the reference squares a complex
gradient as a complex number); ``foreach`` defaults to None (scratchopt's default strategy). A tensor
``lr`` is read as its value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from scratchopt.checks import check_adam_arguments, check_one_element_lr, require_should_be
from scratchopt.ops import as_real, zeros_like
from scratchopt.optimizer import ScratchOptimizer, squeeze_scalar


@dataclass(frozen=True)
class Schedule:
    """One step's group-level scalars, computed from the group as it was before the step."""

    k: int  # the step count after this step
    lr: float  # γ_k
    lr_max: float  # γmax
    weight_sum: float  # Σw
    ckp1: float  # c


def schedule_of(group: dict[str, Any]) -> Schedule:
    """γ_k, γmax, Σw and c of the group's next step, in the reference's operation order."""
    k = group["k"]
    warmup_steps = group["warmup_steps"]
    sched = (k + 1) / warmup_steps if k < warmup_steps else 1.0  # s_k
    lr = float(squeeze_scalar(group["lr"])) * sched  # γ_k
    lr_max = max(lr, group["lr_max"])  # γmax
    weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])  # w_k
    weight_sum = group["weight_sum"] + weight  # Σw
    ckp1 = weight / weight_sum if weight_sum != 0 else 0.0  # c
    return Schedule(k + 1, lr, lr_max, weight_sum, ckp1)


def update_sgd(
    param: Tensor, grad: Tensor, z: Tensor, *, lr: float, ckp1: float, momentum: float, weight_decay: float
) -> None:
    param, grad, z = as_real(param, grad, z)
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)  # g ← g + λy
    param.lerp_(z, ckp1)  # y ← y + c(z − y)
    param.add_(grad, alpha=lr * (momentum * (1 - ckp1) - 1))  # y ← y + γ_k(β(1 − c) − 1)g
    z.sub_(grad, alpha=lr)  # z ← z − γ_k·g


def update_adamw(
    param: Tensor,
    grad: Tensor,
    z: Tensor,
    exp_avg_sq: Tensor,
    *,
    lr: float,
    ckp1: float,
    bias_correction2: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    param, grad, z, exp_avg_sq = as_real(param, grad, z, exp_avg_sq)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v ← β₂v + (1 − β₂)g²
    denom = exp_avg_sq.div(bias_correction2).sqrt_().add_(eps)  # √(v/(1 − β₂^(k+1))) + ε
    grad = grad.div(denom)  # g ← g/(…)
    if weight_decay != 0:
        grad.add_(param, alpha=weight_decay)  # g ← g + λy
    param.lerp_(z, ckp1)  # y ← y + c(z − y)
    param.add_(grad, alpha=lr * (beta1 * (1 - ckp1) - 1))  # y ← y + γ_k(β(1 − c) − 1)g
    z.sub_(grad, alpha=lr)  # z ← z − γ_k·g


class ScheduleFreeModes:
    """``train()``/``eval()`` and the group-level schedule, shared by both Schedule-Free optimizers."""

    param_groups: list[dict[str, Any]]
    state: Any

    def interpolation(self, group: dict[str, Any]) -> float:
        """The interpolation β of a group (``betas[0]`` or ``momentum``)."""
        raise NotImplementedError

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step in train mode; with a closure, re-evaluate the loss first and return it."""
        self.require_train_mode()
        return super().step(closure)  # type: ignore[misc]

    @torch.no_grad()
    def eval(self) -> None:
        """Put x in the params (θ ← θ + (1 − 1/β)(z − θ)): evaluate, or save a checkpoint, after this."""
        for group in self.param_groups:
            if group["train_mode"]:
                weight = 1 - 1 / self.interpolation(group)
                for p in group["params"]:
                    z = self.state[p].get("z") if p in self.state else None
                    if z is not None:
                        p.lerp_(end=z.to(device=p.device, dtype=p.dtype), weight=weight)
                group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Put y back in the params (θ ← θ + (1 − β)(z − θ)): call it before training steps."""
        for group in self.param_groups:
            if not group["train_mode"]:
                weight = 1 - self.interpolation(group)
                for p in group["params"]:
                    z = self.state[p].get("z") if p in self.state else None
                    if z is not None:
                        p.lerp_(end=z.to(device=p.device, dtype=p.dtype), weight=weight)
                group["train_mode"] = True

    def require_train_mode(self) -> None:
        if not self.param_groups[0]["train_mode"]:
            raise RuntimeError(
                f"{type(self).__name__}.step() was called in eval mode: call optimizer.train() before "
                "training steps and optimizer.eval() before evaluating or saving a checkpoint"
            )

    def advance_group(self, group: dict[str, Any]) -> None:
        found = schedule_of(group)
        group["scheduled_lr"] = found.lr
        group["lr_max"] = found.lr_max
        group["weight_sum"] = found.weight_sum
        group["k"] = found.k


def schedule_defaults(warmup_steps: int, r: float, weight_lr_power: float) -> dict[str, Any]:
    """The group keys of the schedule, at their values before the first step (the reference's, but in
    train mode)."""
    return {
        "r": r,
        "k": 0,
        "warmup_steps": warmup_steps,
        "train_mode": True,
        "weight_sum": 0.0,
        "lr_max": -1.0,
        "scheduled_lr": 0.0,
        "weight_lr_power": weight_lr_power,
    }


class ScheduleFreeSGD(ScheduleFreeModes, ScratchOptimizer):
    __doc__ = __doc__
    state_keys = ("z",)
    weight_like_state = frozenset({"z"})
    hyperparameter_keys = ("momentum", "weight_decay")
    scalar_state_keys = ()
    sparse_error = "ScheduleFreeSGD does not support sparse gradients"
    update = staticmethod(update_sgd)
    elementwise = True
    reference_class = "schedulefree:SGDScheduleFree"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2,
        foreach: bool | None = None,
        *,
        impl: str | None = None,
    ) -> None:
        check_one_element_lr(lr)
        require_should_be(0.0 <= lr, "learning rate", ">= 0", lr, "lr")
        require_should_be(0.0 <= weight_decay, "weight_decay", ">= 0", weight_decay, "weight_decay")
        require_should_be(0 < momentum < 1, "momentum", "between 0 and 1 exclusive", momentum, "momentum")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            **schedule_defaults(warmup_steps, r, weight_lr_power),
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults, impl, foreach=foreach)

    def interpolation(self, group: dict[str, Any]) -> float:
        return float(group["momentum"])

    def update_arguments(self, group: dict[str, Any]) -> dict[str, Any]:
        found = schedule_of(group)
        return {**super().update_arguments(group), "lr": found.lr, "ckp1": found.ckp1}

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return {"z": torch.clone(param, memory_format=torch.preserve_format)}


class ScheduleFreeAdamW(ScheduleFreeModes, ScratchOptimizer):
    __doc__ = __doc__
    state_keys = ("z", "exp_avg_sq")
    nonnegative_state = frozenset({"exp_avg_sq"})
    weight_like_state = frozenset({"z"})
    hyperparameter_keys = ("betas", "eps", "weight_decay")
    split_keys = {"betas": ("beta1", "beta2")}
    scalar_state_keys = ()
    sparse_error = "ScheduleFreeAdamW does not support sparse gradients"
    update = staticmethod(update_adamw)
    elementwise = True
    reference_class = "schedulefree:AdamWScheduleFree"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: bool | None = None,
        *,
        impl: str | None = None,
    ) -> None:
        check_adam_arguments(lr, eps, betas, weight_decay)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            **schedule_defaults(warmup_steps, r, weight_lr_power),
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults, impl, foreach=foreach)

    def interpolation(self, group: dict[str, Any]) -> float:
        return float(group["betas"][0])

    def update_arguments(self, group: dict[str, Any]) -> dict[str, Any]:
        found = schedule_of(group)
        values = super().update_arguments(group)
        bias_correction2 = 1 - values["beta2"] ** found.k  # 1 − β₂^(k+1)
        return {**values, "lr": found.lr, "ckp1": found.ckp1, "bias_correction2": bias_correction2}

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return {"z": torch.clone(param, memory_format=torch.preserve_format), "exp_avg_sq": zeros_like(param)}
