"""Section 5: optimizers with low-precision state (:mod:`scratchopt.precision`) beside the same optimizers
with float32 state, from several seeds, on two models.

* The GPT-like model of section 4: each of :data:`TRAINED` (AdamW, and Lion, whose sign update reads its
  one moment differently), at its learning rate of section 4.
* A digits MLP, section 3's data with a hidden layer wide enough (8,192 weights) for 8-bit state: every
  elementwise algorithm that keeps state, with section 3's settings (:func:`digits_pairings`).

Each algorithm trains the same model in each setting (float32 state, bfloat16 state, blockwise 8-bit
state) from the same :data:`SEEDS`: a seed fixes the initial weights and the order of the batches, so
that the spread of an algorithm's float32 runs is the seed-to-seed variation its low-precision runs are
judged against. The held-out loss of a low-precision setting "lies within the spread" when its mean over
the seeds lies between the lowest and the highest float32 run of the same algorithm on the same model.
The state's bytes per parameter are counted from the optimizer's tensors.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from scratchopt.algorithms import ALGORITHMS
from scratchopt.tools import catalog
from scratchopt.tools.presets import Preset
from scratchopt.tools.report import beyond_adamw, torch_parity
from scratchopt.tools.report import html as h
from scratchopt.tools.report.plotting import FigureWriter, new_figure, styled
from scratchopt.tools.workloads import TinyGPT

ANCHOR = "precision"
TITLE = "Low-precision optimizer state"
#: (label, AdamW's state_dtype) of each setting.
SETTINGS: tuple[tuple[str, Any], ...] = (
    ("float32 state", torch.float32),
    ("bfloat16 state", torch.bfloat16),
    ("8-bit state", "8bit"),
)
SEEDS = (1, 2, 3)
#: The algorithms trained in every setting.
TRAINED = ("AdamW", "Lion")
COLORS = {"float32 state": "#000000", "bfloat16 state": "#1f77b4", "8-bit state": "#d62728"}
GPT = "TinyGPT"
DIGITS = "digits MLP"
DIGITS_BATCH = 64
#: Panels per row of the digits figure.
DIGITS_COLUMNS = 4


def digits_mlp() -> nn.Sequential:
    """64 → 128 → 10: the hidden layer's 8,192 weights keep 8-bit state; the 1,280 of the last layer and
    the biases stay float32 (below 4096 elements)."""
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))


def digits_pairings() -> list[torch_parity.Pairing]:
    """Section 3's algorithms and settings that are elementwise and keep state tensors (plain SGD keeps
    none, so its state has no precision)."""
    chosen = []
    for pairing in torch_parity.pairings()[0]:
        if not pairing.cls.elementwise:
            continue
        model = digits_mlp()
        optimizer = catalog.construct(pairing.cls, model.parameters(), **pairing.kwargs)
        nn.functional.cross_entropy(model(torch.zeros(2, 64)), torch.zeros(2, dtype=torch.long)).backward()
        optimizer.step()
        if any(isinstance(v, Tensor) and v.dim() > 0 for state in optimizer.state.values() for v in state.values()):
            chosen.append(pairing)
    return chosen


def _cross_entropy(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(inputs), targets)


def train_digits(
    pairing: torch_parity.Pairing,
    label: str,
    state_dtype: Any,
    seed: int,
    steps: int,
    data: tuple[Tensor, ...],
) -> dict[str, Any]:
    train_x, train_y, test_x, test_y = data
    generator = torch.Generator().manual_seed(1000 + seed)
    batches: list[Tensor] = []
    while len(batches) < steps:
        batches += list(torch.randperm(len(train_y), generator=generator).split(DIGITS_BATCH))
    torch.manual_seed(seed)
    model = digits_mlp()
    kwargs = {**pairing.kwargs, "impl": "fused", "state_dtype": state_dtype}
    optimizer = catalog.construct(pairing.cls, model.parameters(), **kwargs)
    losses = []
    started = time.perf_counter()
    for batch in batches[:steps]:
        loss = functools.partial(_cross_entropy, model, train_x[batch], train_y[batch])
        losses.append(catalog.training_step(optimizer, loss, closure=False))
    seconds = time.perf_counter() - started
    catalog.evaluation_mode(optimizer)
    held_out, _ = torch_parity.evaluate(model, test_x, test_y)
    return {
        "model": DIGITS,
        "algorithm": pairing.label,
        "setting": label,
        "seed": seed,
        "losses": [beyond_adamw._finite(loss) for loss in losses],
        "held_out_loss": beyond_adamw._finite(held_out),
        "state_bytes_per_param": state_bytes_per_param(optimizer, sum(p.numel() for p in model.parameters())),
        "seconds": seconds,
    }


def state_bytes_per_param(optimizer: torch.optim.Optimizer, params: int) -> float:
    """Bytes of every tensor of the optimizer's state that is not a 0-d scalar, per parameter."""
    total = sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    )
    return total / params


def train(
    algorithm: str, label: str, state_dtype: Any, seed: int, steps: int, held_out: list[torch.Tensor]
) -> dict[str, Any]:
    transitions = beyond_adamw.bigram_source(beyond_adamw.MODEL["vocab"])
    gen = torch.Generator().manual_seed(1000 + seed)
    length = beyond_adamw.MODEL["seq_len"] + 1
    batches = [beyond_adamw.sample(transitions, beyond_adamw.BATCH, length, gen) for _ in range(steps)]
    torch.manual_seed(seed)
    model = TinyGPT(**beyond_adamw.MODEL)
    cls = ALGORITHMS[algorithm]
    optimizer = catalog.construct(cls, model.parameters(), **beyond_adamw.settings_of(cls), state_dtype=state_dtype)
    losses = []
    started = time.perf_counter()
    for batch in batches:
        losses.append(catalog.training_step(optimizer, functools.partial(model, batch), closure=False))
    seconds = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    return {
        "model": GPT,
        "algorithm": algorithm,
        "setting": label,
        "seed": seed,
        "losses": [beyond_adamw._finite(loss) for loss in losses],
        "held_out_loss": beyond_adamw._finite(beyond_adamw.held_out_loss(model, optimizer, held_out)),
        "state_bytes_per_param": state_bytes_per_param(optimizer, params),
        "seconds": seconds,
    }


def run(preset: Preset, figures: FigureWriter, bar: Any) -> dict[str, Any]:
    transitions = beyond_adamw.bigram_source(beyond_adamw.MODEL["vocab"])
    gen = torch.Generator().manual_seed(beyond_adamw.BATCH_SEED)
    length = beyond_adamw.MODEL["seq_len"] + 1
    held_out = [
        beyond_adamw.sample(transitions, beyond_adamw.BATCH, length, gen) for _ in range(beyond_adamw.HELD_OUT_BATCHES)
    ]
    runs = [
        train(algorithm, label, state_dtype, seed, preset.precision_curve_steps, held_out)
        for algorithm in TRAINED
        for label, state_dtype in bar(SETTINGS, desc=f"low-precision state: {algorithm}")
        for seed in SEEDS[: preset.precision_seeds]
    ]
    data = torch_parity.digits_split()
    pairings = digits_pairings()
    digits_runs = [
        train_digits(pairing, label, state_dtype, seed, preset.precision_curve_steps, data)
        for pairing in bar(pairings, desc="low-precision state: digits MLP")
        for label, state_dtype in SETTINGS
        for seed in SEEDS[: preset.precision_seeds]
    ]
    summary = summarize(runs)
    digits_summary = summarize(digits_runs)
    return {
        "model": (
            f"TinyGPT: {beyond_adamw.MODEL['layers']} layers, width {beyond_adamw.MODEL['width']}, vocabulary "
            f"{beyond_adamw.MODEL['vocab']}"
        ),
        "params": sum(p.numel() for p in TinyGPT(**beyond_adamw.MODEL).parameters()),
        "steps": preset.precision_curve_steps,
        "seeds": list(SEEDS[: preset.precision_seeds]),
        "learning_rates": {name: beyond_adamw.settings_of(ALGORITHMS[name])["lr"] for name in TRAINED},
        "source_entropy": beyond_adamw.source_entropy(transitions),
        "runs": runs,
        "summary": summary,
        "digits": {
            "model": "MLP 64 → 128 → 10 (tanh) on section 3's digits, mini-batches of "
            f"{DIGITS_BATCH}, held-out loss: cross-entropy on the test split",
            "params": sum(p.numel() for p in digits_mlp().parameters()),
            "runs": digits_runs,
            "summary": digits_summary,
            "settings": {p.label: p.settings_text() for p in pairings},
        },
        "figures": {
            "curves": figures.save(plot_curves(runs), "low_precision"),
            "digits": figures.save(plot_curves(digits_runs, DIGITS_COLUMNS, (5, 3.8)), "low_precision_digits"),
        },
        "seed_comparisons": [],
    }


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model, algorithm and setting: the held-out losses over the seeds, their mean, the state's
    bytes, and whether the mean lies within the spread of the algorithm's float32 runs on that model."""
    by_setting: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for result in runs:
        key = (result.get("model", GPT), result["algorithm"], result["setting"])
        by_setting.setdefault(key, []).append(result)
    rows = []
    for (model, algorithm, label), results in by_setting.items():
        reference = [
            r["held_out_loss"]
            for r in by_setting.get((model, algorithm, SETTINGS[0][0]), [])
            if r["held_out_loss"] is not None
        ]
        low, high = (min(reference), max(reference)) if reference else (float("nan"), float("nan"))
        losses = [r["held_out_loss"] for r in results]
        finite = [loss for loss in losses if loss is not None]
        mean = float(np.mean(finite)) if len(finite) == len(losses) and finite else None
        rows.append(
            {
                "model": model,
                "algorithm": algorithm,
                "setting": label,
                "held_out_losses": losses,
                "mean": mean,
                "within_float32_spread": mean is not None and low <= mean <= high,
                "state_bytes_per_param": results[0]["state_bytes_per_param"],
                "seconds": float(np.mean([r["seconds"] for r in results])),
            }
        )
    return rows


@styled
def plot_curves(
    runs: list[dict[str, Any]], columns: int | None = None, panel: tuple[float, float] = (7, 5.2)
) -> Figure:
    """One panel per algorithm (in rows of ``columns``; all in one row by default), each ``panel``
    inches."""
    algorithms = list(dict.fromkeys(r["algorithm"] for r in runs))
    ncols = min(columns or len(algorithms), len(algorithms))
    nrows = -(-len(algorithms) // ncols)
    figure, panels = new_figure(panel[0] * ncols, panel[1] * nrows, ncols=ncols, nrows=nrows)
    every = list(np.atleast_1d(panels).flat)
    for axes in every[len(algorithms) :]:
        axes.set_visible(False)
    for axes, algorithm in zip(every, algorithms, strict=False):
        for label, _ in SETTINGS:
            curves = [
                beyond_adamw._smoothed(r["losses"])
                for r in runs
                if r["setting"] == label and r["algorithm"] == algorithm
            ]
            if not curves:
                continue
            steps = curves[0][0]
            values = np.vstack([c[1] for c in curves])
            axes.fill_between(
                steps, values.min(axis=0), values.max(axis=0), color=COLORS[label], alpha=0.18, linewidth=0
            )
            axes.plot(
                steps, values.mean(axis=0), color=COLORS[label], linewidth=1.6, label=f"{label} (mean, seeds' range)"
            )
        axes.set_xlabel("step")
        axes.set_ylabel(f"training loss, mean of the last {beyond_adamw.SMOOTHING_WINDOW} steps")
        axes.set_title(algorithm if columns else f"{algorithm}'s state in float32, bfloat16 and 8-bit")
        if axes is every[0] or not columns:
            axes.legend(loc="upper right", fontsize=10)
    return figure


def _table(summary: list[dict[str, Any]]) -> str:
    rows = [
        [
            h.esc(row["algorithm"]),
            h.esc(row["setting"]),
            ", ".join(h.fixed(loss, 3) for loss in row["held_out_losses"]),
            h.fixed(row["mean"], 3),
            "yes" if row["within_float32_spread"] else "no",
            h.fixed(row["state_bytes_per_param"], 2),
            h.fixed(row["seconds"], 1),
        ]
        for row in summary
    ]
    return h.table(
        [
            "algorithm",
            "state",
            "held-out loss per seed",
            "mean",
            "mean within float32's spread",
            "state bytes / param",
            "seconds per run",
        ],
        rows,
        numeric=(3, 5, 6),
    )


def _within(summary: list[dict[str, Any]]) -> str:
    """How many low-precision settings lie within their float32 spread, of how many."""
    low = [row for row in summary if row["setting"] != SETTINGS[0][0]]
    return f"{sum(row['within_float32_spread'] for row in low)} of {len(low)}"


def render(results: dict[str, Any]) -> str:
    seeds = ", ".join(str(s) for s in results["seeds"])
    rates = ", ".join(f"{name} lr {lr:g}" for name, lr in results["learning_rates"].items())
    digits = results["digits"]
    parts = [
        (
            f"<p>Each setting keeps the state in float32, in bfloat16 (rounded stochastically) or in blockwise "
            "8-bit (the dynamic map, a maximum per 256 elements; tensors below 4096 elements stay float32), with "
            f'<code>impl="fused"</code>, from the seeds {seeds}, which fix the initial weights and the batch '
            "order: an algorithm's float32 runs' spread is the seed-to-seed variation its low-precision runs are "
            "judged against.</p>"
        ),
        (
            f"<h3>GPT-like model</h3><p>{rates} (section 4's learning rates) on {h.esc(results['model'])} "
            f"({results['params']:,} parameters), {results['steps']:,} steps, the text of section 4. Within "
            f"the float32 spread: {_within(results['summary'])}.</p>"
        ),
        _table(results["summary"]),
        _curves_figure(results["figures"]["curves"], ""),
        (
            f"<h3>Every elementwise algorithm on digits</h3><p>{h.esc(digits['model'])} "
            f"({digits['params']:,} parameters), {results['steps']:,} steps, each algorithm with section 3's "
            "settings (plain SGD keeps no state, so it has no precision to set). Within the float32 spread: "
            f"{_within(digits['summary'])}.</p>"
        ),
        _table(digits["summary"]),
        _curves_figure(results["figures"]["digits"], " on digits"),
    ]
    return "\n".join(parts)


def _curves_figure(path: str, where: str) -> str:
    return h.figure(
        path,
        f"Training loss{where} with the state in float32 (black), bfloat16 (blue) and 8-bit (red): the mean "
        "over the seeds and their range, per algorithm.",
    )
