"""What the tools read about each registered algorithm, in one place.

The demo, the benchmark, the report and the memory plan list no algorithms of their own: they iterate
over :data:`scratchopt.algorithms.ALGORITHMS` and read each class's declarations
(:class:`scratchopt.optimizer.Algorithm`): its ``torch_twin``, whether it ``needs_closure``, what it
``takes`` and its ``example_kwargs``. This module turns those declarations into what a tool needs: the
twin class, the params to hand it, a training step with or without a closure, and a sentence saying why
a tool cannot run an algorithm, so that every algorithm a tool leaves out is named, never dropped.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from scratchopt.algorithms import ALGORITHMS
from scratchopt.optimizer import Algorithm


def algorithm(name: str) -> type[Algorithm]:
    """The registered class called ``name``; a KeyError naming the choices otherwise."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise KeyError(f"no algorithm {name!r} is registered (registered: {', '.join(ALGORITHMS)})") from None


def torch_twin(cls: type[Algorithm]) -> type[torch.optim.Optimizer] | None:
    """The ``torch.optim`` class ``cls`` reproduces, or None (none declared, or not in this torch)."""
    name = cls.torch_twin
    return getattr(torch.optim, name, None) if name else None


def construct(cls: type[Algorithm], params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """``cls(params, **kwargs)``. The registry types its classes as :class:`Algorithm`, whose constructor
    is torch's base class's ``(params, defaults)``; each algorithm's own takes its arguments by name."""
    factory: Callable[..., torch.optim.Optimizer] = cls
    return factory(params, **kwargs)


def step_with_closure(optimizer: torch.optim.Optimizer, closure: Callable[[], Any]) -> Any:
    """``optimizer.step(closure)``; what the closure returns (the loss tensor, as torch's closures return
    it) is typed Any here because torch's stubs type it as a float."""
    return optimizer.step(closure)


def accepts(cls: type[torch.optim.Optimizer], argument: str) -> bool:
    """``cls(...)`` has a parameter called ``argument``."""
    return argument in inspect.signature(cls).parameters


def torch_loop_flags(twin: type[torch.optim.Optimizer]) -> dict[str, Any]:
    """The flags that select torch's for-loop (``foreach=False``), for a class that has the flag; torch's
    classes without it (LBFGS, SparseAdam, Muon) have only the one implementation."""
    return {"foreach": False} if accepts(twin, "foreach") else {}


def trained_params(cls: type[Algorithm], model: nn.Module) -> list[nn.Parameter]:
    """The params of ``model`` that ``cls`` can train: every one, or the weight matrices for an algorithm
    that takes matrices only (Muon; the biases and norms are then left as they are)."""
    if cls.takes == "matrices":
        return [p for p in model.parameters() if p.dim() == 2]
    return list(model.parameters())


def training_step(optimizer: torch.optim.Optimizer, compute_loss: Callable[[], Tensor], closure: bool) -> float:
    """One step of the usual loop on ``compute_loss()``; the loss before the step.

    With ``closure`` the step gets one that zeroes the gradients, computes the loss, calls ``backward()``
    and returns the loss (what torch's LBFGS expects), and the loss it returns is reported; otherwise the
    gradients are zeroed and computed first and ``step()`` is called bare.
    """

    def evaluate() -> Tensor:
        optimizer.zero_grad()
        loss = compute_loss()
        loss.backward()
        return loss

    if closure:
        return _number(step_with_closure(optimizer, evaluate))
    loss = evaluate()
    optimizer.step()
    return _number(loss)


def evaluation_mode(optimizer: torch.optim.Optimizer) -> None:
    """Call ``optimizer.eval()`` where the optimizer has one: Schedule-Free's params hold the point the
    gradients are taken at while training, and its averaged iterate, the one to evaluate, after it."""
    switch = getattr(optimizer, "eval", None)
    if callable(switch):
        switch()


def _number(loss: Any) -> float:
    return float(loss.detach()) if isinstance(loss, Tensor) else float(loss)


def loop_cannot_run(cls: type[Algorithm]) -> str | None:
    """Why a plain ``opt.step()`` loop over every param of a dense model cannot run ``cls``; None if it can."""
    if cls.needs_closure:
        return "its step needs a closure that re-evaluates the loss"
    if cls.takes == "matrices":
        return "it takes weight matrices only"
    if cls.takes == "sparse gradients":
        return "it takes sparse gradients only"
    return None
