// Launchers for the CUDA multi-adapter LoRA kernels. Plain CUDA: no torch headers, so the kernels
// compile (and are compile-checked in CI) with nvcc alone; lora_cuda_binding.cpp wires them to
// torch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lora_fast {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16, kFloat64 };

// One call's tensors as raw pointers. Token metadata is what lora_fast.AdapterBatch holds:
// token_order (token indices sorted by slot, no-adapter tokens first) and, per slot, the start and
// length of its segment in token_order. ranks may be null (every slot has rank r_max); a rank
// outside [0, r_max] is clamped, never read past.
struct LoraArgs {
  DType dtype = DType::kFloat32;
  const void* x = nullptr;  // [T, d_in], rows x_row_stride apart, unit inner stride
  int64_t x_row_stride = 0;
  const void* A = nullptr;  // [S, r_max, d_in] contiguous
  const void* B = nullptr;  // [S, d_out, r_max]: contiguous for the two-launch path, any strides
                            // (b_*_stride, in elements) for the fused one
  int64_t b_slot_stride = 0;
  int64_t b_out_stride = 0;
  int64_t b_rank_stride = 0;
  const void* scales = nullptr;  // [S] in the accumulator dtype, like t
  const int64_t* ranks = nullptr;  // [S] or null
  const int64_t* token_order = nullptr;  // [T]
  const int64_t* segment_starts = nullptr;  // [S]
  const int64_t* segment_lengths = nullptr;  // [S]
  void* t = nullptr;  // [T, r_max] accumulator dtype (fp32, fp64 for fp64 inputs)
  int64_t t_row_stride = 0;
  void* out = nullptr;  // [T, d_out], rows out_row_stride apart
  int64_t out_row_stride = 0;
  int64_t num_tokens = 0;
  int64_t num_slots = 0;
  int64_t r_max = 0;
  int64_t d_in = 0;
  int64_t d_out = 0;
  // x rows and A rows start on 16-byte boundaries (and d_in fills whole 16-byte vectors): the
  // fused kernel's shrink then reads them 16 bytes at a time
  bool vector_loads = false;
};

// t[token, :k] = A[slot, :k] @ x[token] for every token with a slot; other entries untouched.
cudaError_t launch_lora_shrink(const LoraArgs& args, cudaStream_t stream);
// out[token] += scales[slot] * B[slot, :, :k] @ t[token, :k] for every token with a slot.
cudaError_t launch_lora_expand(const LoraArgs& args, cudaStream_t stream);
// Both in one launch (no t): out[token] += scales[slot] * B[slot, :, :k] @ A[slot, :k] @ x[token].
// Blocks (token position, output tile), about kFusedBlocks of them: each repeats its token's
// shrink (from L2 after the first) and expands its tile.
cudaError_t launch_lora_delta_fused(const LoraArgs& args, cudaStream_t stream);

// Batches up to this many tokens take the fused launch.
constexpr int64_t kFusedMaxTokens = 64;

}  // namespace cuda
}  // namespace lora_fast
