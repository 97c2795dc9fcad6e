// CUDA implementations of the lora_fast_C ops: check the call, turn tensors into LoraArgs and launch
// on the current stream. Built only when torch has CUDA (setup.py defines LORA_FAST_WITH_CUDA).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "lora_cuda.h"

namespace lora_fast {
namespace cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK_TYPE(false, "lora_fast CUDA kernels take float32, float16, bfloat16 or float64, got ",
                              t.scalar_type());
  }
}

at::ScalarType acc_dtype(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor row_major(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// Metadata stays on the device: only shapes are checked here, so the op never synchronises.
LoraArgs metadata_args(int64_t num_tokens, int64_t num_slots, const at::Tensor& token_order,
                       const at::Tensor& segment_starts, const at::Tensor& segment_lengths,
                       const std::optional<at::Tensor>& ranks) {
  TORCH_CHECK_VALUE(token_order.dim() == 1 && token_order.size(0) == num_tokens &&
                        token_order.scalar_type() == at::kLong && token_order.is_contiguous(),
                    "token_order must be a contiguous int64 tensor with one entry per token");
  for (const at::Tensor* t : {&segment_starts, &segment_lengths})
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == num_slots && t->scalar_type() == at::kLong &&
                          t->is_contiguous(),
                      "segment_starts and segment_lengths must be contiguous int64 tensors with one entry per slot");
  LoraArgs a;
  a.token_order = token_order.const_data_ptr<int64_t>();
  a.segment_starts = segment_starts.const_data_ptr<int64_t>();
  a.segment_lengths = segment_lengths.const_data_ptr<int64_t>();
  if (ranks.has_value()) {
    TORCH_CHECK_VALUE(ranks->dim() == 1 && ranks->size(0) == num_slots && ranks->scalar_type() == at::kLong &&
                          ranks->is_contiguous(),
                      "ranks must be a contiguous int64 tensor with one entry per slot");
    a.ranks = ranks->const_data_ptr<int64_t>();
  }
  a.num_tokens = num_tokens;
  a.num_slots = num_slots;
  return a;
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

at::Tensor lora_shrink(const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& token_order,
                       const at::Tensor& segment_starts, const at::Tensor& segment_lengths,
                       const std::optional<at::Tensor>& ranks) {
  TORCH_CHECK_VALUE(x_in.dim() == 2 && A_in.dim() == 3 && A_in.size(2) == x_in.size(1),
                    "lora_shrink expects x [T, d_in] and A [S, r_max, d_in]");
  TORCH_CHECK_TYPE(x_in.scalar_type() == A_in.scalar_type(), "x and A must share a dtype");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = row_major(x_in);
  const at::Tensor A = A_in.contiguous();
  at::Tensor t = at::zeros({x.size(0), A.size(1)}, x.options().dtype(acc_dtype(x.scalar_type())));
  LoraArgs a = metadata_args(x.size(0), A.size(0), token_order, segment_starts, segment_lengths, ranks);
  a.dtype = dtype_of(x);
  a.x = x.const_data_ptr();
  a.x_row_stride = x.stride(0);
  a.A = A.const_data_ptr();
  a.t = t.mutable_data_ptr();
  a.t_row_stride = t.stride(0);
  a.r_max = A.size(1);
  a.d_in = A.size(2);
  check(launch_lora_shrink(a, c10::cuda::getCurrentCUDAStream()), "lora_shrink");
  return t;
}

// Checks and fills what an expand needs besides t: B, scales and out.
void set_expand_args(LoraArgs& a, int64_t num_tokens, const at::Tensor& B, const at::Tensor& scales, at::Tensor& out) {
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == num_tokens && out.size(1) == B.size(1) &&
                        (out.size(1) <= 1 || out.stride(1) == 1),
                    "out must be [T, d_out] with unit stride along d_out");
  TORCH_CHECK_TYPE(out.scalar_type() == B.scalar_type(), "out and B must share a dtype");
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == B.size(0) &&
                        scales.scalar_type() == acc_dtype(B.scalar_type()),
                    "scales must have one entry per slot, in the accumulator dtype");
  a.dtype = dtype_of(B);
  a.B = B.const_data_ptr();
  a.b_slot_stride = B.stride(0);
  a.b_out_stride = B.stride(1);
  a.b_rank_stride = B.stride(2);
  a.scales = scales.const_data_ptr();
  a.out = out.mutable_data_ptr();
  a.out_row_stride = out.stride(0);
  a.r_max = B.size(2);
  a.d_out = B.size(1);
}

void expand_into(LoraArgs a, const at::Tensor& t, const at::Tensor& B, const at::Tensor& scales, at::Tensor& out) {
  set_expand_args(a, t.size(0), B, scales, out);
  a.t = const_cast<void*>(t.const_data_ptr());
  a.t_row_stride = t.stride(0);
  check(launch_lora_expand(a, c10::cuda::getCurrentCUDAStream()), "lora_expand");
}

void lora_expand_(const at::Tensor& t_in, const at::Tensor& B_in, const at::Tensor& token_order,
                  const at::Tensor& segment_starts, const at::Tensor& segment_lengths,
                  const at::Tensor& scales_in, const std::optional<at::Tensor>& ranks, at::Tensor& out,
                  bool accumulate) {
  TORCH_CHECK_VALUE(B_in.dim() == 3 && t_in.dim() == 2 && t_in.size(1) == B_in.size(2),
                    "lora_expand expects t [T, r_max] and B [S, d_out, r_max]");
  const c10::cuda::CUDAGuard guard(out.device());
  if (!accumulate) out.zero_();  // (the Triton backend's expand writes instead; this one adds)
  const at::Tensor B = B_in.contiguous();
  const at::Tensor t = row_major(t_in.to(acc_dtype(B.scalar_type())));
  const at::Tensor scales = scales_in.to(acc_dtype(B.scalar_type())).contiguous();
  LoraArgs a = metadata_args(t.size(0), B.size(0), token_order, segment_starts, segment_lengths, ranks);
  expand_into(a, t, B, scales, out);
}

void lora_delta_(const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& B_in,
                 const at::Tensor& token_order, const at::Tensor& segment_starts,
                 const at::Tensor& segment_lengths, const at::Tensor& scales_in,
                 const std::optional<at::Tensor>& ranks, at::Tensor& out, bool accumulate) {
  TORCH_CHECK_VALUE(x_in.dim() == 2 && A_in.dim() == 3 && B_in.dim() == 3 && A_in.size(2) == x_in.size(1) &&
                        B_in.size(2) == A_in.size(1) && B_in.size(0) == A_in.size(0),
                    "lora_delta expects x [T, d_in], A [S, r_max, d_in], B [S, d_out, r_max]");
  TORCH_CHECK_TYPE(x_in.scalar_type() == A_in.scalar_type() && x_in.scalar_type() == B_in.scalar_type(),
                   "x, A and B must share a dtype");
  const c10::cuda::CUDAGuard guard(x_in.device());
  if (!accumulate) out.zero_();
  const at::Tensor x = row_major(x_in);
  const at::Tensor A = A_in.contiguous();
  const at::Tensor scales = scales_in.to(acc_dtype(x_in.scalar_type())).contiguous();
  LoraArgs a = metadata_args(x.size(0), A.size(0), token_order, segment_starts, segment_lengths, ranks);
  a.dtype = dtype_of(x);
  a.x = x.const_data_ptr();
  a.x_row_stride = x.stride(0);
  a.A = A.const_data_ptr();
  a.r_max = A.size(1);
  a.d_in = A.size(2);
  if (x.size(0) <= kFusedMaxTokens) {
    // B through its own strides (no copy of a rank-major stack per call)
    set_expand_args(a, x.size(0), B_in, scales, out);
    const int64_t bytes = x.element_size();
    a.vector_loads = reinterpret_cast<uintptr_t>(a.x) % 16 == 0 && reinterpret_cast<uintptr_t>(a.A) % 16 == 0 &&
                     (a.x_row_stride * bytes) % 16 == 0 && (a.d_in * bytes) % 16 == 0;
    check(launch_lora_delta_fused(a, c10::cuda::getCurrentCUDAStream()), "lora_delta (fused)");
    return;
  }
  const at::Tensor B = B_in.contiguous();
  // The shrink writes every entry the expand reads (rank-k columns of tokens with a slot).
  at::Tensor t = at::empty({x.size(0), A.size(1)}, x.options().dtype(acc_dtype(x.scalar_type())));
  a.t = t.mutable_data_ptr();
  a.t_row_stride = t.stride(0);
  check(launch_lora_shrink(a, c10::cuda::getCurrentCUDAStream()), "lora_shrink");
  expand_into(a, t, B, scales, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_fast_C, CUDA, m) {
  m.impl("lora_shrink", &lora_shrink);
  m.impl("lora_expand_", &lora_expand_);
  m.impl("lora_delta_", &lora_delta_);
}

}  // namespace cuda
}  // namespace lora_fast
