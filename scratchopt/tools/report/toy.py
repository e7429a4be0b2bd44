"""Section 1: f(x) = sin(x) + x²/10 minimised by scratchopt's optimizers, as the seed
article “From ZeRO to Hero: Rebuilding FSDP From Scratch” does by hand.

Every run uses a scratchopt optimizer on a one-element tensor: ``SGD`` for gradient descent, momentum
and torch's form of Nesterov, ``NesterovLookahead`` for the lookahead form and ``Newton`` (which needs
``allow_indefinite=True``: f″(−5) < 0). The reference x* is found independently, by bisection on f′ in
float64, and a run has converged once |x − x*| ≤ 1e-6, the seed's tolerance. The seed counts
differently from run to run (see ``SEED_COUNT_CONVENTION``); the comparison with its step counts uses
its own convention, the table of runs counts optimizer steps throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MultipleLocator
from torch import Tensor

from scratchopt.algorithms import ALGORITHMS
from scratchopt.tools import catalog
from scratchopt.tools.presets import Preset
from scratchopt.tools.report import html as h
from scratchopt.tools.report import seed_figures as seeds
from scratchopt.tools.report.plotting import SEED_COLOR, FigureWriter, new_figure, styled

ANCHOR = "toy"
TITLE = "Toy function f(x) = sin(x) + x²/10"
TOLERANCE = 1e-6
#: The seed's ``actual_answer``, a rounded x*; counts are also checked against it.
SEED_REFERENCE = -1.30644
SEED_COUNT_CONVENTION = {
    "iterations": "iterations taken before x is within tolerance (the seed runs 12 and does not count)",
    "steps": "optimizer steps taken before x is within tolerance (the seed prints its loop index i)",
    "evaluations": "points evaluated, the starting point counted as 1 (the seed prints i + 1)",
    "lookahead": "lookahead points θ + μ·v evaluated, the first counted as 1 (the seed prints i + 1 and "
    "tests the lookahead point, not θ)",
}


def f(x: Tensor) -> Tensor:
    return torch.sin(x) + x**2 / 10


def f_prime(x: float) -> float:
    return math.cos(x) + x / 5


def bisect_stationary_point(low: float, high: float) -> float:
    """The root of f′ in [low, high] to float64 precision (f′ must change sign there)."""
    if f_prime(low) * f_prime(high) >= 0:
        raise ValueError(f"f′ does not change sign on [{low}, {high}]")
    while True:
        middle = (low + high) / 2
        if middle in (low, high):
            return middle
        if (f_prime(middle) < 0) == (f_prime(low) < 0):
            low = middle
        else:
            high = middle


def derivatives(x: float, dtype: torch.dtype) -> tuple[float, float, float]:
    """f(x), f′(x) and f″(x) by autograd, in the dtype of the run."""
    point = torch.tensor(x, dtype=dtype, requires_grad=True)
    value = f(point)
    (first,) = torch.autograd.grad(value, point, create_graph=True)
    (second,) = torch.autograd.grad(first, point)
    return value.item(), first.item(), second.item()


@dataclass(frozen=True)
class ToyRun:
    key: str
    method: str
    algorithm: str  # a name in scratchopt.algorithms.ALGORITHMS
    kwargs: dict[str, Any] = field(hash=False)
    start: float
    max_steps: int
    #: "gradient" (backward, then step()), "lookahead" (step(closure) with backward) or "newton"
    #: (step(closure) where the closure only returns the loss).
    kind: str
    seed_convention: str  # a key of SEED_COUNT_CONVENTION
    dtype: torch.dtype = torch.float32
    fixed_steps: bool = False  # run max_steps regardless of convergence (the seed's Newton loop)

    def optimizer_text(self) -> str:
        settings = ", ".join(f"{name}={value}" for name, value in self.kwargs.items())
        return f"scratchopt.{self.algorithm}({settings})"


GD = {"lr": 1.0}
MOMENTUM = {"lr": 0.1, "momentum": 0.9}
NESTEROV = {"lr": 1.0, "momentum": 0.9}
#: The seed's runs, with its settings and step budgets (20 for gradient descent, 1000 otherwise).
RUNS: tuple[ToyRun, ...] = (
    ToyRun("newton", "Newton's method", "Newton", {"lr": 1.0, "allow_indefinite": True}, start=-5.0, max_steps=12,
           kind="newton", seed_convention="iterations", dtype=torch.float64, fixed_steps=True),
    ToyRun("gd_from_-8", "Gradient descent", "SGD", GD, start=-8.0, max_steps=20, kind="gradient",
           seed_convention="steps"),
    ToyRun("gd_from_+8", "Gradient descent", "SGD", GD, start=8.0, max_steps=20, kind="gradient",
           seed_convention="steps"),
    ToyRun("momentum_from_+8", "Momentum", "SGD", MOMENTUM, start=8.0, max_steps=1000, kind="gradient",
           seed_convention="evaluations"),
    ToyRun("momentum_from_-8", "Momentum", "SGD", MOMENTUM, start=-8.0, max_steps=1000, kind="gradient",
           seed_convention="evaluations"),
    ToyRun("lookahead_from_-8", "Nesterov, lookahead form", "NesterovLookahead", NESTEROV, start=-8.0,
           max_steps=1000, kind="lookahead", seed_convention="lookahead"),
    ToyRun("lookahead_from_+8", "Nesterov, lookahead form", "NesterovLookahead", NESTEROV, start=8.0,
           max_steps=1000, kind="lookahead", seed_convention="lookahead"),
    ToyRun("torch_nesterov_from_-8", "Nesterov, torch's form", "SGD", {**NESTEROV, "nesterov": True}, start=-8.0,
           max_steps=1000, kind="gradient", seed_convention="evaluations"),
    ToyRun("torch_nesterov_from_+8", "Nesterov, torch's form", "SGD", {**NESTEROV, "nesterov": True}, start=8.0,
           max_steps=1000, kind="gradient", seed_convention="evaluations"),
)  # fmt: skip

NOT_CONVERGED = "did not converge"
OSCILLATION_WINDOW = 50  # the seed plots the first 50 momentum iterates


def signed(value: float) -> str:
    """+8 / −8, with a true minus sign."""
    return f"{value:+g}".replace("-", "−")


def first_within(points: list[float], reference: float) -> int | None:
    return next((index for index, point in enumerate(points) if abs(point - reference) <= TOLERANCE), None)


def trace(run: ToyRun, x_star: float) -> tuple[list[float], list[float]]:
    """The iterates θ₀, θ₁, … and the points where each step took its gradient."""
    x = torch.tensor([run.start], dtype=run.dtype, requires_grad=True)
    optimizer = catalog.construct(ALGORITHMS[run.algorithm], [x], **run.kwargs)
    iterates = [x.item()]
    gradient_points: list[float] = []

    def backward_closure() -> Tensor:
        optimizer.zero_grad()
        loss = f(x).sum()
        loss.backward()
        gradient_points.append(x.item())  # for NesterovLookahead, x sits at θ + μ·v while this runs
        return loss

    def loss_closure() -> Tensor:
        gradient_points.append(x.item())
        return f(x).sum()

    for _ in range(run.max_steps):
        converged = first_within(iterates, x_star) is not None
        if run.kind == "lookahead":
            converged = converged and first_within(gradient_points, x_star) is not None
        if converged and not run.fixed_steps:
            break
        if run.kind == "gradient":
            backward_closure()
            optimizer.step()
        else:
            catalog.step_with_closure(optimizer, backward_closure if run.kind == "lookahead" else loss_closure)
        iterates.append(x.item())
    return iterates, gradient_points


def seed_count(run: ToyRun, iterates: list[float], gradient_points: list[float], reference: float) -> int | str:
    """The step count as the seed would print it, for its own convention and reference point."""
    if run.seed_convention == "lookahead":
        index = first_within(gradient_points, reference)
        return NOT_CONVERGED if index is None else index + 1
    index = first_within(iterates, reference)
    if index is None:
        return NOT_CONVERGED
    return index + 1 if run.seed_convention == "evaluations" else index


def run(preset: Preset, figures: FigureWriter, bar: Any) -> dict[str, Any]:
    x_star = bisect_stationary_point(-2.0, -1.0)
    local_minimum = bisect_stationary_point(3.5, 4.5)
    runs: list[dict[str, Any]] = []
    traces: dict[str, list[float]] = {}
    unavailable: list[str] = []
    comparisons: list[dict[str, Any]] = []
    iterate_tables: dict[str, list[dict[str, Any]]] = {}
    figure_paths = {"function": figures.save(plot_function(x_star, local_minimum), "toy_function")}

    f_minus8 = derivatives(-8.0, torch.float32)
    f_plus8 = derivatives(8.0, torch.float32)
    comparisons += [
        seeds.compare("toy.x_star", x_star, "ours: bisection on f′ in float64"),
        seeds.compare("toy.f_x_star", derivatives(x_star, torch.float64)[0]),
        seeds.compare("toy.f_at_minus_8", f_minus8[0]),
        seeds.compare("toy.df_at_minus_8", f_minus8[1]),
        seeds.compare("toy.f_at_plus_8", f_plus8[0]),
        seeds.compare("toy.df_at_plus_8", f_plus8[1]),
    ]
    for spec in bar(RUNS, desc="toy function runs"):
        if spec.algorithm not in ALGORITHMS:
            unavailable.append(f"{spec.method} from {signed(spec.start)}: scratchopt.{spec.algorithm} is not available")
            continue
        iterates, gradient_points = trace(spec, x_star)
        traces[spec.key] = iterates
        steps = first_within(iterates, x_star)
        final_x = iterates[-1]
        count = seed_count(spec, iterates, gradient_points, x_star)
        record = {
            "key": spec.key,
            "method": spec.method,
            "optimizer": spec.optimizer_text(),
            "dtype": str(spec.dtype).removeprefix("torch."),
            "start": spec.start,
            "max_steps": spec.max_steps,
            "steps_run": len(iterates) - 1,
            "steps_to_tolerance": NOT_CONVERGED if steps is None else steps,
            "seed_convention": SEED_COUNT_CONVENTION[spec.seed_convention],
            "seed_count": count,
            "seed_count_with_seed_reference": seed_count(spec, iterates, gradient_points, SEED_REFERENCE),
            "final_x": final_x,
            "final_f": derivatives(final_x, spec.dtype)[0],
            "final_distance": abs(final_x - x_star),
            "iterates": iterates,
            "figure": figures.save(plot_trajectory(spec, iterates, steps, x_star), f"toy_{spec.key}"),
        }
        if spec.kind == "lookahead":
            record["gradient_points"] = gradient_points
        runs.append(record)
        comparisons += _compare_run(spec, record, iterate_tables)
    if "momentum_from_+8" in traces and "momentum_from_-8" in traces:
        figure_paths["oscillation"] = figures.save(
            plot_oscillation({8.0: traces["momentum_from_+8"], -8.0: traces["momentum_from_-8"]}, x_star),
            "toy_momentum_oscillation",
        )
    return {
        "x_star": x_star,
        "f_x_star": derivatives(x_star, torch.float64)[0],
        "local_minimum": local_minimum,
        "f_local_minimum": derivatives(local_minimum, torch.float64)[0],
        "tolerance": TOLERANCE,
        "oscillation_window": OSCILLATION_WINDOW,
        "seed_reference": SEED_REFERENCE,
        "runs": runs,
        "unavailable": unavailable,
        "figures": figure_paths,
        "iterate_tables": iterate_tables,
        "seed_comparisons": comparisons,
    }


def _compare_run(
    spec: ToyRun, record: dict[str, Any], iterate_tables: dict[str, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """The seed figures about one run, beside what the run measured."""
    key = f"toy.{spec.key}"
    records = []
    reference_note = ""
    if record["seed_count_with_seed_reference"] != record["seed_count"]:
        reference_note = f"with the seed's rounded x* = {SEED_REFERENCE}: {record['seed_count_with_seed_reference']}"
    if f"{key}.count" in seeds.FIGURES:
        records.append(seeds.compare(f"{key}.count", record["seed_count"], reference_note))
    iterates = record["iterates"]
    if spec.key == "newton":
        rows = _newton_rows(iterates)
        iterate_tables["newton"] = rows
        records.append(seeds.compare("toy.newton.final_x", iterates[12] if len(iterates) > 12 else None))
        records.append(
            seeds.summarise(
                "toy.newton.iterates",
                "Newton from −5: the 12 printed iterations (x, f, f′, f″)",
                seeds.FOUNDATIONS_NEWTON,
                rows,
            )
        )
    elif spec.key == "gd_from_-8":
        rows = _gd_rows(iterates, spec.dtype)
        iterate_tables["gd_from_-8"] = rows
        records.append(
            seeds.summarise(
                "toy.gd_from_-8.iterates",
                "gradient descent from −8: the 17 printed iterates (x, f, f′)",
                seeds.FOUNDATIONS_SGD,
                rows,
            )
        )
    elif spec.key == "gd_from_+8":
        records.append(seeds.compare(f"{key}.x1", iterates[1]))
    elif spec.key.startswith("momentum"):
        rows = _checkpoint_rows(spec, iterates)
        iterate_tables[spec.key] = rows
        records.append(
            seeds.summarise(
                f"{key}.checkpoints",
                f"momentum from {signed(spec.start)}: x, f, f′ printed at “Step 101” and “Step 201”",
                seeds.FOUNDATIONS_MOMENTUM,
                rows,
            )
        )
    if spec.key != "newton":
        # The seed gives the same final x and f(x) for every run that reaches x*; from +8 it stops at the local minimum.
        final = "toy.gd_from_+8" if spec.key == "gd_from_+8" else "toy.gd_from_-8"
        method = spec.method if spec.method.startswith("Nesterov") else spec.method[0].lower() + spec.method[1:]
        label = f"{method} from {signed(spec.start)}"
        records.append(seeds.compare_like(f"{final}.final_x", f"{key}.final_x", f"{label}: final x", record["final_x"]))
        records.append(
            seeds.compare_like(f"{final}.final_f", f"{key}.final_f", f"{label}: final f(x)", record["final_f"])
        )
    if spec.key == "gd_from_+8":
        records.append(seeds.compare("toy.gd_from_+8.final_distance", record["final_distance"]))
    return records


def _newton_rows(iterates: list[float]) -> list[dict[str, Any]]:
    rows = []
    for i, printed in enumerate(seeds.NEWTON_TABLE):
        if i + 1 >= len(iterates):
            break
        measured = (iterates[i + 1], *derivatives(iterates[i], torch.float64))
        for label, seed_text, value in zip(
            (f"x{i + 1}", f"f(x{i})", f"f′(x{i})", f"f″(x{i})"), printed, measured, strict=True
        ):
            rows.append(seeds.compare_printed(f"toy.newton.{label}", seeds.FOUNDATIONS_NEWTON, label, seed_text, value))
    return rows


def _gd_rows(iterates: list[float], dtype: torch.dtype) -> list[dict[str, Any]]:
    rows = []
    for i, printed in enumerate(seeds.GD_FROM_MINUS_8_TABLE):
        if i >= len(iterates):
            break
        measured = (iterates[i], *derivatives(iterates[i], dtype)[:2])
        for label, seed_text, value in zip((f"x{i}", f"f(x{i})", f"f′(x{i})"), printed, measured, strict=True):
            rows.append(
                seeds.compare_printed(f"toy.gd_from_-8.{label}", seeds.FOUNDATIONS_SGD, label, seed_text, value)
            )
    return rows


def _checkpoint_rows(spec: ToyRun, iterates: list[float]) -> list[dict[str, Any]]:
    rows = []
    for index, *printed in seeds.MOMENTUM_CHECKPOINTS[spec.start]:
        x = iterates[index] if index < len(iterates) else None
        measured = (x, *derivatives(x, spec.dtype)[:2]) if x is not None else (None, None, None)
        for label, seed_text, value in zip(
            (f"x{index}", f"f(x{index})", f"f′(x{index})"), printed, measured, strict=True
        ):
            rows.append(
                seeds.compare_printed(f"toy.{spec.key}.{label}", seeds.FOUNDATIONS_MOMENTUM, label, seed_text, value)
            )
    return rows


@styled
def plot_function(x_star: float, local_minimum: float) -> Figure:
    figure, axes = new_figure(7.5, 4.2)
    xs = np.linspace(-10, 10, 800)
    axes.plot(xs, np.sin(xs) + xs**2 / 10, color="#2a9d5c", label="f(x) = sin(x) + x²/10")
    axes.scatter(
        [x_star],
        [math.sin(x_star) + x_star**2 / 10],
        marker="*",
        s=260,
        color=SEED_COLOR,
        zorder=3,
        label=f"global minimum x* ≈ {x_star:.5f}",
    )
    axes.scatter(
        [local_minimum],
        [math.sin(local_minimum) + local_minimum**2 / 10],
        marker="v",
        s=120,
        color="#7b3fa0",
        zorder=3,
        label=f"local minimum ≈ {local_minimum:.5f}",
    )
    axes.set_xlabel("x")
    axes.set_ylabel("f(x)")
    axes.set_title("The toy function and its two minima")
    axes.legend(loc="upper center")
    return figure


@styled
def plot_trajectory(spec: ToyRun, iterates: list[float], steps: int | None, x_star: float) -> Figure:
    figure, axes = new_figure(5.8, 4.0)
    low = min(-10.0, min(iterates) - 0.5)
    high = max(10.0, max(iterates) + 0.5)
    xs = np.linspace(low, high, 800)
    axes.plot(xs, np.sin(xs) + xs**2 / 10, color="#2a9d5c", linewidth=1.8, label="f(x)", zorder=1)
    points = np.asarray(iterates)
    values = np.sin(points) + points**2 / 10
    axes.plot(points, values, color="#888888", linewidth=0.7, alpha=0.45, zorder=2)
    norm = Normalize(0, max(len(points) - 1, 1))
    axes.scatter(
        points,
        values,
        c=np.arange(len(points)),
        cmap="viridis",
        norm=norm,
        s=34,
        edgecolors="white",
        linewidths=0.5,
        zorder=3,
        label="iterates",
    )
    axes.scatter(
        [x_star], [math.sin(x_star) + x_star**2 / 10], marker="*", s=220, color=SEED_COLOR, zorder=4, label="x*"
    )
    colorbar = figure.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=axes)
    colorbar.set_label("step")
    axes.xaxis.set_major_locator(MultipleLocator(5))
    outcome = NOT_CONVERGED if steps is None else f"|x − x*| ≤ 1e-6 after {steps} steps"
    axes.set_title(f"{spec.method} from {signed(spec.start)}\n{outcome}", fontsize=12.5)
    axes.set_xlabel("x")
    axes.set_ylabel("f(x)")
    axes.legend(loc="upper center", fontsize=10.5)
    return figure


@styled
def plot_oscillation(traces: dict[float, list[float]], x_star: float) -> Figure:
    figure, axes = new_figure(11, 4.2, ncols=len(traces))
    for ax, (start, iterates) in zip(axes, traces.items(), strict=True):
        window = iterates[:OSCILLATION_WINDOW]
        ax.axhline(x_star, color=SEED_COLOR, linestyle="--", linewidth=1.2, label="x*")
        ax.plot(range(len(window)), window, color="#999999", linewidth=0.8)
        ax.scatter(range(len(window)), window, c=range(len(window)), cmap="viridis", s=30, zorder=3)
        ax.set_title(f"Momentum from {signed(start)}: first {len(window)} iterates", fontsize=12)
        ax.set_xlabel("step $t$")
        ax.set_ylabel("$x_t$")
        ax.legend(loc="upper right")
    return figure


def render(results: dict[str, Any]) -> str:
    parts = [
        (
            f"<p>Each run below is a scratchopt optimizer stepping a one-element tensor. The global minimiser "
            f"x* = {h.fixed(results['x_star'], 12)} (f(x*) = {h.fixed(results['f_x_star'], 8)}) and the local "
            f"minimum at {h.fixed(results['local_minimum'], 8)} (f = {h.fixed(results['f_local_minimum'], 8)}) are "
            f"found independently, by bisection on f′(x) = cos x + x/5 in float64. A run has converged once "
            f"|x − x*| ≤ {h.num(results['tolerance'])}, the seed's tolerance; the seed measures against its rounded "
            f"x* = {results['seed_reference']}, and a note says where that would change a count. Newton's method runs "
            f"in float64 (the seed used numpy), the others in float32 (the seed used float32 tensors), each with the "
            f"seed's step budget.</p>"
        ),
        h.figure(results["figures"]["function"], "f(x) = sin(x) + x²/10 with the global and the local minimum."),
    ]
    for message in results["unavailable"]:
        parts.append(h.note(h.esc(message), "warn"))
    rows = [
        [
            h.esc(run["method"]),
            h.code(run["optimizer"]),
            h.esc(signed(run["start"])),
            h.num(run["max_steps"]),
            h.num(run["steps_to_tolerance"]),
            h.fixed(run["final_x"], 6),
            h.fixed(run["final_f"], 6),
            h.num(run["final_distance"], 3),
        ]
        for run in results["runs"]
    ]
    parts.append("<h3>Runs</h3>")
    parts.append(
        h.table(
            [
                "method",
                "optimizer",
                "start",
                "step budget",
                "steps until |x − x*| ≤ 10<sup>−6</sup>",
                "final x",
                "f(final x)",
                "|final x − x*|",
            ],
            rows,
            numeric=(2, 3, 4, 5, 6, 7),
        )
    )
    parts.append("<h3>Beside the seed</h3>")
    parts.append(
        f"<p>{h.esc(seeds.ZERO_TO_HERO_ARTICLE)} counts steps in two ways: for gradient descent it prints its loop index i when "
        "x<sub>i</sub> is within tolerance (steps taken); for momentum and both Nesterov forms it prints i + 1, "
        "counting the starting point, and the lookahead form tests the lookahead point θ + μ·v rather than θ. "
        "The counts below follow the seed's convention run by run:</p>"
    )
    parts.append(
        h.table(
            ["run", "seed's convention", "count (seed's convention)"],
            [
                [
                    h.esc(f"{run['method']} from {signed(run['start'])}"),
                    h.esc(run["seed_convention"]),
                    h.num(run["seed_count"]),
                ]
                for run in results["runs"]
            ],
            numeric=(2,),
        )
    )
    parts.append(h.comparison_table(results["seed_comparisons"]))
    labels = {
        "newton": "Newton's 12 iterations",
        "gd_from_-8": "gradient descent from −8, every iterate",
        "momentum_from_+8": "momentum from +8, steps 101 and 201",
        "momentum_from_-8": "momentum from −8, steps 101 and 201",
    }
    for key, rows in results["iterate_tables"].items():
        parts.append(h.details(f"Seed's printed values: {h.esc(labels[key])}", h.comparison_table(rows)))
    parts.append("<h3>Trajectories</h3>")
    parts.append(
        h.figure_grid(
            [
                h.figure(
                    run["figure"],
                    h.esc(
                        f"{run['method']} ({run['optimizer']}) from {signed(run['start'])}: the curve with "
                        "the iterates coloured by step."
                    ),
                )
                for run in results["runs"]
            ]
        )
    )
    if "oscillation" in results["figures"]:
        parts.append("<h3>Momentum oscillates</h3>")
        momentum = next(run for run in results["runs"] if run["key"].startswith("momentum"))
        parts.append(
            h.figure(
                results["figures"]["oscillation"],
                h.esc(
                    f"The first {results['oscillation_window']} iterates of momentum ({momentum['optimizer']}): "
                    "x overshoots x* and swings back before it settles."
                ),
            )
        )
    return "".join(parts)
