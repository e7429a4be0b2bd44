"""scratchopt: deep-learning optimizers written from scratch on PyTorch, proven equal to torch.optim.

Every optimizer is a drop-in :class:`torch.optim.Optimizer` with torch's signature, defaults, state keys
and errors, plus ``impl=`` to choose how its one ``update`` is executed.
"""

from scratchopt.adadelta import Adadelta
from scratchopt.adagrad import Adagrad
from scratchopt.adam import Adam
from scratchopt.adamax import Adamax
from scratchopt.adamw import AdamW
from scratchopt.nadam import NAdam
from scratchopt.nesterov_lookahead import NesterovLookahead
from scratchopt.newton import Newton
from scratchopt.radam import RAdam
from scratchopt.rmsprop import RMSprop
from scratchopt.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "NesterovLookahead", "Newton", "Adamax", "NAdam", "RAdam"]
