"""The closure-based optimizers: NesterovLookahead and Newton, against closed forms and independent references.

The figures on f(x) = sin(x) + x²/10 (Newton's iterates from x = −5; Nesterov's 34 and 27 steps from −8
and +8 with lr = 1, μ = 0.9 in float32) are those the report reproduces beside its source article's printed figures (``scratchopt report``, section 1).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import scratchopt
from scratchopt import NesterovLookahead, Newton


def sin_quadratic(x: torch.Tensor) -> torch.Tensor:
    return (torch.sin(x) + x**2 / 10).sum()


def spd_problem(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = m @ m.T + n * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    return a, b


def quadratic(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x @ a @ x - b @ x


# ----------------------------------------------------------------------------------------------- Newton


def test_newton_solves_a_quadratic_in_one_step():
    a, b = spd_problem(6)
    x = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    optimizer = Newton([x])
    loss = optimizer.step(lambda: quadratic(a, b, x))
    expected = torch.linalg.solve(a, b)
    torch.testing.assert_close(x.detach(), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(torch.zeros(6, dtype=torch.float64), expected)
    assert loss.item() != quadratic(a, b, x.detach()).item()  # the returned loss is the one before the step
    optimizer.step(lambda: quadratic(a, b, x))  # at the minimum the step is zero
    torch.testing.assert_close(x.detach(), expected, rtol=1e-12, atol=1e-12)


def test_newton_flattens_several_params_of_several_shapes():
    a, b = spd_problem(8, seed=2)
    w = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    v = torch.ones(3, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    frozen = torch.ones(2, dtype=torch.float64)  # requires_grad=False: takes no part

    def closure():
        return quadratic(a, b, torch.cat([w.reshape(-1), v, s.reshape(1)])) + frozen.sum()

    Newton([w, v, s, frozen]).step(closure)
    expected = torch.linalg.solve(a, b)
    torch.testing.assert_close(torch.cat([w.detach().reshape(-1), v.detach(), s.detach().reshape(1)]), expected)
    assert torch.equal(frozen, torch.ones(2, dtype=torch.float64))


def test_newton_damped_step_is_the_closed_form():
    a, b = spd_problem(5, seed=3)
    x0 = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x = x0.clone().requires_grad_()
    damping, lr = 0.7, 0.5
    Newton([x], lr=lr, damping=damping).step(lambda: quadratic(a, b, x))
    g = a @ x0 - b
    expected = x0 - lr * torch.linalg.solve(a + damping * torch.eye(5, dtype=torch.float64), g)
    torch.testing.assert_close(x.detach(), expected, rtol=1e-12, atol=1e-12)
    # and differs from the undamped step, so the damping did something
    assert not torch.allclose(x.detach(), x0 - lr * torch.linalg.solve(a, g))


def test_newton_param_groups_have_their_own_lr_and_damping():
    a, b = spd_problem(5, seed=5)
    x0 = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    p = x0[:2].clone().requires_grad_()
    q = x0[2:].clone().requires_grad_()
    optimizer = Newton([{"params": [p], "lr": 0.3, "damping": 2.0}, {"params": [q]}], lr=0.9, damping=0.1)
    optimizer.step(lambda: quadratic(a, b, torch.cat([p, q])))
    damping = torch.tensor([2.0, 2.0, 0.1, 0.1, 0.1], dtype=torch.float64)
    lr = torch.tensor([0.3, 0.3, 0.9, 0.9, 0.9], dtype=torch.float64)
    expected = x0 - lr * torch.linalg.solve(a + torch.diag(damping), a @ x0 - b)
    torch.testing.assert_close(torch.cat([p.detach(), q.detach()]), expected, rtol=1e-12, atol=1e-12)


# x after each of 12 Newton iterations from x = -5 on f(x) = sin(x) + x²/10, as the report's source article prints it.
PUBLISHED_NEWTON_ITERATES = [
    -5.94388576,
    -7.79433605,
    -6.54310103,
    -5.79428433,
    -6.81783809,
    -6.10875844,
    2.84660556,
    -1.42425821,
    -1.30751773,
    -1.30644014,
    -1.30644001,
    -1.30644001,
]


@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-d", "1-element"])
def test_newton_reproduces_the_published_iterates_on_sin_plus_quadratic(shape):
    x = torch.full(shape, -5.0, dtype=torch.float64, requires_grad=True)
    optimizer = Newton([x], allow_indefinite=True)
    reference = -5.0
    for printed in PUBLISHED_NEWTON_ITERATES:
        optimizer.step(lambda: sin_quadratic(x))
        # the closed form x − f'(x)/f''(x), computed independently in float64
        reference = reference - (math.cos(reference) + reference / 5) / (-math.sin(reference) + 0.2)
        assert x.item() == pytest.approx(reference, abs=1e-10)
        assert x.item() == pytest.approx(printed, abs=1e-8)  # printed to 8 decimals
    assert x.shape == shape


def test_newton_refuses_the_indefinite_hessian_by_default():
    x = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)  # f''(-5) = sin(5) + 0.2 ≈ -0.7589
    with pytest.raises(ValueError, match=r"indefinite.*-0\.758924.*allow_indefinite=True"):
        Newton([x]).step(lambda: sin_quadratic(x))
    assert x.item() == -5.0
    # enough damping makes H + damping·I positive definite, and the step is the closed form
    Newton([x], damping=1.0).step(lambda: sin_quadratic(x))
    expected = -5.0 - (math.cos(-5.0) - 1.0) / (-math.sin(-5.0) + 0.2 + 1.0)
    assert x.item() == pytest.approx(expected, abs=1e-12)


def test_newton_multivariate_indefinite_finds_the_saddle_only_when_allowed():
    a = torch.tensor([[2.0, 0.5], [0.5, -1.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -2.0], dtype=torch.float64)
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="indefinite"):
        Newton([x]).step(lambda: quadratic(a, b, x))
    Newton([x], allow_indefinite=True).step(lambda: quadratic(a, b, x))
    torch.testing.assert_close(x.detach(), torch.linalg.solve(a, b))


@pytest.mark.parametrize(
    "loss",
    [lambda x: x.sum() ** 2, lambda x: (0.1 * x[0] + 0.3 * x[1]) ** 2, lambda x: 3 * x.sum(), lambda x: x[0] ** 2],
    # the second's smallest eigenvalue comes out as 6.9e-18, not 0: only the tolerance catches it
    ids=["rank-one", "rank-one, rounded", "linear (H = 0)", "one entry unused"],
)
def test_newton_singular_hessian_raises_and_names_damping(loss):
    x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    for allow_indefinite in (False, True):
        with pytest.raises(torch.linalg.LinAlgError, match=r"singular.*damping"):
            Newton([x], allow_indefinite=allow_indefinite).step(lambda: loss(x))
    assert torch.equal(x.detach(), torch.ones(2, dtype=torch.float64))


def test_newton_singular_hessian_with_damping_takes_the_closed_form_step():
    x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    Newton([x], damping=0.5).step(lambda: x.sum() ** 2)  # H = [[2, 2], [2, 2]], g = [4, 4]
    h = torch.full((2, 2), 2.0, dtype=torch.float64) + 0.5 * torch.eye(2, dtype=torch.float64)
    expected = torch.ones(2, dtype=torch.float64) - torch.linalg.solve(h, torch.full((2,), 4.0, dtype=torch.float64))
    torch.testing.assert_close(x.detach(), expected)


def test_newton_never_writes_a_nan():
    x = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    with pytest.raises(FloatingPointError, match="not finite"):
        Newton([x]).step(lambda: torch.sqrt(x).sum())  # NaN at x < 0
    assert torch.equal(x.detach(), torch.tensor([1.0, -1.0], dtype=torch.float64))


def test_newton_closure_must_not_call_backward():
    x = torch.ones(2, dtype=torch.float64, requires_grad=True)

    def closure():
        loss = (x**3).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="must not call backward"):
        Newton([x]).step(closure)


def test_newton_closure_must_return_a_differentiable_scalar():
    x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match="one-element tensor"):
        Newton([x]).step(lambda: x**2)
    with pytest.raises(RuntimeError, match="does not require grad"):
        Newton([x]).step(lambda: (x**2).sum().detach())


def test_newton_runs_the_closure_with_grad_enabled():
    a, b = spd_problem(3, seed=7)
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = Newton([x])
    with torch.no_grad():
        optimizer.step(lambda: quadratic(a, b, x))
    torch.testing.assert_close(x.detach(), torch.linalg.solve(a, b))


def test_newton_state_dict_round_trip():
    x = torch.tensor([-5.0], dtype=torch.float64, requires_grad=True)
    optimizer = Newton([x], lr=0.5, damping=0.25, allow_indefinite=True)
    state = copy.deepcopy(optimizer.state_dict())
    assert state["state"] == {}
    y = torch.tensor([-5.0], dtype=torch.float64, requires_grad=True)
    restored = Newton([y])  # defaults differ: everything must come from the state dict
    restored.load_state_dict(state)
    group = restored.param_groups[0]
    assert (group["lr"], group["damping"], group["allow_indefinite"]) == (0.5, 0.25, True)
    for _ in range(3):
        optimizer.step(lambda: sin_quadratic(x))
        restored.step(lambda: sin_quadratic(y))
    assert torch.equal(x, y)


# ------------------------------------------------------------------------------------ NesterovLookahead

ACTUAL_ANSWER = -1.30644  # the article's convergence target and tolerance
TOLERANCE = 1e-6


def reference_nesterov_steps(x0: float, lr: float = 1.0, momentum: float = 0.9, limit: int = 1000) -> int:
    """The lookahead recurrence in plain Python floats, with f'(x) = cos(x) + x/5, counted as the article counts.

    The article checks convergence right after evaluating the gradient at the lookahead point, i.e. on
    φ = θ + μ·v, and reports i + 1 for loop index i.
    """
    theta, velocity = x0, 0.0
    for i in range(limit):
        phi = theta + momentum * velocity
        if abs(phi - ACTUAL_ANSWER) <= TOLERANCE:
            return i + 1
        velocity = momentum * velocity - lr * (math.cos(phi) + phi / 5)
        theta = theta + velocity
    raise AssertionError("the reference did not converge")


def nesterov_steps(x0: float, limit: int = 1000) -> int:
    x = torch.tensor([x0], dtype=torch.float32, requires_grad=True)
    optimizer = NesterovLookahead([x], lr=1.0, momentum=0.9)
    target = torch.tensor([ACTUAL_ANSWER])
    converged = []

    def closure():
        optimizer.zero_grad()
        loss = sin_quadratic(x)
        loss.backward()
        converged.append(bool((x.detach() - target).abs() <= TOLERANCE))  # x is at the lookahead point here
        return loss

    for step in range(1, limit + 1):
        optimizer.step(closure)
        if converged[-1]:
            return step
    raise AssertionError("NesterovLookahead did not converge")


@pytest.mark.parametrize("x0,published_steps", [(-8.0, 34), (8.0, 27)])
def test_nesterov_step_count_on_sin_plus_quadratic_matches_the_published_count(x0, published_steps):
    ours = nesterov_steps(x0)
    reference = reference_nesterov_steps(x0)
    assert ours == reference
    assert ours == published_steps


def nesterov_reference(a, b, x0, lr, momentum, steps):
    """Closed-form recurrence on ½xᵀAx − bᵀx: (θ, v, f(φ)) after each step."""
    theta, velocity, out = x0.clone(), torch.zeros_like(x0), []
    for _ in range(steps):
        phi = theta + momentum * velocity
        loss = 0.5 * phi @ a @ phi - b @ phi
        velocity = momentum * velocity - lr * (a @ phi - b)
        theta = theta + velocity
        out.append((theta.clone(), velocity.clone(), loss))
    return out


def test_nesterov_follows_the_closed_form_recurrence_on_a_quadratic():
    a, b = spd_problem(4, seed=8)
    x0 = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    x = x0.clone().requires_grad_()
    optimizer = NesterovLookahead([x], lr=0.05, momentum=0.8)
    seen = []

    def closure():
        optimizer.zero_grad()
        seen.append(x.detach().clone())
        loss = quadratic(a, b, x)
        loss.backward()
        return loss

    for k, (theta, velocity, loss) in enumerate(nesterov_reference(a, b, x0, 0.05, 0.8, 8)):
        returned = optimizer.step(closure)
        torch.testing.assert_close(x.detach(), theta, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(optimizer.state[x]["momentum_buffer"], velocity, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(returned.detach(), loss)  # the loss at the lookahead point
        # and the closure saw φ = θ + μ·v of the previous step
        previous_theta, previous_velocity = (
            (x0, torch.zeros(4, dtype=torch.float64))
            if k == 0
            else (nesterov_reference(a, b, x0, 0.05, 0.8, k)[-1][:2])
        )
        torch.testing.assert_close(seen[-1], previous_theta + 0.8 * previous_velocity)
    assert not torch.allclose(x.detach(), x0)


def test_nesterov_param_groups_and_several_params():
    a, b = spd_problem(5, seed=10)
    x0 = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    w = x0[:2].clone().reshape(2, 1).requires_grad_()
    s = x0[2].clone().requires_grad_()  # 0-d
    u = x0[3:].clone().requires_grad_()
    unused = torch.ones(3, dtype=torch.float64, requires_grad=True)  # never gets a gradient
    optimizer = NesterovLookahead(
        [{"params": [w, s]}, {"params": [u, unused], "lr": 0.02, "momentum": 0.5}], lr=0.04, momentum=0.9
    )

    def closure():
        optimizer.zero_grad()
        loss = quadratic(a, b, torch.cat([w.reshape(-1), s.reshape(1), u]))
        loss.backward()
        return loss

    lr = torch.tensor([0.04, 0.04, 0.04, 0.02, 0.02], dtype=torch.float64)
    momentum = torch.tensor([0.9, 0.9, 0.9, 0.5, 0.5], dtype=torch.float64)
    theta, velocity = x0.clone(), torch.zeros(5, dtype=torch.float64)
    for _ in range(6):
        optimizer.step(closure)
        phi = theta + momentum * velocity
        velocity = momentum * velocity - lr * (a @ phi - b)
        theta = theta + velocity
        ours = torch.cat([w.detach().reshape(-1), s.detach().reshape(1), u.detach()])
        torch.testing.assert_close(ours, theta, rtol=1e-12, atol=1e-12)
    assert torch.equal(unused.detach(), torch.ones(3, dtype=torch.float64))
    assert unused not in optimizer.state
    assert s.shape == () and w.shape == (2, 1)


def test_nesterov_is_torch_sgd_nesterov_under_a_change_of_variables():
    """θ̃ = θ + μ·v and torch's buffer b = −v/γ (dampening = 0): the same points, the same losses."""
    a, b = spd_problem(6, seed=12)
    x0 = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    lr, momentum = 0.03, 0.9
    ours_x = x0.clone().requires_grad_()
    theirs_x = x0.clone().requires_grad_()
    ours = NesterovLookahead([ours_x], lr=lr, momentum=momentum)
    theirs = torch.optim.SGD([theirs_x], lr=lr, momentum=momentum, nesterov=True, dampening=0)

    def closure_for(x, optimizer):
        def closure():
            optimizer.zero_grad()
            loss = quadratic(a, b, x)
            loss.backward()
            return loss

        return closure

    for _ in range(25):
        our_loss = ours.step(closure_for(ours_x, ours))
        their_loss = theirs.step(closure_for(theirs_x, theirs))
        velocity = ours.state[ours_x]["momentum_buffer"]
        torch.testing.assert_close(theirs_x.detach(), ours_x.detach() + momentum * velocity, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(theirs.state[theirs_x]["momentum_buffer"], -velocity / lr, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(our_loss, their_loss, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ours_x.detach(), theirs_x.detach())  # the parameters themselves differ


def test_nesterov_restores_the_params_when_the_closure_raises():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    optimizer = NesterovLookahead([x], lr=0.1, momentum=0.9)

    def closure():
        optimizer.zero_grad()
        loss = (x**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    before = x.detach().clone()
    assert optimizer.state[x]["momentum_buffer"].abs().sum() > 0  # so the lookahead does move x

    def failing():
        raise KeyError("boom")

    with pytest.raises(KeyError):
        optimizer.step(failing)
    assert torch.equal(x.detach(), before)


def test_nesterov_state_dict_round_trip():
    a, b = spd_problem(3, seed=14)

    def make(x):
        optimizer = NesterovLookahead([x], lr=0.05, momentum=0.7)

        def closure():
            optimizer.zero_grad()
            loss = quadratic(a, b, x)
            loss.backward()
            return loss

        return optimizer, closure

    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer, closure = make(x)
    for _ in range(3):
        optimizer.step(closure)
    state = copy.deepcopy(optimizer.state_dict())
    assert set(state["state"][0]) == {"momentum_buffer"}

    y = x.detach().clone().requires_grad_()
    restored, restored_closure = make(y)
    restored.load_state_dict(state)
    for _ in range(4):
        optimizer.step(closure)
        restored.step(restored_closure)
    assert torch.equal(x, y)


def test_nesterov_refuses_sparse_gradients():
    embedding = torch.nn.Embedding(4, 2, sparse=True)
    optimizer = NesterovLookahead(embedding.parameters(), lr=0.1, momentum=0.5)

    def closure():
        optimizer.zero_grad()
        loss = embedding(torch.tensor([1, 2])).sum()
        loss.backward()
        return loss

    before = embedding.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step(closure)
    assert torch.equal(embedding.weight.detach(), before)


# ---------------------------------------------------------------------------------------------- shared


def _make(name, x):
    if name == "NesterovLookahead":
        optimizer = NesterovLookahead([x], lr=0.1, momentum=0.9)

        def closure():
            optimizer.zero_grad()
            loss = (x**2).sum() + x.sum()
            loss.backward()
            return loss

    else:
        optimizer = Newton([x])

        def closure():
            return (x**2).sum() + x.sum()

    return optimizer, closure


@pytest.mark.parametrize("name", ["NesterovLookahead", "Newton"])
def test_exported(name):
    assert name in scratchopt.__all__
    assert issubclass(getattr(scratchopt, name), torch.optim.Optimizer)


@pytest.mark.parametrize("name", ["NesterovLookahead", "Newton"])
def test_step_hooks_fire_once_per_step(name):
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer, closure = _make(name, x)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    closure_calls = []

    def counting_closure():
        closure_calls.append(1)
        return closure()

    optimizer.step(counting_closure)
    assert calls == ["pre", "post"]
    assert len(closure_calls) == 1
    optimizer.step(counting_closure)
    assert calls == ["pre", "post", "pre", "post"]
    assert not torch.equal(x.detach(), torch.zeros(3, dtype=torch.float64))


def test_lbfgs_raises_type_error_without_a_closure():
    """The behaviour copied: torch's LBFGS raises TypeError when the closure is missing or None."""
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError):
        torch.optim.LBFGS([x]).step()
    with pytest.raises(TypeError):
        torch.optim.LBFGS([x]).step(None)


@pytest.mark.parametrize("name", ["NesterovLookahead", "Newton"])
def test_step_without_a_closure_raises(name):
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer, _ = _make(name, x)
    x.grad = torch.ones(3, dtype=torch.float64)  # a gradient is no substitute for the closure
    with pytest.raises(TypeError, match=rf"{name}\.step\(\) requires a closure"):
        optimizer.step()
    with pytest.raises(TypeError, match="requires a closure"):
        optimizer.step(None)
    assert torch.equal(x.detach(), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize(
    "cls,kwargs,match",
    [
        (NesterovLookahead, {"lr": -0.1, "momentum": 0.9}, r"Invalid learning rate: -0\.1 \(allowed: lr >= 0\)"),
        (NesterovLookahead, {"lr": 0.1, "momentum": 1.0}, r"Invalid momentum value: 1\.0 \(allowed: 0 <= momentum < 1"),
        (NesterovLookahead, {"lr": 0.1, "momentum": -0.5}, r"Invalid momentum value: -0\.5 \(allowed: 0 <= mom"),
        (Newton, {"lr": -1.0}, r"Invalid learning rate: -1\.0 \(allowed: 0 <= lr < inf\)"),
        (Newton, {"lr": math.inf}, r"Invalid learning rate: inf"),
        (Newton, {"damping": -1e-3}, r"Invalid damping value: -0\.001 \(allowed: 0 <= damping < inf\)"),
        (Newton, {"damping": math.nan}, r"Invalid damping value: nan"),
    ],
)
def test_bad_hyperparameters_raise_value_error(cls, kwargs, match):
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=match):
        cls([x], **kwargs)


def test_valid_edge_hyperparameters_are_accepted():
    x = torch.zeros(2, requires_grad=True)
    NesterovLookahead([x], lr=0.0, momentum=0.0)
    Newton([x], lr=0.0, damping=0.0)


@pytest.mark.parametrize("rows_per_batch", [1, 3, 128], ids=["row by row", "batches of 3", "one batch"])
def test_newton_hessian_matches_torch_autograd_functional(rows_per_batch):
    from scratchopt.algorithms.newton import gradient_and_hessian

    gen = torch.Generator().manual_seed(15)
    m = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    w0 = torch.randn(4, generator=gen, dtype=torch.float64)
    s0 = torch.randn((), generator=gen, dtype=torch.float64)

    def f(w, s):
        return torch.tanh(m.T @ w * s).pow(2).sum() + torch.exp(s) * w.prod()

    w, s = w0.clone().requires_grad_(), s0.clone().requires_grad_()
    gradient, hessian = gradient_and_hessian(f(w, s), [w, s], rows_per_batch=rows_per_batch)
    (hww, hws), (hsw, hss) = torch.autograd.functional.hessian(f, (w0, s0))
    expected = torch.cat([torch.cat([hww, hws.reshape(4, 1)], 1), torch.cat([hsw.reshape(1, 4), hss.reshape(1, 1)], 1)])
    gw, gs = torch.autograd.functional.jacobian(f, (w0, s0))
    torch.testing.assert_close(gradient, torch.cat([gw, gs.reshape(1)]))
    torch.testing.assert_close(hessian, expected)
    assert not torch.allclose(hessian, hessian.diag().diag())  # cross terms present


class _Deriv(torch.autograd.Function):
    """3x², with a backward that vmap cannot batch (it calls .item())."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 3 * x**2

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        assert grad.abs().sum().item() >= 0
        return grad * 6 * x


class _Cube(torch.autograd.Function):
    """x³, whose derivative is _Deriv: the Hessian's backward goes through .item()."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * _Deriv.apply(x)


def test_newton_falls_back_to_row_by_row_where_vmap_fails():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(_Cube.apply(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):  # the batched path really is unavailable here
        torch.autograd.grad(gradient, x, grad_outputs=torch.eye(2, dtype=torch.float64), is_grads_batched=True)
    # f = Σ x³ + Σ x²: g = 3x² + 2x, H = diag(6x + 2) = diag(8, 14); Newton step x − g/H
    Newton([x]).step(lambda: _Cube.apply(x).sum() + (x**2).sum())
    expected = torch.tensor([1.0 - 5.0 / 8.0, 2.0 - 16.0 / 14.0], dtype=torch.float64)
    torch.testing.assert_close(x.detach(), expected, rtol=1e-14, atol=1e-14)
