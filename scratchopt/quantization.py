"""Blockwise 8-bit quantisation of optimizer state (Dettmers et al. 2022, "8-bit Optimizers via
Block-wise Quantization", arXiv 2110.02861).

A tensor of n float32 values, in its row-major order, is cut into blocks of :data:`BLOCK` = 256 elements
(the last one shorter). Each block b keeps its absolute maximum a_b in float32 and each element one code
c_i ∈ {0 … 255}, the index of the value of the *dynamic map* M (:func:`dynamic_map`) nearest to x_i / a_b:

    a_b = max_{i ∈ b} |x_i|,        c_i = #{k : m_k ≤ x_i / a_b},        x̂_i = M[c_i] · a_b,

where m_k = (M[k] + M[k + 1]) / 2 are the 255 midpoints between neighbouring map values (a value on a
midpoint takes the larger code), every operation in float32. A block of zeros has a_b = 0 and
dequantises to zeros; a block holding a NaN or an infinity has a_b = NaN and dequantises to NaN
throughout (the step that made it was already not finite).

The dynamic map (the paper's "dynamic tree quantization", generalised from Dettmers 2015, arXiv
1511.04561) spends its codes by decade: for e = 0 … 6 it holds the midpoints of 2ᵉ equal steps between
0.1 and 1 (2ᵉ⁺¹ without a sign bit), scaled by 10^(e − 6), and their negatives in the signed map; and 0
and 1. So the relative error is about the same from 10⁻⁷ to 1 of the block's maximum. The unsigned map
is for state that is never negative (second moments): one more bit of fraction.

Storage (:func:`quantize`): one flat uint8 tensor of n + 4·⌈n / 256⌉ bytes, the n codes followed by the
blocks' a_b as float32 (the machine's byte order, little-endian here), kept under the state's own key
(``exp_avg``…), so ``torch.save`` and ``torch.load(weights_only=True)`` take it as any tensor.

Row by row (:func:`quantize_rows`), for the state of a parameter FSDP2 shards along its first dimension:
a parameter of shape (R, …) with K elements per row keeps a uint8 tensor of shape (R, K + 4·⌈K / 256⌉),
each row the flat storage above of that row's K values. Its rows are sharded like the parameter's, so
every rank quantises its own rows, the numbers do not depend on the number of ranks, and
``torch.distributed.checkpoint`` saves and reshards it as any tensor. Where K is a multiple of 256 the
blocks are those of the flat storage and so are the codes.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

#: Elements per block, each with its own absolute maximum.
BLOCK = 256
#: Tensors with fewer elements stay in float32: the per-tensor overhead outweighs the bytes saved.
MIN_NUMEL = 4096
#: Exponent bits of the dynamic map: its values span 10⁻⁷ to 1.
EXPONENTS = 7


@functools.cache
def dynamic_map(signed: bool = True) -> Tensor:
    """The 256 values of the dynamic map, sorted (float32): for each decade e = 0 … 6 the midpoints of a
    linear grid of 2ᵉ (signed) or 2ᵉ⁺¹ (unsigned) steps over [0.1, 1], scaled by 10^(e − 6); the signed
    map adds their negatives; both add 0 and 1."""
    values: list[float] = [0.0, 1.0]
    for e in range(EXPONENTS):
        steps = 2**e if signed else 2 ** (e + 1)
        edges = torch.linspace(0.1, 1.0, steps + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10.0 ** (e - (EXPONENTS - 1))) * means
        values += scaled.tolist()
        if signed:
            values += (-scaled).tolist()
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def midpoints(signed: bool = True) -> Tensor:
    """The 255 float32 midpoints between neighbouring values of :func:`dynamic_map`."""
    m = dynamic_map(signed)
    return (m[:-1] + m[1:]) / 2.0


def blocks_of(numel: int) -> int:
    return -(-numel // BLOCK)


def packed_numel(numel: int) -> int:
    """Bytes of the packed form of ``numel`` values: the codes and a float32 maximum per block."""
    return numel + 4 * blocks_of(numel)


def codes_of(packed: Tensor, numel: int) -> Tensor:
    """The codes of a packed tensor (a view, uint8)."""
    return packed[:numel]


def absmax_of(packed: Tensor, numel: int) -> Tensor:
    """The blocks' absolute maxima of a packed tensor (float32; a copy, as the bytes need not be aligned)."""
    return packed[numel : packed_numel(numel)].clone().view(torch.float32)


def _absmax(values: Tensor) -> tuple[Tensor, Tensor]:
    """Each block's absolute maximum, NaN where the block holds a NaN or an infinity."""
    n = values.numel()
    padded = torch.nn.functional.pad(values.reshape(-1), (0, blocks_of(n) * BLOCK - n)).view(-1, BLOCK)
    absmax = padded.abs().amax(dim=1)
    return torch.where(padded.isfinite().all(dim=1), absmax, torch.full_like(absmax, float("nan"))), padded


def quantize_in_torch(values: Tensor, signed: bool = True) -> Tensor:
    """The packed form of ``values`` (float32, any shape, row-major order): the definition, in torch
    operations."""
    n = values.numel()
    absmax, padded = _absmax(values.float())
    divisor = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # NaN stays NaN: codes from 0
    normalized = torch.where(absmax.isnan()[:, None], torch.zeros_like(padded), padded / divisor[:, None])
    codes = torch.searchsorted(midpoints(signed), normalized.reshape(-1), right=True)[:n].to(torch.uint8)
    return torch.cat([codes, absmax.view(torch.uint8)])


def dequantize_in_torch(packed: Tensor, numel: int, signed: bool = True) -> Tensor:
    """The float32 values of a packed tensor (flat): M[c_i] · a_b."""
    codes = codes_of(packed, numel).to(torch.int64)
    absmax = absmax_of(packed, numel)
    return dynamic_map(signed)[codes] * absmax.repeat_interleave(BLOCK)[:numel]


@functools.cache
def lookup_table(signed: bool = True) -> Tensor:
    """What the native quantiser reads for a value v = x / a_b: one int32 per value of the top 16 bits of
    v's float32 pattern (its sign, exponent and 7 fraction bits), so that one load gives the code. Entry
    = c | t ≪ 8, where c is the code of the smallest float with those top bits and t says where the one
    midpoint among the floats with those bits lies: v's code is c + 1 when k ≥ t, with k the low 16 bits
    of v's pattern (flipped for a negative v, so that k grows with v), else c; t = 2¹⁶ where no midpoint
    lies among them. No 2⁻⁷-wide bucket of [−1, 1] holds two midpoints of the map (asserted)."""
    mids = midpoints(signed)
    patterns = torch.arange(1 << 16, dtype=torch.int64)
    negative = patterns >= 0x8000
    # The smallest float of each bucket: the low bits 0 for a positive number, all ones for a negative.
    smallest = _floats((patterns << 16) | torch.where(negative, 0xFFFF, 0))
    largest = _floats((patterns << 16) | torch.where(negative, 0, 0xFFFF))
    usable = smallest.isfinite() & largest.isfinite()
    first = torch.searchsorted(mids, torch.where(usable, smallest, 0.0), right=True)
    last = torch.searchsorted(mids, torch.where(usable, largest, 0.0), right=True)
    inside = usable & (smallest.abs() <= 1) & (largest.abs() <= 1)
    assert bool(((last - first)[inside] <= 1).all()), "a bucket holds two midpoints"
    # The midpoint above the first code, where it lies in the bucket (it has the bucket's top bits).
    has = (last > first) & usable
    above = mids[first.clamp(max=mids.numel() - 1)]
    bits = above.view(torch.int32).to(torch.int64) & 0xFFFF
    threshold = torch.where(negative, 0xFFFF - bits, bits)
    threshold = torch.where(has, threshold, torch.full_like(threshold, 1 << 16))
    return (first | (threshold << 8)).to(torch.int32)


@functools.cache
def native_tables() -> Tensor:
    """What a generated kernel with 8-bit state reads (int32, contiguous): the signed and the unsigned
    :func:`dynamic_map` (256 float32 each, as their bit patterns), their :func:`lookup_table` (65536
    entries each)."""
    from scratchopt.precision import release_free_heap

    maps = torch.cat([dynamic_map(True), dynamic_map(False)]).view(torch.int32)
    tables = torch.cat([maps, lookup_table(True), lookup_table(False)]).contiguous()
    release_free_heap()  # the lookups' temporaries
    return tables


def _floats(bits: Tensor) -> Tensor:
    """The float32 numbers of 32-bit patterns given as int64."""
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


def rows_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The shape of the row-by-row storage of a tensor of ``shape`` (two or more dimensions)."""
    rows = shape[0]
    per_row = 1
    for size in shape[1:]:
        per_row *= size
    return rows, packed_numel(per_row)


def is_packed(value: Tensor, param: Tensor) -> bool:
    """Whether ``value`` is the packed form of a state tensor of ``param``, flat or row by row (or those
    bytes cast to another dtype, as ``Optimizer.load_state_dict`` casts every state tensor to the param's
    dtype)."""
    if value.shape == param.shape:
        return False
    if value.dim() == 1:
        return value.numel() == packed_numel(param.numel())
    return value.dim() == 2 and param.dim() >= 2 and tuple(value.shape) == rows_shape(param.shape)


def is_packed_by_rows(value: Tensor, param: Tensor) -> bool:
    """Whether ``value`` is the row-by-row packed form of a state tensor of ``param``."""
    return value.dim() == 2 and is_packed(value, param)


def maxima_part(packed: Tensor, numel: int, lo: int, hi: int) -> Tensor:
    """The bytes of the maxima of the blocks holding elements ``lo`` … ``hi`` − 1 (``lo`` a multiple of
    :data:`BLOCK`)."""
    return packed[numel + 4 * (lo // BLOCK) : numel + 4 * blocks_of(hi)]


def quantize_part(values: Tensor, packed: Tensor, numel: int, lo: int = 0, signed: bool = True) -> None:
    """Quantise ``values`` (float32, the elements ``lo`` … of a tensor of ``numel``, ``lo`` a multiple of
    :data:`BLOCK`) into their place in ``packed``: one native pass where the runtime is built, else
    :func:`quantize_in_torch`, bit for bit the same."""
    from scratchopt.strategies.kernels import runtime

    hi = lo + values.numel()
    codes, maxima = packed[lo:hi], maxima_part(packed, numel, lo, hi)
    module = runtime.ready()
    if module is not None and values.device.type == "cpu" and values.dtype == torch.float32:
        module.quantize_blockwise(values.contiguous().view(-1), codes, maxima, lookup_table(signed))
    else:
        made = quantize_in_torch(values, signed)
        codes.copy_(made[: values.numel()])
        maxima.copy_(made[values.numel() :])


def dequantize_part(
    packed: Tensor,
    numel: int,
    lo: int = 0,
    hi: int | None = None,
    signed: bool = True,
    out: Tensor | None = None,
) -> Tensor:
    """The float32 values of elements ``lo`` … ``hi`` − 1 of a packed tensor of ``numel`` (flat; into
    ``out``, contiguous, where given)."""
    from scratchopt.strategies.kernels import runtime

    hi = numel if hi is None else hi
    codes, maxima = packed[lo:hi], maxima_part(packed, numel, lo, hi)
    target = out if out is not None else torch.empty(hi - lo, dtype=torch.float32, device=packed.device)
    module = runtime.ready()
    if module is not None and packed.device.type == "cpu":
        module.dequantize_blockwise(codes, maxima, target, dynamic_map(signed))
    else:
        target.copy_(dequantize_in_torch(torch.cat([codes, maxima]), hi - lo, signed))
    return target


def quantize(values: Tensor, signed: bool = True) -> Tensor:
    """The packed form of ``values`` (:func:`quantize_in_torch`; native where the runtime is built)."""
    packed = torch.empty(packed_numel(values.numel()), dtype=torch.uint8, device=values.device)
    quantize_part(values, packed, values.numel(), 0, signed)
    return packed


def dequantize(packed: Tensor, numel: int, signed: bool = True) -> Tensor:
    """The float32 values of a packed tensor of ``numel`` values (flat)."""
    return dequantize_part(packed, numel, 0, numel, signed)


def quantize_rows(values: Tensor, packed: Tensor, signed: bool = True) -> None:
    """Quantise ``values`` (float32, R rows of K) into ``packed`` (uint8, R × (K + 4·⌈K / 256⌉)), each row
    as its own flat storage: the rows are padded with zeros to whole blocks (which changes no block's
    maximum) and quantised in one flat pass, and the codes and maxima of each row put in its place."""
    rows, per_row = values.shape
    if rows == 0:
        return  # a rank holding none of a param's rows
    blocks = blocks_of(per_row)
    padded = torch.nn.functional.pad(values, (0, blocks * BLOCK - per_row)) if per_row % BLOCK else values
    flat = quantize(padded.contiguous().view(-1), signed)
    packed[:, :per_row] = flat[: padded.numel()].view(rows, -1)[:, :per_row]
    packed[:, per_row:] = flat[padded.numel() :].view(rows, 4 * blocks)


def dequantize_rows(packed: Tensor, per_row: int, signed: bool = True) -> Tensor:
    """The float32 values (R × K) of row-by-row storage of K values per row."""
    rows = packed.shape[0]
    if rows == 0:
        return torch.empty(0, per_row, dtype=torch.float32, device=packed.device)
    blocks = blocks_of(per_row)
    codes = packed[:, :per_row]
    if per_row % BLOCK:
        codes = torch.nn.functional.pad(codes, (0, blocks * BLOCK - per_row))
    flat = torch.cat([codes.reshape(-1), packed[:, per_row:].reshape(-1)])
    return dequantize(flat, rows * blocks * BLOCK, signed).view(rows, -1)[:, :per_row]
