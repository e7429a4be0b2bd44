"""scratchopt: deep-learning optimizers written from scratch on PyTorch, proven equal to torch.optim.

Every optimizer is a drop-in :class:`torch.optim.Optimizer` with torch's signature, defaults, state keys
and errors, plus ``impl=`` to choose how its one ``update`` is executed.
"""

from scratchopt.adam import Adam
from scratchopt.adamw import AdamW
from scratchopt.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW"]
