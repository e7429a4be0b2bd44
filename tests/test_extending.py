"""Writing your own optimizer: the test kit passes Lion and a user's per-tensor optimizer, fails wrong ones,
and a false ``elementwise`` declaration is refused; the README's example runs as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import scratchopt
from scratchopt.testing import check_optimizer, check_reference, check_scheduler

# Small test tensors must reach the compiled kernels (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("kernels_at_every_size")


def lion_reference(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    maximize: bool,
    **_: Any,
) -> None:
    """Algorithm 2 of Chen et al. (2023), element by element in Python floats."""
    beta1, beta2 = betas
    theta = param.detach().double().flatten().tolist()
    g = (-grad if maximize else grad).double().flatten().tolist()
    m = state.get("m", [0.0] * len(theta))
    new_theta, new_m = [], []
    for t, gi, mi in zip(theta, g, m):
        c = beta1 * mi + (1 - beta1) * gi
        new_theta.append(t * (1 - lr * weight_decay) - lr * ((c > 0) - (c < 0)))
        new_m.append(beta2 * mi + (1 - beta2) * gi)
    state["m"] = new_m
    param.copy_(torch.tensor(new_theta, dtype=torch.float64).reshape(param.shape))


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"lr": 3e-3, "betas": (0.95, 0.98), "weight_decay": 0.1}, {"lr": 1e-3, "maximize": True}],
    ids=["defaults", "decay", "maximize"],
)
def test_lion_passes_the_kit_against_the_paper(kwargs):
    ran = check_optimizer(scratchopt.Lion, kwargs, reference=lion_reference, dtypes=(torch.float64,), steps=10)
    assert "reference" in ran and any(name.startswith("fused") for name in ran)


def test_lion_defaults_and_validation():
    p = [torch.zeros(2, requires_grad=True)]
    group = scratchopt.Lion(p).param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["maximize"]) == (1e-4, (0.9, 0.99), 0.0, False)
    with pytest.raises(ValueError, match=r"Invalid beta parameter at index 1: 1.0 \(allowed: 0 <= betas\[1\] < 1\)"):
        scratchopt.Lion(p, betas=(0.9, 1.0))


class NormalizedMomentum(scratchopt.ScratchOptimizer):
    """A user's per-tensor optimizer, Muon-like: each matrix steps along its momentum divided by its norm."""

    state_keys = ("momentum_buffer",)
    hyperparameter_keys = ("lr", "momentum")
    scalar_state_keys = ()
    elementwise = False

    @staticmethod
    def update(param: Tensor, grad: Tensor, momentum_buffer: Tensor, *, lr: float, momentum: float) -> None:
        momentum_buffer.mul_(momentum).add_(grad)
        param.add_(momentum_buffer / momentum_buffer.norm().clamp_min(1e-12), alpha=-lr)

    def __init__(self, params: Any, lr: float = 0.01, momentum: float = 0.9, *, impl: str | None = None) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum}, impl)

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return {"momentum_buffer": torch.zeros_like(param)}


def normalized_momentum_reference(
    param: Tensor, grad: Tensor, state: dict[str, Any], *, lr: float, momentum: float, **_: Any
) -> None:
    buffer = state["b"] = momentum * state.get("b", torch.zeros_like(grad)) + grad
    param.sub_(lr * buffer / max(float(buffer.norm()), 1e-12))


def test_a_users_per_tensor_optimizer_passes_the_kit():
    ran = check_optimizer(NormalizedMomentum, {"lr": 0.05}, reference=normalized_momentum_reference)
    assert ran == ["state_dict round trip (loop)", "scheduler (loop)", "reference"]
    with pytest.raises(ValueError, match="NormalizedMomentum runs only impl='loop'"):
        NormalizedMomentum([torch.zeros(2, 2, requires_grad=True)], impl="fused")
    assert NormalizedMomentum([torch.zeros(2, 2, requires_grad=True)]).impl == "loop"


def test_the_kit_fails_wrong_math():
    class SlowLion(scratchopt.Lion):
        """β₁ and β₂ swapped: a plausible slip the reference catches."""

        def update_arguments(self, group: dict[str, Any]) -> dict[str, Any]:
            arguments = super().update_arguments(group)
            arguments["beta1"], arguments["beta2"] = arguments["beta2"], arguments["beta1"]
            return arguments

    with pytest.raises(AssertionError, match="against the reference"):
        check_reference(SlowLion, {"lr": 1e-2}, lion_reference)


def test_the_kit_fails_an_optimizer_that_ignores_its_param_groups():
    class FrozenLr(scratchopt.Lion):
        """Reads lr once, at construction: a scheduler then has no effect."""

        def __init__(self, params: Any, lr: float = 1e-4, **kwargs: Any) -> None:
            self.frozen_lr = lr
            super().__init__(params, lr=lr, **kwargs)

        def update_arguments(self, group: dict[str, Any]) -> dict[str, Any]:
            return {**super().update_arguments(group), "lr": self.frozen_lr}

    with pytest.raises(AssertionError, match="under StepLR: the scheduler changed nothing"):
        check_scheduler(FrozenLr, {"lr": 1e-2})


def test_a_false_elementwise_declaration_is_refused_before_any_step():
    class FalselyElementwise(NormalizedMomentum):
        elementwise = True

    p = torch.ones(3, 2, requires_grad=True)
    with pytest.raises(
        TypeError, match=r"declares elementwise = True, but its update calls Tensor.norm: not elementwise"
    ):
        FalselyElementwise([p], impl="fused")
    assert torch.equal(p, torch.ones(3, 2))


def test_the_readme_example_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Write your own optimizer", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's 'Write your own optimizer' section has no Python example"
    namespace: dict[str, Any] = {}
    exec(compile("\n".join(blocks), "README.md", "exec"), namespace)
    assert "report" in namespace and "reference" in namespace["report"]
