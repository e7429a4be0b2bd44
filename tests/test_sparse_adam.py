"""SparseAdam against torch.optim.SparseAdam, bit for bit, on every optim_db configuration.

SparseAdam takes sparse gradients only, so the hard-parameter harness of tests/parity.py (dense
gradients) cannot drive it. Here: an embedding-like matrix (hybrid sparse gradient), a vector (fully
sparse gradient), a transposed (non-contiguous) matrix and a matrix whose gradient is missing on some
steps and empty (no entries) on others, in two param groups; gradients repeat indices (uncoalesced).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from parity import assert_optimizers_equal, optim_db_configs, optim_db_info

import scratchopt

#: torch's class refuses complex parameters (an optim_db error input, checked in tests/test_api.py).
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _configs() -> list[tuple[str, dict[str, Any]]]:
    """optim_db's configurations, and the one its sparse tests use (``metadata_for_sparse``)."""
    sparse_kwargs, _ = optim_db_info("SparseAdam").metadata_for_sparse
    return [*optim_db_configs("SparseAdam"), ("optim_db sparse metadata", dict(sparse_kwargs))]


def sparse_params(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    embedding, vector, wide, sometimes = (
        torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in ((12, 3), (40,), (6, 4), (5, 2))
    )
    params = [embedding, vector, wide.t(), sometimes]
    assert not params[2].is_contiguous()
    return [p.requires_grad_() for p in params]


def sparse_grad(param: torch.Tensor, step: int, seed: int, nnz: int) -> torch.Tensor:
    """Rows of ``param`` (repeats included, so uncoalesced) with random values."""
    gen = torch.Generator().manual_seed(1000 * seed + step)
    indices = torch.randint(0, param.shape[0], (1, nnz), generator=gen)
    values = torch.randn((nnz, *param.shape[1:]), generator=gen, dtype=torch.float64).to(param.dtype)
    return torch.sparse_coo_tensor(indices, values, param.shape, check_invariants=True)


def grads_for(params: list[torch.Tensor], step: int) -> list[torch.Tensor | None]:
    grads: list[torch.Tensor | None] = [
        sparse_grad(p, step, seed, nnz) for seed, (p, nnz) in enumerate(zip(params[:3], (9, 30, 5)))
    ]
    if step % 3 == 1:
        grads.append(None)
    elif step % 3 == 2:
        grads.append(sparse_grad(params[3], step, 3, nnz=0))  # no entries: torch still counts the step
    else:
        grads.append(sparse_grad(params[3], step, 3, nnz=3))
    return grads


def groups(params: list[torch.Tensor]) -> list[dict[str, Any]]:
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.02}]


def _clone(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def _set_grads(params: list[torch.Tensor], step: int) -> None:
    for p, grad in zip(params, grads_for(params, step)):
        p.grad = grad


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("desc,kwargs", _configs(), ids=[desc for desc, _ in _configs()])
def test_sparse_adam_matches_torch_bit_for_bit(desc, kwargs, dtype):
    their_params = sparse_params(dtype)
    our_params = _clone(their_params)
    theirs = torch.optim.SparseAdam(groups(their_params), **copy.deepcopy(kwargs))
    ours = scratchopt.SparseAdam(groups(our_params), **copy.deepcopy(kwargs))
    for step in range(6):
        _set_grads(their_params, step)
        _set_grads(our_params, step)
        theirs.step()
        ours.step()
        assert_optimizers_equal(ours, theirs, our_params, their_params, f"SparseAdam {desc} step {step}")
    assert ours.state[our_params[3]]["step"] == 4  # steps 0, 2, 3, 5: an empty gradient counts


@pytest.mark.parametrize(
    "first,second", [(torch.optim, scratchopt), (scratchopt, torch.optim)], ids=["torch-to-ours", "ours-to-torch"]
)
def test_state_dict_round_trip_with_torch(first, second):
    reference_params = sparse_params(torch.float64)
    reference = torch.optim.SparseAdam(groups(reference_params))
    for step in range(6):
        _set_grads(reference_params, step)
        reference.step()

    params = sparse_params(torch.float64)
    before = first.SparseAdam(groups(params))
    for step in range(3):
        _set_grads(params, step)
        before.step()
    resumed = _clone(params)
    after = second.SparseAdam(groups(resumed))
    after.load_state_dict(copy.deepcopy(before.state_dict()))
    for step in range(3, 6):
        _set_grads(resumed, step)
        after.step()
    assert_optimizers_equal(after, reference, resumed, reference_params, "SparseAdam resumed")


def test_state_dict_has_torchs_form():
    def state_dict(module: Any) -> dict[str, Any]:
        params = sparse_params(torch.float32)
        optimizer = module.SparseAdam(groups(params))
        for step in range(2):
            _set_grads(params, step)
            optimizer.step()
        return optimizer.state_dict()

    ours, theirs = state_dict(scratchopt), state_dict(torch.optim)
    # torch's groups, and the strategy that ran each (torch ignores a key it does not use)
    assert [{k: v for k, v in g.items() if k != "impl"} for g in ours["param_groups"]] == theirs["param_groups"]
    assert [g["impl"] for g in ours["param_groups"]] == ["loop"] * len(theirs["param_groups"])
    assert {i: {k: type(v) for k, v in s.items()} for i, s in ours["state"].items()} == {
        i: {k: type(v) for k, v in s.items()} for i, s in theirs["state"].items()
    }
    assert type(ours["state"][0]["step"]) is int


def test_dense_gradient_is_refused_with_torchs_error():
    def attempt(module: Any) -> str:
        p = torch.zeros(4, 2, requires_grad=True)
        optimizer = module.SparseAdam([p])
        p.grad = torch.ones(4, 2)
        with pytest.raises(RuntimeError) as error:
            optimizer.step()
        return str(error.value)

    assert attempt(scratchopt) == attempt(torch.optim)


def test_embedding_training_matches_torch():
    """What SparseAdam is for: nn.Embedding(sparse=True) trained through autograd."""

    def train(module: Any) -> torch.Tensor:
        torch.manual_seed(0)
        embedding = torch.nn.Embedding(10, 4, sparse=True)
        optimizer = module.SparseAdam(embedding.parameters(), lr=0.05)
        for step in range(5):
            indices = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(step))
            optimizer.zero_grad()
            (embedding(indices) ** 2).sum().backward()
            optimizer.step()
        return embedding.weight.detach()

    assert torch.equal(train(scratchopt), train(torch.optim))
