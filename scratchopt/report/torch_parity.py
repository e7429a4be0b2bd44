"""Section 3: every scratchopt algorithm beside its torch.optim twin, training a small MLP on digits.

Both optimizers of a pair start from the same initial weights and see the same mini-batches, and are
stepped in lockstep, so that the largest parameter difference can be taken after every step. The twin
is torch's for-loop path (``foreach=False``), the one ``impl="loop"`` reproduces bit for bit.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from torch import Tensor, nn

import scratchopt
from scratchopt.report import html as h
from scratchopt.report import seed_figures as seeds
from scratchopt.report.plotting import OURS_COLOR, PLAIN, TORCH_COLOR, FigureWriter, new_figure, styled
from scratchopt.report.presets import Preset

ANCHOR = "parity"
TITLE = "Ours vs torch on a real model"
MODEL_SEED = 0
BATCH_SEED = 1
TEST_FRACTION = 0.2
SMOOTHING_WINDOW = 25
#: Hyperparameters are torch's defaults, except for plain SGD whose default lr (1e-3) barely moves
#: this model in the step budget.
SGD_SETTINGS = (
    ("SGD", {"lr": 0.1}, "parity.SGD"),
    ("SGD, momentum", {"lr": 0.1, "momentum": 0.9}, "parity.SGD_momentum"),
)
#: Algorithms without a torch twin: trained alone (NesterovLookahead) or left out, with the reason.
OURS_ONLY = {"NesterovLookahead": {"lr": 0.1, "momentum": 0.9}, "Lion": {"lr": 1e-3}}
LEFT_OUT = {
    "Newton": "takes n + 1 backward passes and an n × n eigendecomposition per step; this MLP has "
    "n = 2,410 parameters, so it is left to section 1",
    "SparseAdam": "takes sparse gradients only, and this MLP's are dense (tests/test_sparse_adam.py trains "
    "an nn.Embedding beside torch's)",
}
#: Settings other than torch's defaults: LBFGS's lr of 1 without a line search diverges on mini-batches.
TWIN_SETTINGS = {"LBFGS": {"line_search_fn": "strong_wolfe", "max_iter": 5}}
#: Algorithms whose step takes a closure that re-evaluates the loss.
NEEDS_CLOSURE = {"LBFGS", "NesterovLookahead"}
#: Algorithms that take matrices only: they train the weights, and the biases stay as they are (for both).
MATRICES_ONLY = {"Muon"}


@dataclass(frozen=True)
class Pairing:
    label: str
    algorithm: str
    kwargs: dict[str, Any] = field(hash=False)
    seed_key: str | None = None
    has_twin: bool = True

    def settings_text(self) -> str:
        text = ", ".join(f"{name}={value}" for name, value in self.kwargs.items()) or "torch's defaults"
        return text + ("; weight matrices only (the biases stay as they are)" if self.algorithm in MATRICES_ONLY else "")


def pairings() -> tuple[list[Pairing], list[dict[str, str]]]:
    """What section 3 trains, read from ``scratchopt.__all__`` now, and what it leaves out and why."""
    chosen: list[Pairing] = []
    left_out: list[dict[str, str]] = []
    algorithms = [name for name in scratchopt.__all__ if isinstance(getattr(scratchopt, name), type)
                  and issubclass(getattr(scratchopt, name), torch.optim.Optimizer)
                  and getattr(scratchopt, name) is not scratchopt.ScratchOptimizer]
    for name in algorithms:
        if name in LEFT_OUT:
            left_out.append({"algorithm": name, "reason": LEFT_OUT[name]})
        elif name == "SGD":
            chosen += [Pairing(label, "SGD", kwargs, seed_key) for label, kwargs, seed_key in SGD_SETTINGS]
        elif hasattr(torch.optim, name):
            seed_key = f"parity.{name}" if f"parity.{name}" in seeds.FIGURES else None
            chosen.append(Pairing(name, name, TWIN_SETTINGS.get(name, {}), seed_key))
        elif name in OURS_ONLY:
            chosen.append(Pairing(name, name, OURS_ONLY[name], has_twin=False))
        else:
            left_out.append({"algorithm": name, "reason": "no torch twin to compare with"})
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


def training_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, inputs: Tensor, targets: Tensor, needs_closure: bool
) -> float:
    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        return loss

    if needs_closure:
        return optimizer.step(closure).item()
    loss = closure()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def evaluate(model: nn.Module, inputs: Tensor, targets: Tensor) -> tuple[float, float]:
    logits = model(inputs)
    return nn.functional.cross_entropy(logits, targets).item(), (logits.argmax(1) == targets).float().mean().item()


def trained_params(pairing: Pairing, model: nn.Module) -> list[nn.Parameter]:
    """The params the pair trains: all of them, or the weight matrices for an algorithm that takes only those."""
    if pairing.algorithm in MATRICES_ONLY:
        return [p for p in model.parameters() if p.dim() == 2]
    return list(model.parameters())


def train(pairing: Pairing, data: tuple[Tensor, ...], batches: list[Tensor], bar: Any) -> dict[str, Any]:
    """Train ours (and torch's twin, in lockstep) through ``batches``; losses and gaps at every step."""
    train_x, train_y, test_x, test_y = data
    ours_model = make_mlp()
    ours = getattr(scratchopt, pairing.algorithm)(trained_params(pairing, ours_model), **pairing.kwargs)
    twin_model = copy.deepcopy(ours_model) if pairing.has_twin else None
    twin = None
    if twin_model is not None:
        twin_class = getattr(torch.optim, pairing.algorithm)
        # torch's for-loop: foreach=False where the class has the flag (the others only loop).
        loop = {"foreach": False} if "foreach" in inspect.signature(twin_class).parameters else {}
        twin = twin_class(trained_params(pairing, twin_model), **pairing.kwargs, **loop)
    closure = pairing.algorithm in NEEDS_CLOSURE
    ours_losses, twin_losses, param_gaps = [], [], []
    for batch in bar(batches, desc=f"train {pairing.label}", mininterval=0.5):
        ours_losses.append(training_step(ours_model, ours, train_x[batch], train_y[batch], closure))
        if twin is not None:
            twin_losses.append(training_step(twin_model, twin, train_x[batch], train_y[batch], closure))
            param_gaps.append(
                max(
                    (a - b).abs().max().item()
                    for a, b in zip(ours_model.parameters(), twin_model.parameters(), strict=True)
                )
            )
    result: dict[str, Any] = {
        "label": pairing.label,
        "algorithm": pairing.algorithm,
        "settings": pairing.settings_text(),
        "has_twin": pairing.has_twin,
        "ours_losses": _finite(ours_losses),
        "ours_test": dict(zip(("loss", "accuracy"), evaluate(ours_model, test_x, test_y), strict=True)),
    }
    if twin is not None:
        loss_gaps = [abs(a - b) for a, b in zip(ours_losses, twin_losses, strict=True)]
        result.update(
            {
                "torch_losses": _finite(twin_losses),
                "torch_test": dict(zip(("loss", "accuracy"), evaluate(twin_model, test_x, test_y), strict=True)),
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
    batches = batch_schedule(len(data[1]), preset.mlp_steps, preset.mlp_batch_size)
    chosen, left_out = pairings()
    trained: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    comparisons: list[dict[str, Any]] = []
    for pairing in bar(chosen, desc="ours vs torch"):
        try:
            result = train(pairing, data, batches, bar)
        except Exception as error:  # an algorithm mid-rewrite must not sink the other sections
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
        "batch_size": preset.mlp_batch_size,
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
    colors = colormaps["tab10"].colors
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
            f"({h.code('foreach=False')}). Hyperparameters are torch's defaults except for SGD.</p>"
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
