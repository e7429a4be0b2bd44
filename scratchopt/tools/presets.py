"""How much work ``scratchopt report`` and ``scratchopt bench`` do: one :class:`Preset` for both.

``full`` is the default of both commands. For the report it reproduces every run the seed articles
describe at their sizes (50,000 regression steps, the 2000-layer MLP of the step-time table) and still
finishes in a few minutes on two cores; for the benchmark it times the full-size models. ``quick``
shrinks only what costs time, for the test suite: the toy-function runs are cheap and identical in both,
so every figure of the report's first section is checked even by the quick preset.

The models the two commands share (:mod:`scratchopt.tools.workloads`) take their sizes from the same
preset, so the report's memory section measures the benchmark's GPT-like model at the size the
benchmark itself would time under that preset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    name: str

    # The models built in code (scratchopt.tools.workloads), shared by the benchmark and the report.
    #: Layers of the seed MLP, ``mlp_layers`` × (Linear(64, 64), Tanh) (the seed article's has 2000).
    mlp_layers: int
    gpt_layers: int
    gpt_width: int
    gpt_vocab: int
    gpt_seq_len: int
    gpt_batch: int
    #: Elements of the one large tensor.
    large_params: int

    # The report.
    #: Gradient-descent steps of the long linear-regression run (the seed article's is 50,000).
    regression_long_steps: int
    #: Mini-batch steps of the digits MLP, per algorithm, and its batch size.
    digits_steps: int
    digits_batch_size: int
    #: Steps of the GPT-like model that each optimizer after AdamW trains beside it.
    gpt_curve_steps: int
    #: Steps of the GPT-like model and the digits MLP that each algorithm of section 5 trains with each
    #: precision of its state, from each of the first ``precision_seeds`` seeds.
    precision_curve_steps: int
    precision_seeds: int
    #: The model whose optimizer step is timed against torch's: ``speed_layers`` × Linear(width, width).
    speed_layers: int
    speed_width: int
    #: Layers of the seed's step-time workload, a deep MLP of Linear(64, 64) (the seed article's has 2000).
    speed_seed_layers: int
    #: ``torch.utils.benchmark`` keeps timing each step until this many seconds have passed.
    speed_min_run_time_s: float
    #: Times each optimizer is timed, alternating with its twin; the smallest median is kept (interference
    #: from other processes only ever adds time, so many short rounds beat one long one on a busy machine).
    speed_rounds: int

    # The benchmark (scratchopt.tools.bench).
    #: Row labels run by default (``--algorithms`` chooses others); empty: every row the benchmark has.
    algorithms: tuple[str, ...]
    workloads: tuple[str, ...]
    #: Columns left out by default (``--columns`` chooses any).
    excluded_columns: tuple[str, ...]
    #: Modes run for every algorithm.
    modes: tuple[str, ...]
    #: Further modes, each with the workloads it runs on, for ``more_modes_algorithms`` only (each costs a
    #: whole row of train steps; accumulation four forward+backward passes a step).
    more_modes: tuple[tuple[str, tuple[str, ...]], ...]
    more_modes_algorithms: tuple[str, ...]
    #: Untimed steps after the first (timed on its own) step of every column.
    warmup_steps: int
    rounds: int
    steps_per_round: int
    #: Largest model (in tensors) the per-tensor ``compiled`` column runs on.
    compile_max_tensors: int
    #: Measure the first fused step in fresh processes with empty caches.
    warmup_compile: bool

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    "full": Preset(
        name="full",
        mlp_layers=2000,
        gpt_layers=6,
        gpt_width=256,
        gpt_vocab=2048,
        gpt_seq_len=64,
        gpt_batch=8,
        large_params=16 * 2**20,
        regression_long_steps=50_000,
        digits_steps=1000,
        gpt_curve_steps=600,
        precision_curve_steps=2000,
        precision_seeds=3,
        digits_batch_size=128,
        speed_layers=16,
        speed_width=256,
        speed_seed_layers=2000,
        speed_min_run_time_s=0.08,
        speed_rounds=6,
        algorithms=(),
        workloads=("mlp", "gpt", "tiny", "large"),
        excluded_columns=(),
        modes=("set-to-none",),
        more_modes=(("set-to-zero", ("mlp", "tiny", "large")), ("accumulate-4", ("tiny", "large"))),
        more_modes_algorithms=("AdamW",),
        warmup_steps=1,
        rounds=3,
        steps_per_round=1,
        compile_max_tensors=100,
        warmup_compile=True,
    ),
    "quick": Preset(
        name="quick",
        mlp_layers=200,
        gpt_layers=2,
        gpt_width=128,
        gpt_vocab=512,
        gpt_seq_len=32,
        gpt_batch=4,
        large_params=4 * 2**20,
        regression_long_steps=5_000,
        digits_steps=30,
        gpt_curve_steps=12,
        precision_curve_steps=12,
        precision_seeds=1,
        digits_batch_size=128,
        speed_layers=4,
        speed_width=64,
        speed_seed_layers=50,
        speed_min_run_time_s=0.02,
        speed_rounds=1,
        algorithms=("SGD+momentum", "Adam", "AdamW"),
        workloads=("mlp", "gpt", "tiny", "large"),
        # The peers' columns apply to some rows only (DeepSpeed's Adam; the reference packages of
        # algorithms torch does not have, which none of these is): the full preset runs them.
        excluded_columns=(
            "ours compiled",
            "ours bf16 state",
            "ours 8-bit state",
            "deepspeed cpu adam",
            "reference package",
            "bitsandbytes 8-bit",
        ),
        modes=("set-to-none",),
        more_modes=(),
        more_modes_algorithms=(),
        warmup_steps=1,
        rounds=3,
        steps_per_round=1,
        compile_max_tensors=100,
        warmup_compile=False,
    ),
}
#: Other names ``--preset`` accepts: ``scratchopt bench --preset default`` is the full benchmark.
ALIASES = {"default": "full"}


def preset(name: str) -> Preset:
    """The preset called ``name`` (or one of its :data:`ALIASES`)."""
    return PRESETS[ALIASES.get(name, name)]
