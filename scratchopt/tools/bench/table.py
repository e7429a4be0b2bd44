"""The benchmark's results as text, files and a chart: the Markdown tables the command prints,
``bench.json``, ``bench.csv`` (one line per row and column) and ``bench.png``."""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

from scratchopt.tools.bench.columns import DEFAULT_MODE, MODES, OURS_FUSED, TORCH_FUSED
from scratchopt.tools.bench.run import Row
from scratchopt.tools.workloads import model_size


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _times(row: dict[str, Any], column: str) -> str:
    step = row["step_ms"].get(column)
    return "—" if step is None else f"{_ms(step)} / {_ms(row['train_ms'][column])}"


def format_row(row: Row, columns: list[str]) -> str:
    """One line of progress: the row's medians and how ours fused compares."""
    cells = [f"{c}={_ms(row.step_ms.get(c))}" for c in columns]
    speedup = row.ratio(TORCH_FUSED, OURS_FUSED)
    fused = row.step_ms.get(OURS_FUSED)
    summary = f"; roofline {row.roofline_ms:.2f} ms"
    if fused and row.roofline_ms:
        summary += f", ours fused at {fused / row.roofline_ms:.2f}× roofline"
    if speedup:
        summary += f", torch fused ÷ ours fused {speedup:.2f}×"
    failed = [f"{c}: {note}" for c, note in row.notes.items() if note.startswith("failed")]
    return (
        f"[{row.workload}, {row.mode}] {row.algorithm} ({row.seconds:.1f} s) opt.step() ms: "
        + ", ".join(cells)
        + summary
        + "".join(f"\n    {line}" for line in failed)
    )


def table(results: dict[str, Any]) -> str:
    """The results as Markdown: per workload and mode, medians of opt.step() / whole train step; then details."""
    columns = results["meta"]["columns"]
    lines = []
    for workload, info in results["workloads"].items():
        rows = [r for r in results["rows"] if r["workload"] == workload]
        if not rows:
            continue
        lines.append(f"\n### {workload}: {info['description']} ({model_size(info['tensors'], info['numel'])})")
        for mode in dict.fromkeys(r["mode"] for r in rows):
            lines.append(f"\n{MODES[mode].label} — median ms: opt.step() / whole train step\n")
            header = [
                "algorithm",
                *columns,
                "roofline ms (B/param)",
                "torch fused ÷ ours fused",
                "ours fused ÷ roofline",
            ]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for r in (r for r in rows if r["mode"] == mode):
                fused, torch_fused = r["step_ms"].get(OURS_FUSED), r["step_ms"].get(TORCH_FUSED)
                cells = [
                    r["algorithm"],
                    *(_times(r, c) for c in columns),
                    f"{r['roofline_ms']:.2f} ({r['traffic_B_per_param']:.0f})",
                    f"{torch_fused / fused:.2f}×" if fused and torch_fused else "—",
                    f"{fused / r['roofline_ms']:.2f}×" if fused and r["roofline_ms"] else "—",
                ]
                lines.append("| " + " | ".join(cells) + " |")
        details = [r for r in rows if r["mode"] == DEFAULT_MODE]
        if details:
            lines.append(
                f"\ndetails ({MODES[DEFAULT_MODE].label}; parameters compared after "
                f"{details[0]['steps_compared']} steps)\n"
            )
            header = ["algorithm", "measure", *columns]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for r in details:
                for measure, key, formatted in (
                    ("first step (compile) ms", "first_step_ms", _ms),
                    ("peak extra MB in step", "peak_extra_MB", lambda v: f"{v:.1f}"),
                    ("state B/param", "state_B_per_param", lambda v: f"{v:.1f}"),
                    ("max |p − torch loop's p|", "max_abs_diff_vs_torch_loop", lambda v: f"{v:.1e}" if v else "0"),
                ):
                    cells = [
                        r["algorithm"],
                        measure,
                        *("—" if r[key].get(c) is None else formatted(r[key][c]) for c in columns),
                    ]
                    lines.append("| " + " | ".join(cells) + " |")
        notes = {(c, note) for r in rows for c, note in r["notes"].items()}
        for column, note in sorted(notes):
            lines.append(f"- {column}: {note}")
    return "\n".join(lines)


def format_targets(results: dict[str, Any]) -> str:
    """The goals, one per line: where, then the measured value and the goal in words."""
    lines = ["goals (ratios of medians from this run, in the default loop, zero_grad()):"]
    for where in dict.fromkeys(t["where"] for t in results["targets"]):
        lines.append(f"  {where}:")
        lines += [
            f"    {t['verdict'] if t['measured'] is not None else t['compares'] + ': ' + t['verdict']}"
            for t in results["targets"]
            if t["where"] == where
        ]
    return "\n".join(lines)


def format_warmup(results: dict[str, Any]) -> str:
    lines = ["first fused step in fresh processes (one cache directory, starting empty):"]
    for run in results["compile_warmup"]:
        if "error" in run:
            lines.append(f"  {run['algorithm']} ({run['cache']}): not measured: {run['error']}")
        else:
            lines.append(
                f"  {run['algorithm']} ({run['cache']}): first step {run['first_step_s']:.1f} s, "
                f"second {run['second_step_s'] * 1e3:.1f} ms"
            )
    return "\n".join(lines)


def format_resident(results: dict[str, Any]) -> str:
    """Peak-RSS growth over a few train steps, each column in a fresh process, beside the state."""
    lines = ["peak RSS growth of the loop over 3 train steps, each column in a fresh process (MB):"]
    for run in results.get("resident_memory", []):
        where = f"  {run['algorithm']} on {run['workload']}, {run['column']}"
        if "error" in run:
            lines.append(f"{where}: not measured: {run['error']}")
        else:
            several = run.get("peak_growth_MB_runs", [])
            spread = (
                f", median of {len(several)} runs: {', '.join(f'{m:.1f}' for m in several)}" if len(several) > 1 else ""
            )
            lines.append(f"{where}: {run['peak_growth_MB']:.1f} (of which state {run['state_MB']:.1f}{spread})")
    return "\n".join(lines)


def format_left_out(results: dict[str, Any]) -> str:
    """The registered algorithms the benchmark has no row for, with why."""
    return "\n".join(["not benchmarked:"] + [f"  {name}: {why}" for name, why in results["left_out"].items()])


CSV_FIELDS = (
    "workload",
    "algorithm",
    "mode",
    "params",
    "tensors",
    "column",
    "step_ms",
    "train_ms",
    "first_step_ms",
    "peak_extra_MB",
    "state_B_per_param",
    "max_abs_diff_vs_torch_loop",
    "traffic_B_per_param",
    "roofline_ms",
    "note",
)


def save(results: dict[str, Any], out: str) -> list[str]:
    """Write ``bench.json``, ``bench.csv`` (one line per row and column) and ``bench.png``; return the paths."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, "bench.json"), os.path.join(out, "bench.csv")]
    with open(paths[0], "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(paths[1], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for r in results["rows"]:
            for c in results["meta"]["columns"]:
                writer.writerow(
                    [
                        r["workload"],
                        r["algorithm"],
                        r["mode"],
                        r["numel"],
                        r["tensors"],
                        c,
                        r["step_ms"].get(c),
                        r["train_ms"].get(c),
                        r["first_step_ms"].get(c),
                        r["peak_extra_MB"].get(c),
                        r["state_B_per_param"].get(c),
                        r["max_abs_diff_vs_torch_loop"].get(c),
                        r["traffic_B_per_param"],
                        r["roofline_ms"],
                        r["notes"].get(c, ""),
                    ]
                )
    path = os.path.join(out, "bench.png")
    if plot(results, path):
        paths.append(path)
    return paths


def plot(results: dict[str, Any], path: str) -> bool:
    """Median ``opt.step()`` per column in the default loop, one panel per workload, roofline marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["mode"] == DEFAULT_MODE and r["step_ms"]]
    workloads = [w for w in results["workloads"] if any(r["workload"] == w for r in rows)]
    if not workloads:
        return False
    columns = [c for c in results["meta"]["columns"] if any(c in r["step_ms"] for r in rows)]
    panels = len(workloads)
    ncols = min(2, panels)
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 3.8 * nrows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    width = 0.8 / len(columns)
    for ax, workload in zip(axes.flat, workloads, strict=False):
        these = [r for r in rows if r["workload"] == workload]
        for i, column in enumerate(columns):
            xs = [j + i * width for j in range(len(these))]
            ys = [r["step_ms"].get(column, 0.0) for r in these]
            ax.bar(xs, ys, width, label=column, color=cmap(i % 10))
        for j, r in enumerate(these):
            ax.hlines(
                r["roofline_ms"],
                j - width / 2,
                j + 0.8 - width / 2,
                colors="black",
                linestyles="dashed",
                label="roofline" if j == 0 else None,
            )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(these))], [r["algorithm"] for r in these])
        ax.set_yscale("log")
        ax.set_ylabel("median opt.step() (ms, log)")
        info = results["workloads"][workload]
        ax.set_title(f"{workload}: {model_size(info['tensors'], info['numel'])}", fontsize=10)
    for ax in list(axes.flat)[panels:]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8)
    fig.suptitle(
        "opt.step() inside the training loop: zero_grad(), forward, backward, step "
        f"({results['meta']['device']}, {results['meta']['threads']} threads)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
