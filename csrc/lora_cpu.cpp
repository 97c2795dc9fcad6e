// CPU kernels for lora_shrink, lora_expand and lora_delta: tokens grouped by slot (the order an
// AdapterBatch computes), register-tiled shrink then expand per group of tokens, fp32 accumulation
// for fp32/fp16/bf16 inputs (fp64 accumulates in fp64), at::parallel_for over work items.
// The kernel body is compiled for AVX-512, AVX2 and baseline SIMD and picked at run time.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <type_traits>
#include <vector>

#include "lora_cpu_work.h"

namespace lora_fast {
namespace cpu {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LF_HAVE_X86_VARIANTS 1

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,fma")
namespace avx512 {
#define LF_VEC_BYTES 64
#define LF_LINEAR_TN 8
#define LF_SHRINK_TN 4
#define LF_LANES_TM 8
#define LF_LANES_NV 3
#define LF_EXPAND_NV 4
#include "lora_cpu_kernel.h"
#undef LF_VEC_BYTES
#undef LF_SHRINK_TN
#undef LF_LANES_TM
#undef LF_LANES_NV
#undef LF_EXPAND_NV
#undef LF_LINEAR_TN
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define LF_VEC_BYTES 32
#define LF_LINEAR_TN 4
#define LF_SHRINK_TN 2
#define LF_LANES_TM 4
#define LF_LANES_NV 2
#define LF_EXPAND_NV 2
#include "lora_cpu_kernel.h"
#undef LF_VEC_BYTES
#undef LF_SHRINK_TN
#undef LF_LANES_TM
#undef LF_LANES_NV
#undef LF_EXPAND_NV
#undef LF_LINEAR_TN
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace baseline {
#define LF_VEC_BYTES 16
#define LF_LINEAR_TN 4
#define LF_SHRINK_TN 2
#define LF_LANES_TM 4
#define LF_LANES_NV 2
#define LF_EXPAND_NV 2
#include "lora_cpu_kernel.h"
#undef LF_VEC_BYTES
#undef LF_SHRINK_TN
#undef LF_LANES_TM
#undef LF_LANES_NV
#undef LF_EXPAND_NV
#undef LF_LINEAR_TN
}  // namespace baseline

namespace {

enum class Isa { kAvx512, kAvx2, kBaseline };

// LORA_FAST_CPU_ISA=avx512|avx2|baseline narrows the choice (tests use it to cover every copy);
// a request the CPU cannot run falls back to the best it can.
Isa pick_isa() {
#ifdef LF_HAVE_X86_VARIANTS
  const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* want = std::getenv("LORA_FAST_CPU_ISA");
  if (want != nullptr && std::strcmp(want, "baseline") == 0) return Isa::kBaseline;
  if (want != nullptr && std::strcmp(want, "avx2") == 0) return has_avx2 ? Isa::kAvx2 : Isa::kBaseline;
  if (has_avx512) return Isa::kAvx512;
  if (has_avx2) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

template <typename scalar_t, typename acc_t, Mode mode>
void run_parallel(const Problem<scalar_t, acc_t>& p, const std::vector<WorkItem>& items) {
  const Isa isa = pick_isa();
  const WorkItem* data = items.data();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    switch (isa) {
#ifdef LF_HAVE_X86_VARIANTS
      case Isa::kAvx512:
        avx512::run_items<scalar_t, acc_t, mode>(p, data + begin, end - begin);
        break;
      case Isa::kAvx2:
        avx2::run_items<scalar_t, acc_t, mode>(p, data + begin, end - begin);
        break;
#endif
      default:
        baseline::run_items<scalar_t, acc_t, mode>(p, data + begin, end - begin);
    }
  });
}

template <typename scalar_t, typename acc_t>
void run_weight_grads_parallel(const WeightGradProblem<scalar_t, acc_t>& p, const std::vector<WeightGradItem>& items) {
  const Isa isa = pick_isa();
  const WeightGradItem* data = items.data();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    switch (isa) {
#ifdef LF_HAVE_X86_VARIANTS
      case Isa::kAvx512:
        avx512::run_weight_grad_items<scalar_t, acc_t>(p, data + begin, end - begin);
        break;
      case Isa::kAvx2:
        avx2::run_weight_grad_items<scalar_t, acc_t>(p, data + begin, end - begin);
        break;
#endif
      default:
        baseline::run_weight_grad_items<scalar_t, acc_t>(p, data + begin, end - begin);
    }
  });
}

// Metadata checks are cheap (O(T + S)) and keep a malformed call from reading out of bounds.
struct Metadata {
  std::vector<int64_t> ranks;
  std::vector<int64_t> starts;   // per slot, position in token_order
  std::vector<int64_t> lengths;  // per slot
  std::vector<WorkItem> items;
  at::Tensor token_order;  // int64, contiguous
};

Metadata prepare(int64_t num_tokens, int64_t num_slots, int64_t r_max, const at::Tensor& token_order,
                 const at::Tensor& segment_starts, const at::Tensor& segment_lengths,
                 const std::optional<at::Tensor>& ranks) {
  TORCH_CHECK_VALUE(token_order.dim() == 1 && token_order.size(0) == num_tokens,
                    "token_order must have one entry per token (", num_tokens, "), got shape ",
                    token_order.sizes());
  TORCH_CHECK_VALUE(segment_starts.dim() == 1 && segment_starts.size(0) == num_slots,
                    "segment_starts must have one entry per slot (", num_slots, ")");
  TORCH_CHECK_VALUE(segment_lengths.dim() == 1 && segment_lengths.size(0) == num_slots,
                    "segment_lengths must have one entry per slot (", num_slots, ")");
  Metadata meta;
  meta.token_order = token_order.to(at::kLong).contiguous();
  const auto starts = segment_starts.to(at::kLong).contiguous();
  const auto lengths = segment_lengths.to(at::kLong).contiguous();
  const int64_t* order = meta.token_order.data_ptr<int64_t>();
  for (int64_t i = 0; i < num_tokens; ++i)
    TORCH_CHECK_VALUE(order[i] >= 0 && order[i] < num_tokens, "token_order[", i, "] = ", order[i],
                      " is not a token index in [0, ", num_tokens, ")");

  meta.ranks.assign(num_slots, r_max);
  if (ranks.has_value()) {
    TORCH_CHECK_VALUE(ranks->dim() == 1 && ranks->size(0) == num_slots,
                      "ranks must have one entry per slot (", num_slots, ")");
    const auto r = ranks->to(at::kLong).contiguous();
    const int64_t* rp = r.data_ptr<int64_t>();
    for (int64_t s = 0; s < num_slots; ++s) {
      TORCH_CHECK_VALUE(rp[s] >= 0 && rp[s] <= r_max, "ranks[", s, "] = ", rp[s], " is outside [0, ",
                        r_max, "]");
      meta.ranks[s] = rp[s];
    }
  }

  const int64_t* sp = starts.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  meta.starts.assign(sp, sp + num_slots);
  meta.lengths.assign(lp, lp + num_slots);
  for (int64_t s = 0; s < num_slots; ++s) {
    TORCH_CHECK_VALUE(sp[s] >= 0 && lp[s] >= 0 && sp[s] + lp[s] <= num_tokens, "segment ", s,
                      " [", sp[s], ", ", sp[s] + lp[s], ") lies outside the ", num_tokens, " tokens");
    if (meta.ranks[s] == 0) continue;
    for (int64_t off = 0; off < lp[s]; off += kChunkTokens)
      meta.items.push_back({s, sp[s] + off, std::min(kChunkTokens, lp[s] - off), lp[s]});
  }
  return meta;
}

void check_2d_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, name, " must have unit stride along its last dimension");
}

at::Tensor row_major(const at::Tensor& t) { return t.dim() == 2 && t.stride(1) == 1 ? t : t.contiguous(); }

// Before an overwriting expand (Problem::overwrite): zeroes the rows of `out` that no work item
// writes, those of tokens without an adapter or in a rank-0 slot.
void zero_uncovered_rows(at::Tensor& out, const Metadata& meta) {
  const int64_t T = out.size(0);
  std::vector<char> covered(T, 0);
  const int64_t* order = meta.token_order.const_data_ptr<int64_t>();
  for (const WorkItem& item : meta.items)
    for (int64_t i = item.begin; i < item.begin + item.count; ++i) covered[order[i]] = 1;
  char* data = static_cast<char*>(out.mutable_data_ptr());
  const int64_t row_bytes = out.size(1) * static_cast<int64_t>(out.element_size());
  const int64_t stride_bytes = out.stride(0) * static_cast<int64_t>(out.element_size());
  for (int64_t token = 0; token < T; ++token)
    if (!covered[token]) std::memset(data + token * stride_bytes, 0, row_bytes);
}

// B [S, d_out, r_max] as the kernels read it: the transpose of a contiguous [S, r_max, d_out]
// tensor is used as it is (rank-major), anything else is made contiguous.
std::pair<at::Tensor, bool> b_layout(const at::Tensor& B) {
  const int64_t d_out = B.size(1), r_max = B.size(2);
  const bool rank_major = B.stride(0) == d_out * r_max && B.stride(1) == 1 && B.stride(2) == d_out;
  if (rank_major && d_out > 1) return {B, true};
  return {B.contiguous(), false};
}

template <typename scalar_t>
using acc_type_for = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

// The accumulation type's ScalarType, which the scales are also read in: float64 scales keep
// their precision for float64 inputs (a non-dyadic scale such as rsLoRA's would otherwise be
// rounded to float32), and any scales are read as float32 for the other dtypes.
at::ScalarType acc_scalar_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::string isa_name() {
  switch (pick_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

at::Tensor lora_shrink(const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& token_order,
                       const at::Tensor& segment_starts, const at::Tensor& segment_lengths,
                       const std::optional<at::Tensor>& ranks) {
  TORCH_CHECK_VALUE(x_in.dim() == 2 && A_in.dim() == 3 && A_in.size(2) == x_in.size(1),
                    "lora_shrink expects x [T, d_in] and A [S, r_max, d_in]");
  TORCH_CHECK_TYPE(x_in.scalar_type() == A_in.scalar_type(), "x and A must share a dtype");
  const at::Tensor x = row_major(x_in);
  const at::Tensor A = A_in.contiguous();
  const int64_t T = x.size(0), S = A.size(0), r_max = A.size(1);
  const auto acc_dtype = acc_scalar_type(x.scalar_type());
  at::Tensor t = at::zeros({T, r_max}, x.options().dtype(acc_dtype));
  Metadata meta = prepare(T, S, r_max, token_order, segment_starts, segment_lengths, ranks);
  if (meta.items.empty()) return t;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_shrink_cpu", [&] {
    using acc_t = acc_type_for<scalar_t>;
    Problem<scalar_t, acc_t> p;
    p.x = x.const_data_ptr<scalar_t>();
    p.x_row_stride = x.stride(0);
    p.A = A.const_data_ptr<scalar_t>();
    p.ranks = meta.ranks.data();
    p.token_order = meta.token_order.const_data_ptr<int64_t>();
    p.t = t.mutable_data_ptr<acc_t>();
    p.t_row_stride = t.stride(0);
    p.r_max = r_max;
    p.d_in = x.size(1);
    run_parallel<scalar_t, acc_t, Mode::kShrink>(p, meta.items);
  });
  return t;
}

void lora_expand_(const at::Tensor& t_in, const at::Tensor& B_in, const at::Tensor& token_order,
                  const at::Tensor& segment_starts, const at::Tensor& segment_lengths,
                  const at::Tensor& scales_in, const std::optional<at::Tensor>& ranks, at::Tensor& out,
                  bool accumulate) {
  TORCH_CHECK_VALUE(B_in.dim() == 3 && t_in.dim() == 2 && t_in.size(1) == B_in.size(2),
                    "lora_expand expects t [T, r_max] and B [S, d_out, r_max]");
  check_2d_rows(out, "out");
  TORCH_CHECK_VALUE(out.size(0) == t_in.size(0) && out.size(1) == B_in.size(1),
                    "out must be [T, d_out] = [", t_in.size(0), ", ", B_in.size(1), "]");
  TORCH_CHECK_TYPE(out.scalar_type() == B_in.scalar_type(), "out and B must share a dtype");
  const auto b_and_layout = b_layout(B_in);
  const at::Tensor& B = b_and_layout.first;
  const bool b_rank_major = b_and_layout.second;
  const auto acc_dtype = acc_scalar_type(B.scalar_type());
  const at::Tensor t = row_major(t_in.to(acc_dtype));
  const at::Tensor scales = scales_in.to(acc_dtype).contiguous();
  const int64_t T = t.size(0), S = B.size(0), r_max = B.size(2);
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == S, "scales must have one entry per slot (", S, ")");
  Metadata meta = prepare(T, S, r_max, token_order, segment_starts, segment_lengths, ranks);
  if (!accumulate) zero_uncovered_rows(out, meta);
  if (meta.items.empty()) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, B.scalar_type(), "lora_expand_cpu", [&] {
    using acc_t = acc_type_for<scalar_t>;
    Problem<scalar_t, acc_t> p;
    p.B = B.const_data_ptr<scalar_t>();
    p.b_rank_major = b_rank_major;
    p.scales = scales.const_data_ptr<acc_t>();
    p.ranks = meta.ranks.data();
    p.token_order = meta.token_order.const_data_ptr<int64_t>();
    p.t_in = t.const_data_ptr<acc_t>();
    p.t_row_stride = t.stride(0);
    p.out = out.mutable_data_ptr<scalar_t>();
    p.out_row_stride = out.stride(0);
    p.overwrite = !accumulate;
    p.r_max = r_max;
    p.d_out = B.size(1);
    run_parallel<scalar_t, acc_t, Mode::kExpand>(p, meta.items);
  });
}

void lora_delta_(const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& B_in,
                 const at::Tensor& token_order, const at::Tensor& segment_starts,
                 const at::Tensor& segment_lengths, const at::Tensor& scales_in,
                 const std::optional<at::Tensor>& ranks, at::Tensor& out, bool accumulate) {
  TORCH_CHECK_VALUE(x_in.dim() == 2 && A_in.dim() == 3 && B_in.dim() == 3 && A_in.size(2) == x_in.size(1) &&
                        B_in.size(2) == A_in.size(1) && B_in.size(0) == A_in.size(0),
                    "lora_delta expects x [T, d_in], A [S, r_max, d_in], B [S, d_out, r_max]");
  check_2d_rows(out, "out");
  TORCH_CHECK_VALUE(out.size(0) == x_in.size(0) && out.size(1) == B_in.size(1),
                    "out must be [T, d_out] = [", x_in.size(0), ", ", B_in.size(1), "]");
  TORCH_CHECK_TYPE(x_in.scalar_type() == A_in.scalar_type() && x_in.scalar_type() == B_in.scalar_type() &&
                       out.scalar_type() == x_in.scalar_type(),
                   "x, A, B and out must share a dtype");
  const at::Tensor x = row_major(x_in);
  const at::Tensor A = A_in.contiguous();
  const auto b_and_layout = b_layout(B_in);
  const at::Tensor& B = b_and_layout.first;
  const bool b_rank_major = b_and_layout.second;
  const at::Tensor scales = scales_in.to(acc_scalar_type(x_in.scalar_type())).contiguous();
  const int64_t T = x.size(0), S = A.size(0), r_max = A.size(1);
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == S, "scales must have one entry per slot (", S, ")");
  Metadata meta = prepare(T, S, r_max, token_order, segment_starts, segment_lengths, ranks);
  if (!accumulate) zero_uncovered_rows(out, meta);
  if (meta.items.empty()) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_delta_cpu", [&] {
    using acc_t = acc_type_for<scalar_t>;
    Problem<scalar_t, acc_t> p;
    p.x = x.const_data_ptr<scalar_t>();
    p.x_row_stride = x.stride(0);
    p.A = A.const_data_ptr<scalar_t>();
    p.B = B.const_data_ptr<scalar_t>();
    p.b_rank_major = b_rank_major;
    p.scales = scales.const_data_ptr<acc_t>();
    p.ranks = meta.ranks.data();
    p.token_order = meta.token_order.const_data_ptr<int64_t>();
    p.out = out.mutable_data_ptr<scalar_t>();
    p.out_row_stride = out.stride(0);
    p.overwrite = !accumulate;
    p.r_max = r_max;
    p.d_in = x.size(1);
    p.d_out = B.size(1);
    run_parallel<scalar_t, acc_t, Mode::kDelta>(p, meta.items);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_delta_backward(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& B_in,
    const at::Tensor& token_order, const at::Tensor& segment_starts, const at::Tensor& segment_lengths,
    const at::Tensor& scales_in, const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& grad_slots,
    bool needs_x, bool needs_A, bool needs_B, const std::optional<at::Tensor>& t_kept) {
  TORCH_CHECK_VALUE(x_in.dim() == 2 && A_in.dim() == 3 && B_in.dim() == 3 && A_in.size(2) == x_in.size(1) &&
                        B_in.size(2) == A_in.size(1) && B_in.size(0) == A_in.size(0),
                    "lora_delta_backward expects x [T, d_in], A [S, r_max, d_in], B [S, d_out, r_max]");
  TORCH_CHECK_VALUE(grad_out_in.dim() == 2 && grad_out_in.size(0) == x_in.size(0) && grad_out_in.size(1) == B_in.size(1),
                    "grad_out must be [T, d_out]");
  TORCH_CHECK_TYPE(x_in.scalar_type() == A_in.scalar_type() && x_in.scalar_type() == B_in.scalar_type(),
                   "x, A and B must share a dtype");
  const at::Tensor x = row_major(x_in);
  const at::Tensor grad_out = row_major(grad_out_in.to(x_in.scalar_type()));
  const at::Tensor A = A_in.contiguous();
  const auto b_and_layout = b_layout(B_in);
  const at::Tensor& B = b_and_layout.first;
  const bool b_rank_major = b_and_layout.second;
  const at::Tensor scales = scales_in.to(acc_scalar_type(x_in.scalar_type())).contiguous();
  const int64_t T = x.size(0), S = A.size(0), r_max = A.size(1), d_in = A.size(2), d_out = B.size(1);
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == S, "scales must have one entry per slot (", S, ")");
  Metadata meta = prepare(T, S, r_max, token_order, segment_starts, segment_lengths, ranks);
  std::vector<bool> trains(S, true);
  if (grad_slots.has_value()) {
    TORCH_CHECK_VALUE(grad_slots->dim() == 1 && grad_slots->size(0) == S, "grad_slots must have one entry per slot");
    const auto mask = grad_slots->to(at::kBool).contiguous();
    for (int64_t s = 0; s < S; ++s) trains[s] = mask.const_data_ptr<bool>()[s];
  }
  std::vector<WorkItem> grad_items;
  for (const WorkItem& item : meta.items)
    if (trains[item.slot]) grad_items.push_back(item);

  const auto acc_dtype = acc_scalar_type(x.scalar_type());
  // dx is written by the expand (overwrite): only rows no item covers are zeroed
  at::Tensor dx = needs_x ? at::empty_like(x_in, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  // The weight-gradient items write every entry of their slots (rank rows past a slot's rank
  // as zeros); only the slots they skip are zero-filled here.
  at::Tensor dA = needs_A ? at::empty_like(A) : at::empty({0}, x.options());
  at::Tensor dB = needs_B ? at::empty({S, d_out, r_max}, x.options()) : at::empty({0}, x.options());
  if (needs_x) zero_uncovered_rows(dx, meta);
  const bool weights = (needs_A || needs_B) && !grad_items.empty();
  const int64_t slot_bytes_A = r_max * d_in * static_cast<int64_t>(x.element_size());
  const int64_t slot_bytes_B = r_max * d_out * static_cast<int64_t>(x.element_size());
  for (int64_t s = 0; s < S; ++s) {
    if (weights && trains[s] && meta.lengths[s] > 0 && meta.ranks[s] > 0) continue;
    if (needs_A) std::memset(static_cast<char*>(dA.mutable_data_ptr()) + s * slot_bytes_A, 0, slot_bytes_A);
    if (needs_B) std::memset(static_cast<char*>(dB.mutable_data_ptr()) + s * slot_bytes_B, 0, slot_bytes_B);
  }
  if (meta.items.empty() || (!needs_x && !weights)) return {dx, dA, dB};
  at::Tensor u = at::zeros({T, r_max}, x.options().dtype(acc_dtype));
  // t = A x for dB: the forward's (lora_shrink's output, kept by eager autograd) when given,
  // else computed here for the trained slots' tokens.
  at::Tensor t;
  if (t_kept.has_value()) {
    TORCH_CHECK_VALUE(t_kept->dim() == 2 && t_kept->size(0) == T && t_kept->size(1) == r_max &&
                          t_kept->scalar_type() == acc_dtype,
                      "t must be the forward's lora_shrink output [", T, ", ", r_max, "] in ", acc_dtype);
    if (needs_B && weights) t = row_major(*t_kept);
  } else if (needs_B && weights) {
    t = at::zeros({T, r_max}, x.options().dtype(acc_dtype));
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_delta_backward_cpu", [&] {
    using acc_t = acc_type_for<scalar_t>;
    const int64_t* ranks_ptr = meta.ranks.data();
    const int64_t* order = meta.token_order.const_data_ptr<int64_t>();
    // u = B^T dy per token (kept for dA), and dx = scale * A^T u
    Problem<scalar_t, acc_t> back;
    back.x = grad_out.const_data_ptr<scalar_t>();
    back.x_row_stride = grad_out.stride(0);
    back.A = A.const_data_ptr<scalar_t>();
    back.B = B.const_data_ptr<scalar_t>();
    back.b_rank_major = b_rank_major;
    back.scales = scales.const_data_ptr<acc_t>();
    back.ranks = ranks_ptr;
    back.token_order = order;
    back.t = u.mutable_data_ptr<acc_t>();
    back.t_row_stride = u.stride(0);
    back.out = needs_x ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    back.out_row_stride = needs_x ? dx.stride(0) : 0;
    back.overwrite = true;
    back.r_max = r_max;
    back.d_in = d_in;
    back.d_out = d_out;
    if (needs_x || (needs_A && weights))
      run_parallel<scalar_t, acc_t, Mode::kBackwardX>(back, needs_x ? meta.items : grad_items);
    if (!weights) return;

    WeightGradProblem<scalar_t, acc_t> g;
    g.scales = scales.const_data_ptr<acc_t>();
    g.ranks = ranks_ptr;
    g.token_order = order;
    g.r_max = r_max;
    auto column_items = [&](int64_t width) {
      std::vector<WeightGradItem> items;
      for (int64_t s = 0; s < S; ++s) {
        if (!trains[s] || meta.lengths[s] == 0 || meta.ranks[s] == 0) continue;
        for (int64_t c = 0; c < width; c += kWeightGradColumns)
          items.push_back({s, meta.starts[s], meta.lengths[s], c, std::min(width, c + kWeightGradColumns)});
      }
      return items;
    };
    if (needs_A) {
      g.coef = u.const_data_ptr<acc_t>();
      g.coef_row_stride = u.stride(0);
      g.rows = x.const_data_ptr<scalar_t>();
      g.row_stride = x.stride(0);
      g.grad = dA.mutable_data_ptr<scalar_t>();
      g.grad_slot_stride = r_max * d_in;
      g.grad_row_stride = d_in;
      g.transposed_out = false;
      run_weight_grads_parallel<scalar_t, acc_t>(g, column_items(d_in));
    }
    if (needs_B) {
      Problem<scalar_t, acc_t> fwd;
      fwd.x = x.const_data_ptr<scalar_t>();
      fwd.x_row_stride = x.stride(0);
      fwd.A = A.const_data_ptr<scalar_t>();
      fwd.ranks = ranks_ptr;
      fwd.token_order = order;
      fwd.t = t.mutable_data_ptr<acc_t>();
      fwd.t_row_stride = t.stride(0);
      fwd.r_max = r_max;
      fwd.d_in = d_in;
      fwd.d_out = d_out;
      if (!t_kept.has_value()) run_parallel<scalar_t, acc_t, Mode::kShrink>(fwd, grad_items);
      g.coef = t.const_data_ptr<acc_t>();
      g.coef_row_stride = t.stride(0);
      g.rows = grad_out.const_data_ptr<scalar_t>();
      g.row_stride = grad_out.stride(0);
      g.grad = dB.mutable_data_ptr<scalar_t>();
      g.grad_slot_stride = d_out * r_max;
      g.grad_row_stride = r_max;
      g.transposed_out = true;
      run_weight_grads_parallel<scalar_t, acc_t>(g, column_items(d_out));
    }
  });
  return {dx, dA, dB};
}

// y = x W^T + bias + the LoRA delta, for few tokens (see run_linear_rows).
at::Tensor fused_lora_linear(const at::Tensor& x_in, const at::Tensor& W_in, const std::optional<at::Tensor>& bias_in,
                             const at::Tensor& A_in, const at::Tensor& B_in, const at::Tensor& token_order,
                             const at::Tensor& segment_starts, const at::Tensor& segment_lengths,
                             const at::Tensor& scales_in, const std::optional<at::Tensor>& ranks) {
  TORCH_CHECK_VALUE(x_in.dim() == 2 && W_in.dim() == 2 && W_in.size(1) == x_in.size(1),
                    "fused_lora_linear expects x [T, d_in] and W [d_out, d_in]");
  TORCH_CHECK_VALUE(A_in.dim() == 3 && B_in.dim() == 3 && A_in.size(2) == x_in.size(1) &&
                        B_in.size(1) == W_in.size(0) && B_in.size(2) == A_in.size(1) && B_in.size(0) == A_in.size(0),
                    "fused_lora_linear expects A [S, r_max, d_in] and B [S, d_out, r_max]");
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, "fused_lora_linear runs float32 and float64, got ",
                   dtype);
  TORCH_CHECK_TYPE(W_in.scalar_type() == dtype && A_in.scalar_type() == dtype && B_in.scalar_type() == dtype,
                   "x, W, A and B must share a dtype");
  const int64_t d_out = W_in.size(0);
  at::Tensor bias;
  if (bias_in.has_value()) {
    TORCH_CHECK_VALUE(bias_in->dim() == 1 && bias_in->size(0) == d_out, "bias must be [d_out] = [", d_out, "]");
    TORCH_CHECK_TYPE(bias_in->scalar_type() == dtype, "bias must share x's dtype");
    bias = bias_in->contiguous();
  }
  const at::Tensor x = row_major(x_in);
  const at::Tensor W = W_in.contiguous();
  const at::Tensor A = A_in.contiguous();
  const auto b_and_layout = b_layout(B_in);
  const at::Tensor& B = b_and_layout.first;
  const at::Tensor scales = scales_in.to(acc_scalar_type(x_in.scalar_type())).contiguous();
  const int64_t T = x.size(0), S = A.size(0), r_max = A.size(1);
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == S, "scales must have one entry per slot (", S, ")");
  Metadata meta = prepare(T, S, r_max, token_order, segment_starts, segment_lengths, ranks);
  at::Tensor y = at::empty({T, d_out}, x.options());
  if (T == 0 || d_out == 0) return y;
  const Isa isa = pick_isa();
  AT_DISPATCH_FLOATING_TYPES(dtype, "fused_lora_linear_cpu", [&] {
    Problem<scalar_t, scalar_t> p;
    p.x = x.const_data_ptr<scalar_t>();
    p.x_row_stride = x.stride(0);
    p.A = A.const_data_ptr<scalar_t>();
    p.B = B.const_data_ptr<scalar_t>();
    p.b_rank_major = b_and_layout.second;
    p.scales = scales.const_data_ptr<scalar_t>();
    p.ranks = meta.ranks.data();
    p.token_order = meta.token_order.const_data_ptr<int64_t>();
    p.out = y.mutable_data_ptr<scalar_t>();
    p.out_row_stride = y.stride(0);
    p.r_max = r_max;
    p.d_in = x.size(1);
    p.d_out = d_out;
    const scalar_t* w = W.const_data_ptr<scalar_t>();
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    // The base GEMM in parallel over blocks of output rows (a multiple of every ISA's tile
    // height), then the delta in parallel over work items, whose tokens own disjoint rows of y.
    const int64_t blocks = (d_out + kLinearRowBlock - 1) / kLinearRowBlock;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      const int64_t n0 = begin * kLinearRowBlock, n1 = std::min(d_out, end * kLinearRowBlock);
      switch (isa) {
#ifdef LF_HAVE_X86_VARIANTS
        case Isa::kAvx512:
          avx512::run_linear_rows<scalar_t>(p, T, w, b, n0, n1);
          break;
        case Isa::kAvx2:
          avx2::run_linear_rows<scalar_t>(p, T, w, b, n0, n1);
          break;
#endif
        default:
          baseline::run_linear_rows<scalar_t>(p, T, w, b, n0, n1);
      }
    });
    if (!meta.items.empty()) run_parallel<scalar_t, scalar_t, Mode::kDelta>(p, meta.items);
  });
  return y;
}

// x @ W^T + bias (at::linear: the BLAS library's GEMM, as F.linear computes it), then the delta
// added into it in place: what fused_lora_linear computes past FUSED_MAX_TOKENS, in one call from
// Python. accelerate()'s short path calls it (pybind, no dispatcher) for prefill-sized batches.
at::Tensor linear_then_delta(const at::Tensor& x, const at::Tensor& W, const std::optional<at::Tensor>& bias,
                             const at::Tensor& A, const at::Tensor& B, const at::Tensor& token_order,
                             const at::Tensor& segment_starts, const at::Tensor& segment_lengths,
                             const at::Tensor& scales, const std::optional<at::Tensor>& ranks) {
  TORCH_CHECK_VALUE(x.dim() == 2, "linear_then_delta expects x [T, d_in]");
  at::Tensor y = at::linear(x, W, bias);
  lora_delta_(x, A, B, token_order, segment_starts, segment_lengths, scales, ranks, y, true);
  return y;
}

TORCH_LIBRARY_IMPL(lora_fast_C, CPU, m) {
  m.impl("lora_shrink", &lora_shrink);
  m.impl("lora_expand_", &lora_expand_);
  m.impl("lora_delta_", &lora_delta_);
  m.impl("lora_delta_backward", &lora_delta_backward);
  m.impl("fused_lora_linear", &fused_lora_linear);
}

}  // namespace cpu
}  // namespace lora_fast
