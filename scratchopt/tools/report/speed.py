"""Section 4: how long one optimizer step takes.

First, the real training loop: ``scratchopt bench --preset quick`` (see :mod:`scratchopt.tools.bench`) times
``opt.step()`` and the whole train step (``zero_grad()``, forward, backward, step) for every strategy
beside torch's for-loop, foreach and fused, on four models built in code, with the roofline and the
goals of the fused strategy. The report always runs the quick benchmark, whatever its own preset:
``scratchopt bench`` runs the full one.

Then two synthetic tables (gradients set once, ``optimizer.step()`` alone, medians from
``torch.utils.benchmark``): scratchopt's for-loop path beside torch's for-loop per algorithm, each pair
timed ``speed_rounds`` times in alternating order with the smallest median kept; and the seed's
step-time workload — SGD on a 2000-layer MLP — beside the numbers of the article “Optimizers: math,
implementations and efficiency”. That article ran on a T4 GPU, so only speed-ups are compared, never
seconds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils import benchmark

import scratchopt
from scratchopt.algorithms import ALGORITHMS
from scratchopt.tools import catalog
from scratchopt.tools.presets import PRESETS, Preset
from scratchopt.tools.report import html as h
from scratchopt.tools.report import seed_figures as seeds
from scratchopt.tools.report.plotting import OURS_COLOR, SEED_COLOR, TORCH_COLOR, FigureWriter, new_figure, styled

ANCHOR = "speed"
TITLE = "Speed of one optimizer step"
GRAD_SEED = 0
#: Settings timed per algorithm (its example arguments and torch's defaults; SGD also with momentum, as in
#: section 3).
SGD_SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (("SGD", {}), ("SGD, momentum", {"momentum": 0.9}))
#: The benchmark preset of the real-loop table.
REAL_LOOP_PRESET = "quick"
SEED_WIDTH = 64  # the seed's MLP width is not stated; 64 keeps the step overhead-bound, as on its GPU
#: The seed's rows, each with how to build its counterpart here (None: nothing to time in this path).
SEED_ROWS: dict[str, Callable[[list[Tensor]], torch.optim.Optimizer] | None] = {
    "mySGD": lambda params: scratchopt.SGD(params, lr=1e-3),
    "mySGD + torch.compile": None,
    "mySGD + foreach": None,
    "mySGD + foreach + torch.compile": None,
    "mySGD + (best)": None,
    "torch SGD": lambda params: torch.optim.SGD(params, lr=1e-3),
    "torch SGD with fused": lambda params: torch.optim.SGD(params, lr=1e-3, fused=True),
    "torch SGD with foreach": lambda params: torch.optim.SGD(params, lr=1e-3, foreach=True),
}
SEED_ROW_COUNTERPARTS = {
    "mySGD": 'scratchopt.SGD, impl="loop"',
    "torch SGD": "torch.optim.SGD defaults (on the CPU: the for-loop; on the seed's GPU: foreach)",
    "torch SGD with fused": "torch.optim.SGD(fused=True)",
    "torch SGD with foreach": "torch.optim.SGD(foreach=True)",
}


def mlp_parameters(layers: int, width: int) -> list[Tensor]:
    """The parameters of ``layers`` × Linear(width, width), with fixed random gradients attached."""
    torch.manual_seed(GRAD_SEED)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def copy_parameters(params: list[Tensor]) -> list[Tensor]:
    copies = [p.detach().clone().requires_grad_() for p in params]
    for copy, original in zip(copies, params, strict=True):
        assert original.grad is not None  # mlp_parameters gives every parameter a gradient
        copy.grad = original.grad.clone()
    return copies


def median_step_time(optimizer: torch.optim.Optimizer, min_run_time: float) -> float:
    """Median seconds per ``optimizer.step()`` after a short warm-up (state allocated, caches warm)."""
    for _ in range(3):
        optimizer.step()
    timer = benchmark.Timer(
        stmt="optimizer.step()", globals={"optimizer": optimizer}, num_threads=torch.get_num_threads()
    )
    return timer.blocked_autorange(min_run_time=min_run_time).median


def time_pair(
    make_ours: Callable, make_torch: Callable, params: list[Tensor], min_run_time: float, rounds: int
) -> tuple[float, float]:
    """Step times of two optimizers on copies of ``params``: the smallest median of ``rounds`` rounds,
    alternating which goes first (ours–torch, torch–ours, …) so that neither always runs warmer."""
    ours = make_ours(copy_parameters(params))
    twin = make_torch(copy_parameters(params))
    ours_times: list[float] = []
    twin_times: list[float] = []
    for round_index in range(rounds):
        order = ((ours, ours_times), (twin, twin_times))
        for optimizer, times in order if round_index % 2 == 0 else reversed(order):
            times.append(median_step_time(optimizer, min_run_time))
    return min(ours_times), min(twin_times)


def timed_settings() -> tuple[list[tuple[str, str, dict[str, Any]]], list[dict[str, str]]]:
    """(label, algorithm, arguments) for every registered algorithm with a torch twin that a bare
    ``optimizer.step()`` on dense gradients can run, and the others with why not."""
    settings: list[tuple[str, str, dict[str, Any]]] = []
    left_out: list[dict[str, str]] = []
    for name, cls in ALGORITHMS.items():
        reason = catalog.loop_cannot_run(cls) or (None if catalog.torch_twin(cls) else "it has no torch twin")
        if reason is not None:
            left_out.append({"algorithm": name, "reason": reason})
        elif name == "SGD":
            settings += [(label, name, {**dict(cls.example_kwargs), **kwargs}) for label, kwargs in SGD_SETTINGS]
        else:
            settings.append((name, name, dict(cls.example_kwargs)))
    return settings, left_out


def step_time_table(preset: Preset, bar: Any) -> dict[str, Any]:
    """scratchopt's ``impl="loop"`` against torch's ``foreach=False``, per algorithm."""
    params = mlp_parameters(preset.speed_layers, preset.speed_width)
    settings, left_out = timed_settings()
    rows, failed = [], []
    for label, name, kwargs in bar(settings, desc="step times"):
        cls = ALGORITHMS[name]
        twin = catalog.torch_twin(cls)
        assert twin is not None  # timed_settings keeps only the algorithms with a twin
        try:
            ours, theirs = time_pair(
                functools.partial(catalog.construct, cls, impl="loop", **kwargs),
                functools.partial(twin, **catalog.torch_loop_flags(twin), **kwargs),
                params,
                preset.speed_min_run_time_s,
                preset.speed_rounds,
            )
        except Exception as error:  # one failing algorithm must not sink the section: it is named on the page
            failed.append({"algorithm": label, "error": f"{type(error).__name__}: {error}"})
            continue
        rows.append({"algorithm": label, "ours_ms": ours * 1e3, "torch_ms": theirs * 1e3, "ratio": ours / theirs})
    return {
        "source": "fallback",
        "model": f"{preset.speed_layers} × Linear({preset.speed_width}, {preset.speed_width})",
        "tensors": len(params),
        "parameters": sum(p.numel() for p in params),
        "ours_path": 'impl="loop"',
        "torch_path": "foreach=False",
        "rows": rows,
        "failed": failed,
        "left_out": left_out,
        "torch_threads": torch.get_num_threads(),
    }


def seed_workload(preset: Preset, bar: Any) -> dict[str, Any]:
    """The seed's rows that have a counterpart here, timed on its deep-MLP workload."""
    params = mlp_parameters(preset.speed_seed_layers, SEED_WIDTH)
    optimizers = {row: make(copy_parameters(params)) for row, make in SEED_ROWS.items() if make is not None}
    medians: dict[str, list[float]] = {row: [] for row in optimizers}
    for _ in bar(range(preset.speed_rounds), desc="seed workload"):  # every row once per round, in turn
        for row, optimizer in optimizers.items():
            medians[row].append(median_step_time(optimizer, preset.speed_min_run_time_s))
    times = {row: min(values) for row, values in medians.items()}
    baseline = times["mySGD"]
    rows = []
    for row, seed_seconds, seed_speedup in seeds.SEED_STEP_TIMES:
        measured = times.get(row)
        rows.append(
            {
                "row": row,
                "counterpart": SEED_ROW_COUNTERPARTS.get(row, "not timed: needs a strategy from scratchopt bench"),
                "seed_ms": seed_seconds * 1e3,
                "seed_speedup": seed_speedup,
                "ms": None if measured is None else measured * 1e3,
                "speedup": None if measured is None else baseline / measured,
            }
        )
    return {
        "model": f"{preset.speed_seed_layers} × Linear({SEED_WIDTH}, {SEED_WIDTH})",
        "layers": preset.speed_seed_layers,
        "tensors": len(params),
        "parameters": sum(p.numel() for p in params),
        "rows": rows,
    }


def real_loop_table(figures: FigureWriter) -> dict[str, Any]:
    """``scratchopt bench --preset quick``: opt.step() inside the real training loop, every column."""
    from scratchopt.tools.bench.roofline import roofline_bandwidth
    from scratchopt.tools.bench.run import run_bench
    from scratchopt.tools.bench.table import plot

    results = run_bench(PRESETS[REAL_LOOP_PRESET], memory=False, log=lambda message: None)
    rows = [
        {
            key: row[key]
            for key in (
                "workload",
                "algorithm",
                "mode",
                "step_ms",
                "train_ms",
                "roofline_ms",
                "traffic_B_per_param",
            )
        }
        | {"failed": {column: note for column, note in row["notes"].items() if note.startswith("failed")}}
        for row in results["rows"]
    ]
    relative = "figures/speed_real_loop.png"
    figure = relative if plot(results, str(figures.out_dir / relative)) else None
    if figure:
        figures.saved.append(relative)
    return {
        "columns": results["meta"]["columns"],
        "modes": results["meta"]["modes"],
        "workloads": results["workloads"],
        "rows": rows,
        "figure": figure,
        "bandwidth_GBps": roofline_bandwidth(results["bandwidth"]),
        "seconds": results["meta"]["seconds"],
        "targets": [
            {"target": t["target"], "where": t["where"], "verdict": t["verdict"], "met": bool(t["met"])}
            for t in results["targets"]
        ],
    }


def run(preset: Preset, figures: FigureWriter, bar: Any) -> dict[str, Any]:
    real_loop = real_loop_table(figures)
    table = step_time_table(preset, bar)
    workload = seed_workload(preset, bar)
    comparisons = []
    for row in workload["rows"]:
        if row["speedup"] is None or row["row"] == "mySGD":
            continue
        note = (
            f"{row['ms']:.3g} ms per step here ({workload['layers']:,} layers, CPU) vs {row['seed_ms']:.3g} ms "
            "on the seed's T4 GPU"
        )
        if workload["layers"] != 2000:
            note += f"; this preset uses {workload['layers']:,} layers, the seed 2000"
        comparisons.append(
            seeds.compare_value(
                f"speed.{row['row']}",
                seeds.SEED_STEP_TIME_SOURCE,
                f"{row['row']}: speed-up over mySGD",
                row["seed_speedup"],
                f"{row['seed_speedup']:.2f}x",
                seeds.Rule(
                    "factor", tolerance=seeds.SPEEDUP_FACTOR, why="different hardware, so times are not compared"
                ),
                row["speedup"],
                note,
            )
        )
    figure_paths = {"seed_workload": figures.save(plot_seed_workload(workload), "speed_seed_workload")}
    if table["rows"]:
        figure_paths["step_times"] = figures.save(plot_step_times(table), "speed_step_times")
    if real_loop["figure"]:
        figure_paths["real_loop"] = real_loop["figure"]
    return {
        "real_loop": real_loop,
        "step_times": table,
        "seed_workload": workload,
        "figures": figure_paths,
        "seed_comparisons": comparisons,
    }


@styled
def plot_step_times(table: dict[str, Any]) -> Figure:
    rows = table["rows"]
    figure, axes = new_figure(9, 0.42 * len(rows) + 1.6)
    positions = np.arange(len(rows))
    axes.barh(
        positions - 0.2,
        [row["ours_ms"] for row in rows],
        height=0.4,
        color=OURS_COLOR,
        label=f"scratchopt, {table['ours_path']}",
    )
    axes.barh(
        positions + 0.2,
        [row["torch_ms"] for row in rows],
        height=0.4,
        color=TORCH_COLOR,
        alpha=0.75,
        label=f"torch.optim, {table['torch_path']}",
    )
    axes.set_yticks(positions, [row["algorithm"] for row in rows])
    axes.invert_yaxis()
    axes.set_xlabel("median time per step (ms)")
    axes.set_title(f"One step on {table['model']} ({table['parameters']:,} parameters)")
    axes.legend(loc="lower right")
    axes.grid(axis="y", visible=False)
    return figure


@styled
def plot_seed_workload(workload: dict[str, Any]) -> Figure:
    rows = [row for row in workload["rows"] if row["speedup"] is not None]
    figure, axes = new_figure(9, 0.55 * len(rows) + 1.8)
    positions = np.arange(len(rows))
    axes.barh(
        positions - 0.2,
        [row["seed_speedup"] for row in rows],
        height=0.4,
        color=SEED_COLOR,
        alpha=0.8,
        label="the optimizers article (T4 GPU)",
    )
    axes.barh(
        positions + 0.2, [row["speedup"] for row in rows], height=0.4, color=OURS_COLOR, label="measured here (CPU)"
    )
    axes.set_yticks(positions, [row["row"] for row in rows])
    axes.invert_yaxis()
    axes.axvline(1.0, color="#555555", linewidth=1)
    axes.set_xlabel("speed-up over mySGD (×)")
    axes.set_title(f"SGD on {workload['model']}")
    axes.legend(loc="lower right")
    axes.grid(axis="y", visible=False)
    return figure


def _step_and_train(row: dict[str, Any], column: str) -> str:
    step = row["step_ms"].get(column)
    if step is None:
        return "failed" if column in row["failed"] else "—"
    return f"{h.fixed(step, 3)} / {h.fixed(row['train_ms'][column], 1)}"


def render_real_loop(real_loop: dict[str, Any]) -> str:
    """The quick bench's real-loop table, one per workload, then its figure and targets."""
    columns = real_loop["columns"]
    parts = [
        "<h3>The optimizer step inside the training loop (scratchopt bench --preset quick)</h3>"
        f"<p>The table {h.code('scratchopt bench --preset quick')} prints. Every column trains its own copy of the "
        f"same model on the same seeded batches: {h.code('opt.zero_grad()')} (torch's default, "
        f"{h.code('set_to_none=True')}), forward, backward, {h.code('opt.step()')}. Each cell is the median "
        f"{h.code('opt.step()')} time / the median whole train step, in ms, from interleaved rounds in one "
        "process; the first step (where the fused strategies compile) is left out. The roofline is the bytes the "
        "step must move — read p, g and every state tensor, write p and every state tensor — divided by the "
        "bandwidth of that access pattern without arithmetic, measured in the same run "
        f"({h.fixed(real_loop['bandwidth_GBps'], 1)} GB/s); a model whose tensors partly stay in the cache "
        "between backward and step can beat it. The quick preset shrinks the models (a 200-layer MLP "
        f"instead of the seed's 2000, a smaller GPT, a 4M-element tensor); {h.code('scratchopt bench')} runs the "
        "full sizes, the other training loops and the first fused step in fresh processes.</p>",
    ]
    for name, info in real_loop["workloads"].items():
        rows = [r for r in real_loop["rows"] if r["workload"] == name]
        parts.append(
            f"<p><b>{h.esc(name)}</b>: {h.esc(info['description'])} ({info['tensors']:,} tensors, "
            f"{info['numel']:,} parameters)</p>"
        )
        body = []
        for r in rows:
            fused, torch_fused = r["step_ms"].get("ours fused"), r["step_ms"].get("torch fused")
            body.append(
                [
                    h.esc(r["algorithm"]),
                    *(_step_and_train(r, c) for c in columns),
                    h.fixed(r["roofline_ms"], 3),
                    h.fixed(torch_fused / fused, 2) + "×" if fused and torch_fused else "—",
                    h.fixed(fused / r["roofline_ms"], 2) + "×" if fused and r["roofline_ms"] else "—",
                ]
            )
        parts.append(
            h.table(
                ["algorithm", *columns, "roofline (ms)", "torch fused ÷ ours fused", "ours fused ÷ roofline"],
                body,
                numeric=tuple(range(1, len(columns) + 4)),
            )
        )
    failures = sorted(
        {(r["workload"], column, note) for r in real_loop["rows"] for column, note in r["failed"].items()}
    )
    for workload, column, note in failures:
        parts.append(h.note(f"{h.esc(workload)}, {h.code(column)}: {h.esc(note)}", "warn"))
    if real_loop["figure"]:
        parts.append(
            h.figure(
                real_loop["figure"],
                "Median opt.step() inside the training loop, every column; the "
                "dashed line is the roofline (scratchopt bench --preset quick).",
            )
        )
    parts.append(
        "<p>The goals of the fused strategy, checked on these quick-preset models (the full-size ones are in "
        f"{h.code('scratchopt bench')}); nothing is tuned toward them:</p>"
        + h.table(
            ["where", "measured, and the goal"],
            [[h.esc(t["where"]), h.status(t["met"], t["verdict"], t["verdict"])] for t in real_loop["targets"]],
        )
    )
    return "".join(parts)


def render(results: dict[str, Any]) -> str:
    table = results["step_times"]
    workload = results["seed_workload"]
    parts = [render_real_loop(results["real_loop"])]
    parts.append("<h3>Synthetic (grads set once): the for-loop path beside torch's for-loop</h3>")
    parts.append(
        f"<p>Median time of {h.code('optimizer.step()')} alone, measured with {h.code('torch.utils.benchmark')} on "
        f"{h.esc(table['model'])} ({table['tensors']:,} tensors, {table['parameters']:,} parameters, torch "
        f"intra-op threads: {table['torch_threads']}), on gradients set once and never recomputed. scratchopt runs "
        f"{h.code(table['ours_path'])}, torch its for-loop ({h.code(table['torch_path'])}), which is torch's "
        "default on the CPU. Timings on a shared machine are noisy: ratios hold better than times.</p>"
    )
    for item in table["failed"]:
        parts.append(h.note(f"{h.code(item['algorithm'])} could not be timed: {h.esc(item['error'])}", "warn"))
    parts.append(
        h.table(
            ["algorithm", "scratchopt (ms)", "torch (ms)", "scratchopt ÷ torch"],
            [
                [
                    h.esc(row["algorithm"]),
                    h.fixed(row["ours_ms"], 3),
                    h.fixed(row["torch_ms"], 3),
                    h.fixed(row["ratio"], 2),
                ]
                for row in table["rows"]
            ],
            numeric=(1, 2, 3),
        )
    )
    if "step_times" in results["figures"]:
        parts.append(h.figure(results["figures"]["step_times"], "Median step time per algorithm, ours beside torch's."))
    parts.append("<h3>Synthetic (grads set once): the seed's step-time table</h3>")
    parts.append(
        f"<p>The seed article {h.esc(seeds.OPTIMIZERS_ARTICLE)} times SGD on a 2000-layer MLP on a T4 GPU. Here the same optimizers step "
        f"{h.esc(workload['model'])} ({workload['tensors']:,} tensors, {workload['parameters']:,} parameters) on this "
        "CPU. Only speed-ups over the from-scratch per-tensor loop (the seed's “mySGD”) are compared; rows that need "
        "scratchopt's faster strategies are left for the benchmark.</p>"
    )
    parts.append(
        h.table(
            ["seed's row", "measured here with", "seed (ms, T4)", "seed speed-up", "here (ms, CPU)", "here speed-up"],
            [
                [
                    h.esc(row["row"]),
                    f'<span class="sub">{h.esc(row["counterpart"])}</span>',
                    h.fixed(row["seed_ms"], 3),
                    h.fixed(row["seed_speedup"], 2) + "×",
                    h.fixed(row["ms"], 3),
                    (h.fixed(row["speedup"], 2) + "×") if row["speedup"] is not None else "—",
                ]
                for row in workload["rows"]
            ],
            numeric=(2, 3, 4, 5),
        )
    )
    parts.append(
        h.figure(results["figures"]["seed_workload"], "Speed-ups over mySGD: the seed's (GPU) beside ours (CPU).")
    )
    if results["seed_comparisons"]:
        parts.append(h.comparison_table(results["seed_comparisons"]))
    return "".join(parts)
