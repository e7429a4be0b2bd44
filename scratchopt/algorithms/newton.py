r"""Newton's method with the exact Hessian, for small problems.

One step, with every parameter of every group that requires grad flattened into one vector θ of n
entries (in the order of ``param_groups`` and of each group's ``params``)::

    f   ← closure()                     the loss, at θ
    g   ← ∇f(θ)                         n entries, by autograd (``torch.autograd.grad``, ``create_graph=True``)
    H   ← ∇²f(θ)                        n × n, row i = ∇gᵢ: g differentiated again, 128 rows per vmapped
                                        backward pass (``is_grads_batched=True``)
    A   ← ½(H + Hᵀ) + D                 D = diag(δ), δ the ``damping`` of each entry's group
    A   = Q·Λ·Qᵀ                        ``torch.linalg.eigh``
    d   ← A⁻¹·g = Q·(Qᵀg / Λ)           the (damped) Newton direction
    θ   ← θ − γ·d                       γ the ``lr`` of each entry's group

=========  ======================  ===========
symbol     argument                state key
=========  ======================  ===========
θ          params
f          ``closure()``
g, H       —
δ          ``damping``
γ          ``lr``
d          —
=========  ======================  ===========

Newton keeps no per-parameter state (``state_dict()["state"]`` is empty); ``lr``, ``damping`` and
``allow_indefinite`` live in the param groups and travel with ``state_dict``.

The closure contract differs from torch's usual one: the closure must **return the loss** as a
tensor with one element, computed from the parameters with autograd enabled, and must **not call
``backward()``** (the graph is needed twice: once for g with ``create_graph=True``, then again for the
rows of H). ``step`` calls it under ``torch.enable_grad()`` and differentiates what it returns; zeroing
gradients in it is harmless. ``param.grad`` is neither read nor written. ``step`` returns the loss at
θ before the step. Parameters with ``requires_grad=False`` take no part.

Checks, so that a step never writes a NaN silently. λ are the eigenvalues of A and
τ = n·ε·max|λ| (ε the machine epsilon of the parameters' dtype, the tolerance of ``matrix_rank``):

* a non-finite loss, gradient or Hessian raises ``FloatingPointError``;
* A singular (some |λ| ≤ τ, including H = 0 with δ = 0), ``eigh`` failing, or a non-finite d raises
  ``torch.linalg.LinAlgError`` whose message names ``damping`` as the remedy;
* A indefinite (some λ < −τ) raises ``ValueError`` by default: the Newton step then need not descend
  and heads for a saddle point or a maximum as readily as for a minimum. The message gives the smallest
  eigenvalue; a damping larger than its magnitude makes A positive definite. With
  ``allow_indefinite=True`` (in every group) the pure Newton step d = A⁻¹g is taken anyway: Newton's
  method as a finder of stationary points, f'(θ) = 0, which is what the classic iteration
  x ← x − f'(x)/f''(x) on f(x) = sin(x) + x²/10 from x = −5 does (it crosses regions of negative
  curvature before settling at the minimum x ≈ −1.30644).

Validation: ``0 <= lr < inf`` (lr = 1 is the Newton step; lr = 0 is allowed, as in torch's optimizers,
and leaves θ unchanged), ``0 <= damping < inf``.

Cost, for n entries: O(n²) memory for H and Q; one backward pass for g and ⌈n/128⌉ vmapped ones for H
(each holding 128 copies of the backward's intermediates; where vmap cannot run the backward, n
ordinary passes instead); O(n³) time for ``eigh``, chosen over Cholesky because one factorisation both
classifies A (singular, indefinite) and solves. Meant for up to a few thousand entries (n = 1000: a few
seconds on a CPU, mostly ``eigh``). The computation is done in the parameters' (promoted) dtype;
float64 is recommended for anything ill-conditioned.

References: J. Nocedal and S. J. Wright, *Numerical Optimization*, 2nd ed., Springer 2006, §3.3
(Newton's method) and §3.4 (Newton's method with Hessian modification); K. Levenberg, "A method for
the solution of certain non-linear problems in least squares", Q. Appl. Math. 2 (1944) (damping).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from scratchopt.checks import require
from scratchopt.ops import get_value
from scratchopt.optimizer import ClosureOptimizer

_DAMPING_HINT = "pass damping > 0 (for example damping=1e-3) to regularise the Hessian as H + damping·I"


def update(param: Tensor, direction: Tensor, *, lr: float) -> None:
    param.add_(direction, alpha=-lr)  # θ ← θ − γ·d


def gradient_and_hessian(loss: Tensor, params: list[Tensor], *, rows_per_batch: int = 128) -> tuple[Tensor, Tensor]:
    """The flat gradient (n,) and the Hessian (n, n) of ``loss`` with respect to ``params``, detached.

    The Hessian is built ``rows_per_batch`` rows at a time, each batch one vmapped backward pass
    (``is_grads_batched=True`` with rows of the identity as ``grad_outputs``); where vmap cannot run the
    graph's backward, it falls back to one backward pass per row. ``rows_per_batch=1`` is that loop.
    """
    try:
        grads = torch.autograd.grad(loss, params, create_graph=True, materialize_grads=True)
    except RuntimeError as error:
        raise RuntimeError(
            f"Newton could not differentiate the loss returned by the closure ({error}). The closure must "
            "return the loss and must not call backward() itself: Newton differentiates the loss twice."
        ) from error
    gradient = torch.cat([grad.reshape(-1) for grad in grads])
    n = gradient.numel()
    hessian = gradient.new_zeros(n, n)
    if not gradient.requires_grad:  # the gradient is constant: f is (at most) linear, H = 0
        return gradient.detach(), hessian
    start = 0
    if rows_per_batch > 1:
        identity = torch.eye(n, dtype=gradient.dtype, device=gradient.device)
        try:
            for start in range(0, n, rows_per_batch):
                rows = torch.autograd.grad(
                    gradient,
                    params,
                    grad_outputs=identity[start : start + rows_per_batch],
                    retain_graph=True,
                    materialize_grads=True,
                    is_grads_batched=True,
                )
                hessian[start : start + rows_per_batch] = torch.cat([r.reshape(r.shape[0], -1) for r in rows], dim=1)
            return gradient.detach(), hessian
        except RuntimeError:
            pass  # vmap could not run this backward: finish row by row
    for i in range(start, n):
        row = torch.autograd.grad(gradient[i], params, retain_graph=True, materialize_grads=True)
        hessian[i] = torch.cat([r.reshape(-1) for r in row])
    return gradient.detach(), hessian


def newton_direction(gradient: Tensor, hessian: Tensor, damping: Tensor, *, allow_indefinite: bool) -> Tensor:
    """d = (½(H + Hᵀ) + diag(damping))⁻¹·g, refusing singular (and, unless allowed, indefinite) systems."""
    a = (hessian + hessian.mT) / 2 + torch.diag(damping)
    try:
        eigenvalues, eigenvectors = torch.linalg.eigh(a)
    except torch.linalg.LinAlgError as error:
        raise torch.linalg.LinAlgError(
            f"Newton: the eigendecomposition of H + damping·I failed ({error}); {_DAMPING_HINT}"
        ) from error
    n = gradient.numel()
    scale = eigenvalues.abs().max().item() if n else 0.0
    tolerance = n * torch.finfo(a.dtype).eps * scale
    smallest_magnitude = eigenvalues.abs().min().item() if n else math.inf
    if smallest_magnitude <= tolerance:
        raise torch.linalg.LinAlgError(
            f"Newton: the Hessian H + damping·I ({n}×{n}) is singular: its smallest |eigenvalue| is "
            f"{smallest_magnitude:.6g} <= tolerance {tolerance:.3g} (largest |eigenvalue| {scale:.6g}), so the "
            f"Newton step does not exist; {_DAMPING_HINT}"
        )
    smallest = eigenvalues.min().item()
    if smallest < 0 and not allow_indefinite:
        raise ValueError(
            f"Newton: the Hessian H + damping·I ({n}×{n}) is indefinite: its smallest eigenvalue is "
            f"{smallest:.6g} < 0, so the Newton step need not descend (it heads for any stationary point). "
            f"Increase damping by more than {-smallest:.6g} to make it positive definite, or pass "
            "allow_indefinite=True to take the pure Newton step anyway."
        )
    direction = eigenvectors @ ((eigenvectors.mT @ gradient) / eigenvalues)
    if not torch.isfinite(direction).all():
        raise torch.linalg.LinAlgError(
            f"Newton: the Newton step is not finite (the Hessian is numerically singular); {_DAMPING_HINT}"
        )
    return direction


class Newton(ClosureOptimizer):
    __doc__ = __doc__
    closure_contract = "one that returns the loss and does not call backward()"
    #: From an arbitrary start the Hessian is often indefinite, and by default that step is refused.
    example_kwargs = {"allow_indefinite": True}

    def __init__(self, params: Any, lr: float = 1.0, damping: float = 0.0, *, allow_indefinite: bool = False) -> None:
        require(0.0 <= lr < math.inf, "learning rate", lr, "0 <= lr < inf")
        require(0.0 <= damping < math.inf, "damping value", damping, "0 <= damping < inf")
        super().__init__(params, {"lr": lr, "damping": damping, "allow_indefinite": bool(allow_indefinite)})

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Evaluate ``closure`` (which returns the loss, without calling backward) and take a Newton step.

        Returns the loss at the parameters before the step.
        """
        self.require_closure(closure)
        assert closure is not None  # for mypy: require_closure raised otherwise
        entries = [(group, p) for group in self.param_groups for p in group["params"] if p.requires_grad]
        params = [p for _, p in entries]
        for p in params:
            if p.is_complex():
                raise NotImplementedError("Newton does not support complex parameters")
        with torch.enable_grad():
            loss = closure()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(
                f"Newton's closure must return the loss as a one-element tensor; got {type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else "")
            )
        if not params:
            return loss
        if not loss.requires_grad:
            raise RuntimeError(
                "Newton: the loss returned by the closure does not require grad; compute it from the "
                "parameters with autograd enabled (not under torch.no_grad(), not detached)"
            )
        with torch.enable_grad():  # differentiating needs it as much as the closure does
            gradient, hessian = gradient_and_hessian(loss.reshape(()), params)
        finite = all(torch.isfinite(t).all() for t in (loss.detach(), gradient, hessian))
        if not finite:
            raise FloatingPointError(
                f"Newton: the loss ({loss.item()}), its gradient or its Hessian is not finite at the current parameters"
            )
        damping = torch.cat(
            [gradient.new_full((p.numel(),), float(get_value(group["damping"]))) for group, p in entries]
        )
        allow_indefinite = all(group["allow_indefinite"] for group, _ in entries)
        direction = newton_direction(gradient, hessian, damping, allow_indefinite=allow_indefinite)
        with torch.no_grad():
            offset = 0
            for group, p in entries:
                block = direction[offset : offset + p.numel()].view_as(p).to(p.dtype)
                offset += p.numel()
                update(p, block, lr=get_value(group["lr"]))
        return loss
