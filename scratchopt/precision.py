"""Low-precision optimizer state and stochastic rounding, for every elementwise algorithm.

Two settings of a param group, accepted by the constructor of every elementwise optimizer:

``state_dtype``
    ``torch.float32`` (the default: state in the parameter's dtype, as torch keeps it) or
    ``torch.bfloat16``: the state tensors of a float32 parameter are kept in bfloat16, half the bytes.
``stochastic_rounding``
    ``False`` (the default) or ``True``: a bfloat16 parameter and its bfloat16 state are updated in
    float32 and rounded stochastically, so that updates smaller than half a bfloat16 ulp still move the
    weights on average.

A step of such a group (:func:`update`) widens every bfloat16 tensor the update writes to float32, runs
the algorithm's one ``update`` on the float32 copies, and writes each back rounded stochastically: the
value x, between the two bfloat16 numbers a < x < b next to it, becomes b with probability (x − a)/(b − a)
and a otherwise, so the rounding is unbiased. A bfloat16 parameter without ``stochastic_rounding`` is
updated as torch updates it (in bfloat16), whatever ``state_dtype`` says; parameters of other dtypes keep
their state in their own dtype.

The random bits are a counter-based hash of each element's index and a per-tensor seed
(:func:`random_bits`), and the seeds of a step are drawn once from torch's default CPU generator, so
``torch.manual_seed`` makes a run reproducible, and a native kernel computing the same hash gives the
same roundings as this eager reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from scratchopt.strategies.kernels import runtime

if TYPE_CHECKING:
    from scratchopt.optimizer import ScratchOptimizer

#: The values ``state_dtype`` accepts.
STATE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
DEFAULTS: dict[str, Any] = {"state_dtype": torch.float32, "stochastic_rounding": False}
ANNOTATIONS: dict[str, str] = {"state_dtype": "torch.dtype", "stochastic_rounding": "bool"}
_MASK32 = 0xFFFFFFFF
#: Multipliers of the hash (below 2³¹, so that every product of a 32-bit value fits in an int64).
_HASH_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)
_GOLDEN = 0x9E3779B1


def check(cls_name: str, elementwise: bool, state_dtype: Any, stochastic_rounding: Any) -> None:
    """Refuse a setting this optimizer cannot honour, naming the argument."""
    if state_dtype not in STATE_DTYPES:
        raise ValueError(
            f"{cls_name}: state_dtype={state_dtype!r} is not supported; choose one of "
            f"{', '.join(map(str, STATE_DTYPES))}"
        )
    if not isinstance(stochastic_rounding, bool):
        raise TypeError(f"{cls_name}: stochastic_rounding must be a bool, not {type(stochastic_rounding).__name__}")
    if not elementwise and (state_dtype != torch.float32 or stochastic_rounding):
        raise ValueError(
            f"{cls_name} is not elementwise: state_dtype and stochastic_rounding apply to elementwise "
            "algorithms only (their update is widened to float32 element by element)"
        )


def check_params(optimizer: Any, params: list[Tensor]) -> None:
    """Refuse, before anything changes, a parameter a low-precision step cannot take: a DTensor (FSDP2's
    sharded params; their local shards are not rounded here yet)."""
    from scratchopt.distributed.dtensor import is_dtensor
    from scratchopt.step_checks import describe

    for param in params:
        if is_dtensor(param):
            raise NotImplementedError(
                f"{type(optimizer).__name__}: {describe(optimizer, param)} is a DTensor (FSDP2); state_dtype "
                "and stochastic_rounding do not take sharded parameters yet"
            )


def is_low(group: dict[str, Any]) -> bool:
    """Whether the group keeps low-precision state or rounds stochastically."""
    return group.get("state_dtype", torch.float32) != torch.float32 or bool(group.get("stochastic_rounding"))


def state_dtype_for(param: Tensor, group: dict[str, Any]) -> torch.dtype:
    """The dtype of a parameter's floating state tensors: the group's ``state_dtype`` for a float32
    parameter, else the parameter's own."""
    wanted = group.get("state_dtype", torch.float32)
    return wanted if param.dtype == torch.float32 else param.dtype


def cast_state(state: dict[str, Any], keys: tuple[str, ...], param: Tensor, dtype: torch.dtype) -> None:
    """Store the floating state tensors named by ``keys`` that are shaped like the param in ``dtype`` (in
    place of the dict's values); scalars kept in the state stay as they are."""
    for key in keys:
        value = state.get(key)
        if (
            isinstance(value, Tensor)
            and value.is_floating_point()
            and value.dtype != dtype
            and value.shape == param.shape
        ):
            state[key] = value.to(dtype)


def random_bits(numel: int, seed: int, device: torch.device | str = "cpu", offset: int = 0) -> Tensor:
    """16 random bits per element (int64 values in [0, 2¹⁶)): the lowbias32 hash of the element's index i
    (counted from ``offset``) plus the seed, x ← i·φ + seed, then x ^= x ≫ 16, x ·= m₁, x ^= x ≫ 15,
    x ·= m₂, x ^= x ≫ 15 (mod 2³²), its top 16 bits."""
    x = (torch.arange(offset, offset + numel, dtype=torch.int64, device=device) * _GOLDEN + seed) & _MASK32
    x ^= x >> 16
    x = (x * _HASH_MULTIPLIERS[0]) & _MASK32
    x ^= x >> 15
    x = (x * _HASH_MULTIPLIERS[1]) & _MASK32
    x ^= x >> 15
    return x >> 16


def round_stochastically(value: Tensor, seed: int, out: Tensor | None = None, offset: int = 0) -> Tensor:
    """``value`` (float32) rounded to bfloat16 stochastically, into ``out`` where given (bfloat16, the
    same shape): the 16 random bits of each element (:func:`random_bits`, its index counted from
    ``offset`` in ``value``'s logical order) are added to the low half of its bit pattern, which is then
    dropped. NaN stays NaN; ±inf stays ±inf. On the CPU the native runtime makes it one pass, writing
    into ``out`` where it is contiguous; :func:`round_stochastically_in_torch` otherwise, bit for bit the
    same."""
    module = runtime.ready()
    if module is not None and value.device.type == "cpu" and value.dtype == torch.float32:
        value = value.contiguous()
        target = out if out is not None and out.is_contiguous() else torch.empty(value.shape, dtype=torch.bfloat16)
        module.round_stochastically(value, target, seed & _MASK32, offset)
    else:
        target = round_stochastically_in_torch(value, seed, offset)
    if out is not None and target is not out:
        out.copy_(target)
        return out
    return target


def round_stochastically_in_torch(value: Tensor, seed: int, offset: int = 0) -> Tensor:
    """:func:`round_stochastically` in torch operations (any device; the reference of the native pass)."""
    bits = value.contiguous().view(torch.int32).to(torch.int64) & _MASK32
    noise = random_bits(value.numel(), seed, value.device, offset).view(value.shape)
    rounded = (bits + noise) >> 16
    rounded = torch.where(value.isnan(), (bits >> 16) | 0x40, rounded)  # a quiet NaN, not a carry into inf
    signed = torch.where(rounded >= 0x8000, rounded - 0x10000, rounded).to(torch.int16)
    return signed.view(torch.bfloat16)


def step_seed() -> int:
    """The seed of one step, drawn from torch's default CPU generator."""
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64).item())


def tensor_seed(base: int, index: int, slot: int) -> int:
    """The seed of one tensor of a step: the step's seed, the param's place in its group and the
    tensor's place in the update's arguments (0 the param, 1… the state), mixed."""
    return (base + (index * 0x10001 + slot + 1) * _GOLDEN) & _MASK32


#: The most elements of float32 copies one low-precision step holds at once: the group is updated in
#: chunks (a contiguous param larger than this in slices of its elements), so that the copies add
#: little to the peak memory, and memory the allocator just freed is reused for the next chunk.
CHUNK_ELEMENTS = 1 << 22


Run = Callable[["ScratchOptimizer", dict[str, Any], list[Tensor], Any], None]


def update(
    optimizer: ScratchOptimizer, group: dict[str, Any], params: list[Tensor], hyperparameters: Any, run: Run
) -> None:
    """One step of a low-precision group with the group's strategy (``run``, its ``update``): the
    strategy updates float32 copies of the bfloat16 tensors each param's update writes (a copy of the
    param, with a float32 gradient, where it is rounded stochastically), and each copy is written back
    rounded stochastically. Under ``loop`` this is the reference; ``fused`` runs its kernel on the
    copies. The roundings depend on the step's seed, the param's place in the group, the tensor and
    the element's index only, so the chunking changes no number."""
    from scratchopt.optimizer import ScratchOptimizer

    # Fresh state is made here, in its stored dtype, so that the copies below see it; an algorithm that
    # makes its state in its own bookkeeping (SGD) makes it on the copies, and it is stored after.
    makes_state = type(optimizer).init_state is not ScratchOptimizer.init_state
    states = []
    for param in params:
        state = optimizer.state[param]
        if not state and makes_state:
            state.update(optimizer.new_state(param, group))
        states.append(state)
    units: list[tuple[int, int, int]] = []  # (param index, first element, end), the end −1 for all of it
    for index, (param, state) in enumerate(zip(params, states, strict=True)):
        sliceable = param.is_contiguous() and all(
            t.is_contiguous() for t in state.values() if isinstance(t, Tensor) and t.shape == param.shape
        )
        if param.numel() <= CHUNK_ELEMENTS or not sliceable:
            units.append((index, 0, -1))
        else:
            units += [
                (index, lo, min(lo + CHUNK_ELEMENTS, param.numel())) for lo in range(0, param.numel(), CHUNK_ELEMENTS)
            ]
    # The scalars of a sliced param as they were before its first slice counts them (every slice after
    # the first counts a copy of these, which it then drops).
    before = {
        index: {
            k: v.clone() for k, v in states[index].items() if isinstance(v, Tensor) and v.shape != params[index].shape
        }
        for index, lo, _ in units
        if lo > 0
    }
    # What each param's state held before the step: a slice builds its copies from this, not from a
    # tensor an earlier slice of the same step has made (SGD's fresh momentum buffer).
    snapshots = [dict(state) for state in states]
    stochastic = bool(group.get("stochastic_rounding"))
    base = step_seed()
    start = 0
    while start < len(units):
        end, elements = start, 0
        while end < len(units) and (end == start or elements + _size(params, units[end]) <= CHUNK_ELEMENTS):
            elements += _size(params, units[end])
            end += 1
        chunk = units[start:end]
        _update_chunk(
            optimizer, group, params, states, snapshots, chunk, before, hyperparameters, run, stochastic, base
        )
        start = end


def _size(params: list[Tensor], unit: tuple[int, int, int]) -> int:
    index, lo, hi = unit
    return params[index].numel() if hi < 0 else hi - lo


def _part(tensor: Tensor, lo: int, hi: int) -> Tensor:
    """The whole tensor (hi < 0), or a slice of its elements (contiguous)."""
    return tensor if hi < 0 else tensor.view(-1)[lo:hi]


def _update_chunk(
    optimizer: ScratchOptimizer,
    group: dict[str, Any],
    params: list[Tensor],
    states: list[dict[str, Any]],
    snapshots: list[dict[str, Any]],
    units: list[tuple[int, int, int]],
    scalars_before: dict[int, dict[str, Tensor]],
    hyperparameters: Any,
    run: Run,
    stochastic: bool,
    base: int,
) -> None:
    keys = optimizer.state_keys
    shadows: list[Tensor] = []
    copied: list[set[str]] = []
    given: list[dict[str, Any]] = []
    for index, lo, hi in units:
        param = params[index]
        grad = param.grad
        assert grad is not None  # the dispatcher passes the params that have a gradient
        widen_param = stochastic and param.dtype == torch.bfloat16
        if widen_param:
            shadow = _part(param, lo, hi).float()
            shadow.grad = _part(grad, lo, hi).float()
        elif hi < 0:
            shadow = param
        else:
            shadow = _part(param.detach(), lo, hi)
            shadow.grad = _part(grad, lo, hi)
        snapshot = snapshots[index]
        copies = {
            key
            for key in keys
            if isinstance(snapshot.get(key), Tensor)
            and snapshot[key].dtype == torch.bfloat16
            and snapshot[key].shape == param.shape
            and (widen_param or param.dtype != torch.bfloat16)
        }
        shadow_state: dict[str, Any] = {}
        for key, value in snapshot.items():
            if key in copies:
                shadow_state[key] = _part(value, lo, hi).float()
            elif isinstance(value, Tensor) and value.shape == param.shape:
                shadow_state[key] = _part(value, lo, hi)
            elif isinstance(value, Tensor) and lo > 0:
                shadow_state[key] = scalars_before[index][key].clone()  # the first slice alone counts
            else:
                shadow_state[key] = value
        optimizer.state[shadow] = shadow_state
        shadows.append(shadow)
        copied.append(copies)
        given.append(dict(shadow_state))
    try:
        run(optimizer, group, shadows, hyperparameters)
    finally:
        for (index, lo, hi), shadow, copies, before in zip(units, shadows, copied, given, strict=True):
            param, state = params[index], states[index]
            updated = optimizer.state.pop(shadow)
            offset, size = max(lo, 0), _size(params, (index, lo, hi))
            for key, value in updated.items():
                seed = tensor_seed(base, index, keys.index(key) + 1 if key in keys else 0)
                if key in copies:
                    round_stochastically(value, seed, _part(state[key], lo, hi), offset)
                elif value is before.get(key):
                    continue  # unchanged, or a view of the stored tensor the update wrote through
                elif key in keys and isinstance(value, Tensor) and value.numel() == size and value.dim() > 0:
                    # state the algorithm's bookkeeping made (SGD's momentum buffer), stored like the rest
                    wanted = state_dtype_for(param, group) if shadow.dtype == param.dtype else param.dtype
                    stored = state.get(key)
                    if not (isinstance(stored, Tensor) and stored.shape == param.shape and stored.dtype == wanted):
                        stored = state[key] = torch.empty(param.shape, dtype=wanted, device=param.device)
                    if wanted == torch.bfloat16 and value.dtype == torch.float32:
                        round_stochastically(value, seed, _part(stored, lo, hi), offset)
                    else:
                        _part(stored, lo, hi).copy_(value.view(-1) if hi >= 0 else value)
                elif lo == 0:  # a scalar the step set (the first slice alone counts the param's step)
                    state[key] = value
            if shadow.dtype != param.dtype:
                round_stochastically(shadow, tensor_seed(base, index, 0), _part(param.detach(), lo, hi), offset)
            optimizer.state[param] = state
