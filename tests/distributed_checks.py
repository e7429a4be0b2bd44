"""What each gloo rank runs for ``tests/test_distributed.py``: scratchopt inside torch's distributed wrappers.

Every check trains two copies of the same small MLP side by side on the same per-rank batches, one with
scratchopt and one with ``torch.optim`` (its for-loop, ``foreach=False``) or with an uninterrupted
scratchopt run, and leaves the full tensors to compare (``full_tensor()`` of FSDP2's DTensors) in
``OUT_DIR/<check>.pt`` on rank 0. The comparison itself, with each strategy's tolerance, is the test's.
What only a rank can see (the type and placements of the optimizer's state next to torch's) is asserted
here, so a mismatch comes back as the check's failure with its traceback.

The MLP's last layer has 5 outputs: sharded over 2 ranks its weight splits 3 + 2 rows, the uneven case
FSDP2 pads internally. The low-precision checks (``state_dtype``) train a wider MLP whose first weight,
17 rows of 256, is large enough for 8-bit state and splits 9 + 8 rows; their reference is the same
scratchopt optimizer on an unsharded copy given the same whole gradients, stepping with the same seed.
"""

from __future__ import annotations

import copy
import functools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from ranks import run_checks
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import scratchopt
from scratchopt import precision, quantization
from scratchopt.strategies.kernels import cache as _compiled

STRATEGIES = scratchopt.strategies.NAMES
#: The algorithms run under FSDP2 and DDP: one with two moments and a ``step``, one with a buffer made
#: from the first gradient.
ALGORITHMS: dict[str, dict[str, Any]] = {
    "AdamW": {"lr": 0.01, "weight_decay": 0.1},
    "SGD": {"lr": 0.05, "momentum": 0.9},
}
STEPS = 4
#: The low-precision settings run under FSDP2 and DCP.
STATE_DTYPES: dict[str, Any] = {"bf16": torch.bfloat16, "8bit": "8bit"}
#: The strategies a low-precision DCP resume runs with: every strategy updates a sharded group through
#: the same widened step, so the reference and the fastest suffice.
LOW_PRECISION_RESUMED = ("loop", "fused")
#: Steps before a checkpoint, then steps after it (on the resumed run and on the uninterrupted one).
STEPS_BEFORE_SAVE, STEPS_AFTER_LOAD = 3, 3


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 5))


def wide_mlp(seed: int, outputs: int = 5) -> nn.Sequential:
    """An MLP with 256 inputs: its first weight (17 × 256) keeps 8-bit state in whole blocks per row;
    with ``outputs`` = 300 the last weight (300 × 17) does too, in one short block per row."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 17), nn.Tanh(), nn.Linear(17, outputs))


def sharded(model: nn.Sequential) -> nn.Sequential:
    """FSDP2 on each Linear and on the whole model, over all ranks."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch(step: int, model: nn.Module) -> tuple[Tensor, Tensor]:
    """This rank's batch at ``step`` for ``model`` (its first and last layers' sizes, through any
    wrapper): different on every rank, the same for every model on a rank."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    sizes = (linears[0].in_features, linears[-1].out_features)
    generator = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    return torch.randn(8, sizes[0], generator=generator), torch.randn(8, sizes[1], generator=generator)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        inputs, targets = batch(step, model)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step)  # the seed of a low-precision step's rounding, the same in every run
            optimizer.step()


def full(value: Tensor) -> Tensor:
    """The whole tensor: a DTensor gathered from every rank (a collective), any other tensor copied."""
    return value.detach().full_tensor() if isinstance(value, DTensor) else value.detach().clone()


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Tensor]:
    """Every parameter and every state tensor, whole, keyed ``name`` and ``name:state_key``.

    Every rank must call it (gathering a DTensor is a collective); the order is the same on every rank.
    """
    names = {param: name for name, param in model.named_parameters()}
    tensors = {name: full(param) for name, param in model.named_parameters()}
    if optimizer is not None:
        for param, state in optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, Tensor):
                    tensors[f"{names[param]}:{key}"] = full(value)
    return tensors


def describe(value: Any) -> str:
    """A state value's kind as a comparison sees it: a DTensor with its mesh and placements, or the type."""
    if isinstance(value, DTensor):
        return f"DTensor{tuple(value.shape)} on {value.device_mesh} placed {value.placements}"
    return type(value).__name__


def assert_state_laid_out_like_torch(
    model: nn.Module, ours: torch.optim.Optimizer, their_model: nn.Module, theirs: torch.optim.Optimizer
) -> None:
    """Each state value has torch's kind; parameter-sized state is a DTensor sharded like its parameter."""
    their_params = dict(their_model.named_parameters())
    for name, param in model.named_parameters():
        our_state, their_state = ours.state[param], theirs.state[their_params[name]]
        assert set(our_state) == set(their_state), f"{name}: state keys {set(our_state)} != {set(their_state)}"
        for key, value in our_state.items():
            assert describe(value) == describe(their_state[key]), (
                f"{name}:{key} is {describe(value)}, torch's is {describe(their_state[key])}"
            )
            if isinstance(param, DTensor) and isinstance(value, Tensor) and value.shape == param.shape:
                assert isinstance(value, DTensor) and value.placements == param.placements, (
                    f"{name}:{key} is {describe(value)}; its parameter is {describe(param)}"
                )
                assert value.to_local().shape == param.to_local().shape, f"{name}:{key}: local shard shape"


def torch_twin(name: str, params: Iterator[Tensor], kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    return getattr(torch.optim, name)(params, foreach=False, **kwargs)


def save_pairs(out_dir: Path, check: str, pairs: dict[str, tuple[dict[str, Tensor], dict[str, Tensor]]]) -> None:
    """Rank 0 leaves ``{comparison: (ours, reference)}`` for the test to compare."""
    if dist.get_rank() == 0:
        torch.save(pairs, out_dir / f"{check.replace('/', '-')}.pt")


def check_against_torch(
    wrap: Callable[[nn.Module], nn.Module], algorithm: str, impl: str, out_dir: Path, check: str
) -> dict[str, Any]:
    """``STEPS`` steps of scratchopt and of torch.optim, each on its own wrapped copy of the MLP."""
    kwargs = ALGORITHMS[algorithm]
    model, their_model = wrap(mlp(0)), wrap(mlp(0))
    ours = getattr(scratchopt, algorithm)(model.parameters(), impl=impl, **kwargs)
    theirs = torch_twin(algorithm, their_model.parameters(), kwargs)
    train(model, ours, range(STEPS))
    train(their_model, theirs, range(STEPS))
    assert_state_laid_out_like_torch(model, ours, their_model, theirs)
    save_pairs(out_dir, check, {"vs torch.optim": (snapshot(model, ours), snapshot(their_model, theirs))})
    return {}


def check_fsdp2_step_in_backward(impl: str, out_dir: Path, check: str) -> dict[str, Any]:
    """scratchopt.step_in_backward under FSDP2 (whose sharded parameters' hooks run after the
    reduce-scatter) against torch.optim stepping after backward."""
    kwargs = ALGORITHMS["AdamW"]
    model, their_model = sharded(mlp(0)), sharded(mlp(0))
    stepper = scratchopt.step_in_backward(model, functools.partial(scratchopt.AdamW, impl=impl, **kwargs))
    theirs = torch_twin("AdamW", their_model.parameters(), kwargs)
    for step in range(STEPS):
        inputs, targets = batch(step, model)
        nn.functional.mse_loss(model(inputs), targets).backward()
    assert all(p.grad is None for p in model.parameters()), "a gradient was left after backward"
    train(their_model, theirs, range(STEPS))
    for param, optimizer in zip(stepper.params, stepper.optimizers):
        for key, value in optimizer.state[param].items():
            if value.dim():
                assert isinstance(value, DTensor) and value.placements == param.placements, f"{key}: {describe(value)}"
    save_pairs(out_dir, check, {"vs torch.optim": (snapshot(model), snapshot(their_model))})
    return {}


def check_low_precision(
    state_dtype: str, impl: str, out_dir: Path, check: str, algorithm: str = "AdamW"
) -> dict[str, Any]:
    """An algorithm with low-precision state under FSDP2 against the same optimizer on an unsharded copy
    of the model, given the whole gradients of each step: the same parameters and state bit for bit
    (8-bit state row by row is the flat storage where a row is whole blocks, and each shard's random
    bits are the whole tensor's); the state is placed like its param, 8-bit state row by row, SGD's
    momentum buffer, made by its own bookkeeping, included."""
    kwargs = {**ALGORITHMS[algorithm], "state_dtype": STATE_DTYPES[state_dtype]}
    model, unsharded = sharded(wide_mlp(0)), wide_mlp(0)
    ours = getattr(scratchopt, algorithm)(model.parameters(), impl=impl, **kwargs)
    reference = getattr(scratchopt, algorithm)(unsharded.parameters(), impl=impl, **kwargs)
    for step in range(STEPS):
        inputs, targets = batch(step, model)
        ours.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        for param, twin in zip(model.parameters(), unsharded.parameters(), strict=True):
            twin.grad = full(param.grad)  # type: ignore[arg-type]  # every param has a gradient
        for optimizer in (ours, reference):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(step)
                optimizer.step()
    weight = model[0].weight
    assert any(value.dim() for value in ours.state[weight].values()), "no state tensor"
    for key, value in ours.state[weight].items():
        if value.dim():
            assert isinstance(value, DTensor) and value.placements == weight.placements, f"{key}: {describe(value)}"
            if state_dtype == "8bit":
                assert value.dtype == torch.uint8 and value.shape == quantization.rows_shape(weight.shape), key
            else:
                assert value.dtype == torch.bfloat16 and value.to_local().shape == weight.to_local().shape, key
    bias_state = next(v for v in ours.state[model[0].bias].values() if v.dim())
    assert bias_state.dtype == (torch.float32 if state_dtype == "8bit" else torch.bfloat16), describe(bias_state)
    pairs = {
        "sharded vs unsharded": (snapshot(model), snapshot(unsharded)),
        "float32 state_dict, sharded vs unsharded": (
            _state_tensors(_full_state_dict(precision.float32_state_dict(ours))),
            _state_tensors(precision.float32_state_dict(reference)),
        ),
    }
    save_pairs(out_dir, check, pairs)
    return {}


def _full_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state_dict with every DTensor gathered whole (a collective)."""
    state = {
        i: {k: full(v) if isinstance(v, Tensor) else v for k, v in s.items()} for i, s in state_dict["state"].items()
    }
    return {**state_dict, "state": state}


def check_dcp_resume(impl: str, out_dir: Path, check: str, state_dtype: str | None = None) -> dict[str, Any]:
    """Save with torch.distributed.checkpoint after a few steps, load into a fresh model and optimizer,
    continue; the parameters and state must be those of the run that never stopped. With
    ``state_dtype``, on the wide MLP whose two weights keep 8-bit state, one of them in short blocks."""
    kwargs = dict(ALGORITHMS["AdamW"])
    path = out_dir / f"checkpoint-{impl}-{state_dtype}"
    make = functools.partial(wide_mlp, outputs=300) if state_dtype else mlp
    if state_dtype:
        kwargs["state_dtype"] = STATE_DTYPES[state_dtype]
    model = sharded(make(0))
    optimizer = scratchopt.AdamW(model.parameters(), impl=impl, **kwargs)
    train(model, optimizer, range(STEPS_BEFORE_SAVE))
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=path
    )
    train(model, optimizer, range(STEPS_BEFORE_SAVE, STEPS_BEFORE_SAVE + STEPS_AFTER_LOAD))

    resumed = sharded(make(1))  # other initial values: the checkpoint must overwrite all of them
    resumed_optimizer = scratchopt.AdamW(resumed.parameters(), impl=impl, **kwargs)
    state = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, resumed_optimizer)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(resumed, state["model"])
    set_optimizer_state_dict(resumed, resumed_optimizer, state["optim"])
    train(resumed, resumed_optimizer, range(STEPS_BEFORE_SAVE, STEPS_BEFORE_SAVE + STEPS_AFTER_LOAD))
    assert_state_laid_out_like_torch(resumed, resumed_optimizer, model, optimizer)
    save_pairs(
        out_dir, check, {"resumed vs uninterrupted": (snapshot(resumed, resumed_optimizer), snapshot(model, optimizer))}
    )
    return {}


def _consolidated(optimizer: ZeroRedundancyOptimizer) -> dict[str, Any] | None:
    """A copy of the whole optimizer's state_dict on rank 0 (None elsewhere), as ZeRO consolidates it.

    A copy, as a checkpoint is: ``state_dict()`` hands out the live state tensors, which the next steps
    change, and ``load_state_dict`` adopts the 0-d ``step`` tensors it is given.
    """
    optimizer.consolidate_state_dict(to=0)
    return copy.deepcopy(optimizer.state_dict()) if dist.get_rank() == 0 else None


def _state_tensors(state_dict: dict[str, Any]) -> dict[str, Tensor]:
    return {
        f"{index}:{key}": value
        for index, state in state_dict["state"].items()
        for key, value in state.items()
        if isinstance(value, Tensor)
    }


def check_zero(impl: str, out_dir: Path, check: str) -> dict[str, Any]:
    """ZeroRedundancyOptimizer(optimizer_class=scratchopt.AdamW) + DDP against torch's AdamW in the same
    wrappers; then the consolidated state_dict, loaded on every rank into a fresh model and optimizer,
    continues exactly as the run that never stopped."""
    kwargs = ALGORITHMS["AdamW"]
    model, their_model = DistributedDataParallel(mlp(0)), DistributedDataParallel(mlp(0))
    ours = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=scratchopt.AdamW, impl=impl, **kwargs)
    theirs = ZeroRedundancyOptimizer(
        their_model.parameters(), optimizer_class=torch.optim.AdamW, foreach=False, **kwargs
    )
    train(model, ours, range(STEPS_BEFORE_SAVE))
    train(their_model, theirs, range(STEPS_BEFORE_SAVE))
    our_state_dict, their_state_dict = _consolidated(ours), _consolidated(theirs)
    checkpoint = [copy.deepcopy(model.module.state_dict()), copy.deepcopy(our_state_dict)]
    dist.broadcast_object_list(checkpoint, src=0)
    pairs = {"vs torch.optim": (snapshot(model), snapshot(their_model))}
    if dist.get_rank() == 0:
        pairs["consolidated state_dict vs torch.optim's"] = (
            _state_tensors(our_state_dict),
            _state_tensors(their_state_dict),
        )
    later = range(STEPS_BEFORE_SAVE, STEPS_BEFORE_SAVE + STEPS_AFTER_LOAD)
    train(model, ours, later)

    resumed, _ = _zero_resumed(mlp, checkpoint, impl, kwargs, later)
    pairs["resumed vs uninterrupted"] = (snapshot(resumed), snapshot(model))
    save_pairs(out_dir, check, pairs)
    return {}


def _zero_resumed(
    make: Callable[[int], nn.Sequential], checkpoint: list[Any], impl: str, kwargs: dict[str, Any], steps: range
) -> tuple[nn.Module, ZeroRedundancyOptimizer]:
    """A fresh DDP model (other initial values) and ZeRO optimizer that load ``checkpoint`` (the model's
    and the consolidated optimizer's state_dicts) on every rank, then train ``steps``."""
    resumed = DistributedDataParallel(make(1))
    resumed.module.load_state_dict(checkpoint[0])
    optimizer = ZeroRedundancyOptimizer(resumed.parameters(), optimizer_class=scratchopt.AdamW, impl=impl, **kwargs)
    optimizer.load_state_dict(checkpoint[1])
    train(resumed, optimizer, steps)
    return resumed, optimizer


def check_zero_low_precision(state_dtype: str, impl: str, out_dir: Path, check: str) -> dict[str, Any]:
    """ZeroRedundancyOptimizer(optimizer_class=scratchopt.AdamW, state_dtype=…) + DDP: each rank keeps
    its own params' state in low precision, the consolidated state_dict holds it under torch's keys, and
    a fresh model and optimizer that load it on every rank continue exactly as the run that never
    stopped."""
    kwargs = {**ALGORITHMS["AdamW"], "state_dtype": STATE_DTYPES[state_dtype]}
    model = DistributedDataParallel(wide_mlp(0))
    ours = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=scratchopt.AdamW, impl=impl, **kwargs)
    train(model, ours, range(STEPS_BEFORE_SAVE))
    state_dict = _consolidated(ours)
    wanted = torch.uint8 if state_dtype == "8bit" else torch.bfloat16
    if state_dict is not None:
        kept = {value.dtype for state in state_dict["state"].values() for value in state.values() if value.dim()}
        assert wanted in kept, f"the consolidated state holds {kept}"
    checkpoint = [copy.deepcopy(model.module.state_dict()), state_dict]
    dist.broadcast_object_list(checkpoint, src=0)
    later = range(STEPS_BEFORE_SAVE, STEPS_BEFORE_SAVE + STEPS_AFTER_LOAD)
    train(model, ours, later)
    resumed, resumed_optimizer = _zero_resumed(wide_mlp, checkpoint, impl, kwargs, later)
    for param, state in resumed_optimizer.optim.state.items():  # this rank's params: whole tensors
        kept = precision.stored_dtype(precision.state_dtype_for(param, kwargs))
        for key, value in state.items():
            assert not value.dim() or value.dtype == kept, f"{key} of a {tuple(param.shape)} param: {value.dtype}"
    save_pairs(out_dir, check, {"resumed vs uninterrupted": (snapshot(resumed), snapshot(model))})
    return {}


def check_ddp_refuses_step_in_backward() -> dict[str, Any]:
    model = DistributedDataParallel(mlp(0))
    try:
        scratchopt.step_in_backward(model, scratchopt.SGD)
    except ValueError as error:
        assert "DistributedDataParallel" in str(error), error
        return {}
    raise AssertionError("step_in_backward accepted a DistributedDataParallel module")


#: Checks that assert a refusal and compare no numbers; every other check saves what it compares.
COMPARES_NOTHING = frozenset({"ddp-step-in-backward/refused"})


def checks(out_dir: Path) -> Iterator[tuple[str, Callable[[], dict[str, Any]]]]:
    """Every check, named ``wrapper/…/impl``, for every strategy."""
    for impl in STRATEGIES:
        for algorithm in ALGORITHMS:
            name = f"fsdp2/{algorithm}/{impl}"
            yield name, lambda a=algorithm, i=impl, n=name: check_against_torch(sharded, a, i, out_dir, n)
        name = f"fsdp2-step-in-backward/AdamW/{impl}"
        yield name, lambda i=impl, n=name: check_fsdp2_step_in_backward(i, out_dir, n)
        name = f"dcp/AdamW/{impl}"
        yield name, lambda i=impl, n=name: check_dcp_resume(i, out_dir, n)
        for state_dtype in STATE_DTYPES:
            for algorithm in ALGORITHMS:
                name = f"fsdp2-{state_dtype}-state/{algorithm}/{impl}"
                yield (
                    name,
                    lambda d=state_dtype, i=impl, n=name, a=algorithm: check_low_precision(d, i, out_dir, n, a),
                )
            if impl in LOW_PRECISION_RESUMED:
                name = f"dcp-{state_dtype}-state/AdamW/{impl}"
                yield name, lambda d=state_dtype, i=impl, n=name: check_dcp_resume(i, out_dir, n, d)
        for algorithm in ALGORITHMS:
            name = f"ddp/{algorithm}/{impl}"
            yield (
                name,
                lambda a=algorithm, i=impl, n=name: check_against_torch(DistributedDataParallel, a, i, out_dir, n),
            )
        name = f"zero/AdamW/{impl}"
        yield name, lambda i=impl, n=name: check_zero(i, out_dir, n)
        if impl in LOW_PRECISION_RESUMED:
            for state_dtype in STATE_DTYPES:
                name = f"zero-{state_dtype}-state/AdamW/{impl}"
                yield name, lambda d=state_dtype, i=impl, n=name: check_zero_low_precision(d, i, out_dir, n)
    yield "ddp-step-in-backward/refused", check_ddp_refuses_step_in_backward


def main(rank: int, world_size: int, store: dist.Store, out_dir: Path) -> dict[str, Any]:
    """Run every check on this rank (see :func:`ranks.launch`). The test model's tensors are small: let
    them reach the compiled kernels, as the ``kernels_at_every_size`` fixture does in the main process."""
    _compiled.MIN_KERNEL_NUMEL = 2
    return run_checks(checks(out_dir), rank, world_size, store, out_dir)


def abort_on_rank_1(rank: int, world_size: int, store: dist.Store, out_dir: Path) -> dict[str, Any]:
    """For the harness's own test: rank 1 dies as a C++ abort would, rank 0 waits for it in a collective."""
    if rank == 1:
        print("rank 1 aborts now", flush=True)
        os.abort()
    dist.barrier()
    return {}


def hang_on_rank_0(rank: int, world_size: int, store: dist.Store, out_dir: Path) -> dict[str, Any]:
    """For the harness's own test: rank 0 waits for a message rank 1 never sends."""
    if rank == 0:
        print("rank 0 waits for rank 1", flush=True)
        dist.recv(torch.zeros(1), src=1)
    else:
        time.sleep(3600)
    return {}
