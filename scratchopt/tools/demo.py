"""``scratchopt demo``: every registered algorithm with a ``torch.optim`` twin, trained beside that twin.

Each pair starts from the same weights and trains full-batch on scikit-learn's 8×8 digits (shipped
with scikit-learn, no download). scratchopt runs ``impl="loop"``, torch its for-loop (``foreach=False``
where the class has the flag), so the two final losses and parameters must be equal bit for bit. What
each algorithm needs comes from its declarations: a closure for ``needs_closure`` (LBFGS), only the
weight matrices for ``takes == "matrices"`` (Muon), and for ``takes == "sparse gradients"``
(SparseAdam) a linear classifier built on ``nn.EmbeddingBag(sparse=True)``, whose gradient is sparse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scratchopt.algorithms import ALGORITHMS
from scratchopt.optimizer import Algorithm
from scratchopt.tools import catalog

SEED = 0
NO_TWIN = "skipped: no torch.optim twin to compare with"


def digits_data() -> tuple[Tensor, Tensor]:
    """The 8×8 digits that ship inside scikit-learn (no download), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    return inputs, torch.tensor(digits.target, dtype=torch.long)


class SparseLinear(nn.Module):
    """A linear classifier whose weight gets a sparse gradient: each image is the bag of its 64 pixel
    indices weighted by their intensities, summed by ``nn.EmbeddingBag(sparse=True)``."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.weight = nn.EmbeddingBag(features, classes, mode="sum", sparse=True)
        # Small weights, as nn.Linear's initialisation gives: the sum over 64 pixels stays near zero.
        nn.init.uniform_(self.weight.weight, -(features**-0.5), features**-0.5)

    def forward(self, inputs: Tensor) -> Tensor:
        indices = torch.arange(inputs.shape[1]).expand_as(inputs)
        return self.weight(indices, per_sample_weights=inputs)


def make_model(cls: type[Algorithm]) -> nn.Module:
    """The demo's model for ``cls``, from a fixed seed: a 64-32-10 MLP, or the sparse linear classifier
    for an algorithm that takes sparse gradients only."""
    torch.manual_seed(SEED)
    if cls.takes == "sparse gradients":
        return SparseLinear(64, 10)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def setup(cls: type[Algorithm]) -> str | None:
    """How ``cls``'s run differs from the plain one (all of the MLP's params, ``step()`` after backward)."""
    notes = []
    if cls.needs_closure:
        notes.append("step(closure), the closure computing the loss and its gradients")
    if cls.takes == "matrices":
        notes.append("the MLP's weight matrices only (the biases stay as they are)")
    if cls.takes == "sparse gradients":
        notes.append("a linear classifier on nn.EmbeddingBag(sparse=True), whose gradient is sparse")
    return "; ".join(notes) or None


def train(
    cls: type[Algorithm],
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    inputs: Tensor,
    targets: Tensor,
    steps: int,
) -> tuple[list[float], list[Tensor]]:
    """Full-batch training of ``cls``'s demo model; the loss before each step and the final params."""
    model = make_model(cls)
    optimizer = make_optimizer(catalog.trained_params(cls, model))
    closure = cls.needs_closure
    losses = [
        catalog.training_step(optimizer, lambda: nn.functional.cross_entropy(model(inputs), targets), closure)
        for _ in range(steps)
    ]
    return losses, [p.detach().clone() for p in model.parameters()]


@dataclass(frozen=True)
class Comparison:
    """One line of the demo: ours beside torch's twin after the same steps, or why it was not run."""

    algorithm: str
    twin: str | None = None
    ours_losses: tuple[float, ...] = ()
    torch_losses: tuple[float, ...] = ()
    max_param_diff: float | None = None
    skipped: str | None = None

    def line(self) -> str:
        if self.skipped:
            return f"{self.algorithm:<12} {self.skipped}"
        return (
            f"{self.algorithm:<12} {self.ours_losses[-1]:>18.6f} {self.torch_losses[-1]:>19.6f} "
            f"{self.max_param_diff:>13.3g}"
        )


HEADER = f"{'algorithm':<12} {'final loss (ours)':>18} {'final loss (torch)':>19} {'max |Δparam|':>13}"


def compare(cls: type[Algorithm], inputs: Tensor, targets: Tensor, steps: int) -> Comparison:
    """Train ``cls`` (``impl="loop"``) and its torch twin (its for-loop) from the same start."""
    name = cls.__name__
    twin = catalog.torch_twin(cls)
    if twin is None:
        return Comparison(name, skipped=NO_TWIN)
    kwargs = dict(cls.example_kwargs)
    ours_kwargs = {**kwargs, "impl": "loop"} if catalog.accepts(cls, "impl") else kwargs
    ours_losses, ours_params = train(
        cls, lambda params: catalog.construct(cls, params, **ours_kwargs), inputs, targets, steps
    )
    torch_losses, torch_params = train(
        cls, lambda params: twin(params, **kwargs, **catalog.torch_loop_flags(twin)), inputs, targets, steps
    )
    diff = max((float((a - b).abs().max()) for a, b in zip(ours_params, torch_params, strict=True)), default=0.0)
    return Comparison(name, twin.__name__, tuple(ours_losses), tuple(torch_losses), diff)


def main(steps: int = 100) -> list[Comparison]:
    """Print one line per registered algorithm; return the comparisons."""
    inputs, targets = digits_data()
    print(HEADER)
    done: list[Comparison] = []
    skipped: list[Comparison] = []
    for cls in ALGORITHMS.values():
        comparison = compare(cls, inputs, targets, steps)
        (skipped if comparison.skipped == NO_TWIN else done).append(comparison)
        if comparison.skipped != NO_TWIN:
            print(comparison.line())
    notes = [(c.algorithm, setup(ALGORITHMS[c.algorithm])) for c in done]
    for name, note in notes:
        if note:
            print(f"  {name}: {note}")
    if skipped:
        print(f"no torch.optim twin, so not shown: {', '.join(c.algorithm for c in skipped)}")
    return done + skipped
