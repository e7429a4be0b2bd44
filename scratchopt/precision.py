"""Low-precision optimizer state and stochastic rounding, for every elementwise algorithm.

Two settings of a param group, accepted by the constructor of every elementwise optimizer:

``state_dtype``
    ``torch.float32`` (the default: state in the parameter's dtype, as torch keeps it),
    ``torch.bfloat16``: the state tensors of a float32 parameter are kept in bfloat16, half the bytes,
    or ``"8bit"``: blockwise 8-bit (:mod:`scratchopt.quantization`), about a quarter, for the state
    tensors of float32 parameters of at least 4096 elements (smaller ones and an algorithm's weight-like
    state stay float32). The 8-bit state is dequantised for the update and quantised after it
    (deterministically: the codes nearest the new values).
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

The random bits of an element (:func:`random_bits`) depend on its index and a per-tensor seed only: its
block of 2¹⁶ elements reads a window of a fixed permutation of the 16-bit numbers (:func:`noise_table`)
that starts at a hash of the block's index and the seed. An element's bits are then uniform over all 2¹⁶
values as the seed varies, so the rounding is unbiased, and a kernel needs one load per element, not a
hash. The seeds of a step are drawn once from torch's default CPU generator, so ``torch.manual_seed``
makes a run reproducible, and the native kernels, which read the same table, give the same roundings
as this eager reference.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
import threading
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from scratchopt import quantization
from scratchopt.distributed.dtensor import global_offset, holds_whole_rows, is_dtensor, local, placements, sharded_like
from scratchopt.strategies.kernels import runtime

if TYPE_CHECKING:
    from scratchopt.optimizer import ScratchOptimizer

#: ``state_dtype="8bit"``: blockwise 8-bit state (:mod:`scratchopt.quantization`).
EIGHT_BIT = "8bit"
#: The values ``state_dtype`` accepts.
STATE_DTYPES: tuple[torch.dtype | str, ...] = (torch.float32, torch.bfloat16, EIGHT_BIT)
DEFAULTS: dict[str, Any] = {"state_dtype": torch.float32, "stochastic_rounding": False}
ANNOTATIONS: dict[str, str] = {"state_dtype": "torch.dtype | str", "stochastic_rounding": "bool"}
_MASK32 = 0xFFFFFFFF
#: Multipliers of the hash (below 2³¹, so that every product of a 32-bit value fits in an int64).
_HASH_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)
_GOLDEN = 0x9E3779B1


def check(cls_name: str, elementwise: bool, state_dtype: Any, stochastic_rounding: Any) -> None:
    """Refuse a setting this optimizer cannot honour, naming the argument."""
    if not any(state_dtype is d or (isinstance(d, str) and state_dtype == d) for d in STATE_DTYPES):
        raise ValueError(
            f"{cls_name}: state_dtype={state_dtype!r} is not supported; choose one of "
            f"{', '.join(map(repr, STATE_DTYPES))}"
        )
    if not isinstance(stochastic_rounding, bool):
        raise TypeError(f"{cls_name}: stochastic_rounding must be a bool, not {type(stochastic_rounding).__name__}")
    if not elementwise and (state_dtype != torch.float32 or stochastic_rounding):
        raise ValueError(
            f"{cls_name} is not elementwise: state_dtype and stochastic_rounding apply to elementwise "
            "algorithms only (their update is widened to float32 element by element)"
        )


def check_params(optimizer: Any, group: dict[str, Any], params: list[Tensor]) -> None:
    """Refuse, before anything changes, a parameter a low-precision step cannot take: a DTensor whose
    8-bit state could not be sharded like it (one sharded along another dimension than its first)."""
    from scratchopt.step_checks import describe

    for param in params:
        if is_dtensor(param) and state_dtype_for(param, group) == EIGHT_BIT and not holds_whole_rows(param):
            raise NotImplementedError(
                f"{type(optimizer).__name__}: {describe(optimizer, param)} is a DTensor placed "
                f"{placements(param)}; 8-bit state is kept row by row, for parameters sharded along their "
                "first dimension (Shard(0), FSDP2's default) or replicated"
            )


def is_low(group: dict[str, Any]) -> bool:
    """Whether the group keeps low-precision state or rounds stochastically."""
    return group.get("state_dtype", torch.float32) != torch.float32 or bool(group.get("stochastic_rounding"))


def state_dtype_for(param: Tensor, group: dict[str, Any]) -> torch.dtype | str:
    """How a parameter's floating state tensors are kept: the group's ``state_dtype`` for a float32
    parameter (``"8bit"`` only from :data:`~scratchopt.quantization.MIN_NUMEL` elements on, float32
    below, and for a DTensor only where it has two dimensions or more), else the parameter's own dtype.
    A DTensor's size is the whole tensor's, so every rank decides alike."""
    wanted = group.get("state_dtype", torch.float32)
    if param.dtype != torch.float32:
        return param.dtype
    if wanted == EIGHT_BIT and (param.numel() < quantization.MIN_NUMEL or (is_dtensor(param) and param.dim() < 2)):
        return torch.float32  # a sharded vector has no rows to keep its state by
    return wanted


def stored_dtype(kept: torch.dtype | str) -> torch.dtype:
    """The dtype of the tensor a state kept as ``kept`` is stored in (uint8 for 8-bit)."""
    return torch.uint8 if kept == EIGHT_BIT else kept  # type: ignore[return-value]


def signed(key: str, nonnegative: Collection[str]) -> bool:
    """Whether state ``key`` takes the signed dynamic map (``nonnegative``: the algorithm's keys that
    never hold a negative value, its second moments)."""
    return key not in nonnegative


def kept_as(optimizer: Any, key: str, kept: torch.dtype | str) -> torch.dtype | str:
    """How state ``key`` is kept where the param's state is kept as ``kept``: an algorithm's weight-like
    state (an iterate such as Schedule-Free's z, :attr:`~scratchopt.optimizer.ScratchOptimizer.weight_like_state`)
    stays float32 under 8-bit."""
    if kept == EIGHT_BIT and key in getattr(optimizer, "weight_like_state", ()):
        return torch.float32
    return kept


def cast_state(
    state: dict[str, Any],
    keys: tuple[str, ...],
    param: Tensor,
    dtype: torch.dtype | str,
    optimizer: Any = None,
    rows: bool = False,
) -> None:
    """Store the floating state tensors named by ``keys`` that are shaped like the param as ``dtype``
    (a torch dtype, or ``"8bit"``: packed by :mod:`~scratchopt.quantization`, row by row where ``rows``),
    in place of the dict's values; a packed tensor (or its bytes cast to a float dtype by
    ``load_state_dict``) is unpacked first where ``dtype`` is not 8-bit; scalars kept in the state stay as
    they are. ``optimizer``: the algorithm's state layout (its nonnegative and weight-like keys). A
    DTensor's state is cast shard by shard, 8-bit row by row (:func:`_cast_sharded_state`)."""
    if is_dtensor(param):
        _cast_sharded_state(state, keys, param, dtype, optimizer)
        return
    nonnegative = getattr(optimizer, "nonnegative_state", ())
    wanted = dtype
    for key in keys:
        value = state.get(key)
        if not isinstance(value, Tensor):
            continue
        dtype = kept_as(optimizer, key, wanted)
        if quantization.is_packed(value, param):
            if dtype == EIGHT_BIT:
                if value.dtype != torch.uint8:
                    state[key] = value.to(torch.uint8)  # byte values, exact in any float dtype
                continue
            value = unpacked(value.to(torch.uint8), param, signed(key, nonnegative))
            state[key] = value
        if not (value.is_floating_point() and value.shape == param.shape):
            continue
        if dtype == EIGHT_BIT and rows:
            packed = torch.empty(quantization.rows_shape(param.shape), dtype=torch.uint8, device=param.device)
            quantization.quantize_rows(value.float().reshape(param.shape[0], -1), packed, signed(key, nonnegative))
            state[key] = packed
            _freed(value.numel() * value.element_size())
        elif dtype == EIGHT_BIT:
            state[key] = quantization.quantize(value.float().contiguous(), signed(key, nonnegative))
            _freed(value.numel() * value.element_size())
        elif value.dtype != dtype:
            state[key] = value.to(dtype)
            _freed(value.numel() * value.element_size())


def unpacked(packed: Tensor, param: Tensor, signed: bool) -> Tensor:
    """The float32 values, shaped like ``param``, of a packed state tensor of it (uint8; flat or row by
    row, :mod:`~scratchopt.quantization`)."""
    if quantization.is_packed_by_rows(packed, param):
        return quantization.dequantize_rows(packed, param.numel() // param.shape[0], signed).reshape(param.shape)
    return quantization.dequantize(packed, param.numel(), signed).view(param.shape)


def _unpacked_whole(packed: Tensor, param: Tensor, signed: bool) -> Tensor:
    """:func:`unpacked`, for a DTensor shard by shard (placed like its param)."""
    if not is_dtensor(param):
        return unpacked(packed, param, signed)
    return sharded_like(unpacked(local(packed), local(param.detach()), signed), param)


def _cast_sharded_state(
    state: dict[str, Any], keys: tuple[str, ...], param: Tensor, dtype: torch.dtype | str, optimizer: Any
) -> None:
    """:func:`cast_state` for a DTensor param: each state DTensor's local shard is cast, and the result
    placed like the param, 8-bit state as a DTensor of the row-by-row storage, so that its rows shard as
    the param's do."""
    shard = local(param.detach())
    shards = {key: local(value) for key, value in state.items() if key in keys and is_dtensor(value)}
    given = dict(shards)
    cast_state(shards, keys, shard, dtype, optimizer, rows=True)
    for key, value in shards.items():
        if value is not given[key]:
            whole = None if value.shape == shard.shape else quantization.rows_shape(param.shape)
            state[key] = sharded_like(value, param, whole)


#: Bytes of state freed after narrowing it, after which the freed heap pages go back to the OS.
RELEASE_BYTES = 8 << 20
_FREED = [0]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None with another C library."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _freed(nbytes: int) -> None:
    """Count the bytes of a state tensor that a low-precision one replaced. Each param's first step makes
    its state in float32 (the algorithm's ``init_state``) and narrows it: the short-lived float32 tensors
    and the long-lived narrow ones alternate on the heap, and the holes they leave stay resident (about
    as much again as the packed state, for a model of many mid-sized layers). Every :data:`RELEASE_BYTES`
    freed, glibc is asked to return the free pages."""
    _FREED[0] += nbytes
    if _FREED[0] >= RELEASE_BYTES:
        _FREED[0] = 0
        release_free_heap()


def release_free_heap() -> None:
    """Ask glibc to return the heap's free pages to the OS (after building a table whose temporaries
    leave megabytes of freed heap resident); nothing with another C library."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def hash16(index: Tensor, seed: int) -> Tensor:
    """The top 16 bits of the lowbias32 hash of ``index``·φ + ``seed``: x ← i·φ + seed, then x ^= x ≫ 16,
    x ·= m₁, x ^= x ≫ 15, x ·= m₂, x ^= x ≫ 15 (mod 2³²) (int64 values in [0, 2¹⁶))."""
    x = (index * _GOLDEN + seed) & _MASK32
    x ^= x >> 16
    x = (x * _HASH_MULTIPLIERS[0]) & _MASK32
    x ^= x >> 15
    x = (x * _HASH_MULTIPLIERS[1]) & _MASK32
    x ^= x >> 15
    return x >> 16


#: Elements per block of :func:`random_bits`: the length of the permutation it reads.
NOISE_BLOCK = 1 << 16
_NOISE: list[Tensor] = []


def noise_table() -> Tensor:
    """The permutation of 0 … 2¹⁶−1 that random bits are read from (int64): the numbers k ordered by the
    whole 32-bit lowbias32 hash of k·φ (:func:`hash16` before its last shift), a bijection, so no two
    tie."""
    if not _NOISE:
        index = torch.arange(NOISE_BLOCK, dtype=torch.int64)
        x = (index * _GOLDEN) & _MASK32
        x ^= x >> 16
        x = (x * _HASH_MULTIPLIERS[0]) & _MASK32
        x ^= x >> 15
        x = (x * _HASH_MULTIPLIERS[1]) & _MASK32
        x ^= x >> 15
        table = torch.argsort(x)
        _NOISE.append(table)
        # Twice over, as 16-bit numbers: what a native kernel reads (a window of 2¹⁶ from any start).
        doubled = torch.cat([table, table])
        _NOISE.append(torch.where(doubled >= 0x8000, doubled - 0x10000, doubled).to(torch.int16))
        release_free_heap()
    return _NOISE[0]


def native_noise() -> Tensor:
    """:func:`noise_table` twice over as 16-bit numbers (int16 bit patterns), for the native kernels."""
    noise_table()
    return _NOISE[1]


def random_bits(numel: int, seed: int, device: torch.device | str = "cpu", offset: int = 0) -> Tensor:
    """16 random bits per element (int64 values in [0, 2¹⁶)). Element i (counted from ``offset``) of
    block b = i ≫ 16 reads entry (o_b + i) mod 2¹⁶ of :func:`noise_table`, where o_b = hash16(b, seed):
    every value once per block, and, over seeds, each value equally likely at every element."""
    index = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    start = hash16(index >> 16, seed)
    return noise_table().to(device)[(start + index) & (NOISE_BLOCK - 1)]


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
        module.round_stochastically(value, target, seed & _MASK32, offset, native_noise())
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
#: little to the peak memory and stay in the caches between widening, update and narrowing. A multiple
#: of the 8-bit block.
CHUNK_ELEMENTS = 1 << 20

_SCRATCH = threading.local()


def _scratch(numel: int, device: torch.device) -> Tensor:
    """A float32 buffer of at least ``numel`` elements, kept per thread and device between steps: the
    dequantised copies of a chunk live in it (a fresh allocation of that size costs its page faults on
    every chunk)."""
    pool: dict[torch.device, Tensor] = getattr(_SCRATCH, "pool", None) or {}
    _SCRATCH.pool = pool
    buffer = pool.get(device)
    if buffer is None or buffer.numel() < numel:
        buffer = pool[device] = torch.empty(numel, dtype=torch.float32, device=device)
    return buffer


Run = Callable[..., None]


def rounds_stochastically(group: dict[str, Any]) -> bool:
    """Whether a step of the group rounds stochastically (bfloat16 state, or stochastic rounding of
    bfloat16 params), and so draws a seed from torch's generator; 8-bit state alone draws none."""
    return group.get("state_dtype", torch.float32) == torch.bfloat16 or bool(group.get("stochastic_rounding"))


def low_mode(optimizer: Any, group: dict[str, Any]) -> int:
    """What a native kernel of the group keeps in low precision (the native runtime's ``low``): bit 0, a
    float32 param's state tensors in bfloat16 (``state_dtype=torch.bfloat16``); bit 1, bfloat16 params
    trained with stochastic rounding; bit 2, 8-bit state, with bit 8 + i set where state key i is packed
    (in the params of :data:`~scratchopt.quantization.MIN_NUMEL` elements or more)."""
    wanted = group.get("state_dtype", torch.float32)
    mode = (wanted == torch.bfloat16) | (bool(group.get("stochastic_rounding")) << 1)
    if wanted == EIGHT_BIT:
        keys = optimizer.state_keys
        mode |= 4 | sum(1 << (8 + i) for i, key in enumerate(keys) if kept_as(optimizer, key, wanted) == EIGHT_BIT)
    return mode


def update(
    optimizer: ScratchOptimizer,
    group: dict[str, Any],
    params: list[Tensor],
    hyperparameters: Any,
    run: Run,
    base: int | None = None,
    counted: list[dict[str, Any]] | None = None,
    layouts: list[Layout] | None = None,
) -> None:
    """One step of a low-precision group with the group's strategy (``run``, its ``update``): the
    strategy updates float32 copies of the bfloat16 tensors each param's update writes (a copy of the
    param, with a float32 gradient, where it is rounded stochastically), and each copy is written back
    rounded stochastically. Under ``loop`` this is the reference; ``fused`` takes the group natively
    where it can (the kernel widens and rounds in place, bit for bit this) and runs its kernel on the
    copies here where it cannot. The roundings depend on the step's seed, the param's place in the group, the tensor and
    the element's index only, so the chunking changes no number.

    ``base``: the step's seed where the caller drew it; ``counted``: each param's arguments where the
    caller has counted the steps already (``run`` then takes the chunk's as a fifth argument). A group of
    DTensors is updated shard by shard (:func:`_update_shards`); ``layouts`` are then what the whole
    tensors say of each shard.
    """
    from scratchopt.optimizer import ScratchOptimizer

    if layouts is None and any(is_dtensor(p) for p in params):
        _update_shards(optimizer, group, params, hyperparameters, run, base, counted)
        return

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
        sliceable = (
            param.is_contiguous()
            and all(t.is_contiguous() for t in state.values() if isinstance(t, Tensor) and t.shape == param.shape)
            and not (layouts is not None and layouts[index].rows and layouts[index].kept == EIGHT_BIT)
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
            k: v.clone()
            for k, v in states[index].items()
            if isinstance(v, Tensor) and v.shape != params[index].shape and not quantization.is_packed(v, params[index])
        }
        for index, lo, _ in units
        if lo > 0
    }
    # What each param's state held before the step: a slice builds its copies from this, not from a
    # tensor an earlier slice of the same step has made (SGD's fresh momentum buffer).
    snapshots = [dict(state) for state in states]
    stochastic = bool(group.get("stochastic_rounding"))
    if base is None:
        base = step_seed() if rounds_stochastically(group) else 0
    start = 0
    while start < len(units):
        end, elements = start, 0
        while end < len(units) and (end == start or elements + _size(params, units[end]) <= CHUNK_ELEMENTS):
            elements += _size(params, units[end])
            end += 1
        chunk = units[start:end]
        chunk_run = run
        if counted is not None:
            values = [counted[index] for index, _, _ in chunk]

            def chunk_run(o: Any, g: dict[str, Any], shadows: list[Tensor], h: Any, values: Any = values) -> None:
                run(o, g, shadows, h, values)

        _update_chunk(
            optimizer,
            group,
            params,
            states,
            snapshots,
            chunk,
            before,
            hyperparameters,
            chunk_run,
            stochastic,
            base,
            layouts or [Layout(state_dtype_for(p, group)) for p in params],
        )
        start = end


class Layout(NamedTuple):
    """What a param's whole tensor says of the tensor a step updates: how its state is kept (``kept``,
    :func:`state_dtype_for`), whether 8-bit state is kept row by row (``rows``), and where the tensor
    starts in the whole (``offset``, the index its elements' random bits count from)."""

    kept: torch.dtype | str
    rows: bool = False
    offset: int = 0


def _update_shards(
    optimizer: ScratchOptimizer,
    group: dict[str, Any],
    params: list[Tensor],
    hyperparameters: Any,
    run: Run,
    base: int | None,
    counted: list[dict[str, Any]] | None,
) -> None:
    """:func:`update` of a group of DTensors (FSDP2's sharded params): the update of each local shard is
    the update of the whole tensor, so the step runs on the shards, their gradients and their state's
    shards, with what only the whole tensor says (:class:`Layout`): how its state is kept (decided by
    the whole param's size, so alike on every rank), 8-bit state row by row, and where the shard starts,
    so that its random bits are the whole tensor's and a sharded run rounds as an unsharded one. State
    the step makes is placed like its param."""
    from scratchopt.optimizer import ScratchOptimizer

    makes_state = type(optimizer).init_state is not ScratchOptimizer.init_state
    shards: list[Tensor] = []
    given: list[dict[str, Any]] = []
    layouts: list[Layout] = []
    for param in params:
        state = optimizer.state[param]
        if not state and makes_state:
            state.update(optimizer.new_state(param, group))
        shard = local(param.detach())
        shard.grad = local(param.grad)  # type: ignore[arg-type]  # the dispatcher passes params with a gradient
        shard_state = {key: local(value) if is_dtensor(value) else value for key, value in state.items()}
        optimizer.state[shard] = shard_state
        shards.append(shard)
        given.append(dict(shard_state))
        layouts.append(
            Layout(state_dtype_for(param, group), is_dtensor(param) and param.dim() >= 2, global_offset(param))
        )
    try:
        update(optimizer, group, shards, hyperparameters, run, base, counted, layouts)
    finally:
        for param, shard, before in zip(params, shards, given, strict=True):
            updated = optimizer.state.pop(shard, {})
            state = optimizer.state[param]
            for key, value in updated.items():
                if value is before.get(key):
                    continue
                if isinstance(value, Tensor) and value.dim() > 0:
                    whole = None if value.shape == shard.shape else quantization.rows_shape(param.shape)
                    state[key] = sharded_like(value, param, whole)
                else:
                    state[key] = value


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
    layouts: list[Layout],
) -> None:
    keys = optimizer.state_keys
    shadows: list[Tensor] = []
    copied: list[set[str]] = []
    given: list[dict[str, Any]] = []
    packed_elements = sum(
        _size(params, unit)
        for unit in units
        for value in snapshots[unit[0]].values()
        if isinstance(value, Tensor) and value.dtype == torch.uint8 and quantization.is_packed(value, params[unit[0]])
    )
    scratch = _scratch(packed_elements, params[units[0][0]].device) if packed_elements else None
    used = 0
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
        # 8-bit state: dequantised for the update, quantised again after it.
        copies |= {
            key
            for key in keys
            if isinstance(snapshot.get(key), Tensor)
            and snapshot[key].dtype == torch.uint8
            and quantization.is_packed(snapshot[key], param)
        }
        shadow_state: dict[str, Any] = {}
        for key, value in snapshot.items():
            if key in copies and value.dtype == torch.uint8:
                assert scratch is not None
                first, end = (0, param.numel()) if hi < 0 else (lo, hi)
                values = scratch[used : used + end - first]
                used += end - first
                if quantization.is_packed_by_rows(value, param):  # never sliced
                    values.view(param.shape).copy_(unpacked(value, param, signed(key, optimizer.nonnegative_state)))
                else:
                    quantization.dequantize_part(
                        value, param.numel(), first, end, signed(key, optimizer.nonnegative_state), out=values
                    )
                shadow_state[key] = values.view(param.shape) if hi < 0 else values
            elif key in copies:
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
            layout = layouts[index]
            for key, value in updated.items():
                seed = tensor_seed(base, index, keys.index(key) + 1 if key in keys else 0)
                if key in copies and quantization.is_packed_by_rows(state[key], param):
                    quantization.quantize_rows(
                        value.reshape(param.shape[0], -1), state[key], signed(key, optimizer.nonnegative_state)
                    )
                elif key in copies and state[key].dtype == torch.uint8:
                    quantization.quantize_part(
                        value, state[key], param.numel(), offset, signed(key, optimizer.nonnegative_state)
                    )
                elif key in copies:
                    round_stochastically(value, seed, _part(state[key], lo, hi), layout.offset + offset)
                elif value is before.get(key):
                    continue  # unchanged, or a view of the stored tensor the update wrote through
                elif key in keys and isinstance(value, Tensor) and value.numel() == size and value.dim() > 0:
                    # state the algorithm's bookkeeping made (SGD's momentum buffer), stored like the rest
                    wanted = kept_as(optimizer, key, layout.kept) if shadow.dtype == param.dtype else param.dtype
                    stored = state.get(key)
                    if wanted == EIGHT_BIT and layout.rows:
                        if not (isinstance(stored, Tensor) and stored.dtype == torch.uint8):
                            stored = state[key] = torch.empty(
                                quantization.rows_shape(param.shape), dtype=torch.uint8, device=param.device
                            )
                        quantization.quantize_rows(
                            value.float().reshape(param.shape[0], -1), stored, signed(key, optimizer.nonnegative_state)
                        )
                        continue
                    if wanted == EIGHT_BIT:
                        if not (isinstance(stored, Tensor) and stored.dtype == torch.uint8):
                            stored = state[key] = torch.empty(
                                quantization.packed_numel(param.numel()), dtype=torch.uint8, device=param.device
                            )
                        quantization.quantize_part(
                            value.float(), stored, param.numel(), offset, signed(key, optimizer.nonnegative_state)
                        )
                        continue
                    if not (isinstance(stored, Tensor) and stored.shape == param.shape and stored.dtype == wanted):
                        stored = state[key] = torch.empty(param.shape, dtype=wanted, device=param.device)  # type: ignore[arg-type]
                    if wanted == torch.bfloat16 and value.dtype == torch.float32:
                        round_stochastically(value, seed, _part(stored, lo, hi), layout.offset + offset)
                    else:
                        _part(stored, lo, hi).copy_(value.view(-1) if hi >= 0 else value)
                elif lo == 0:  # a scalar the step set (the first slice alone counts the param's step)
                    state[key] = value
            if shadow.dtype != param.dtype:
                round_stochastically(
                    shadow, tensor_seed(base, index, 0), _part(param.detach(), lo, hi), layout.offset + offset
                )
            optimizer.state[param] = state


def float32_state_dict(optimizer: ScratchOptimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every state tensor kept in low precision (bfloat16, or 8-bit
    packed) as a float32 tensor shaped like its param, and the groups without ``state_dtype`` and
    ``stochastic_rounding``: what ``torch.optim``'s optimizer of the same algorithm loads. The way back
    is ``load_state_dict`` of such a dict into a scratchopt optimizer built with the low-precision
    settings, which stores the state as they say."""
    state_dict = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[Any, dict[str, Any]] = {}
    for index, saved in state_dict["state"].items():
        param = params[index]
        converted = dict(saved)
        for key in optimizer.state_keys:
            value = saved.get(key)
            if not isinstance(value, Tensor) or param.dtype != torch.float32:
                continue
            if value.dtype == torch.uint8 and quantization.is_packed(value, param):
                converted[key] = _unpacked_whole(value, param, signed(key, optimizer.nonnegative_state))
            elif value.dtype == torch.bfloat16 and value.shape == param.shape:
                converted[key] = value.float()
        state[index] = converted
    groups = [{k: v for k, v in group.items() if k not in DEFAULTS} for group in state_dict["param_groups"]]
    return {**state_dict, "state": state, "param_groups": groups}
