"""HTML building blocks of the report page: tables, figures, verdict badges and the page itself.

Every function takes values already read from ``results.json`` and returns an HTML string; nothing here
computes a number, so the page shows exactly what the JSON holds.
"""

from __future__ import annotations

import html
import math
from typing import Any

from scratchopt.tools.report.seed_figures import MATCHES


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def num(value: Any, digits: int = 4) -> str:
    """A number for a table cell: integers with thousands separators, floats to ``digits`` significant
    digits (powers of ten when very large or small), words and missing values as they are."""
    if value is None:
        return "—"
    if isinstance(value, (bool, str)):
        return esc(value)
    if isinstance(value, int):
        return _minus(f"{value:,}")
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return esc(value)
    magnitude = abs(value)
    if magnitude >= 1e6 or magnitude < 1e-3:
        mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        power = f"10<sup>{_minus(str(int(exponent)))}</sup>"
        return power if mantissa == "1" else f"{_minus(mantissa)}×{power}"
    return _minus(f"{value:.{digits}g}")


def fixed(value: Any, decimals: int) -> str:
    """A float with a fixed number of decimals (words and missing values pass through)."""
    if value is None or isinstance(value, str):
        return num(value)
    return _minus(f"{value:.{decimals}f}")


def _minus(text: str) -> str:
    """A typographic minus sign instead of the hyphen Python writes."""
    return text.replace("-", "−")


def size(value: Any) -> str:
    """A byte count in decimal units (kB = 10³ B, GB = 10⁹ B, as the seeds count them)."""
    if value is None or isinstance(value, str):
        return num(value)
    for unit, scale in (("EB", 1e18), ("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.4g} {unit}"
    return f"{value:g} B"


def code(text: str) -> str:
    return f"<code>{esc(text)}</code>"


def verdict(word: str) -> str:
    kind = "ok" if word == MATCHES else "warn"
    return f'<span class="badge {kind}">{esc(word)}</span>'


def status(ok: bool, yes: str, no: str) -> str:
    return f'<span class="badge {"ok" if ok else "warn"}">{esc(yes if ok else no)}</span>'


def table(
    header: list[str],
    rows: list[list[str]],
    numeric: tuple[int, ...] = (),
    caption: str = "",
    dividers: tuple[int, ...] = (),
    classes: str = "",
) -> str:
    """A table whose cells are HTML already; ``numeric`` columns are right-aligned, ``dividers`` columns
    start a new group (a rule on their left)."""

    def attributes(index: int) -> str:
        classes = [name for name, columns in (("num", numeric), ("divider", dividers)) if index in columns]
        return f' class="{" ".join(classes)}"' if classes else ""

    head = "".join(f"<th{attributes(i)}>{cell}</th>" for i, cell in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f"<td{attributes(i)}>{cell}</td>" for i, cell in enumerate(row)) + "</tr>" for row in rows
    )
    caption_html = f"<caption>{caption}</caption>" if caption else ""
    table_class = f' class="{classes}"' if classes else ""
    return (
        f'<div class="table-wrap"><table{table_class}>{caption_html}<thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def figure(path: str, caption: str) -> str:
    return (
        f'<figure><a href="{esc(path)}"><img src="{esc(path)}" alt="{esc(caption)}" loading="lazy"></a>'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def figure_grid(figures: list[str]) -> str:
    return f'<div class="grid">{"".join(figures)}</div>'


def note(text: str, kind: str = "info") -> str:
    return f'<p class="note {kind}">{text}</p>'


def details(summary: str, body: str) -> str:
    return f"<details><summary>{summary}</summary>{body}</details>"


def comparison_table(records: list[dict[str, Any]], show_source: bool = False) -> str:
    """Seed figures beside measured values, with the rule used and the verdict."""
    rows = []
    for record in records:
        what = esc(record["what"])
        if show_source:
            what += f'<span class="sub">{esc(record["source"])}</span>'
        if record.get("note"):
            what += f'<span class="sub">{esc(record["note"])}</span>'
        rows.append(
            [
                what,
                esc(record["seed_printed"]),
                esc(record["measured_printed"]),
                verdict(record["verdict"]),
                f'<span class="sub">{esc(record["rule"])}</span>',
            ]
        )
    return table(["what", "seed says", "measured", "verdict", "compared as"], rows, classes="comparison")


def section(anchor: str, number: int, title: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2><span class="secnum">{number}</span>{esc(title)}</h2>{body}</section>'


def page(title: str, subtitle: str, toc: list[tuple[str, str]], body: str) -> str:
    toc_items = "".join(f'<li><a href="#{esc(anchor)}">{esc(label)}</a></li>' for anchor, label in toc)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{CSS}</style>
</head>
<body>
<header><h1>{esc(title)}</h1><p class="subtitle">{subtitle}</p></header>
<nav class="toc"><h2>Contents</h2><ol>{toc_items}</ol></nav>
<main>{body}</main>
</body>
</html>
"""


CSS = """
:root { --ink: #1d2430; --muted: #5b6472; --line: #dde2ea; --accent: #1f5fa8; --bg: #ffffff;
        --panel: #f6f8fb; --ok: #1b7f3b; --ok-bg: #e3f4e8; --warn: #9a5b00; --warn-bg: #fff1d6; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1180px; padding: 32px 40px 80px; color: var(--ink); background: var(--bg);
       font: 16px/1.55 -apple-system, "Segoe UI", "DejaVu Sans", "Liberation Sans", Helvetica, Arial, sans-serif; }
header h1 { font-size: 2.1rem; margin: 0 0 6px; letter-spacing: -0.01em; }
.subtitle { color: var(--muted); margin: 0 0 24px; }
h2 { font-size: 1.55rem; margin: 56px 0 12px; padding-bottom: 6px; border-bottom: 2px solid var(--line); }
h3 { font-size: 1.2rem; margin: 32px 0 10px; }
.secnum { display: inline-block; min-width: 1.6em; color: var(--accent); }
a { color: var(--accent); }
code { font: 0.92em "DejaVu Sans Mono", Menlo, Consolas, monospace; background: var(--panel);
       padding: 1px 5px; border-radius: 4px; }
nav.toc { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 14px 26px; }
nav.toc h2 { margin: 0 0 6px; font-size: 1.1rem; border: 0; padding: 0; }
nav.toc ol { margin: 0; padding-left: 22px; columns: 2; column-gap: 40px; }
nav.toc li { margin: 3px 0; }
.table-wrap { overflow-x: auto; margin: 14px 0 22px; }
table { border-collapse: collapse; width: 100%; font-size: 0.93rem; }
caption { caption-side: top; text-align: left; color: var(--muted); padding-bottom: 6px; }
th, td { padding: 7px 10px; border-bottom: 1px solid var(--line); vertical-align: top; text-align: left; }
th { background: var(--panel); font-weight: 600; border-bottom: 2px solid var(--line); }
tbody tr:nth-child(even) td { background: #fbfcfd; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
td code { white-space: normal; }
table.comparison td:nth-child(1) { width: 38%; }
table.comparison td:nth-child(2), table.comparison td:nth-child(3) { width: 17%; word-break: break-word; }
table.comparison td:nth-child(5) { width: 20%; }
th.divider, td.divider { border-left: 2px solid var(--line); }
.sub { display: block; color: var(--muted); font-size: 0.85rem; margin-top: 2px; }
.badge { display: inline-block; padding: 1px 9px; border-radius: 999px; font-size: 0.83rem; font-weight: 600;
         white-space: nowrap; }
.badge.ok { color: var(--ok); background: var(--ok-bg); }
.badge.warn { color: var(--warn); background: var(--warn-bg); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(500px, 1fr)); gap: 18px; }
figure { margin: 12px 0; background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px; }
figure img { width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 0.9rem; margin-top: 6px; }
.note { border-left: 4px solid var(--accent); background: var(--panel); padding: 9px 14px; border-radius: 0 6px 6px 0; }
.note.warn { border-left-color: var(--warn); background: var(--warn-bg); }
.summary-cards { display: flex; gap: 14px; flex-wrap: wrap; margin: 10px 0 18px; }
.card { flex: 1 1 180px; border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px;
        background: var(--panel); }
.card .big { font-size: 1.7rem; font-weight: 700; }
.card .label { color: var(--muted); font-size: 0.88rem; }
details { margin: 10px 0 18px; }
summary { cursor: pointer; color: var(--accent); font-weight: 600; }
"""
