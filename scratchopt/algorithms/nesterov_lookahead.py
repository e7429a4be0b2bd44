r"""Nesterov's accelerated gradient in the lookahead form: the gradient is taken where momentum leads.

One step, for parameter θ with velocity v (Nesterov, 1983, in the form of Sutskever et al., 2013, eq. 3–4)::

    φ   ← θ + μ·v                      lookahead point: the parameters sit here while the closure runs
    g   ← ∇f(φ)                        computed by the closure's ``backward()``
    v   ← μ·v − γ·g
    θ   ← θ + v

=========  ===============================  =====================
symbol     argument                         state key
=========  ===============================  =====================
θ          params (between steps)
φ          params (during the closure)
g          ``param.grad`` set by the closure
γ          ``lr``
μ          ``momentum``
v          —                                ``momentum_buffer`` (starts at 0)
=========  ===============================  =====================

The closure is required: ``step(closure)`` moves every parameter to φ, calls ``closure()`` under
``torch.enable_grad()``, restores θ (from an exact copy, not by subtracting μ·v), then applies the update.
The closure must do what torch's closures do: zero the gradients, recompute the loss, call
``backward()`` and return the loss. ``step`` returns that loss, which is f(φ) — the loss at the
lookahead point, not at θ before or after the step. After ``step`` the parameters hold the new θ and
``param.grad`` still holds ∇f(φ). A parameter whose ``grad`` is None after the closure takes no part:
its velocity is left alone (and never created if it never had a gradient).

Relation to ``torch.optim.SGD(momentum=μ, nesterov=True, dampening=0)``: torch's "Nesterov" is this
algorithm under the change of variables θ̃ = θ + μ·v. torch keeps the lookahead point φ as its
parameter and never stores θ; its buffer b is the velocity rescaled, b = −v/γ. After k steps from the
same start (v₀ = 0, so θ̃₀ = θ₀), torch's parameter equals θₖ + μ·vₖ and its ``momentum_buffer``
equals −vₖ/γ, and both evaluate the gradient at the same sequence of points (equal in exact
arithmetic, a few ulp apart in floating point). What differs is what the caller sees: torch's
parameter is the lookahead point, ours is θ, and our closure sees φ only while it runs.

Cost: one extra parameter-sized tensor of state (v), plus one transient copy of θ during ``step``;
O(n) arithmetic. Sparse gradients are refused, before any parameter is updated. ``lookahead`` is the
move to φ and ``update`` the rest of the math, called once per parameter with a gradient.

References: Y. Nesterov, "A method for solving the convex programming problem with convergence rate
O(1/k²)", Soviet Math. Dokl. 27 (1983); I. Sutskever, J. Martens, G. Dahl, G. Hinton, "On the importance
of initialization and momentum in deep learning", ICML 2013,
https://proceedings.mlr.press/v28/sutskever13.html; J. Melville, "Nesterov accelerated gradient",
https://jlmelville.github.io/mize/nesterov.html (the many equivalent forms of NAG).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from scratchopt.checks import check_lr, require
from scratchopt.ops import get_value, zeros_like
from scratchopt.optimizer import ClosureOptimizer
from scratchopt.step_checks import check_state_matches

SPARSE_ERROR = "NesterovLookahead does not support sparse gradients"


def lookahead(param: Tensor, momentum_buffer: Tensor, *, momentum: float) -> None:
    param.add_(momentum_buffer, alpha=momentum)  # θ → φ = θ + μv


def update(param: Tensor, grad: Tensor, momentum_buffer: Tensor, *, lr: float, momentum: float) -> None:
    momentum_buffer.mul_(momentum).add_(grad, alpha=-lr)  # v ← μv − γ·∇f(φ)
    param.add_(momentum_buffer)  # θ ← θ + v


class NesterovLookahead(ClosureOptimizer):
    __doc__ = __doc__
    example_kwargs = {"lr": 0.1, "momentum": 0.9}

    def __init__(self, params: Any, lr: float, momentum: float) -> None:
        check_lr(lr)
        require(0.0 <= momentum < 1.0, "momentum value", momentum, "0 <= momentum < 1")
        super().__init__(params, {"lr": lr, "momentum": momentum})

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Move to the lookahead point, evaluate ``closure`` there, restore θ and update.

        Returns the closure's loss, f(θ + μ·v), evaluated at the lookahead point.
        """
        self.require_closure(closure)
        assert closure is not None  # for mypy: require_closure raised otherwise
        saved: list[tuple[Tensor, Tensor]] = []
        try:
            with torch.no_grad():
                for group in self.param_groups:
                    momentum = get_value(group["momentum"])
                    for p in group["params"]:
                        buffer = self.state.get(p, {}).get("momentum_buffer")
                        if buffer is not None and momentum != 0:
                            saved.append((p, p.clone()))
                            lookahead(p, buffer, momentum=momentum)
            with torch.enable_grad():
                loss = closure()
        finally:
            with torch.no_grad():
                for p, theta in saved:
                    p.copy_(theta)  # exact restore of θ
        self._update()
        return loss

    def _update(self) -> None:
        """v ← μv − γ·∇f(φ) and θ ← θ + v for every parameter with a gradient (v created at zero on its
        first update); a sparse gradient is refused before any parameter changes."""
        entries = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for _, p in entries):
            raise RuntimeError(SPARSE_ERROR)
        check_state_matches(self, [p for _, p in entries], ("momentum_buffer",))
        with torch.no_grad():
            for group, p in entries:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = zeros_like(p)
                update(
                    p,
                    p.grad,
                    state["momentum_buffer"],
                    lr=get_value(group["lr"]),
                    momentum=get_value(group["momentum"]),
                )
