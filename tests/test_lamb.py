"""LAMB against ``pytorch-optimizer``'s Lamb (its per-parameter path), bit for bit at every step on the hard
parameter set with a scheduler; against the paper's Algorithm 2 and hand-worked steps; state_dicts
exchanged with the reference both ways; and each difference the module's docstring lists."""

from __future__ import annotations

import copy
import math
import pickle
from typing import Any

import parity
import pytest
import pytorch_optimizer
import torch
from torch import Tensor

import scratchopt
from scratchopt.testing import check_optimizer, copy_params, gradients, hard_groups, hard_params, set_gradients

#: The reference's diagnostics, which ours does not keep (the docstring says why).
DIAGNOSTICS = ("weight_norm", "adam_norm", "trust_ratio")


class Reference(pytorch_optimizer.Lamb):
    """The reference with its diagnostics moved out of the state after each step, so that the rest of
    the state (``exp_avg``, ``exp_avg_sq``) is compared key for key."""

    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        for state in self.state.values():
            for key in DIAGNOSTICS:
                state.pop(key, None)
        return loss


def reference(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    return Reference(params, **kwargs, foreach=False)


CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "coupled decay": {"weight_decay": 0.05, "weight_decouple": False},
    "fixed decay": {"weight_decay": 0.01, "fixed_decay": True},
    # ρₜ crosses N = 5 at t = 6: steps without an update, then rectified ones
    "rectify": {"rectify": True},
    "rectify, degenerated to SGD": {"rectify": True, "degenerated_to_sgd": True, "betas": (0.8, 0.99)},
    "rectify, coupled decay": {"rectify": True, "weight_decouple": False, "weight_decay": 0.05},
    "rectify, adam, threshold 4": {"rectify": True, "adam": True, "n_sma_threshold": 4},
    "no grad averaging": {"grad_averaging": False},
    "adam": {"adam": True},
    "pre_norm": {"pre_norm": True},
    "pre_norm, no clipping": {"pre_norm": True, "max_grad_norm": 0.0},
    "pre_norm, maximize, small max_grad_norm": {"pre_norm": True, "max_grad_norm": 0.5, "maximize": True},
    "adam_debias, eps, tensor lr": {"adam_debias": True, "eps": 1e-12, "lr": torch.tensor(0.02)},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_the_loop_is_pytorch_optimizers_per_parameter_path(config, dtype):
    """Param 3 misses gradients on some steps: both count t per group, so no gradients_every_step."""
    ours, theirs, _, _ = parity.run_side_by_side(
        "Lamb", CONFIGS[config], dtype, steps=10, reference=reference, schedule=True
    )
    assert [group["step"] for group in ours.param_groups] == [group["step"] for group in theirs.param_groups]


@pytest.mark.parametrize("config", ["default", "pre_norm, maximize, small max_grad_norm"])
def test_the_loop_is_pytorch_optimizers_per_parameter_path_in_bfloat16(config):
    parity.run_side_by_side("Lamb", CONFIGS[config], torch.bfloat16, steps=6, reference=reference, schedule=True)


def test_the_batched_reference_path_differs_only_by_rounding():
    params = hard_params(torch.float64)
    theirs_params = copy_params(params)
    ours = scratchopt.Lamb(hard_groups(params), weight_decay=0.01, pre_norm=True)
    theirs = pytorch_optimizer.Lamb(hard_groups(theirs_params), weight_decay=0.01, pre_norm=True, foreach=True)
    for step in range(8):
        grads = gradients(params, step)
        set_gradients(params, grads)
        set_gradients(theirs_params, grads)
        ours.step()
        theirs.step()
    for a, b in zip(params, theirs_params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-13, atol=1e-13)


def paper_direction(grad: Tensor, state: dict[str, Any], beta1: float, beta2: float) -> Tensor:
    """r̂ of Algorithm 2 (You et al.), ε = 0: m̂ / √v̂ from bias-corrected moments, its own t."""
    t = state["t"] = state.get("t", 0) + 1
    state["m"] = beta1 * state.get("m", torch.zeros_like(grad)) + (1 - beta1) * grad
    state["v"] = beta2 * state.get("v", torch.zeros_like(grad)) + (1 - beta2) * grad * grad
    return (state["m"] / (1 - beta1**t)) / (state["v"] / (1 - beta2**t)).sqrt()


def test_the_step_is_the_papers_divided_by_the_first_moment_correction():
    """With ε = 0 and λ = 0, Algorithm 2's step from θ is x − η·φ(‖θ‖)/‖r̂‖·r̂, φ(z) = min(z, 10); the
    reference's (and ours) is that step divided by 1 − β₁ᵗ: the corrections cancel inside the ratio, not
    outside it."""
    gen = torch.Generator().manual_seed(7)
    params = [(torch.randn(5, 4, generator=gen, dtype=torch.float64) * scale).requires_grad_() for scale in (0.3, 8.0)]
    beta1, beta2, lr = 0.8, 0.95, 0.05
    optimizer = scratchopt.Lamb(params, lr=lr, betas=(beta1, beta2), eps=0.0)
    states: list[dict[str, Any]] = [{} for _ in params]
    for t in range(1, 7):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        before = [p.detach().clone() for p in params]
        set_gradients(params, grads)
        optimizer.step()
        for p, theta, grad, state in zip(params, before, grads, states):
            r = paper_direction(grad, state, beta1, beta2)
            paper_step = -lr * min(theta.norm().item(), 10.0) / r.norm() * r
            torch.testing.assert_close(p.detach() - theta, paper_step / (1 - beta1**t), rtol=1e-10, atol=1e-12)


THETA = [3.0, 4.0]  # ‖θ‖ = 5
GRAD = [1.0, -2.0]
GRAD_T = torch.tensor(GRAD, dtype=torch.float64)


def one_step(theta: list[float] = THETA, grad: list[float] = GRAD, **kwargs: Any) -> tuple[Tensor, Any]:
    x = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    optimizer = scratchopt.Lamb([x], lr=0.1, eps=0.0, **kwargs)
    x.grad = torch.tensor(grad, dtype=torch.float64)
    optimizer.step()
    return x.detach(), optimizer


def test_a_hand_worked_step_of_the_trust_ratio():
    """At t = 1, m = (1 − β₁)g and √v = √(1 − β₂)|g|, so u = m/√v = √10·sign(g) (‖u‖ = √20), η =
    γ/(1 − β₁) = 1, τ = φ/‖u‖, and θ moves by η·τ·u = φ/√2·sign(g)."""
    sign = torch.tensor([1.0, -1.0], dtype=torch.float64)
    theta = torch.tensor(THETA, dtype=torch.float64)
    x, optimizer = one_step()
    torch.testing.assert_close(x, theta - 5 / math.sqrt(2) * sign)
    assert optimizer.param_groups[0]["step"] == 1
    torch.testing.assert_close(optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg"], 0.1 * GRAD_T)
    # φ = min(‖θ‖, 10): a weight norm of 50 counts as 10
    x, _ = one_step([30.0, 40.0])
    torch.testing.assert_close(x, 10 * theta - 10 / math.sqrt(2) * sign)
    # θ = 0: τ = 1, a plain (uncorrected-v) Adam step; so is adam=True at any θ
    x, _ = one_step([0.0, 0.0])
    torch.testing.assert_close(x, -math.sqrt(10) * sign)
    x, _ = one_step(adam=True)
    torch.testing.assert_close(x, theta - math.sqrt(10) * sign)


def test_coupled_decay_is_added_to_the_uncorrected_direction():
    """weight_decouple=False puts the paper's λθ in u, beside r = m/√v (the paper's r̂ would be sign(g))."""
    lam = 0.5
    theta = torch.tensor(THETA, dtype=torch.float64)
    u = math.sqrt(10) * torch.sign(GRAD_T) + lam * theta
    x, _ = one_step(weight_decay=lam, weight_decouple=False)
    torch.testing.assert_close(x, theta - 1.0 * 5 / u.norm() * u)
    # decoupled (the default): θ(1 − γλ) first, then the trust ratio of the decayed θ
    decayed = theta * (1 - 0.1 * lam)
    x, _ = one_step(weight_decay=lam)
    torch.testing.assert_close(x, decayed - decayed.norm() / math.sqrt(20) * math.sqrt(10) * torch.sign(GRAD_T))
    # fixed_decay: θ(1 − λ)
    decayed = theta * (1 - lam)
    x, _ = one_step(weight_decay=lam, fixed_decay=True)
    torch.testing.assert_close(x, decayed - decayed.norm() / math.sqrt(20) * math.sqrt(10) * torch.sign(GRAD_T))


def test_rectify_divides_by_the_norm_of_the_updated_parameter_and_drops_coupled_decay():
    """At t = 1, ρ₁ = 1 < N: with degenerated_to_sgd, η = γ/(1 − β₁) and u = m = (1 − β₁)g, so ηu = γg,
    and τ = ‖θ‖/‖θ − γg‖ (the reference's, not ‖θ‖/‖u‖); a coupled λ changes nothing."""
    theta = torch.tensor(THETA, dtype=torch.float64)
    tau = 5 / (theta - 0.1 * GRAD_T).norm()
    expected = theta - 0.1 * tau * GRAD_T
    x, _ = one_step(rectify=True, degenerated_to_sgd=True)
    torch.testing.assert_close(x, expected)
    x, _ = one_step(rectify=True, degenerated_to_sgd=True, weight_decay=0.5, weight_decouple=False)
    torch.testing.assert_close(x, expected)
    # without degenerated_to_sgd there is no step below N: the moments (and a decoupled decay) only
    x, optimizer = one_step(rectify=True, weight_decay=0.5)
    torch.testing.assert_close(x, theta * (1 - 0.1 * 0.5))
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    torch.testing.assert_close(state["exp_avg"], 0.1 * GRAD_T)


def test_the_step_is_counted_per_group_even_without_gradients():
    a, b = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    a_ref, b_ref = copy_params([a, b])
    ours = scratchopt.Lamb([{"params": [a]}, {"params": [b]}])
    theirs = pytorch_optimizer.Lamb([{"params": [a_ref]}, {"params": [b_ref]}], foreach=False)
    assert "step" not in ours.param_groups[0]
    for step in range(3):
        for p in (a, a_ref):
            p.grad = torch.full_like(p, 0.5 + step)
        ours.step()
        theirs.step()
    assert [g["step"] for g in ours.param_groups] == [g["step"] for g in theirs.param_groups] == [3, 3]
    # b's first update takes the group's t = 4 (bias correction 1 − β₁⁴), as in the reference
    for p, q in ((a, a_ref), (b, b_ref)):
        p.grad = torch.full_like(p, -1.0)
        q.grad = torch.full_like(q, -1.0)
    ours.step()
    theirs.step()
    assert torch.equal(a, a_ref) and torch.equal(b, b_ref)
    assert ours.state_dict()["param_groups"][1]["step"] == 4


def test_the_gradients_are_left_as_they_were():
    """The reference scales (pre_norm) and negates (maximize) ``param.grad`` in place; ours reads it only."""
    kwargs: dict[str, Any] = {"pre_norm": True, "max_grad_norm": 0.1, "maximize": True}
    params = hard_params(torch.float32)
    theirs_params = copy_params(params)
    ours = scratchopt.Lamb(hard_groups(params), **kwargs)
    theirs = pytorch_optimizer.Lamb(hard_groups(theirs_params), **kwargs, foreach=False)
    grads = gradients(params, 0)
    set_gradients(params, grads)
    set_gradients(theirs_params, grads)
    ours.step()
    theirs.step()
    for p, q, grad in zip(params, theirs_params, grads):
        if grad is None:
            continue
        assert p.grad is not None and q.grad is not None
        assert torch.equal(p.grad, grad)
        assert not torch.equal(q.grad, grad)


def test_each_group_scales_by_its_own_max_grad_norm():
    """s = min(1, M/(G + ε)) with the group's M (the reference reads its constructor's), G over all groups."""
    params = hard_params(torch.float64)
    ours_params = copy_params(params)
    groups = hard_groups(ours_params)
    groups[1]["max_grad_norm"] = 0.5
    ours = scratchopt.Lamb(groups, pre_norm=True)
    references = {}
    for max_grad_norm in (1.0, 0.5):
        reference_params = copy_params(params)
        references[max_grad_norm] = (
            reference_params,
            pytorch_optimizer.Lamb(
                hard_groups(reference_params), pre_norm=True, max_grad_norm=max_grad_norm, foreach=False
            ),
        )
    for step in range(5):
        grads = gradients(params, step)
        set_gradients(ours_params, grads)
        ours.step()
        for reference_params, optimizer in references.values():
            set_gradients(reference_params, grads)
            optimizer.step()
    for index, p in enumerate(ours_params):
        reference_params, _ = references[1.0 if index < 3 else 0.5]  # hard_groups: params 3 and 4 are group 1
        assert torch.equal(p, reference_params[index]), index


def _train(optimizer: torch.optim.Optimizer, params: list[Tensor], steps: range) -> None:
    for step in steps:
        set_gradients(params, gradients(params, step))
        optimizer.step()


def _assert_same(ours: Any, theirs: Any, ours_params: list[Tensor], theirs_params: list[Tensor]) -> None:
    for index, (a, b) in enumerate(zip(ours_params, theirs_params)):
        assert torch.equal(a, b), f"param {index}"
        for key in ("exp_avg", "exp_avg_sq"):
            if key in theirs.state[b]:
                assert torch.equal(ours.state[a][key], theirs.state[b][key]), f"param {index} {key}"
    assert [g["step"] for g in ours.param_groups] == [g["step"] for g in theirs.param_groups]


STATE_DICT_CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "rectify across the threshold": {"rectify": True},
    "pre_norm, maximize": {"pre_norm": True, "max_grad_norm": 0.5, "maximize": True, "weight_decay": 0.01},
}


@pytest.mark.parametrize("config", list(STATE_DICT_CONFIGS))
def test_our_state_dict_loads_into_the_reference_and_continues(config):
    """The reference reads ``foreach`` from the loaded groups: ours is built with foreach=False, so that
    the reference keeps its per-parameter path (its batched one differs by rounding)."""
    kwargs = STATE_DICT_CONFIGS[config]
    params = hard_params(torch.float32)
    ours = scratchopt.Lamb(hard_groups(params), **kwargs, foreach=False)
    _train(ours, params, range(4))
    theirs_params = copy_params(params)
    theirs = pytorch_optimizer.Lamb(hard_groups(theirs_params), **kwargs, foreach=False)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    _train(ours, params, range(4, 9))
    _train(theirs, theirs_params, range(4, 9))
    _assert_same(ours, theirs, params, theirs_params)


@pytest.mark.parametrize("config", list(STATE_DICT_CONFIGS))
def test_the_references_state_dict_loads_into_ours_and_continues(config):
    """Its groups lack pre_norm, maximize …: ours takes the constructor's; its diagnostics are dropped."""
    kwargs = STATE_DICT_CONFIGS[config]
    theirs_params = hard_params(torch.float32)
    theirs = pytorch_optimizer.Lamb(hard_groups(theirs_params), **kwargs, foreach=False)
    _train(theirs, theirs_params, range(4))
    params = copy_params(theirs_params)
    ours = scratchopt.Lamb(hard_groups(params), **kwargs)
    saved = copy.deepcopy(theirs.state_dict())
    assert "pre_norm" not in saved["param_groups"][0]
    ours.load_state_dict(saved)
    for group in ours.param_groups:
        assert group["pre_norm"] == kwargs.get("pre_norm", False)
        assert group["maximize"] == kwargs.get("maximize", False)
    assert all(set(state) == {"exp_avg", "exp_avg_sq"} for state in ours.state.values())
    _train(ours, params, range(4, 9))
    _train(theirs, theirs_params, range(4, 9))
    _assert_same(ours, theirs, params, theirs_params)


def test_a_pickled_optimizer_continues_as_the_original():
    params = hard_params(torch.float32)
    optimizer = scratchopt.Lamb(hard_groups(params), pre_norm=True, rectify=True, degenerated_to_sgd=True)
    _train(optimizer, params, range(3))
    copied_params, copied = pickle.loads(pickle.dumps((params, optimizer)))
    _train(optimizer, params, range(3, 6))
    _train(copied, copied_params, range(3, 6))
    for a, b in zip(params, copied_params):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs", [{"pre_norm": True, "weight_decay": 0.01}, {"rectify": True, "degenerated_to_sgd": True}]
)
def test_the_variants_pass_the_kit(kwargs):
    ran = check_optimizer(scratchopt.Lamb, kwargs, dtypes=(torch.float64,), steps=6)
    assert "state_dict round trip (loop)" in ran and "scheduler (loop)" in ran


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": -1.0}, r"Invalid learning rate: -1.0 \(allowed: lr >= 0\)"),
        ({"betas": (1.0, 0.999)}, r"beta parameter at index 0: 1.0 \(allowed: 0 <= betas\[0\] < 1\)"),
        ({"betas": (0.9, -0.1)}, r"beta parameter at index 1: -0.1 \(allowed: 0 <= betas\[1\] < 1\)"),
        ({"betas": (0.9, 0.99, 0.9)}, r"Invalid betas: .* \(allowed: two values"),
        ({"weight_decay": -0.1}, r"weight_decay value: -0.1 \(allowed: weight_decay >= 0\)"),
        ({"max_grad_norm": -1.0}, r"max_grad_norm value: -1.0 \(allowed: max_grad_norm >= 0\)"),
        ({"eps": -1e-6}, r"epsilon value: -1e-06 \(allowed: eps >= 0\)"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        scratchopt.Lamb([torch.zeros(2, requires_grad=True)], **kwargs)


def test_what_is_refused():
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="Lamb runs only impl='loop'"):
        scratchopt.Lamb([x], impl="foreach")
    assert scratchopt.Lamb([x], foreach=True).impl == "loop"  # torch's flag is a hint: the loop runs
    optimizer = scratchopt.Lamb([x])
    x.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match="Lamb does not support sparse gradients"):
        optimizer.step()
    x.grad = torch.ones(3)
    optimizer.param_groups[0]["adanorm"] = True  # as a reference state_dict saved with it would have it
    with pytest.raises(ValueError, match="adanorm is not implemented"):
        optimizer.step()
    assert not optimizer.state[x] and "step" not in optimizer.param_groups[0]  # refused before any change
