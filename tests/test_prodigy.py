"""Prodigy against the authors' implementation (``prodigyopt.Prodigy``, 1.1.2), bit for bit at every step
on the hard parameter set with a scheduler, the estimate d, D, d̂ and the group counter included; every
strategy against the loop; the early stop, the lr-0 groups, errors and state_dicts as the reference has
them; the two sums added over two gloo ranks with ``fsdp_in_use``; and the paper's first two steps by hand.

The reference keeps ``step`` as a Python int, ours as a 0-d float32 tensor, as torch's optimizers do:
:class:`Reference` turns its ints into such tensors after each step (it only ever adds 1 to them), so
the states compare key by key. The reference adds the L2 penalty to ``param.grad`` in place: the
comparisons give it clones.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import prodigyopt
import pytest
import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook

import scratchopt
import scratchopt.testing as kit
from scratchopt.testing import COMPILED_IMPLS, EXACT_IMPLS, compare_with_loop, copy_params, grad_like, hard_groups

#: The group keys the step writes (and lr, which the scheduler moves), compared at every step.
GROUP_KEYS = ("lr", "d", "d0", "d_max", "d_hat", "d_numerator", "d_denom", "k")
#: One lr for both groups of the hard parameter set (its second group sets 0.37): the reference
#: refuses groups whose lr is neither the largest nor 0.
LR = 0.37

CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "coupled decay": {"weight_decay": 0.1, "decouple": False},
    "decoupled decay": {"weight_decay": 0.1},
    "bias correction": {"use_bias_correction": True},
    "safeguard warmup": {"safeguard_warmup": True},
    "beta1 = 0": {"betas": (0.0, 0.99)},
    "growth rate, d0": {"growth_rate": 1.02, "d0": 1e-4},
    "d_coef, beta3, eps": {"d_coef": 0.5, "beta3": 0.9, "eps": 1e-6},
    "slice_p = 2, coupled decay": {"slice_p": 2, "weight_decay": 0.05, "decouple": False},
}


#: Configurations whose estimate d̂ stays below d₀ for the test's 8 steps (the step size b·η, or s
#: without γ, is smaller), so d and D stay d₀ there; d̂ is compared at every step all the same.
SLOW_ESTIMATES = {"bias correction", "safeguard warmup"}


class Reference(prodigyopt.Prodigy):
    """The reference, its ``step`` counts turned into 0-d float32 tensors after each step."""

    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        for state in self.state.values():
            if isinstance(state.get("step"), int):
                state["step"] = torch.tensor(float(state["step"]))
        return loss


_noise_gradients = kit.gradients


def pulled_gradients(params: list[torch.Tensor], step: int, seed: int = 1) -> list[torch.Tensor | None]:
    """∇½‖θ‖² plus a little noise (the kit's pattern of missing gradients): θ₀ − θ then lines up with the
    gradients, so the estimate grows (with the kit's noise alone d mostly stays d₀)."""
    grads = _noise_gradients(params, step, seed)
    return [None if g is None else grad_like(p.detach() + 0.1 * g, p) for p, g in zip(params, grads)]


@contextmanager
def group_snapshots() -> Iterator[dict[int, list[list[tuple[Any, ...]]]]]:
    """The groups' keys (with their types) after every step of every optimizer, by ``id``."""
    found: dict[int, list[list[tuple[Any, ...]]]] = {}

    def record(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        snapshot = [tuple((key, type(g.get(key)), g.get(key)) for key in GROUP_KEYS) for g in optimizer.param_groups]
        found.setdefault(id(optimizer), []).append(snapshot)

    handle = register_optimizer_step_post_hook(record)
    try:
        yield found
    finally:
        handle.remove()


def assert_same_run(ours: Any, theirs: Any, ours_params: list[torch.Tensor], their_params: list[torch.Tensor]) -> None:
    """Equal params, state (a Python-int ``step`` by its value) and group keys."""
    for index, (a, b) in enumerate(zip(ours_params, their_params)):
        kit.assert_close(a.detach(), b.detach(), f"param {index}")
        state_a, state_b = ours.state.get(a, {}), theirs.state.get(b, {})
        assert list(state_a) == list(state_b), f"param {index}: state keys {list(state_a)} != {list(state_b)}"
        for key, value in state_b.items():
            if key == "step":
                assert float(state_a[key]) == float(value), f"param {index}: step {state_a[key]} != {value}"
            else:
                kit.assert_close(state_a[key], value, f"param {index} state[{key!r}]")
    for index, (a, b) in enumerate(zip(ours.param_groups, theirs.param_groups)):
        for key in GROUP_KEYS:
            assert type(a.get(key)) is type(b.get(key)) and a.get(key) == b.get(key), f"group {index} {key}"


@pytest.mark.parametrize("gradients", ["pulled", "noise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_the_loop_is_the_authors_implementation(config, dtype, gradients, monkeypatch):
    import parity  # here, not at the top: the gloo ranks import this module, and parity takes seconds

    if gradients == "pulled":
        monkeypatch.setattr(parity, "gradients", pulled_gradients)
    kwargs = {"lr": LR, **CONFIGS[config]}
    with group_snapshots() as snapshots:
        ours, theirs, _, _ = parity.run_side_by_side(
            "Prodigy", kwargs, dtype, steps=8, reference=lambda params, **kw: Reference(params, **kw), schedule=True
        )
    assert len(snapshots[id(ours)]) == 8
    for step, (a, b) in enumerate(zip(snapshots[id(ours)], snapshots[id(theirs)], strict=True)):
        assert a == b, f"step {step}: the groups differ\n{a}\n{b}"
    if gradients == "pulled" and config not in SLOW_ESTIMATES:  # the comparison covers d' ≠ d₀ too
        assert ours.param_groups[0]["d"] > ours.param_groups[0]["d0"]


STRATEGY_CONFIGS = ["default", "coupled decay", "beta1 = 0", "bias correction", "slice_p = 2, coupled decay"]
#: Inductor's compiles take about 1.5 s per kernel on 2 cores: compiled runs the configurations whose
#: programs differ (each group is its own program: decay coupled or decoupled, with or without m).
COMPILED_CONFIGS = {"default", "coupled decay", "beta1 = 0"}


@pytest.mark.usefixtures("kernels_at_every_size")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("impl", EXACT_IMPLS + COMPILED_IMPLS)
@pytest.mark.parametrize("config", STRATEGY_CONFIGS)
def test_every_strategy_matches_the_loop(config, impl, dtype, monkeypatch):
    if impl == "compiled" and (config not in COMPILED_CONFIGS or dtype == torch.float64 and config != "default"):
        pytest.skip("compiled: each distinct program once (the others run under foreach and fused)")
    monkeypatch.setattr(kit, "gradients", pulled_gradients)
    compare_with_loop(scratchopt.Prodigy, {"lr": LR, **CONFIGS[config]}, impl, dtype, steps=8)


def _zeros_like_gradients(params: list[torch.Tensor], step: int) -> list[torch.Tensor | None]:
    return [None if g is None else torch.zeros_like(g) for g in _noise_gradients(params, step)]


@pytest.mark.parametrize("impl", scratchopt.strategies.NAMES)
def test_all_zero_gradients_change_nothing_as_in_the_reference(impl):
    """Σ‖s‖₁ = 0: the reference stops before the update; the state it created stays (s = 0, θ₀, m = v = 0)
    and neither k nor any step is counted. The next steps are then the reference's."""
    theirs_params = kit.hard_params(torch.float32)
    ours_params = copy_params(theirs_params)
    theirs = Reference(hard_groups(theirs_params), lr=LR)
    ours = scratchopt.Prodigy(hard_groups(ours_params), lr=LR, impl=impl)
    before = copy_params(ours_params)
    for step in range(4):
        grads = _zeros_like_gradients(theirs_params, step) if step == 0 else pulled_gradients(theirs_params, step)
        kit.set_gradients(theirs_params, grads)
        kit.set_gradients(ours_params, grads)
        theirs.step()
        ours.step()
        if step == 0:
            assert all(torch.equal(a, b) for a, b in zip(ours_params, before))
            assert [g["k"] for g in ours.param_groups] == [0, 0] and "d_hat" not in ours.param_groups[0]
            assert all(float(state["step"]) == 0 for state in ours.state.values())
        assert_same_run(ours, theirs, ours_params, theirs_params)


def test_a_stop_with_nonzero_gradients_outside_the_slices_keeps_the_moments_the_reference_keeps():
    """slice_p = 2 with a gradient only at odd positions: Σ‖s‖₁ = 0, so the step stops, but the
    reference's first loop has already updated m and v from the whole gradient; so does ours."""
    theirs_params = [torch.randn(4, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)]
    ours_params = copy_params(theirs_params)
    theirs = Reference(theirs_params, slice_p=2)
    ours = scratchopt.Prodigy(ours_params, slice_p=2)
    odd = torch.arange(12).reshape(4, 3) % 2 == 1
    for step in range(3):
        grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(step + 1))
        grad = grad * odd if step == 0 else grad
        theirs_params[0].grad, ours_params[0].grad = grad.clone(), grad.clone()
        theirs.step()
        ours.step()
        if step == 0:
            assert ours.param_groups[0]["k"] == 0 and ours.state[ours_params[0]]["exp_avg"].any()
        assert_same_run(ours, theirs, ours_params, theirs_params)


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.0, 0.999)], ids=["beta1 > 0", "beta1 = 0"])
def test_a_group_with_lr_0_takes_the_others_step_as_in_the_reference(betas):
    """A group with lr 0 adds nothing to the estimate and keeps m and v, yet its params take the step η
    of the others in the reference's second loop: its decoupled decay, and with β₁ = 0 a gradient step
    (m = 0 otherwise). An all-zero param keeps a 0-d θ₀."""

    def groups(params: list[torch.Tensor]) -> list[dict[str, Any]]:
        return [{"params": params[:3]}, {"params": params[3:], "lr": 0.0, "weight_decay": 0.05}]

    theirs_params = [*kit.hard_params(torch.float64), torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)]
    ours_params = copy_params(theirs_params)
    theirs = Reference(groups(theirs_params), betas=betas)
    ours = scratchopt.Prodigy(groups(ours_params), betas=betas)
    with group_snapshots() as snapshots:
        for step in range(6):
            grads = pulled_gradients(theirs_params, step)
            grads[-1] = torch.full((2, 3), 0.5, dtype=torch.float64)
            kit.set_gradients(theirs_params, grads)
            kit.set_gradients(ours_params, grads)
            theirs.step()
            ours.step()
            assert_same_run(ours, theirs, ours_params, theirs_params)
    assert snapshots[id(ours)] == snapshots[id(theirs)]
    assert ours.state[ours_params[-1]]["p0"].shape == () and not ours.state[ours_params[-1]]["exp_avg_sq"].any()
    moved = not torch.equal(ours_params[-1], torch.zeros(2, 3, dtype=torch.float64))
    assert moved == (betas[0] == 0)  # m = 0 and θ = 0: only the β₁ = 0 gradient step moves it


def test_groups_with_different_lrs_raise_the_references_error_before_anything_changes():
    params = kit.hard_params(torch.float32)
    theirs_params = copy_params(params)
    ours = scratchopt.Prodigy([{"params": params[:3]}, {"params": params[3:], "lr": 0.5}])
    theirs = prodigyopt.Prodigy([{"params": theirs_params[:3]}, {"params": theirs_params[3:], "lr": 0.5}])
    kit.set_gradients(params, pulled_gradients(params, 0))
    kit.set_gradients(theirs_params, pulled_gradients(params, 0))
    message = "only supported for values of 0"
    with pytest.raises(RuntimeError, match=message):
        theirs.step()
    before, grads = copy_params(params), [None if p.grad is None else p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match=message):
        ours.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before)) and not ours.state
    assert all(g is None and p.grad is None or torch.equal(p.grad, g) for p, g in zip(params, grads))
    assert [g["k"] for g in ours.param_groups] == [0, 0]


@pytest.mark.parametrize(
    "kwargs",
    [{"d0": 0.0}, {"lr": 0.0}, {"eps": 0.0}, {"betas": (1.0, 0.999)}, {"betas": (0.9, -0.1)}],
    ids=["d0", "lr", "eps", "beta1", "beta2"],
)
def test_invalid_arguments_raise_the_references_errors(kwargs):
    param = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError) as theirs:
        prodigyopt.Prodigy(param, **kwargs)
    with pytest.raises(ValueError) as ours:
        scratchopt.Prodigy(param, **kwargs)
    assert str(ours.value).startswith(str(theirs.value)), (str(ours.value), str(theirs.value))


def test_the_gradients_are_left_as_they_are():
    """The reference adds the L2 penalty to ``param.grad`` in place; ours adds it to a copy."""
    params = kit.hard_params(torch.float32)
    optimizer = scratchopt.Prodigy(hard_groups(params), lr=LR, weight_decay=0.1, decouple=False)
    for step in range(3):
        grads = pulled_gradients(params, step)
        kit.set_gradients(params, grads)
        optimizer.step()
        assert all(g is None or torch.equal(p.grad, g) for p, g in zip(params, grads))


def test_complex_params_are_refused_before_anything_changes():
    params = [torch.randn(3, requires_grad=True), torch.randn(2, dtype=torch.complex64, requires_grad=True)]
    before = copy_params(params)
    optimizer = scratchopt.Prodigy(params)
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match="complex"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before)) and not optimizer.state


@pytest.mark.parametrize("direction", ["ours to the reference", "the reference to ours"])
def test_a_state_dict_moves_between_scratchopt_and_the_reference(direction, monkeypatch):
    """Three steps in one, its state_dict loaded into the other (on copies of the params), three more in
    both: the same numbers, state and groups."""
    kwargs = {"lr": LR, "weight_decay": 0.1, "decouple": False, "use_bias_correction": True, "growth_rate": 1.1}
    ours_first = direction == "ours to the reference"
    first_cls: Any = scratchopt.Prodigy if ours_first else Reference
    second_cls: Any = Reference if ours_first else scratchopt.Prodigy
    first_params = kit.hard_params(torch.float32)
    first = first_cls(hard_groups(first_params), **kwargs)
    second = second_params = None
    for step in range(6):
        if step == 3:
            second_params = copy_params(first_params)
            second = second_cls(hard_groups(second_params), **kwargs)
            second.load_state_dict(copy.deepcopy(first.state_dict()))
        grads = pulled_gradients(first_params, step)
        kit.set_gradients(first_params, grads)
        first.step()
        if second is not None:
            kit.set_gradients(second_params, grads)
            second.step()
    assert second is not None and second_params is not None
    ours, theirs = (first, second) if ours_first else (second, first)
    ours_params, their_params = (first_params, second_params) if ours_first else (second_params, first_params)
    assert_same_run(ours, theirs, ours_params, their_params)
    assert ours.param_groups[0]["k"] == 6 and all(torch.is_tensor(s["step"]) for s in ours.state.values())


def test_the_first_two_steps_follow_the_paper():
    """The paper's Adam version by hand: r and s with (1 − β₃)·γ·d², d = max(d, r/‖s‖₁), and the step
    γ·d·m/(√v + d·ε). d̂ and d agree (the reference's 1/d₀ and its missing 1 − β₃ cancel); the params
    only at the first step: the reference scales ε by the new estimate, the paper by the old one."""
    lr, d0, eps, (beta1, beta2) = 50.0, 1e-6, 1e-2, (0.9, 0.999)
    beta3 = math.sqrt(beta2)
    x0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    g1 = torch.tensor([0.3, -0.2, 0.4], dtype=torch.float64)
    g2 = torch.tensor([0.5, -0.1, 0.2], dtype=torch.float64)
    x = x0.clone().requires_grad_()
    optimizer = scratchopt.Prodigy([x], lr=lr, eps=eps, d0=d0)

    x.grad = g1.clone()
    optimizer.step()
    m = (1 - beta1) * d0 * g1
    v = (1 - beta2) * d0**2 * g1**2
    r = 0.0  # ⟨g₁, θ₀ − θ₀⟩
    s = (1 - beta3) * lr * d0**2 * g1
    d1 = max(d0, r / s.abs().sum().item())
    x1 = x0 - lr * d0 * m / (v.sqrt() + d0 * eps)
    assert d1 == d0 and optimizer.param_groups[0]["d"] == d0
    torch.testing.assert_close(x.detach(), x1, rtol=1e-14, atol=0)

    x.grad = g2.clone()
    optimizer.step()
    m = beta1 * m + (1 - beta1) * d1 * g2
    v = beta2 * v + (1 - beta2) * d1**2 * g2**2
    r = beta3 * r + (1 - beta3) * lr * d1**2 * torch.dot(g2, x0 - x1).item()
    s = beta3 * s + (1 - beta3) * lr * d1**2 * g2
    d_hat = r / s.abs().sum().item()
    d2 = max(d1, d_hat)
    assert d2 > 2 * d0  # the estimate grew: the two forms of the ε term below differ
    group = optimizer.param_groups[0]
    assert group["d_hat"] == pytest.approx(d_hat, rel=1e-12) and group["d"] == pytest.approx(d2, rel=1e-12)
    paper = x1 - lr * d1 * m / (v.sqrt() + d1 * eps)
    reference = x1 - lr * d1 * m / (v.sqrt() + d2 * eps)
    torch.testing.assert_close(x.detach(), reference, rtol=1e-12, atol=0)
    assert not torch.allclose(x.detach(), paper, rtol=1e-6, atol=0)


def fsdp_ranks(rank: int, world_size: int, store: Any, out_dir: Path) -> dict[str, Any]:
    """On each rank, one of two params with ``fsdp_in_use``, beside a single-process run with both: the
    two sums added over the ranks give the single process's numbers, bit for bit. Then all-zero
    gradients: with ``fsdp_in_use`` the step does not stop, d̂ is NaN, d and D stay."""
    whole = [torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) for _ in range(2)]
    whole = [p.add(index).requires_grad_() for index, p in enumerate(whole)]
    shard = [whole[rank].detach().clone().requires_grad_()]
    single = scratchopt.Prodigy(whole, weight_decay=0.1, decouple=False)
    sharded = scratchopt.Prodigy(shard, weight_decay=0.1, decouple=False, fsdp_in_use=True)
    for step in range(5):
        grads = pulled_gradients(whole, step)
        kit.set_gradients(whole, grads)
        kit.set_gradients(shard, grads[rank : rank + 1])
        single.step()
        sharded.step()
    same_params = torch.equal(shard[0], whole[rank])
    same_groups = all(single.param_groups[0][key] == sharded.param_groups[0][key] for key in GROUP_KEYS)
    grew = single.param_groups[0]["d"] > 2 * single.param_groups[0]["d0"]

    zero = [torch.ones(3, dtype=torch.float64, requires_grad=True)]
    stopless = scratchopt.Prodigy(zero, fsdp_in_use=True)
    zero[0].grad = torch.zeros(3, dtype=torch.float64)
    stopless.step()
    group = stopless.param_groups[0]
    nan_estimate = math.isnan(group["d_hat"]) and group["d"] == group["d_max"] == 1e-6 and group["k"] == 1
    return {"same params": same_params, "same groups": same_groups, "grew": grew, "NaN estimate": nan_estimate}


@pytest.mark.distributed
def test_with_fsdp_in_use_the_sums_are_added_over_the_ranks(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    import ranks

    results = ranks.launch("test_prodigy:fsdp_ranks", tmp_path, world_size=2, timeout_s=90)
    for rank, result in enumerate(results):
        assert all(result.values()), f"rank {rank}: {result}"
