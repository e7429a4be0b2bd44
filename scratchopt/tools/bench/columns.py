"""What the benchmark runs: its rows (algorithms), its columns (implementations) and its training loops.

Rows come from the registry: every registered algorithm a plain ``opt.step()`` loop over a dense model
can run is a row, labelled by its class name and built with its ``example_kwargs`` and ``lr=1e-3``; the
benchmark adds ``SGD+momentum`` beside plain SGD. The others are named with the reason
(:func:`algorithm_rows`). Columns: torch's for-loop, foreach and fused implementations, then one
column per scratchopt strategy (``impl=``, from :data:`scratchopt.strategies.NAMES`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from scratchopt import strategies
from scratchopt.algorithms import ALGORITHMS
from scratchopt.optimizer import Algorithm
from scratchopt.tools import catalog
from scratchopt.tools.presets import Preset


@dataclass(frozen=True)
class Mode:
    """One way of running the training loop."""

    label: str
    set_to_none: bool
    micro_batches: int


MODES: dict[str, Mode] = {
    "set-to-none": Mode("zero_grad() (set_to_none=True, torch's default), forward, backward, step", True, 1),
    "set-to-zero": Mode("zero_grad(set_to_none=False), forward, backward, step", False, 1),
    "accumulate-4": Mode("zero_grad(), 4 × (forward, backward), step", True, 4),
}
DEFAULT_MODE = "set-to-none"

#: torch's implementations, by column, with the flags that select them.
TORCH_FLAGS: dict[str, dict[str, Any]] = {
    "torch loop": {"foreach": False},
    "torch foreach": {"foreach": True},
    "torch fused": {"fused": True},
}
TORCH_COLUMNS = tuple(TORCH_FLAGS)
REFERENCE_COLUMN = "torch loop"
TORCH_FUSED = "torch fused"


def ours(strategy: str) -> str:
    """The column of a scratchopt strategy."""
    return f"ours {strategy}"


OURS_FUSED = ours("fused")
#: The column of the per-tensor compiled kernels: its compile time grows with the tensor count, so it runs
#: only on models of at most ``compile_max_tensors`` tensors.
OURS_COMPILED = ours("compiled")
OURS_COLUMNS = tuple(ours(name) for name in strategies.NAMES)
#: A peer's CPU Adam/AdamW (an AVX-512 C++ extension built on first use), run where it is installed:
#: the benchmark never depends on it.
DEEPSPEED = "deepspeed cpu adam"
#: The reference implementation an algorithm without a torch twin is proven against (its
#: ``reference_class``), run where that package is installed.
REFERENCE = "reference package"
#: bitsandbytes' 8-bit blockwise optimizers (its CPU path), where it is installed, for the algorithms it has.
BITSANDBYTES = "bitsandbytes 8-bit"
_BITSANDBYTES_CLASSES = {"Adam": "Adam8bit", "AdamW": "AdamW8bit", "Lion": "Lion8bit"}
#: torchao's 8-bit blockwise Adam and AdamW (``torchao.optim``, a step compiled by ``torch.compile``),
#: where it is installed (``pip install torchao``).
TORCHAO = "torchao 8-bit"
_TORCHAO_CLASSES = {"Adam": "Adam8bit", "AdamW": "AdamW8bit"}
PEER_COLUMNS = (DEEPSPEED, REFERENCE, BITSANDBYTES, TORCHAO)
#: Ours fused with the state kept in bfloat16 and in blockwise 8-bit (:mod:`scratchopt.precision`), for
#: elementwise algorithms.
OURS_BF16_STATE = "ours bf16 state"
OURS_8BIT_STATE = "ours 8-bit state"
PRECISION_COLUMNS = (OURS_BF16_STATE, OURS_8BIT_STATE)
_STATE_DTYPES: dict[str, Any] = {OURS_BF16_STATE: torch.bfloat16, OURS_8BIT_STATE: "8bit"}
COLUMNS = TORCH_COLUMNS + OURS_COLUMNS + PRECISION_COLUMNS + PEER_COLUMNS
#: Columns whose parameters must equal torch's for-loop bit for bit after the same steps (on the CPU): the
#: strategies bit-exact with the loop, and the loop.
BIT_EXACT_COLUMNS = tuple(ours(name) for name, strategy in strategies.STRATEGIES.items() if strategy.exact)


def preset_columns(preset: Preset) -> list[str]:
    """The columns ``preset`` runs by default (a peer's only where it is installed)."""
    installed = {
        DEEPSPEED: importlib.util.find_spec("deepspeed") is not None,
        REFERENCE: True,
        BITSANDBYTES: importlib.util.find_spec("bitsandbytes") is not None,
        TORCHAO: importlib.util.find_spec("torchao") is not None,
    }
    return [
        column
        for column in COLUMNS
        if column not in preset.excluded_columns and (column not in PEER_COLUMNS or installed[column])
    ]


@dataclass(frozen=True)
class AlgorithmRow:
    """One row: an algorithm with the arguments it is run with."""

    label: str
    cls: type[Algorithm]
    kwargs: dict[str, Any] = field(hash=False)

    @property
    def twin(self) -> type[torch.optim.Optimizer] | None:
        return catalog.torch_twin(self.cls)


#: The learning rate of every row: small enough that the models stay finite over the timed steps.
LEARNING_RATE = 1e-3
#: Rows beside each algorithm's own: label, algorithm, arguments besides its example ones.
VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (("SGD+momentum", "SGD", {"momentum": 0.9}),)


def _arguments(cls: type[Algorithm], extra: dict[str, Any]) -> dict[str, Any]:
    lr = {"lr": LEARNING_RATE} if catalog.accepts(cls, "lr") else {}
    return {**dict(cls.example_kwargs), **lr, **extra}


def algorithm_rows() -> tuple[dict[str, AlgorithmRow], dict[str, str]]:
    """The rows the benchmark can run, by label, and every other registered algorithm with why not."""
    rows: dict[str, AlgorithmRow] = {}
    left_out: dict[str, str] = {}
    for name, cls in ALGORITHMS.items():
        reason = catalog.loop_cannot_run(cls)
        if reason is not None:
            left_out[name] = f"{reason}, and the benchmark's loop calls opt.step() on every param of a dense model"
            continue
        rows[name] = AlgorithmRow(name, cls, _arguments(cls, {}))
        for label, algorithm, extra in VARIANTS:
            if algorithm == name:
                rows[label] = AlgorithmRow(label, cls, _arguments(cls, extra))
    return rows, left_out


def build_optimizer(column: str, row: AlgorithmRow, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer a column runs on ``model``.

    Raises for a column that cannot run the row (torch has no twin, or no fused kernel for it).
    """
    if column == DEEPSPEED:
        return _deepspeed_adam(row, model)
    if column == REFERENCE:
        return _reference(row, model)
    if column in TORCH_FLAGS:
        twin = row.twin
        if twin is None:
            raise ValueError(f"torch.optim has no twin of {row.cls.__name__}")
        return twin(model.parameters(), **row.kwargs, **TORCH_FLAGS[column])
    if column == BITSANDBYTES:
        return _bitsandbytes(row, model)
    if column == TORCHAO:
        return _torchao(row, model)
    if column in _STATE_DTYPES:
        if not row.cls.elementwise:
            raise ValueError(f"{row.cls.__name__} is not elementwise: its state stays in the params' dtype")
        return catalog.construct(
            row.cls, model.parameters(), **row.kwargs, impl="fused", state_dtype=_STATE_DTYPES[column]
        )
    impl = column.removeprefix("ours ")
    return catalog.construct(row.cls, model.parameters(), **row.kwargs, impl=impl)


def _bitsandbytes(row: AlgorithmRow, model: nn.Module) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit optimizer of the row's algorithm (block size 256, tensors from 4096 elements
    quantised, as ours), with the row's arguments."""
    return _eight_bit_peer(row, model, "bitsandbytes", "bitsandbytes.optim", _BITSANDBYTES_CLASSES, min_8bit_size=4096)


def _torchao(row: AlgorithmRow, model: nn.Module) -> torch.optim.Optimizer:
    """torchao's 8-bit optimizer of the row's algorithm (block size 256, as ours; it quantises tensors of
    4096 elements or more whose size is a multiple of the block), with the row's arguments."""
    return _eight_bit_peer(row, model, "torchao", "torchao.optim", _TORCHAO_CLASSES, block_size=256)


def _eight_bit_peer(
    row: AlgorithmRow, model: nn.Module, package: str, module: str, classes: dict[str, str], **settings: Any
) -> torch.optim.Optimizer:
    """A peer package's 8-bit optimizer (``classes``: its class of each of our algorithms, in ``module``)
    with the row's lr, betas, eps and weight decay, and the peer's own ``settings``."""
    name = classes.get(row.cls.__name__)
    if name is None or row.kwargs.get("amsgrad"):
        raise ValueError(f"{package} has no 8-bit {row.cls.__name__} here")
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"{package} is not installed (pip install {package})")
    defaults = {n: p.default for n, p in inspect.signature(row.cls).parameters.items()}
    arguments = {**defaults, **row.kwargs}
    kept = {k: arguments[k] for k in ("lr", "betas", "eps", "weight_decay") if k in arguments}
    optimizer: torch.optim.Optimizer = getattr(importlib.import_module(module), name)(
        model.parameters(), **kept, **settings
    )
    return optimizer


def _deepspeed_adam(row: AlgorithmRow, model: nn.Module) -> torch.optim.Optimizer:
    """DeepSpeed's ``DeepSpeedCPUAdam`` with the row's Adam or AdamW arguments."""
    if row.cls.__name__ not in ("Adam", "AdamW") or row.kwargs.get("amsgrad"):
        raise ValueError("DeepSpeedCPUAdam is Adam and AdamW only")
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError("DeepSpeed is not installed (pip install deepspeed)")
    from deepspeed.ops.adam import DeepSpeedCPUAdam  # type: ignore[import-not-found]

    defaults = {name: p.default for name, p in inspect.signature(row.cls).parameters.items()}
    arguments = {**defaults, **row.kwargs}
    optimizer: torch.optim.Optimizer = DeepSpeedCPUAdam(
        model.parameters(),
        lr=arguments["lr"],
        betas=arguments["betas"],
        eps=arguments["eps"],
        weight_decay=arguments["weight_decay"],
        adamw_mode=row.cls.__name__ == "AdamW",
    )
    return optimizer


def _reference(row: AlgorithmRow, model: nn.Module) -> torch.optim.Optimizer:
    """The row's reference package's class, with the row's arguments (its per-tensor loop or its own
    default implementation, as a user of that package gets it)."""
    declared = row.cls.reference_class
    if declared is None:
        raise ValueError(f"{row.cls.__name__} has no reference package beside torch.optim")
    module_name, _, class_name = declared.partition(":")
    if importlib.util.find_spec(module_name) is None:
        raise ValueError(f"{module_name} is not installed (pip install 'scratchopt[references]')")
    reference: Callable[..., torch.optim.Optimizer] = getattr(importlib.import_module(module_name), class_name)
    optimizer = reference(model.parameters(), **row.kwargs)
    train = getattr(optimizer, "train", None)
    if callable(train):
        train()  # an optimizer with train and eval modes (Schedule-Free) steps in train mode
    return optimizer
