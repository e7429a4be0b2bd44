"""``scratchopt bench`` on a tiny configuration: every column timed, the roofline from the optimizer's own
state, and the bit-exact strategies' models equal to torch's for-loop after the same real training steps.
No timing is asserted: only that the numbers exist and are sane."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from scratchopt import bench, cli

PRESET = replace(bench.PRESETS["quick"], mlp_layers=6, warmup_steps=1, rounds=2, steps_per_round=1)
STEPS = 1 + PRESET.warmup_steps + PRESET.rounds * PRESET.steps_per_round


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    return bench.run_bench(PRESET, algorithms=["AdamW"], workloads=["tiny", "mlp"], log=lambda message: None)


def test_every_column_has_finite_positive_medians(results: dict[str, Any]) -> None:
    assert [(r["workload"], r["algorithm"], r["mode"]) for r in results["rows"]] == [
        ("tiny", "AdamW", bench.DEFAULT_MODE), ("mlp", "AdamW", bench.DEFAULT_MODE)]
    for row in results["rows"]:
        for column in PRESET.columns:
            assert column in row["step_ms"], (row["workload"], column, row["notes"].get(column))
            for key in ("step_ms", "train_ms", "first_step_ms"):
                value = row[key][column]
                assert math.isfinite(value) and value > 0, (row["workload"], column, key, value)
            assert row["train_ms"][column] >= row["step_ms"][column]
            assert row["peak_extra_MB"][column] is not None and row["peak_extra_MB"][column] >= 0


def test_table_shows_every_column_and_the_roofline(results: dict[str, Any]) -> None:
    text = bench.table(results)
    header = next(line for line in text.splitlines() if line.startswith("| algorithm | torch loop"))
    for column in PRESET.columns:
        assert f"| {column} |" in header
    assert "roofline ms (B/param)" in header and "torch fused ÷ ours fused" in header
    assert "first step (compile) ms" in text


def test_roofline_counts_the_bytes_of_the_optimizer_state(results: dict[str, Any]) -> None:
    """AdamW in float32: read p, g, exp_avg, exp_avg_sq and write p, exp_avg, exp_avg_sq (28 B), plus
    gathering the gradient into a buffer (8 B)."""
    bandwidth = results["bandwidth"]["axpy_GBps"]
    for row in results["rows"]:
        assert (row["update_B_per_param"], row["gather_B_per_param"], row["traffic_B_per_param"]) == (28, 8, 36)
        assert row["roofline_ms"] == pytest.approx(36 * row["numel"] / (bandwidth * 1e9) * 1e3)
        # exp_avg and exp_avg_sq: 8 B/param, plus a 4-byte step per tensor
        assert row["state_B_per_param"]["torch loop"] == pytest.approx(8 + 4 * row["tensors"] / row["numel"])


@pytest.mark.parametrize(("kwargs", "update_bytes"), [({"momentum": 0.9}, 20), ({}, 12), ({"amsgrad": True}, 36)])
def test_traffic_follows_the_state_an_optimizer_keeps(kwargs: dict[str, Any], update_bytes: int) -> None:
    cls = torch.optim.Adam if "amsgrad" in kwargs else torch.optim.SGD
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = cls(params, lr=1e-3, **kwargs)
    optimizer.step()
    assert bench.traffic_bytes_per_param(optimizer) == (update_bytes, 8)


def test_bit_exact_strategies_trained_the_same_model_as_torch(results: dict[str, Any]) -> None:
    """Each column trained its own copy of the model on the same batches: after the same steps the
    bit-exact strategies' parameters equal torch's for-loop's, and the compiled ones are within rounding."""
    for row in results["rows"]:
        assert row["steps_compared"] == STEPS
        diffs = row["max_abs_diff_vs_torch_loop"]
        for column in bench.BIT_EXACT_COLUMNS:
            assert diffs[column] == 0.0, (row["workload"], column)
        assert diffs["torch foreach"] == 0.0
        for column in ("torch fused", "ours fused", "ours fused+contiguous"):
            assert diffs[column] < 1e-5, (row["workload"], column)


def test_other_training_loops_train_the_same_model() -> None:
    """``zero_grad(set_to_none=False)`` and 4 accumulated micro-batches, on the tiny model."""
    columns = ["torch loop", "torch fused", "ours loop", "ours foreach", "ours flat"]
    found = bench.run_bench(PRESET, algorithms=["SGD+momentum"], workloads=["tiny"], columns=columns,
                            modes=["set-to-zero", "accumulate-4"], memory=False, log=lambda message: None)
    assert [row["mode"] for row in found["rows"]] == ["set-to-zero", "accumulate-4"]
    for row in found["rows"]:
        assert sorted(row["step_ms"]) == sorted(columns), row["notes"]
        assert row["traffic_B_per_param"] == 28  # momentum_buffer: 20 B, gathering: 8 B
        for column in bench.BIT_EXACT_COLUMNS:
            assert row["max_abs_diff_vs_torch_loop"][column] == 0.0, (row["mode"], column)


def test_targets_say_met_or_by_how_much(results: dict[str, Any]) -> None:
    found = {t["target"]: t for t in results["targets"]}
    assert any("tiny MLP" in text for text in found)
    assert any("≥ 3.0× faster than torch fused" in text for text in found)
    for target in found.values():
        if target["measured"] is None:
            assert target["verdict"] == "not measured"
        elif target["met"]:
            assert target["verdict"].startswith("met")
        else:
            assert target["missed_by"] > 1 and target["verdict"].startswith("missed by")


def test_command_line_writes_its_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli.main(["bench", "--preset", "quick", "--workloads", "tiny", "--algorithms", "AdamW", "--columns",
              "torch loop,ours loop", "--rounds", "1", "--no-memory", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| algorithm | torch loop | ours loop |" in printed and "targets" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.csv", "bench.json", "bench.png"]


def test_outputs_are_written(results: dict[str, Any], tmp_path: Path) -> None:
    paths = bench.save(results, str(tmp_path))
    assert sorted(Path(p).name for p in paths) == ["bench.csv", "bench.json", "bench.png"]
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["workload"] == "tiny"
    with open(tmp_path / "bench.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(results["rows"]) * len(PRESET.columns)
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
