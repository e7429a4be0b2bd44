"""The tools around the library: ``scratchopt demo`` runs every registered algorithm beside its torch twin
(read from the registry, so a new algorithm is covered without an edit here), the library imports none
of the tools, and the ``scratchopt`` command says what it is and which version."""

from __future__ import annotations

import subprocess
import sys

import pytest

import scratchopt
from scratchopt.algorithms import ALGORITHMS, torch_twins
from scratchopt.tools import catalog, cli, demo

STEPS = 3


@pytest.fixture(scope="module")
def digits() -> tuple:
    pytest.importorskip("sklearn")
    return demo.digits_data()


def test_the_registry_declares_the_torch_twins() -> None:
    """The demo's comparisons below are only as wide as the declarations: without them every algorithm
    would be skipped and the test would check nothing."""
    assert {"SGD", "Adam", "AdamW", "LBFGS", "Muon", "SparseAdam"} <= set(torch_twins())


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_demo_trains_every_algorithm_bit_for_bit_like_its_twin(name: str, digits: tuple) -> None:
    """Ours (impl="loop") and torch's for-loop, from the same weights on the same data: equal losses at
    every step and equal parameters, whatever the algorithm needs (a closure, matrices only, sparse
    gradients). An algorithm without a torch twin is skipped, and says so."""
    cls = ALGORITHMS[name]
    comparison = demo.compare(cls, *digits, steps=STEPS)
    if catalog.torch_twin(cls) is None:
        assert comparison.skipped == demo.NO_TWIN
        return
    assert comparison.skipped is None
    assert len(comparison.ours_losses) == STEPS
    assert comparison.ours_losses == comparison.torch_losses
    assert comparison.max_param_diff == 0.0
    assert comparison.ours_losses[-1] == comparison.ours_losses[-1], "the loss is NaN"


def test_demo_prints_a_line_for_every_twin(digits: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    comparisons = demo.main(steps=1)
    printed = capsys.readouterr().out
    assert [c.algorithm for c in comparisons if not c.skipped] == [
        name for name, cls in ALGORITHMS.items() if catalog.torch_twin(cls) is not None
    ]
    for name in ALGORITHMS:
        assert name in printed, name


def test_importing_scratchopt_imports_no_tool() -> None:
    code = (
        "import sys, scratchopt; "
        "print(sorted(m for m in sys.modules if m == 'scratchopt.tools' or m.startswith('scratchopt.tools.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_describes_the_command_in_plain_words(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    assert "demo" in text and "report" in text and "bench" in text
    assert "``" not in text and ":mod:" not in text, "the description is raw reST"


def test_version_flag_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.strip() == f"scratchopt {scratchopt.__version__}"


def test_help_imports_neither_the_report_nor_the_benchmark_run() -> None:
    code = (
        "import sys\nfrom scratchopt.tools import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith(('scratchopt.tools.report', "
        "'scratchopt.tools.bench.run', 'scratchopt.tools.demo', 'matplotlib', 'sklearn'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
