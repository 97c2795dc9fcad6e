// Shared between the per-instruction-set copies of lora_cpu_kernel.h and the host code in
// lora_cpu.cpp: the description of one call and the unit of parallel work.
#pragma once

#include <cstdint>

namespace lora_fast {
namespace cpu {

enum class Mode { kShrink, kExpand, kDelta, kBackwardX };

// Tokens per register tile: the shrink reuses each loaded A vector this many times, the expand
// each loaded B vector.
#define LF_TOKENS_PER_TILE 4
// Rank columns held on the stack per pass; a larger rank goes through in several passes.
constexpr int64_t kMaxTileRank = 64;
// A slot of at most this many tokens reads its weights as one sequential stream
// (shrink_rows / expand_rows) rather than in register tiles: measured on a 1-thread AMD EPYC
// decode sweep, streaming wins at 1-3 tokens per slot and tiling from 4.
constexpr int64_t kStreamTokens = 3;
// One-token slots of one rank streamed side by side in a decode call (see shrink_rows_multi).
constexpr int kStreamSlots = 4;
// The streamed (decode) shrink and expand prefetch this far ahead in the weight rows they read,
// into every cache level (the hardware prefetcher restarts at every 4 KB page of these short
// per-slot streams). On an Intel Xeon, one thread, a SmolLM2-shaped delta phase (30 layers x 7
// projections, 16 adapters of rank 16, 313 MB, cold) took 28.1-28.5 ms with 1024-2048 B instead of
// 33.2-33.5 ms without (512 B: 29.3, 4096 B: 31.0; a non-temporal hint was slower than none); with
// 1536 B SmolLM2's 16-token decode step went from 1.259 to 1.239 of the base model's time at 16
// adapters and from 1.234 to 1.222 at 64 (interleaved rounds, medians).
constexpr int64_t kStreamPrefetchBytes = 1536;
// Slots of at least this many tokens go through shrink_lanes and expand_lanes (A transposed once
// per slot and call, GEMM-style register tiles). Against the dot-product tiles, one thread on the
// Intel Xeon, 16 slots of rank 16, d 576 -> 576, fp32, the delta took 1.19x as long at 8 tokens a
// slot, 1.10x at 12, 0.95x at 16, 0.81x at 32 and 0.74x at 64 (0.58x at rank 64, d_in 1536).
constexpr int64_t kLanesTokens = 16;
// Tokens per work item. Items of one slot are consecutive, so a thread that takes a run of them
// converts that slot's weights once.
constexpr int64_t kChunkTokens = 32;

// Tokens per fused_lora_linear base tile (weight rows per tile: LF_LINEAR_TN, per instruction
// set). Two tokens by 8 rows was the fastest AVX-512 shape on a decode sweep (AMD EPYC, 1 thread).
#define LF_LINEAR_TM 2
// Output rows per parallel task of fused_lora_linear's base GEMM: a multiple of every LF_LINEAR_TN.
constexpr int64_t kLinearRowBlock = 64;
// fused_lora_linear's base GEMM takes rows of up to kLinearChunkMaxBytes whole, longer ones in
// column chunks of kLinearChunkBytes (a block of LF_LINEAR_TN rows and 16 tokens' x then fit L1).
// A C++ harness over SmolLM2's down projection (16 tokens, d_in 1536 -> 576, fp32, weights from
// memory, one thread, Intel Xeon) measured chunks of 256 / 384 / 512 floats at 397 / 386 / 399 us
// against 409-434 whole, while cutting d_in 576 in two chunks cost 20%.
constexpr int64_t kLinearChunkMaxBytes = 3072;
constexpr int64_t kLinearChunkBytes = 1536;

struct WorkItem {
  int64_t slot;
  int64_t begin;  // position in token_order
  int64_t count;
  // tokens of the whole slot: every item of a slot takes the same path (streamed, register
  // tiles or shrink_lanes), so a token's bits do not depend on which item it falls in
  int64_t slot_tokens;
};

template <typename scalar_t, typename acc_t>
struct Problem {
  const scalar_t* x = nullptr;  // [T, d_in], rows x_row_stride apart
  int64_t x_row_stride = 0;
  const scalar_t* A = nullptr;  // [S, r_max, d_in] contiguous
  const scalar_t* B = nullptr;  // [S, d_out, r_max]: contiguous, or rank-major (see below)
  // B stored as [S, r_max, d_out] and passed as its transpose: rows of B^T are contiguous, so
  // the kernels read them in place instead of transposing each slot's B on every call.
  bool b_rank_major = false;
  const acc_t* scales = nullptr;  // [S], in the accumulation type (float64 for float64 inputs)
  const int64_t* ranks = nullptr;  // [S], each in [0, r_max]
  const int64_t* token_order = nullptr;  // [T], token indices sorted by slot
  acc_t* t = nullptr;  // shrink output [T, r_max]
  const acc_t* t_in = nullptr;  // expand input [T, r_max]
  int64_t t_row_stride = 0;
  scalar_t* out = nullptr;  // [T, d_out], rows out_row_stride apart
  int64_t out_row_stride = 0;
  // The expand writes the rows of the items' tokens instead of adding into them (the caller
  // zeroes the rows no item covers): an out-of-place delta or dx needs no zero-filled buffer.
  bool overwrite = false;
  int64_t r_max = 0;
  int64_t d_in = 0;
  int64_t d_out = 0;
};

// Columns of a weight gradient one work item owns; its [k, columns] accumulator stays in L2.
constexpr int64_t kWeightGradColumns = 256;

struct WeightGradItem {
  int64_t slot;
  int64_t begin;  // first position of the slot's segment in token_order
  int64_t count;  // tokens in the segment
  int64_t column_begin;
  int64_t column_end;
};

// g[slot][j][c] = scale * sum over the slot's tokens of coef[token][j] * rows[token][c], written
// to grad[slot][j][c] (dA) or, with transposed_out, to grad[slot][c][j] (dB).
template <typename scalar_t, typename acc_t>
struct WeightGradProblem {
  const acc_t* coef = nullptr;  // [T, r_max]: u for dA, t for dB
  int64_t coef_row_stride = 0;
  const scalar_t* rows = nullptr;  // [T, width]: x for dA, dy for dB
  int64_t row_stride = 0;
  scalar_t* grad = nullptr;
  int64_t grad_slot_stride = 0;
  int64_t grad_row_stride = 0;
  bool transposed_out = false;
  const acc_t* scales = nullptr;
  const int64_t* ranks = nullptr;
  const int64_t* token_order = nullptr;
  int64_t r_max = 0;
};

}  // namespace cpu
}  // namespace lora_fast
