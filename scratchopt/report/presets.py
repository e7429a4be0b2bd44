"""How much work each report preset does.

``full`` is the default: it reproduces every run the seeds describe at their sizes (50,000 regression
steps, the 2000-layer MLP of the step-time table) and still finishes in a couple of minutes on two
cores. ``quick`` shrinks only what costs time, for the test suite; the toy-function runs are cheap and
identical in both, so every seed figure of section 1 is checked even by the quick preset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    name: str
    #: Gradient-descent steps of the long linear-regression run (the seed's is 50,000).
    regression_long_steps: int
    #: Mini-batch steps of the digits MLP, per algorithm.
    mlp_steps: int
    mlp_batch_size: int
    #: The model whose optimizer step is timed against torch's: ``speed_layers`` × Linear(width, width).
    speed_layers: int
    speed_width: int
    #: Layers of the seed's step-time workload, a deep MLP of Linear(64, 64) (the seed's has 2000).
    speed_seed_layers: int
    #: ``torch.utils.benchmark`` keeps timing each step until this many seconds have passed.
    speed_min_run_time_s: float
    #: Times each optimizer is timed, alternating with its twin; the smallest median is kept (interference
    #: from other processes only ever adds time, so many short rounds beat one long one on a busy machine).
    speed_rounds: int

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    "full": Preset(
        name="full",
        regression_long_steps=50_000,
        mlp_steps=1000,
        mlp_batch_size=128,
        speed_layers=16,
        speed_width=256,
        speed_seed_layers=2000,
        speed_min_run_time_s=0.08,
        speed_rounds=6,
    ),
    "quick": Preset(
        name="quick",
        regression_long_steps=5_000,
        mlp_steps=30,
        mlp_batch_size=128,
        speed_layers=4,
        speed_width=64,
        speed_seed_layers=50,
        speed_min_run_time_s=0.02,
        speed_rounds=1,
    ),
}
