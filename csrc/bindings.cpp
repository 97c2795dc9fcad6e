// Schemas of the compiled ops (namespace lora_fast_C; lora_fast/ops.py wraps them in the public
// lora_fast:: custom ops) and the small Python module lora_fast._C.
// Device kernels register themselves: lora_cpu.cpp for CPU, lora_cuda_binding.cpp for CUDA.

#include <torch/extension.h>
#include <torch/library.h>

#include <string>

namespace lora_fast {
namespace cpu {
std::string isa_name();
}  // namespace cpu
}  // namespace lora_fast

TORCH_LIBRARY(lora_fast_C, m) {
  m.def(
      "lora_shrink(Tensor x, Tensor A, Tensor token_order, Tensor segment_starts, "
      "Tensor segment_lengths, Tensor? ranks) -> Tensor");
  m.def(
      "lora_expand_(Tensor t, Tensor B, Tensor token_order, Tensor segment_starts, "
      "Tensor segment_lengths, Tensor scales, Tensor? ranks, Tensor(a!) out) -> ()");
  m.def(
      "lora_delta_(Tensor x, Tensor A, Tensor B, Tensor token_order, Tensor segment_starts, "
      "Tensor segment_lengths, Tensor scales, Tensor? ranks, Tensor(a!) out) -> ()");
  m.def(
      "lora_delta_backward(Tensor grad_out, Tensor x, Tensor A, Tensor B, Tensor token_order, "
      "Tensor segment_starts, Tensor segment_lengths, Tensor scales, Tensor? ranks, Tensor? grad_slots, "
      "bool needs_x, bool needs_A, bool needs_B) -> (Tensor, Tensor, Tensor)");
}

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
}
