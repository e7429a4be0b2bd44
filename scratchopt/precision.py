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


def random_bits(numel: int, seed: int, device: torch.device | str = "cpu") -> Tensor:
    """16 random bits per element (int64 values in [0, 2¹⁶)): the lowbias32 hash of the element's index
    plus the seed, x ← i·φ + seed, then x ^= x ≫ 16, x ·= m₁, x ^= x ≫ 15, x ·= m₂, x ^= x ≫ 15 (mod 2³²),
    its top 16 bits."""
    x = (torch.arange(numel, dtype=torch.int64, device=device) * _GOLDEN + seed) & _MASK32
    x ^= x >> 16
    x = (x * _HASH_MULTIPLIERS[0]) & _MASK32
    x ^= x >> 15
    x = (x * _HASH_MULTIPLIERS[1]) & _MASK32
    x ^= x >> 15
    return x >> 16


def round_stochastically(value: Tensor, seed: int) -> Tensor:
    """``value`` (float32) rounded to bfloat16 stochastically: the 16 random bits are added to the low
    half of its bit pattern, which is then dropped. NaN stays NaN; ±inf stays ±inf. On the CPU the native
    runtime computes it in one pass where it is built; :func:`round_stochastically_in_torch` otherwise,
    bit for bit the same."""
    module = runtime.ready()
    if module is not None and value.device.type == "cpu" and value.dtype == torch.float32:
        value = value.contiguous()
        out = torch.empty(value.shape, dtype=torch.bfloat16)
        module.round_stochastically(value, out, seed & _MASK32)
        return out
    return round_stochastically_in_torch(value, seed)


def round_stochastically_in_torch(value: Tensor, seed: int) -> Tensor:
    """:func:`round_stochastically` in torch operations (any device; the reference of the native pass)."""
    bits = value.contiguous().view(torch.int32).to(torch.int64) & _MASK32
    rounded = (bits + random_bits(value.numel(), seed, value.device).view(value.shape)) >> 16
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


def update(optimizer: ScratchOptimizer, group: dict[str, Any], params: list[Tensor], hyperparameters: Any) -> None:
    """One step of a low-precision group: per parameter, the update on float32 copies of its bfloat16
    tensors, each written back rounded stochastically (the reference every faster path matches)."""
    from scratchopt.strategies.base import count_step, state_tensors

    stochastic = bool(group.get("stochastic_rounding"))
    base = step_seed()
    for index, param in enumerate(params):
        values = count_step(optimizer, param, group)
        # State an algorithm's own bookkeeping created (SGD's momentum buffer) is stored like the rest.
        cast_state(optimizer.state[param], optimizer.state_keys, param, state_dtype_for(param, group))
        state = state_tensors(optimizer, param)
        widen_param = stochastic and param.dtype == torch.bfloat16
        work_param = param.float() if widen_param else param
        grad = param.grad
        assert grad is not None  # the dispatcher passes the params that have a gradient
        work_grad = grad.float() if widen_param else grad
        work_state = [
            t.float() if t is not None and t.dtype == torch.bfloat16 and (widen_param or param.dtype != t.dtype) else t
            for t in state
        ]
        optimizer.update(work_param, work_grad, *work_state, **hyperparameters, **values)
        if widen_param:
            param.copy_(round_stochastically(work_param, tensor_seed(base, index, 0)))
        for slot, (stored, work) in enumerate(zip(state, work_state, strict=True), start=1):
            if stored is not None and work is not None and work is not stored:
                stored.copy_(round_stochastically(work, tensor_seed(base, index, slot)))
