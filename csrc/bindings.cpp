// Schemas of the compiled ops (namespace lora_fast_C; lora_fast/ops.py wraps them in the public
// lora_fast:: custom ops) and the small Python module lora_fast._C.
// Device kernels register themselves: lora_cpu.cpp for CPU, lora_cuda_binding.cpp for CUDA.

#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <utility>
#include <vector>

namespace lora_fast {
namespace cpu {
std::string isa_name();
at::Tensor fused_lora_linear(const at::Tensor& x, const at::Tensor& W, const std::optional<at::Tensor>& bias,
                             const at::Tensor& A, const at::Tensor& B, const at::Tensor& token_order,
                             const at::Tensor& segment_starts, const at::Tensor& segment_lengths,
                             const at::Tensor& scales, const std::optional<at::Tensor>& ranks);
at::Tensor linear_then_delta(const at::Tensor& x, const at::Tensor& W, const std::optional<at::Tensor>& bias,
                             const at::Tensor& A, const at::Tensor& B, const at::Tensor& token_order,
                             const at::Tensor& segment_starts, const at::Tensor& segment_lengths,
                             const at::Tensor& scales, const std::optional<at::Tensor>& ranks);
}  // namespace cpu
}  // namespace lora_fast

TORCH_LIBRARY(lora_fast_C, m) {
  m.def(
      "lora_shrink(Tensor x, Tensor A, Tensor token_order, Tensor segment_starts, "
      "Tensor segment_lengths, Tensor? ranks) -> Tensor");
  m.def(
      "lora_expand_(Tensor t, Tensor B, Tensor token_order, Tensor segment_starts, "
      "Tensor segment_lengths, Tensor scales, Tensor? ranks, Tensor(a!) out, bool accumulate=True) -> ()");
  m.def(
      "lora_delta_(Tensor x, Tensor A, Tensor B, Tensor token_order, Tensor segment_starts, "
      "Tensor segment_lengths, Tensor scales, Tensor? ranks, Tensor(a!) out, bool accumulate=True) -> ()");
  m.def(
      "lora_delta_backward(Tensor grad_out, Tensor x, Tensor A, Tensor B, Tensor token_order, "
      "Tensor segment_starts, Tensor segment_lengths, Tensor scales, Tensor? ranks, Tensor? grad_slots, "
      "bool needs_x, bool needs_A, bool needs_B, Tensor? t=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "fused_lora_linear(Tensor x, Tensor W, Tensor? bias, Tensor A, Tensor B, Tensor token_order, "
      "Tensor segment_starts, Tensor segment_lengths, Tensor scales, Tensor? ranks) -> Tensor");
}

namespace {

// The stamp rows of a list of tensors: the checks changed_since and adapters_changed share, and
// the first links of each tensor's chain of dependent loads (Python object, then TensorImpl, then
// version counter / storage), each pass prefetching what the next one reads.
struct StampedTensors {
  std::vector<const c10::TensorImpl*> impls;
  const int64_t* row_of;

  StampedTensors(const pybind11::list& tensors, const at::Tensor& stamps, const at::Tensor& rows) {
    const int64_t n = static_cast<int64_t>(pybind11::len(tensors));
    TORCH_CHECK_VALUE(stamps.device().is_cpu() && stamps.scalar_type() == at::kLong && stamps.is_contiguous() &&
                          stamps.dim() == 2 && stamps.size(1) == 2,
                      "stamps must be a contiguous CPU int64 tensor of shape [rows, 2]");
    TORCH_CHECK_VALUE(rows.device().is_cpu() && rows.scalar_type() == at::kLong && rows.is_contiguous() &&
                          rows.dim() == 1 && rows.size(0) == n,
                      "rows must be a contiguous CPU int64 tensor naming one stamp row per tensor");
    row_of = rows.const_data_ptr<int64_t>();
    PyObject** items = PySequence_Fast_ITEMS(tensors.ptr());
    for (int64_t i = 0; i < n; ++i) __builtin_prefetch(items[i]);
    impls.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK_TYPE(THPVariable_Check(items[i]), "tensors[", i, "] is not a tensor");
      TORCH_CHECK_VALUE(row_of[i] >= 0 && row_of[i] < stamps.size(0), "rows[", i, "] is out of range");
      // Read in place: no reference taken, so the loop writes to no tensor's cache line.
      impls[i] = THPVariable_Unpack(items[i]).unsafeGetTensorImpl();
      for (int line = 0; line < 4; ++line) __builtin_prefetch(reinterpret_cast<const char*>(impls[i]) + 64 * line);
    }
  }

  int64_t size() const { return static_cast<int64_t>(impls.size()); }

  // tensor i's (version, data pointer) now
  std::pair<int64_t, int64_t> stamp(int64_t i) const {
    const c10::TensorImpl* impl = impls[i];
    return {static_cast<int64_t>(impl->version_counter().current_version()),
            reinterpret_cast<int64_t>(impl->storage().data()) +
                impl->storage_offset() * static_cast<int64_t>(impl->itemsize())};
  }
};

// For each tensor i: has its (version counter, data pointer) moved from its stamp, row rows[i]
// of stamps? Returns the indices i that did and writes their new stamps. One call checks a
// whole list of parameters for in-place updates (version) or new storage (data pointer),
// without a Python attribute read per tensor. After a model's big GEMMs these objects are cold
// in cache and each check is a chain of dependent loads (Python object, TensorImpl, version
// counter / storage), so the chains advance for every tensor at once, one link per pass, with
// the next link prefetched: the misses of one pass overlap instead of queueing.
std::vector<int64_t> changed_since(const pybind11::list& tensors, at::Tensor& stamps, const at::Tensor& rows) {
  const StampedTensors stamped(tensors, stamps, rows);
  int64_t* stamp = stamps.data_ptr<int64_t>();
  std::vector<int64_t> changed;
  for (int64_t i = 0; i < stamped.size(); ++i) {
    const auto now = stamped.stamp(i);
    int64_t* row = stamp + 2 * stamped.row_of[i];
    if (row[0] != now.first || row[1] != now.second) {
      row[0] = now.first;
      row[1] = now.second;
      changed.push_back(i);
    }
  }
  return changed;
}

// Read only: true when any tensor's (version, data pointer) left its stamp (as changed_since
// would find) or any scaling[names[i]] is not the float seen[i] (NaN: none seen yet; a missing
// name or a value of another type counts as changed too). accelerate()'s short path asks this
// before each call and runs its full sync only on true, so the common case costs one call whose
// misses overlap: the tensors' chains as in changed_since, the dict lookups of every name, then
// the loads of every value, each pass prefetching what the next one reads.
bool adapters_changed(const pybind11::list& tensors, const at::Tensor& stamps, const at::Tensor& rows,
                      const pybind11::dict& scaling, const pybind11::list& names, const at::Tensor& seen) {
  const int64_t m = static_cast<int64_t>(pybind11::len(names));
  TORCH_CHECK_VALUE(seen.device().is_cpu() && seen.scalar_type() == at::kDouble && seen.is_contiguous() &&
                        seen.dim() == 1 && seen.size(0) == m,
                    "seen must be a contiguous CPU float64 tensor with one value per name");
  const double* seen_value = seen.const_data_ptr<double>();
  PyObject** keys = PySequence_Fast_ITEMS(names.ptr());
  for (int64_t j = 0; j < m; ++j) __builtin_prefetch(keys[j]);
  __builtin_prefetch(scaling.ptr());
  const StampedTensors stamped(tensors, stamps, rows);
  std::vector<PyObject*> values(m);
  for (int64_t j = 0; j < m; ++j) {
    values[j] = PyDict_GetItemWithError(scaling.ptr(), keys[j]);  // borrowed
    if (values[j] == nullptr) {
      if (PyErr_Occurred()) throw pybind11::error_already_set();
      return true;
    }
    __builtin_prefetch(values[j]);
  }
  const int64_t* stamp = stamps.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < stamped.size(); ++i) {
    const auto now = stamped.stamp(i);
    const int64_t* row = stamp + 2 * stamped.row_of[i];
    if (row[0] != now.first || row[1] != now.second) return true;
  }
  for (int64_t j = 0; j < m; ++j) {
    if (!PyFloat_CheckExact(values[j]) || PyFloat_AS_DOUBLE(values[j]) != seen_value[j]) return true;
  }
  return false;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lora_fast compiled kernels; the ops live in torch.ops.lora_fast_C";
  m.def("cuda_compiled", [] {
#ifdef LORA_FAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the extension was built with its CUDA kernels");
  m.def("cpu_isa", &lora_fast::cpu::isa_name, "Instruction set the CPU kernels run with here");
  m.def("fused_lora_linear_cpu", &lora_fast::cpu::fused_lora_linear,
        "The CPU kernel of torch.ops.lora_fast_C.fused_lora_linear, called without the dispatcher");
  m.def("linear_then_delta_cpu", &lora_fast::cpu::linear_then_delta,
        "at::linear(x, W, bias), then the CPU kernel of lora_fast_C.lora_delta_ added into it");
  m.def("adapters_changed", &adapters_changed,
        "Whether any tensor left its stamp or any scaling[names[i]] is not the float seen[i] (read only)",
        pybind11::arg("tensors"), pybind11::arg("stamps"), pybind11::arg("rows"), pybind11::arg("scaling"),
        pybind11::arg("names"), pybind11::arg("seen"));
  m.def("changed_since", &changed_since, "Indices of tensors whose (version, data pointer) left stamps",
        pybind11::arg("tensors"), pybind11::arg("stamps"), pybind11::arg("rows"));
}
