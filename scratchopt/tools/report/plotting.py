"""Figures for the report: one house style, written as PNG files beside ``index.html``.

Figures are built with :class:`matplotlib.figure.Figure` directly, never through ``pyplot``, so that
building a report neither needs a display nor switches the backend of a program that imports us.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

#: Sized for a figure shown about 1000 px wide: labels stay readable at half width too.
#: Keyed by rcParams name (typed Any: matplotlib's stubs spell every name out as a Literal).
STYLE: dict[Any, Any] = {
    "font.size": 12,
    "axes.titlesize": 13,
    "axes.titleweight": "bold",
    "axes.labelsize": 12,
    "xtick.labelsize": 11,
    "ytick.labelsize": 11,
    "legend.fontsize": 10.5,
    "legend.framealpha": 0.9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linestyle": "--",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 2.0,
    "savefig.dpi": 130,
}
OURS_COLOR = "#1f77b4"
TORCH_COLOR = "#222222"
SEED_COLOR = "#d62728"
#: Tick labels of a log axis as plain numbers (0.5, 2) rather than 5×10⁻¹.
PLAIN = FuncFormatter(lambda value, _: f"{value:g}")


Plot = TypeVar("Plot", bound=Callable[..., Any])


def styled(plot: Plot) -> Plot:
    """Run a plotting function under the house style (matplotlib reads rcParams while drawing too)."""

    @functools.wraps(plot)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with matplotlib.rc_context(STYLE):
            return plot(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def new_figure(width: float = 7.5, height: float = 4.5, ncols: int = 1, nrows: int = 1) -> tuple[Figure, Any]:
    """A figure with ``nrows`` × ``ncols`` axes, laid out so nothing is clipped (call it when styled)."""
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots(nrows, ncols)


class FigureWriter:
    """Saves figures under ``out_dir/figures`` and remembers them for ``results.json``."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.directory = out_dir / "figures"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.saved: list[str] = []

    def save(self, figure: Figure, name: str) -> str:
        """Write ``figure`` as ``figures/<name>.png``; returns that path, relative to the page."""
        relative = f"figures/{name}.png"
        with matplotlib.rc_context(STYLE):
            figure.savefig(self.out_dir / relative)
        self.saved.append(relative)
        return relative
