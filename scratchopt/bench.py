"""``scratchopt bench``: the optimizer step timed inside a real training loop, scratchopt beside torch.optim.

What is timed, for every column, is the loop people run::

    opt.zero_grad()                    # set_to_none=True, torch's default; or set_to_none=False
    loss = model(batch); loss.backward()   # or 4 micro-batches, each (loss / 4).backward()
    opt.step()                         # time.perf_counter() around this call alone

The optimizer step is timed inside the loop, not on gradients set once, because the loop decides what
the step costs: with ``zero_grad()``'s default every backward allocates fresh gradient tensors, so a
strategy that keeps gradients in a flat buffer has to gather them again on every step, and the backward
pass leaves the caches cold. Both medians are reported: ``opt.step()`` alone and the whole train step
(zero_grad, forward, backward, step).

Modes (:data:`MODES`): ``set-to-none`` (``zero_grad()``, the default), ``set-to-zero``
(``zero_grad(set_to_none=False)``: gradients stay in place between steps) and ``accumulate-4``
(``zero_grad()``, four forward+backward micro-batches, one step). The default preset runs
``set-to-none`` for every algorithm, and for AdamW ``set-to-zero`` on the mlp, tiny and large models and
``accumulate-4`` on the tiny and large ones, to stay within a few minutes on two cores (the GPT's and the
2000-layer MLP's forward+backward cost the most, four times over when accumulating); ``--modes`` runs
the modes it names for every algorithm and model.

Models, built in code, data generated from a fixed seed (:func:`make_workloads`):

* ``mlp`` — the seed's 2000 × (Linear(64, 64), Tanh), batch 32: 4000 tensors, 8.3M params, overhead-bound;
* ``gpt`` — a GPT-like causal transformer: token + positional embeddings, 6 pre-norm blocks
  (``nn.TransformerEncoderLayer``, d_model 256, 4 heads, MLP 4×), final LayerNorm, untied head; vocabulary
  2048, sequence 64, batch 8: 77 tensors, 5.8M params;
* ``tiny`` — Linear(10, 32), Tanh, Linear(32, 32), Tanh, Linear(32, 1): 6 tensors, 1,441 params;
* ``large`` — one parameter of 16M elements, loss ``torch.dot(p, x)`` with ``x`` fixed: memory-bound.

Columns (:data:`COLUMNS`): torch.optim with ``foreach=False`` (its for-loop), ``foreach=True`` and
``fused=True`` (SGD, Adam, AdamW, Adagrad only); scratchopt ``impl="loop"``, ``"foreach"``, ``"flat"``,
``"compiled"`` (a compiled kernel per tensor: its compile time grows with the tensor count, so it runs only
on models of at most ``compile_max_tensors`` tensors), ``"fused"``, and ``"fused"`` after
``scratchopt.contiguous_parameters(model)`` (the opt-in zero-copy layout). Every column trains its own deep
copy of the same model on the same batches.

Timing: each column first takes one step, timed on its own and reported as "first step (compile)" (the
fused strategies compile on it), then ``warmup_steps`` untimed steps; then ``rounds`` rounds, each running
every column's loop for ``steps_per_round`` steps in turn (the order rotates every round), and the median
per column is reported. Ratios of medians from one process hold better than the times themselves on a
shared machine. On CUDA every timestamp is taken after ``torch.cuda.synchronize()``.

Beside each row:

* the roofline: the bytes one step must move divided by the memory bandwidth measured in the same run
  (``y.add_(x, alpha=a)``, 12 B per element). Bytes per parameter element: read p, g and every state
  tensor, write p and every state tensor — ``(3 + 2·states)·itemsize`` — plus gathering the gradients into
  an optimizer's buffer (read g, write its copy: ``2·itemsize``). AdamW in float32: 28 + 8 = 36 B. The
  state tensors are counted in the optimizer's actual state after the steps;
* peak extra memory during one ``opt.step()`` (allocator events; CUDA: ``max_memory_allocated``) and the
  persistent state bytes per parameter;
* the largest difference of each column's parameters from torch's for-loop after the same steps (zero
  for the bit-exact strategies: loop, foreach, flat).

The first fused step is also measured in fresh processes sharing an Inductor cache that starts empty
(:func:`compile_warmup`): AdamW's on the seed MLP with the cache empty, then each further algorithm's new
kernel in the same process, then AdamW's again in a new process, from the cache. Then the issue's
targets are checked (:func:`targets`). Everything is saved to ``--out``: ``bench.csv``, ``bench.json`` and ``bench.png``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import benchmark

import scratchopt

SEED = 0
#: (row label, class name, kwargs); rows whose class scratchopt lacks are left out.
#: Muon (matrices only), SparseAdam (sparse gradients only) and LBFGS (a closure, one group) do not fit the
#: bench's models and loop; the report's parity section trains LBFGS and Muon beside torch's.
ALGORITHMS: list[tuple[str, str, dict[str, Any]]] = [
    ("SGD", "SGD", {"lr": 1e-3}),
    ("SGD+momentum", "SGD", {"lr": 1e-3, "momentum": 0.9}),
    ("Adam", "Adam", {"lr": 1e-3}),
    ("AdamW", "AdamW", {"lr": 1e-3}),
    ("RMSprop", "RMSprop", {"lr": 1e-3}),
    ("Adagrad", "Adagrad", {"lr": 1e-3}),
    ("Adadelta", "Adadelta", {"lr": 1e-3}),
    ("Adamax", "Adamax", {"lr": 1e-3}),
    ("NAdam", "NAdam", {"lr": 1e-3}),
    ("RAdam", "RAdam", {"lr": 1e-3}),
    ("ASGD", "ASGD", {"lr": 1e-3}),
    ("Rprop", "Rprop", {"lr": 1e-3}),
    ("Adafactor", "Adafactor", {"lr": 1e-3}),
]
TORCH_COLUMNS = ("torch loop", "torch foreach", "torch fused")
OURS_COLUMNS = ("ours loop", "ours foreach", "ours flat", "ours compiled", "ours fused", "ours fused+contiguous")
COLUMNS = TORCH_COLUMNS + OURS_COLUMNS
#: Columns whose parameters must equal torch's for-loop bit for bit after the same steps (on the CPU).
BIT_EXACT_COLUMNS = ("ours loop", "ours foreach", "ours flat")
REFERENCE_COLUMN = "torch loop"
OURS_FUSED, TORCH_FUSED, OURS_CONTIGUOUS = "ours fused", "torch fused", "ours fused+contiguous"
OURS_COMPILED = "ours compiled"


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


@dataclass(frozen=True)
class Preset:
    name: str
    algorithms: tuple[str, ...]
    workloads: tuple[str, ...]
    columns: tuple[str, ...]
    #: Modes run for every algorithm.
    modes: tuple[str, ...]
    #: Further modes, each with the workloads it runs on, for ``more_modes_algorithms`` only (each costs a
    #: whole row of train steps; accumulation four forward+backward passes a step).
    more_modes: tuple[tuple[str, tuple[str, ...]], ...]
    more_modes_algorithms: tuple[str, ...]
    mlp_layers: int
    gpt_layers: int
    gpt_width: int
    gpt_vocab: int
    gpt_seq_len: int
    gpt_batch: int
    large_params: int
    #: Untimed steps after the first (timed on its own) step of every column.
    warmup_steps: int
    rounds: int
    steps_per_round: int
    #: Largest model (in tensors) the per-tensor ``compiled`` column runs on.
    compile_max_tensors: int
    warmup_compile: bool


PRESETS: dict[str, Preset] = {
    "quick": Preset("quick", ("SGD+momentum", "Adam", "AdamW"), ("mlp", "gpt", "tiny", "large"),
                    columns=tuple(c for c in COLUMNS if c != OURS_COMPILED),
                    modes=(DEFAULT_MODE,), more_modes=(), more_modes_algorithms=(),
                    mlp_layers=200, gpt_layers=2, gpt_width=128, gpt_vocab=512, gpt_seq_len=32, gpt_batch=4,
                    large_params=4 * 2**20, warmup_steps=1, rounds=3, steps_per_round=1,
                    compile_max_tensors=100, warmup_compile=False),
    "default": Preset("default", ("SGD+momentum", "Adam", "AdamW"), ("mlp", "gpt", "tiny", "large"),
                      columns=COLUMNS, modes=(DEFAULT_MODE,),
                      more_modes=(("set-to-zero", ("mlp", "tiny", "large")), ("accumulate-4", ("tiny", "large"))),
                      more_modes_algorithms=("AdamW",),
                      mlp_layers=2000, gpt_layers=6, gpt_width=256,
                      gpt_vocab=2048, gpt_seq_len=64, gpt_batch=8, large_params=16 * 2**20, warmup_steps=1,
                      rounds=3, steps_per_round=1, compile_max_tensors=100, warmup_compile=True),
}


# ------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------


class RegressionLoss(nn.Module):
    """``net`` trained on mean squared error; a batch is ``(inputs, targets)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.mse_loss(self.net(inputs), targets)


class TinyGPT(nn.Module):
    """A GPT-like causal language model; a batch is ``(tokens,)`` of ``seq_len + 1`` tokens per row."""

    def __init__(self, layers: int, width: int, vocab: int, seq_len: int, heads: int = 4) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.randn(seq_len, width) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        x = self.tokens(inputs) + self.positions[: inputs.shape[1]]
        for block in self.blocks:
            x = block(x, src_mask=self.causal_mask, is_causal=True)
        logits = self.head(self.norm(x))
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class LargeTensor(nn.Module):
    """One big parameter; a batch is ``(x,)`` and the loss ``p · x``: the cheapest backward there is."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.randn(numel))

    def forward(self, x: Tensor) -> Tensor:
        return torch.dot(self.p, x)


@dataclass
class Workload:
    name: str
    description: str
    model: nn.Module
    #: ``MAX_MICRO_BATCHES`` batches, each a tuple of the model's inputs; single-batch modes cycle them.
    batches: list[tuple[Tensor, ...]]

    @property
    def tensors(self) -> int:
        return sum(1 for _ in self.model.parameters())

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


MAX_MICRO_BATCHES = max(mode.micro_batches for mode in MODES.values())
WORKLOAD_NAMES = ("mlp", "gpt", "tiny", "large")


def _regression_batches(generator: torch.Generator, batch: int, inputs: int, outputs: int) -> list[tuple[Tensor, ...]]:
    return [(torch.randn(batch, inputs, generator=generator), torch.randn(batch, outputs, generator=generator))
            for _ in range(MAX_MICRO_BATCHES)]


def make_workload(name: str, preset: Preset, device: torch.device) -> Workload:
    """Build one model and its batches, seeded (the same every call)."""
    generator = torch.Generator().manual_seed(SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        if name == "mlp":
            layers = preset.mlp_layers
            net = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(64, 64), nn.Tanh())])
            workload = Workload(name, f"{layers} × (Linear(64, 64), Tanh), batch 32", RegressionLoss(net),
                                _regression_batches(generator, 32, 64, 64))
        elif name == "gpt":
            model = TinyGPT(preset.gpt_layers, preset.gpt_width, preset.gpt_vocab, preset.gpt_seq_len)
            batches = [(torch.randint(0, preset.gpt_vocab, (preset.gpt_batch, preset.gpt_seq_len + 1),
                                      generator=generator),) for _ in range(MAX_MICRO_BATCHES)]
            workload = Workload(name, f"GPT-like, {preset.gpt_layers} layers, d_model {preset.gpt_width}, 4 heads, "
                                f"vocab {preset.gpt_vocab}, seq {preset.gpt_seq_len}, batch {preset.gpt_batch}",
                                model, batches)
        elif name == "tiny":
            net = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
            workload = Workload(name, "tiny MLP 10-32-32-1, batch 32", RegressionLoss(net),
                                _regression_batches(generator, 32, 10, 1))
        elif name == "large":
            x = torch.randn(preset.large_params, generator=generator)
            workload = Workload(name, f"one tensor of {preset.large_params:,}, loss p·x", LargeTensor(preset.large_params),
                                [(x,)] * MAX_MICRO_BATCHES)
        else:
            raise ValueError(f"unknown workload {name!r} (choices: {', '.join(WORKLOAD_NAMES)})")
    workload.model.to(device)
    workload.batches = [tuple(t.to(device) for t in batch) for batch in workload.batches]
    return workload


# ------------------------------------------------------------------------------------------------------
# One column: its own copy of the model, its optimizer, its loop
# ------------------------------------------------------------------------------------------------------


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def build_optimizer(column: str, class_name: str, kwargs: dict[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer a column runs on ``model`` (which ``ours fused+contiguous`` first lays out contiguously)."""
    if column in TORCH_COLUMNS:
        flag = {"torch loop": {"foreach": False}, "torch foreach": {"foreach": True}, "torch fused": {"fused": True}}
        return getattr(torch.optim, class_name)(model.parameters(), **kwargs, **flag[column])
    impl = column.removeprefix("ours ")
    if column == OURS_CONTIGUOUS:
        scratchopt.contiguous_parameters(model)
        impl = "fused"
    return getattr(scratchopt, class_name)(model.parameters(), **kwargs, impl=impl)


class Runner:
    """One column's training loop on its own deep copy of the workload's model."""

    def __init__(self, column: str, class_name: str, kwargs: dict[str, Any], workload: Workload, mode: Mode,
                 device: torch.device) -> None:
        self.column = column
        self.model = copy.deepcopy(workload.model)
        self.optimizer = build_optimizer(column, class_name, kwargs, self.model)
        self.batches = workload.batches
        self.mode = mode
        self.sync = synchronizer(device)
        self.steps_taken = 0
        self.step_s: list[float] = []
        self.train_s: list[float] = []

    def forward_backward(self) -> None:
        self.optimizer.zero_grad(set_to_none=self.mode.set_to_none)
        micro = self.mode.micro_batches
        for index in range(micro):
            batch = self.batches[(self.steps_taken * micro + index) % len(self.batches)]
            loss = self.model(*batch)
            (loss / micro if micro > 1 else loss).backward()

    def train_step(self) -> tuple[float, float]:
        """One zero_grad, forward, backward, step: (seconds of ``opt.step()``, seconds of all of it)."""
        self.sync()
        start = time.perf_counter()
        self.forward_backward()
        self.sync()
        before_step = time.perf_counter()
        self.optimizer.step()
        self.sync()
        end = time.perf_counter()
        self.steps_taken += 1
        return end - before_step, end - start

    def timed_steps(self, count: int) -> None:
        for _ in range(count):
            step, train = self.train_step()
            self.step_s.append(step)
            self.train_s.append(train)

    def parameters(self) -> list[Tensor]:
        return [p.detach() for p in self.model.parameters()]


# ------------------------------------------------------------------------------------------------------
# What a step must move, what it holds, what it allocates
# ------------------------------------------------------------------------------------------------------


def _param_state_tensors(optimizer: torch.optim.Optimizer, param: Tensor) -> int:
    """State tensors the step reads and writes in full for ``param`` (not ``step`` or other scalars)."""
    state = optimizer.state.get(param, {})
    return sum(1 for v in state.values() if isinstance(v, Tensor) and v.dim() > 0 and v.numel() == param.numel())


def traffic_bytes_per_param(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """(update bytes, gradient-gathering bytes) per parameter element, from the optimizer's state.

    Update: read p, g and every state tensor, write p and every state tensor, ``(3 + 2·states)·itemsize``.
    Gathering the gradients into the optimizer's buffer: read g, write its copy, ``2·itemsize``.
    """
    update = gather = 0
    numel = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            update += (3 + 2 * _param_state_tensors(optimizer, p)) * p.element_size() * p.numel()
            gather += 2 * p.element_size() * p.numel()
            numel += p.numel()
    return (update / numel, gather / numel) if numel else (0.0, 0.0)


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Bytes of the storages behind the optimizer's state tensors (each storage once) per parameter element."""
    seen = set()
    total = numel = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            numel += p.numel()
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, Tensor):
                    key = (value.untyped_storage().data_ptr(), value.device)
                    if key not in seen:
                        seen.add(key)
                        total += value.untyped_storage().nbytes()
    return total / numel if numel else 0.0


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: the profiler's C++ side logs two lines per use there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_memory(step: Callable[[], Any], device: torch.device) -> int | None:
    """Largest amount of memory allocated during one call of ``step`` beyond what existed before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    results = prof.profiler.kineto_results
    if results is None:
        return None
    events = sorted((e for e in results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def measure_bandwidth(device: torch.device, numel: int = 50_000_000) -> dict[str, float]:
    """GB/s of ``y.add_(x, alpha=a)`` (12 B/element) and of ``y.copy_(x)`` (8 B/element)."""
    x = torch.randn(numel, device=device)
    y = torch.randn(numel, device=device)
    axpy = benchmark.Timer("y.add_(x, alpha=0.5)", globals={"x": x, "y": y}).blocked_autorange(min_run_time=0.5)
    copy_ = benchmark.Timer("y.copy_(x)", globals={"x": x, "y": y}).blocked_autorange(min_run_time=0.5)
    return {"axpy_GBps": 12 * numel / axpy.median / 1e9, "copy_GBps": 8 * numel / copy_.median / 1e9}


def max_abs_difference(params: list[Tensor], reference: list[Tensor]) -> float:
    return max((float((p.double() - r.double()).abs().max()) for p, r in zip(params, reference, strict=True)
                if p.numel()), default=0.0)


# ------------------------------------------------------------------------------------------------------
# The first fused step, in fresh processes
# ------------------------------------------------------------------------------------------------------


def first_fused_steps(algorithms: list[str], mlp_layers: int, device: str, threads: int) -> list[dict[str, float]]:
    """Per algorithm, in turn: seconds of the first and second ``impl="fused"`` ``opt.step()`` on the seed
    MLP, each after a forward+backward.

    Meant for a fresh process (see :func:`compile_warmup`): the first step then includes compiling the
    kernel, or loading it from the Inductor cache.
    """
    torch.set_num_threads(threads)
    dev = torch.device(device)
    workload = make_workload("mlp", replace(PRESETS["default"], mlp_layers=mlp_layers), dev)
    found = []
    for algorithm in algorithms:
        _, class_name, kwargs = next(a for a in ALGORITHMS if a[0] == algorithm)
        runner = Runner(OURS_FUSED, class_name, kwargs, workload, MODES[DEFAULT_MODE], dev)
        first_step, _ = runner.train_step()
        second_step, _ = runner.train_step()
        found.append({"first_step_s": first_step, "second_step_s": second_step})
    return found


_FIRST_STEPS_SCRIPT = """
import json
from scratchopt.bench import first_fused_steps
print(json.dumps(first_fused_steps({algorithms!r}, {layers}, {device!r}, {threads})))
"""
EMPTY_CACHE = "empty Inductor cache, new process"


def compile_warmup(algorithms: list[str], layers: int, device: torch.device, threads: int) -> list[dict[str, Any]]:
    """First fused steps on the seed MLP in fresh processes sharing one Inductor cache that starts empty.

    The first process runs every algorithm in turn: the first pays what a new user pays (Inductor's
    once-per-machine setup included), each further one compiles its own kernel. The second process runs
    the first algorithm again, served from the cache.
    """
    runs = [(algorithms, [EMPTY_CACHE] + ["new kernel, same process"] * (len(algorithms) - 1)),
            (algorithms[:1], ["cached, new process"])]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="scratchopt-inductor-") as cache:
        environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for names, labels in runs:
            script = _FIRST_STEPS_SCRIPT.format(algorithms=names, layers=layers, device=device.type, threads=threads)
            done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                                  timeout=900, check=False)
            measured = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
            error = (done.stderr.strip().splitlines() or ["(no output)"])[-1][:200]
            for index, (algorithm, label) in enumerate(zip(names, labels, strict=True)):
                result: dict[str, Any] = {"algorithm": algorithm, "cache": label, "layers": layers}
                result.update(measured[index] if measured else {"error": error})
                results.append(result)
    return results


# ------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One (workload, algorithm, mode): every column's medians and what the step must move."""

    workload: str
    algorithm: str
    mode: str
    numel: int
    tensors: int
    step_ms: dict[str, float] = field(default_factory=dict)
    train_ms: dict[str, float] = field(default_factory=dict)
    first_step_ms: dict[str, float] = field(default_factory=dict)
    peak_extra_MB: dict[str, float | None] = field(default_factory=dict)
    state_B_per_param: dict[str, float] = field(default_factory=dict)
    max_abs_diff_vs_torch_loop: dict[str, float] = field(default_factory=dict)
    #: Why a column has no time (not applicable, skipped, or failed).
    notes: dict[str, str] = field(default_factory=dict)
    #: Train steps every column had taken when the parameters were compared.
    steps_compared: int = 0
    update_B_per_param: float = 0.0
    gather_B_per_param: float = 0.0
    traffic_B_per_param: float = 0.0
    roofline_ms: float = 0.0
    #: Wall-clock seconds the whole row took (building, every loop, memory, parity).
    seconds: float = 0.0

    def ratio(self, numerator: str, denominator: str) -> float | None:
        """``step_ms[numerator] / step_ms[denominator]`` where both were timed."""
        top, bottom = self.step_ms.get(numerator), self.step_ms.get(denominator)
        return top / bottom if top and bottom else None


def _failure(error: BaseException) -> str:
    return f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:160]


def _build_runners(row: Row, columns: list[str], class_name: str, kwargs: dict[str, Any], workload: Workload,
                   mode: Mode, device: torch.device, compile_max_tensors: int) -> list[Runner]:
    runners = []
    for column in columns:
        if column == OURS_COMPILED and workload.tensors > compile_max_tensors:
            row.notes[column] = f"skipped: {workload.tensors} tensors > --compile-max-tensors {compile_max_tensors}"
            continue
        try:
            runners.append(Runner(column, class_name, kwargs, workload, mode, device))
        except (RuntimeError, TypeError, ValueError) as error:  # e.g. torch has no fused kernel for it
            row.notes[column] = f"n/a: {str(error).splitlines()[0][:100]}"
    return runners


def _run_guarded(runners: list[Runner], row: Row, action: Callable[[Runner], Any]) -> list[Runner]:
    """Run ``action`` on every runner; one that raises is reported in the row and dropped."""
    alive = []
    for runner in runners:
        try:
            action(runner)
        except Exception as error:  # a strategy mid-rewrite must not sink the other columns
            row.notes[runner.column] = _failure(error)
            continue
        alive.append(runner)
    return alive


def _first_step(runner: Runner, row: Row) -> None:
    step, _ = runner.train_step()
    row.first_step_ms[runner.column] = step * 1e3


def run_row(workload: Workload, algorithm: tuple[str, str, dict[str, Any]], mode_name: str, columns: list[str],
            preset: Preset, device: torch.device, bandwidth_GBps: float, memory: bool) -> Row:
    """Every column's loop on ``workload``, interleaved; medians, roofline, memory and parity."""
    started = time.perf_counter()
    label, class_name, kwargs = algorithm
    mode = MODES[mode_name]
    row = Row(workload.name, label, mode_name, workload.numel, workload.tensors)
    runners = _build_runners(row, columns, class_name, kwargs, workload, mode, device, preset.compile_max_tensors)
    runners = _run_guarded(runners, row, lambda r: _first_step(r, row))
    runners = _run_guarded(runners, row, lambda r: [r.train_step() for _ in range(preset.warmup_steps)])
    for round_index in range(preset.rounds):
        # Rotating the order every round: no column always runs right after the same neighbour.
        shift = round_index % len(runners) if runners else 0
        order = runners[shift:] + runners[:shift]
        alive = _run_guarded(order, row, lambda r: r.timed_steps(preset.steps_per_round))
        runners = [r for r in runners if r in alive]
    for runner in runners:
        row.step_ms[runner.column] = statistics.median(runner.step_s) * 1e3
        row.train_ms[runner.column] = statistics.median(runner.train_s) * 1e3
        row.state_B_per_param[runner.column] = state_bytes_per_param(runner.optimizer)
    by_column = {r.column: r for r in runners}
    reference = by_column.get(REFERENCE_COLUMN)
    if reference is not None:
        row.steps_compared = reference.steps_taken
        for runner in runners:
            row.max_abs_diff_vs_torch_loop[runner.column] = max_abs_difference(runner.parameters(),
                                                                               reference.parameters())
    if runners:
        counted = by_column.get(REFERENCE_COLUMN, runners[0])
        row.update_B_per_param, row.gather_B_per_param = traffic_bytes_per_param(counted.optimizer)
        row.traffic_B_per_param = row.update_B_per_param + row.gather_B_per_param
        row.roofline_ms = row.traffic_B_per_param * row.numel / (bandwidth_GBps * 1e9) * 1e3
    if memory:
        for runner in runners:
            try:
                runner.forward_backward()
                peak = peak_extra_memory(runner.optimizer.step, device)
            except Exception as error:
                row.notes[runner.column] = _failure(error)
                continue
            row.peak_extra_MB[runner.column] = None if peak is None else peak / 1e6
    row.seconds = time.perf_counter() - started
    return row


def modes_for(algorithm: str, workload: str, preset: Preset, modes: list[str] | None) -> list[str]:
    """The loops run for one algorithm on one workload: ``modes`` if given, else the preset's."""
    if modes is not None:
        return modes
    more = [mode for mode, workloads in preset.more_modes
            if algorithm in preset.more_modes_algorithms and workload in workloads]
    return list(preset.modes) + more


def _check_choices(kind: str, given: list[str], choices: Any) -> None:
    unknown = [name for name in given if name not in choices]
    if unknown:
        raise ValueError(f"unknown {kind} {unknown} (choices: {', '.join(choices)})")


def run_bench(preset: str | Preset = "default", *, algorithms: list[str] | None = None,
              workloads: list[str] | None = None, columns: list[str] | None = None, modes: list[str] | None = None,
              device: str = "cpu", threads: int | None = None, warmup_compile: bool | None = None,
              memory: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark and return its results (what ``bench.json`` holds)."""
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    dev = torch.device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    wanted = algorithms or list(preset.algorithms)
    _check_choices("algorithms", wanted, [label for label, _, _ in ALGORITHMS])
    chosen = [a for a in ALGORITHMS if a[0] in wanted and hasattr(scratchopt, a[1])]
    columns = list(columns or preset.columns)
    _check_choices("columns", columns, COLUMNS)
    _check_choices("modes", modes or [], MODES)
    _check_choices("workloads", workloads or [], WORKLOAD_NAMES)
    started = time.perf_counter()
    bandwidth = measure_bandwidth(dev)
    log(f"memory bandwidth: {bandwidth['axpy_GBps']:.1f} GB/s (axpy), {bandwidth['copy_GBps']:.1f} GB/s (copy); "
        f"{threads} threads; device {dev}")
    rows: list[Row] = []
    described: dict[str, dict[str, Any]] = {}
    for name in workloads or list(preset.workloads):
        workload = make_workload(name, preset, dev)
        described[name] = {"description": workload.description, "numel": workload.numel, "tensors": workload.tensors}
        log(f"[{name}] {workload.description}: {model_size(workload.tensors, workload.numel)}")
        for algorithm in chosen:
            for mode_name in modes_for(algorithm[0], name, preset, modes):
                row = run_row(workload, algorithm, mode_name, columns, preset, dev, bandwidth["axpy_GBps"], memory)
                rows.append(row)
                log(format_row(row, columns))
                gc.collect()
        del workload
        gc.collect()
    warmup: list[dict[str, Any]] = []
    if preset.warmup_compile if warmup_compile is None else warmup_compile:
        log("first fused step in fresh processes (Inductor cache starting empty) …")
        # The headline algorithm first: it is the one measured with the cache empty.
        names = sorted((a[0] for a in chosen), key=lambda name: name != "AdamW")
        warmup = compile_warmup(names, preset.mlp_layers, dev, threads)
    results = {
        "meta": {"preset": preset.name, "device": str(dev), "threads": threads, "torch": torch.__version__,
                 "machine": platform.machine(), "processor": platform.processor(),
                 "python": platform.python_version(), "seconds": time.perf_counter() - started,
                 "columns": columns, "rounds": preset.rounds, "steps_per_round": preset.steps_per_round,
                 "warmup_steps": preset.warmup_steps,
                 "modes": {name: MODES[name].label for name in dict.fromkeys(row.mode for row in rows)}},
        "bandwidth": bandwidth,
        "workloads": described,
        "rows": [asdict(row) for row in rows],
        "compile_warmup": warmup,
    }
    results["targets"] = targets(rows, described, warmup)
    return results


# ------------------------------------------------------------------------------------------------------
# Targets (issue 7): measured, never tuned for
# ------------------------------------------------------------------------------------------------------

#: (workload, goal for torch fused ÷ ours fused, column of ours); at least this many times faster.
SPEEDUP_TARGETS = (("mlp", 3.0, OURS_FUSED), ("mlp", 6.0, OURS_CONTIGUOUS), ("gpt", 1.0, OURS_FUSED),
                   ("large", 0.95, OURS_FUSED))
#: On the tiny model ours fused may take at most this many times torch fused's step.
TINY_SLOWDOWN_LIMIT = 2.0
ROOFLINE_LIMIT = 1.3
ROOFLINE_MIN_PARAMS = 1_000_000
FIRST_STEP_LIMIT_S = 10.0


def _target(text: str, measured: float | None, goal: float, at_least: bool, unit: str = "×") -> dict[str, Any]:
    if measured is None:
        return {"target": text, "measured": None, "goal": goal, "met": False, "missed_by": None,
                "verdict": "not measured"}
    met = measured >= goal if at_least else measured <= goal
    missed_by = None if met else (goal / measured if at_least else measured / goal)
    return {"target": text, "measured": measured, "goal": goal, "met": met, "missed_by": missed_by,
            "verdict": f"met ({measured:.2f}{unit})" if met else f"missed by {missed_by:.2f}× ({measured:.2f}{unit})"}


def targets(rows: list[Row], workloads: dict[str, dict[str, Any]], warmup: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets for the default loop (``zero_grad()``), as ratios measured in this run."""
    found = []
    for row in rows:
        if row.mode != DEFAULT_MODE:
            continue
        model = workloads[row.workload]["description"]
        for workload, goal, column in SPEEDUP_TARGETS:
            if row.workload == workload and column in row.step_ms | row.notes:
                found.append(_target(f"{row.algorithm}, {model}: {column} ≥ {goal}× faster than torch fused",
                                     row.ratio(TORCH_FUSED, column), goal, at_least=True))
        if row.workload == "tiny" and OURS_FUSED in row.step_ms | row.notes:
            found.append(_target(f"{row.algorithm}, {model}: ours fused ≤ {TINY_SLOWDOWN_LIMIT}× torch fused's time",
                                 row.ratio(OURS_FUSED, TORCH_FUSED), TINY_SLOWDOWN_LIMIT, at_least=False))
        if row.numel >= ROOFLINE_MIN_PARAMS and row.roofline_ms and OURS_FUSED in row.step_ms | row.notes:
            fused = row.step_ms.get(OURS_FUSED)
            found.append(_target(f"{row.algorithm}, {model}: ours fused within {ROOFLINE_LIMIT}× of the roofline",
                                 fused / row.roofline_ms if fused else None, ROOFLINE_LIMIT, at_least=False))
    for run in warmup:
        if run["cache"] != "cached, new process":
            found.append(_target(f"{run['algorithm']}: first fused step ≤ {FIRST_STEP_LIMIT_S:.0f} s "
                                 f"({run['cache']}, {run['layers']}-layer MLP)",
                                 run.get("first_step_s"), FIRST_STEP_LIMIT_S, at_least=False, unit=" s"))
    return found


# ------------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------------


def model_size(tensors: int, numel: int) -> str:
    return f"{tensors} tensor{'s' if tensors != 1 else ''}, {numel:,} params"


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _times(row: dict[str, Any], column: str) -> str:
    step = row["step_ms"].get(column)
    return "—" if step is None else f"{_ms(step)} / {_ms(row['train_ms'][column])}"


def format_row(row: Row, columns: list[str]) -> str:
    cells = [f"{c}={_ms(row.step_ms.get(c))}" for c in columns]
    speedup = row.ratio(TORCH_FUSED, OURS_FUSED)
    fused = row.step_ms.get(OURS_FUSED)
    summary = f"; roofline {row.roofline_ms:.2f} ms"
    if fused:
        summary += f", ours fused at {fused / row.roofline_ms:.2f}× roofline"
    if speedup:
        summary += f", torch fused ÷ ours fused {speedup:.2f}×"
    failed = [f"{c}: {note}" for c, note in row.notes.items() if note.startswith("failed")]
    return (f"[{row.workload}, {row.mode}] {row.algorithm} ({row.seconds:.1f} s) opt.step() ms: " + ", ".join(cells) + summary
            + ("".join(f"\n    {line}" for line in failed)))


def table(results: dict[str, Any]) -> str:
    """The results as Markdown: per workload and mode, medians of opt.step() / whole train step; then details."""
    columns = results["meta"]["columns"]
    lines = []
    for workload, info in results["workloads"].items():
        rows = [r for r in results["rows"] if r["workload"] == workload]
        if not rows:
            continue
        lines.append(f"\n### {workload}: {info['description']} ({model_size(info['tensors'], info['numel'])})")
        for mode in dict.fromkeys(r["mode"] for r in rows):
            lines.append(f"\n{MODES[mode].label} — median ms: opt.step() / whole train step\n")
            header = ["algorithm", *columns, "roofline ms (B/param)", "torch fused ÷ ours fused",
                      "ours fused ÷ roofline"]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for r in (r for r in rows if r["mode"] == mode):
                fused, torch_fused = r["step_ms"].get(OURS_FUSED), r["step_ms"].get(TORCH_FUSED)
                cells = [r["algorithm"], *(_times(r, c) for c in columns),
                         f"{r['roofline_ms']:.2f} ({r['update_B_per_param']:.0f}+{r['gather_B_per_param']:.0f})",
                         f"{torch_fused / fused:.2f}×" if fused and torch_fused else "—",
                         f"{fused / r['roofline_ms']:.2f}×" if fused and r["roofline_ms"] else "—"]
                lines.append("| " + " | ".join(cells) + " |")
        details = [r for r in rows if r["mode"] == DEFAULT_MODE]
        if details:
            lines.append(f"\ndetails ({MODES[DEFAULT_MODE].label}; parameters compared after "
                         f"{details[0]['steps_compared']} steps)\n")
            header = ["algorithm", "measure", *columns]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for r in details:
                for measure, key, formatted in (
                    ("first step (compile) ms", "first_step_ms", _ms),
                    ("peak extra MB in step", "peak_extra_MB", lambda v: f"{v:.1f}"),
                    ("state B/param", "state_B_per_param", lambda v: f"{v:.1f}"),
                    ("max |p − torch loop's p|", "max_abs_diff_vs_torch_loop", lambda v: f"{v:.1e}" if v else "0"),
                ):
                    cells = [r["algorithm"], measure,
                             *("—" if r[key].get(c) is None else formatted(r[key][c]) for c in columns)]
                    lines.append("| " + " | ".join(cells) + " |")
        notes = {(c, note) for r in rows for c, note in r["notes"].items()}
        for column, note in sorted(notes):
            lines.append(f"- {column}: {note}")
    return "\n".join(lines)


def format_targets(results: dict[str, Any]) -> str:
    lines = ["targets (issue 7; ratios of medians from this run, default zero_grad()):"]
    for t in results["targets"]:
        lines.append(f"  [{t['verdict']}] {t['target']}")
    return "\n".join(lines)


def format_warmup(results: dict[str, Any]) -> str:
    lines = ["first fused step in fresh processes (one Inductor cache, starting empty):"]
    for run in results["compile_warmup"]:
        if "error" in run:
            lines.append(f"  {run['algorithm']} ({run['cache']}): failed: {run['error']}")
        else:
            lines.append(f"  {run['algorithm']} ({run['cache']}): first step {run['first_step_s']:.1f} s, "
                         f"second {run['second_step_s'] * 1e3:.1f} ms")
    return "\n".join(lines)


CSV_FIELDS = ("workload", "algorithm", "mode", "params", "tensors", "column", "step_ms", "train_ms", "first_step_ms",
              "peak_extra_MB", "state_B_per_param", "max_abs_diff_vs_torch_loop", "traffic_B_per_param",
              "roofline_ms", "note")


def save(results: dict[str, Any], out: str) -> list[str]:
    """Write ``bench.json``, ``bench.csv`` (one line per row and column) and ``bench.png``; return the paths."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, "bench.json"), os.path.join(out, "bench.csv")]
    with open(paths[0], "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(paths[1], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for r in results["rows"]:
            for c in results["meta"]["columns"]:
                writer.writerow([r["workload"], r["algorithm"], r["mode"], r["numel"], r["tensors"], c,
                                 r["step_ms"].get(c), r["train_ms"].get(c), r["first_step_ms"].get(c),
                                 r["peak_extra_MB"].get(c), r["state_B_per_param"].get(c),
                                 r["max_abs_diff_vs_torch_loop"].get(c), r["traffic_B_per_param"], r["roofline_ms"],
                                 r["notes"].get(c, "")])
    path = os.path.join(out, "bench.png")
    if plot(results, path):
        paths.append(path)
    return paths


def plot(results: dict[str, Any], path: str) -> bool:
    """Median ``opt.step()`` per column in the default loop, one panel per workload, roofline marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["mode"] == DEFAULT_MODE and r["step_ms"]]
    workloads = [w for w in results["workloads"] if any(r["workload"] == w for r in rows)]
    if not workloads:
        return False
    columns = [c for c in results["meta"]["columns"] if any(c in r["step_ms"] for r in rows)]
    panels = len(workloads)
    ncols = min(2, panels)
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 3.8 * nrows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    width = 0.8 / len(columns)
    for ax, workload in zip(axes.flat, workloads, strict=False):
        these = [r for r in rows if r["workload"] == workload]
        for i, column in enumerate(columns):
            xs = [j + i * width for j in range(len(these))]
            ys = [r["step_ms"].get(column, 0.0) for r in these]
            ax.bar(xs, ys, width, label=column, color=cmap(i % 10))
        for j, r in enumerate(these):
            ax.hlines(r["roofline_ms"], j - width / 2, j + 0.8 - width / 2, colors="black", linestyles="dashed",
                      label="roofline" if j == 0 else None)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(these))], [r["algorithm"] for r in these])
        ax.set_yscale("log")
        ax.set_ylabel("median opt.step() (ms, log)")
        info = results["workloads"][workload]
        ax.set_title(f"{workload}: {model_size(info['tensors'], info['numel'])}", fontsize=10)
    for ax in list(axes.flat)[panels:]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8)
    fig.suptitle("opt.step() inside the training loop: zero_grad(), forward, backward, step "
                 f"({results['meta']['device']}, {results['meta']['threads']} threads)", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="default (a few minutes on 2 cores) or quick (well under a minute)")
    parser.add_argument("--algorithms", help="comma-separated rows, e.g. Adam,AdamW,SGD+momentum "
                        f"(choices: {', '.join(a[0] for a in ALGORITHMS)})")
    parser.add_argument("--workloads", help=f"comma-separated models (choices: {', '.join(WORKLOAD_NAMES)})")
    parser.add_argument("--columns", help=f"comma-separated (choices: {', '.join(COLUMNS)})")
    parser.add_argument("--modes", help=f"comma-separated loops, run for every algorithm and model (choices: "
                        f"{', '.join(MODES)}; default: set-to-none for all, the others for AdamW on some models)")
    parser.add_argument("--mlp-layers", type=int, help="layers of the seed MLP (default 2000; quick 200)")
    parser.add_argument("--large-params", type=int, help="elements of the one large tensor (default 16M; quick 4M)")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default 3)")
    parser.add_argument("--steps-per-round", type=int, help="train steps of each column per round")
    parser.add_argument("--compile-max-tensors", type=int,
                        help="largest model (tensors) the per-tensor compiled column runs on (default 100)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the first-fused-step measurement in fresh processes")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--out", default="bench_results", help="output folder (default bench_results)")


def main(args: argparse.Namespace) -> dict[str, Any]:
    preset = PRESETS[args.preset]
    overrides = {"mlp_layers": args.mlp_layers, "large_params": args.large_params, "rounds": args.rounds,
                 "steps_per_round": args.steps_per_round, "compile_max_tensors": args.compile_max_tensors}
    preset = replace(preset, **{key: value for key, value in overrides.items() if value is not None})

    def split(text: str | None) -> list[str] | None:
        return [x.strip() for x in text.split(",") if x.strip()] if text else None

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("scratchopt bench: --device cuda asked for, but torch sees no CUDA device")
    results = run_bench(preset, algorithms=split(args.algorithms), workloads=split(args.workloads),
                        columns=split(args.columns), modes=split(args.modes), device=args.device,
                        threads=args.threads, warmup_compile=False if args.no_warmup else None,
                        memory=not args.no_memory)
    print(table(results))
    if results["compile_warmup"]:
        print("\n" + format_warmup(results))
    print("\n" + format_targets(results))
    print(f"\n{results['meta']['seconds']:.0f} s")
    for path in save(results, args.out):
        print(f"wrote {path}")
    return results
