"""Section 2: linear regression by gradient descent, beside ``numpy.linalg.lstsq``, on the data of the seed
article “From ZeRO to Hero: Rebuilding FSDP From Scratch”.

The data and the initial line are drawn exactly as the article draws them (numpy's legacy generator with
seed 0: 100 points x ∈ [0, 2), y = 4 + 3x + N(0, 1), then slope = 12·N(0, 1), intercept = −9·N(0, 1)).
The article differentiates the mean squared error by hand in numpy; here autograd does it in float64 and
``scratchopt.SGD`` takes the steps. One run of ``regression_long_steps`` steps gives both the article's
1,000-step view (its first 1,000 steps) and the long view.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

import scratchopt
from scratchopt.tools.presets import Preset
from scratchopt.tools.report import html as h
from scratchopt.tools.report import seed_figures as seeds
from scratchopt.tools.report.plotting import OURS_COLOR, SEED_COLOR, FigureWriter, new_figure, styled

ANCHOR = "regression"
TITLE = "Linear regression by gradient descent"
LEARNING_RATE = 0.05
SHORT_STEPS = 1000
LOG_EVERY = 50  # the seed prints the loss every 50 steps
LOSS_DECIMALS = 4  # … to 4 decimals
#: The seed's printed loss log, steps 0, 50, …, 950.
SEED_LOSS_LOG = (
    "20.0717",
    "4.7583",
    "1.7357",
    "1.1392",
    "1.0214",
    "0.9982",
    "0.9936",
    "0.9927",
    "0.9925",
    "0.9924",
    "0.9924",
    "0.9924",
    "0.9924",
    "0.9924",
    "0.9924",
    "0.9924",
    "0.9924",
    "0.9924",
    "0.9924",
    "0.9924",
)


def seed_data() -> tuple[np.ndarray, np.ndarray, float, float]:
    """x, y (100 × 1 each) and the initial slope and intercept, drawn in the seed's order."""
    rng = np.random.RandomState(0)  # the legacy generator: the stream np.random.seed(0) gives
    x = 2 * rng.rand(100, 1)
    y = 4 + 3 * x + rng.randn(100, 1)
    slope = rng.randn() * 12
    intercept = rng.randn() * -9
    return x, y, slope, intercept


def descend(x: np.ndarray, y: np.ndarray, slope: float, intercept: float, steps: int, bar: Any) -> dict[str, Any]:
    """Gradient descent on the MSE; the loss and gradient are recorded at θ_k, before step k is taken."""
    inputs = torch.from_numpy(x[:, 0])
    targets = torch.from_numpy(y[:, 0])
    theta = torch.tensor([slope, intercept], dtype=torch.float64, requires_grad=True)
    optimizer = scratchopt.SGD([theta], lr=LEARNING_RATE)
    losses = torch.empty(steps, dtype=torch.float64)
    gradients = torch.empty(steps, 2, dtype=torch.float64)
    theta_short = None
    for step in bar(range(steps), desc="linear regression", mininterval=0.5):
        optimizer.zero_grad()
        loss = ((targets - (inputs * theta[0] + theta[1])) ** 2).mean()
        loss.backward()
        losses[step] = loss.detach()
        assert theta.grad is not None  # backward() has just set it
        gradients[step] = theta.grad
        optimizer.step()
        if step + 1 == SHORT_STEPS:
            theta_short = theta.detach().clone()
    return {
        "losses": losses.numpy(),
        "gradients": gradients.numpy(),
        "theta_short": theta_short.numpy() if theta_short is not None else None,
        "theta_long": theta.detach().numpy(),
    }


def settled_step(losses: np.ndarray) -> tuple[int, int]:
    """When the loss, printed as the seed prints it, stops changing within the first 1,000 steps.

    Returns the first logged step (a multiple of 50) and the first step overall from which the loss
    rounded to 4 decimals equals its value at step 999.
    """
    rounded = np.round(losses[:SHORT_STEPS], LOSS_DECIMALS)
    final = rounded[-1]
    changed = np.nonzero(rounded != final)[0]
    first_step = int(changed[-1] + 1) if len(changed) else 0
    logged = rounded[::LOG_EVERY]
    changed_logged = np.nonzero(logged != final)[0]
    first_logged = int((changed_logged[-1] + 1) * LOG_EVERY) if len(changed_logged) else 0
    return first_logged, first_step


def run(preset: Preset, figures: FigureWriter, bar: Any) -> dict[str, Any]:
    x, y, slope, intercept = seed_data()
    steps = preset.regression_long_steps
    trace = descend(x, y, slope, intercept, steps, bar)
    losses, gradients = trace["losses"], trace["gradients"]
    gradient_norms = np.linalg.norm(gradients, axis=1)
    design = np.hstack([x, np.ones((x.shape[0], 1))])
    (lstsq_slope, lstsq_intercept), *_ = np.linalg.lstsq(design, y[:, 0], rcond=None)
    logged_step, first_step = settled_step(losses)
    theta_short, theta_long = trace["theta_short"], trace["theta_long"]
    smallest = int(np.argmin(gradient_norms))
    results: dict[str, Any] = {
        "learning_rate": LEARNING_RATE,
        "short_steps": SHORT_STEPS,
        "long_steps": steps,
        "log_every": LOG_EVERY,
        "loss_decimals": LOSS_DECIMALS,
        "x": x[:, 0].tolist(),
        "y": y[:, 0].tolist(),
        "initial": {
            "slope": slope,
            "intercept": intercept,
            "loss": float(losses[0]),
            "grad_slope": float(gradients[0, 0]),
            "grad_intercept": float(gradients[0, 1]),
        },
        "loss_log": [{"step": step, "loss": float(losses[step])} for step in range(0, SHORT_STEPS, LOG_EVERY)],
        "losses_short": losses[:SHORT_STEPS].tolist(),
        "gradient_norms_short": gradient_norms[:SHORT_STEPS].tolist(),
        "gradient_norms_long_every_50": gradient_norms[::LOG_EVERY].tolist(),
        "settled_logged_step": logged_step,
        "settled_step": first_step,
        "last_short_gradient": {
            "slope": float(gradients[SHORT_STEPS - 1, 0]),
            "intercept": float(gradients[SHORT_STEPS - 1, 1]),
        },
        "gradient_norm": {
            "initial": float(gradient_norms[0]),
            "short": float(gradient_norms[SHORT_STEPS - 1]),
            "long": float(gradient_norms[-1]),
            "smallest": float(gradient_norms[smallest]),
            "smallest_at_step": smallest,
        },
        "final_loss": float(losses[-1]),
        "lstsq": {"slope": float(lstsq_slope), "intercept": float(lstsq_intercept)},
        "fits": [
            {
                "steps": SHORT_STEPS,
                "slope": float(theta_short[0]),
                "intercept": float(theta_short[1]),
                "slope_gap": abs(float(theta_short[0] - lstsq_slope)),
                "intercept_gap": abs(float(theta_short[1] - lstsq_intercept)),
            },
            {
                "steps": steps,
                "slope": float(theta_long[0]),
                "intercept": float(theta_long[1]),
                "slope_gap": abs(float(theta_long[0] - lstsq_slope)),
                "intercept_gap": abs(float(theta_long[1] - lstsq_intercept)),
            },
        ],
    }
    results["figures"] = {
        "fit": figures.save(plot_fit(x, y, results), "regression_fit"),
        "loss": figures.save(plot_loss(losses[:SHORT_STEPS]), "regression_loss"),
        "gradient_norm_short": figures.save(
            plot_gradient_norm(gradient_norms[:SHORT_STEPS]), "regression_gradnorm_short"
        ),
        "gradient_norm_long": figures.save(plot_gradient_norm(gradient_norms), "regression_gradnorm_long"),
    }
    results["seed_comparisons"], results["loss_log_comparisons"] = _comparisons(results)
    return results


def _comparisons(results: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    log_rows = [
        seeds.compare_printed(
            f"regression.loss_{entry['step']}",
            seeds.FOUNDATIONS_REGRESSION,
            f"loss at step {entry['step']}",
            printed,
            entry["loss"],
        )
        for entry, printed in zip(results["loss_log"], SEED_LOSS_LOG, strict=True)
    ]
    long_fit = results["fits"][-1]
    long_note = "" if long_fit["steps"] == 50_000 else f"after {long_fit['steps']:,} steps (the seed ran 50,000); "
    lstsq = results["lstsq"]
    records = [
        seeds.compare("regression.initial_loss", results["initial"]["loss"]),
        seeds.compare("regression.initial_grad_slope", results["initial"]["grad_slope"]),
        seeds.compare("regression.initial_grad_intercept", results["initial"]["grad_intercept"]),
        seeds.summarise(
            "regression.loss_log",
            "the loss printed every 50 steps, steps 0–950",
            seeds.FOUNDATIONS_REGRESSION,
            log_rows,
        ),
        seeds.compare(
            "regression.converged_step",
            results["settled_logged_step"],
            f"first printed step from which the 4-decimal loss stays put; step by step: {results['settled_step']}",
        ),
        seeds.compare("regression.grad_slope_1000", results["last_short_gradient"]["slope"]),
        seeds.compare("regression.grad_intercept_1000", results["last_short_gradient"]["intercept"]),
        seeds.compare("regression.lstsq_slope", lstsq["slope"], _ulps_apart("regression.lstsq_slope", lstsq["slope"])),
        seeds.compare(
            "regression.lstsq_intercept",
            lstsq["intercept"],
            _ulps_apart("regression.lstsq_intercept", lstsq["intercept"]),
        ),
        seeds.compare(
            "regression.slope_gap",
            long_fit["slope_gap"],
            long_note + _gap_in_ulps(long_fit["slope_gap"], "regression.slope_gap", lstsq["slope"]),
        ),
        seeds.compare(
            "regression.intercept_gap",
            long_fit["intercept_gap"],
            long_note + _gap_in_ulps(long_fit["intercept_gap"], "regression.intercept_gap", lstsq["intercept"]),
        ),
    ]
    return records, log_rows


def _ulps_apart(key: str, measured: float) -> str:
    seed = seeds.FIGURES[key].value
    if seeds.FIGURES[key].rule.agrees(measured, seed):
        return ""
    ulps = abs(measured - seed) / np.spacing(seed)
    return f"{ulps:.0f} ulp from the seed's value; lstsq rounds differently across LAPACK builds"


def _gap_in_ulps(gap: float, key: str, parameter: float) -> str:
    ulp = np.spacing(parameter)
    return f"{gap / ulp:.0f} ulp of the parameter here, {seeds.FIGURES[key].value / ulp:.0f} ulp in the seed"


@styled
def plot_fit(x: np.ndarray, y: np.ndarray, results: dict[str, Any]) -> Figure:
    figure, axes = new_figure(9.0, 4.3)
    axes.scatter(x[:, 0], y[:, 0], s=22, color="#7f8fa6", alpha=0.85, label="data (numpy seed 0)")
    line_x = np.array([0.0, 2.0])
    initial = results["initial"]
    axes.plot(
        line_x,
        initial["slope"] * line_x + initial["intercept"],
        color="#aaaaaa",
        linestyle=":",
        label=f"initial line: y = {initial['slope']:.2f}x + {initial['intercept']:.2f}",
    )
    short = results["fits"][0]
    axes.plot(
        line_x,
        short["slope"] * line_x + short["intercept"],
        color=OURS_COLOR,
        linewidth=3,
        alpha=0.8,
        label=f"gradient descent, {short['steps']:,} steps: y = {short['slope']:.4f}x + {short['intercept']:.4f}",
    )
    lstsq = results["lstsq"]
    axes.plot(
        line_x,
        lstsq["slope"] * line_x + lstsq["intercept"],
        color=SEED_COLOR,
        linestyle="--",
        label=f"numpy.linalg.lstsq: y = {lstsq['slope']:.4f}x + {lstsq['intercept']:.4f}",
    )
    axes.set_xlabel("x")
    axes.set_ylabel("y")
    axes.set_title("Fitted line")
    axes.legend(loc="upper left")
    return figure


@styled
def plot_loss(losses: np.ndarray) -> Figure:
    figure, axes = new_figure(5.8, 3.9)
    axes.plot(np.arange(len(losses)), losses, color=OURS_COLOR)
    axes.set_xlabel("step")
    axes.set_ylabel("mean squared error")
    axes.set_title(f"Loss, gradient descent lr {LEARNING_RATE}")
    return figure


@styled
def plot_gradient_norm(norms: np.ndarray) -> Figure:
    figure, axes = new_figure(5.8, 3.9)
    axes.semilogy(np.arange(len(norms)), norms, color=OURS_COLOR)
    axes.set_xlabel("step")
    axes.set_ylabel("‖∇MSE‖ (log scale)")
    axes.set_title(f"Gradient norm over {len(norms):,} steps")
    return figure


def render(results: dict[str, Any]) -> str:
    initial = results["initial"]
    short, long = results["fits"][0], results["fits"][-1]
    lstsq = results["lstsq"]
    norms = results["gradient_norm"]
    parts = [
        (
            f"<p>{len(results['x'])} points drawn as {h.esc(seeds.ZERO_TO_HERO_ARTICLE)} draws them, fitted by {h.code('scratchopt.SGD')} with "
            f"lr {results['learning_rate']} on the mean squared error (float64, gradients by autograd). The initial "
            f"line y = {h.fixed(initial['slope'], 4)}x + {h.fixed(initial['intercept'], 4)} has MSE "
            f"{h.fixed(initial['loss'], 4)}. After {short['steps']:,} steps the printed loss has settled: rounded to "
            f"{results['loss_decimals']} decimals it no longer changes from step {results['settled_step']} on "
            f"(from step {results['settled_logged_step']} in a log every {results['log_every']} steps). The gradient "
            f"norm keeps falling long after the loss looks flat — {h.num(norms['short'])} at step "
            f"{short['steps'] - 1:,}, {h.num(norms['long'])} at step {long['steps'] - 1:,}; its smallest value, "
            f"{h.num(norms['smallest'])}, comes at step {norms['smallest_at_step']:,}, where float64 rounding takes "
            "over.</p>"
        ),
        h.figure(
            results["figures"]["fit"],
            "The data, the initial line, the fitted line and numpy's least-squares line (they coincide).",
        ),
        h.figure_grid(
            [
                h.figure(results["figures"]["loss"], f"Mean squared error over the first {short['steps']:,} steps."),
                h.figure(
                    results["figures"]["gradient_norm_short"],
                    f"Gradient norm, log scale, over {short['steps']:,} steps: still falling.",
                ),
                h.figure(
                    results["figures"]["gradient_norm_long"],
                    f"Gradient norm, log scale, over {long['steps']:,} steps: it bottoms out at rounding level.",
                ),
            ]
        ),
        "<h3>Against numpy.linalg.lstsq</h3>",
        h.table(
            ["", "slope", "intercept", "|slope − lstsq|", "|intercept − lstsq|"],
            [
                [
                    h.esc(f"gradient descent, {fit['steps']:,} steps"),
                    h.fixed(fit["slope"], 15),
                    h.fixed(fit["intercept"], 15),
                    h.num(fit["slope_gap"], 4),
                    h.num(fit["intercept_gap"], 4),
                ]
                for fit in results["fits"]
            ]
            + [["numpy.linalg.lstsq", h.fixed(lstsq["slope"], 15), h.fixed(lstsq["intercept"], 15), "", ""]],
            numeric=(1, 2, 3, 4),
        ),
        "<h3>Beside the seed</h3>",
        h.comparison_table(results["seed_comparisons"]),
        h.details("Seed's printed loss log, every 50 steps", h.comparison_table(results["loss_log_comparisons"])),
    ]
    return "".join(parts)
