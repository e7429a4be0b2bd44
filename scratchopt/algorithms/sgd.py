r"""SGD: stochastic gradient descent with momentum, dampening, Nesterov momentum and weight decay.

Update for parameter θ with gradient g (Sutskever et al., 2013, in torch's form)::

    g   ← −g                           if maximize
    g   ← g + λ·θ                      if λ ≠ 0
    b   ← g                            if μ ≠ 0, on the buffer's first step
    b   ← μ·b + (1 − τ)·g              if μ ≠ 0, afterwards
    g   ← g + μ·b                      if nesterov
    g   ← b                            if μ ≠ 0 and not nesterov
    θ   ← θ − γ·g

=========  ==================  =====================
symbol     argument            state key
=========  ==================  =====================
θ          params
g          ``param.grad``
γ          ``lr``
μ          ``momentum``
τ          ``dampening``
λ          ``weight_decay``
b          —                   ``momentum_buffer``
=========  ==================  =====================

Deliberate differences from the textbook, all torch's: the buffer starts as a copy of the first
gradient (no dampening on that step); Nesterov is the "look-ahead on the gradient" form g + μ·b, not
the closure form of :mod:`scratchopt.algorithms.nesterov_lookahead`; there is no ``step`` counter in the state.
Sparse gradients are accepted as torch accepts them. With momentum the buffer is dense (torch keeps an
uncoalesced sparse clone and adds its entries one by one), so a row repeated in a sparse gradient is
summed in another order: a few ulp apart from torch, not bit-exact (tests/test_api.py bounds it at rtol 1e-14 in
float64).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from scratchopt.checks import check_lr, check_nonnegative
from scratchopt.ops import zeros_like
from scratchopt.optimizer import ScratchOptimizer


def update(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    *,
    lr: Any,
    momentum: float,
    dampening: float,
    weight_decay: Any,
    nesterov: bool,
    maximize: bool,
    momentum_buffer_is_new: bool,
) -> None:
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)  # g ← g + λθ
    if momentum != 0:
        assert momentum_buffer is not None  # count_step creates it whenever μ ≠ 0
        if grad.is_sparse:
            grad = grad.to_dense()  # the momentum buffer is dense, so momentum arithmetic is too
        if momentum_buffer_is_new:
            momentum_buffer.copy_(grad)  # b ← g
        else:
            momentum_buffer.mul_(momentum).add_(grad, alpha=1 - dampening)  # b ← μb + (1 − τ)g
        grad = grad.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer  # g ← g + μb | b
    param.add_(grad, alpha=-lr)  # θ ← θ − γg


class SGD(ScratchOptimizer):
    __doc__ = __doc__
    state_keys = ("momentum_buffer",)
    hyperparameter_keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
    #: torch's ``__setstate__`` fills in ``fused=False`` here, not the None of the other flags.
    group_defaults = {"nesterov": False, "maximize": False, "fused": False}
    update = staticmethod(update)
    elementwise = True
    torch_twin = "SGD"
    #: torch's default lr (1e-3) barely moves a small model in a short run.
    example_kwargs = {"lr": 0.1}

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        impl: str | None = None,
    ) -> None:
        check_lr(lr)
        check_nonnegative(momentum, "momentum")
        check_nonnegative(weight_decay, "weight_decay")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
        }
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                "Nesterov momentum requires a momentum and zero dampening "
                f"(got momentum={momentum}, dampening={dampening}; allowed: momentum > 0, dampening = 0)"
            )
        super().__init__(params, defaults, impl, foreach=foreach, differentiable=differentiable, fused=fused)

    def count_step(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        # torch keeps no state at all without momentum, and none before the buffer's first step.
        return _BUFFER_IS_NEW if group["momentum"] != 0 and self._start_buffer(param) else _BUFFER_IS_OLD

    def count_steps(self, params: list[Tensor], group: dict[str, Any]) -> list[dict[str, Any]]:
        # count_step for a whole group, as two shared dicts: a strategy then sees at once that the params
        # agree.
        if group["momentum"] == 0:
            return [_BUFFER_IS_OLD] * len(params)
        return [_BUFFER_IS_NEW if self._start_buffer(p) else _BUFFER_IS_OLD for p in params]

    def _start_buffer(self, param: Tensor) -> bool:
        """Create the momentum buffer if the param has none; whether it did."""
        state = self.state[param]
        if state.get("momentum_buffer") is not None:
            return False
        state["momentum_buffer"] = zeros_like(param)
        return True


_BUFFER_IS_NEW: dict[str, Any] = {"momentum_buffer_is_new": True}
_BUFFER_IS_OLD: dict[str, Any] = {"momentum_buffer_is_new": False}
