"""Bad gradients and bad state raise torch's exception type, naming the parameter and key, before a
step changes anything, under every strategy (:mod:`scratchopt.step_checks`)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import Tensor

import scratchopt
from scratchopt.algorithms import ALGORITHMS
from scratchopt.strategies import NAMES
from scratchopt.strategies.kernels import runtime
from scratchopt.testing import hard_params_for

# Algorithms with an update the strategies run (the closure ones write their step out in full).
_STEPPED = [name for name, cls in ALGORITHMS.items() if not cls.needs_closure and cls.takes != "sparse gradients"]


#: Each strategy with the native runtime built, and fused also without it (the only strategy whose
#: checks take another path there: its native pass declines, and the general path raises).
_IMPLS = [pytest.param(impl, "runtime", id=f"{impl}-runtime") for impl in NAMES] + [
    pytest.param("fused", "python", id="fused-python")
]


@pytest.fixture
def tables(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The runtime mode of the test's ``impl, mode`` parameters."""
    mode = request.node.callspec.params["mode"]
    if mode == "runtime":
        if runtime.ready() is None:
            runtime._build(in_process=True)
        assert runtime.ready() is not None
    else:
        monkeypatch.setattr(runtime, "get", lambda: None)
        monkeypatch.setattr(runtime, "ready", lambda: None)
    return str(mode)


def _trained(name: str, impl: str, **kwargs: Any) -> tuple[Any, list[Tensor]]:
    cls = ALGORITHMS[name]
    params = [p for p in hard_params_for(cls)(torch.float32) if p.requires_grad]
    optimizer = cls(params, **{**cls.example_kwargs, **kwargs}, impl=impl if cls.elementwise else None)
    for _ in range(2):
        for p in params:
            p.grad = torch.full_like(p, 0.25) + 0.5 * p.detach()
        optimizer.step()
    for p in params:
        p.grad = torch.full_like(p, -0.5)
    return optimizer, params


def _snapshot(optimizer: Any, params: list[Tensor]) -> list[Any]:
    def copy(value: Any) -> Any:
        return value.clone() if isinstance(value, Tensor) else value

    return [(p.detach().clone(), {k: copy(v) for k, v in optimizer.state[p].items()}) for p in params]


def _assert_unchanged(optimizer: Any, params: list[Tensor], before: list[Any]) -> None:
    for index, (p, (value, state)) in enumerate(zip(params, before)):
        assert torch.equal(p.detach(), value), f"param {index} changed"
        now = optimizer.state[p]
        assert set(now) == set(state), f"param {index}: state keys {set(now)} != {set(state)}"
        for key, old in state.items():
            new = now[key]
            same = torch.equal(new, old) if isinstance(old, Tensor) else new == old
            assert same, f"param {index}: state[{key!r}] changed"


@pytest.mark.parametrize(("impl", "mode"), _IMPLS)
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_switching_amsgrad_on_raises_key_error_before_anything_changes(name, impl, mode, tables):
    optimizer, params = _trained(name, impl)
    optimizer.param_groups[0]["amsgrad"] = True
    before = _snapshot(optimizer, params)
    with pytest.raises(KeyError, match=r"parameter 0 has no 'max_exp_avg_sq'"):
        optimizer.step()
    _assert_unchanged(optimizer, params, before)


@pytest.mark.parametrize(("impl", "mode"), _IMPLS)
@pytest.mark.parametrize("name", _STEPPED)
def test_a_loaded_state_without_a_key_raises_key_error_naming_it(name, impl, mode, tables):
    optimizer, params = _trained(name, impl)
    keys = sorted(optimizer.state[params[1]])
    if len(keys) == 1:
        pytest.skip(f"{name}: without its one key the state is empty, and a step starts it afresh, as in torch")
    for key in keys:
        saved = optimizer.state_dict()
        del saved["state"][1][key]
        optimizer.load_state_dict(saved)
        before = _snapshot(optimizer, params)
        with pytest.raises(KeyError, match=rf"parameter 1 has no {key!r}"):
            optimizer.step()
        _assert_unchanged(optimizer, params, before)
        restored = optimizer.state_dict()
        restored["state"][1][key] = torch.zeros(()) if key in ("step", "mu_product", "eta", "mu") else None
        if restored["state"][1][key] is None:
            restored["state"][1][key] = torch.zeros_like(params[1])
        optimizer.load_state_dict(restored)


@pytest.mark.parametrize(("impl", "mode"), _IMPLS)
@pytest.mark.parametrize(
    "case",
    ["float64 gradient", "broadcastable gradient", "transposed gradient", "state of another shape", "transposed state"],
)
@pytest.mark.parametrize("name", _STEPPED)
def test_a_mismatched_gradient_or_state_raises_runtime_error_before_anything_changes(name, case, impl, mode, tables):
    optimizer, params = _trained(name, impl)
    target = params[0]  # a (5, 4) matrix
    if case == "float64 gradient":
        target.grad.data = torch.ones(target.shape, dtype=torch.float64)  # slips past the grad setter
        expected = r"gradient of parameter 0 is torch.float64"
    elif case == "broadcastable gradient":
        target.grad.data = torch.ones(target.shape[-1])
        expected = r"gradient of parameter 0 .*\(4,\)"
    elif case == "transposed gradient":  # as many elements, another shape
        target.grad.data = torch.ones(target.shape[::-1])
        expected = r"gradient of parameter 0 .*\(4, 5\)"
    else:
        state = optimizer.state[target]
        key = next((k for k in optimizer.state_keys if isinstance(state.get(k), Tensor)), None)
        if key is None or not optimizer.elementwise:
            pytest.skip(f"{name} keeps no param-shaped state tensor")
        shape = (target.numel(),) if case == "state of another shape" else target.shape[::-1]
        state[key] = torch.zeros(shape)
        expected = rf"state\[{key!r}\] of parameter 0 has shape {re.escape(str(tuple(shape)))}"
    before = _snapshot(optimizer, params)
    with pytest.raises(RuntimeError, match=expected):
        optimizer.step()
    _assert_unchanged(optimizer, params, before)


def test_the_message_names_a_named_parameter_and_its_group():
    model = torch.nn.Linear(3, 2)
    optimizer = scratchopt.Adam(
        [{"params": [model.weight], "param_names": ["weight"]}, {"params": [model.bias], "param_names": ["bias"]}]
    )
    model(torch.randn(4, 3)).sum().backward()
    model.bias.grad.data = model.bias.grad.double()
    with pytest.raises(RuntimeError, match=r"parameter 0 \('bias'\) of param group 1"):
        optimizer.step()


@pytest.mark.parametrize(("impl", "mode"), _IMPLS)
def test_bad_input_in_one_group_leaves_every_group_unchanged(impl, mode, tables):
    """Every group is checked before any is updated: no step is half-done across groups either."""
    first, second = [torch.randn(5, 4, requires_grad=True)], [torch.randn(3, requires_grad=True)]
    optimizer = scratchopt.AdamW([{"params": first}, {"params": second, "lr": 0.5}], impl=impl)
    params = first + second
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
    second[0].grad.data = torch.ones(3, dtype=torch.float64)
    before = _snapshot(optimizer, params)
    with pytest.raises(RuntimeError, match="gradient of parameter 0 of param group 1"):
        optimizer.step()
    _assert_unchanged(optimizer, params, before)


@pytest.mark.parametrize(("impl", "mode"), _IMPLS)
def test_a_group_whose_settings_cannot_be_read_leaves_every_group_unchanged(impl, mode, tables):
    first, second = [torch.randn(5, 4, requires_grad=True)], [torch.randn(3, requires_grad=True)]
    optimizer = scratchopt.Adam([{"params": first}, {"params": second}], impl=impl)
    params = first + second
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
    optimizer.param_groups[1]["betas"] = (0.9, 0.99, 0.5)  # one too many
    before = _snapshot(optimizer, params)
    with pytest.raises(ValueError):
        optimizer.step()
    _assert_unchanged(optimizer, params, before)
