// CUDA kernels for the multi-adapter LoRA shrink and expand (lora_delta = shrink into an fp32
// workspace, then expand), and a one-launch fused delta for small batches (decode). One block
// per token position in adapter-sorted order; each block finds its slot by binary search over the
// segment starts, so there is no host synchronisation and the launches can be captured in a CUDA
// graph. Straightforward and correct; the tuned kernels for large batches are the Triton ones.

#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "lora_cuda.h"

namespace lora_fast {
namespace cuda {
namespace {

constexpr int kShrinkWarps = 4;
constexpr int kShrinkUnroll = 4;  // 16-byte loads a lane of shrink_token_vectors issues at once
constexpr int kExpandThreads = 256;
constexpr int kFusedThreads = 256;
constexpr int64_t kFusedBlocks = 256;  // spread a decode batch over about this many blocks
constexpr int64_t kFusedMinOutputs = 128;  // but give each block at least this many outputs
constexpr size_t kMaxSharedBytes = 48 * 1024;

template <typename scalar_t>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(typename AccOf<scalar_t>::type v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Slot whose segment holds sorted position p, or -1 for the no-adapter prefix. An empty segment
// starts where the next non-empty one does, so the last start <= p belongs to p's segment.
__device__ __forceinline__ int64_t slot_at(const LoraArgs& a, int64_t p) {
  int64_t lo = 0, hi = a.num_slots;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (a.segment_starts[mid] <= p) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  const int64_t s = lo - 1;
  if (s < 0 || p >= a.segment_starts[s] + a.segment_lengths[s]) return -1;
  return s;
}

__device__ __forceinline__ int64_t rank_of(const LoraArgs& a, int64_t s) {
  if (a.ranks == nullptr) return a.r_max;
  const int64_t r = a.ranks[s];
  return r < 0 ? 0 : (r > a.r_max ? a.r_max : r);
}

// What a block works on: the token at a sorted position, its slot and the slot's rank.
struct TokenWork {
  int64_t token;
  int64_t slot;
  int64_t rank;
};

// False for a position of the no-adapter prefix (the block has nothing to do).
__device__ __forceinline__ bool locate(const LoraArgs& a, int64_t p, TokenWork& work) {
  work.slot = slot_at(a, p);
  if (work.slot < 0) return false;
  work.rank = rank_of(a, work.slot);
  work.token = a.token_order[p];
  return true;
}

// dst[j] = scale * dot(A[j], x) for j < k: warps take rank rows in turn, lanes stride over d_in
// (coalesced) and reduce by shuffle.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void shrink_token(const scalar_t* x, const scalar_t* A, int64_t d_in, int64_t k,
                                             acc_t scale, acc_t* dst) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warps = blockDim.x / 32;
  for (int64_t j = warp; j < k; j += warps) {
    const scalar_t* row = A + j * d_in;
    acc_t sum = 0;
    for (int64_t c = lane; c < d_in; c += 32) sum += to_acc(x[c]) * to_acc(row[c]);
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) dst[j] = sum * scale;
  }
}

// y[n] += sum_j t_scaled[j] * B[n][j] for this thread's kPerThread outputs of the block's tile.
template <typename scalar_t, typename acc_t, int kPerThread>
__device__ __forceinline__ void expand_token(const scalar_t* B, const acc_t* t_scaled, int64_t k, int64_t r_max,
                                             int64_t d_out, scalar_t* y) {
  const int64_t tile = static_cast<int64_t>(blockIdx.y) * blockDim.x * kPerThread;
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t n = tile + i * blockDim.x + threadIdx.x;
    if (n >= d_out) return;
    const scalar_t* b_row = B + n * r_max;
    acc_t sum = 0;
    for (int64_t j = 0; j < k; ++j) sum += t_scaled[j] * to_acc(b_row[j]);
    y[n] = from_acc<scalar_t>(to_acc(y[n]) + sum);
  }
}

template <typename scalar_t>
__global__ void shrink_kernel(const LoraArgs a) {
  using acc_t = typename AccOf<scalar_t>::type;
  TokenWork w;
  if (!locate(a, blockIdx.x, w)) return;
  const scalar_t* x = static_cast<const scalar_t*>(a.x) + w.token * a.x_row_stride;
  const scalar_t* A = static_cast<const scalar_t*>(a.A) + w.slot * a.r_max * a.d_in;
  acc_t* t = static_cast<acc_t*>(a.t) + w.token * a.t_row_stride;
  shrink_token<scalar_t, acc_t>(x, A, a.d_in, w.rank, acc_t(1), t);
}

// Block (position, output tile): the scaled rank-k row of t in shared memory, one output per thread.
template <typename scalar_t>
__global__ void expand_kernel(const LoraArgs a) {
  using acc_t = typename AccOf<scalar_t>::type;
  extern __shared__ unsigned char shared_bytes[];
  acc_t* t_scaled = reinterpret_cast<acc_t*>(shared_bytes);
  TokenWork w;
  if (!locate(a, blockIdx.x, w)) return;
  const acc_t* t = static_cast<const acc_t*>(a.t) + w.token * a.t_row_stride;
  const acc_t scale = static_cast<const acc_t*>(a.scales)[w.slot];
  for (int64_t j = threadIdx.x; j < w.rank; j += blockDim.x) t_scaled[j] = t[j] * scale;
  __syncthreads();
  const scalar_t* B = static_cast<const scalar_t*>(a.B) + w.slot * a.d_out * a.r_max;
  scalar_t* y = static_cast<scalar_t*>(a.out) + w.token * a.out_row_stride;
  expand_token<scalar_t, acc_t, 1>(B, t_scaled, w.rank, a.r_max, a.d_out, y);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t dot_vectors(const uint4& xv, const uint4& av) {
  constexpr int kPerVector = 16 / sizeof(scalar_t);
  const scalar_t* xs = reinterpret_cast<const scalar_t*>(&xv);
  const scalar_t* as = reinterpret_cast<const scalar_t*>(&av);
  acc_t sum = 0;
#pragma unroll
  for (int e = 0; e < kPerVector; ++e) sum += to_acc(xs[e]) * to_acc(as[e]);
  return sum;
}

// shrink_token with 16-byte loads of x and the rank rows of A (both aligned, d_in a whole number
// of vectors): each lane reads 16 / sizeof(scalar_t) elements per load instead of one, and issues
// the loads of kShrinkUnroll vectors before it uses any (separate sums), so a lane has that many
// requests to memory in flight rather than one: at decode a block's shrink is a few rounds of
// memory latency, not a chain of one round per 32 vectors of a row.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void shrink_token_vectors(const scalar_t* x, const scalar_t* A, int64_t d_in, int64_t k,
                                                     acc_t scale, acc_t* dst) {
  constexpr int kPerVector = 16 / sizeof(scalar_t);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warps = blockDim.x / 32;
  const int64_t vectors = d_in / kPerVector;
  const uint4* x_vectors = reinterpret_cast<const uint4*>(x);
  for (int64_t j = warp; j < k; j += warps) {
    const uint4* row = reinterpret_cast<const uint4*>(A + j * d_in);
    acc_t sums[kShrinkUnroll] = {};
    int64_t v = lane;
    for (; v + (kShrinkUnroll - 1) * 32 < vectors; v += kShrinkUnroll * 32) {
      uint4 xv[kShrinkUnroll], av[kShrinkUnroll];
#pragma unroll
      for (int u = 0; u < kShrinkUnroll; ++u) {
        xv[u] = x_vectors[v + u * 32];
        av[u] = row[v + u * 32];
      }
#pragma unroll
      for (int u = 0; u < kShrinkUnroll; ++u) sums[u] += dot_vectors<scalar_t, acc_t>(xv[u], av[u]);
    }
    for (; v < vectors; v += 32) sums[0] += dot_vectors<scalar_t, acc_t>(x_vectors[v], row[v]);
    acc_t sum = 0;
#pragma unroll
    for (int u = 0; u < kShrinkUnroll; ++u) sum += sums[u];
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) dst[j] = sum * scale;
  }
}

// One launch for the whole delta of small batches (decode), BGMV style: block (position, output
// tile) shrinks its token into shared memory (every output tile of a token repeats that shrink,
// reading A from L2 after the first tile; for a few tokens that is cheaper than a second launch),
// then adds its tile of outputs, one per thread at a time, reading B through its strides (the
// stacks keep B rank-major: consecutive threads then read consecutive addresses).
template <typename scalar_t>
__global__ void delta_fused_kernel(const LoraArgs a) {
  using acc_t = typename AccOf<scalar_t>::type;
  extern __shared__ unsigned char shared_bytes[];
  acc_t* t_scaled = reinterpret_cast<acc_t*>(shared_bytes);
  TokenWork w;
  if (!locate(a, blockIdx.x, w)) return;
  const scalar_t* x = static_cast<const scalar_t*>(a.x) + w.token * a.x_row_stride;
  const scalar_t* A = static_cast<const scalar_t*>(a.A) + w.slot * a.r_max * a.d_in;
  const acc_t scale = static_cast<const acc_t*>(a.scales)[w.slot];
  if (a.vector_loads) {
    shrink_token_vectors<scalar_t, acc_t>(x, A, a.d_in, w.rank, scale, t_scaled);
  } else {
    shrink_token<scalar_t, acc_t>(x, A, a.d_in, w.rank, scale, t_scaled);
  }
  __syncthreads();
  const scalar_t* B = static_cast<const scalar_t*>(a.B) + w.slot * a.b_slot_stride;
  scalar_t* y = static_cast<scalar_t*>(a.out) + w.token * a.out_row_stride;
  const int64_t per_block = (a.d_out + gridDim.y - 1) / gridDim.y;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * per_block;
  const int64_t last = first + per_block < a.d_out ? first + per_block : a.d_out;
  for (int64_t n = first + threadIdx.x; n < last; n += blockDim.x) {
    const scalar_t* b_out = B + n * a.b_out_stride;
    acc_t sum = 0;
#pragma unroll 8
    for (int64_t j = 0; j < w.rank; ++j) sum += t_scaled[j] * to_acc(b_out[j * a.b_rank_stride]);
    y[n] = from_acc<scalar_t>(to_acc(y[n]) + sum);
  }
}

// Runs f(scalar_t{}) with the C++ type of dtype.
template <typename F>
cudaError_t by_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat64: return f(double{});
  }
  return cudaErrorInvalidValue;
}

// Blocks (token position, output tile) with a rank-sized fp32 (fp64) row of shared memory.
template <typename scalar_t>
cudaError_t launch_per_token(const LoraArgs& a, void (*kernel)(LoraArgs), int threads, int64_t outputs_per_block,
                             cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const size_t shared = static_cast<size_t>(a.r_max) * sizeof(acc_t);
  const int64_t tiles = (a.d_out + outputs_per_block - 1) / outputs_per_block;
  if (shared > kMaxSharedBytes || a.num_tokens > 0x7fffffff || tiles > 65535) return cudaErrorInvalidValue;
  kernel<<<dim3(static_cast<unsigned>(a.num_tokens), static_cast<unsigned>(tiles)), threads, shared, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_lora_shrink(const LoraArgs& args, cudaStream_t stream) {
  if (args.num_tokens == 0 || args.num_slots == 0 || args.r_max == 0) return cudaSuccess;
  if (args.num_tokens > 0x7fffffff) return cudaErrorInvalidValue;
  return by_dtype(args.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    shrink_kernel<scalar_t><<<static_cast<unsigned>(args.num_tokens), kShrinkWarps * 32, 0, stream>>>(args);
    return cudaGetLastError();
  });
}

cudaError_t launch_lora_expand(const LoraArgs& args, cudaStream_t stream) {
  if (args.num_tokens == 0 || args.num_slots == 0 || args.r_max == 0 || args.d_out == 0) return cudaSuccess;
  return by_dtype(args.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    return launch_per_token<scalar_t>(args, expand_kernel<scalar_t>, kExpandThreads, kExpandThreads, stream);
  });
}

cudaError_t launch_lora_delta_fused(const LoraArgs& args, cudaStream_t stream) {
  if (args.num_tokens == 0 || args.num_slots == 0 || args.r_max == 0 || args.d_out == 0) return cudaSuccess;
  // output tiles per token: about kFusedBlocks blocks in all (32 tiles of 128 outputs for one
  // token at d_out = 4096; 4 tiles of 1024 for 64 tokens), so that a single token's delta is
  // spread over many SMs and a batch of 64 does not repeat each shrink 32 times
  const int64_t by_blocks = std::max<int64_t>(1, kFusedBlocks / std::max<int64_t>(args.num_tokens, 1));
  const int64_t by_outputs = std::max<int64_t>(1, (args.d_out + kFusedMinOutputs - 1) / kFusedMinOutputs);
  const int64_t tiles = std::min(by_blocks, by_outputs);
  const int64_t outputs_per_block = (args.d_out + tiles - 1) / tiles;
  return by_dtype(args.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    return launch_per_token<scalar_t>(args, delta_fused_kernel<scalar_t>, kFusedThreads, outputs_per_block, stream);
  });
}

}  // namespace cuda
}  // namespace lora_fast
