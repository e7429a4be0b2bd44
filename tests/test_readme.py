"""The README's "In a training run" examples run as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch


def test_the_training_run_examples_run():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## In a training run", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 5, "the section lost an example"
    namespace: dict[str, Any] = {}
    try:
        exec(compile("\n".join(blocks), "README.md", "exec"), namespace)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
        torch._dynamo.reset()
    assert namespace["optimizer"].state[namespace["big"].weight]["step"].item() == 1
