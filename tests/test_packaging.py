"""What `pip install scratchopt` gives: torch as a range, nothing the optimizers do not need, type hints,
`python -m scratchopt`, and a clear message when the report's extra is missing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import scratchopt
from scratchopt.tools import cli

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_asks_for_torch_as_a_range_and_nothing_else():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["dependencies"] == ["torch>=2.13,<2.14"]
    major_minor = tuple(int(part) for part in torch.__version__.split(".")[:2])
    assert (2, 13) <= major_minor < (2, 14), "the installed torch is outside the range the package states"
    report = project["optional-dependencies"]["report"]
    assert {"matplotlib", "scikit-learn", "tqdm", "numpy"} <= set(report)


def test_importing_scratchopt_imports_no_report_dependency():
    # torch itself imports numpy and tqdm when they are installed: count what scratchopt adds.
    code = (
        "import sys, torch; before = set(sys.modules); import scratchopt; "
        "print(sorted(m for m in ('matplotlib', 'sklearn', 'tqdm', 'numpy') if m in set(sys.modules) - before))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_python_dash_m_runs_the_command():
    out = subprocess.run([sys.executable, "-m", "scratchopt", "--help"], capture_output=True, text=True, check=True)
    assert "report" in out.stdout and "bench" in out.stdout


def test_a_missing_extra_is_named(monkeypatch):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real(name))
    with pytest.raises(SystemExit, match=re.escape("needs matplotlib") + ".*pip install 'scratchopt\\[report\\]'"):
        cli.main(["report", "--out", "unused"])


def test_type_hints_ship_and_no_machine_path_is_named():
    package = Path(scratchopt.__file__).parent
    assert (package / "py.typed").exists()
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(?<![\w.])/(work|home|root|Users)/", text), f"{path.name} names a machine path"
