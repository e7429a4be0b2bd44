"""A short side-by-side run: a small MLP on scikit-learn's digits, scratchopt vs torch.optim."""

from __future__ import annotations

import torch
from torch import nn

import scratchopt


def digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The 8×8 digits that ship inside scikit-learn (no download), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    return inputs, torch.tensor(digits.target, dtype=torch.long)


def train(make_optimizer, inputs: torch.Tensor, targets: torch.Tensor, steps: int, seed: int = 0) -> tuple[list[float], list[torch.Tensor]]:
    """Full-batch training of a 64-32-10 MLP from a fixed seed; returns the losses and final params."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    optimizer = make_optimizer(model.parameters())
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


def main(steps: int = 100) -> None:
    inputs, targets = digits_data()
    print(f"{'algorithm':<10} {'final loss (ours)':>18} {'final loss (torch)':>19} {'max |Δparam|':>13}")
    for name in scratchopt.__all__:
        if not hasattr(torch.optim, name):
            continue
        ours_losses, ours_params = train(lambda p: getattr(scratchopt, name)(p), inputs, targets, steps)
        torch_losses, torch_params = train(lambda p: getattr(torch.optim, name)(p, foreach=False), inputs, targets, steps)
        diff = max((a - b).abs().max().item() for a, b in zip(ours_params, torch_params))
        print(f"{name:<10} {ours_losses[-1]:>18.6f} {torch_losses[-1]:>19.6f} {diff:>13.3g}")
