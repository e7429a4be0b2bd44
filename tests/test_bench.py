"""``scratchopt bench`` on a tiny configuration: every column timed, the roofline from the optimizer's own
state, and the bit-exact strategies' models equal to torch's for-loop after the same real training steps.
No timing is asserted: only that the numbers exist and are sane."""

from __future__ import annotations

import csv
import json
import math
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from scratchopt.algorithms import ALGORITHMS
from scratchopt.tools import cli
from scratchopt.tools.bench import cold_start, columns, roofline, rss, table, targets
from scratchopt.tools.bench.run import run_bench
from scratchopt.tools.presets import PRESETS

PRESET = replace(PRESETS["quick"], mlp_layers=6, warmup_steps=1, rounds=2, steps_per_round=1)
#: The columns that run every row (a peer column runs only the rows it has: DeepSpeed Adam, reference packages).
COLUMNS = [column for column in columns.preset_columns(PRESET) if column not in columns.PEER_COLUMNS]
STEPS = 1 + PRESET.warmup_steps + PRESET.rounds * PRESET.steps_per_round


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    return run_bench(PRESET, algorithms=["AdamW"], workloads=["tiny", "mlp"], log=lambda message: None)


def test_every_column_has_finite_positive_medians(results: dict[str, Any]) -> None:
    assert [(r["workload"], r["algorithm"], r["mode"]) for r in results["rows"]] == [
        ("tiny", "AdamW", columns.DEFAULT_MODE),
        ("mlp", "AdamW", columns.DEFAULT_MODE),
    ]
    for row in results["rows"]:
        for column in COLUMNS:
            assert column in row["step_ms"], (row["workload"], column, row["notes"].get(column))
            for key in ("step_ms", "train_ms", "first_step_ms"):
                value = row[key][column]
                assert math.isfinite(value) and value > 0, (row["workload"], column, key, value)
            assert row["train_ms"][column] >= row["step_ms"][column]
            assert row["peak_extra_MB"][column] is not None and row["peak_extra_MB"][column] >= 0


def test_table_shows_every_column_and_the_roofline(results: dict[str, Any]) -> None:
    text = table.table(results)
    header = next(line for line in text.splitlines() if line.startswith("| algorithm | torch loop"))
    for column in COLUMNS:
        assert f"| {column} |" in header
    assert "roofline ms (B/param)" in header and "torch fused ÷ ours fused" in header
    assert "first step (compile) ms" in text


def test_roofline_counts_the_bytes_of_the_optimizer_state(results: dict[str, Any]) -> None:
    """AdamW in float32: read p, g, exp_avg, exp_avg_sq and write p, exp_avg, exp_avg_sq (28 B), at the
    bandwidth of the same access pattern without arithmetic."""
    bandwidth = results["bandwidth"]["stream_GBps"]
    assert bandwidth and bandwidth > 0.1, results["bandwidth"]
    for row in results["rows"]:
        assert row["traffic_B_per_param"] == 28
        assert row["roofline_ms"] == pytest.approx(28 * row["numel"] / (bandwidth * 1e9) * 1e3)
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
    assert roofline.traffic_bytes_per_param(optimizer) == update_bytes


def test_bit_exact_strategies_trained_the_same_model_as_torch(results: dict[str, Any]) -> None:
    """Each column trained its own copy of the model on the same batches: after the same steps the
    bit-exact strategies' parameters equal torch's for-loop's, and the compiled ones are within rounding."""
    for row in results["rows"]:
        assert row["steps_compared"] == STEPS
        diffs = row["max_abs_diff_vs_torch_loop"]
        for column in columns.BIT_EXACT_COLUMNS:
            assert diffs[column] == 0.0, (row["workload"], column)
        assert diffs["torch foreach"] == 0.0
        for column in ("torch fused", "ours fused"):
            assert diffs[column] < 1e-5, (row["workload"], column)


def test_other_training_loops_train_the_same_model() -> None:
    """``zero_grad(set_to_none=False)`` and 4 accumulated micro-batches, on the tiny model."""
    chosen = ["torch loop", "torch fused", *columns.BIT_EXACT_COLUMNS]
    found = run_bench(
        PRESET,
        algorithms=["SGD+momentum"],
        workloads=["tiny"],
        columns=chosen,
        modes=["set-to-zero", "accumulate-4"],
        memory=False,
        log=lambda message: None,
    )
    assert [row["mode"] for row in found["rows"]] == ["set-to-zero", "accumulate-4"]
    for row in found["rows"]:
        assert sorted(row["step_ms"]) == sorted(chosen), row["notes"]
        assert row["traffic_B_per_param"] == 20  # p, g, momentum_buffer read; p, momentum_buffer written
        for column in columns.BIT_EXACT_COLUMNS:
            assert row["max_abs_diff_vs_torch_loop"][column] == 0.0, (row["mode"], column)


def test_goals_are_stated_in_plain_words(results: dict[str, Any]) -> None:
    found = {t["target"]: t for t in results["targets"]}
    assert any("tiny MLP" in where for where in found)
    speedups = [
        t
        for t in found.values()
        if "faster than torch fused" in t["verdict"]
        or "slower than torch fused" in t["verdict"]
        or "as fast as torch fused" in t["verdict"]
    ]
    assert any("(goal: at least 4× faster;" in t["verdict"] for t in speedups)
    for target in found.values():
        assert "issue" not in target["verdict"] and "issue" not in target["target"]
        if target["measured"] is None:
            assert target["verdict"].startswith("not measured")
        else:
            assert target["verdict"].endswith("; met)" if target["met"] else "; missed)"), target


@pytest.mark.parametrize(
    ("ratio", "words"), [(2.1, "2.10× faster than"), (1.0, "as fast as"), (0.8, "1.25× slower than")]
)
def test_speed_ups_read_as_words(ratio: float, words: str) -> None:
    assert targets.speed(ratio) == words


def test_every_registered_algorithm_is_a_row_or_named_with_why(results: dict[str, Any]) -> None:
    rows, left_out = columns.algorithm_rows()
    assert {row.cls.__name__ for row in rows.values()} | set(left_out) == set(ALGORITHMS)
    assert {"LBFGS", "Muon", "SparseAdam", "Newton", "NesterovLookahead"} <= set(left_out)
    assert results["left_out"] == left_out and all(left_out.values())


def test_every_strategy_has_a_column() -> None:
    from scratchopt import strategies

    assert [columns.ours(name) for name in strategies.NAMES] == list(columns.OURS_COLUMNS)


def _timed_out(*args: Any, **kwargs: Any) -> Any:
    raise subprocess.TimeoutExpired(args[0], kwargs["timeout"], stderr=b"compiling ...")


def _printed_nothing(*args: Any, **kwargs: Any) -> Any:
    return subprocess.CompletedProcess(args[0], 0, stdout="", stderr="Traceback ...\nRuntimeError: out of memory")


@pytest.mark.parametrize(
    ("run", "reason"),
    [(_timed_out, "timed out after 900 s"), (_printed_nothing, "child printed nothing: RuntimeError: out of memory")],
)
def test_a_failed_cold_start_is_reported_in_its_rows(run: Any, reason: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A child that times out or prints nothing is a row that says so, and the benchmark carries on."""
    monkeypatch.setattr(cold_start.subprocess, "run", run)
    found = cold_start.compile_warmup(["AdamW", "Adam"], 4, torch.device("cpu"), 1)
    assert [(r["algorithm"], r["cache"]) for r in found] == [
        ("AdamW", cold_start.EMPTY_CACHE),
        ("Adam", cold_start.SAME_PROCESS),
        ("AdamW", cold_start.CACHED),
    ]
    for r in found:
        assert r["error"].startswith(reason), r
    text = table.format_warmup({"compile_warmup": found})
    assert text.count(f"not measured: {reason}") == 3
    goals = targets.targets([], {}, found)
    assert [g["met"] for g in goals] == [False, False]
    assert all(g["verdict"].startswith(f"not measured: {reason}") for g in goals)


def test_the_benchmark_carries_on_after_a_failed_cold_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cold_start.subprocess, "run", _timed_out)
    found = run_bench(
        PRESET,
        algorithms=["AdamW"],
        workloads=["tiny"],
        columns=["torch loop", "ours loop"],
        warmup_compile=True,
        memory=False,
        log=lambda message: None,
    )
    assert found["rows"] and found["compile_warmup"][0]["error"].startswith("timed out")


def test_command_line_writes_its_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli.main(
        [
            "bench",
            "--preset",
            "quick",
            "--workloads",
            "tiny",
            "--algorithms",
            "AdamW",
            "--columns",
            "torch loop,ours loop",
            "--rounds",
            "1",
            "--no-memory",
            "--out",
            str(tmp_path),
        ]
    )
    printed = capsys.readouterr().out
    assert "| algorithm | torch loop | ours loop |" in printed and "goals" in printed
    assert "not benchmarked:" in printed and "LBFGS" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.csv", "bench.json", "bench.png"]


def test_outputs_are_written(results: dict[str, Any], tmp_path: Path) -> None:
    paths = table.save(results, str(tmp_path))
    assert sorted(Path(p).name for p in paths) == ["bench.csv", "bench.json", "bench.png"]
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["workload"] == "tiny"
    with open(tmp_path / "bench.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(results["rows"]) * len(results["meta"]["columns"])
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read from /proc")
@pytest.mark.parametrize("column", ["torch fused", "ours fused"])
def test_resident_memory_is_measured_in_a_fresh_process(column: str) -> None:
    """The child trains the tiny model: its state is AdamW's (two moments and a 4-byte step per tensor)."""
    found = rss.measure("tiny", "quick", 4, "AdamW", column, threads=1)
    assert "error" not in found, found
    assert found["state_MB"] == pytest.approx((1441 * 8 + 6 * 4) / 1e6)
    assert found["peak_growth_MB"] >= 0


def test_the_memory_goal_compares_the_two_fused_columns_against_the_state() -> None:
    resident = [
        {
            "workload": rss.WIDE,
            "algorithm": "AdamW",
            "column": "torch fused",
            "peak_growth_MB": 900.0,
            "state_MB": 800.0,
        },
        {
            "workload": rss.WIDE,
            "algorithm": "AdamW",
            "column": "ours fused",
            "peak_growth_MB": 912.0,
            "state_MB": 800.0,
        },
    ]
    (goal,) = targets.targets([], {}, [], resident)
    assert goal["measured"] == pytest.approx(0.015) and not goal["met"], goal
    assert "+1.50% of the state" in goal["verdict"]
    resident[1]["peak_growth_MB"] = 903.0
    assert targets.targets([], {}, [], resident)[0]["met"]
    resident[1] = {"workload": rss.WIDE, "algorithm": "AdamW", "column": "ours fused", "error": "timed out"}
    (goal,) = targets.targets([], {}, [], resident)
    assert goal["verdict"].startswith("not measured: timed out") and not goal["met"]


def test_every_elementwise_algorithm_is_held_to_torchs_fastest_on_the_gpt_model() -> None:
    from scratchopt.tools.bench.run import Row

    def row(algorithm: str, step_ms: dict[str, float]) -> Row:
        built = Row("gpt", algorithm, columns.DEFAULT_MODE, 5_000_000, 77)
        built.step_ms.update(step_ms)
        return built

    described = {"gpt": {"description": "GPT-like"}}
    rows = [
        row("RMSprop", {"torch foreach": 10.0, "ours fused": 4.0}),
        row("SGD", {"torch foreach": 2.5, "torch fused": 3.0, "ours fused": 2.6}),
        row("Adafactor", {"torch foreach": 20.0, "ours fused": 20.0}),  # not elementwise: no such goal
    ]
    goals = [g for g in targets.targets(rows, described, []) if g["compares"] == "ours fused vs torch's fastest"]
    assert [(g["where"].split(",")[0], g["met"]) for g in goals] == [("RMSprop", True), ("SGD", False)]
    assert "slower than torch foreach, torch's fastest here" in goals[1]["verdict"]
    assert goals[0]["measured"] == pytest.approx(2.5)


def test_the_deepspeed_column_runs_only_where_deepspeed_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    rows, _ = columns.algorithm_rows()
    model = torch.nn.Linear(3, 2)
    monkeypatch.setattr(columns.importlib.util, "find_spec", lambda name: None)
    assert columns.DEEPSPEED in columns.COLUMNS
    assert columns.DEEPSPEED not in columns.preset_columns(PRESETS["full"])
    with pytest.raises(ValueError, match="DeepSpeed is not installed"):
        columns.build_optimizer(columns.DEEPSPEED, rows["AdamW"], model)
    with pytest.raises(ValueError, match="Adam and AdamW only"):
        columns.build_optimizer(columns.DEEPSPEED, rows["SGD"], model)


def test_the_reference_package_column_builds_each_algorithms_declared_reference() -> None:
    rows, _ = columns.algorithm_rows()
    model = torch.nn.Linear(3, 2)
    for name in ("ADOPT", "AdEMAMix", "Adan"):
        optimizer = columns.build_optimizer(columns.REFERENCE, rows[name], model)
        module_name, _, class_name = ALGORITHMS[name].reference_class.partition(":")
        assert type(optimizer).__name__ == class_name and type(optimizer).__module__.startswith(module_name)
    with pytest.raises(ValueError, match="Lion has no reference package"):
        columns.build_optimizer(columns.REFERENCE, rows["Lion"], model)
    assert columns.REFERENCE in columns.preset_columns(PRESETS["full"])


def test_low_precision_state_is_held_to_its_goals() -> None:
    """bf16 and 8-bit state: step time against ours fused, bytes per parameter, 8-bit against
    bitsandbytes and torchao, each met or missed from the row's numbers; at 100M params 8-bit's peak RSS growth
    against torch fused's."""
    from scratchopt.tools.bench.run import Row

    built = Row("gpt", "AdamW", columns.DEFAULT_MODE, 5_000_000, 77)
    built.step_ms.update(
        {
            "ours fused": 10.0,
            "ours bf16 state": 8.0,
            "ours 8-bit state": 9.0,
            "bitsandbytes 8-bit": 270.0,
            "torchao 8-bit": 90.0,
        }
    )
    built.state_B_per_param.update({"ours bf16 state": 4.0, "ours 8-bit state": 2.2})
    goals = {g["compares"]: g for g in targets.targets([built], {"gpt": {"description": "GPT-like"}}, [])}
    assert goals["ours bf16 state vs ours fused"]["met"]  # 0.8× ≤ 0.85×
    assert not goals["ours 8-bit state vs ours fused"]["met"]  # 0.9× > 0.75×
    assert goals["ours bf16 state: state bytes per parameter"]["met"]
    assert not goals["ours 8-bit state: state bytes per parameter"]["met"]  # 2.2 > 2.1
    assert goals["ours 8-bit state vs bitsandbytes 8-bit"]["measured"] == pytest.approx(30.0)
    assert goals["ours 8-bit state vs bitsandbytes 8-bit"]["met"]
    assert goals["ours 8-bit state vs torchao 8-bit"]["measured"] == pytest.approx(10.0)
    assert not goals["ours 8-bit state vs torchao 8-bit"]["met"]  # 10× < 15×
    resident = [
        {
            "workload": rss.WIDE,
            "algorithm": "AdamW",
            "column": "torch fused",
            "peak_growth_MB": 900.0,
            "state_MB": 800.0,
        },
        {"workload": rss.WIDE, "algorithm": "AdamW", "column": "ours 8-bit state", "peak_growth_MB": 450.0},
    ]
    (goal,) = targets.targets([], {}, [], resident)
    assert goal["measured"] == pytest.approx(450.0) and not goal["met"] and "450 MB less" in goal["verdict"]


class _WrappedState(torch.Tensor):
    """A tensor subclass holding its bytes in other tensors, as torchao's 8-bit state does."""

    @staticmethod
    def __new__(cls, codes: torch.Tensor, scale: torch.Tensor) -> _WrappedState:
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=torch.float32)  # type: ignore[attr-defined]

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        self.codes, self.scale = codes, scale

    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["codes", "scale"], None

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        raise NotImplementedError(f"{func} on wrapped state")


def test_state_bytes_count_the_tensors_a_subclass_wraps() -> None:
    """A peer's state kept in a tensor subclass (torchao's 8-bit) is counted by the tensors it
    flattens into (1 byte per code and 4 per block of 256), not by the float32 shape it shows."""
    from scratchopt.tools.bench.memory import state_bytes_per_param

    param = torch.zeros(4096, requires_grad=True)
    optimizer = torch.optim.SGD([param])
    optimizer.state[param] = {
        "exp_avg": _WrappedState(torch.zeros(4096, dtype=torch.uint8), torch.zeros(16)),
        "step": torch.tensor(1.0),
    }
    assert state_bytes_per_param(optimizer) == pytest.approx((4096 + 64 + 4) / 4096)
    optimizer.state[param]["exp_avg"] = torch.zeros(4096)
    assert state_bytes_per_param(optimizer) == pytest.approx((4 * 4096 + 4) / 4096)


def test_the_8bit_peer_columns_build_the_peers_optimizer_with_the_rows_arguments() -> None:
    """bitsandbytes' AdamW8bit (where installed) with the row's lr, betas, eps and weight decay; an
    algorithm a peer lacks, or a peer that is not installed, is refused by name."""
    import importlib.util

    rows, _ = columns.algorithm_rows()
    model = torch.nn.Linear(128, 64)
    for column in (columns.BITSANDBYTES, columns.TORCHAO):
        with pytest.raises(ValueError, match="no 8-bit SGD"):
            columns.build_optimizer(column, rows["SGD"], model)
    if importlib.util.find_spec("torchao") is None:
        with pytest.raises(ValueError, match="torchao is not installed"):
            columns.build_optimizer(columns.TORCHAO, rows["AdamW"], model)
    if importlib.util.find_spec("bitsandbytes") is not None:
        built = columns.build_optimizer(columns.BITSANDBYTES, rows["AdamW"], model)
        assert type(built).__name__ == "AdamW8bit"
        assert built.defaults["lr"] == rows["AdamW"].kwargs["lr"] and built.defaults["weight_decay"] == 1e-2


def test_the_100m_resident_memory_is_the_median_of_interleaved_fresh_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 100M model's peak-RSS growth, which the memory goals compare, is measured REPEATS times per
    column, the columns interleaved, and its median kept beside every run; other workloads once."""
    from scratchopt.tools.bench import run as bench_run
    from scratchopt.tools.bench.run import Row

    calls: list[tuple[str, str]] = []
    growth = iter(range(100, 1000))

    def measured(workload: str, preset: str, layers: int, label: str, column: str, threads: int) -> dict[str, Any]:
        calls.append((workload, column))
        return {"peak_growth_MB": float(next(growth)), "state_MB": 10.0}

    monkeypatch.setattr(rss, "measure", measured)
    row = Row("tiny", "AdamW", columns.DEFAULT_MODE, 10, 2)
    found = bench_run.resident_memory(
        [row], {"tiny": {}}, PRESETS["full"], ["torch fused", "ours fused"], 1, lambda line: None
    )
    wide = [call for call in calls if call[0] == rss.WIDE]
    assert [column for _, column in wide] == ["torch fused", "ours fused"] * rss.REPEATS
    assert [call for call in calls if call[0] == "tiny"] == [("tiny", "torch fused"), ("tiny", "ours fused")]
    by = {(r["workload"], r["column"]): r for r in found}
    assert by[(rss.WIDE, "torch fused")]["peak_growth_MB_runs"] == [102.0, 104.0, 106.0]
    assert by[(rss.WIDE, "torch fused")]["peak_growth_MB"] == 104.0
    assert by[(rss.WIDE, "ours fused")]["peak_growth_MB"] == 105.0
    assert "median of 3 runs: 103.0, 105.0, 107.0" in table.format_resident({"resident_memory": found})
