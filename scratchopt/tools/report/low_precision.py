"""Section 5: optimizers with low-precision state (:mod:`scratchopt.precision`) beside the same optimizers
with float32 state, training the GPT-like model of section 4 from several seeds.

Each of :data:`TRAINED` (AdamW, and Lion, whose sign update reads its one moment differently), at its
learning rate of section 4, trains the same model in each setting (float32 state, bfloat16 state,
blockwise 8-bit state) from the same :data:`SEEDS`: a seed fixes the initial weights and the order of the
batches, so that the spread of an algorithm's float32 runs is the seed-to-seed variation its
low-precision runs are judged against. The held-out loss of a low-precision setting "lies within the
spread" when its mean over the seeds lies between the lowest and the highest float32 run of the same
algorithm. The state's bytes per parameter are counted from the optimizer's tensors.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from scratchopt.algorithms import ALGORITHMS
from scratchopt.tools import catalog
from scratchopt.tools.presets import Preset
from scratchopt.tools.report import beyond_adamw
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
        for seed in SEEDS
    ]
    summary = summarize(runs)
    return {
        "model": (
            f"TinyGPT: {beyond_adamw.MODEL['layers']} layers, width {beyond_adamw.MODEL['width']}, vocabulary "
            f"{beyond_adamw.MODEL['vocab']}"
        ),
        "params": sum(p.numel() for p in TinyGPT(**beyond_adamw.MODEL).parameters()),
        "steps": preset.precision_curve_steps,
        "seeds": list(SEEDS),
        "learning_rates": {name: beyond_adamw.settings_of(ALGORITHMS[name])["lr"] for name in TRAINED},
        "source_entropy": beyond_adamw.source_entropy(transitions),
        "runs": runs,
        "summary": summary,
        "figures": {"curves": figures.save(plot_curves(runs), "low_precision")},
        "seed_comparisons": [],
    }


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per algorithm and setting: the held-out losses over the seeds, their mean, the state's bytes, and
    whether the mean lies within the spread of the algorithm's float32 runs."""
    by_setting: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for result in runs:
        by_setting.setdefault((result["algorithm"], result["setting"]), []).append(result)
    rows = []
    for (algorithm, label), results in by_setting.items():
        reference = [
            r["held_out_loss"]
            for r in by_setting.get((algorithm, SETTINGS[0][0]), [])
            if r["held_out_loss"] is not None
        ]
        low, high = (min(reference), max(reference)) if reference else (float("nan"), float("nan"))
        losses = [r["held_out_loss"] for r in results]
        finite = [loss for loss in losses if loss is not None]
        mean = float(np.mean(finite)) if len(finite) == len(losses) and finite else None
        rows.append(
            {
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
def plot_curves(runs: list[dict[str, Any]]) -> Figure:
    algorithms = list(dict.fromkeys(r["algorithm"] for r in runs))
    figure, panels = new_figure(7 * len(algorithms), 5.2, ncols=len(algorithms))
    for axes, algorithm in zip(np.atleast_1d(panels), algorithms, strict=True):
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
        axes.set_title(f"{algorithm}'s state in float32, bfloat16 and 8-bit")
        axes.legend(loc="upper right", fontsize=10)
    return figure


def render(results: dict[str, Any]) -> str:
    seeds = ", ".join(str(s) for s in results["seeds"])
    rates = ", ".join(f"{name} lr {lr:g}" for name, lr in results["learning_rates"].items())
    parts = [
        (
            f'<p>{rates} (section 4\'s learning rates, <code>impl="fused"</code>) on {h.esc(results["model"])} '
            f"({results['params']:,} parameters), {results['steps']:,} steps, the text of section 4, with the state "
            "kept in float32, in bfloat16 (rounded stochastically) and in blockwise 8-bit (the dynamic map, a "
            f"maximum per 256 elements; tensors below 4096 elements stay float32). Each setting runs from the seeds "
            f"{seeds}, which fix the initial weights and the batch order: an algorithm's float32 runs' spread is the "
            "seed-to-seed variation its low-precision runs are judged against. The digits MLP of section 3 is "
            "not repeated here: its layers have fewer than 4096 elements, so 8-bit state leaves it float32.</p>"
        )
    ]
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
        for row in results["summary"]
    ]
    parts.append(
        h.table(
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
    )
    parts.append(
        h.figure(
            results["figures"]["curves"],
            "Training loss with the state in float32 (black), bfloat16 (blue) and 8-bit (red): the mean over "
            "the seeds and their range, per algorithm.",
        )
    )
    return "\n".join(parts)
