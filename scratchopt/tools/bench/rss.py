"""Resident memory of the training loop, column beside column, each in a fresh process.

The allocator's events (:mod:`~scratchopt.tools.bench.memory`) count the tensors a step allocates, but
not what an optimizer holds outside torch's allocator, nor pages the allocator keeps. So each column
also trains in a child process of its own: the model is built and one backward pass run, the kernel's
peak-RSS mark is reset (``/proc/self/clear_refs``), and after a few train steps the growth of the peak
over the RSS at the reset is what the optimizer's steps added to the process — its state, its scratch
memory, its caches and compiled code — in the same loop for both columns. Linux only; elsewhere (or if
the mark cannot be reset) the measurement says so.
"""

from __future__ import annotations

import os
import statistics
import sys
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from scratchopt.tools.bench.cold_start import json_from_child
from scratchopt.tools.bench.columns import DEFAULT_MODE, MODES, algorithm_rows, build_optimizer
from scratchopt.tools.bench.memory import state_bytes_per_param
from scratchopt.tools.presets import preset as named_preset
from scratchopt.tools.workloads import make_workload

#: The model of the extra-memory goal: 100M parameters in 1600 layers (1600 × Linear(250, 250)).
WIDE = "100M: 1600 × Linear(250, 250)"
CHILD_TIMEOUT_S = 600.0
#: Fresh processes per column on the 100M model, whose median the goal compares.
REPEATS = 3


def _status_kB(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def measure_here(workload: str, preset: str, mlp_layers: int, label: str, column: str, steps: int = 3) -> dict:
    """In this (fresh) process: MB the peak RSS grew by over ``steps`` train steps of ``column``, and
    the optimizer's state in MB."""
    rows, _ = algorithm_rows()
    if workload == WIDE:
        model: nn.Module = nn.Sequential(*[nn.Linear(250, 250) for _ in range(1600)])
        batches: list[tuple[torch.Tensor, ...]] = [(torch.randn(8, 250),)]

        def loss(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            return model(*batch).square().mean()

    else:
        built = make_workload(workload, replace(named_preset(preset), mlp_layers=mlp_layers), torch.device("cpu"))
        model, batches = built.model, built.batches

        def loss(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            return model(*batch)

    optimizer = build_optimizer(column, rows[label], model)
    set_to_none = MODES[DEFAULT_MODE].set_to_none
    optimizer.zero_grad(set_to_none=set_to_none)
    loss(batches[0]).backward()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak-RSS mark to the current RSS
    base = _status_kB("VmRSS")
    for step in range(steps):
        optimizer.zero_grad(set_to_none=set_to_none)
        loss(batches[step % len(batches)]).backward()
        optimizer.step()
    numel = sum(p.numel() for p in model.parameters())
    return {
        "peak_growth_MB": (_status_kB("VmHWM") - base) / 1e3,
        "state_MB": state_bytes_per_param(optimizer) * numel / 1e6,
    }


_SCRIPT = """
import json, torch
torch.set_num_threads({threads})
from scratchopt.tools.bench.rss import measure_here
print(json.dumps(measure_here({workload!r}, {preset!r}, {layers}, {label!r}, {column!r})))
"""


def measure(workload: str, preset: str, mlp_layers: int, label: str, column: str, threads: int) -> dict[str, Any]:
    """:func:`measure_here` in a child process, or ``{"error": why}``."""
    if not sys.platform.startswith("linux"):
        return {"error": "peak RSS is read from /proc (Linux only)"}
    script = _SCRIPT.format(
        threads=threads, workload=workload, preset=preset, layers=mlp_layers, label=label, column=column
    )
    # The native runtime is awaited so that its build (in a child of the child) is not counted.
    measured, why = json_from_child(script, {**os.environ, "SCRATCHOPT_RUNTIME": "wait"}, CHILD_TIMEOUT_S)
    if why is None and not isinstance(measured, dict):
        why = f"child printed {measured!r}"
    return {"error": why} if why is not None else dict(measured)


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One measurement from several of the same column: the median peak growth, with every run's
    (``peak_growth_MB_runs``); the first error where a run failed."""
    failed = [run for run in runs if "error" in run]
    if failed or not runs:
        return failed[0] if failed else {"error": "not measured"}
    return {
        "peak_growth_MB": statistics.median(run["peak_growth_MB"] for run in runs),
        "peak_growth_MB_runs": [run["peak_growth_MB"] for run in runs],
        "state_MB": runs[0]["state_MB"],
    }
