"""Run the report's sections, write ``results.json``, then render ``index.html`` from that JSON alone.

The page is rendered from the JSON as read back from disk, never from live objects, so every number
the page shows is one that ``results.json`` holds; ``json.dumps(allow_nan=False)`` makes a NaN or an
infinity fail the build instead of reaching the file.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from tqdm import tqdm

from scratchopt.algorithms import ALGORITHMS
from scratchopt.tools.presets import preset as named_preset
from scratchopt.tools.report import beyond_adamw, low_precision, memory, regression, speed, torch_parity, toy
from scratchopt.tools.report import html as h
from scratchopt.tools.report.plotting import FigureWriter
from scratchopt.tools.report.seed_figures import MATCHES

SECTIONS: tuple[ModuleType, ...] = (toy, regression, torch_parity, beyond_adamw, low_precision, speed, memory)
SUMMARY_ANCHOR = "seed-figures"
#: The report runs torch single-threaded. Its tensors are small, so a second intra-op thread gains little,
#: and on a machine with few cores it stalls whenever another process holds the other one: step times turn
#: erratic (an optimizer many times slower than its twin) and the digits training much slower.
REPORT_THREADS = 1


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with ``count`` intra-op threads, restoring torch's setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build_report(out_dir: Path | str, preset: str = "full", show_progress: bool = True) -> dict[str, Any]:
    """Build the report into ``out_dir`` (``index.html``, ``results.json``, ``figures/``); returns the results."""
    settings = named_preset(preset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = FigureWriter(out)
    for stale in figures.directory.glob("*.png"):  # figures of an earlier build that this one may not redo
        stale.unlink()
    bar = functools.partial(tqdm, leave=False, disable=not show_progress, file=sys.stderr, dynamic_ncols=True)
    started = time.perf_counter()
    sections: dict[str, Any] = {}
    timings: dict[str, float] = {}
    with (
        torch_threads(REPORT_THREADS),
        tqdm(
            SECTIONS, desc="scratchopt report", disable=not show_progress, file=sys.stderr, dynamic_ncols=True
        ) as progress,
    ):
        for module in progress:
            progress.set_postfix_str(module.TITLE)
            section_started = time.perf_counter()
            sections[module.ANCHOR] = module.run(settings, figures, bar)
            timings[module.ANCHOR] = time.perf_counter() - section_started
    results = {
        "meta": {
            "preset": settings.as_json(),
            "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch_threads": REPORT_THREADS,
            "algorithms": list(ALGORITHMS),
            "section_seconds": timings,
            "build_seconds": time.perf_counter() - started,
        },
        "sections": sections,
        "figures": figures.saved,
    }
    text = json.dumps(results, indent=1, ensure_ascii=False, allow_nan=False)
    (out / "results.json").write_text(text, encoding="utf-8")
    (out / "index.html").write_text(render_page(json.loads(text)), encoding="utf-8")
    return results


def all_comparisons(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [record for module in SECTIONS for record in results["sections"][module.ANCHOR]["seed_comparisons"]]


def render_page(results: dict[str, Any]) -> str:
    """The whole page, from the content of ``results.json``."""
    meta = results["meta"]
    records = all_comparisons(results)
    matching = sum(record["verdict"] == MATCHES for record in records)
    differing = [record for record in records if record["verdict"] != MATCHES]
    toc = [(module.ANCHOR, module.TITLE) for module in SECTIONS]
    toc.append((SUMMARY_ANCHOR, "Every seed figure beside the measured one"))
    subtitle = (
        f"scratchopt's optimizers against the seed articles and against <code>torch.optim</code>. Preset "
        f"<strong>{h.esc(meta['preset']['name'])}</strong>, built in {meta['build_seconds']:.0f} s on "
        f"{meta['generated']} with torch {h.esc(meta['torch'])} on the CPU ({meta['cpu_count']} cores, torch "
        f"limited to {meta['torch_threads']} thread), Python "
        f"{h.esc(meta['python'])}. All numbers: "
        '<a href="results.json">results.json</a>.'
    )
    overview = [
        '<div class="summary-cards">',
        _card(str(len(records)), "seed figures checked"),
        _card(str(matching), "match"),
        _card(str(len(differing)), "differ (shown with the measured value)"),
        _card(str(len(meta["algorithms"])), "scratchopt algorithms"),
        "</div>",
    ]
    if differing:
        overview.append("<p>Where a seed's figure is not reproduced:</p>")
        overview.append(h.comparison_table(differing, show_source=True))
    body = ["".join(overview)]
    for number, module in enumerate(SECTIONS, start=1):
        body.append(h.section(module.ANCHOR, number, module.TITLE, module.render(results["sections"][module.ANCHOR])))
    body.append(
        h.section(
            SUMMARY_ANCHOR,
            len(SECTIONS) + 1,
            "Every seed figure beside the measured one",
            "<p>Each figure a seed states, the value measured here, and the rule used to compare them. A figure that "
            "differs is reported as measured: no run is tuned toward a seed's number.</p>"
            + h.comparison_table(records, show_source=True),
        )
    )
    return h.page("scratchopt report", subtitle, toc, "".join(body))


def _card(value: str, label: str) -> str:
    return f'<div class="card"><div class="big">{h.esc(value)}</div><div class="label">{h.esc(label)}</div></div>'
