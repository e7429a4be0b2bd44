r"""Rprop: resilient backpropagation, steps that adapt to the sign of the gradient only (Riedmiller &
Braun, "A Direct Adaptive Method for Faster Backpropagation Learning: The RPROP Algorithm", IEEE ICNN
1993, https://doi.org/10.1109/ICNN.1993.298623).

Step t, for parameter θ with gradient g, elementwise::

    g   ← −g                                   if maximize
    s   = sign(g·p)                            did the gradient keep its sign since the last step?
    f   = η₊ where s > 0,  η₋ where s < 0,  1 where s = 0
    Δ   ← clamp(Δ·f, Δmin, Δmax)               per-element step size
    g   ← 0 where f = η₋                       a sign change: no move, and no sign to compare next time
    θ   ← θ − sign(g)·Δ
    p   ← g

with Δ starting at γ and p at 0.

=========  ===============================  =====================================================
symbol     argument                         state key
=========  ===============================  =====================================================
θ          params
g          ``param.grad``
γ          ``lr``                           (the initial Δ)
η₋, η₊     ``etas``
Δmin, Δmax ``step_sizes``
t          —                                ``step`` (0-d float32 tensor; counted, unused by update)
p          —                                ``prev``
Δ          —                                ``step_size``
s, f       —                                — (temporaries)
=========  ===============================  =====================================================

The update is elementwise: the sign tests pick values with ``masked_fill`` inside the tensor math, not
with Python branches, so ``impl`` may run it on lists or compiled kernels. A NaN gradient
leaves its factor NaN, as in torch.

Deliberate differences from the paper, all torch's: this is the variant the paper's authors later named
Rprop⁻ (no weight backtracking on a sign change, only a zero gradient for the next comparison); the
initial Δ is ``lr`` rather than a separate Δ₀; ``step_size`` is created shaped and strided like the first
gradient. A complex parameter is updated as its real and imaginary parts, each with its own Δ.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from scratchopt.checks import check_lr, require
from scratchopt.ops import as_real, get_value, zeros_like
from scratchopt.optimizer import ScratchOptimizer, new_step_counter, squeeze_scalar


def update(
    param: Tensor,
    grad: Tensor,
    prev: Tensor,
    step_size: Tensor,
    *,
    etas: tuple[float, float],
    step_sizes: tuple[float, float],
    maximize: bool,
) -> None:
    etaminus, etaplus = etas
    step_size_min, step_size_max = step_sizes
    if maximize:
        grad = -grad  # g ← −g
    param, grad, prev, step_size = as_real(param, grad, prev, step_size)
    factor = grad.mul(prev).sign()  # s = sign(g·p)
    factor = factor.masked_fill(factor.gt(0), etaplus)  # f = η₊ where s > 0
    factor = factor.masked_fill(factor.lt(0), etaminus)  # f = η₋ where s < 0
    factor = factor.masked_fill(factor.eq(0), 1)  # f = 1 where s = 0
    step_size.mul_(factor).clamp_(step_size_min, step_size_max)  # Δ ← clamp(Δf, Δmin, Δmax)
    grad = grad.masked_fill(factor.eq(etaminus), 0)  # g ← 0 where the sign changed
    param.addcmul_(grad.sign(), step_size, value=-1)  # θ ← θ − sign(g)Δ
    prev.copy_(grad)  # p ← g


class Rprop(ScratchOptimizer):
    __doc__ = __doc__
    state_keys = ("prev", "step_size")
    nonnegative_state = frozenset({"step_size"})
    hyperparameter_keys = ("etas", "step_sizes", "maximize")
    group_defaults = {"maximize": False}
    sparse_error = "Rprop does not support sparse gradients"
    update = staticmethod(update)
    elementwise = True
    torch_twin = "Rprop"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-2,
        etas: tuple[float, float] = (0.5, 1.2),
        step_sizes: tuple[float, float] = (1e-6, 50),
        *,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        impl: str | None = None,
    ) -> None:
        check_lr(lr)
        require(0.0 < etas[0] < 1.0 < etas[1], "eta values", f"{etas[0]}, {etas[1]}", "0 < etas[0] < 1 < etas[1]")
        defaults = {
            "lr": lr,
            "etas": etas,
            "step_sizes": step_sizes,
            "maximize": maximize,
        }
        super().__init__(params, defaults, impl, foreach=foreach, differentiable=differentiable, capturable=capturable)

    def step_arguments(self, step: Any, group: dict[str, Any]) -> dict[str, Any]:
        return {}  # t is counted, as torch does, and never read

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        lr = get_value(squeeze_scalar(group["lr"]))
        # A complex parameter is two real ones: its imaginary part starts with the same Δ.
        initial = complex(lr, lr) if param.is_complex() else lr
        assert param.grad is not None  # the first step of a param with a gradient creates its state
        return {
            "step": new_step_counter(param, group),
            "prev": zeros_like(param),
            "step_size": torch.full_like(param.grad, initial, memory_format=torch.preserve_format),
        }
