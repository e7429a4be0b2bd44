"""Memory per rank of every algorithm's state under ZeRO-1/2/3, computed from what each optimizer keeps.

Nothing here is typed in by hand: for each algorithm, the optimizer is built on two small parameters of
the same rank (``(5,)`` and ``(11,)``; ``(3, 5)`` and ``(7, 11)``) and stepped once, and every tensor it
then keeps in ``optimizer.state`` is matched against the parameter's shape, dimension by dimension: a
dimension equal in both runs is a constant, one that follows a parameter dimension scales with it, one
that follows the element count is the flattened parameter. That rule gives the state of any parameter
shape, so the state of a model follows from its list of parameter shapes, here those of two
Llama-architecture models (1.24B and 70.6B parameters). Adafactor's factored second moment (a row and a
column vector per matrix), Muon's 2-d-only momentum and LBFGS's history come out right because they are
measured, not assumed.

Per rank, with P the parameters' bytes, G the gradients' bytes (as large as the parameters) and S the
optimizer state's bytes, over N ranks::

    ZeRO-1 (optimizer state sharded):          P + G + S/N
    ZeRO-2 (also the gradients):               P + (G + S)/N
    ZeRO-3 (also the parameters; FSDP):        (P + G + S)/N

Activations, temporaries and communication buffers are not counted. ``python -m scratchopt.tools.memory_plan
--markdown`` prints the tables of ``docs/scaling.md``; ``--update docs/scaling.md`` rewrites them there.
"""

from __future__ import annotations

import argparse
import inspect
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from scratchopt.algorithms import ALGORITHMS
from scratchopt.optimizer import Algorithm
from scratchopt.tools import catalog

#: Two parameter shapes per rank, with dimensions and element counts that differ from each other and
#: between the two, so that every state dimension can be told apart.
PROXY_SHAPES: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {1: ((5,), (11,)), 2: ((3, 5), (7, 11))}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RANKS = (8, 64)
GB = 1e9


@dataclass(frozen=True)
class Configuration:
    """One row of the tables: an algorithm with the arguments that decide what state it keeps (beside its
    example arguments). Whether its step takes a closure, and whether it takes matrices or sparse
    gradients only, is read from the algorithm's declarations."""

    label: str
    algorithm: str
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    #: For an algorithm that takes matrices only (Muon): the one the other parameters are counted with.
    others: str = "AdamW"
    #: A history of past steps kept in lists (LBFGS): measured with this argument set to a small value, its
    #: lists then hold that many entries; the table scales them to the argument's default.
    history_argument: str | None = None

    def algorithm_for(self, rank: int) -> str:
        """The algorithm that keeps the state of a parameter of this rank."""
        if ALGORITHMS[self.algorithm].takes == "matrices" and rank != 2:
            return self.others
        return self.algorithm


HISTORY_MEASURED = 2

#: Rows chosen for what they show (variants of one algorithm, a history to scale); every other registered
#: algorithm gets a row of its own, with its ``example_kwargs``.
_CHOSEN: tuple[Configuration, ...] = (
    Configuration("SGD", "SGD", {"lr": 0.1}),
    Configuration("SGD, momentum", "SGD", {"lr": 0.1, "momentum": 0.9}),
    Configuration("NesterovLookahead", "NesterovLookahead", {"lr": 0.1, "momentum": 0.9}),
    Configuration("Adam", "Adam"),
    Configuration("Adam, amsgrad", "Adam", {"amsgrad": True}),
    Configuration("AdamW", "AdamW"),
    Configuration("RMSprop", "RMSprop"),
    Configuration("RMSprop, centered, momentum", "RMSprop", {"centered": True, "momentum": 0.9}),
    Configuration("Adagrad", "Adagrad"),
    Configuration("Adadelta", "Adadelta"),
    Configuration("Adamax", "Adamax"),
    Configuration("NAdam", "NAdam"),
    Configuration("RAdam", "RAdam"),
    Configuration("ASGD", "ASGD"),
    Configuration("Rprop", "Rprop"),
    Configuration("Adafactor", "Adafactor"),
    Configuration("Muon (AdamW for the 1-d params)", "Muon", others="AdamW"),
    Configuration("SparseAdam", "SparseAdam"),
    Configuration("LBFGS", "LBFGS", {"max_iter": 5}, history_argument="history_size"),
    Configuration("Lion", "Lion"),
)
#: Registered algorithms the tables leave out on purpose, and why.
NOT_PLANNED = {"Newton": "keeps no state between steps (its n × n Hessian lives only during a step)"}
CONFIGURATIONS: tuple[Configuration, ...] = _CHOSEN + tuple(
    Configuration(name, name, dict(cls.example_kwargs))
    for name, cls in ALGORITHMS.items()
    if name not in {configuration.algorithm for configuration in _CHOSEN} and name not in NOT_PLANNED
)


def algorithms_without_a_row() -> list[str]:
    """Registered algorithms with neither a row nor a reason to have none: each needs one of the two."""
    rows = {configuration.algorithm for configuration in CONFIGURATIONS}
    return [name for name in ALGORITHMS if name not in rows and name not in NOT_PLANNED]


@dataclass(frozen=True)
class ModelShapes:
    """A model as the optimizer sees it: how many parameters of each shape."""

    name: str
    shapes: tuple[tuple[tuple[int, ...], int], ...]

    @property
    def parameters(self) -> int:
        return sum(math.prod(shape) * count for shape, count in self.shapes)

    @property
    def tensors(self) -> int:
        return sum(count for _, count in self.shapes)


def llama_shapes(name: str, vocab: int, hidden: int, layers: int, ffn: int, kv_dim: int, tied: bool) -> ModelShapes:
    """A Llama-architecture decoder: embedding, per layer q/k/v/o projections (grouped-query k and v of
    ``kv_dim`` rows), a gated MLP (gate, up, down) and two RMSNorm weights; a final norm; an output head
    unless tied to the embedding."""
    shapes = [
        ((vocab, hidden), 1 if tied else 2),
        ((hidden, hidden), 2 * layers),
        ((kv_dim, hidden), 2 * layers),
        ((ffn, hidden), 2 * layers),
        ((hidden, ffn), layers),
        ((hidden,), 2 * layers + 1),
    ]
    return ModelShapes(name, tuple(shapes))


MODELS = (
    llama_shapes("1B (Llama-3.2-1B shapes)", vocab=128256, hidden=2048, layers=16, ffn=8192, kv_dim=512, tied=True),
    llama_shapes("70B (Llama-3-70B shapes)", vocab=128256, hidden=8192, layers=80, ffn=28672, kv_dim=1024, tied=False),
)

#: One dimension of a state tensor: ("constant", n), ("dim", i) of the parameter, or ("numel", 0).
Factor = tuple[str, int]


@dataclass(frozen=True)
class StateRule:
    """How one state tensor's size follows its parameter's shape."""

    key: str
    factors: tuple[Factor, ...]
    element_size: int
    #: How many such tensors the optimizer keeps (the entries of a history list).
    copies: int = 1

    def bytes_for(self, shape: Sequence[int]) -> int:
        elements = 1
        for kind, value in self.factors:
            elements *= value if kind == "constant" else shape[value] if kind == "dim" else math.prod(shape)
        return elements * self.element_size * self.copies


def _factors(
    key: str, small: Tensor, large: Tensor, small_shape: tuple[int, ...], large_shape: tuple[int, ...]
) -> tuple[Factor, ...]:
    if small.dim() != large.dim():
        raise ValueError(f"state[{key!r}] has rank {small.dim()} for one parameter and {large.dim()} for another")
    factors: list[Factor] = []
    for a, b in zip(small.shape, large.shape):
        if a == b:
            factors.append(("constant", a))
        elif (a, b) in zip(small_shape, large_shape):
            factors.append(("dim", list(zip(small_shape, large_shape)).index((a, b))))
        elif (a, b) == (math.prod(small_shape), math.prod(large_shape)):
            factors.append(("numel", 0))
        else:
            raise ValueError(
                f"state[{key!r}] of shape {tuple(small.shape)} does not follow the parameter's "
                f"{small_shape} (nor {tuple(large.shape)} its {large_shape})"
            )
    return tuple(factors)


def _state_tensors(state: dict[str, Any]) -> dict[str, list[Tensor]]:
    """Each state key's tensors: one, or a history list's entries."""
    found: dict[str, list[Tensor]] = {}
    for key, value in state.items():
        if isinstance(value, Tensor):
            found[key] = [value]
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Tensor) for v in value):
            found[key] = list(value)
    return found


def kept_state(
    configuration: Configuration, algorithm: str, shape: tuple[int, ...], dtype: torch.dtype
) -> dict[str, list[Tensor]]:
    """The state one step of ``algorithm`` leaves for a parameter of this shape and dtype."""
    generator = torch.Generator().manual_seed(0)
    param = torch.randn(shape, generator=generator).to(dtype).requires_grad_()
    cls = ALGORITHMS[algorithm]
    kwargs = dict(cls.example_kwargs)
    if algorithm == configuration.algorithm:
        kwargs.update(configuration.kwargs)
        if configuration.history_argument:
            kwargs[configuration.history_argument] = HISTORY_MEASURED
    optimizer = catalog.construct(cls, [param], **kwargs)
    weights = torch.rand(shape, generator=generator).to(dtype) + 0.5

    def loss() -> Tensor:
        optimizer.zero_grad()
        value = (weights * param.square() + param.square().square()).sum()
        value.backward()
        return value

    if cls.needs_closure:
        catalog.step_with_closure(optimizer, loss)
    else:
        loss()
        if cls.takes == "sparse gradients":
            assert param.grad is not None  # loss() has just called backward()
            param.grad = param.grad.to_sparse()
        optimizer.step()
    return _state_tensors(optimizer.state[param])


def _history_length(cls: type[Algorithm], argument: str) -> int:
    return inspect.signature(cls).parameters[argument].default


def state_rules(configuration: Configuration, rank: int, dtype: torch.dtype) -> list[StateRule]:
    """The state rules of one configuration for parameters of this rank."""
    algorithm = configuration.algorithm_for(rank)
    small_shape, large_shape = PROXY_SHAPES[rank]
    small = kept_state(configuration, algorithm, small_shape, dtype)
    large = kept_state(configuration, algorithm, large_shape, dtype)
    if set(small) != set(large):
        raise ValueError(f"{configuration.label}: state keys {sorted(small)} and {sorted(large)} differ by shape")
    rules = []
    for key, tensors in small.items():
        copies = 1
        if len(tensors) != 1:
            if configuration.history_argument is None or len(tensors) != HISTORY_MEASURED:
                raise ValueError(f"{configuration.label}: state[{key!r}] is a list of {len(tensors)} tensors")
            copies = _history_length(ALGORITHMS[algorithm], configuration.history_argument)
        rules.append(
            StateRule(
                key,
                _factors(key, tensors[0], large[key][0], small_shape, large_shape),
                tensors[0].element_size(),
                copies,
            )
        )
    return rules


@dataclass
class Plan:
    """Bytes of one configuration's state and of the parameters and gradients, for one model and dtype."""

    label: str
    state_bytes: int
    parameter_bytes: int

    def per_rank(self, stage: int, ranks: int) -> float:
        """Bytes per rank under ZeRO-``stage`` over ``ranks`` ranks."""
        params, grads, state = self.parameter_bytes, self.parameter_bytes, self.state_bytes
        if stage == 1:
            return params + grads + state / ranks
        if stage == 2:
            return params + (grads + state) / ranks
        return (params + grads + state) / ranks


def plan(
    model: ModelShapes, dtype: torch.dtype, configurations: Sequence[Configuration] = CONFIGURATIONS
) -> list[Plan]:
    """Every configuration's state for ``model`` with parameters, gradients and state in ``dtype``."""
    element_size = torch.empty((), dtype=dtype).element_size()
    rows = []
    for configuration in configurations:
        rules = {rank: state_rules(configuration, rank, dtype) for rank in PROXY_SHAPES}
        state = sum(count * sum(rule.bytes_for(shape) for rule in rules[len(shape)]) for shape, count in model.shapes)
        rows.append(Plan(configuration.label, state, model.parameters * element_size))
    return rows


def _gigabytes(value: float) -> str:
    gigabytes = value / GB
    if gigabytes >= 100:
        return f"{gigabytes:,.0f}"
    return f"{gigabytes:.1f}" if gigabytes >= 10 else f"{gigabytes:.2f}"


def markdown_table(model: ModelShapes, dtype_name: str, rows: list[Plan]) -> str:
    header = ["algorithm", "state, 1 rank"] + [f"ZeRO-{stage}, {ranks} ranks" for ranks in RANKS for stage in (1, 2, 3)]
    lines = [
        f"**{model.name}**: {model.parameters:,} parameters in {model.tensors} tensors; {dtype_name} parameters "
        f"{_gigabytes(rows[0].parameter_bytes)} GB, gradients as much. GB per rank:",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" + "---:|" * (len(header) - 1),
    ]
    for row in rows:
        cells = [row.label, _gigabytes(row.state_bytes)]
        cells += [_gigabytes(row.per_rank(stage, ranks)) for ranks in RANKS for stage in (1, 2, 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown() -> str:
    """Every table of ``docs/scaling.md``: each model, float32 then bfloat16 training."""
    sections = []
    for dtype_name, dtype in DTYPES.items():
        sections.append(f"#### Parameters, gradients and optimizer state in {dtype_name}")
        for model in MODELS:
            sections.append(markdown_table(model, dtype_name, plan(model, dtype)))
    return "\n\n".join(sections) + "\n"


BEGIN = "<!-- memory_plan: begin (generated by `python -m scratchopt.tools.memory_plan --update docs/scaling.md`) -->"
END = "<!-- memory_plan: end -->"


def generated_section(text: str) -> str:
    """What lies between the markers in ``text``."""
    match = re.search(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), text, re.S)
    if match is None:
        raise ValueError("the markers of the generated tables are missing")
    return match.group(1)


def update(path: Path, generate: Callable[[], str] = markdown) -> None:
    """Replace the tables between the markers in ``path`` with freshly computed ones."""
    text = path.read_text(encoding="utf-8")
    old = generated_section(text)
    path.write_text(text.replace(BEGIN + "\n" + old + END, BEGIN + "\n" + generate() + END), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    description = (__doc__ or "").split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m scratchopt.tools.memory_plan", description=description)
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    parser.add_argument("--update", type=Path, metavar="PATH", help="rewrite the tables between the markers in PATH")
    args = parser.parse_args(argv)
    missing = algorithms_without_a_row()
    if missing:
        print(
            f"memory_plan: no row for {', '.join(missing)}: add a Configuration (or a NOT_PLANNED reason)",
            file=sys.stderr,
        )
    if args.update:
        update(args.update)
    if args.markdown or not args.update:
        print(markdown(), end="")


if __name__ == "__main__":
    main()
