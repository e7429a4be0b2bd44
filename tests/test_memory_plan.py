"""``scratchopt.tools.memory_plan``: the tables in docs/scaling.md are the generated ones, every algorithm with a
torch twin that keeps state has a row, and the shape rules predict the state a real optimizer keeps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scratchopt.algorithms import ALGORITHMS, torch_twins
from scratchopt.tools import memory_plan
from scratchopt.tools.memory_plan import CONFIGURATIONS, ModelShapes, plan

DOC = Path(__file__).resolve().parent.parent / "docs" / "scaling.md"


def test_docs_hold_the_generated_tables() -> None:
    assert memory_plan.generated_section(DOC.read_text(encoding="utf-8")) == memory_plan.markdown(), (
        "docs/scaling.md is stale: run python -m scratchopt.tools.memory_plan --update docs/scaling.md"
    )


def test_every_registered_algorithm_has_a_row_or_a_reason() -> None:
    rows = {configuration.algorithm for configuration in CONFIGURATIONS}
    assert memory_plan.algorithms_without_a_row() == []
    assert set(torch_twins()) <= rows and len(torch_twins()) >= 15
    assert {"NesterovLookahead", "Lion"} <= rows
    assert set(memory_plan.NOT_PLANNED) <= set(ALGORITHMS)


#: Shapes that are none of the measured ones, to check the rules predict rather than repeat.
CHECK_MODEL = ModelShapes("check", (((6, 9), 2), ((13,), 1)))


@pytest.mark.parametrize(
    "configuration", [c for c in CONFIGURATIONS if c.history_argument is None], ids=lambda c: c.label
)
def test_rules_predict_the_state_of_other_shapes(configuration: memory_plan.Configuration) -> None:
    predicted = plan(CHECK_MODEL, torch.float32, [configuration])[0].state_bytes
    held = 0
    for shape, count in CHECK_MODEL.shapes:
        algorithm = configuration.algorithm_for(len(shape))
        tensors = memory_plan.kept_state(configuration, algorithm, shape, torch.float32)
        held += count * sum(t.numel() * t.element_size() for values in tensors.values() for t in values)
    assert predicted == held


def test_zero_stages_divide_what_they_shard() -> None:
    row = memory_plan.Plan("AdamW", state_bytes=800, parameter_bytes=400)
    assert (row.per_rank(1, 8), row.per_rank(2, 8), row.per_rank(3, 8)) == (900, 550, 200)
