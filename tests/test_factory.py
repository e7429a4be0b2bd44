"""``scratchopt.create``: the groups it builds, and steps equal to the optimizer built by hand."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import Tensor, nn

import scratchopt
from scratchopt.algorithms import ALGORITHMS


class TinyLM(nn.Module):
    """An embedding, a norm, a block with biases, a head tied to the embedding, one frozen buffer-like
    param, and a positional table listed by ``no_weight_decay()`` (timm's convention)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.position = nn.Parameter(torch.randn(4, 6))
        self.norm = nn.LayerNorm(6)
        self.block = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight  # tied: listed once
        self.frozen = nn.Parameter(torch.randn(6, 6), requires_grad=False)

    def no_weight_decay(self) -> set[str]:
        return {"position"}

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[-1]]
        return self.head(self.block(self.norm(x)).tanh())


def _loss(model: nn.Module) -> Tensor:
    tokens = torch.tensor([[1, 4, 2, 7], [3, 3, 0, 9]])
    return nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())


def test_decay_only_on_weight_matrices_and_names_in_the_groups():
    optimizer = scratchopt.create(TinyLM(), "adamw", lr=1e-3, weight_decay=0.1, impl="fused")
    assert isinstance(optimizer, scratchopt.AdamW) and optimizer.impl == "fused"
    decayed, others = optimizer.param_groups
    assert decayed["param_names"] == ["block.weight"] and decayed["weight_decay"] == 0.1
    assert others["param_names"] == ["position", "embed.weight", "norm.weight", "norm.bias", "block.bias"]
    assert others["weight_decay"] == 0.0 and decayed["lr"] == others["lr"] == 1e-3
    assert scratchopt.create(TinyLM(), "AdamW").param_groups[0]["weight_decay"] == 0.01  # AdamW's default


def test_a_custom_rule_and_an_algorithm_without_weight_decay():
    rule = scratchopt.create(TinyLM(), "sgd", lr=0.1, no_decay=lambda name, p, module: name.startswith("norm"))
    assert rule.param_groups[1]["param_names"] == ["norm.weight", "norm.bias"]
    rprop = scratchopt.create(TinyLM(), "rprop")
    assert len(rprop.param_groups) == 1 and len(rprop.param_groups[0]["params"]) == 6
    with pytest.raises(TypeError, match="Rprop takes no weight_decay"):
        scratchopt.create(TinyLM(), "rprop", weight_decay=0.1)
    with pytest.raises(ValueError, match="no algorithm called 'adamx'; the registered ones are"):
        scratchopt.create(TinyLM(), "adamx")
    with pytest.raises(ValueError, match=r"Muon takes 2-d weight matrices only, and TinyLM has others \(norm.weight"):
        scratchopt.create(TinyLM(), "muon")


def _model_for(cls: type) -> nn.Module:
    if cls.takes == "matrices":
        return nn.Sequential(nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 3, bias=False))
    if cls.takes == "sparse gradients":
        return nn.Sequential(nn.Embedding(7, 3, sparse=True))
    return TinyLM()


def _steps(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for _ in range(3):

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = _loss(model) if isinstance(model, TinyLM) else model(_inputs(model)).square().mean()
            if type(optimizer).__name__ != "Newton":
                loss.backward()
            return loss

        if getattr(optimizer, "needs_closure", False):
            optimizer.step(closure)
        else:
            closure()
            optimizer.step()


def _inputs(model: nn.Module) -> Tensor:
    first = model[0]
    return (
        torch.tensor([1, 5, 2])
        if isinstance(first, nn.Embedding)
        else torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    )


_NOT_DECAYED = {"embed.weight", "position", "norm.weight", "norm.bias", "block.bias"}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_algorithm_by_name_steps_like_the_one_built_by_hand(name):
    cls = ALGORITHMS[name]
    if name == "Newton":
        pytest.skip("Newton takes one flat param vector, not a model's params")
    torch.manual_seed(0)
    model = _model_for(cls)
    twin = copy.deepcopy(model)
    initial = [p.detach().clone() for p in model.parameters()]
    kwargs = dict(cls.example_kwargs)
    created = scratchopt.create(model, name.lower(), **kwargs)
    named = [(n, p) for n, p in twin.named_parameters() if p.requires_grad]
    signature = inspect.signature(cls).parameters
    if "weight_decay" in signature:
        decay = kwargs.pop("weight_decay", signature["weight_decay"].default)
        groups = [
            {"params": [p for n, p in named if n not in _NOT_DECAYED], "weight_decay": decay},
            {"params": [p for n, p in named if n in _NOT_DECAYED], "weight_decay": 0.0},
        ]
        by_hand = cls([g for g in groups if g["params"]], **kwargs)
    else:
        by_hand = cls([p for _, p in named], **kwargs)
    _steps(model, created)
    _steps(twin, by_hand)
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), f"{name}: {n} differs"
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), initial)), f"{name}: nothing moved"
