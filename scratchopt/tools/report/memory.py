"""Section 5: optimizer memory from a formula beside the bytes actually held, and work per parameter.

The formula for each algorithm is read off its state keys: ``k`` tensors shaped and typed like the
parameter, plus small 0-d tensors (``step``, NAdam's ``mu_product``) kept once per parameter tensor in
float32 whatever the parameter's dtype, as torch keeps them. The measurement sums the bytes of every
tensor in ``optimizer.state`` after one step. Elementwise work is counted, not estimated: a
``TorchDispatchMode`` sees every ATen operation of a steady-state step on one parameter tensor.

Stepping during backward (:func:`scratchopt.step_in_backward`) is measured on the GPT-like model of
:mod:`scratchopt.tools.workloads` (the one ``scratchopt bench`` times), at the preset's sizes: the peak of the bytes held by torch's CPU allocator over a few real training steps,
with the optimizer stepped after backward and inside it. ``tracemalloc`` does not see torch's
allocations and the process's RSS mixes them with the allocator's cached pages and the interpreter, so
the allocator's own events are summed instead (``torch.profiler`` with ``profile_memory=True``, as
``scratchopt bench`` measures a step's extra memory), from a fresh copy of the model built inside the
measured window: parameters, gradients, optimizer state, activations and temporaries all count.
"""

from __future__ import annotations

import copy
import functools
import gc
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from scratchopt import strategies
from scratchopt.algorithms import ALGORITHMS
from scratchopt.distributed import step_in_backward
from scratchopt.optimizer import Algorithm
from scratchopt.tools import catalog
from scratchopt.tools.bench.memory import peak_extra_memory
from scratchopt.tools.presets import Preset
from scratchopt.tools.report import html as h
from scratchopt.tools.report import seed_figures as seeds
from scratchopt.tools.report.plotting import OURS_COLOR, FigureWriter, new_figure, styled
from scratchopt.tools.workloads import make_workload

ANCHOR = "memory"
TITLE = "Memory and compute"
SCALAR_BYTES = 4  # torch keeps ``step`` (and NAdam's ``mu_product``) as 0-d float32 tensors
DTYPES = {"FP16": torch.float16, "FP32": torch.float32}
TABLE_SIZES = (1_000, 1_000_000_000)  # the seed's two model sizes
OPS_SIZES = (10_000, 100_000)  # one tensor of each size: the count per parameter must not change
NEWTON_SIZES = (8, 32)
#: Steps before the counted one: RAdam switches to its rectified update only once ρ_t > 5 (step 6 on).
WARMUP_STEPS = 10
#: The strategies measured stepping during backward: the per-tensor loop and the fused kernels; a name the
#: registry lacks is left out.
BACKWARD_STEP_STRATEGIES = tuple(name for name in strategies.NAMES if name in ("loop", "fused"))
#: Training steps per measurement: the first makes the optimizer state, the second
#: runs as every later one does.
BACKWARD_STEP_TRAIN_STEPS = 2


@dataclass(frozen=True)
class StateFormula:
    label: str
    algorithm: str
    kwargs: dict[str, Any] = field(hash=False)
    param_sized: tuple[str, ...] = ()  # state tensors shaped and typed like the parameter
    scalars: tuple[str, ...] = ()  # 0-d float32 tensors, one set per parameter tensor
    #: n × n matrices alive during a step but not kept (Newton's Hessian and its eigenvectors).
    transient_square_matrices: int = 0
    #: The closure returns the loss and must not call backward() (Newton's contract); otherwise an algorithm
    #: that needs a closure gets one that calls backward().
    loss_only_closure: bool = False
    #: Counted by the elementwise-pass counter (Newton's work is not elementwise: see :func:`newton_work`).
    elementwise_work: bool = True

    @property
    def cls(self) -> type[Algorithm]:
        return ALGORITHMS[self.algorithm]

    @property
    def arguments(self) -> dict[str, Any]:
        """The algorithm's example arguments, with this row's on top."""
        return {**dict(self.cls.example_kwargs), **self.kwargs}

    def state_bytes(self, parameters: int, tensors: int, element_size: int) -> int:
        return len(self.param_sized) * parameters * element_size + len(self.scalars) * SCALAR_BYTES * tensors

    def traffic_bytes_per_parameter(self, element_size: int) -> int:
        """Least memory traffic of a step: read θ, g and the state, write θ and the state."""
        return (3 + 2 * len(self.param_sized)) * element_size


ADAM_KEYS = ("exp_avg", "exp_avg_sq")
FORMULAS: tuple[StateFormula, ...] = (
    StateFormula("SGD", "SGD", {"lr": 0.1}),
    StateFormula("SGD, momentum", "SGD", {"lr": 0.1, "momentum": 0.9}, ("momentum_buffer",)),
    StateFormula("SGD, Nesterov", "SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}, ("momentum_buffer",)),
    StateFormula("NesterovLookahead", "NesterovLookahead", {}, ("momentum_buffer",)),
    StateFormula("Adam", "Adam", {}, ADAM_KEYS, ("step",)),
    StateFormula("Adam, amsgrad", "Adam", {"amsgrad": True}, (*ADAM_KEYS, "max_exp_avg_sq"), ("step",)),
    StateFormula("AdamW", "AdamW", {}, ADAM_KEYS, ("step",)),
    StateFormula("RMSprop", "RMSprop", {}, ("square_avg",), ("step",)),
    StateFormula(
        "RMSprop, centered, momentum",
        "RMSprop",
        {"centered": True, "momentum": 0.9},
        ("square_avg", "momentum_buffer", "grad_avg"),
        ("step",),
    ),
    StateFormula("Adagrad", "Adagrad", {}, ("sum",), ("step",)),
    StateFormula("Adadelta", "Adadelta", {}, ("square_avg", "acc_delta"), ("step",)),
    StateFormula("Adamax", "Adamax", {}, ("exp_avg", "exp_inf"), ("step",)),
    StateFormula("NAdam", "NAdam", {}, ADAM_KEYS, ("step", "mu_product")),
    StateFormula("RAdam", "RAdam", {}, ADAM_KEYS, ("step",)),
    # allow_indefinite: the test MLP's Hessian has negative eigenvalues; the state is what is measured.
    StateFormula(
        "Newton",
        "Newton",
        {"lr": 1.0, "allow_indefinite": True},
        transient_square_matrices=2,
        loss_only_closure=True,
        elementwise_work=False,
    ),
)


def available_formulas() -> tuple[list[StateFormula], list[str]]:
    """Formulas for the registered algorithms, and the registered algorithms without one (named on the page)."""
    present = [formula for formula in FORMULAS if formula.algorithm in ALGORITHMS]
    covered = {formula.algorithm for formula in FORMULAS}
    return present, [name for name in ALGORITHMS if name not in covered]


def small_model(dtype: torch.dtype) -> nn.Module:
    """A 16-8-4 MLP: four parameter tensors, small enough for Newton's exact Hessian."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4)).to(dtype)


def take_one_step(formula: StateFormula, model: nn.Module) -> torch.optim.Optimizer:
    """One step of ``formula``'s optimizer on ``model``, with the closure each algorithm needs."""
    optimizer = catalog.construct(formula.cls, model.parameters(), **formula.arguments)
    inputs = torch.randn(32, 16, generator=torch.Generator().manual_seed(1)).to(next(model.parameters()).dtype)

    def loss() -> Tensor:
        return model(inputs).square().mean()

    def backward_closure() -> Tensor:
        optimizer.zero_grad()
        value = loss()
        value.backward()
        return value

    if formula.loss_only_closure:
        catalog.step_with_closure(optimizer, loss)
    elif formula.cls.needs_closure:
        catalog.step_with_closure(optimizer, backward_closure)
    else:
        backward_closure()
        optimizer.step()
    return optimizer


def held_state(optimizer: torch.optim.Optimizer) -> tuple[int, list[str]]:
    """Bytes of every tensor in ``optimizer.state`` and the state keys seen."""
    total, keys = 0, set()
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, Tensor):
                total += value.numel() * value.element_size()
                keys.add(key)
    return total, sorted(keys)


def measure_state(formula: StateFormula) -> dict[str, Any]:
    row: dict[str, Any] = {
        "label": formula.label,
        "param_sized": list(formula.param_sized),
        "scalars": list(formula.scalars),
        "by_dtype": {},
    }
    for dtype_name, dtype in DTYPES.items():
        model = small_model(dtype)
        params = list(model.parameters())
        parameters, tensors = sum(p.numel() for p in params), len(params)
        element_size = params[0].element_size()
        expected = formula.state_bytes(parameters, tensors, element_size)
        entry: dict[str, Any] = {
            "parameters": parameters,
            "tensors": tensors,
            "formula_bytes": expected,
            "formula_per_parameter": expected / parameters,
        }
        try:
            held, keys = held_state(take_one_step(formula, model))
        except Exception as error:  # e.g. an operation with no float16 kernel on the CPU
            entry["error"] = f"{type(error).__name__}: {error}"
        else:
            entry.update(
                {
                    "held_bytes": held,
                    "held_per_parameter": held / parameters,
                    "keys": keys,
                    "agrees": held == expected and set(keys) == {*formula.param_sized, *formula.scalars},
                }
            )
        row["by_dtype"][dtype_name] = entry
    return row


class ElementwiseCounter(TorchDispatchMode):
    """Counts ATen calls that write a tensor as large as the parameter: one elementwise pass each."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel = numel
        self.passes: list[str] = []
        self.elements = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, Tensor):
                self.elements += tensor.numel()
                if tensor.numel() == self.numel:
                    self.passes.append(func.overloadpacket.__name__)
        return out


def count_passes(formula: StateFormula, numel: int) -> tuple[list[str], int]:
    """The full-size passes of one steady-state step on a single float32 tensor."""
    param = torch.zeros(numel, requires_grad=True)
    optimizer = catalog.construct(formula.cls, [param], **formula.arguments)
    generator = torch.Generator().manual_seed(0)
    closure = formula.cls.needs_closure

    def step() -> None:
        if closure:
            # The gradient is already in place: the closure has nothing to do.
            catalog.step_with_closure(optimizer, lambda: None)
        else:
            optimizer.step()

    for _ in range(WARMUP_STEPS):  # allocate the state and leave every warm-up branch behind
        param.grad = torch.randn(numel, generator=generator)
        step()
    param.grad = torch.randn(numel, generator=generator)
    counter = ElementwiseCounter(numel)
    with counter:
        step()
    return counter.passes, counter.elements


def newton_work(numel: int) -> dict[str, Any]:
    """ATen calls and elements written by one Newton step on a quadratic in ``numel`` float64 unknowns."""
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(numel, numel, generator=generator, dtype=torch.float64)
    curvature = matrix @ matrix.T + numel * torch.eye(numel, dtype=torch.float64)
    param = torch.randn(numel, generator=generator, dtype=torch.float64, requires_grad=True)
    optimizer = catalog.construct(ALGORITHMS["Newton"], [param])
    counter = ElementwiseCounter(numel)
    with counter:
        catalog.step_with_closure(optimizer, lambda: 0.5 * param @ curvature @ param)
    return {"parameters": numel, "elements_per_parameter": counter.elements / numel}


def compute_rows(formulas: list[StateFormula], bar: Any) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    rows, failed = [], []
    for formula in bar([f for f in formulas if f.elementwise_work], desc="operation counts"):
        try:
            counts = {numel: count_passes(formula, numel) for numel in OPS_SIZES}
        except Exception as error:
            failed.append({"algorithm": formula.label, "error": f"{type(error).__name__}: {error}"})
            continue
        passes = counts[OPS_SIZES[0]][0]
        rows.append(
            {
                "label": formula.label,
                "passes": len(passes),
                "operations": passes,
                "passes_by_size": {str(numel): len(count[0]) for numel, count in counts.items()},
                "linear": len({len(count[0]) for count in counts.values()}) == 1,
                "traffic_bytes_per_parameter_fp32": formula.traffic_bytes_per_parameter(4),
            }
        )
    return rows, failed


def memory_table(formulas: list[StateFormula]) -> list[dict[str, Any]]:
    """The seed's table for every algorithm: parameters, gradients, state and total, in bytes."""
    table = []
    for parameters in TABLE_SIZES:
        for dtype_name, dtype in DTYPES.items():
            element_size = torch.empty((), dtype=dtype).element_size()
            for formula in formulas:
                # One parameter tensor: the per-tensor 0-d scalars add SCALAR_BYTES each, noted on the page.
                state = len(formula.param_sized) * parameters * element_size
                table.append(
                    {
                        "parameters": parameters,
                        "dtype": dtype_name,
                        "label": formula.label,
                        "parameter_bytes": parameters * element_size,
                        "gradient_bytes": parameters * element_size,
                        "state_bytes": state,
                        "total_bytes": 2 * parameters * element_size + state,
                        "transient_bytes": formula.transient_square_matrices * parameters**2 * element_size,
                    }
                )
    return table


def held_tensor_bytes(root: object) -> int:
    """Bytes of the storages of every tensor ``root`` holds: found by walking the objects it refers to
    (modules, optimizers, their state and buffers), plus each parameter's gradient. Between training
    steps autograd keeps nothing, so these are all the tensors a training run holds."""
    seen: set[int] = set()
    storages: dict[int, int] = {}
    pending = [root]
    while pending:
        item = pending.pop()
        if id(item) in seen or isinstance(item, (type, types.ModuleType, types.FunctionType, types.CodeType)):
            continue
        seen.add(id(item))
        if isinstance(item, Tensor):
            if item.layout == torch.strided and item.device.type == "cpu":
                storage = item.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            if item.grad is not None:
                pending.append(item.grad)
        pending.extend(gc.get_referents(item))
    return sum(storages.values())


class GPTTraining:
    """A fresh copy of the bench's GPT-like model trained with AdamW stepped after backward or during it."""

    def __init__(
        self, model: nn.Module, make_optimizer: Callable[..., torch.optim.Optimizer], in_backward: bool
    ) -> None:
        self.model = copy.deepcopy(model)
        self.in_backward = in_backward
        if in_backward:
            self.stepper = step_in_backward(self.model, make_optimizer)
        else:
            self.optimizer = make_optimizer(self.model.parameters())
        self.gradient_bytes_after_backward = 0

    def train(self, batches: list[Tensor]) -> None:
        for tokens in batches:
            if not self.in_backward:
                self.optimizer.zero_grad()
            self.model(tokens).backward()
            self.gradient_bytes_after_backward = sum(
                p.grad.numel() * p.grad.element_size() for p in self.model.parameters() if p.grad is not None
            )
            if not self.in_backward:
                self.optimizer.step()


def peak_held_bytes(step: Callable[[], Any], held: int) -> int | None:
    """The most bytes held during ``step``: ``held`` when it starts, plus the allocator's peak during it."""
    extra = peak_extra_memory(step, torch.device("cpu"))
    return None if extra is None else held + extra


def backward_step_memory(preset: Preset, bar: Any) -> dict[str, Any]:
    """Peak bytes of AdamW training on the bench's GPT-like model, stepped after backward and during it,
    at the bench's batch size and at one sequence per batch: over the first step (which makes the state)
    and over the steady steps after it."""
    workload = make_workload("gpt", preset, torch.device("cpu"))
    params = list(workload.model.parameters())
    full_batch = workload.batches[0][0].shape[0]
    rows = []
    cases = [
        (size, impl, in_backward)
        for size in (full_batch, 1)
        for impl in BACKWARD_STEP_STRATEGIES
        for in_backward in (False, True)
    ]
    for size, impl, in_backward in bar(cases, desc="stepping during backward"):
        batches = [workload.batches[i % len(workload.batches)][0][:size] for i in range(BACKWARD_STEP_TRAIN_STEPS)]
        make = functools.partial(catalog.construct, ALGORITHMS["AdamW"], lr=1e-3, impl=impl)
        if not strategies.STRATEGIES[impl].exact:  # a compiled kernel: compile it outside the measured window
            GPTTraining(workload.model, make, in_backward).train(batches[:1])
        runs: list[GPTTraining] = []

        def first_step(
            make: Callable[..., torch.optim.Optimizer] = make,
            in_backward: bool = in_backward,
            batches: list[Tensor] = batches,
            runs: list[GPTTraining] = runs,
        ) -> None:
            # The copy of the model is made inside the window: nothing is held before it.
            runs.append(GPTTraining(workload.model, make, in_backward))
            runs[0].train(batches[:1])

        first = peak_held_bytes(first_step, 0)
        training = runs[0]
        steady = peak_held_bytes(functools.partial(training.train, batches[1:]), held_tensor_bytes(training))
        rows.append(
            {
                "batch": size,
                "impl": impl,
                "in_backward": in_backward,
                "first_step_peak_bytes": first,
                "peak_bytes": steady,
                "gradient_bytes_after_backward": training.gradient_bytes_after_backward,
            }
        )
    return {
        "model": workload.description,
        "parameters": sum(p.numel() for p in params),
        "tensors": len(params),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
        "train_steps": BACKWARD_STEP_TRAIN_STEPS,
        "rows": rows,
    }


def run(preset: Preset, figures: FigureWriter, bar: Any) -> dict[str, Any]:
    formulas, without_formula = available_formulas()
    state_rows, state_failed = [], []
    for formula in bar(formulas, desc="optimizer state"):
        try:
            state_rows.append(measure_state(formula))
        except Exception as error:  # one failing algorithm must not sink the section: it is named on the page
            state_failed.append({"algorithm": formula.label, "error": f"{type(error).__name__}: {error}"})
    compute, compute_failed = compute_rows(formulas, bar)
    newton = [newton_work(numel) for numel in NEWTON_SIZES] if "Newton" in ALGORITHMS else []
    table = memory_table(formulas)
    backward_step = backward_step_memory(preset, bar)
    results: dict[str, Any] = {
        "scalar_bytes": SCALAR_BYTES,
        "state": state_rows,
        "without_formula": without_formula,
        "failed": state_failed + compute_failed,
        "compute": compute,
        "ops_sizes": list(OPS_SIZES),
        "warmup_steps": WARMUP_STEPS,
        "newton_work": newton,
        "table": table,
        "table_sizes": list(TABLE_SIZES),
        "backward_step": backward_step,
    }
    results["figures"] = {"state": figures.save(plot_state(state_rows), "memory_state_bytes")} if state_rows else {}
    results["seed_comparisons"] = _comparisons(results)
    return results


def _comparisons(results: dict[str, Any]) -> list[dict[str, Any]]:
    records = [seeds.compare("memory.fp16_bytes", torch.empty((), dtype=torch.float16).element_size())]
    momentum_total = next(
        (
            row["total_bytes"]
            for row in results["table"]
            if row["label"] == "SGD, momentum" and row["dtype"] == "FP16" and row["parameters"] == 1_000_000_000
        ),
        None,
    )
    if momentum_total is not None:
        records.append(
            seeds.compare(
                "memory.momentum_1b_fp16_total",
                momentum_total / 1e9,
                f"from the formula: parameters + gradients + one momentum buffer = {momentum_total:,} bytes",
            )
        )
    state = {row["label"]: row["by_dtype"]["FP32"] for row in results["state"]}
    if "SGD" in state:
        records.append(seeds.compare("memory.sgd_state", state["SGD"].get("held_bytes"), "measured after one step"))
    if "Adam" in state and "keys" in state["Adam"]:
        sized = [key for key in state["Adam"]["keys"] if key in ADAM_KEYS + ("max_exp_avg_sq",)]
        records.append(
            seeds.compare("memory.adam_state_tensors", len(sized), f"measured keys: {', '.join(state['Adam']['keys'])}")
        )
    compute = {row["label"]: row for row in results["compute"]}
    if "SGD" in compute:
        operations = compute["SGD"]["operations"]
        note = f"counted: {', '.join(operations)}"
        if operations == ["add_"]:
            note += " — add_(g, alpha=−lr) multiplies and subtracts in one pass"
        records.append(seeds.compare("compute.sgd_passes", compute["SGD"]["passes"], note))
    linear = [compute[label]["linear"] for label in ("SGD", "SGD, momentum", "NesterovLookahead") if label in compute]
    if linear:
        records.append(
            seeds.compare(
                "compute.linear",
                "O(n)" if all(linear) else "not O(n)",
                "passes per parameter counted at two sizes: "
                + " and ".join(f"{size:,}" for size in results["ops_sizes"]),
            )
        )
    return records


@styled
def plot_state(rows: list[dict[str, Any]]) -> Figure:
    measured = [row for row in rows if "held_per_parameter" in row["by_dtype"]["FP32"]]
    figure, axes = new_figure(9, 0.42 * len(measured) + 1.6)
    positions = list(range(len(measured)))
    axes.barh(
        positions,
        [row["by_dtype"]["FP32"]["held_per_parameter"] for row in measured],
        color=OURS_COLOR,
        height=0.6,
        label="measured after one step",
    )
    axes.scatter(
        [row["by_dtype"]["FP32"]["formula_per_parameter"] for row in measured],
        positions,
        marker="|",
        s=400,
        color="#d62728",
        linewidths=2.5,
        zorder=3,
        label="formula",
    )
    axes.set_yticks(positions, [row["label"] for row in measured])
    axes.invert_yaxis()
    axes.set_xlabel("optimizer state, bytes per parameter (FP32)")
    axes.set_title("Optimizer state: formula and measurement")
    axes.legend(loc="lower right")
    axes.grid(axis="y", visible=False)
    return figure


def render(results: dict[str, Any]) -> str:
    parts = [
        (
            "<p>The formula counts, per algorithm, the state tensors shaped like the parameter (k of them, in the "
            f"parameter's dtype) and the 0-d tensors kept per parameter tensor ({results['scalar_bytes']} bytes each, "
            "float32 whatever the parameter's dtype). The measurement takes one step on a 16-8-4 MLP and adds up the "
            "bytes of every tensor left in <code>optimizer.state</code>.</p>"
        )
    ]
    for name in results["without_formula"]:
        parts.append(h.note(f"{h.code(name)} has no formula in this report yet.", "warn"))
    for item in results["failed"]:
        parts.append(h.note(f"{h.code(item['algorithm'])}: {h.esc(item['error'])}", "warn"))
    rows, unsupported = [], []
    for row in results["state"]:
        cells = [
            h.esc(row["label"]),
            h.esc(", ".join(row["param_sized"]) or "—"),
            h.esc(", ".join(row["scalars"]) or "—"),
        ]
        for dtype_name in ("FP32", "FP16"):
            entry = row["by_dtype"][dtype_name]
            if "error" in entry:
                unsupported.append(f"{h.esc(row['label'])} in {dtype_name}: {h.esc(entry['error'])}")
                cells += [h.num(entry["formula_bytes"]), "not run", h.status(False, "", "not run")]
                continue
            cells += [
                h.num(entry["formula_bytes"]),
                h.num(entry["held_bytes"]),
                h.status(entry["agrees"], "equal", "differs"),
            ]
        rows.append(cells)
    some = results["state"][0]["by_dtype"]["FP32"] if results["state"] else None
    caption = (
        f"Bytes of optimizer state on a model of {some['parameters']:,} parameters in {some['tensors']} tensors."
        if some
        else ""
    )
    parts.append(
        h.table(
            [
                "algorithm",
                "parameter-sized state",
                "0-d state",
                "FP32 formula",
                "FP32 held",
                "",
                "FP16 formula",
                "FP16 held",
                "",
            ],
            rows,
            numeric=(3, 4, 6, 7),
            caption=caption,
            dividers=(3, 6),
        )
    )
    for message in unsupported:
        parts.append(h.note(f"Not measured: {message}", "warn"))
    if "state" in results["figures"]:
        parts.append(
            h.figure(
                results["figures"]["state"],
                "State bytes per parameter, measured (bars) and from the formula (red ticks).",
            )
        )
    parts.append("<h3>Memory for 1,000 and 1,000,000,000 parameters</h3>")
    parts.append(
        "<p>The seed's table, for every algorithm: parameters, gradients and optimizer state. The parameters sit in "
        f"one tensor, whose {results['scalar_bytes']}-byte 0-d scalars are left out. Units are decimal "
        "(1 kB = 10<sup>3</sup> B, 1 GB = 10<sup>9</sup> B), as the seed counts.</p>"
    )
    for parameters in results["table_sizes"]:
        entries = [row for row in results["table"] if row["parameters"] == parameters]
        labels = list(dict.fromkeys(row["label"] for row in entries))
        by_key = {(row["label"], row["dtype"]): row for row in entries}
        body = []
        for label in labels:
            cells = [h.esc(label)]
            for dtype_name in ("FP16", "FP32"):
                row = by_key[(label, dtype_name)]
                cells += [
                    h.size(row["parameter_bytes"]),
                    h.size(row["gradient_bytes"]),
                    h.size(row["state_bytes"]),
                    f"<strong>{h.size(row['total_bytes'])}</strong>",
                ]
            body.append(cells)
        parts.append(
            h.table(
                [
                    "algorithm",
                    "FP16 parameters",
                    "gradients",
                    "state",
                    "total",
                    "FP32 parameters",
                    "gradients",
                    "state",
                    "total",
                ],
                body,
                numeric=tuple(range(1, 9)),
                caption=f"{parameters:,} parameters",
                dividers=(1, 5),
            )
        )
    newton_rows = [row for row in results["table"] if row["transient_bytes"]]
    if newton_rows:
        parts.append(
            h.note(
                "Newton keeps no state between steps, but during a step it holds the n × n Hessian and "
                "its eigenvectors: "
                + "; ".join(
                    f"{row['parameters']:,} parameters in {row['dtype']}: {h.size(row['transient_bytes'])}"
                    for row in newton_rows
                )
                + "."
            )
        )
    parts.append("<h3>Elementwise work per parameter</h3>")
    sizes = results["ops_sizes"]
    parts.append(
        f"<p>Every ATen operation of a steady-state step (after {results['warmup_steps']} warm-up steps) on one "
        "float32 tensor is seen by a <code>TorchDispatchMode</code>; each call that writes a tensor as large as "
        f"the parameter is one elementwise pass. Counted at {sizes[0]:,} and {sizes[1]:,} elements: a count that "
        "does not change means O(n) work. The least memory traffic is what a step must read (θ, g, state) and "
        "write (θ, state).</p>"
    )
    parts.append(
        h.table(
            [
                "algorithm",
                "passes per parameter",
                "operations",
                f"at {sizes[0]:,}",
                f"at {sizes[1]:,}",
                "least traffic, FP32 (bytes/parameter)",
            ],
            [
                [
                    h.esc(row["label"]),
                    h.num(row["passes"]),
                    f'<span class="sub">{h.esc(", ".join(row["operations"]))}</span>',
                    h.num(row["passes_by_size"][str(sizes[0])]),
                    h.num(row["passes_by_size"][str(sizes[1])]),
                    h.num(row["traffic_bytes_per_parameter_fp32"]),
                ]
                for row in results["compute"]
            ],
            numeric=(1, 3, 4, 5),
        )
    )
    if results["newton_work"]:
        parts.append(
            h.note(
                "Newton is not elementwise: the elements its step writes, per parameter, grow with n — "
                + "; ".join(
                    f"{h.num(row['elements_per_parameter'])} at n = {row['parameters']}"
                    for row in results["newton_work"]
                )
                + " (n + 1 backward passes and an n × n eigendecomposition)."
            )
        )
    parts.append(render_backward_step(results["backward_step"]))
    parts.append("<h3>Beside the seeds</h3>")
    parts.append(h.comparison_table(results["seed_comparisons"]))
    return "".join(parts)


def render_backward_step(measured: dict[str, Any]) -> str:
    """The subsection on :func:`scratchopt.step_in_backward`: peak memory with and without it."""
    parts = [
        "<h3>Stepping during backward</h3>",
        "<p><code>scratchopt.step_in_backward(model, make_optimizer)</code> gives each parameter its own "
        "optimizer and steps it from a post-accumulate-grad hook as soon as its gradient is complete, then "
        "frees that gradient, so the gradients of the whole model are never alive at once. Measured with AdamW "
        f"on <code>scratchopt bench</code>'s model ({h.esc(measured['model'])}; {measured['parameters']:,} "
        f"parameters in {measured['tensors']} tensors, {h.size(measured['parameter_bytes'])}), trained from a "
        "fresh copy, and again with one sequence per batch.</p>",
        "<p><em>How it is measured:</em> the most bytes held by torch's CPU allocator during a step: what the "
        "run holds when the step starts (the storages of every tensor reachable from the model and the "
        "optimizers, and the gradients), plus the peak of the running sum of the allocator's allocation and "
        "free events that <code>torch.profiler</code> records during the step (<code>profile_memory=True</code>) "
        "— parameters, gradients, optimizer state, activations and temporaries. The first step (which makes the "
        "state) is measured from nothing, its copy of the model made inside the window; the steady step is the "
        "one after it. <code>tracemalloc</code> does not see torch's allocations, and the process's RSS would "
        "add the allocator's cached pages and the interpreter.</p>",
        "<p>Stepping inside backward leaves no gradient for a step to read. Whether that lowers the peak depends "
        "on where the peak is: at the optimizer step (parameters, state and every gradient alive, with the "
        "step's temporaries) it falls by about the gradients' size, more where the strategy's temporaries or "
        "scratch buffers scale with the whole model rather than with one parameter; at the start of backward "
        "(every activation alive, no gradient yet), where a larger batch puts it, it does not move.</p>",
    ]
    pairs: dict[tuple[int, str], dict[bool, dict[str, Any]]] = {}
    for row in measured["rows"]:
        pairs.setdefault((row["batch"], row["impl"]), {})[row["in_backward"]] = row
    body = []
    for (batch, impl), pair in pairs.items():
        after, inside = pair[False], pair[True]
        saved = (
            after["peak_bytes"] - inside["peak_bytes"]
            if after["peak_bytes"] is not None and inside["peak_bytes"] is not None
            else None
        )
        body.append(
            [
                h.num(batch),
                h.code(impl),
                h.size(after["peak_bytes"]),
                h.size(inside["peak_bytes"]),
                f"<strong>{h.size(saved)}</strong>",
                h.size(after["first_step_peak_bytes"]),
                h.size(inside["first_step_peak_bytes"]),
                h.size(after["gradient_bytes_after_backward"]),
            ]
        )
    parts.append(
        h.table(
            [
                "sequences per batch",
                "impl",
                "steady step: peak, stepped after backward",
                "… during backward",
                "saved",
                "first step: after backward",
                "… during backward",
                "gradients left after backward",
            ],
            body,
            numeric=(0, 2, 3, 4, 5, 6, 7),
            caption="AdamW; the most bytes held during a step (decimal units). Stepped during backward, no gradient "
            "is left after backward.",
            dividers=(2, 5, 7),
        )
    )
    return "".join(parts)
