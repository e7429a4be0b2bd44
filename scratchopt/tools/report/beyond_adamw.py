"""Section 4: the optimizers torch.optim does not have, each beside AdamW, training a GPT-like model.

The model is the benchmark's causal transformer (:class:`~scratchopt.tools.workloads.TinyGPT`) at a
small size; the text is generated: sequences from a fixed random bigram source (each token's successor
drawn from its own softmax distribution), so the data ships as a seed and the best possible loss is
known, the source's conditional entropy. Every optimizer starts from the same weights and sees the same
batches; each is run as a user of it would (its ``fused`` strategy where it has one) with the learning
rate in :data:`LEARNING_RATES` and its defaults otherwise. The held-out loss is taken after
``optimizer.eval()`` where the optimizer has one (Schedule-Free evaluates at its averaged iterate).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import Tensor, nn

from scratchopt.algorithms import ALGORITHMS
from scratchopt.optimizer import Algorithm
from scratchopt.tools import catalog
from scratchopt.tools.presets import Preset
from scratchopt.tools.report import html as h
from scratchopt.tools.report.plotting import TORCH_COLOR, FigureWriter, new_figure, styled
from scratchopt.tools.workloads import TinyGPT

ANCHOR = "beyond"
TITLE = "Beyond AdamW on a GPT-like model"
BASELINE = "AdamW"
MODEL = {"layers": 2, "width": 64, "vocab": 64, "seq_len": 32, "heads": 4}
BATCH = 16
HELD_OUT_BATCHES = 8
SOURCE_SEED, MODEL_SEED, BATCH_SEED = 0, 1, 2
#: How peaked each token's successor distribution is (the logits' scale): higher, more predictable text.
SOURCE_SHARPNESS = 3.0
SMOOTHING_WINDOW = 20
#: One learning rate per optimizer, from its authors' advice relative to AdamW's, not tuned on this
#: plot: Lion's update has unit size per coordinate, so it takes about a tenth of AdamW's; Prodigy
#: estimates its own step size and takes lr = 1; Schedule-Free AdamW takes AdamW's; Schedule-Free SGD
#: takes an SGD rate. The others take AdamW's.
ADAMW_LR = 3e-3
LEARNING_RATES: dict[str, float] = {"Lion": 3e-4, "Prodigy": 1.0, "ScheduleFreeSGD": 0.3}


def chosen() -> list[type[Algorithm]]:
    """AdamW, then every registered algorithm without a torch.optim twin that a plain loop runs on a
    dense model (the closure and matrices-only ones need another training loop)."""
    others = [
        cls
        for cls in ALGORITHMS.values()
        if cls.torch_twin is None and catalog.loop_cannot_run(cls) is None and cls.takes == "any"
    ]
    return [ALGORITHMS[BASELINE], *others]


def bigram_source(vocab: int) -> Tensor:
    """Each token's successor distribution (rows sum to 1), fixed by :data:`SOURCE_SEED`."""
    gen = torch.Generator().manual_seed(SOURCE_SEED)
    return torch.softmax(SOURCE_SHARPNESS * torch.randn(vocab, vocab, generator=gen, dtype=torch.float64), dim=1)


def source_entropy(transitions: Tensor) -> float:
    """The source's entropy rate in nats per token: H(next | current) under its stationary distribution."""
    values, vectors = torch.linalg.eig(transitions.T)
    stationary = vectors[:, torch.argmin((values - 1).abs())].real
    stationary = stationary / stationary.sum()
    per_row = -(transitions * transitions.log()).sum(dim=1)
    return float((stationary * per_row).sum())


def sample(transitions: Tensor, rows: int, length: int, gen: torch.Generator) -> Tensor:
    """``rows`` sequences of ``length`` tokens from the source, each from a uniformly drawn first token."""
    tokens = torch.empty(rows, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(transitions.shape[0], (rows,), generator=gen)
    for position in range(1, length):
        tokens[:, position] = torch.multinomial(transitions[tokens[:, position - 1]], 1, generator=gen).squeeze(1)
    return tokens


def settings_of(cls: type[Algorithm]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"lr": LEARNING_RATES.get(cls.__name__, ADAMW_LR)}
    if cls.elementwise and catalog.accepts(cls, "impl"):
        kwargs["impl"] = "fused"
    return kwargs


def held_out_loss(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Tensor]) -> float:
    catalog.evaluation_mode(optimizer)
    with torch.no_grad():
        return float(np.mean([float(model(batch)) for batch in batches]))


def train(cls: type[Algorithm], batches: list[Tensor], held_out: list[Tensor], bar: Any) -> dict[str, Any]:
    torch.manual_seed(MODEL_SEED)
    model = TinyGPT(**MODEL)
    kwargs = settings_of(cls)
    optimizer = catalog.construct(cls, model.parameters(), **kwargs)
    losses = []
    started = time.perf_counter()
    for batch in bar(batches, desc=f"train {cls.__name__}", mininterval=0.5):
        losses.append(catalog.training_step(optimizer, functools.partial(model, batch), closure=False))
    seconds = time.perf_counter() - started
    return {
        "algorithm": cls.__name__,
        "settings": ", ".join(f"{key}={value}" for key, value in kwargs.items()),
        "losses": [_finite(loss) for loss in losses],
        "held_out_loss": _finite(held_out_loss(model, optimizer, held_out)),
        "seconds": seconds,
    }


def _finite(value: float) -> float | None:
    """JSON has no NaN or infinity: a diverged value is written as null (and shown as "—")."""
    return value if math.isfinite(value) else None


def run(preset: Preset, figures: FigureWriter, bar: Any) -> dict[str, Any]:
    transitions = bigram_source(MODEL["vocab"])
    gen = torch.Generator().manual_seed(BATCH_SEED)
    length = MODEL["seq_len"] + 1
    batches = [sample(transitions, BATCH, length, gen) for _ in range(preset.gpt_curve_steps)]
    held_out = [sample(transitions, BATCH, length, gen) for _ in range(HELD_OUT_BATCHES)]
    trained, failed = [], []
    for cls in bar(chosen(), desc="beyond AdamW"):
        try:
            trained.append(train(cls, batches, held_out, bar))
        except Exception as error:  # one failing algorithm must not sink the others: it is named on the page
            failed.append({"algorithm": cls.__name__, "error": f"{type(error).__name__}: {error}"})
    entropy = source_entropy(transitions)
    figure_paths = {"curves": figures.save(plot_curves(trained, entropy), "beyond_adamw")} if trained else {}
    return {
        "model": (
            f"TinyGPT: {MODEL['layers']} layers, width {MODEL['width']}, {MODEL['heads']} heads, vocabulary "
            f"{MODEL['vocab']}, {MODEL['seq_len']} tokens per row"
        ),
        "params": sum(p.numel() for p in TinyGPT(**MODEL).parameters()),
        "steps": len(batches),
        "batch_size": BATCH,
        "source_entropy": entropy,
        "uniform_loss": math.log(MODEL["vocab"]),
        "trained": trained,
        "failed": failed,
        "figures": figure_paths,
        "seed_comparisons": [],
    }


def _smoothed(values: list[float | None]) -> tuple[np.ndarray, np.ndarray]:
    losses = np.array([np.nan if value is None else value for value in values], dtype=float)
    window = min(SMOOTHING_WINDOW, len(losses))
    return np.arange(window, len(losses) + 1), np.convolve(losses, np.ones(window) / window, mode="valid")


@styled
def plot_curves(trained: list[dict[str, Any]], entropy: float) -> Figure:
    figure, axes = new_figure(10, 5.2)
    tab10 = colormaps["tab10"]
    palette = [tab10(i) for i in range(tab10.N) if i != 7]  # tab10's grey would read as AdamW's
    for index, result in enumerate(trained):
        baseline = result["algorithm"] == BASELINE
        steps, smoothed = _smoothed(result["losses"])
        axes.plot(
            steps,
            smoothed,
            color=TORCH_COLOR if baseline else palette[index % len(palette)],
            linewidth=3.0 if baseline else 1.4,
            alpha=0.6 if baseline else 1.0,
            label=result["algorithm"],
        )
    axes.axhline(entropy, color="#888888", linestyle=":", label="the source's entropy (best possible)")
    axes.set_xlabel("step")
    axes.set_ylabel(f"training loss, mean of the last {SMOOTHING_WINDOW} steps")
    axes.set_title("Next-token loss on the generated text (scratchopt)")
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=10)
    return figure


def render(results: dict[str, Any]) -> str:
    parts = [
        (
            f"<p>{h.esc(results['model'])} ({results['params']:,} parameters), {results['steps']:,} steps of "
            f"{results['batch_size']} rows of text generated from a fixed random bigram source. A uniform guess "
            f"scores {h.fixed(results['uniform_loss'], 3)} nats per token; the source's entropy, "
            f"{h.fixed(results['source_entropy'], 3)}, is the best any model can do. Every optimizer starts from "
            "the same weights and sees the same batches, with the learning rate below and its defaults otherwise "
            "(one rate per optimizer, from its authors' advice relative to AdamW's, not tuned here). "
            "Each one's equality with its authors' implementation is proven by the test suite, not by this "
            "plot: this section shows that each trains a transformer.</p>"
        )
    ]
    for item in results["failed"]:
        parts.append(h.note(f"{h.code(item['algorithm'])} failed: {h.esc(item['error'])}", "warn"))
    rows = [
        [
            h.esc(result["algorithm"]),
            f'<span class="sub">{h.esc(result["settings"])}</span>',
            h.fixed(np.nanmean(_smoothed(result["losses"])[1][-1:]), 3),
            h.fixed(result["held_out_loss"], 3),
            h.fixed(result["seconds"], 1),
        ]
        for result in results["trained"]
    ]
    parts.append(
        h.table(
            ["optimizer", "settings", "training loss (smoothed, last)", "held-out loss", "seconds"],
            rows,
            numeric=(2, 3, 4),
        )
    )
    if "curves" in results["figures"]:
        parts.append(h.figure(results["figures"]["curves"], "Training loss of each optimizer beside AdamW (black)."))
    return "\n".join(parts)
