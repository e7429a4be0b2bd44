"""Sparse gradients: Adagrad is bit-for-bit equal to torch.optim.Adagrad, and refuses what torch refuses."""

from __future__ import annotations

import copy

import pytest
import torch
from parity import assert_optimizers_equal

import scratchopt

# Small test tensors must reach the compiled kernels (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("kernels_at_every_size")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.complex64, torch.complex128]

ADAGRAD_CONFIGS = [
    pytest.param({}, id="default"),
    pytest.param({"lr": 0.1}, id="lr"),
    pytest.param({"lr": 0.1, "lr_decay": 0.5, "initial_accumulator_value": 0.1}, id="lr_decay+initial_accumulator"),
    pytest.param({"lr": 0.1, "maximize": True}, id="maximize"),
    pytest.param({"lr": 0.1, "eps": 1e-3}, id="eps"),
    pytest.param({"lr": torch.tensor(0.05)}, id="tensor lr"),
]


def _values(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    values = torch.randn(shape, generator=gen, dtype=torch.float64)
    if dtype.is_complex:
        values = torch.complex(values, torch.randn(shape, generator=gen, dtype=torch.float64))
    return values.to(dtype)


def sparse_grad(shape: tuple[int, ...], dtype: torch.dtype, step: int, nnz: int, seed: int) -> torch.Tensor:
    """A sparse COO gradient over the first dimension; rows repeat, so it is uncoalesced."""
    gen = torch.Generator().manual_seed(1000 * seed + step)
    indices = torch.randint(0, shape[0], (1, nnz), generator=gen)
    return torch.sparse_coo_tensor(indices, _values((nnz, *shape[1:]), dtype, gen), shape, check_invariants=True)


def sparse_params(dtype: torch.dtype) -> list[torch.Tensor]:
    """An embedding-like matrix (hybrid sparse grad), a vector (fully sparse grad), a dense-grad param."""
    gen = torch.Generator().manual_seed(0)
    return [_values(shape, dtype, gen).requires_grad_() for shape in ((12, 3), (40,), (4, 2))]


def grads_for(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    embedding, vector, dense = params
    return [
        sparse_grad(tuple(embedding.shape), embedding.dtype, step, nnz=9, seed=1),
        sparse_grad(tuple(vector.shape), vector.dtype, step, nnz=30, seed=2),
        _values(tuple(dense.shape), dense.dtype, torch.Generator().manual_seed(3000 + step)),
    ]


def _clone(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


IMPLS = scratchopt.strategies.NAMES


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kwargs", ADAGRAD_CONFIGS)
def test_adagrad_sparse_matches_torch_bit_for_bit(kwargs, dtype, impl):
    """Sparse gradients run per tensor under every strategy; the dense param beside them takes the
    strategy's own path (bit-exact but for the compiled kernels' few ulp)."""
    theirs_params = sparse_params(dtype)
    ours_params = _clone(theirs_params)
    theirs = torch.optim.Adagrad(theirs_params, **copy.deepcopy(kwargs), foreach=False)
    ours = scratchopt.Adagrad(ours_params, **copy.deepcopy(kwargs), impl=impl)
    for step in range(5):
        grads = grads_for(theirs_params, step)
        for p_theirs, p_ours, grad in zip(theirs_params, ours_params, grads):
            p_theirs.grad, p_ours.grad = grad.clone(), grad.clone()
        theirs.step()
        ours.step()
        exact = scratchopt.strategies.STRATEGIES[impl].exact or dtype.is_complex
        tolerance = {} if exact else {"exact": False, "rtol": 8 * torch.finfo(dtype).eps, "atol": 1e-6}
        assert_optimizers_equal(ours, theirs, ours_params, theirs_params, f"sparse Adagrad step {step}", **tolerance)


@pytest.mark.parametrize("impl", IMPLS)
def test_adagrad_sparse_grad_with_weight_decay_raises_torchs_error_before_any_change(impl):
    """torch raises inside its loop, after counting that param's step and updating the params before it
    (a half-done step); we raise its error before anything changes."""

    def attempt(module, **kwargs) -> tuple[torch.optim.Optimizer, list[torch.Tensor], RuntimeError]:
        params = sparse_params(torch.float64)
        dense, vector, embedding = params[2], params[1], params[0]
        optimizer = module.Adagrad([dense, vector, embedding], lr=0.1, weight_decay=0.1, **kwargs)
        dense.grad = torch.ones_like(dense)
        vector.grad = sparse_grad(tuple(vector.shape), vector.dtype, 0, nnz=5, seed=2)
        embedding.grad = sparse_grad(tuple(embedding.shape), embedding.dtype, 0, nnz=5, seed=1)
        with pytest.raises(RuntimeError) as error:
            optimizer.step()
        return optimizer, [dense, vector, embedding], error.value

    theirs, _, their_error = attempt(torch.optim)
    ours, ours_params, our_error = attempt(scratchopt, impl=impl)
    assert str(their_error) == "weight_decay option is not compatible with sparse gradients"
    assert str(our_error) == str(their_error)
    untouched = sparse_params(torch.float64)
    for p, original in zip(ours_params, [untouched[2], untouched[1], untouched[0]]):
        assert torch.equal(p, original), "a param changed before the error"
        assert ours.state[p]["step"].item() == 0
    assert theirs.state[theirs.param_groups[0]["params"][0]]["step"].item() == 1  # torch's half-done step
