"""Every figure the seed articles state, and the rule by which a measured value is held against it.

The seed articles print their numbers rounded; a measured value *matches* when it
agrees with the printed figure to the precision the seed printed it (or by the stated rule where a
figure is approximate or a claim in words). Nothing here feeds back into a run: the runs use the seeds'
settings, and what they produce is reported whether it matches or not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MATCHES = "matches"
DIFFERS = "differs"


@dataclass(frozen=True)
class Rule:
    """How a measured value is compared with a seed's figure.

    ``kind`` is one of: ``exact`` (integers, words), ``decimals`` (agree when rounded to ``digits``
    decimals, the precision the seed printed), ``significant`` (agree to ``digits`` significant digits),
    ``within`` (|measured − seed| ≤ ``tolerance``), ``factor`` (measured / seed within ``tolerance``×
    either way), ``zero`` (a claim of equality with torch: holds when the measured difference is 0).
    """

    kind: str
    digits: int = 0
    tolerance: float = 0.0
    why: str = ""

    def agrees(self, measured: Any, seed: Any) -> bool:
        if measured is None:
            return False
        if self.kind == "exact":
            return measured == seed
        if self.kind == "zero":
            return measured == 0
        if isinstance(measured, str) or not math.isfinite(measured):
            return False
        if self.kind == "decimals":
            # Half a unit in the last printed place, plus room for the seed's own rounding of a tie.
            return abs(measured - seed) <= 0.5 * 10.0**-self.digits * (1 + 1e-9)
        if self.kind == "significant":
            scale = 10.0 ** (math.floor(math.log10(abs(seed))) - self.digits + 1)
            return abs(measured - seed) <= 0.5 * scale * (1 + 1e-9)
        if self.kind == "within":
            return abs(measured - seed) <= self.tolerance
        if self.kind == "factor":
            return seed > 0 and measured > 0 and max(measured / seed, seed / measured) <= self.tolerance
        raise ValueError(f"unknown rule kind {self.kind!r}")

    def describe(self) -> str:
        text = {
            "exact": "equal",
            "decimals": f"equal when rounded to {self.digits} decimals (as printed)",
            "significant": f"equal to {self.digits} significant digits",
            "within": f"within ±{self.tolerance:,g}",
            "factor": f"within a factor {self.tolerance:g}",
            "zero": "ours shows no difference from torch (0.0)",
        }[self.kind]
        return f"{text}: {self.why}" if self.why else text

    def display(self, value: Any) -> str:
        """The measured value written at the precision the comparison uses."""
        if value is None:
            return "not measured"
        if isinstance(value, str):
            return value
        if self.kind == "decimals":
            text = f"{value:.{self.digits}f}"
            return "0." + "0" * self.digits if text.startswith("-") and float(text) == 0 else text
        if self.kind == "significant":
            return f"{value:.{self.digits + 2}g}"
        if self.kind == "factor":
            return f"{value:.2f}x"
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e15):
            return f"{int(value):,}"
        return f"{value:.4g}"


@dataclass(frozen=True)
class SeedFigure:
    key: str
    source: str  # which seed, and where in it
    what: str
    value: Any  # the figure as a number (or words)
    printed: str  # the figure exactly as the seed prints it
    rule: Rule


def _decimals(printed: str) -> int:
    return len(printed.split(".")[1]) if "." in printed else 0


def _printed(key: str, source: str, what: str, printed: str, why: str = "") -> SeedFigure:
    """A number the seed prints: compared to as many decimals as it printed."""
    return SeedFigure(key, source, what, float(printed), printed, Rule("decimals", _decimals(printed), why=why))


#: The seed articles, by title: four blog posts on writing optimizers from scratch, which the report's
#: runs re-create. They are not shipped; the figures they print are transcribed below, each with the
#: article and the section it comes from.
OPTIMIZERS_ARTICLE = "“Optimizers: math, implementations and efficiency”"
ZERO_TO_HERO_ARTICLE = "“From ZeRO to Hero: Rebuilding FSDP From Scratch”"
ADAM_ARTICLE = "“Who’s Adam? Why should we care about his friends?”"
CUSTOMIZE_ARTICLE = "“Customize optimizer in PyTorch”"
ARTICLES = (OPTIMIZERS_ARTICLE, ZERO_TO_HERO_ARTICLE, ADAM_ARTICLE, CUSTOMIZE_ARTICLE)

FOUNDATIONS_SGD = f"{ZERO_TO_HERO_ARTICLE}, “Stochastic Gradient Descent”"
FOUNDATIONS_MOMENTUM = f"{ZERO_TO_HERO_ARTICLE}, “SGD With Momentum”"
FOUNDATIONS_NAG = f"{ZERO_TO_HERO_ARTICLE}, “Nesterov’s Accelerated Gradient”"
FOUNDATIONS_NEWTON = f"{ZERO_TO_HERO_ARTICLE}, “Newton’s method”"
FOUNDATIONS_REGRESSION = f"{ZERO_TO_HERO_ARTICLE}, “Example: Linear Regression” and “Analyzing Convergence”"

# --- Section 1: f(x) = sin(x) + x²/10 -------------------------------------------------------------
NEWTON_TABLE = (  # the article prints, for i = 0..11: x_{i+1}, then f, f′, f″ at x_i
    ("-5.94388576", "3.45892", "-0.71634", "-0.75892"),
    ("-7.79433605", "3.86580", "-0.24579", "-0.13283"),
    ("-6.54310103", "5.07695", "-1.49926", "1.19822"),
    ("-5.79428433", "4.02422", "-0.34221", "0.45700"),
    ("-6.81783809", "3.82703", "-0.27601", "-0.26966"),
    ("-6.10875844", "4.13875", "-0.50312", "0.70954"),
    ("2.84660556", "3.90524", "-0.23693", "0.02646"),
    ("-1.42425821", "1.10104", "-0.38748", "-0.09073"),
    ("-1.30751773", "-0.78643", "-0.13884", "1.18928"),
    ("-1.30644014", "-0.79458", "-0.00126", "1.16554"),
    ("-1.30644001", "-0.79458", "-0.00000", "1.16526"),
    ("-1.30644001", "-0.79458", "-0.00000", "1.16526"),
)
GD_FROM_MINUS_8_TABLE = (  # the article prints x_i, f(x_i), f′(x_i) for i = 0..16
    ("-8.0000", "5.4106", "-1.7455"),
    ("-6.2545", "3.9406", "-0.2513"),
    ("-6.0032", "3.8802", "-0.2396"),
    ("-5.7636", "3.8184", "-0.2847"),
    ("-5.4789", "3.7222", "-0.4021"),
    ("-5.0768", "3.5117", "-0.6590"),
    ("-4.4178", "2.9086", "-1.1739"),
    ("-3.2439", "1.1544", "-1.6435"),
    ("-1.6003", "-0.7435", "-0.3496"),
    ("-1.2507", "-0.7928", "0.0645"),
    ("-1.3152", "-0.7945", "-0.0102"),
    ("-1.3050", "-0.7946", "0.0017"),
    ("-1.3067", "-0.7946", "-0.0003"),
    ("-1.3064", "-0.7946", "0.0000"),
    ("-1.3064", "-0.7946", "-0.0000"),
    ("-1.3064", "-0.7946", "0.0000"),
    ("-1.3064", "-0.7946", "-0.0000"),
)
#: Momentum runs: the seed prints x, f(x), f′(x) at “Step 101” and “Step 201”, i.e. at x_100 and x_200.
MOMENTUM_CHECKPOINTS = {
    8.0: ((100, "-1.2908", "-0.7944", "0.0182"), (200, "-1.3065", "-0.7946", "-0.0001")),
    -8.0: ((100, "-1.2936", "-0.7945", "0.0150"), (200, "-1.3064", "-0.7946", "0.0001")),
}

_STEP_COUNT_WHY = "the seed's loop and criterion, |x − x*| ≤ 1e-6"
FIGURES: dict[str, SeedFigure] = {
    figure.key: figure
    for figure in (
        _printed("toy.x_star", FOUNDATIONS_NEWTON, "global minimiser x* of f", "-1.30644001"),
        _printed("toy.f_x_star", FOUNDATIONS_SGD, "f(x*)", "-0.79458"),
        _printed("toy.f_at_minus_8", FOUNDATIONS_SGD, "f(−8)", "5.4106"),
        _printed("toy.df_at_minus_8", FOUNDATIONS_SGD, "f′(−8)", "-1.7455"),
        _printed("toy.f_at_plus_8", FOUNDATIONS_SGD, "f(8)", "7.3894"),
        _printed("toy.df_at_plus_8", FOUNDATIONS_SGD, "f′(8)", "1.4545"),
        _printed("toy.newton.final_x", FOUNDATIONS_NEWTON, "Newton from −5: x after 12 iterations", "-1.30644001"),
        SeedFigure(
            "toy.gd_from_-8.count",
            FOUNDATIONS_SGD,
            "gradient descent lr 1 from −8: steps to converge",
            16,
            "16",
            Rule("exact", why=_STEP_COUNT_WHY),
        ),
        _printed("toy.gd_from_-8.final_x", FOUNDATIONS_SGD, "gradient descent from −8: final x", "-1.30644"),
        _printed("toy.gd_from_-8.final_f", FOUNDATIONS_SGD, "gradient descent from −8: final f(x)", "-0.79458"),
        SeedFigure(
            "toy.gd_from_+8.count",
            FOUNDATIONS_SGD,
            "gradient descent lr 1 from +8: outcome after 20 steps",
            "did not converge",
            "We failed to converge after 20 steps!",
            Rule("exact"),
        ),
        _printed("toy.gd_from_+8.x1", FOUNDATIONS_SGD, "gradient descent from +8: x after one step", "6.5455"),
        _printed(
            "toy.gd_from_+8.final_x",
            FOUNDATIONS_SGD,
            "gradient descent from +8: x after 20 steps (local minimum)",
            "3.83747",
        ),
        _printed("toy.gd_from_+8.final_f", FOUNDATIONS_SGD, "gradient descent from +8: f(x) after 20 steps", "0.83156"),
        _printed(
            "toy.gd_from_+8.final_distance",
            FOUNDATIONS_SGD,
            "gradient descent from +8: |x − x*| after 20 steps",
            "5.14391",
        ),
        SeedFigure(
            "toy.momentum_from_+8.count",
            FOUNDATIONS_MOMENTUM,
            "momentum lr 0.1, μ 0.9 from +8: steps to converge",
            216,
            "216",
            Rule("exact", why=_STEP_COUNT_WHY),
        ),
        SeedFigure(
            "toy.momentum_from_-8.count",
            FOUNDATIONS_MOMENTUM,
            "momentum lr 0.1, μ 0.9 from −8: steps to converge",
            222,
            "222",
            Rule("exact", why=_STEP_COUNT_WHY),
        ),
        SeedFigure(
            "toy.lookahead_from_-8.count",
            FOUNDATIONS_NAG,
            "Nesterov, lookahead form, lr 1, μ 0.9 from −8: steps",
            34,
            "34",
            Rule("exact", why=_STEP_COUNT_WHY),
        ),
        SeedFigure(
            "toy.lookahead_from_+8.count",
            FOUNDATIONS_NAG,
            "Nesterov, lookahead form, lr 1, μ 0.9 from +8: steps",
            27,
            "27",
            Rule("exact", why=_STEP_COUNT_WHY),
        ),
        SeedFigure(
            "toy.torch_nesterov_from_+8.count",
            FOUNDATIONS_NAG,
            "Nesterov, torch's form, lr 1, μ 0.9 from +8: steps",
            27,
            "27",
            Rule("exact", why=_STEP_COUNT_WHY),
        ),
        # --- Section 2: linear regression ----------------------------------------------------------
        _printed(
            "regression.initial_loss", FOUNDATIONS_REGRESSION, "MSE of the initial random line", "20.0717103178283"
        ),
        _printed("regression.initial_grad_slope", FOUNDATIONS_REGRESSION, "initial ∂MSE/∂slope", "-2.2857"),
        _printed("regression.initial_grad_intercept", FOUNDATIONS_REGRESSION, "initial ∂MSE/∂intercept", "2.6574"),
        SeedFigure(
            "regression.converged_step",
            FOUNDATIONS_REGRESSION,
            "“converged after around 500 steps” (lr 0.05; loss printed to 4 decimals every 50 steps)",
            500,
            "around 500",
            Rule("within", tolerance=50, why="the seed prints the loss every 50 steps"),
        ),
        SeedFigure(
            "regression.grad_slope_1000",
            FOUNDATIONS_REGRESSION,
            "∂MSE/∂slope at the last of 1,000 steps",
            -2.1220866065416611e-07,
            "-2.1220866065416611e-07",
            Rule("significant", 6),
        ),
        SeedFigure(
            "regression.grad_intercept_1000",
            FOUNDATIONS_REGRESSION,
            "∂MSE/∂intercept at the last of 1,000 steps",
            2.3915423344789135e-07,
            "2.3915423344789135e-07",
            Rule("significant", 6),
        ),
        _printed("regression.lstsq_slope", FOUNDATIONS_REGRESSION, "numpy.linalg.lstsq slope", "2.968467510701021"),
        _printed(
            "regression.lstsq_intercept", FOUNDATIONS_REGRESSION, "numpy.linalg.lstsq intercept", "4.222151077447227"
        ),
        SeedFigure(
            "regression.slope_gap",
            FOUNDATIONS_REGRESSION,
            "|slope by gradient descent − lstsq slope|",
            1.9984014443252818e-14,
            "1.9984014443252818e-14",
            Rule("significant", 2),
        ),
        SeedFigure(
            "regression.intercept_gap",
            FOUNDATIONS_REGRESSION,
            "|intercept by gradient descent − lstsq intercept|",
            2.398081733190338e-14,
            "2.398081733190338e-14",
            Rule("significant", 2),
        ),
        # --- Section 3: ours vs torch on a real model -----------------------------------------------
        SeedFigure(
            "parity.SGD",
            f"{OPTIMIZERS_ARTICLE}, “Customized SGD”",
            "SGD: learning curve equal to torch's",
            "exactly the same",
            "exactly the same as PyTorch's built-in SGD",
            Rule("zero"),
        ),
        SeedFigure(
            "parity.SGD_momentum",
            f"{OPTIMIZERS_ARTICLE}, “Customized SGD with Momentum”",
            "SGD with momentum: learning curve equal to torch's",
            "matches",
            "matches PyTorch's SGD with Momentum",
            Rule("zero"),
        ),
        SeedFigure(
            "parity.Adam",
            f"{OPTIMIZERS_ARTICLE}, “Customized Adam”",
            "Adam: learning curve equal to torch's",
            "exactly the same",
            "exactly the same learning curve as PyTorch's built-in Adam",
            Rule("zero"),
        ),
        SeedFigure(
            "parity.RMSprop",
            f"{ADAM_ARTICLE}, “Introduction” (fig-1)",
            "RMSprop: learning curve beside torch's",
            "comparable",
            "results are comparable",
            Rule("zero"),
        ),
        # --- Section 5: memory and compute ---------------------------------------------------------
        SeedFigure(
            "memory.fp16_bytes",
            f"{ZERO_TO_HERO_ARTICLE}, SGD with momentum, “Memory & Compute Analysis”",
            "bytes per FP16 parameter",
            2,
            "FP16 (2 bytes / parameters)",
            Rule("exact"),
        ),
        SeedFigure(
            "memory.momentum_1b_fp16_total",
            f"{ZERO_TO_HERO_ARTICLE}, SGD with momentum, “Memory & Compute Analysis”",
            "SGD with momentum, 1,000,000,000 FP16 parameters: parameters + gradients + momentum",
            6.0,
            "6GB",
            Rule("within", tolerance=0.5, why="in GB (10⁹ bytes); the seed gives whole GB"),
        ),
        SeedFigure(
            "memory.sgd_state",
            f"{CUSTOMIZE_ARTICLE}, “step method”",
            "bytes of optimizer state SGD keeps (no momentum)",
            0,
            "for SGD, the state is empty",
            Rule("exact"),
        ),
        SeedFigure(
            "memory.adam_state_tensors",
            f"{CUSTOMIZE_ARTICLE}, “step method”",
            "parameter-sized state tensors Adam keeps (m and v)",
            2,
            "the state includes … m and v",
            Rule("exact"),
        ),
        SeedFigure(
            "compute.sgd_passes",
            f"{ZERO_TO_HERO_ARTICLE}, SGD, “Memory & Compute Analysis”",
            "elementwise operations per parameter in a plain SGD step",
            2,
            "a scalar multiplication (learning rate * gradient) and subtract the result",
            Rule("exact"),
        ),
        SeedFigure(
            "compute.linear",
            f"{ZERO_TO_HERO_ARTICLE}, “Memory & Compute Analysis” of momentum and NAG",
            "SGD, momentum and Nesterov: elementwise work only, O(n)",
            "O(n)",
            "all of our computations are element-wise",
            Rule("exact"),
        ),
    )
}
#: The step-time table of the optimizers article (“use torch._foreach_”): a 2000-layer MLP on a T4 GPU.
SEED_STEP_TIMES = (  # (row as the seed names it, seconds per step, speed-up over mySGD)
    ("mySGD", 0.080922, 1.00),
    ("mySGD + torch.compile", 0.060843, 1.33),
    ("mySGD + foreach", 0.053214, 1.52),
    ("mySGD + foreach + torch.compile", 0.018934, 4.27),
    ("mySGD + (best)", 0.006818, 11.87),
    ("torch SGD", 0.010875, 7.44),
    ("torch SGD with fused", 0.007642, 10.59),
    ("torch SGD with foreach", 0.008306, 9.74),
)
SEED_STEP_TIME_SOURCE = f"{OPTIMIZERS_ARTICLE}, “use torch._foreach_” (2000-layer MLP, T4 GPU)"
#: A speed-up is compared within this factor: the seed ran on a T4 GPU, this report on the CPU.
SPEEDUP_FACTOR = 1.25


def compare(key: str, measured: Any, note: str = "") -> dict[str, Any]:
    """A JSON record of one seed figure beside the measured value."""
    figure = FIGURES[key]
    return _record(figure.key, figure.source, figure.what, figure.value, figure.printed, figure.rule, measured, note)


def compare_like(figure_key: str, key: str, what: str, measured: Any, note: str = "") -> dict[str, Any]:
    """A seed figure that stands for several runs (the seed states one final x for all that converge)."""
    figure = FIGURES[figure_key]
    return _record(key, figure.source, what, figure.value, figure.printed, figure.rule, measured, note)


def compare_value(
    key: str, source: str, what: str, seed: Any, printed: str, rule: Rule, measured: Any, note: str = ""
) -> dict[str, Any]:
    """Like :func:`compare` for a figure from one of the seeds' tables (Newton's iterates, the loss log …)."""
    return _record(key, source, what, seed, printed, rule, measured, note)


def compare_printed(key: str, source: str, what: str, printed: str, measured: float | None) -> dict[str, Any]:
    """A table entry the seed printed to some decimals, compared to that many decimals."""
    return _record(key, source, what, float(printed), printed, Rule("decimals", _decimals(printed)), measured, "")


def _record(
    key: str, source: str, what: str, seed: Any, printed: str, rule: Rule, measured: Any, note: str
) -> dict[str, Any]:
    return {
        "key": key,
        "source": source,
        "what": what,
        "seed": seed,
        "seed_printed": printed,
        "measured": measured,
        "measured_printed": rule.display(measured),
        "rule": rule.describe(),
        "verdict": MATCHES if rule.agrees(measured, seed) else DIFFERS,
        "note": note,
    }


def summarise(key: str, what: str, source: str, rows: list[dict[str, Any]], note: str = "") -> dict[str, Any]:
    """One record standing for a whole table of comparisons (it matches when every entry does)."""
    agreeing = sum(row["verdict"] == MATCHES for row in rows)
    return {
        "key": key,
        "source": source,
        "what": what,
        "seed": len(rows),
        "seed_printed": f"{len(rows)} printed values",
        "measured": agreeing,
        "measured_printed": f"{agreeing} of {len(rows)} agree",
        "rule": "every entry equal at the precision the seed printed it",
        "verdict": MATCHES if agreeing == len(rows) else DIFFERS,
        "note": note,
    }
