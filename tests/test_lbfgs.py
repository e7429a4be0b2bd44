"""LBFGS against torch.optim.LBFGS: params, state and the number of closure calls, bit for bit.

LBFGS needs a closure and takes one param group, so the hard-parameter harness of tests/parity.py cannot
drive it; here every optim_db configuration runs with and without the strong-Wolfe line search on a
Rosenbrock + least-squares problem (a matrix, a vector, a 0-d param, a param the loss ignores, a frozen
one), three ``step`` calls each, in every dtype torch supports.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from parity import assert_optimizers_equal, optim_db_configs

import scratchopt

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.complex64, torch.complex128]


def _configs() -> list[tuple[str, dict[str, Any]]]:
    """Every optim_db configuration, each also with strong_wolfe; then short histories and a small
    evaluation budget, which the defaults never reach on this problem (pairs dropped, the line search
    cut short)."""
    configs = {}
    for desc, kwargs in optim_db_configs("LBFGS"):
        configs[desc] = kwargs
        if kwargs.get("line_search_fn") is None:
            configs[f"{desc}, strong_wolfe"] = {**kwargs, "line_search_fn": "strong_wolfe"}
    configs["history_size=2"] = {"history_size": 2, "max_iter": 8}
    configs["history_size=2, strong_wolfe"] = {"history_size": 2, "max_iter": 8, "line_search_fn": "strong_wolfe"}
    configs["max_eval=6, strong_wolfe"] = {"max_eval": 6, "line_search_fn": "strong_wolfe"}
    return list(configs.items())


def problem_params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """A matrix, a vector, a 0-d param, a param the loss ignores (no gradient) and a frozen one."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        values = 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
        if dtype.is_complex:
            values = torch.complex(values, 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64))
        return values.to(dtype)

    matrix, vector, scalar, unused, frozen = rand(3, 4), rand(6), rand(), rand(2), rand(3)
    return [t.requires_grad_(i != 4) for i, t in enumerate((matrix, vector, scalar, unused, frozen))]


def loss_of(params: list[torch.Tensor]) -> torch.Tensor:
    """Least squares in the matrix, Rosenbrock in the vector, a double well in the scalar (squared
    moduli for complex params); the frozen param enters as a constant."""
    matrix, vector, scalar, _, frozen = params
    gen = torch.Generator().manual_seed(5)
    inputs = torch.randn(4, 2, generator=gen, dtype=torch.float64).to(matrix.dtype)
    targets = torch.randn(3, 2, generator=gen, dtype=torch.float64).to(matrix.dtype)

    def square(t: torch.Tensor) -> torch.Tensor:
        return (t.conj() * t).real if t.is_complex() else t * t

    x = vector.real if vector.is_complex() else vector
    rosenbrock = (100 * square(x[1:] - x[:-1] ** 2) + square(1 - x[:-1])).sum()
    return square(matrix @ inputs - targets).sum() + rosenbrock + square(square(scalar) - 1) + square(frozen).sum()


def closure_for(optimizer: Any, params: list[torch.Tensor], calls: list[int] | None = None) -> Any:
    """torch's closure contract on ``loss_of``; counts its calls in ``calls[0]``."""

    def closure() -> torch.Tensor:
        if calls is not None:
            calls[0] += 1
        optimizer.zero_grad()
        loss = loss_of(params)
        loss.backward()
        return loss

    return closure


def run(
    module: Any, kwargs: dict[str, Any], dtype: torch.dtype
) -> tuple[Any, list[torch.Tensor], list[Any], list[int]]:
    """Three steps of ``module.LBFGS``: the optimizer, its params, the returned losses and closure calls."""
    params = problem_params(dtype)
    optimizer = module.LBFGS(params, **copy.deepcopy(kwargs))
    calls = [0]
    closure = closure_for(optimizer, params, calls)
    losses, counts = [], []
    for _ in range(3):
        losses.append(optimizer.step(closure))
        counts.append(calls[0])
    return optimizer, params, losses, counts


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("desc,kwargs", _configs(), ids=[desc for desc, _ in _configs()])
def test_lbfgs_matches_torch_bit_for_bit(desc, kwargs, dtype):
    theirs, their_params, their_losses, their_calls = run(torch.optim, kwargs, dtype)
    ours, our_params, our_losses, our_calls = run(scratchopt, kwargs, dtype)
    assert our_calls == their_calls, f"closure calls after each step: {our_calls} != {their_calls}"
    for index, (a, b) in enumerate(zip(our_losses, their_losses)):
        assert torch.equal(a, b), f"loss returned by step {index}: {a} != {b}"
    assert_optimizers_equal(ours, theirs, our_params, their_params, f"LBFGS {desc}")
    assert their_calls[-1] > 3, "the problem is too easy to exercise the iterations"


def test_line_search_changes_the_evaluations():
    """The configurations differ where they should: strong_wolfe evaluates other points than a fixed step."""
    _, plain, _, plain_calls = run(scratchopt, {}, torch.float64)
    _, searched, _, searched_calls = run(scratchopt, {"line_search_fn": "strong_wolfe"}, torch.float64)
    assert plain_calls != searched_calls
    assert not torch.equal(plain[0], searched[0])
    assert loss_of(searched).item() < loss_of(problem_params(torch.float64)).item()


@pytest.mark.parametrize(
    "first,second", [(torch.optim, scratchopt), (scratchopt, torch.optim)], ids=["torch-to-ours", "ours-to-torch"]
)
@pytest.mark.parametrize(
    "kwargs", [{}, {"line_search_fn": "strong_wolfe", "history_size": 3}], ids=["default", "strong_wolfe"]
)
def test_state_dict_round_trip_with_torch(first, second, kwargs):
    """Two steps in one library, the state_dict loaded into the other, two more: as torch uninterrupted."""
    reference, reference_params, _, _ = run(torch.optim, {**kwargs, "max_iter": 5}, torch.float64)
    params = problem_params(torch.float64)
    before = first.LBFGS(params, **kwargs, max_iter=5)
    for _ in range(2):
        before.step(closure_for(before, params))
    resumed_params = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    after = second.LBFGS(resumed_params, **kwargs, max_iter=5)
    after.load_state_dict(copy.deepcopy(before.state_dict()))
    after.step(closure_for(after, resumed_params))
    assert_optimizers_equal(after, reference, resumed_params, reference_params, "LBFGS resumed")


def test_state_has_torchs_keys_and_types():
    ours, _, _, _ = run(scratchopt, {"line_search_fn": "strong_wolfe"}, torch.float32)
    theirs, _, _, _ = run(torch.optim, {"line_search_fn": "strong_wolfe"}, torch.float32)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd["state"]) == list(theirs_sd["state"]) == [0]
    assert {k: type(v) for k, v in ours_sd["state"][0].items()} == {
        k: type(v) for k, v in theirs_sd["state"][0].items()
    }
    assert ours_sd["param_groups"] == theirs_sd["param_groups"]


def test_sparse_gradient_is_densified_like_torch():
    def run_sparse(module: Any) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        embedding = torch.nn.Embedding(6, 3, sparse=True).double()
        optimizer = module.LBFGS(embedding.parameters(), max_iter=4)
        indices = torch.tensor([0, 2, 2, 5])

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = (embedding(indices) ** 2).sum()
            loss.backward()
            return loss

        return optimizer.step(closure), embedding.weight.detach()

    (our_loss, our_weight), (their_loss, their_weight) = run_sparse(scratchopt), run_sparse(torch.optim)
    assert torch.equal(our_loss, their_loss) and torch.equal(our_weight, their_weight)


def test_scheduled_lr_is_read_at_every_step():
    def run_scheduled(module: Any) -> list[torch.Tensor]:
        params = problem_params(torch.float64)
        optimizer = module.LBFGS(params, lr=0.5, max_iter=3)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        for _ in range(3):
            optimizer.step(closure_for(optimizer, params))
            scheduler.step()
        return params

    for a, b in zip(run_scheduled(scratchopt), run_scheduled(torch.optim)):
        assert torch.equal(a.detach(), b.detach())


def test_non_contiguous_param_runs_where_torch_cannot_flatten_its_gradient():
    """The one documented difference: ours flattens a transposed gradient with reshape; the result is
    that of torch on the same values stored contiguously."""
    base = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    transposed, contiguous = base.clone().t().requires_grad_(), base.t().contiguous().requires_grad_()
    assert not transposed.is_contiguous()

    def minimize(module: Any, param: torch.Tensor) -> None:
        optimizer = module.LBFGS([param], max_iter=5)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = ((param - 1) ** 4).sum()
            loss.backward()
            return loss

        optimizer.step(closure)

    with pytest.raises(RuntimeError):
        minimize(torch.optim, base.clone().t().requires_grad_())
    minimize(scratchopt, transposed)
    minimize(torch.optim, contiguous)
    assert torch.equal(transposed.detach(), contiguous.detach())


def test_errors_match_torchs():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError, match="requires a closure"):
        scratchopt.LBFGS([p]).step(None)
    with pytest.raises(TypeError):
        scratchopt.LBFGS([p]).step()  # torch: a missing positional argument
    with pytest.raises(ValueError, match="LBFGS doesn't support per-parameter options"):
        scratchopt.LBFGS([{"params": [p]}, {"params": [torch.zeros(1, requires_grad=True)]}])
    for impl in scratchopt.strategies.NAMES[1:]:
        with pytest.raises(ValueError, match="LBFGS runs only impl='loop'"):
            scratchopt.LBFGS([p], impl=impl)
    assert scratchopt.LBFGS([p], impl="loop").impl == scratchopt.LBFGS([p]).impl == "loop"

    def closure() -> torch.Tensor:
        p.grad = torch.ones(2)
        return torch.ones(())

    for module in (torch.optim, scratchopt):
        with pytest.raises(RuntimeError, match="only 'strong_wolfe' is supported"):
            module.LBFGS([p], line_search_fn="backtracking").step(closure)
        optimizer = module.LBFGS([p])
        optimizer.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
        with pytest.raises(AssertionError, match="Expected exactly one param_group"):
            optimizer.step(closure)
