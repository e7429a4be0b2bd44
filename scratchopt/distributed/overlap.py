"""Step each parameter during the backward pass, as soon as its gradient is ready, and free that gradient.

An ordinary training step holds every parameter's gradient at once: backward writes them all, then the
optimizer reads them all. For a model whose gradients are as large as its parameters that is a whole
model's worth of memory at the peak, the one thing the seeds' memory table shows the optimizer adding
besides its state. Autograd finishes with a parameter's gradient as soon as that parameter's
``AccumulateGrad`` node has run (every use of the parameter in the backward pass is behind it), so the
parameter can be updated right then and its gradient dropped: at most a few gradients are alive at any
moment instead of all of them.

:func:`step_in_backward` does that with ``Tensor.register_post_accumulate_grad_hook``, giving every
parameter its own optimizer, built by a factory (any scratchopt or ``torch.optim`` class), because an
optimizer steps all of its parameters at once::

    stepper = scratchopt.step_in_backward(model, lambda params: scratchopt.AdamW(params, lr=1e-3))
    for inputs, targets in data:
        loss_fn(model(inputs), targets).backward()  # every parameter is updated here; no .grad is left
    stepper.remove()  # the model trains normally again

What changes compared with ``optimizer.step()`` after backward:

* no ``optimizer.step()`` and no ``zero_grad()``: the hooks step, then set ``p.grad = None``;
* one backward per step: gradient accumulation over micro-batches, and anything that needs all
  gradients at once (clipping by the global norm, skipping a step on an inf) cannot work — the first
  parameters are already updated when the last gradients are computed;
* a learning-rate scheduler per optimizer: ``[LambdaLR(o, f) for o in stepper.optimizers]``, stepped
  together (a scheduler takes one optimizer);
* checkpoints: :meth:`StepInBackward.state_dict` holds one optimizer state_dict per parameter, in the
  order of the parameters; :meth:`StepInBackward.load_state_dict` takes one back.

The results equal an optimizer stepping all parameters after backward whenever the update of one
parameter depends only on its own gradient and state, as in every scratchopt algorithm but LBFGS (whose
direction uses all parameters' history, and whose step needs a closure) and the ones that reduce over all
parameters (Prodigy's step size, Adan's ``max_grad_norm``, LAMB's ``pre_norm``: stepped one parameter at
a time, each sees its own sum): each parameter sees the same gradient and the same state. tests/test_overlap.py checks it step by step.

Under FSDP2 it works as it does on one process: FSDP2 runs the post-accumulate-grad hooks of its sharded
parameters once their gradients are reduce-scattered, so each rank steps its shards with the averaged
gradient (tests/test_distributed.py checks it against torch.optim). Under DDP it cannot: the hook runs
when the local gradient is accumulated, before DDP's all-reduce averages it across ranks, so a
``DistributedDataParallel`` module is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

#: Builds the optimizer of one parameter from a one-element list of it.
OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]


class StepInBackward:
    """The per-parameter optimizers :func:`step_in_backward` made, and the hooks that step them."""

    def __init__(self, params: list[Tensor], make_optimizer: OptimizerFactory) -> None:
        self.params = params
        self.optimizers: list[torch.optim.Optimizer] = [make_optimizer([p]) for p in params]
        self._handles: list[RemovableHandle] = [
            p.register_post_accumulate_grad_hook(self._stepper(optimizer))
            for p, optimizer in zip(params, self.optimizers)
        ]

    @staticmethod
    def _stepper(optimizer: torch.optim.Optimizer) -> Callable[[Tensor], None]:
        def step_and_free(param: Tensor) -> None:
            optimizer.step()
            param.grad = None

        return step_and_free

    @property
    def active(self) -> bool:
        """True until :meth:`remove`."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove the hooks: backward leaves gradients in ``.grad`` again and nothing is stepped."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> StepInBackward:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def state_dict(self) -> dict[str, Any]:
        """One state_dict per parameter's optimizer, in the order of the parameters."""
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned (for the same parameters, in the same order)."""
        saved = state_dict["optimizers"]
        if len(saved) != len(self.optimizers):
            raise ValueError(f"the state_dict holds {len(saved)} optimizers; this has {len(self.optimizers)}")
        for optimizer, optimizer_state in zip(self.optimizers, saved):
            optimizer.load_state_dict(optimizer_state)


def step_in_backward(params: nn.Module | Iterable[Tensor], make_optimizer: OptimizerFactory) -> StepInBackward:
    """Update each parameter during backward, as soon as its gradient is accumulated, then free the gradient.

    ``params`` is a module (its parameters that require a gradient) or the parameters themselves;
    ``make_optimizer`` builds one parameter's optimizer from ``[param]``, e.g.
    ``lambda params: scratchopt.AdamW(params, lr=1e-3, impl="fused")`` or
    ``functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)``. See the module's documentation for
    schedulers, checkpoints and what cannot be combined with it.
    """
    if isinstance(params, DistributedDataParallel):
        raise ValueError(
            "step_in_backward cannot step under DistributedDataParallel: its hooks would see each "
            "rank's own gradient before DDP averages it; use FSDP2 (fully_shard) or step after backward"
        )
    candidates = params.parameters() if isinstance(params, nn.Module) else params
    unique: dict[int, Tensor] = {}
    for param in candidates:
        if param.requires_grad:
            unique.setdefault(id(param), param)
    return StepInBackward(list(unique.values()), make_optimizer)
