"""scratchopt: deep-learning optimizers written from scratch on PyTorch, proven equal to torch.optim.

Every optimizer is a drop-in :class:`torch.optim.Optimizer` with torch's signature, defaults, state keys
and errors, plus ``impl=`` to choose how its one ``update`` is executed. The algorithms live in
:mod:`scratchopt.algorithms` (one module each) and are all exported here; the strategies live in
:mod:`scratchopt.strategies`; ``docs/design.md`` describes how the two meet.
"""

from typing import Any

from scratchopt.algorithms import ALGORITHMS
from scratchopt.distributed import step_in_backward
from scratchopt.factory import create
from scratchopt.optimizer import Algorithm, ClosureOptimizer, ScratchOptimizer, new_step_counter

globals().update(ALGORITHMS)

__version__ = "0.1.0"
__all__ = [
    *ALGORITHMS,
    "Algorithm",
    "ClosureOptimizer",
    "ScratchOptimizer",
    "create",
    "new_step_counter",
    "step_in_backward",
]


def __getattr__(name: str) -> Any:
    # The algorithms are set above from the registry; this hook only tells type checkers that the
    # module has attributes they cannot see (``scratchopt.AdamW``), and raises for any other name.
    raise AttributeError(f"module 'scratchopt' has no attribute {name!r}")
