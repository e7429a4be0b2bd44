"""`scratchopt report` builds on the quick preset: every figure exists, every number is finite, and the
page is exactly what results.json renders to."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from scratchopt.algorithms import ALGORITHMS
from scratchopt.tools.report import beyond_adamw
from scratchopt.tools.report.build import SECTIONS, build_report, render_page
from scratchopt.tools.report.memory import BACKWARD_STEP_STRATEGIES

pytestmark = pytest.mark.report


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    build_report(out, preset="quick", show_progress=False)
    return out


def numbers(value: Any, path: str = "$") -> list[tuple[str, float]]:
    """Every number in a JSON value, with where it sits."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [(path, value)]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in numbers(item, f"{path}.{key}")]
    if isinstance(value, list):
        return [found for index, item in enumerate(value) for found in numbers(item, f"{path}[{index}]")]
    return []


def test_every_number_in_results_json_is_finite(report: Path) -> None:
    # parse_constant sees NaN and Infinity, which json.loads would otherwise turn into floats silently
    results = json.loads(
        (report / "results.json").read_text(encoding="utf-8"),
        parse_constant=lambda name: pytest.fail(f"results.json holds {name}"),
    )
    found = numbers(results)
    assert len(found) > 1000
    assert [(path, value) for path, value in found if not math.isfinite(value)] == []


def test_every_figure_file_exists(report: Path) -> None:
    results = json.loads((report / "results.json").read_text(encoding="utf-8"))
    page = (report / "index.html").read_text(encoding="utf-8")
    shown = set(re.findall(r'<img src="([^"]+)"', page))
    assert shown, "the page shows no figure"
    assert shown <= set(results["figures"]), "the page shows a figure results.json does not list"
    for relative in results["figures"]:
        path = report / relative
        assert path.is_file() and path.stat().st_size > 10_000, relative
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", relative


def test_page_is_rendered_from_results_json_alone(report: Path) -> None:
    results = json.loads((report / "results.json").read_text(encoding="utf-8"))
    assert render_page(results) == (report / "index.html").read_text(encoding="utf-8")


def test_page_has_every_section_and_a_table_of_contents(report: Path) -> None:
    page = (report / "index.html").read_text(encoding="utf-8")
    assert '<nav class="toc">' in page
    for module in SECTIONS:
        assert f'<section id="{module.ANCHOR}">' in page
        assert f'href="#{module.ANCHOR}"' in page


def test_every_seed_comparison_has_a_verdict(report: Path) -> None:
    results = json.loads((report / "results.json").read_text(encoding="utf-8"))
    records = [record for module in SECTIONS for record in results["sections"][module.ANCHOR]["seed_comparisons"]]
    assert len(records) > 30
    for record in records:
        assert record["verdict"] in ("matches", "differs"), record
        assert record["seed_printed"] and record["measured_printed"] and record["rule"], record


def test_toy_function_reproduces_the_seed_step_counts_it_can(report: Path) -> None:
    """The seed article's step counts that reproduce, as a regression guard (momentum from −8 does not: see
    the page). Every run must be there: a run that did not happen fails, it does not pass."""
    results = json.loads((report / "results.json").read_text(encoding="utf-8"))
    counts = {run["key"]: run["seed_count"] for run in results["sections"]["toy"]["runs"]}
    assert counts["gd_from_-8"] == 16
    assert counts["gd_from_+8"] == "did not converge"
    assert counts["momentum_from_+8"] == 216
    assert counts["lookahead_from_-8"] == 34
    assert counts["lookahead_from_+8"] == 27
    assert counts["torch_nesterov_from_+8"] == 27


def test_speed_section_shows_the_real_training_loop(report: Path) -> None:
    """Section 4 leads with scratchopt bench's quick real-loop table: every model, every column timed or
    its failure named, and the fused strategy's goals in words."""
    results = json.loads((report / "results.json").read_text(encoding="utf-8"))
    real_loop = results["sections"]["speed"]["real_loop"]
    assert {row["workload"] for row in real_loop["rows"]} == {"mlp", "gpt", "tiny", "large"}
    for row in real_loop["rows"]:
        for column in real_loop["columns"]:
            assert column in row["step_ms"] or column in row["failed"], (row["workload"], column)
    assert real_loop["targets"]
    for goal in real_loop["targets"]:
        assert goal["verdict"].endswith(("; met)", "; missed)")) or goal["verdict"].startswith("not measured"), goal
    page = (report / "index.html").read_text(encoding="utf-8")
    assert "The optimizer step inside the training loop" in page


def test_memory_section_measures_stepping_during_backward(report: Path) -> None:
    """Section 5 measures scratchopt.step_in_backward on the bench's GPT-like model: every strategy at two
    batch sizes, stepped after and during backward, with no gradient left in the second case."""
    results = json.loads((report / "results.json").read_text(encoding="utf-8"))
    measured = results["sections"]["memory"]["backward_step"]
    cases = {(row["batch"], row["impl"], row["in_backward"]) for row in measured["rows"]}
    assert {row["impl"] for row in measured["rows"]} == set(BACKWARD_STEP_STRATEGIES) != set()
    assert len(cases) == len(measured["rows"]) == 2 * 2 * len(BACKWARD_STEP_STRATEGIES)
    for row in measured["rows"]:
        assert row["peak_bytes"] > measured["parameter_bytes"], row
        assert (row["gradient_bytes_after_backward"] == 0) == row["in_backward"], row
    page = (report / "index.html").read_text(encoding="utf-8")
    assert "Stepping during backward" in page


def test_every_registered_algorithm_is_trained_beside_its_twin_or_named(report: Path) -> None:
    """Section 3 reads the registry: each algorithm is trained (beside its twin where it has one) or left
    out with a reason; none fails, and every twin matches torch bit for bit."""
    parity = json.loads((report / "results.json").read_text(encoding="utf-8"))["sections"]["parity"]
    assert parity["failed"] == []
    trained = {result["algorithm"] for result in parity["trained"]}
    left_out = {item["algorithm"] for item in parity["left_out"]}
    assert trained | left_out == set(ALGORITHMS) and not trained & left_out
    for result in parity["trained"]:
        if result["has_twin"]:
            assert result["max_param_gap"] == 0 and result["max_loss_gap"] == 0, result["label"]


def test_step_times_cover_every_algorithm_the_loop_can_run(report: Path) -> None:
    step_times = json.loads((report / "results.json").read_text(encoding="utf-8"))["sections"]["speed"]["step_times"]
    assert step_times["failed"] == []
    timed = {row["algorithm"].split(",")[0] for row in step_times["rows"]}
    assert timed | {item["algorithm"] for item in step_times["left_out"]} == set(ALGORITHMS)


def test_memory_section_names_the_algorithms_without_a_formula(report: Path) -> None:
    memory = json.loads((report / "results.json").read_text(encoding="utf-8"))["sections"]["memory"]
    assert memory["failed"] == []
    measured = {row["label"].split(",")[0] for row in memory["state"]}
    assert measured | set(memory["without_formula"]) == set(ALGORITHMS)


def test_the_page_names_the_seed_articles_by_title(report: Path) -> None:
    page = (report / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"[Ss]eed 00\d", page), "an article is named by its number"
    assert "issue" not in page
    assert "From ZeRO to Hero" in page and "Optimizers: math, implementations and efficiency" in page


def test_every_optimizer_beyond_torch_trains_the_gpt_like_model_beside_adamw(report: Path) -> None:
    """Section 4: AdamW and every algorithm without a torch twin that a plain loop runs; none fails, each
    loss starts at the same value (same weights, same batch) and is finite, and the figure is written."""
    beyond = json.loads((report / "results.json").read_text(encoding="utf-8"))["sections"]["beyond"]
    assert beyond["failed"] == []
    names = [result["algorithm"] for result in beyond["trained"]]
    assert names == [cls.__name__ for cls in beyond_adamw.chosen()]
    assert names[0] == "AdamW" and {"ScheduleFreeAdamW", "Prodigy", "Lamb", "ADOPT"} <= set(names)
    first_losses = {result["losses"][0] for result in beyond["trained"]}
    assert len(first_losses) == 1
    for result in beyond["trained"]:
        assert len(result["losses"]) == beyond["steps"] and None not in result["losses"], result["algorithm"]
        assert result["held_out_loss"] is not None
    assert (report / beyond["figures"]["curves"]).is_file()


def test_the_source_entropy_is_the_entropy_rate_of_the_chain() -> None:
    """A uniform source has entropy log V; a two-state chain has the closed form π₀H(p) + π₁H(q)."""
    uniform = torch.full((5, 5), 0.2, dtype=torch.float64)
    assert abs(beyond_adamw.source_entropy(uniform) - math.log(5)) < 1e-12
    p, q = 0.1, 0.4  # P(0 → 1) = p, P(1 → 0) = q; stationary π = (q, p)/(p + q)
    chain = torch.tensor([[1 - p, p], [q, 1 - q]], dtype=torch.float64)

    def h(x: float) -> float:
        return -(x * math.log(x) + (1 - x) * math.log(1 - x))

    expected = (q * h(p) + p * h(q)) / (p + q)
    assert abs(beyond_adamw.source_entropy(chain) - expected) < 1e-12


def test_low_precision_runs_are_judged_against_their_own_algorithms_float32_spread():
    """Section 5: a low-precision setting's mean lies within the spread of the same algorithm's float32
    runs, not another's."""
    from scratchopt.tools.report import low_precision

    def run(algorithm: str, setting: str, loss: float) -> dict[str, Any]:
        return {
            "algorithm": algorithm,
            "setting": setting,
            "held_out_loss": loss,
            "state_bytes_per_param": 2.0,
            "seconds": 1.0,
        }

    runs = [
        *(run("AdamW", "float32 state", loss) for loss in (1.0, 1.2)),
        *(run("AdamW", "8-bit state", loss) for loss in (1.1, 1.15)),
        *(run("Lion", "float32 state", loss) for loss in (2.0, 2.1)),
        *(run("Lion", "8-bit state", loss) for loss in (1.1, 1.15)),  # within AdamW's spread, not Lion's
    ]
    # The same algorithm on the other model is judged against its float32 runs on that model.
    digits = [{**run("AdamW", "float32 state", loss), "model": low_precision.DIGITS} for loss in (0.10, 0.12)] + [
        {**run("AdamW", "8-bit state", 1.1), "model": low_precision.DIGITS}
    ]
    rows = {(r["model"], r["algorithm"], r["setting"]): r for r in low_precision.summarize(runs + digits)}
    gpt = low_precision.GPT
    assert rows[(gpt, "AdamW", "8-bit state")]["within_float32_spread"]
    assert not rows[(gpt, "Lion", "8-bit state")]["within_float32_spread"]
    assert rows[(gpt, "Lion", "float32 state")]["mean"] == pytest.approx(2.05)
    assert not rows[(low_precision.DIGITS, "AdamW", "8-bit state")]["within_float32_spread"]
    assert rows[(low_precision.DIGITS, "AdamW", "float32 state")]["mean"] == pytest.approx(0.11)
