"""The benchmark's run: every (workload, algorithm, mode) row, its columns interleaved, and the results.

Each column first takes one step, timed on its own and reported as "first step (compile)" (the fused
strategies compile on it), then ``warmup_steps`` untimed steps; then ``rounds`` rounds, each running
every column's loop for ``steps_per_round`` steps in turn (the order rotates every round), and the median
per column is reported. After the timing: the largest difference of each column's parameters from
torch's for-loop after the same steps (zero for the bit-exact strategies), the roofline, the state
bytes per parameter and the peak extra memory of one ``opt.step()``. A column that cannot be built (torch
has no fused kernel for an algorithm) or that fails is noted in its row; the others carry on.
"""

from __future__ import annotations

import gc
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from scratchopt.tools.bench import cold_start, memory, roofline, rss
from scratchopt.tools.bench.columns import (
    COLUMNS,
    MODES,
    OURS_8BIT_STATE,
    OURS_BF16_STATE,
    OURS_COMPILED,
    OURS_FUSED,
    REFERENCE_COLUMN,
    TORCH_FUSED,
    AlgorithmRow,
    Mode,
    algorithm_rows,
    preset_columns,
)
from scratchopt.tools.bench.targets import targets
from scratchopt.tools.bench.timing import Runner
from scratchopt.tools.presets import Preset
from scratchopt.tools.presets import preset as named_preset
from scratchopt.tools.workloads import WORKLOAD_NAMES, Workload, make_workload, model_size


@dataclass
class Row:
    """One (workload, algorithm, mode): every column's medians and what the step must move."""

    workload: str
    algorithm: str
    mode: str
    numel: int
    tensors: int
    step_ms: dict[str, float] = field(default_factory=dict)
    train_ms: dict[str, float] = field(default_factory=dict)
    first_step_ms: dict[str, float] = field(default_factory=dict)
    peak_extra_MB: dict[str, float | None] = field(default_factory=dict)
    state_B_per_param: dict[str, float] = field(default_factory=dict)
    max_abs_diff_vs_torch_loop: dict[str, float] = field(default_factory=dict)
    #: Why a column has no time (not applicable, skipped, or failed).
    notes: dict[str, str] = field(default_factory=dict)
    #: Train steps every column had taken when the parameters were compared.
    steps_compared: int = 0
    traffic_B_per_param: float = 0.0
    roofline_ms: float = 0.0
    #: Wall-clock seconds the whole row took (building, every loop, memory, parity).
    seconds: float = 0.0

    def ratio(self, numerator: str, denominator: str) -> float | None:
        """``step_ms[numerator] / step_ms[denominator]`` where both were timed."""
        top, bottom = self.step_ms.get(numerator), self.step_ms.get(denominator)
        return top / bottom if top and bottom else None


def _failure(error: BaseException) -> str:
    return f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:160]


def max_abs_difference(params: list[Tensor], reference: list[Tensor]) -> float:
    return max(
        (float((p.double() - r.double()).abs().max()) for p, r in zip(params, reference, strict=True) if p.numel()),
        default=0.0,
    )


def _build_runners(
    row: Row,
    columns: list[str],
    algorithm: AlgorithmRow,
    workload: Workload,
    mode: Mode,
    device: torch.device,
    compile_max_tensors: int,
) -> list[Runner]:
    runners = []
    for column in columns:
        if column == OURS_COMPILED and workload.tensors > compile_max_tensors:
            row.notes[column] = f"skipped: {workload.tensors} tensors > --compile-max-tensors {compile_max_tensors}"
            continue
        try:
            runners.append(Runner(column, algorithm, workload, mode, device))
        except (RuntimeError, TypeError, ValueError) as error:  # e.g. torch has no fused kernel for it
            row.notes[column] = f"n/a: {str(error).splitlines()[0][:100]}"
    return runners


def _run_guarded(runners: list[Runner], row: Row, action: Callable[[Runner], Any]) -> list[Runner]:
    """Run ``action`` on every runner; one that raises is reported in the row and dropped."""
    alive = []
    for runner in runners:
        try:
            action(runner)
        except Exception as error:  # one failing strategy must not sink the other columns
            row.notes[runner.column] = _failure(error)
            continue
        alive.append(runner)
    return alive


def _first_step(runner: Runner, row: Row) -> None:
    step, _ = runner.train_step()
    row.first_step_ms[runner.column] = step * 1e3


def run_row(
    workload: Workload,
    algorithm: AlgorithmRow,
    mode_name: str,
    columns: list[str],
    preset: Preset,
    device: torch.device,
    bandwidth_GBps: float,
    measure_memory: bool,
) -> Row:
    """Every column's loop on ``workload``, interleaved; medians, roofline, memory and parity."""
    started = time.perf_counter()
    mode = MODES[mode_name]
    row = Row(workload.name, algorithm.label, mode_name, workload.numel, workload.tensors)
    runners = _build_runners(row, columns, algorithm, workload, mode, device, preset.compile_max_tensors)
    runners = _run_guarded(runners, row, lambda r: _first_step(r, row))
    runners = _run_guarded(runners, row, lambda r: [r.train_step() for _ in range(preset.warmup_steps)])
    for round_index in range(preset.rounds):
        # Rotating the order every round: no column always runs right after the same neighbour.
        shift = round_index % len(runners) if runners else 0
        order = runners[shift:] + runners[:shift]
        alive = _run_guarded(order, row, lambda r: r.timed_steps(preset.steps_per_round))
        runners = [r for r in runners if r in alive]
    for runner in runners:
        row.step_ms[runner.column] = statistics.median(runner.step_s) * 1e3
        row.train_ms[runner.column] = statistics.median(runner.train_s) * 1e3
        row.state_B_per_param[runner.column] = memory.state_bytes_per_param(runner.optimizer)
    by_column = {r.column: r for r in runners}
    reference = by_column.get(REFERENCE_COLUMN)
    if reference is not None:
        row.steps_compared = reference.steps_taken
        for runner in runners:
            row.max_abs_diff_vs_torch_loop[runner.column] = max_abs_difference(
                runner.parameters(), reference.parameters()
            )
    if runners:
        counted = by_column.get(REFERENCE_COLUMN, runners[0])
        row.traffic_B_per_param = roofline.traffic_bytes_per_param(counted.optimizer)
        row.roofline_ms = roofline.roofline_ms(row.traffic_B_per_param, row.numel, bandwidth_GBps)
    if measure_memory:
        for runner in runners:
            try:
                runner.forward_backward()
                peak = memory.peak_extra_memory(runner.optimizer.step, device)
            except Exception as error:
                row.notes[runner.column] = _failure(error)
                continue
            row.peak_extra_MB[runner.column] = None if peak is None else peak / 1e6
    row.seconds = time.perf_counter() - started
    return row


def modes_for(algorithm: str, workload: str, preset: Preset, modes: list[str] | None) -> list[str]:
    """The loops run for one algorithm on one workload: ``modes`` if given, else the preset's."""
    if modes is not None:
        return modes
    more = [
        mode
        for mode, workloads in preset.more_modes
        if algorithm in preset.more_modes_algorithms and workload in workloads
    ]
    return list(preset.modes) + more


class UnknownChoice(ValueError):
    """A row, column, mode or workload the benchmark does not have."""


def _check_choices(kind: str, given: list[str], choices: Any) -> None:
    unknown = [name for name in given if name not in choices]
    if unknown:
        raise UnknownChoice(f"unknown {kind} {unknown} (choices: {', '.join(choices)})")


#: The row measured first, with empty caches, when it is run: the optimizer most models train with.
COLD_START_FIRST = "AdamW"


def _native_runtime_ready(timeout_s: float = 120.0) -> str:
    """Wait for the fused strategy's native runtime (built once per machine) so that the columns time the
    steady state a training run reaches, and say how it went."""
    from scratchopt.strategies.kernels import runtime

    start = time.perf_counter()
    runtime.get()
    while runtime.state() == "building" and time.perf_counter() - start < timeout_s:
        time.sleep(0.2)
    runtime.get()  # imports a runtime the background build finished
    waited = time.perf_counter() - start
    if runtime.ready() is not None:
        return f"ready (waited {waited:.1f} s)"
    return f"not available ({runtime.state()} after {waited:.0f} s): ours fused builds its tables in Python"


def resident_memory(
    rows: list[Row],
    described: dict[str, dict[str, Any]],
    preset: Preset,
    columns: list[str],
    threads: int,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Peak-RSS growth of torch fused's and ours fused's loops, and the low-precision columns' where they
    run (:mod:`~scratchopt.tools.bench.rss`), each in a fresh process, on every workload of the run and
    (full preset) on 100M parameters; for AdamW, or the first algorithm run."""
    measured_columns = [c for c in (TORCH_FUSED, OURS_FUSED, OURS_BF16_STATE, OURS_8BIT_STATE) if c in columns]
    labels = list(dict.fromkeys(row.algorithm for row in rows))
    if not measured_columns or not labels:
        return []
    label = "AdamW" if "AdamW" in labels else labels[0]
    workloads = list(described) + ([rss.WIDE] if preset.name == "full" else [])
    found = []
    for workload in workloads:
        log(f"peak RSS of the loop, fresh processes: {label} on {workload} …")
        # The goal's model is measured several times, the columns interleaved: one process's peak varies
        # by more than the goal's margin with where the allocator puts the gradients it frees and makes.
        repeats = rss.REPEATS if workload == rss.WIDE else 1
        runs: dict[str, list[dict[str, Any]]] = {column: [] for column in measured_columns}
        for _ in range(repeats):
            for column in measured_columns:
                runs[column].append(rss.measure(workload, preset.name, preset.mlp_layers, label, column, threads))
        for column in measured_columns:
            found.append({"workload": workload, "algorithm": label, "column": column, **rss.median_of(runs[column])})
    return found


def run_bench(
    preset: str | Preset = "full",
    *,
    algorithms: list[str] | None = None,
    workloads: list[str] | None = None,
    columns: list[str] | None = None,
    modes: list[str] | None = None,
    device: str = "cpu",
    threads: int | None = None,
    warmup_compile: bool | None = None,
    memory: bool = True,
    log: Callable[[str], None] = print,
    row_done: Callable[[Row], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return its results (what ``bench.json`` holds).

    ``log`` receives one line per step of progress; ``row_done`` each row as it is finished.
    """
    preset = named_preset(preset) if isinstance(preset, str) else preset
    dev = torch.device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    available, left_out = algorithm_rows()
    wanted = algorithms or list(preset.algorithms) or list(available)
    unknown = [name for name in wanted if name not in available]
    if unknown:
        reasons = "; ".join(f"{name}: {left_out[name]}" for name in unknown if name in left_out)
        raise UnknownChoice(
            f"unknown algorithms {unknown} (choices: {', '.join(available)})"
            + (f"; not benchmarked: {reasons}" if reasons else "")
        )
    chosen = [available[name] for name in wanted]
    columns = list(columns or preset_columns(preset))
    _check_choices("columns", columns, COLUMNS)
    _check_choices("modes", modes or [], MODES)
    _check_choices("workloads", workloads or [], WORKLOAD_NAMES)
    started = time.perf_counter()
    if any(column == OURS_FUSED for column in columns):
        log(f"native runtime of ours fused: {_native_runtime_ready()}")
    bandwidth = roofline.measure_bandwidth(dev)
    stream = f"{bandwidth['stream_GBps']:.1f} GB/s" if bandwidth["stream_GBps"] else "not measured"
    log(
        f"memory bandwidth: {stream} (read 4 arrays, write 3: the roofline's), "
        f"{bandwidth['axpy_GBps']:.1f} GB/s (axpy), {bandwidth['copy_GBps']:.1f} GB/s (copy); "
        f"{threads} threads; device {dev}"
    )
    rows: list[Row] = []
    described: dict[str, dict[str, Any]] = {}
    for name in workloads or list(preset.workloads):
        workload = make_workload(name, preset, dev)
        described[name] = {"description": workload.description, "numel": workload.numel, "tensors": workload.tensors}
        log(f"[{name}] {workload.description}: {model_size(workload.tensors, workload.numel)}")
        for algorithm in chosen:
            for mode_name in modes_for(algorithm.label, name, preset, modes):
                row = run_row(
                    workload, algorithm, mode_name, columns, preset, dev, roofline.roofline_bandwidth(bandwidth), memory
                )
                rows.append(row)
                if row_done is not None:
                    row_done(row)
                gc.collect()
        del workload
        gc.collect()
    warmup: list[dict[str, Any]] = []
    if preset.warmup_compile if warmup_compile is None else warmup_compile:
        log("first fused step in fresh processes (caches starting empty) …")
        # The first fused step of the algorithms that have one (the others run the loop only).
        fused = [row.label for row in chosen if row.cls.elementwise]
        names = sorted(fused, key=lambda label: label != COLD_START_FIRST)
        warmup = cold_start.compile_warmup(names, preset.mlp_layers, dev, threads)
    resident = resident_memory(rows, described, preset, columns, threads, log) if memory and dev.type == "cpu" else []
    results = {
        "meta": {
            "preset": preset.name,
            "device": str(dev),
            "threads": threads,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "seconds": time.perf_counter() - started,
            "columns": columns,
            "rounds": preset.rounds,
            "steps_per_round": preset.steps_per_round,
            "warmup_steps": preset.warmup_steps,
            "modes": {name: MODES[name].label for name in dict.fromkeys(row.mode for row in rows)},
        },
        "bandwidth": bandwidth,
        "workloads": described,
        "rows": [asdict(row) for row in rows],
        "compile_warmup": warmup,
        "resident_memory": resident,
        "left_out": left_out,
        "kwargs": {row.label: {key: repr(value) for key, value in row.kwargs.items()} for row in chosen},
    }
    results["targets"] = targets(rows, described, warmup, resident)
    return results
