"""Section 3: every scratchopt algorithm beside its torch.optim twin, training a small MLP on digits.

Both optimizers of a pair start from the same initial weights and see the same mini-batches, and are
stepped in lockstep, so that the largest parameter difference can be taken after every step. The twin
is torch's for-loop path (``foreach=False``), the one ``impl="loop"`` reproduces bit for bit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from torch import Tensor, nn

from scratchopt.algorithms import ALGORITHMS
from scratchopt.optimizer import Algorithm
from scratchopt.tools import catalog
from scratchopt.tools.presets import Preset
from scratchopt.tools.report import html as h
from scratchopt.tools.report import seed_figures as seeds
from scratchopt.tools.report.plotting import OURS_COLOR, PLAIN, TORCH_COLOR, FigureWriter, new_figure, styled

ANCHOR = "parity"
TITLE = "Ours vs torch on a real model"
MODEL_SEED = 0
BATCH_SEED = 1
TEST_FRACTION = 0.2
SMOOTHING_WINDOW = 25
#: Every algorithm runs with its example arguments (``example_kwargs``) and torch's defaults otherwise;
#: SGD twice, plain and with momentum, each with its seed figure.
SGD_SETTINGS: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("SGD", {}, "parity.SGD"),
    ("SGD, momentum", {"momentum": 0.9}, "parity.SGD_momentum"),
)
#: Algorithms this section chooses not to train, and why.
LEFT_OUT = {
    "Newton": "takes n + 1 backward passes and an n × n eigendecomposition per step; this MLP has "
    "n = 2,410 parameters, so it is left to section 1",
}
SPARSE_ONLY = (
    "takes sparse gradients only, and this MLP's are dense (tests/test_sparse_adam.py trains an "
    "nn.Embedding beside torch's, and scratchopt demo a sparse linear classifier)"
)


@dataclass(frozen=True)
class Pairing:
    label: str
    algorithm: str
    kwargs: dict[str, Any] = field(hash=False)
    seed_key: str | None = None
    has_twin: bool = True

    @property
    def cls(self) -> type[Algorithm]:
        return ALGORITHMS[self.algorithm]

    def settings_text(self) -> str:
        text = ", ".join(f"{name}={value}" for name, value in self.kwargs.items()) or "torch's defaults"
        matrices_only = self.cls.takes == "matrices"
        return text + ("; weight matrices only (the biases stay as they are)" if matrices_only else "")


def pairings() -> tuple[list[Pairing], list[dict[str, str]]]:
    """What section 3 trains, read from the algorithm registry, and what it leaves out and why."""
    chosen: list[Pairing] = []
    left_out: list[dict[str, str]] = []
    for name, cls in ALGORITHMS.items():
        kwargs = dict(cls.example_kwargs)
        has_twin = catalog.torch_twin(cls) is not None
        if name in LEFT_OUT:
            left_out.append({"algorithm": name, "reason": LEFT_OUT[name]})
        elif cls.takes == "sparse gradients":
            left_out.append({"algorithm": name, "reason": SPARSE_ONLY})
        elif name == "SGD" and has_twin:
            chosen += [Pairing(label, "SGD", {**kwargs, **extra}, seed_key) for label, extra, seed_key in SGD_SETTINGS]
        else:
            seed_key = f"parity.{name}" if has_twin and f"parity.{name}" in seeds.FIGURES else None
            chosen.append(Pairing(name, name, kwargs, seed_key, has_twin=has_twin))
    return chosen, left_out


def digits_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8×8 digits (shipped with the package, no download), scaled to [0, 1], split 80/20."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    targets = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(MODEL_SEED))
    test_size = int(len(targets) * TEST_FRACTION)
    test, train = order[:test_size], order[test_size:]
    return inputs[train], targets[train], inputs[test], targets[test]


def batch_schedule(train_size: int, steps: int, batch_size: int) -> list[Tensor]:
    """The mini-batches, fixed in advance so that both optimizers of a pair see the same ones."""
    generator = torch.Generator().manual_seed(BATCH_SEED)
    batches: list[Tensor] = []
    while len(batches) < steps:
        batches += list(torch.randperm(train_size, generator=generator).split(batch_size))
    return batches[:steps]


def make_mlp() -> nn.Module:
    torch.manual_seed(MODEL_SEED)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


@torch.no_grad()
def evaluate(model: nn.Module, inputs: Tensor, targets: Tensor) -> tuple[float, float]:
    logits = model(inputs)
    return nn.functional.cross_entropy(logits, targets).item(), (logits.argmax(1) == targets).float().mean().item()


class Trainee:
    """One model and its optimizer, stepped batch by batch."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, closure: bool) -> None:
        self.model, self.optimizer, self.closure = model, optimizer, closure

    def step(self, inputs: Tensor, targets: Tensor) -> float:
        return catalog.training_step(
            self.optimizer, lambda: nn.functional.cross_entropy(self.model(inputs), targets), self.closure
        )


def train(pairing: Pairing, data: tuple[Tensor, ...], batches: list[Tensor], bar: Any) -> dict[str, Any]:
    """Train ours (and torch's twin, in lockstep) through ``batches``; losses and gaps at every step."""
    train_x, train_y, test_x, test_y = data
    cls = pairing.cls
    closure = cls.needs_closure
    ours_model = make_mlp()
    ours_optimizer = catalog.construct(cls, catalog.trained_params(cls, ours_model), **pairing.kwargs)
    ours = Trainee(ours_model, ours_optimizer, closure)
    twin: Trainee | None = None
    twin_class = catalog.torch_twin(cls)
    if pairing.has_twin and twin_class is not None:
        twin_model = copy.deepcopy(ours_model)
        # torch's for-loop: foreach=False where the class has the flag (the others only loop).
        twin_optimizer = twin_class(
            catalog.trained_params(cls, twin_model), **pairing.kwargs, **catalog.torch_loop_flags(twin_class)
        )
        twin = Trainee(twin_model, twin_optimizer, closure)
    ours_losses, twin_losses, param_gaps = [], [], []
    for batch in bar(batches, desc=f"train {pairing.label}", mininterval=0.5):
        ours_losses.append(ours.step(train_x[batch], train_y[batch]))
        if twin is not None:
            twin_losses.append(twin.step(train_x[batch], train_y[batch]))
            param_gaps.append(
                max(
                    (a - b).abs().max().item()
                    for a, b in zip(ours.model.parameters(), twin.model.parameters(), strict=True)
                )
            )
    catalog.evaluation_mode(ours.optimizer)
    result: dict[str, Any] = {
        "label": pairing.label,
        "algorithm": pairing.algorithm,
        "settings": pairing.settings_text(),
        "has_twin": twin is not None,
        "ours_losses": _finite(ours_losses),
        "ours_test": dict(zip(("loss", "accuracy"), evaluate(ours.model, test_x, test_y), strict=True)),
    }
    if twin is not None:
        loss_gaps = [abs(a - b) for a, b in zip(ours_losses, twin_losses, strict=True)]
        result.update(
            {
                "torch_losses": _finite(twin_losses),
                "torch_test": dict(zip(("loss", "accuracy"), evaluate(twin.model, test_x, test_y), strict=True)),
                "param_gaps": _finite(param_gaps),
                "max_loss_gap": _finite([max(loss_gaps)])[0],
                "max_param_gap": _finite([max(param_gaps)])[0],
            }
        )
    return result


def _finite(values: list[float]) -> list[float | None]:
    """JSON has no NaN or infinity: a diverged value is written as null (and shown as "—")."""
    return [value if np.isfinite(value) else None for value in values]


def run(preset: Preset, figures: FigureWriter, bar: Any) -> dict[str, Any]:
    data = digits_split()
    batches = batch_schedule(len(data[1]), preset.digits_steps, preset.digits_batch_size)
    chosen, left_out = pairings()
    trained: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    comparisons: list[dict[str, Any]] = []
    for pairing in bar(chosen, desc="ours vs torch"):
        try:
            result = train(pairing, data, batches, bar)
        except Exception as error:  # one failing algorithm must not sink the others: it is named on the page
            failed.append({"algorithm": pairing.label, "error": f"{type(error).__name__}: {error}"})
            continue
        if pairing.has_twin:
            result["figure"] = figures.save(plot_pair(result), f"parity_{_slug(pairing.label)}")
            if pairing.seed_key:
                gap = max(result["max_loss_gap"] or 0.0, result["max_param_gap"] or 0.0)
                comparisons.append(
                    seeds.compare(pairing.seed_key, gap, f"largest |Δloss| and |Δθ| over {len(batches):,} steps")
                )
        trained.append(result)
    figure_paths = {"all": figures.save(plot_all(trained), "parity_all")} if trained else {}
    return {
        "model": "Linear(64, 32) → tanh → Linear(32, 10), cross-entropy",
        "train_size": len(data[1]),
        "test_size": len(data[3]),
        "steps": len(batches),
        "batch_size": preset.digits_batch_size,
        "smoothing_window": SMOOTHING_WINDOW,
        "trained": trained,
        "failed": failed,
        "left_out": left_out,
        "figures": figure_paths,
        "seed_comparisons": comparisons,
    }


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_").lower()


@styled
def plot_pair(result: dict[str, Any]) -> Figure:
    figure, axes = new_figure(5.8, 3.9)
    steps = np.arange(1, len(result["ours_losses"]) + 1)
    axes.plot(steps, _as_array(result["ours_losses"]), color=OURS_COLOR, linewidth=3.4, alpha=0.5, label="scratchopt")
    axes.plot(
        steps,
        _as_array(result["torch_losses"]),
        color=TORCH_COLOR,
        linewidth=1.0,
        linestyle="--",
        label="torch.optim (foreach=False)",
    )
    gap = "0, bit for bit" if result["max_param_gap"] == 0 else f"{result['max_param_gap']:.3g}"
    axes.set_xlabel("step")
    axes.set_ylabel("mini-batch loss")
    axes.set_title(result["label"])
    axes.legend(loc="upper right", title=f"largest |Δθ| over all steps: {gap}", title_fontsize=10.5)
    return figure


@styled
def plot_all(trained: list[dict[str, Any]]) -> Figure:
    figure, axes = new_figure(10, 5.2)
    palette = colormaps["tab10"]
    colors = [palette(index) for index in range(palette.N)]
    for index, result in enumerate(trained):
        losses = _as_array(result["ours_losses"])
        window = min(SMOOTHING_WINDOW, len(losses))
        smoothed = np.convolve(losses, np.ones(window) / window, mode="valid")
        # ten distinct colours, then the same colours dashed
        axes.plot(
            np.arange(window, len(losses) + 1),
            smoothed,
            color=colors[index % len(colors)],
            linestyle="-" if index < len(colors) else "--",
            label=result["label"],
        )
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(PLAIN)
    axes.yaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("step")
    axes.set_ylabel(f"loss, mean of the last {SMOOTHING_WINDOW} steps (log scale)")
    axes.set_title("Every algorithm on the digits MLP (scratchopt)")
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=10)
    return figure


def _as_array(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if value is None else value for value in values], dtype=float)


def render(results: dict[str, Any]) -> str:
    parts = [
        (
            f"<p>A {h.esc(results['model'])} on scikit-learn's digits ({results['train_size']:,} training and "
            f"{results['test_size']:,} test images, no download), {results['steps']:,} mini-batch steps of "
            f"{results['batch_size']}. For each algorithm, scratchopt and torch's twin start from the same weights, "
            "see the same batches and are stepped in lockstep; torch runs its for-loop path "
            f"({h.code('foreach=False')}). Hyperparameters are each algorithm's example arguments (its "
            "settings below) and torch's defaults otherwise.</p>"
        )
    ]
    for item in results["left_out"]:
        parts.append(h.note(f"{h.code(item['algorithm'])} is not trained here: {h.esc(item['reason'])}."))
    for item in results["failed"]:
        parts.append(h.note(f"{h.code(item['algorithm'])} failed: {h.esc(item['error'])}", "warn"))
    rows = []
    for result in results["trained"]:
        twin = result["has_twin"]
        identical = twin and result["max_loss_gap"] == 0 and result["max_param_gap"] == 0
        rows.append(
            [
                h.esc(result["label"]),
                f'<span class="sub">{h.esc(result["settings"])}</span>',
                h.fixed(result["ours_losses"][-1], 6),
                h.fixed(result["torch_losses"][-1], 6) if twin else "no twin",
                h.num(result["max_loss_gap"]) if twin else "—",
                h.num(result["max_param_gap"]) if twin else "—",
                h.fixed(100 * result["ours_test"]["accuracy"], 1) + "%",
                (h.fixed(100 * result["torch_test"]["accuracy"], 1) + "%") if twin else "—",
                h.status(identical, "bit-for-bit", "differs") if twin else "—",
            ]
        )
    parts.append(
        h.table(
            [
                "algorithm",
                "settings",
                "last loss, ours",
                "last loss, torch",
                "largest&nbsp;|Δloss|",
                "largest&nbsp;|Δθ|",
                "test accuracy, ours",
                "test accuracy, torch",
                "",
            ],
            rows,
            numeric=(2, 3, 4, 5, 6, 7),
        )
    )
    if "all" in results["figures"]:
        parts.append(
            h.figure(
                results["figures"]["all"],
                "All algorithms on one figure (scratchopt's runs; torch's coincide, as the table shows).",
            )
        )
    if results["seed_comparisons"]:
        parts.append("<h3>Beside the seeds</h3>")
        parts.append(h.comparison_table(results["seed_comparisons"]))
    parts.append("<h3>Each algorithm beside its twin</h3>")
    parts.append(
        h.figure_grid(
            [
                h.figure(
                    result["figure"],
                    h.esc(
                        f"{result['label']} ({result['settings']}): scratchopt's loss curve with torch's drawn over it."
                    ),
                )
                for result in results["trained"]
                if "figure" in result
            ]
        )
    )
    return "".join(parts)
