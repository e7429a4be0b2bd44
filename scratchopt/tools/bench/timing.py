"""One column's training loop, timed: its own deep copy of the model, its optimizer, its steps.

What is timed is the loop people run::

    opt.zero_grad()                        # set_to_none=True, torch's default; or set_to_none=False
    loss = model(batch); loss.backward()   # or 4 micro-batches, each (loss / 4).backward()
    opt.step()                             # time.perf_counter() around this call alone

and, around all of it, the whole train step. On CUDA every timestamp is taken after
``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import Tensor

from scratchopt.tools.bench.columns import AlgorithmRow, Mode, build_optimizer
from scratchopt.tools.workloads import Workload


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What to call before reading the clock: wait for the device's queued work (nothing on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class Runner:
    """One column's training loop on its own deep copy of the workload's model."""

    def __init__(self, column: str, row: AlgorithmRow, workload: Workload, mode: Mode, device: torch.device) -> None:
        self.column = column
        self.model = copy.deepcopy(workload.model)
        self.optimizer = build_optimizer(column, row, self.model)
        self.batches = workload.batches
        self.mode = mode
        self.sync = synchronizer(device)
        self.steps_taken = 0
        self.step_s: list[float] = []
        self.train_s: list[float] = []

    def forward_backward(self) -> None:
        self.optimizer.zero_grad(set_to_none=self.mode.set_to_none)
        micro = self.mode.micro_batches
        for index in range(micro):
            batch = self.batches[(self.steps_taken * micro + index) % len(self.batches)]
            loss = self.model(*batch)
            (loss / micro if micro > 1 else loss).backward()

    def train_step(self) -> tuple[float, float]:
        """One zero_grad, forward, backward, step: (seconds of ``opt.step()``, seconds of all of it)."""
        self.sync()
        start = time.perf_counter()
        self.forward_backward()
        self.sync()
        before_step = time.perf_counter()
        self.optimizer.step()
        self.sync()
        end = time.perf_counter()
        self.steps_taken += 1
        return end - before_step, end - start

    def timed_steps(self, count: int) -> None:
        for _ in range(count):
            step, train = self.train_step()
            self.step_s.append(step)
            self.train_s.append(train)

    def parameters(self) -> list[Tensor]:
        return [p.detach() for p in self.model.parameters()]
