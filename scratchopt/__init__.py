"""scratchopt: deep-learning optimizers written from scratch on PyTorch, proven equal to torch.optim.

Every optimizer is a drop-in :class:`torch.optim.Optimizer` with torch's signature, defaults, state keys
and errors, plus ``impl=`` to choose how its one ``update`` is executed.
"""

from scratchopt._flat import contiguous_parameters
from scratchopt.optimizer import ScratchOptimizer, new_step_counter
from scratchopt.adadelta import Adadelta
from scratchopt.adafactor import Adafactor
from scratchopt.adagrad import Adagrad
from scratchopt.adam import Adam
from scratchopt.adamax import Adamax
from scratchopt.adamw import AdamW
from scratchopt.asgd import ASGD
from scratchopt.lbfgs import LBFGS
from scratchopt.lion import Lion
from scratchopt.muon import Muon
from scratchopt.nadam import NAdam
from scratchopt.nesterov_lookahead import NesterovLookahead
from scratchopt.overlap import step_in_backward
from scratchopt.newton import Newton
from scratchopt.radam import RAdam
from scratchopt.rmsprop import RMSprop
from scratchopt.rprop import Rprop
from scratchopt.sgd import SGD
from scratchopt.sparse_adam import SparseAdam

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "NesterovLookahead", "Newton", "Adamax", "NAdam", "RAdam",
           "ASGD", "Rprop", "LBFGS", "Adafactor", "Muon", "SparseAdam", "Lion", "contiguous_parameters", "step_in_backward",
           "ScratchOptimizer", "new_step_counter"]
