"""The native runtime: builds a group's pointer table in C++ and calls a native kernel on it.

Reading each param's gradient, its state tensors from ``optimizer.state`` and their data pointers in
Python costs microseconds per param: most of a step for a model of thousands of small tensors. This
small extension does it in C++ through torch's own tensor objects, in one pass over a group's list: it
makes the dispatcher's checks on the way (:class:`Tables`), reads the state afresh at every step
exactly as the Python path does, and counts the default ``step`` in place once every check passed.

It is compiled once per machine and torch version with ``torch.utils.cpp_extension.load_inline`` (tens of
seconds), in a child process started the first time ``fused`` runs; until it is ready, the Python path
builds the same table. Both call the same kernel with the same table, so results never depend on which
one ran. ``SCRATCHOPT_RUNTIME=0`` disables it; ``SCRATCHOPT_RUNTIME=wait`` builds it before the first step.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from scratchopt import quantization
from scratchopt.strategies.kernels import native

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/python_variable.h>
#include <thread>
#include <vector>
SO_SHARED_HELPERS

namespace py = pybind11;

// A table's numel of a param whose state is packed in 8 bits (the kernel reads the count below it).
static constexpr int64_t PACKED_ROW = int64_t(1) << 48;

using Kernel = void (*)(int64_t, const int64_t*, void* const*, const double*, int64_t, int64_t, int64_t,
                        const void*);

// optimizer.state[param] without calling Tensor.__hash__ in Python: a tensor hashes to id(tensor), its
// address (the caller checks this holds), and a Python int below 2**61 - 1 hashes to itself.
static PyObject* state_of(PyObject* state, PyObject* param) {
  return _PyDict_GetItem_KnownHash(state, param, (Py_hash_t)(uintptr_t)param);
}

// What one param of a group leads to, read without changing anything.
struct Row {
  PyObject* param = nullptr;
  at::Tensor* step = nullptr;  // its state["step"], when counted
  PyObject* step_object = nullptr;
  int64_t numel = 0;
  uint64_t present = 0;        // bit i: the state tensor of keys[i] is present
  uint64_t narrow = 0;         // bit i: ... and kept in bfloat16 or packed in 8 bits (a low-precision group)
  at::ScalarType dtype = at::kFloat;
  int8_t kind = 0;             // 0: can run in the kernel; 1: no gradient; -1: cannot
  int8_t has_step = 0;
  bool packed = false;         // its narrow state tensors are packed in 8 bits
};

// dict[key] without PyDict_GetItem's saving and restoring of the error state: the key's hash is given
// (cached in a str, the address of a tensor).
static PyObject* item(PyObject* dict, PyObject* key, Py_hash_t hash) {
  return _PyDict_GetItem_KnownHash(dict, key, hash);
}

// The tensors of one group's params with a gradient, as a native kernel reads them, after every check
// the dispatcher makes: built from the group's whole list in one pass of reads, then one of checks.
struct Tables {
  std::vector<int64_t> numels;
  std::vector<void*> pointers;
  std::vector<double> steps;  // each param's step after counting (when counted)
  py::list params;            // the params with a gradient, in the group's order
  int64_t status = -1;        // -1: every param with a gradient can run in the kernel; else the index
                              // (in the group) of the first that cannot; -2: no param has a gradient
  int64_t total = 0;          // elements in all
  bool uniform = true;        // every param has the same step
  bool counted = false;       // the default step was counted
  uint64_t pattern = 0;       // bit i: the state tensor of keys[i] is present (the same for every param)
  uint64_t narrow = 0;        // bit i: the state tensor of keys[i] is kept in bfloat16 (the same for every
                              // param), or packed in 8 bits (for every param whose row is marked packed)
  bool narrow_params = false; // the params (and their gradients) are bfloat16
  bool quantized = false;     // the narrow tensors are packed in 8 bits (scratchopt.quantization)
  std::vector<at::Tensor*> counters_;  // the steps advance() counts
  py::list alive_;                     // their Python tensors, held until then
  bool count_ = false;

  // group: the group's params; state: optimizer.state; keys: the state keys in update order;
  // count: advance() then adds one to each state["step"] (a 0-d float tensor), where every param has
  // one; plain: the classes whose data may be read directly. The constructor changes nothing.
  // required: bit i, the state tensor of keys[i] must be present (bit len(keys): the step, when counted);
  // extra: other keys the state must have (an algorithm's own 0-d bookkeeping).
  // low: bit 0, a float32 param's state tensors are bfloat16 (else every tensor is in the param's
  // dtype); bit 1, bfloat16 params (with bfloat16 gradients and state) may run too; bit 2, 8-bit state:
  // bits 8 on mark the keys a float32 param of at least SO_MIN_NUMEL elements keeps packed, each such
  // tensor one flat uint8 run of n + 4 * ceil(n / 256) bytes, and such a param's numel in the table
  // carries bit 48 (PACKED_ROW).
  Tables(py::list group, py::dict state, py::tuple keys, bool count, py::tuple plain, uint64_t required,
         py::tuple extra, int64_t low) {
    const Py_ssize_t n = PyList_GET_SIZE(group.ptr());
    const Py_ssize_t k = PyTuple_GET_SIZE(keys.ptr());
    PyObject* const tensor_type = PyTuple_GET_ITEM(plain.ptr(), 0);
    PyObject* const parameter_type = PyTuple_GET_ITEM(plain.ptr(), 1);
    PyObject* const state_dict = state.ptr();
    PyObject* const list = group.ptr();
    if (!PyDict_Check(state_dict)) { status = 0; return; }
    std::vector<PyObject*> key_objects(k);
    std::vector<Py_hash_t> key_hashes(k);
    for (Py_ssize_t key = 0; key < k; ++key) {
      key_objects[key] = PyTuple_GET_ITEM(keys.ptr(), key);
      key_hashes[key] = PyObject_Hash(key_objects[key]);  // cached for a str
      if (!PyUnicode_CheckExact(key_objects[key]) || key_hashes[key] == -1) { PyErr_Clear(); status = 0; return; }
    }
    const Py_ssize_t e = PyTuple_GET_SIZE(extra.ptr());
    std::vector<Py_hash_t> extra_hashes(e);
    for (Py_ssize_t key = 0; key < e; ++key) {
      extra_hashes[key] = PyObject_Hash(PyTuple_GET_ITEM(extra.ptr(), key));
      if (extra_hashes[key] == -1) { PyErr_Clear(); status = 0; return; }
    }
    py::str step_key("step");
    const Py_hash_t step_hash = PyObject_Hash(step_key.ptr());
    std::vector<Row> rows(n);
    std::vector<void*> row_pointers(n * (k + 2));
    auto is_plain = [&](PyObject* o) {
      return (PyObject*)Py_TYPE(o) == tensor_type || (PyObject*)Py_TYPE(o) == parameter_type;
    };
    auto read = [&](Py_ssize_t begin, Py_ssize_t end) {
      for (Py_ssize_t i = begin; i < end; ++i) {
        Row& row = rows[i];
        row.kind = -1;
        PyObject* param = PyList_GET_ITEM(list, i);
        row.param = param;
        if (!is_plain(param)) continue;
        const at::Tensor& p = THPVariable_Unpack(param);
        const at::Tensor& g = p.unsafeGetTensorImpl()->grad();  // param.grad, without a Python lookup
        if (!g.defined()) { row.kind = 1; continue; }
        row.dtype = p.scalar_type();
        const bool narrow_param = (low & 2) != 0 && row.dtype == at::kBFloat16;
        const at::ScalarType expected = row.dtype == at::kFloat && (low & 1) != 0 ? at::kBFloat16 : row.dtype;
        const uint64_t packs = (low & 4) != 0 && row.dtype == at::kFloat && p.numel() >= SO_MIN_NUMEL
                                   ? static_cast<uint64_t>(low) >> 8 : 0;
        const int64_t packed_numel = p.numel() + 4 * ((p.numel() + 255) / 256);
        if ((row.dtype != at::kFloat && row.dtype != at::kDouble && !narrow_param) || !p.device().is_cpu() ||
            !p.is_contiguous()) {
          continue;
        }
        if (g.layout() != at::kStrided || !g.has_storage() || g.key_set().has(c10::DispatchKey::Python) ||
            g.scalar_type() != row.dtype || !g.device().is_cpu() || !g.is_contiguous() || g.sizes() != p.sizes()) {
          continue;
        }
        PyObject* param_state = item(state_dict, param, (Py_hash_t)(uintptr_t)param);  // no defaultdict insertion
        const bool stateless = param_state == nullptr || (PyDict_Check(param_state) && PyDict_GET_SIZE(param_state) == 0);
        // The default bookkeeping starts from initialised state; an algorithm's own may keep none (SGD).
        if ((stateless && count) || (!stateless && !PyDict_Check(param_state))) continue;
        void** out = &row_pointers[i * (k + 2)];
        row.numel = p.numel();
        bool ok = true;
        for (Py_ssize_t key = 0; key < k && !stateless && ok; ++key) {
          PyObject* value = item(param_state, key_objects[key], key_hashes[key]);
          if (value == nullptr || value == Py_None) continue;
          const at::Tensor* s = is_plain(value) ? &THPVariable_Unpack(value) : nullptr;
          const bool packed = (packs >> key & 1) != 0;
          ok = s != nullptr && s->device().is_cpu() && s->is_contiguous() &&
               (packed ? s->scalar_type() == at::kByte && s->dim() == 1 && s->numel() == packed_numel
                       : s->scalar_type() == expected && s->sizes() == p.sizes());
          if (ok) {
            if (expected == at::kBFloat16 || packed) row.narrow |= uint64_t(1) << key;
            row.packed = row.packed || packed;
            row.present |= uint64_t(1) << key;
            out[2 + __builtin_popcountll(row.present) - 1] = s->data_ptr();
          }
        }
        for (Py_ssize_t key = 0; key < e && !stateless && ok; ++key) {
          ok = item(param_state, PyTuple_GET_ITEM(extra.ptr(), key), extra_hashes[key]) != nullptr;
        }
        if (!ok) continue;
        if (count) {
          PyObject* step = item(param_state, step_key.ptr(), step_hash);
          row.has_step = step != nullptr;
          if (step != nullptr) {
            if (!is_plain(step)) continue;
            const at::Tensor& t = THPVariable_Unpack(step);
            if (t.dim() != 0 || !t.device().is_cpu() ||
                (t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble)) {
              continue;
            }
            row.step = const_cast<at::Tensor*>(&t);
            row.step_object = step;
          }
        }
        out[0] = p.data_ptr();
        out[1] = g.data_ptr();
        row.kind = 0;
      }
    };
    read(0, n);
    // The checks that compare params, in the group's order.
    size_t slots = 16;
    while (slots < 2 * (size_t)n) slots <<= 1;
    std::vector<PyObject*> seen(slots, nullptr);  // a param listed twice goes to the loop
    numels.reserve(n);
    pointers.reserve(n * (k + 2));
    std::vector<at::Tensor*> counters;
    int with_step = -1;
    Py_ssize_t first = -1;
    at::ScalarType dtype = at::kFloat;
    for (Py_ssize_t i = 0; i < n; ++i) {
      const Row& row = rows[i];
      if (row.kind == -1) { status = i; return; }
      size_t slot = (((uintptr_t)row.param >> 4) * 0x9E3779B97F4A7C15ull) >> 40 & (slots - 1);
      while (seen[slot] != nullptr) {
        if (seen[slot] == row.param) { status = i; return; }
        slot = (slot + 1) & (slots - 1);
      }
      seen[slot] = row.param;
      if (row.kind == 1) continue;  // no gradient
      if (numels.empty()) {
        pattern = row.present; narrow = row.narrow; with_step = row.has_step; dtype = row.dtype; first = i;
      }
      // 8-bit state: the rows of small params keep float32 state, the others the same packed tensors.
      if ((low & 4) != 0 && narrow == 0) narrow = row.narrow;
      const bool packed_row = row.packed;
      quantized = quantized || packed_row;
      // One kernel reads every tensor of the table in one dtype, and the same state tensors of each.
      if (row.dtype != dtype || row.present != pattern || row.has_step != with_step ||
          (row.narrow != narrow && !((low & 4) != 0 && row.narrow == 0))) {
        status = i; return;
      }
      void* const* in = &row_pointers[i * (k + 2)];
      pointers.insert(pointers.end(), in, in + 2 + __builtin_popcountll(row.present));
      numels.push_back(packed_row ? row.numel | PACKED_ROW : row.numel);
      total += row.numel;
      if (row.step != nullptr) {
        counters.push_back(row.step);
        alive_.append(py::handle(row.step_object));
      }
    }
    if (numels.empty()) { status = -2; return; }
    narrow_params = dtype == at::kBFloat16;
    // A key the update needs is missing from every param's state: the general path raises KeyError.
    const uint64_t have = pattern | (with_step > 0 ? uint64_t(1) << k : 0);
    if ((required & ~have) != 0) { status = first; return; }
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (rows[i].kind == 0) params.append(py::handle(rows[i].param));
    }
    // Every check passed; nothing is changed until advance().
    counters_ = std::move(counters);
    count_ = count;
  }

  // Count each param's default step (`step += 1`, once): the first change a step makes.
  void advance() {
    if (!count_) return;
    count_ = false;
    counted = !counters_.empty();
    steps.reserve(counters_.size());
    for (at::Tensor* t : counters_) {
      double value;
      if (t->scalar_type() == at::kFloat) { float* v = t->data_ptr<float>(); *v += 1.0f; value = *v; }
      else { double* v = t->data_ptr<double>(); *v += 1.0; value = *v; }
      if (!t->is_inference()) t->unsafeGetTensorImpl()->bump_version();  // as `step += 1` does
      if (!steps.empty() && value != steps.front()) uniform = false;
      steps.push_back(value);
    }
  }

  int64_t size() const { return (int64_t)numels.size(); }

  // Run the kernel at address `kernel` over the table; `tapes` holds one row of scalars, or one per param.
  // seed, noise: the step's seed and the noise table's address, for the tensors kept in bfloat16.
  void launch(uintptr_t kernel, const std::vector<double>& tapes, int64_t stride, int64_t threads, int64_t seed,
              uintptr_t noise) {
    Kernel run = reinterpret_cast<Kernel>(kernel);
    py::gil_scoped_release release;
    run((int64_t)numels.size(), numels.data(), pointers.data(), tapes.data(), stride, threads, seed,
        reinterpret_cast<const void*>(noise));
  }
};

// The index of the first param whose state tensor (of `keys`) has another dtype or device, or -1.
int64_t first_mismatch(py::list params, py::dict state, py::tuple keys) {
  const Py_ssize_t n = PyList_GET_SIZE(params.ptr());
  const Py_ssize_t k = PyTuple_GET_SIZE(keys.ptr());
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* param = PyList_GET_ITEM(params.ptr(), i);
    PyObject* param_state = state_of(state.ptr(), param);
    if (param_state == nullptr || !PyDict_Check(param_state)) continue;
    const at::Tensor& p = THPVariable_Unpack(param);
    for (Py_ssize_t key = 0; key < k; ++key) {
      PyObject* value = PyDict_GetItem(param_state, PyTuple_GET_ITEM(keys.ptr(), key));
      if (value == nullptr || !THPVariable_Check(value)) continue;
      const at::Tensor& s = THPVariable_Unpack(value);
      if (s.scalar_type() != p.scalar_type() || s.device() != p.device()) return i;
    }
  }
  return -1;
}

// Bookkeeping on 0-d CPU float tensors (an algorithm's per-parameter scalars: step, NAdam's product of
// μ): op 0 reads them, 1 adds, 2 multiplies by, 3 stores `values` (one value for all, or one per tensor),
// each in the tensor's dtype as the in-place op with a Python number does. Returns the values after it,
// or None with nothing changed when some tensor is not such a scalar.
py::object scalars(py::list tensors, int op, const std::vector<double>& values, py::tuple plain) {
  const Py_ssize_t n = PyList_GET_SIZE(tensors.ptr());
  PyObject* const tensor_type = PyTuple_GET_ITEM(plain.ptr(), 0);
  PyObject* const parameter_type = PyTuple_GET_ITEM(plain.ptr(), 1);
  const size_t width = values.size();
  if ((op != 0 && width != 1 && width != (size_t)n) || op < 0 || op > 3) return py::none();
  std::vector<at::Tensor*> found(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* o = PyList_GET_ITEM(tensors.ptr(), i);
    if ((PyObject*)Py_TYPE(o) != tensor_type && (PyObject*)Py_TYPE(o) != parameter_type) return py::none();
    at::Tensor& t = const_cast<at::Tensor&>(THPVariable_Unpack(o));
    if (t.dim() != 0 || !t.device().is_cpu() || t.requires_grad() ||
        (t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble)) {
      return py::none();
    }
    found[i] = &t;
  }
  py::list out(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    at::Tensor* t = found[i];
    const double x = op == 0 ? 0.0 : values[width == 1 ? 0 : i];
    double result;
    if (t->scalar_type() == at::kFloat) {
      float* v = t->data_ptr<float>();
      if (op == 1) *v += (float)x; else if (op == 2) *v *= (float)x; else if (op == 3) *v = (float)x;
      result = *v;
    } else {
      double* v = t->data_ptr<double>();
      if (op == 1) *v += x; else if (op == 2) *v *= x; else if (op == 3) *v = x;
      result = *v;
    }
    if (op != 0 && !t->is_inference()) t->unsafeGetTensorImpl()->bump_version();
    PyList_SET_ITEM(out.ptr(), i, PyFloat_FromDouble(result));
  }
  return out;
}

// f(begin, end) over [0, n) split among torch's threads (one range below 2 * grain). at::parallel_for
// is OpenMP inline in its header, and this extension is built without OpenMP (a second OpenMP runtime
// beside torch's can abort a process as it exits): plain threads, joined before returning.
template <typename F>
static void split(int64_t n, int64_t grain, const F& f) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(n / grain, 1));
  if (threads <= 1) {
    f(0, n);
    return;
  }
  std::vector<std::thread> helpers;
  helpers.reserve(threads - 1);
  for (int64_t t = 1; t < threads; ++t) helpers.emplace_back([&, t] { f(n * t / threads, n * (t + 1) / threads); });
  f(0, n / threads);
  for (std::thread& helper : helpers) helper.join();
}

// value (float32) rounded to bfloat16 stochastically into out (bfloat16), both contiguous, as
// scratchopt.precision.round_stochastically computes it (so_round of the shared helpers). One range of
// elements; compiled for AVX-512 and AVX2 besides the baseline, the CPU's chosen when the module loads.
__attribute__((target_clones("avx512f", "avx2", "default")))
static void round_range(const float* __restrict in, uint16_t* __restrict result, int64_t begin, int64_t end,
                        int64_t offset, uint32_t s, const uint16_t* __restrict noise) {
  for (int64_t b0 = begin; b0 < end;) {
    const int64_t block = (b0 + offset) >> 16;
    const int64_t base = (block << 16) - offset;  // local index of the block's first element
    const int64_t b1 = std::min(end, base + 65536);
    const uint16_t* window = noise + so_block_start(s, block);
    for (int64_t i = b0; i < b1; ++i) result[i] = so_round(in[i], window[i - base]);
    b0 = b1;
  }
}

static void round_stochastically(const at::Tensor& value, at::Tensor& out, int64_t seed, int64_t offset,
                                 const at::Tensor& noise) {
  TORCH_CHECK(value.scalar_type() == at::kFloat && out.scalar_type() == at::kBFloat16, "float32 to bfloat16");
  TORCH_CHECK(value.is_contiguous() && out.is_contiguous() && value.numel() == out.numel(), "contiguous, same size");
  TORCH_CHECK(noise.scalar_type() == at::kShort && noise.is_contiguous() && noise.numel() == 2 * 65536, "the noise table");
  const float* in = value.data_ptr<float>();
  uint16_t* result = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const uint16_t* table = reinterpret_cast<const uint16_t*>(noise.data_ptr<int16_t>());
  const uint32_t s = static_cast<uint32_t>(seed);
  split(value.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    round_range(in, result, begin, end, offset, s, table);
  });
  if (!out.is_inference()) out.unsafeGetTensorImpl()->bump_version();
}

// The vector extension of this CPU the shared quantiser's block helpers use (see SO_VECTOR).
static int cpu_vector() {
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx512f")) return 2;
  if (__builtin_cpu_supports("avx2")) return 1;
#endif
  return 0;
}
static const int so_cpu_vector = cpu_vector();

__attribute__((target_clones("avx512f", "avx2", "default")))
static uint32_t block_magnitude(const float* __restrict x, int64_t m) {
  uint32_t top = 0;
  for (int64_t e = 0; e < m; ++e) top = std::max(top, so_magnitude(x[e]));
  return top;
}

// Blockwise 8-bit quantisation (scratchopt.quantization): the codes of `values` (float32, n) into
// `codes` (uint8, n) and each block's absolute maximum into `maxima` (the bytes of a float32 per block of
// 256), as quantize_in_torch defines them.
// `vector`: the block helpers' vector extension (SO_VECTOR's values), -1 for the CPU's; no more than
// the CPU has.
static int vector_level(int64_t vector) {
  TORCH_CHECK(vector <= so_cpu_vector, "this CPU has no vector extension ", vector);
  return vector < 0 ? so_cpu_vector : static_cast<int>(vector);
}

static void quantize_blockwise(const at::Tensor& values, at::Tensor& codes_out, at::Tensor& maxima_out,
                               const at::Tensor& lookup, int64_t vector) {
  const int level = vector_level(vector);
  const int64_t n = values.numel(), blocks = (n + 255) / 256;
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.is_contiguous(), "float32 contiguous values");
  TORCH_CHECK(codes_out.scalar_type() == at::kByte && codes_out.is_contiguous() && codes_out.numel() == n, "codes");
  TORCH_CHECK(maxima_out.scalar_type() == at::kByte && maxima_out.is_contiguous() && maxima_out.numel() == 4 * blocks,
              "maxima");
  TORCH_CHECK(lookup.numel() == 65536 && lookup.scalar_type() == at::kInt && lookup.is_contiguous(), "the lookup");
  const float* x = values.data_ptr<float>();
  uint8_t* codes = codes_out.data_ptr<uint8_t>();
  uint8_t* maxima = maxima_out.data_ptr<uint8_t>();
  const int32_t* table = lookup.data_ptr<int32_t>();
  split(blocks, 128, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * 256, hi = std::min(n, lo + 256);
      so_quantize_block(x + lo, hi - lo, block_magnitude(x + lo, hi - lo), codes + lo, maxima + 4 * b, table, level);
    }
  });
  if (!codes_out.is_inference()) codes_out.unsafeGetTensorImpl()->bump_version();
}

// The float32 values of codes and their blocks' maxima: map[c_i] * a_b.
static void dequantize_blockwise(const at::Tensor& codes_in, const at::Tensor& maxima_in, at::Tensor& out,
                                 const at::Tensor& map, int64_t vector) {
  const int level = vector_level(vector);
  const int64_t n = out.numel(), blocks = (n + 255) / 256;
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous(), "float32 contiguous output");
  TORCH_CHECK(codes_in.scalar_type() == at::kByte && codes_in.is_contiguous() && codes_in.numel() == n, "codes");
  TORCH_CHECK(maxima_in.scalar_type() == at::kByte && maxima_in.is_contiguous() && maxima_in.numel() == 4 * blocks,
              "maxima");
  TORCH_CHECK(map.scalar_type() == at::kFloat && map.numel() == 256, "the map");
  const uint8_t* codes = codes_in.data_ptr<uint8_t>();
  const uint8_t* maxima = maxima_in.data_ptr<uint8_t>();
  const float* table = map.data_ptr<float>();
  float* y = out.data_ptr<float>();
  split(blocks, 128, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float a;
      std::memcpy(&a, maxima + 4 * b, 4);
      const int64_t lo = b * 256, hi = std::min(n, lo + 256);
      so_dequantize_block(codes + lo, hi - lo, a, table, y + lo, level);
    }
  });
  if (!out.is_inference()) out.unsafeGetTensorImpl()->bump_version();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Tables>(m, "Tables")
      .def(py::init<py::list, py::dict, py::tuple, bool, py::tuple, uint64_t, py::tuple, int64_t>())
      .def_readonly("status", &Tables::status)
      .def_readonly("uniform", &Tables::uniform)
      .def_readonly("steps", &Tables::steps)
      .def_readonly("total", &Tables::total)
      .def_readonly("counted", &Tables::counted)
      .def_readonly("pattern", &Tables::pattern)
      .def_readonly("narrow", &Tables::narrow)
      .def_readonly("narrow_params", &Tables::narrow_params)
      .def_readonly("quantized", &Tables::quantized)
      .def_readonly("params", &Tables::params)
      .def("size", &Tables::size)
      .def("advance", &Tables::advance)
      .def("launch", &Tables::launch);
  m.def("first_mismatch", &first_mismatch);
  m.def("scalars", &scalars);
  m.def("round_stochastically", &round_stochastically);
  m.def("quantize_blockwise", &quantize_blockwise, py::arg("values"), py::arg("codes"), py::arg("maxima"),
        py::arg("lookup"), py::arg("vector") = -1);
  m.def("dequantize_blockwise", &dequantize_blockwise, py::arg("codes"), py::arg("maxima"), py::arg("out"),
        py::arg("map"), py::arg("vector") = -1);
  m.def("cpu_vector", [] { return so_cpu_vector; });
}
"""

_SOURCE = _SOURCE.replace("SO_MIN_NUMEL", str(quantization.MIN_NUMEL)).replace(
    "SO_SHARED_HELPERS", native.ROUNDING_HELPERS + native.PACKED_HELPERS
)

_module: Any = None
_state = "new"  # new → building → ready | failed
_lock = threading.Lock()
#: The extension's name: a new source gets a new name, so a process never mixes two builds.
_FLAGS = ("-O3",)
NAME = "scratchopt_runtime_" + hashlib.sha256("\n".join([_SOURCE, *_FLAGS]).encode()).hexdigest()[:12]


def build_directory() -> Path:
    from scratchopt.strategies.kernels.native import cache_dir

    return cache_dir().parent / f"runtime-torch{torch.__version__.replace('+', '_')}"


def _load() -> Any:
    """Build (if needed) and import the extension in this process."""
    from torch.utils.cpp_extension import load_inline

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_inline(
            NAME,
            cpp_sources=[_SOURCE],
            build_directory=str(directory),
            extra_cflags=list(_FLAGS),
            verbose=False,
        )


def _build(in_process: bool) -> None:
    """Build the extension; in this process, load it too. In the background only the compiler runs, in a
    child process that finishes (and leaves the cache complete) even if this process exits first; the
    extension is then imported by the next :func:`get` on the caller's thread (importing it on a
    background thread can abort a process that exits meanwhile)."""
    global _module, _state
    try:
        if in_process:
            _module, _state = _load(), "ready"
            return
        subprocess.run(
            [sys.executable, "-c", "from scratchopt.strategies.kernels import runtime; runtime._load()"],
            check=True,
            capture_output=True,
            timeout=900,
        )
        _state = "built"
    except Exception as error:  # no compiler, no headers: the Python path serves
        _state = "failed"
        detail = (
            error.stderr.decode(errors="replace")[-1000:] if isinstance(error, subprocess.CalledProcessError) else error
        )
        warnings.warn(
            f"scratchopt: the native runtime did not build ({type(error).__name__}: {detail}); "
            "impl='fused' builds its tables in Python",
            RuntimeWarning,
            stacklevel=2,
        )


def state() -> str:
    """``new``, ``building``, ``built`` (not yet imported), ``ready`` or ``failed``."""
    return _state


def ready() -> Any:
    """The runtime module if it is built, else None (never starts a build)."""
    return _module if _state == "ready" else None


def get() -> Any:
    """The runtime module, or None while it builds (the first call starts the build) or where it cannot."""
    global _module, _state
    if _state == "ready":
        return _module
    if _state == "built":
        with _lock:
            if _state == "built":
                try:
                    _module, _state = _load(), "ready"
                except Exception as error:
                    _state = "failed"
                    warnings.warn(
                        f"scratchopt: the native runtime did not load ({error})", RuntimeWarning, stacklevel=2
                    )
        return _module if _state == "ready" else None
    if _state != "new":
        return None
    probe = torch.zeros(())
    if hash(probe) != id(probe):  # the runtime finds a tensor's state by the hash torch gives it
        _state = "failed"
        return None
    with _lock:
        if _state == "new":
            mode = os.environ.get("SCRATCHOPT_RUNTIME", "background")
            if mode == "0":
                _state = "failed"
                return None
            _state = "building"
            if mode == "wait":
                _build(in_process=True)
            else:
                threading.Thread(target=_build, args=(False,), name="scratchopt-runtime-build", daemon=True).start()
    return _module if _state == "ready" else None
