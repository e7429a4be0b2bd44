r"""L-BFGS: limited-memory BFGS, a quasi-Newton method, optionally with a strong-Wolfe line search
(Liu & Nocedal, "On the limited memory BFGS method for large scale optimization", Math. Programming 45,
1989, https://doi.org/10.1007/BF01589116; Nocedal & Wright, *Numerical Optimization*, 2nd ed., Springer
2006, Algorithms 7.4 and 7.5 for the two-loop recursion, Algorithms 3.5 and 3.6 for the line search).

All parameters form one flat vector x (complex ones as their real and imaginary parts), g = ∇f(x) from the
closure. One ``step(closure)`` runs up to ``max_iter`` iterations k (counted across steps by ``n_iter``)::

    d   = −g                                              first iteration ever (k = 1)
    y   = g − g_prev,  s = t·d,  ys = yᵀs                 afterwards: the pair from the last move
    keep (y, s, 1/ys) and H₀ = ys/(yᵀy)                   if ys > 10⁻¹⁰ (curvature condition),
                                                          dropping the oldest pair beyond m pairs
    q   = −g;  for i = newest … oldest:  aᵢ = ρᵢ·sᵢᵀq,  q ← q − aᵢ·yᵢ
    d   = H₀·q;  for i = oldest … newest:  bᵢ = ρᵢ·yᵢᵀd,  d ← d + (aᵢ − bᵢ)·sᵢ      (d ≈ −H⁻¹g)
    t   = min(1, 1/‖g‖₁)·γ on the first iteration ever, γ afterwards
    stop if gᵀd > −τ_change                               not a descent direction
    x   ← x + t·d                                         without a line search; the closure then runs
                                                          again (but not after the last iteration)
    t   = a step satisfying the strong Wolfe conditions   with ``line_search_fn="strong_wolfe"``:
          f(x + t·d) ≤ f(x) + c₁·t·gᵀd  and  |∇f(x + t·d)ᵀd| ≤ −c₂·gᵀd   (c₁ = 10⁻⁴, c₂ = 0.9),
          bracketed then zoomed with safeguarded cubic interpolation, at most ``max_eval`` − (evaluations
          so far) closure calls; then x ← x + t·d with the gradient and loss found there
    stop if k = max_iter, closure calls ≥ max_eval, ‖g‖∞ ≤ τ_grad, ‖t·d‖∞ ≤ τ_change or
            |f − f_prev| < τ_change

A step returns the loss of the closure's first call, at x before the step; it returns at once when that
gradient already satisfies ‖g‖∞ ≤ τ_grad.

=========  ================================  ==========================================================
symbol     argument                          state key (all on the first parameter, as in torch)
=========  ================================  ==========================================================
x          params (one group only)
f, g       ``closure()``, ``param.grad``     ``prev_loss`` (a float), ``prev_flat_grad``
γ          ``lr``
—          ``max_iter``, ``max_eval``        ``n_iter``, ``func_evals`` (ints, across steps)
τ_grad     ``tolerance_grad``
τ_change   ``tolerance_change``
m          ``history_size``                  ``old_dirs`` (the yᵢ), ``old_stps`` (the sᵢ), ``ro`` (the ρᵢ)
H₀         —                                 ``H_diag`` (the int 1 until a pair is kept, then a tensor)
aᵢ         —                                 ``al`` (a list of m entries, created at the second iteration)
d, t       —                                 ``d``, ``t`` (a float or a 0-d tensor)
=========  ================================  ==========================================================

Every arithmetic expression is torch's, in torch's order and with the same mix of Python floats and 0-d
tensors (a 0-d tensor keeps the arithmetic in the parameters' dtype; a Python float does it in float64),
so that iterates, state and the number of closure calls are bit-for-bit torch's.

Execution: the step is global (one flat vector, one line search), so it runs as one loop over the
parameters for x ← x + t·d (``update``); ``impl`` accepts only ``"loop"`` (or None).

Deliberate differences from the textbook, all torch's: the first step is scaled by 1/‖g‖₁; the initial
inverse Hessian H₀ is the scalar ys/(yᵀy) of the newest kept pair; the iteration stops on the tolerances
above rather than on ‖g‖ alone; without a line search the step is fixed at t = γ. One difference from
torch: a non-contiguous gradient is flattened with ``reshape`` (torch's ``view`` raises on it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from scratchopt.checks import check_lr
from scratchopt.optimizer import ClosureOptimizer, squeeze_scalar

CURVATURE_THRESHOLD = 1e-10  # ys must exceed this for a pair (y, s) to be kept


def update(param: Tensor, direction: Tensor, *, step_size: Any) -> None:
    """x ← x + t·d on one parameter, ``direction`` being its slice of the flat d."""
    if param.is_complex():
        param = torch.view_as_real(param)
    param.add_(direction.view_as(param), alpha=step_size)


# ------------------------------------------------------------------------------------------------------
# the line search
# ------------------------------------------------------------------------------------------------------


def cubic_minimizer(t1: Any, f1: Any, g1: Any, t2: Any, f2: Any, g2: Any, bounds: tuple[Any, Any] | None = None) -> Any:
    """The minimiser of the cubic through (t1, f1) and (t2, f2) with slopes g1, g2, kept within ``bounds``
    (by default the interval between t1 and t2); the middle of the bounds when the cubic has no minimum."""
    low, high = bounds if bounds is not None else ((t1, t2) if t1 <= t2 else (t2, t1))
    d1 = g1 + g2 - 3 * (f1 - f2) / (t1 - t2)
    d2_square = d1**2 - g1 * g2
    if d2_square >= 0:  # (a NaN falls through to the middle, as in torch)
        d2 = d2_square.sqrt()
        if t1 <= t2:
            minimum = t2 - (t2 - t1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            minimum = t1 - (t1 - t2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(minimum, low), high)
    return (low + high) / 2.0


class Trial(NamedTuple):
    """One point of the line search: step t, loss, flat gradient and slope gᵀd there."""

    t: Any
    loss: Any
    grad: Tensor
    slope: Any


def strong_wolfe(
    evaluate: Callable[[Any], tuple[float, Tensor]],
    t: Any,
    d: Tensor,
    start: Trial,
    *,
    c1: float = 1e-4,
    c2: float = 0.9,
    tolerance_change: float = 1e-9,
    max_evaluations: int = 25,
) -> tuple[Trial, int]:
    """A step t along d that satisfies the strong Wolfe conditions, from ``start`` (t = 0).

    ``evaluate(t)`` returns the loss and flat gradient at x + t·d and leaves x as it was. Returns the
    point chosen and the number of evaluations made. Each evaluation returns a fresh gradient vector and
    none is modified in place, so points share them without copies.
    """
    d_norm = d.abs().max()
    curvature = -c2 * start.slope  # the curvature condition: |slope(t)| ≤ −c2·slope(0)

    def trial(step: Any) -> Trial:
        loss, grad = evaluate(step)
        return Trial(step, loss, grad, grad.dot(d))

    def armijo_fails(point: Trial) -> Any:
        """Not a sufficient decrease: f(t) > f(0) + c1·t·slope(0)."""
        return point.loss > (start.loss + c1 * point.t * start.slope)

    new = trial(t)
    evaluations = 1
    previous = Trial(0, start.loss, start.grad, start.slope)
    bracket: list[Trial] | None = None
    found = False
    # Phase 1: grow t until [previous, new] brackets an acceptable step, or new is one.
    iterations = 0
    while iterations < max_evaluations:
        if armijo_fails(new) or (iterations > 1 and new.loss >= previous.loss):
            bracket = [previous, new]
            break
        if abs(new.slope) <= curvature:
            bracket, found = [new], True
            break
        if new.slope >= 0:
            bracket = [previous, new]
            break
        extrapolated = cubic_minimizer(
            previous.t,
            previous.loss,
            previous.slope,
            new.t,
            new.loss,
            new.slope,
            bounds=(new.t + 0.01 * (new.t - previous.t), new.t * 10),
        )
        previous, new = new, trial(extrapolated)
        evaluations += 1
        iterations += 1
    if iterations == max_evaluations:
        bracket = [Trial(0, start.loss, start.grad, start.slope), new]
    # Set unless max_evaluations < 0 (max_eval < 1), where torch's line search fails too.
    assert bracket is not None

    # Phase 2: shrink the bracket (low: the lower loss) until its low end is acceptable.
    low, high = (0, 1) if bracket[0].loss <= bracket[-1].loss else (1, 0)
    stalled = False
    while not found and iterations < max_evaluations:
        ends = [bracket[0].t, bracket[1].t]
        if abs(ends[1] - ends[0]) * d_norm < tolerance_change:
            break
        t = cubic_minimizer(
            bracket[0].t, bracket[0].loss, bracket[0].slope, bracket[1].t, bracket[1].loss, bracket[1].slope
        )
        # Safeguard: a t within 10% of the bracket's length from an end counts as no progress; twice in a
        # row, or outside the bracket, it moves to 10% inside from the nearer end.
        margin = 0.1 * (max(ends) - min(ends))
        if min(max(ends) - t, t - min(ends)) < margin:
            if stalled or t >= max(ends) or t <= min(ends):
                t = max(ends) - margin if abs(t - max(ends)) < abs(t - min(ends)) else min(ends) + margin
                stalled = False
            else:
                stalled = True
        else:
            stalled = False
        new = trial(t)
        evaluations += 1
        iterations += 1
        if armijo_fails(new) or new.loss >= bracket[low].loss:
            bracket[high] = new  # too high: the new point closes the bracket
            low, high = (0, 1) if bracket[0].loss <= bracket[1].loss else (1, 0)
            continue
        if abs(new.slope) <= curvature:
            found = True
        elif new.slope * (bracket[high].t - bracket[low].t) >= 0:
            bracket[high] = bracket[low]  # the minimum lies on the other side of new
        bracket[low] = new
    return bracket[low], evaluations


# ------------------------------------------------------------------------------------------------------
# the direction
# ------------------------------------------------------------------------------------------------------


def two_loop_direction(
    flat_grad: Tensor, old_dirs: list[Tensor], old_stps: list[Tensor], ro: list[Any], h_diag: Any, al: list[Any]
) -> Tensor:
    """d = −H·g by the two-loop recursion over the kept pairs; ``al`` receives the aᵢ (torch keeps them)."""
    q = flat_grad.neg()
    for i in range(len(old_dirs) - 1, -1, -1):
        al[i] = old_stps[i].dot(q) * ro[i]  # aᵢ = ρᵢ·sᵢᵀq
        q.add_(old_dirs[i], alpha=-al[i])  # q ← q − aᵢyᵢ
    direction = torch.mul(q, h_diag)  # d = H₀q
    for i in range(len(old_dirs)):
        be_i = old_dirs[i].dot(direction) * ro[i]  # bᵢ = ρᵢ·yᵢᵀd
        direction.add_(old_stps[i], alpha=al[i] - be_i)  # d ← d + (aᵢ − bᵢ)sᵢ
    return direction


# ------------------------------------------------------------------------------------------------------
# the optimizer
# ------------------------------------------------------------------------------------------------------


def flat_gradient(params: list[Tensor]) -> Tensor:
    """The gradients as one real vector: zeros for a missing one, densified sparse, complex as real pairs."""
    pieces = []
    for param in params:
        if param.grad is None:
            piece = param.new_zeros(param.numel())
        elif param.grad.is_sparse:
            piece = param.grad.to_dense().reshape(-1)
        else:
            piece = param.grad.reshape(-1)
        if piece.is_complex():
            piece = torch.view_as_real(piece).reshape(-1)
        pieces.append(piece)
    return torch.cat(pieces, 0)


def move(params: list[Tensor], t: Any, d: Tensor) -> None:
    """x ← x + t·d, one ``update`` per parameter on its slice of d."""
    offset = 0
    for param in params:
        size = param.numel() * (2 if param.is_complex() else 1)
        update(param, d[offset : offset + size], step_size=t)
        offset += size


class LBFGS(ClosureOptimizer):
    __doc__ = __doc__
    torch_twin = "LBFGS"
    #: A line search and a few iterations per step: lr = 1 without a line search diverges on mini-batches.
    example_kwargs = {"line_search_fn": "strong_wolfe", "max_iter": 5}

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = None,
        *,
        impl: str | None = None,
    ) -> None:
        check_lr(lr)
        defaults = {
            "lr": lr,
            "max_iter": max_iter,
            "max_eval": max_iter * 5 // 4 if max_eval is None else max_eval,
            "tolerance_grad": tolerance_grad,
            "tolerance_change": tolerance_change,
            "history_size": history_size,
            "line_search_fn": line_search_fn,
        }
        super().__init__(params, defaults, impl)
        if len(self.param_groups) != 1:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups): pass one group")

    def step(self, closure: Callable[[], Any]) -> Any:  # type: ignore[override]
        """Run up to ``max_iter`` L-BFGS iterations; return the closure's first loss (before the step).

        The closure must zero the gradients, compute the loss, call ``backward()`` and return the loss;
        it is called under ``torch.enable_grad()``.
        """
        self.require_closure(closure)
        if len(self.param_groups) != 1:
            # torch's type: a second group can only come from add_param_group after construction.
            raise AssertionError(f"Expected exactly one param_group, but got {len(self.param_groups)}")
        with torch.no_grad():
            return self._iterate(closure, self.param_groups[0])

    def _iterate(self, closure: Callable[[], Any], group: dict[str, Any]) -> Any:
        params = group["params"]
        lr = squeeze_scalar(group["lr"])
        max_iter, max_eval = group["max_iter"], group["max_eval"]
        tolerance_grad, tolerance_change = group["tolerance_grad"], group["tolerance_change"]
        line_search_fn, history_size = group["line_search_fn"], group["history_size"]
        state = self.state[params[0]]  # global state, kept on the first parameter as torch keeps it
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)

        def evaluate() -> tuple[Any, float, Tensor]:
            with torch.enable_grad():
                loss = closure()
            return loss, float(loss), flat_gradient(params)

        def evaluate_along(x: list[Tensor], d: Tensor) -> Callable[[Any], tuple[float, Tensor]]:
            def at(t: Any) -> tuple[float, Tensor]:
                move(params, t, d)
                _, loss, grad = evaluate()
                for param, saved in zip(params, x):
                    param.copy_(saved)
                return loss, grad

            return at

        first_loss, loss, flat_grad = evaluate()
        evaluations = 1
        state["func_evals"] += 1
        if flat_grad.abs().max() <= tolerance_grad:
            return first_loss

        d, t = state.get("d"), state.get("t")
        old_dirs, old_stps, ro = state.get("old_dirs"), state.get("old_stps"), state.get("ro")
        h_diag = state.get("H_diag")
        prev_flat_grad, prev_loss = state.get("prev_flat_grad"), state.get("prev_loss")
        iteration = 0
        converged = False
        while iteration < max_iter:
            iteration += 1
            state["n_iter"] += 1
            first_ever = state["n_iter"] == 1
            if first_ever:
                d, old_dirs, old_stps, ro, h_diag = flat_grad.neg(), [], [], [], 1
            else:
                y = flat_grad.sub(prev_flat_grad)
                s = d.mul(t)
                ys = y.dot(s)
                if ys > CURVATURE_THRESHOLD:
                    if len(old_dirs) == history_size:
                        del old_dirs[0], old_stps[0], ro[0]
                    old_dirs.append(y)
                    old_stps.append(s)
                    ro.append(1.0 / ys)
                    h_diag = ys / y.dot(y)  # H₀ = ys/(yᵀy)
                al = state.setdefault("al", [None] * history_size)
                d = two_loop_direction(flat_grad, old_dirs, old_stps, ro, h_diag, al)
            if prev_flat_grad is None:
                prev_flat_grad = flat_grad.clone(memory_format=torch.contiguous_format)
            else:
                prev_flat_grad.copy_(flat_grad)
            prev_loss = loss

            t = min(1.0, 1.0 / flat_grad.abs().sum()) * lr if first_ever else lr
            gtd = flat_grad.dot(d)  # slope along d
            if gtd > -tolerance_change:
                break

            used = 0
            if line_search_fn is not None:
                if line_search_fn != "strong_wolfe":
                    raise RuntimeError("only 'strong_wolfe' is supported")
                x = [param.clone(memory_format=torch.contiguous_format) for param in params]
                chosen, used = strong_wolfe(
                    evaluate_along(x, d),
                    t,
                    d,
                    Trial(0, loss, flat_grad, gtd),
                    max_evaluations=max_eval - evaluations,
                )
                t, loss, flat_grad = chosen.t, chosen.loss, chosen.grad
                move(params, t, d)
                converged = flat_grad.abs().max() <= tolerance_grad
            else:
                move(params, t, d)
                if iteration != max_iter:  # the last move is not evaluated: the next step starts with it
                    _, loss, flat_grad = evaluate()
                    converged = flat_grad.abs().max() <= tolerance_grad
                    used = 1
            evaluations += used
            state["func_evals"] += used

            if iteration == max_iter or evaluations >= max_eval or converged:
                break
            if d.mul(t).abs().max() <= tolerance_change or abs(loss - prev_loss) < tolerance_change:
                break

        state.update(
            d=d,
            t=t,
            old_dirs=old_dirs,
            old_stps=old_stps,
            ro=ro,
            H_diag=h_diag,
            prev_flat_grad=prev_flat_grad,
            prev_loss=prev_loss,
        )
        return first_loss
