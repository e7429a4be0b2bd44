"""Native kernels: a recorded ``update`` written out as C++, compiled by the system compiler, and run
over every tensor of a param group in one call.

The generated function ``scratchopt_kernel(n, numels, ptrs, tapes, tape_stride, threads, seed,
constants)`` updates ``n`` tensors in place through a table of pointers (``ptrs[j * k + i]`` is input
``i`` of tensor ``j``: the param, its gradient and its state tensors, each a dense 1-d run of
``numels[j]`` elements in memory order; ``constants``: the noise table or the quantisation tables). Row ``j`` of ``tapes`` holds tensor ``j``'s scalars (``tape_stride`` 0: one row for all),
so per-parameter scalars such as each param's own ``step`` are a column of the table, not a reason for
another call. The threads split the *total* element count (one OpenMP parallel region per call, not
one per tensor); each converts its scalars from the float64 tape once per tensor segment, and the
element loop is vectorised by the compiler.

The C++ reproduces what ATen's CPU kernels compute: every operation in the tensor's arithmetic type
(float for float32, double for float64), scalars converted to it first, and the same fused forms:
``add(x, alpha=s)`` → ``fma(x, s, self)``, ``addcmul(a, b, value=s)`` → ``fma(s·a, b, self)``,
``addcdiv(a, b, value=s)`` → ``self + s·a/b``, ``lerp`` by ATen's choice of formula on |weight| < ½;
other contractions are off (``-ffp-contract=off``). ``sqrt`` is the correctly rounded one, which ATen's
float32 ``sqrt`` is not always: params differ from the loop by a few ulp in a few elements.

A float32 program may keep some of its tensors in bfloat16 (``storage``: low-precision state, a bfloat16
param trained with stochastic rounding): such a tensor is widened to float32 as it is read and rounded
back stochastically as it is written, with the random bits of
:func:`scratchopt.precision.round_stochastically` (the tensor's seed, made from ``seed`` as
:func:`scratchopt.precision.tensor_seed` makes it, picks where each block of 2¹⁶ elements reads the
noise table), so the kernel gives bit for bit what the eager widen-update-round of
:func:`scratchopt.precision.update` gives, in one pass. 8-bit state (:mod:`scratchopt.quantization`) is
read and written packed, block by block (:func:`cpp_source`), bit for bit the eager
dequantise-update-quantise.

Only float32 and float64 programs of the operations below are generated; anything else raises
:class:`Unsupported` and runs as it did before (the Inductor kernels of
:mod:`~scratchopt.strategies.kernels.cache`). Compiled libraries are cached on disk (``SCRATCHOPT_CACHE``
or ``~/.cache/scratchopt``), keyed by the source, the compiler, its flags, the CPU's flags and torch's
version; a library is written to a temporary file and renamed into place, so processes compiling the
same kernel at once never see a partial one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from scratchopt.strategies.kernels.recording import Program, opmath


class Unsupported(Exception):
    """The program has an operation or a dtype the C++ generator does not write."""


class NoCompiler(Unsupported):
    """No C++ compiler works here, or it failed on a generated kernel."""


_CTYPE = {torch.float32: "float", torch.float64: "double"}
#: Flags that make the compiler's arithmetic ATen's: no contraction beyond the explicit fmas, IEEE sqrt
#: (``-fno-math-errno`` lets it vectorise), and the machine's vector units. ``-fno-trapping-math`` lets
#: the compiler turn the selects of comparisons (Rprop's sign tests) into vector blends; it changes no
#: result, only whether floating-point exceptions could trap, which nothing enables.
CXX_FLAGS = (
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fopenmp",
    "-fPIC",
    "-shared",
)
#: Below this many elements in a call the kernel runs on one thread: a parallel region costs more there.
MIN_PARALLEL_NUMEL = 65536

#: Stochastic rounding, as the generated kernels and the native runtime's eager pass
#: (:mod:`~scratchopt.strategies.kernels.runtime`) both do it: one code for both.
ROUNDING_HELPERS = r"""
#include <cstdint>
#include <cstring>
// Where block `block` of a tensor with seed s starts reading the noise table (scratchopt.precision.hash16).
static inline int64_t so_block_start(uint32_t s, int64_t block) {
  uint32_t x = (uint32_t)block * 0x9E3779B1u + s;
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  x ^= x >> 15;
  return (int64_t)(x >> 16);
}
// value rounded to bfloat16 stochastically (scratchopt.precision.round_stochastically): 16 random bits
// added to the low half of the bit pattern, which is then dropped; NaN stays quiet.
static inline uint16_t so_round(float value, uint16_t noise) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  const uint32_t rounded = (bits + noise) >> 16;
  return (uint16_t)((bits & 0x7FFFFFFFu) > 0x7F800000u ? ((bits >> 16) | 0x40u) : rounded);
}
"""

_PRELUDE = r"""
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <limits>
#include <omp.h>

// Written as selects (no branches) so that the element loop vectorises; NaN propagates as in ATen.
template <typename T> static inline T so_maximum(T a, T b) { return (a > b || a != a) ? a : b; }
template <typename T> static inline T so_minimum(T a, T b) { return (a < b || a != a) ? a : b; }
template <typename T> static inline T so_sign(T a) { return (T)(a > T(0)) - (T)(a < T(0)); }
template <typename T> static inline T so_clamp_min(T a, T lo) { return a < lo ? lo : a; }
template <typename T> static inline T so_clamp_max(T a, T hi) { return a > hi ? hi : a; }

// bfloat16 storage: the top half of a float's bit pattern.
static inline float so_widen(uint16_t b) {
  const uint32_t bits = (uint32_t)b << 16;
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}
// The seed of input `slot` of tensor j of a step (scratchopt.precision.tensor_seed).
static inline uint32_t so_tensor_seed(int64_t seed, int64_t j, int64_t slot) {
  return (uint32_t)seed + (uint32_t)(j * 0x10001 + slot + 1) * 0x9E3779B1u;
}
// 8-bit state (scratchopt.quantization): a table's numel carries PACKED_ROW where the param's state is
// packed; below it, the element count.
static constexpr int64_t so_packed_row = int64_t(1) << 48;
static inline int64_t so_numel(int64_t entry) { return entry & (so_packed_row - 1); }
"""

#: Blockwise 8-bit quantisation, the generated kernels' and the runtime's eager passes', which a kernel
#: with 8-bit inputs adds (the intrinsics' header costs a
#: fraction of a second per compile, so the other kernels go without it). The explicit vector paths are
#: taken where the compiler targets AVX2 or AVX-512 (a kernel's ``-march=native``); the runtime, built
#: for any machine of the architecture, compiles the scalar loops once per vector extension instead.
PACKED_HELPERS = r"""
#include <cstdint>
#include <cstring>
#include <limits>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
// The vector extension the block helpers use: 2 AVX-512, 1 AVX2, 0 none. A kernel's is its compiler's
// target; the runtime, built for every machine of the architecture, passes the CPU's.
#if defined(__AVX512F__)
#define SO_VECTOR 2
#elif defined(__AVX2__)
#define SO_VECTOR 1
#else
#define SO_VECTOR 0
#endif

// The code of v = x / a_b: one load of the lookup table (scratchopt.quantization.lookup_table).
static inline uint8_t so_code(float v, const int32_t* table) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  const int32_t entry = table[bits >> 16];
  const int32_t low = (int32_t)(bits & 0xFFFFu) ^ ((int32_t)(bits >> 31) * 0xFFFF);
  return (uint8_t)((entry & 0xFF) + (low >= (entry >> 8) ? 1 : 0));
}
// |x|'s bit pattern, which orders the absolute values as integers (NaN and infinities above all others).
static inline uint32_t so_magnitude(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return bits & 0x7FFFFFFFu;
}

// The table lookups are written with gathers, one function per vector extension: the compiler does not
// vectorise them on machines whose tuning avoids gathers, and a scalar lookup per element costs more
// than the update. Each returns how many of the m elements it did (a multiple of its width).
#if defined(__x86_64__)
// map[c] * a for the codes c.
__attribute__((target("avx512f"))) static inline int64_t so_values_avx512(const uint8_t* __restrict codes, int64_t m,
                                                                            float a, const float* __restrict map,
                                                                            float* __restrict w) {
  const __m512 scale = _mm512_set1_ps(a);
  int64_t e = 0;
  for (; e + 16 <= m; e += 16) {
    const __m512i index = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(codes + e)));
    _mm512_storeu_ps(w + e, _mm512_mul_ps(_mm512_i32gather_ps(index, map, 4), scale));
  }
  return e;
}
__attribute__((target("avx2"))) static inline int64_t so_values_avx2(const uint8_t* __restrict codes, int64_t m,
                                                                        float a, const float* __restrict map,
                                                                        float* __restrict w) {
  const __m256 scale = _mm256_set1_ps(a);
  int64_t e = 0;
  for (; e + 8 <= m; e += 8) {
    const __m256i index = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(codes + e)));
    _mm256_storeu_ps(w + e, _mm256_mul_ps(_mm256_i32gather_ps(map, index, 4), scale));
  }
  return e;
}
// so_code(w / d) for the values w.
__attribute__((target("avx512f"))) static inline int64_t so_codes_avx512(const float* __restrict w, int64_t m, float d,
                                                                           uint8_t* __restrict codes,
                                                                           const int32_t* __restrict table) {
  const __m512 divisor = _mm512_set1_ps(d);
  const __m512i ones = _mm512_set1_epi32(1), bottom = _mm512_set1_epi32(0xFFFF), byte = _mm512_set1_epi32(0xFF);
  int64_t e = 0;
  for (; e + 16 <= m; e += 16) {
    const __m512i bits = _mm512_castps_si512(_mm512_div_ps(_mm512_loadu_ps(w + e), divisor));
    const __m512i entry = _mm512_i32gather_epi32(_mm512_srli_epi32(bits, 16), table, 4);
    const __m512i low =
        _mm512_xor_si512(_mm512_and_si512(bits, bottom), _mm512_and_si512(_mm512_srai_epi32(bits, 31), bottom));
    const __m512i first = _mm512_and_si512(entry, byte);
    const __mmask16 above = _mm512_cmpge_epi32_mask(low, _mm512_srai_epi32(entry, 8));
    _mm_storeu_si128((__m128i*)(codes + e), _mm512_cvtepi32_epi8(_mm512_mask_add_epi32(first, above, first, ones)));
  }
  return e;
}
__attribute__((target("avx2"))) static inline int64_t so_codes_avx2(const float* __restrict w, int64_t m, float d,
                                                                       uint8_t* __restrict codes,
                                                                       const int32_t* __restrict table) {
  const __m256 divisor = _mm256_set1_ps(d);
  const __m256i ones = _mm256_set1_epi32(1), bottom = _mm256_set1_epi32(0xFFFF), byte = _mm256_set1_epi32(0xFF);
  int64_t e = 0;
  for (; e + 8 <= m; e += 8) {
    const __m256i bits = _mm256_castps_si256(_mm256_div_ps(_mm256_loadu_ps(w + e), divisor));
    const __m256i entry = _mm256_i32gather_epi32(table, _mm256_srli_epi32(bits, 16), 4);
    const __m256i low =
        _mm256_xor_si256(_mm256_and_si256(bits, bottom), _mm256_and_si256(_mm256_srai_epi32(bits, 31), bottom));
    // low >= threshold, as low > threshold - 1 (both below 2^17)
    const __m256i above = _mm256_cmpgt_epi32(low, _mm256_sub_epi32(_mm256_srai_epi32(entry, 8), ones));
    const __m256i code = _mm256_add_epi32(_mm256_and_si256(entry, byte), _mm256_and_si256(above, ones));
    const __m128i halves = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
    _mm_storel_epi64((__m128i*)(codes + e), _mm_packus_epi16(halves, halves));
  }
  return e;
}
#endif

// m values of a block from their codes: map[c] * a.
static inline void so_dequantize_block(const uint8_t* __restrict codes, int64_t m, float a,
                                       const float* __restrict map, float* __restrict w, int vector = SO_VECTOR) {
  int64_t e = 0;
#if defined(__x86_64__)
  if (vector == 2) e = so_values_avx512(codes, m, a, map, w);
  if (vector == 1) e = so_values_avx2(codes, m, a, map, w);
#endif
  for (; e < m; ++e) w[e] = map[codes[e]] * a;
}
// One block's m values quantised into its codes and its maximum's 4 bytes, as
// scratchopt.quantization.quantize_in_torch defines them, given the largest so_magnitude of the values
// (the element loop computes it): a block that is not finite gets a NaN maximum and the code of 0.
static inline void so_quantize_block(const float* __restrict w, int64_t m, uint32_t top, uint8_t* __restrict codes,
                                     uint8_t* __restrict maximum, const int32_t* __restrict table,
                                     int vector = SO_VECTOR) {
  const bool finite = top < 0x7F800000u;
  float a;
  std::memcpy(&a, &top, 4);
  if (!finite) a = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(maximum, &a, 4);
  if (!finite) {
    std::memset(codes, so_code(0.0f, table), m);
    return;
  }
  const float d = a > 0.0f ? a : 1.0f;
  int64_t e = 0;
#if defined(__x86_64__)
  if (vector == 2) e = so_codes_avx512(w, m, d, codes, table);
  if (vector == 1) e = so_codes_avx2(w, m, d, codes, table);
#endif
  for (; e < m; ++e) codes[e] = so_code(w[e] / d, table);
}
"""

_DUNDER = {
    "__add__": "add",
    "__radd__": "radd",
    "__sub__": "sub",
    "__rsub__": "rsub",
    "__mul__": "mul",
    "__rmul__": "rmul",
    "__truediv__": "div",
    "__rtruediv__": "rdiv",
    "__neg__": "neg",
    "__abs__": "abs",
    "__gt__": "gt",
    "__lt__": "lt",
    "__ge__": "ge",
    "__le__": "le",
    "__eq__": "eq",
    "__ne__": "ne",
    "__pos__": "pos",
}
_COMPARE = {"gt": ">", "lt": "<", "ge": ">=", "le": "<=", "eq": "==", "ne": "!="}


class _Writer:
    """Turns one recorded program into the body of the element loop."""

    def __init__(self, program: Program) -> None:
        self.program = program
        program.compute_metas()
        dtypes = {program.inputs[i].dtype for i in range(program.n_inputs)}
        if len(dtypes) != 1 or next(iter(dtypes)) not in _CTYPE:
            raise Unsupported(f"inputs of dtypes {sorted(map(str, dtypes))}")
        self.dtype = next(iter(dtypes))
        self.t = _CTYPE[opmath(self.dtype)]
        self.kinds: dict[int, str] = {}  # C type of each value
        self.scalars: dict[int, str] = {}  # tape index → name of the converted constant
        self.body: list[str] = []
        self.read: set[int] = set()
        self.written: set[int] = set()
        self.names: dict[int, str] = {}

    # ---- operands ----
    def value(self, spec: Any) -> tuple[str, str]:
        """(C expression, C type) of an operand."""
        kind = spec[0]
        if kind == "r":
            rid = spec[1]
            if rid < self.program.n_inputs:
                self.read.add(rid)
                return f"x{rid}", self.t
            return self.names[rid], self.kinds[rid]
        if kind == "s":
            index = spec[1]
            self.scalars[index] = f"s{index}"
            return f"s{index}", self.t
        if kind == "c":
            constant = spec[1]
            if isinstance(constant, bool):
                return ("true" if constant else "false"), "bool"
            if isinstance(constant, (int, float)):
                return f"(({self.t}){float(constant)!r})", self.t
        raise Unsupported(f"an operand {spec!r}")

    def tensor(self, spec: Any) -> str:
        expression, kind = self.value(spec)
        if spec[0] != "r" or kind != self.t:
            raise Unsupported(f"a tensor operand {spec!r}")
        return expression

    def scalar(self, spec: Any) -> str:
        if spec[0] not in ("s", "c"):
            raise Unsupported(f"a scalar operand {spec!r}")
        return self.value(spec)[0]

    # ---- operations ----
    def expression(self, name: str, receiver: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str]:
        t = self.t
        if name in ("add", "sub", "radd", "rsub", "mul", "rmul", "div", "true_divide", "rdiv") and len(args) == 1:
            other = args[0]
            alpha = kwargs.pop("alpha", ("c", 1))
            if kwargs:
                raise Unsupported(f"{name} with {sorted(kwargs)}")
            is_tensor = other[0] == "r"
            operand = self.tensor(other) if is_tensor else self.scalar(other)
            if name in ("add", "sub") and alpha != ("c", 1):
                if not is_tensor:
                    raise Unsupported(f"{name} of a scalar with alpha")
                scaled = self.scalar(alpha)
                sign = "-" if name == "sub" else ""
                return f"std::fma({operand}, {sign}{scaled}, {receiver})", t
            symbol = {"add": "+", "sub": "-", "mul": "*", "div": "/", "true_divide": "/"}.get(name)
            if symbol is not None:
                return f"({receiver} {symbol} {operand})", t
            reflected = {"radd": "+", "rsub": "-", "rmul": "*", "rdiv": "/"}[name]
            return f"({operand} {reflected} {receiver})", t
        if name in ("addcmul", "addcdiv") and len(args) == 2 and set(kwargs) <= {"value"}:
            t1, t2 = self.tensor(args[0]), self.tensor(args[1])
            value = kwargs.get("value", ("c", 1))
            scaled = t1 if value == ("c", 1) else f"({t1} * {self.scalar(value)})"
            if name == "addcmul":
                return f"std::fma({scaled}, {t2}, {receiver})", t
            return f"({receiver} + {scaled} / {t2})", t
        if name == "lerp" and len(args) == 2 and set(kwargs) == {"lerp_weight_below_half"}:
            end, weight = self.tensor(args[0]), self.scalar(args[1])
            if kwargs["lerp_weight_below_half"][1]:
                return f"std::fma({weight}, {end} - {receiver}, {receiver})", t
            return f"std::fma({receiver} - {end}, (({t})1) - {weight}, {end})", t
        if not args and not kwargs:
            unary = {
                "sqrt": f"std::sqrt({receiver})",
                "neg": f"(-{receiver})",
                "pos": receiver,
                "abs": f"std::abs({receiver})",
                "sign": f"so_sign({receiver})",
                "sgn": f"so_sign({receiver})",
                "clone": receiver,
                "zero": f"(({t})0)",
            }
            if name in unary:
                return unary[name], t
        if name in ("maximum", "minimum") and len(args) == 1 and not kwargs:
            return f"so_{name}({receiver}, {self.tensor(args[0])})", t
        if name in _COMPARE and len(args) == 1 and not kwargs:
            other = args[0]
            operand = self.tensor(other) if other[0] == "r" else self.scalar(other)
            return f"({receiver} {_COMPARE[name]} {operand})", "bool"
        if name == "masked_fill" and len(args) == 2 and not kwargs:
            mask, kind = self.value(args[0])
            if kind != "bool":
                raise Unsupported("masked_fill with a mask that is not boolean")
            return f"({mask} ? {self.scalar(args[1])} : {receiver})", t
        if name in ("clamp", "clip") and not kwargs and 1 <= len(args) <= 2:
            result = receiver
            low = args[0]
            high = args[1] if len(args) == 2 else ("c", None)
            if low != ("c", None):
                result = f"so_clamp_min({result}, {self.scalar(low)})"
            if high != ("c", None):
                result = f"so_clamp_max({result}, {self.scalar(high)})"
            return result, t
        if name in ("clamp_min", "clamp_max") and len(args) == 1 and not kwargs:
            return f"so_{name}({receiver}, {self.scalar(args[0])})", t
        if name == "copy" and len(args) == 1 and not kwargs:
            return self.tensor(args[0]), t
        if name == "fill" and len(args) == 1 and not kwargs:
            return self.scalar(args[0]), t
        raise Unsupported(f"Tensor.{name}")

    def write(self) -> None:
        for kind, target, receiver, (args, kwargs), out in self.program.ops:
            if kind != "m":
                raise Unsupported(f"torch.{getattr(target, '__name__', target)}")
            inplace = target.endswith("_") and not target.endswith("__")
            name = _DUNDER.get(target, target[:-1] if inplace else target)
            self_expression, self_kind = self.value(receiver)
            if self_kind != self.t:
                raise Unsupported(f"Tensor.{target} on a {self_kind} value")
            expression, result_kind = self.expression(name, self_expression, tuple(args), dict(kwargs))
            if inplace:
                rid = receiver[1]
                if result_kind != self.t:
                    raise Unsupported(f"Tensor.{target} changing the type in place")
                self.body.append(f"{self_expression} = {expression};")
                if rid < self.program.n_inputs:
                    self.written.add(rid)
            else:
                assert out is not None
                self.names[out] = f"v{out}"
                self.kinds[out] = result_kind
                self.body.append(f"{result_kind} v{out} = {expression};")


#: ``storage`` of an input packed in 8 bits (:mod:`scratchopt.quantization`) with the signed map, and
#: with the unsigned one (state that is never negative).
PACKED = "8bit"
PACKED_UNSIGNED = "8bit-unsigned"
#: Set in a table's numel where the tensor's packed inputs are packed (its state is 8-bit).
PACKED_ROW = 1 << 48
Storage = torch.dtype | str


def cpp_source(program: Program, storage: Sequence[Storage] | None = None, slots: Sequence[int] | None = None) -> str:
    """The C++ of the kernel that replays ``program`` over a table of tensors; :class:`Unsupported` if
    the program has something the generator does not write. ``storage``: how each input is kept (the
    program's dtype by default; bfloat16, or :data:`PACKED` / :data:`PACKED_UNSIGNED` 8-bit state, for
    some inputs of a float32 program); ``slots``: each input's place in the seeds of a step (0 the param,
    ``i + 1`` the state key ``i``; −1 never rounded), needed where an input kept in bfloat16 is written.

    A kernel with packed inputs reads them packed for the tensors whose numel carries ``PACKED_ROW``
    (their state is 8-bit) and as float32 for the others (small params keep float32 state): each thread
    takes whole blocks of 256 elements of a packed tensor, dequantises a block's codes into a float32
    buffer, runs the update over it and quantises the block again, in one pass over memory."""
    writer = _Writer(program)
    writer.write()
    k = program.n_inputs
    t = writer.t
    kept = tuple(storage) if storage is not None else (writer.dtype,) * k
    allowed: tuple[Storage, ...] = (writer.dtype, torch.bfloat16, PACKED, PACKED_UNSIGNED)
    if len(kept) != k or any(d not in allowed for d in kept):
        raise Unsupported(f"storage {kept} for a {writer.dtype} program of {k} inputs")
    if any(d != writer.dtype for d in kept) and writer.dtype != torch.float32:
        raise Unsupported("low-precision storage of a program that is not float32")
    narrow = {i for i in range(k) if kept[i] == torch.bfloat16}
    packed = {i: kept[i] == PACKED_UNSIGNED for i in range(k) if kept[i] in (PACKED, PACKED_UNSIGNED)}
    if narrow and packed:
        raise Unsupported("bfloat16 and 8-bit storage in one kernel")
    if packed.keys() & {0, 1}:
        raise Unsupported("a packed param or gradient")
    rounded = sorted(narrow & writer.written)
    if rounded and (slots is None or len(slots) != k or any(slots[i] < 0 for i in rounded)):
        raise Unsupported("a bfloat16 input is written but has no seed slot")
    used = sorted(writer.read | writer.written)
    storage_type = {i: "uint16_t" if i in narrow else _CTYPE[writer.dtype] for i in used}
    pointers = "\n".join(f"      {storage_type[i]}* p{i} = ({storage_type[i]}*)ptrs[j * {k} + {i}];" for i in used)
    scalars = "\n".join(f"      const {t} s{index} = ({t})tape[{index}];" for index in sorted(writer.scalars))
    seeds = "\n".join(f"      const uint32_t r{i} = so_tensor_seed(seed, j, {slots[i]});" for i in rounded)  # type: ignore[index]
    # Each block of 2¹⁶ elements reads a window of the noise table (scratchopt.precision.random_bits).
    windows = "\n".join(f"        const uint16_t* q{i} = noise + so_block_start(r{i}, block);" for i in rounded)
    body = "\n".join(f"        {line}" for line in writer.body)

    def loads(element: str, buffered: Sequence[int] = ()) -> str:
        return "\n".join(
            f"        {t} x{i} = w{i}[e];"
            if i in buffered
            else f"        {t} x{i} = so_widen(p{i}[{element}]);"
            if i in narrow
            else f"        {t} x{i} = ({t})p{i}[{element}];"
            for i in used
        )

    def stores(element: str, buffered: Sequence[int] = ()) -> str:
        return "\n".join(
            f"        w{i}[e] = x{i};"
            if i in buffered
            else f"        p{i}[{element}] = so_round(x{i}, q{i}[e - base]);"
            if i in narrow
            else f"        p{i}[{element}] = ({storage_type[i]})x{i};"
            for i in sorted(writer.written)
        )

    elements = f"""      #pragma omp simd
      for (int64_t e = lo; e < hi; ++e) {{
{loads("e")}
{body}
{stores("e")}
      }}"""
    if rounded:
        elements = f"""      for (int64_t b0 = lo; b0 < hi;) {{
        const int64_t block = b0 >> 16, base = block << 16, b1 = std::min(hi, base + 65536);
{windows}
        #pragma omp simd
        for (int64_t e = b0; e < b1; ++e) {{
{loads("e")}
{body}
{stores("e")}
        }}
        b0 = b1;
      }}"""
    buffered = sorted(packed.keys() & set(used))
    if buffered:
        requantised = [i for i in buffered if i in writer.written]
        codes = "\n".join(f"        uint8_t* c{i} = (uint8_t*)p{i};" for i in buffered)
        buffers = "\n".join(f"        alignas(64) float w{i}[256];" for i in buffered)
        # The maps and lookup tables of scratchopt.quantization.native_tables, signed then unsigned.
        dequantise = "\n".join(
            f"""          {{
            float a;
            std::memcpy(&a, c{i} + numel + 4 * block, 4);
            so_dequantize_block(c{i} + b0, m, a, maps + {256 * packed[i]}, w{i});
          }}"""
            for i in buffered
        )
        tops = "".join(f"          uint32_t t{i} = 0;\n" for i in requantised)
        reduction = f" reduction(max : {', '.join(f't{i}' for i in requantised)})" if requantised else ""
        magnitudes = "\n".join(f"        t{i} = std::max(t{i}, so_magnitude(x{i}));" for i in requantised)
        quantise = "\n".join(
            f"          so_quantize_block(w{i}, m, t{i}, c{i} + b0, c{i} + numel + 4 * block, "
            f"lookups + {65536 * packed[i]});"
            for i in requantised
        )

        def one_block(count: str) -> str:
            return f"""          const int64_t m = {count}, block = b0 >> 8;
{dequantise}
{tops}          #pragma omp simd{reduction}
          for (int64_t e = 0; e < m; ++e) {{
{loads("b0 + e", buffered)}
{body}
{stores("b0 + e", buffered)}
{magnitudes}
          }}
{quantise}"""

        # A full block has a constant trip count, which the compiler unrolls; the last may be shorter.
        elements = f"""      if (!packed_row) {{
{elements}
      }} else {{
{codes}
{buffers}
        int64_t b0 = lo;
        for (; b0 + 256 <= hi; b0 += 256) {{
{one_block("256")}
        }}
        if (b0 < hi) {{
{one_block("hi - b0")}
        }}
      }}"""
        align = """      if (packed_row) {  // whole blocks: a thread's range starts and ends on a block's edge
        lo = std::min(numel, (lo + 255) & ~(int64_t)255);
        hi = std::min(numel, (hi + 255) & ~(int64_t)255);
      }"""
    else:
        align = ""
    prelude = _PRELUDE + ROUNDING_HELPERS + (PACKED_HELPERS if buffered else "")
    return f"""{prelude}
extern "C" void scratchopt_kernel(int64_t n, const int64_t* numels, void* const* ptrs, const double* tapes,
                                  int64_t tape_stride, int64_t threads, int64_t seed, const void* constants) {{
  (void)seed;
  // The noise table of stochastic rounding, or the quantisation tables of a kernel with 8-bit inputs.
  const uint16_t* noise = (const uint16_t*)constants;
  const float* maps = (const float*)constants;
  const int32_t* lookups = (const int32_t*)constants + 512;
  (void)noise; (void)maps; (void)lookups;
  int64_t total = 0;
  for (int64_t j = 0; j < n; ++j) total += so_numel(numels[j]);
  #pragma omp parallel num_threads(threads) if (threads > 1)
  {{
    const int64_t workers = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t begin = total * me / workers, end = total * (me + 1) / workers;
    int64_t offset = 0;
    for (int64_t j = 0; j < n && offset < end; offset += so_numel(numels[j]), ++j) {{
      const int64_t numel = so_numel(numels[j]);
      const bool packed_row = (numels[j] & so_packed_row) != 0;
      (void)packed_row;
      int64_t lo = std::max(begin - offset, (int64_t)0), hi = std::min(end - offset, numel);
{align}
      if (lo >= hi) continue;
      const double* tape = tapes + j * tape_stride;
{scalars}
{seeds}
{pointers}
{elements}
    }}
  }}
}}
"""


# ------------------------------------------------------------------------------------------------------
# Building and loading
# ------------------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_LOADED: dict[str, Callable[..., Any]] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("SCRATCHOPT_CACHE", Path.home() / ".cache" / "scratchopt")) / "kernels"


@functools.cache
def compiler() -> tuple[str, str] | None:
    """The C++ compiler (``$CXX`` or ``g++``) and its version line, or None when none works."""
    command = os.environ.get("CXX", "g++")
    path = shutil.which(command)
    if path is None:
        return None
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return path, version.stdout.splitlines()[0] if version.stdout else ""


@functools.cache
def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _key(source: str, cxx: tuple[str, str]) -> str:
    text = "\n".join([source, *cxx, *CXX_FLAGS, _cpu_flags(), torch.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def load(source: str) -> Callable[..., Any]:
    """The compiled kernel of ``source``: loaded from the disk cache, or compiled and put there."""
    cxx = compiler()
    if cxx is None:
        raise NoCompiler("no working C++ compiler (set CXX to one)")
    key = _key(source, cxx)
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        directory = cache_dir()
        library = directory / f"{key}.so"
        if not library.exists():
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=directory) as scratch:
                cpp = Path(scratch) / "kernel.cpp"
                cpp.write_text(source)
                built = Path(scratch) / "kernel.so"
                result = subprocess.run(
                    [cxx[0], *CXX_FLAGS, str(cpp), "-o", str(built)], capture_output=True, text=True, timeout=300
                )
                if result.returncode != 0:
                    raise NoCompiler(f"the compiler failed: {result.stderr[-2000:]}")
                os.replace(built, library)  # atomic: another process sees the whole library or none
        function = ctypes.CDLL(str(library)).scratchopt_kernel
        function.restype = None
        function.argtypes = [
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        _LOADED[key] = function
        return function


def threads_for(total: int) -> int:
    """The threads a call over ``total`` elements uses: torch's, or one below :data:`MIN_PARALLEL_NUMEL`."""
    return torch.get_num_threads() if total >= MIN_PARALLEL_NUMEL else 1


#: Native kernel calls in this process (the test kit reports whether a check reached one).
LAUNCHES = [0]


class NativeKernel:
    """The native kernel of one program structure, called on tables of tensors."""

    __slots__ = ("address", "function", "n_inputs", "tape_length")

    def __init__(
        self, program: Program, storage: Sequence[Storage] | None = None, slots: Sequence[int] | None = None
    ) -> None:
        self.function = load(cpp_source(program, storage, slots))
        #: The kernel's address, for the native runtime to call it without Python.
        self.address = ctypes.cast(self.function, ctypes.c_void_p).value  # type: ignore[arg-type]  # a CFuncPtr
        self.n_inputs = program.n_inputs
        self.tape_length = len(program.tape)

    def __call__(
        self,
        numels: Sequence[int],
        pointers: Sequence[int],
        tapes: Sequence[float],
        shared_tape: bool,
        seed: int = 0,
        noise: int = 0,
    ) -> None:
        """Run over ``len(numels)`` tensors: ``pointers`` holds ``n_inputs`` data pointers per tensor,
        ``tapes`` one row of scalars per tensor, or one row for all when ``shared_tape``; ``seed`` and
        ``noise`` (the address of :func:`scratchopt.precision.native_noise`): for the tensors kept in
        bfloat16."""
        numel_table = array("q", numels)
        pointer_table = array("q", pointers)
        tape_table = array("d", tapes or [0.0])
        threads = threads_for(sum(n & (PACKED_ROW - 1) for n in numels))
        LAUNCHES[0] += 1
        self.function(
            len(numel_table),
            numel_table.buffer_info()[0],
            pointer_table.buffer_info()[0],
            tape_table.buffer_info()[0],
            0 if shared_tape else self.tape_length,
            threads,
            seed,
            noise,
        )


_KERNELS: dict[tuple[Any, ...], NativeKernel | None] = {}


_WARNED: list[str] = []


def kernel_for(
    program: Program, storage: tuple[Storage, ...] | None = None, slots: tuple[int, ...] | None = None
) -> NativeKernel | None:
    """The native kernel of this program's structure (with its inputs kept in ``storage``, rounded with
    the seeds of ``slots``: see :func:`cpp_source`), or None where the program cannot be written in C++
    (a dtype or an operation the generator does not write) or no compiler works (warned once)."""
    key = (program.structure(), storage, slots)
    if key in _KERNELS:
        return _KERNELS[key]
    try:
        kernel: NativeKernel | None = NativeKernel(program, storage, slots)
    except NoCompiler as reason:
        kernel = None
        if not _WARNED:
            _WARNED.append(str(reason))
            warnings.warn(
                f"scratchopt: no native kernels ({reason}); impl='fused' runs through torch.compile",
                RuntimeWarning,
                stacklevel=3,
            )
    except Unsupported:
        kernel = None
    _KERNELS[key] = kernel
    return kernel
