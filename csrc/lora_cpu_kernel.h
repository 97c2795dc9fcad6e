// Multi-adapter LoRA CPU kernel body. lora_cpu.cpp includes this file once per instruction set,
// each time inside its own namespace and `#pragma GCC target` region, after defining:
//   LF_VEC_BYTES  bytes of one SIMD register (64 AVX-512, 32 AVX2, 16 SSE2 / NEON)
//   LF_SHRINK_TN  rank rows per shrink register tile (tile = LF_TOKENS_PER_TILE x LF_SHRINK_TN)
//   LF_EXPAND_NV  output vectors per expand register tile (tile = LF_TOKENS_PER_TILE x LF_EXPAND_NV)
//   LF_LANES_TM   tokens per shrink_lanes / expand_lanes register tile (slots of kLanesTokens or more)
//   LF_LANES_NV   output vectors per expand_lanes register tile
// The code uses GCC/Clang vector extensions so that one source compiles to each register width.
// It includes nothing: lora_cpu.cpp includes the standard headers and lora_cpu_work.h (WorkItem,
// Problem, Mode) first.

// Sum of the lanes of a vector, by halving (a few shuffles, not a lane-by-lane loop).
template <typename acc_t, int Bytes>
struct LaneSum {
  typedef acc_t vec __attribute__((vector_size(Bytes)));
  static inline acc_t sum(vec v) {
    if constexpr (Bytes == 2 * static_cast<int>(sizeof(acc_t))) {
      return v[0] + v[1];
    } else {
      typedef acc_t half __attribute__((vector_size(Bytes / 2)));
      half lo, hi;
      __builtin_memcpy(&lo, &v, Bytes / 2);
      __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + Bytes / 2, Bytes / 2);
      return LaneSum<acc_t, Bytes / 2>::sum(lo + hi);
    }
  }
};

template <typename acc_t>
struct Simd {
  typedef acc_t vec __attribute__((vector_size(LF_VEC_BYTES)));
  static constexpr int lanes = LF_VEC_BYTES / sizeof(acc_t);

  static inline vec load(const acc_t* p) {
    vec v;
    __builtin_memcpy(&v, p, sizeof(vec));
    return v;
  }
  static inline void store(acc_t* p, vec v) { __builtin_memcpy(p, &v, sizeof(vec)); }
  static inline acc_t sum(vec v) { return LaneSum<acc_t, LF_VEC_BYTES>::sum(v); }
};

// t[i * ldt + j] = dot(x_rows[i], a_rows[j]) over d, for i < M, j < TN.
template <typename acc_t, int M, int TN>
inline void shrink_tile(const acc_t* const* x_rows, const acc_t* const* a_rows, int64_t d, acc_t* t,
                        int64_t ldt) {
  using S = Simd<acc_t>;
  typename S::vec acc[M][TN];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < TN; ++j) acc[i][j] = typename S::vec{};
  int64_t c = 0;
  for (; c + S::lanes <= d; c += S::lanes) {
    typename S::vec a[TN];
    for (int j = 0; j < TN; ++j) a[j] = S::load(a_rows[j] + c);
    for (int i = 0; i < M; ++i) {
      const typename S::vec xv = S::load(x_rows[i] + c);
      for (int j = 0; j < TN; ++j) acc[i][j] += xv * a[j];
    }
  }
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < TN; ++j) {
      acc_t s = S::sum(acc[i][j]);
      for (int64_t cc = c; cc < d; ++cc) s += x_rows[i][cc] * a_rows[j][cc];
      t[i * ldt + j] = s;
    }
  }
}

// t[i][0:k] for M tokens: tiles of LF_SHRINK_TN rank rows, then single rows for the remainder.
template <typename acc_t, int M>
inline void shrink_tokens(const acc_t* const* x_rows, const acc_t* a, int64_t k, int64_t d_in,
                          acc_t* t, int64_t ldt) {
  const acc_t* a_rows[LF_SHRINK_TN];
  int64_t j = 0;
  for (; j + LF_SHRINK_TN <= k; j += LF_SHRINK_TN) {
    for (int q = 0; q < LF_SHRINK_TN; ++q) a_rows[q] = a + (j + q) * d_in;
    shrink_tile<acc_t, M, LF_SHRINK_TN>(x_rows, a_rows, d_in, t + j, ldt);
  }
  for (; j < k; ++j) {
    a_rows[0] = a + j * d_in;
    shrink_tile<acc_t, M, 1>(x_rows, a_rows, d_in, t + j, ldt);
  }
}

// y_rows[i][n] += sum_j t[i * ldt + j] * bt[j * d_out + n] for i < M, n < d_out (with `write`,
// y_rows[i][n] = that sum: y is not read).
template <typename acc_t, int M>
inline void expand_tokens(const acc_t* t, int64_t ldt, const acc_t* bt, int64_t k, int64_t d_out,
                          acc_t* const* y_rows, bool write) {
  using S = Simd<acc_t>;
  using V = typename S::vec;
  constexpr int W = S::lanes;
  constexpr int NV = LF_EXPAND_NV;
  int64_t n = 0;
  for (; n + NV * W <= d_out; n += NV * W) {
    V acc[M][NV];
    for (int i = 0; i < M; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v] = V{};
    for (int64_t j = 0; j < k; ++j) {
      V b[NV];
      for (int v = 0; v < NV; ++v) b[v] = S::load(bt + j * d_out + n + v * W);
      for (int i = 0; i < M; ++i) {
        const acc_t tv = t[i * ldt + j];
        for (int v = 0; v < NV; ++v) acc[i][v] += b[v] * tv;
      }
    }
    for (int i = 0; i < M; ++i)
      for (int v = 0; v < NV; ++v) {
        acc_t* y = y_rows[i] + n + v * W;
        S::store(y, write ? acc[i][v] : S::load(y) + acc[i][v]);
      }
  }
  for (; n + W <= d_out; n += W) {
    V acc[M];
    for (int i = 0; i < M; ++i) acc[i] = V{};
    for (int64_t j = 0; j < k; ++j) {
      const V b = S::load(bt + j * d_out + n);
      for (int i = 0; i < M; ++i) acc[i] += b * t[i * ldt + j];
    }
    for (int i = 0; i < M; ++i) S::store(y_rows[i] + n, write ? acc[i] : S::load(y_rows[i] + n) + acc[i]);
  }
  for (; n < d_out; ++n) {
    for (int i = 0; i < M; ++i) {
      acc_t s = 0;
      for (int64_t j = 0; j < k; ++j) s += t[i * ldt + j] * bt[j * d_out + n];
      y_rows[i][n] = write ? s : y_rows[i][n] + s;
    }
  }
}

// Slots with at most kStreamTokens tokens (decode): each weight row serves so few tokens that
// the time goes to reading it from memory. These read the slot's [k][width] block front to back,
// one row at a time, so the weight blocks of consecutive slots form one sequential stream that
// the hardware prefetcher follows from slot to slot. (The register tiles above read TN or k rows
// side by side: many short streams, restarted at every slot, which measured 1.3x slower here.)
template <typename acc_t, int M>
inline void shrink_rows(const acc_t* const* x_rows, const acc_t* a, int64_t k, int64_t d, acc_t* t,
                        int64_t ldt) {
  using S = Simd<acc_t>;
  using V = typename S::vec;
  constexpr int W = S::lanes;
  for (int64_t j = 0; j < k; ++j) {
    const acc_t* row = a + j * d;
    V acc[M][2];
    for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = V{};
    int64_t c = 0;
    for (; c + 2 * W <= d; c += 2 * W) {
      __builtin_prefetch(row + c + kStreamPrefetchBytes / sizeof(acc_t), 0, 3);
      __builtin_prefetch(row + c + W + kStreamPrefetchBytes / sizeof(acc_t), 0, 3);
      const V a0 = S::load(row + c), a1 = S::load(row + c + W);
      for (int i = 0; i < M; ++i) {
        acc[i][0] += S::load(x_rows[i] + c) * a0;
        acc[i][1] += S::load(x_rows[i] + c + W) * a1;
      }
    }
    for (int i = 0; i < M; ++i) {
      acc_t s = S::sum(acc[i][0] + acc[i][1]);
      for (int64_t cc = c; cc < d; ++cc) s += x_rows[i][cc] * row[cc];
      t[i * ldt + j] = s;
    }
  }
}

// (with `write`, the first rank row's products are stored and y is not read)
template <typename acc_t, int M>
inline void expand_rows(const acc_t* t, int64_t ldt, const acc_t* bt, int64_t k, int64_t d_out,
                        acc_t* const* y_rows, bool write) {
  using S = Simd<acc_t>;
  using V = typename S::vec;
  constexpr int W = S::lanes;
  for (int64_t j = 0; j < k; ++j) {
    const acc_t* row = bt + j * d_out;
    const bool fresh = write && j == 0;
    V tv[M];
    for (int i = 0; i < M; ++i) tv[i] = V{} + t[i * ldt + j];
    int64_t n = 0;
    for (; n + 2 * W <= d_out; n += 2 * W) {
      __builtin_prefetch(row + n + kStreamPrefetchBytes / sizeof(acc_t), 0, 3);
      __builtin_prefetch(row + n + W + kStreamPrefetchBytes / sizeof(acc_t), 0, 3);
      const V b0 = S::load(row + n), b1 = S::load(row + n + W);
      for (int i = 0; i < M; ++i) {
        const V y0 = fresh ? V{} : S::load(y_rows[i] + n), y1 = fresh ? V{} : S::load(y_rows[i] + n + W);
        S::store(y_rows[i] + n, y0 + tv[i] * b0);
        S::store(y_rows[i] + n + W, y1 + tv[i] * b1);
      }
    }
    for (; n < d_out; ++n)
      for (int i = 0; i < M; ++i) y_rows[i][n] = (fresh ? acc_t(0) : y_rows[i][n]) + t[i * ldt + j] * row[n];
  }
}

// The register tile both GEMM-style passes share: acc[i][g] = sum over s < steps of
// coef_rows[i][s] * b[s * ld_b + g * lanes : + lanes], for M rows of coefficients (each element a
// broadcast the FMA takes from memory) and G vectors of b per step. With `next_rows`, M rows that
// the next tile takes as its coefficients, each block of kBlock steps also prefetches (into L2)
// the piece of them that block consumes of its own rows. (A shrink tile reads its tokens' x rows
// as M short streams, a few KB each, which the hardware prefetcher picks up too late: on the Intel
// Xeon, a prefill-shaped delta over 16 slots of 32 tokens took 1.4x as long with x beyond L2 as
// with x in L2.) The prefetches sit between blocks, outside the unrolled loop, whose M row
// pointers and accumulators use up the registers.
template <typename acc_t, int M, int G>
inline void lanes_tile_sums(const acc_t* const* coef_rows, const acc_t* b, int64_t ld_b, int64_t steps,
                            typename Simd<acc_t>::vec (&acc)[M][G], const acc_t* const* next_rows = nullptr) {
  using S = Simd<acc_t>;
  using V = typename S::vec;
  constexpr int W = S::lanes;
  constexpr int64_t kBlock = 64 / sizeof(acc_t);  // steps per block: a line of each row
  for (int i = 0; i < M; ++i)
    for (int g = 0; g < G; ++g) acc[i][g] = V{};
  for (int64_t s0 = 0; s0 < steps; s0 += kBlock) {
    const int64_t end = std::min(steps, s0 + kBlock);
    // (unrolled so that the M row pointers advance once per four steps, not once per step)
#pragma GCC unroll 4
    for (int64_t s = s0; s < end; ++s) {
      V bv[G];
      for (int g = 0; g < G; ++g) bv[g] = S::load(b + s * ld_b + g * W);
      for (int i = 0; i < M; ++i) {
        const acc_t coef = coef_rows[i][s];
        for (int g = 0; g < G; ++g) acc[i][g] += bv[g] * coef;
      }
    }
    if (next_rows != nullptr)
      for (int i = 0; i < M; ++i) __builtin_prefetch(next_rows[i] + s0, 0, 2);
  }
}

// The shrink of a slot with at least kLanesTokens tokens, GEMM style: the ranks lie across the
// vector lanes. `at` is the slot's A transposed, [d][kp] (kp: the rank rounded up to whole
// vectors; the padding lanes hold anything, the t columns they make are never read), so each
// step along d loads G vectors of A and multiplies them by each token's x element (a broadcast
// the FMA takes from memory): x is read once per tile of M tokens and no lanes are summed
// across. (The dot-product tiles of shrink_tokens keep A in place but end every tile with
// horizontal sums: on rank-16 slots of 32-64 tokens this shrink, the transpose included, takes
// 0.7-0.85x of their time; see kLanesTokens.)
// t[i * ldt + j] for i < M, j < G * lanes.
// `next_rows`: the x rows of the tile after this one, prefetched as it goes (or nullptr).
template <typename acc_t, int M, int G>
inline void shrink_lanes_tile(const acc_t* const* x_rows, const acc_t* at, int64_t kp, int64_t d, acc_t* t,
                              int64_t ldt, const acc_t* const* next_rows) {
  using S = Simd<acc_t>;
  using V = typename S::vec;
  V acc[M][G];
  lanes_tile_sums<acc_t, M, G>(x_rows, at, kp, d, acc, next_rows);
  for (int i = 0; i < M; ++i)
    for (int g = 0; g < G; ++g) S::store(t + i * ldt + g * S::lanes, acc[i][g]);
}

// t rows of M tokens over all kp ranks: pairs of vectors, then a last single one (the first of
// them prefetches `next_rows`, the next tile's x rows, when given).
template <typename acc_t, int M>
inline void shrink_lanes(const acc_t* const* x_rows, const acc_t* at, int64_t kp, int64_t d, acc_t* t,
                         int64_t ldt, const acc_t* const* next_rows) {
  constexpr int W = Simd<acc_t>::lanes;
  int64_t v = 0;
  for (; v + 2 * W <= kp; v += 2 * W, next_rows = nullptr)
    shrink_lanes_tile<acc_t, M, 2>(x_rows, at + v, kp, d, t + v, ldt, next_rows);
  if (v < kp) shrink_lanes_tile<acc_t, M, 1>(x_rows, at + v, kp, d, t + v, ldt, next_rows);
}

// Issues software prefetches (into L2) for a byte range, a share of it at each step: run_items
// spreads the next slot's weights over the current slot's register tiles, so that their read
// from memory overlaps this slot's arithmetic instead of stalling the next slot.
struct Prefetcher {
  const char* next = nullptr;
  const char* end = nullptr;
  int64_t lines_per_step = 0;
  void start(const void* begin, int64_t bytes, int64_t steps) {
    next = static_cast<const char*>(begin);
    end = next + bytes;
    lines_per_step = (bytes / 64 + steps) / std::max<int64_t>(steps, 1);
  }
  inline void step() {
    for (int64_t q = 0; q < lines_per_step && next < end; ++q, next += 64) __builtin_prefetch(next, 0, 2);
  }
};

// The expand of a slot that shrink_lanes took, all its tokens' t at hand: a register tile of M
// tokens by NV vectors of output columns, over every rank at once.
// y_rows[i][v * W + c] = (write ? 0 : y_rows[i][v * W + c]) + sum_j t[i * ldt + j] * bt[j * ld_bt + v * W + c]
template <typename acc_t, int M, int NV>
inline void expand_lanes_tile(const acc_t* t, int64_t ldt, const acc_t* bt, int64_t ld_bt, int64_t k,
                              acc_t* const* y_rows, bool write) {
  using S = Simd<acc_t>;
  using V = typename S::vec;
  constexpr int W = S::lanes;
  const acc_t* t_rows[M];
  for (int i = 0; i < M; ++i) t_rows[i] = t + i * ldt;
  V acc[M][NV];
  lanes_tile_sums<acc_t, M, NV>(t_rows, bt, ld_bt, k, acc);
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < NV; ++v) {
      acc_t* y = y_rows[i] + v * W;
      S::store(y, write ? acc[i][v] : S::load(y) + acc[i][v]);
    }
}

// The item's `count` tokens (y_rows holds LF_LANES_TM - 1 more, padding that points at scratch):
// blocks of output columns outer, token tiles inner, so a block's B^T rows stay in L1 while every
// tile of the item uses them. Each tile prefetches its rows' piece of the next column block: the
// y rows of a prefill come from L2 or beyond (a 32-token item's rows at 576 columns are 72 KB),
// and a tile touches a few lines of each of its rows at a time, which the hardware prefetcher
// does not follow.
template <typename acc_t, int NV>
inline int64_t expand_lanes_columns(const acc_t* t, int64_t ldt, const acc_t* bt, int64_t k, int64_t d_out,
                                    int64_t n, acc_t* const* y_rows, int64_t count, bool write, Prefetcher& pf) {
  constexpr int W = Simd<acc_t>::lanes;
  constexpr int kLine = 64 / static_cast<int>(sizeof(acc_t));
  for (; n + NV * W <= d_out; n += NV * W) {
    for (int64_t first = 0; first < count; first += LF_LANES_TM) {
      acc_t* y[LF_LANES_TM];
      for (int i = 0; i < LF_LANES_TM; ++i) y[i] = y_rows[first + i] + n;
      // (past the last block this reaches into the next row, or past the end: a prefetch never faults)
      for (int i = 0; i < LF_LANES_TM; ++i)
        for (int c = 0; c < NV * W; c += kLine) __builtin_prefetch(y[i] + NV * W + c, 1, 3);
      if (count - first > 4 || LF_LANES_TM == 4)
        expand_lanes_tile<acc_t, LF_LANES_TM, NV>(t + first * ldt, ldt, bt + n, d_out, k, y, write);
      else
        expand_lanes_tile<acc_t, 4, NV>(t + first * ldt, ldt, bt + n, d_out, k, y, write);
      pf.step();
    }
  }
  return n;
}

template <typename acc_t>
inline void expand_lanes(const acc_t* t, int64_t ldt, const acc_t* bt, int64_t k, int64_t d_out,
                         acc_t* const* y_rows, int64_t count, bool write, Prefetcher& pf) {
  int64_t n = expand_lanes_columns<acc_t, LF_LANES_NV>(t, ldt, bt, k, d_out, 0, y_rows, count, write, pf);
  n = expand_lanes_columns<acc_t, 1>(t, ldt, bt, k, d_out, n, y_rows, count, write, pf);
  for (; n < d_out; ++n)
    for (int64_t i = 0; i < count; ++i) {
      acc_t sum = 0;
      for (int64_t j = 0; j < k; ++j) sum += t[i * ldt + j] * bt[j * d_out + n];
      y_rows[i][n] = write ? sum : y_rows[i][n] + sum;
    }
}

// N one-token slots of the same rank at once (decode): the shrink_rows and expand_rows streams of
// all N slots' weights interleaved, so N streams are in flight from memory instead of one. Each
// slot's sums run in the same order as shrink_rows / expand_rows for one token. A core reading
// 36 KB weight blocks one at a time reached 11.3 GB/s on the Intel Xeon, two interleaved
// 13.6-14.0 GB/s, four 15.9 (eight: 16.0; a 470 MB set of rank-16 576 x 576 adapters).
// t[s][j] = dot(x[s], a[s][j]) for j < k, s < N.
template <typename acc_t, int N>
inline void shrink_rows_multi(const acc_t* const* x, const acc_t* const* a, int64_t k, int64_t d, acc_t* const* t) {
  using S = Simd<acc_t>;
  using V = typename S::vec;
  constexpr int W = S::lanes;
  constexpr int64_t ahead = kStreamPrefetchBytes / sizeof(acc_t);
  for (int64_t j = 0; j < k; ++j) {
    const acc_t* r[N];
    V acc[N][2];
    for (int s = 0; s < N; ++s) {
      r[s] = a[s] + j * d;
      acc[s][0] = acc[s][1] = V{};
    }
    int64_t c = 0;
    for (; c + 2 * W <= d; c += 2 * W) {
      for (int s = 0; s < N; ++s) {
        __builtin_prefetch(r[s] + c + ahead, 0, 3);
        __builtin_prefetch(r[s] + c + W + ahead, 0, 3);
        acc[s][0] += S::load(x[s] + c) * S::load(r[s] + c);
        acc[s][1] += S::load(x[s] + c + W) * S::load(r[s] + c + W);
      }
    }
    for (int s = 0; s < N; ++s) {
      acc_t sum = S::sum(acc[s][0] + acc[s][1]);
      for (int64_t cc = c; cc < d; ++cc) sum += x[s][cc] * r[s][cc];
      t[s][j] = sum;
    }
  }
}

// y[s][n] (+)= sum_j t[s][j] * bt[s][j][n] for n < d_out, s < N (with `write`, y is not read: the
// first rank row's products are stored).
template <typename acc_t, int N>
inline void expand_rows_multi(const acc_t* const* t, const acc_t* const* bt, acc_t* const* y, int64_t k,
                              int64_t d_out, bool write) {
  using S = Simd<acc_t>;
  using V = typename S::vec;
  constexpr int W = S::lanes;
  constexpr int64_t ahead = kStreamPrefetchBytes / sizeof(acc_t);
  for (int64_t j = 0; j < k; ++j) {
    const acc_t* r[N];
    acc_t tj[N];
    for (int s = 0; s < N; ++s) {
      r[s] = bt[s] + j * d_out;
      tj[s] = t[s][j];
    }
    const bool fresh = write && j == 0;
    int64_t n = 0;
    for (; n + W <= d_out; n += W)
      for (int s = 0; s < N; ++s) {
        __builtin_prefetch(r[s] + n + ahead, 0, 3);
        S::store(y[s] + n, (fresh ? V{} : S::load(y[s] + n)) + S::load(r[s] + n) * tj[s]);
      }
    for (; n < d_out; ++n)
      for (int s = 0; s < N; ++s) y[s][n] = (fresh ? acc_t(0) : y[s][n]) + tj[s] * r[s][n];
  }
}

// Calls f(std::integral_constant<int, M>{}) with M = m, for m in [1, LF_TOKENS_PER_TILE].
template <typename F>
inline void with_token_count(int m, F&& f) {
  static_assert(LF_TOKENS_PER_TILE == 4, "with_token_count lists the counts 1 to 4");
  switch (m) {
    case 4: f(std::integral_constant<int, 4>{}); return;
    case 3: f(std::integral_constant<int, 3>{}); return;
    case 2: f(std::integral_constant<int, 2>{}); return;
    default: f(std::integral_constant<int, 1>{}); return;
  }
}

// t = A x for m <= LF_TOKENS_PER_TILE tokens, streamed or register-tiled by the slot's token count.
template <typename acc_t>
inline void shrink(bool stream, int m, const acc_t* const* x_rows, const acc_t* a, int64_t k, int64_t d,
                   acc_t* t, int64_t ldt) {
  with_token_count(m, [&](auto M) {
    if (stream)
      shrink_rows<acc_t, decltype(M)::value>(x_rows, a, k, d, t, ldt);
    else
      shrink_tokens<acc_t, decltype(M)::value>(x_rows, a, k, d, t, ldt);
  });
}

// y += B t for m <= LF_TOKENS_PER_TILE tokens, streamed or register-tiled like shrink().
template <typename acc_t>
inline void expand(bool stream, int m, const acc_t* t, int64_t ldt, const acc_t* bt, int64_t k, int64_t d_out,
                   acc_t* const* y_rows, bool write) {
  with_token_count(m, [&](auto M) {
    if (stream)
      expand_rows<acc_t, decltype(M)::value>(t, ldt, bt, k, d_out, y_rows, write);
    else
      expand_tokens<acc_t, decltype(M)::value>(t, ldt, bt, k, d_out, y_rows, write);
  });
}

// An N x N tile of acc_t held in N vectors of N lanes, transposed in log2(N) rounds of two-input
// shuffles: round H exchanges, between rows i and i + H (i without bit H), the lanes whose bit H
// differs, i.e. the off-diagonal H x H blocks of every 2H x 2H block.
template <typename acc_t, int N>
struct SquareTile {
  typedef acc_t vec __attribute__((vector_size(N * sizeof(acc_t))));

  template <int H, bool Upper, std::size_t... I>
  static inline vec mix(vec a, vec b, std::index_sequence<I...>) {
    // lane l of the lower row: a[l] where bit H of l is clear, else b[l - H]; of the upper row:
    // a[l + H] where it is clear, else b[l] (index N + l names b's lane l)
#if defined(__clang__)
    return __builtin_shufflevector(
        a, b, (Upper ? ((I & H) ? N + I : I + H) : ((I & H) ? N + I - H : I))...);
#else
    typedef std::conditional_t<sizeof(acc_t) == 8, int64_t, int32_t> index_t;
    typedef index_t mask __attribute__((vector_size(N * sizeof(acc_t))));
    return __builtin_shuffle(
        a, b, mask{static_cast<index_t>(Upper ? ((I & H) ? N + I : I + H) : ((I & H) ? N + I - H : I))...});
#endif
  }

  template <int H>
  static inline void round(vec* r) {
    for (int i = 0; i < N; ++i) {
      if (i & H) continue;
      const vec lo = mix<H, false>(r[i], r[i + H], std::make_index_sequence<N>{});
      const vec hi = mix<H, true>(r[i], r[i + H], std::make_index_sequence<N>{});
      r[i] = lo;
      r[i + H] = hi;
    }
    if constexpr (H > 1) round<H / 2>(r);
  }

  // dst[j * ld_dst + i] = scale * src[i * ld_src + j] for i, j < N.
  static inline void transpose(const acc_t* src, int64_t ld_src, acc_t* dst, int64_t ld_dst, acc_t scale) {
    vec r[N];
    for (int i = 0; i < N; ++i) __builtin_memcpy(&r[i], src + i * ld_src, sizeof(vec));
    round<N / 2>(r);
    for (int j = 0; j < N; ++j) {
      const vec v = r[j] * scale;
      __builtin_memcpy(dst + j * ld_dst, &v, sizeof(vec));
    }
  }
};

template <typename src_t, typename dst_t, typename acc_t>
inline void transpose_scalar(const src_t* src, int64_t ld_src, int64_t rows, int64_t cols, dst_t* dst,
                             int64_t ld_dst, acc_t scale) {
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t i = 0; i < rows; ++i)
      dst[j * ld_dst + i] = static_cast<dst_t>(scale * static_cast<acc_t>(src[i * ld_src + j]));
}

template <int N, typename acc_t>
inline void transpose_tiles(const acc_t* src, int64_t ld_src, int64_t rows, int64_t cols, acc_t* dst,
                            int64_t ld_dst, acc_t scale) {
  int64_t i0 = 0;
  for (; i0 + N <= rows; i0 += N) {
    int64_t j0 = 0;
    for (; j0 + N <= cols; j0 += N)
      SquareTile<acc_t, N>::transpose(src + i0 * ld_src + j0, ld_src, dst + j0 * ld_dst + i0, ld_dst, scale);
    transpose_scalar(src + i0 * ld_src + j0, ld_src, N, cols - j0, dst + j0 * ld_dst + i0, ld_dst, scale);
  }
  transpose_scalar(src + i0 * ld_src, ld_src, rows - i0, cols, dst + i0, ld_dst, scale);
}

// dst[j * ld_dst + i] = scale * src[i * ld_src + j] for i < rows, j < cols. Between acc_t arrays
// it goes through N x N register tiles, N the widest power of two (up to one register) that the
// shorter side holds, so rank 8, 16 or 64 blocks are whole tiles; conversions go element by element.
template <typename src_t, typename dst_t, typename acc_t>
inline void transpose_scaled(const src_t* src, int64_t ld_src, int64_t rows, int64_t cols, dst_t* dst,
                             int64_t ld_dst, acc_t scale) {
  if constexpr (std::is_same<src_t, acc_t>::value && std::is_same<dst_t, acc_t>::value) {
    constexpr int lanes = Simd<acc_t>::lanes;
    const int64_t side = std::min(rows, cols);
    if constexpr (lanes >= 16) {
      if (side >= 16) return transpose_tiles<16>(src, ld_src, rows, cols, dst, ld_dst, scale);
    }
    if constexpr (lanes >= 8) {
      if (side >= 8) return transpose_tiles<8>(src, ld_src, rows, cols, dst, ld_dst, scale);
    }
    if constexpr (lanes >= 4) {
      if (side >= 4) return transpose_tiles<4>(src, ld_src, rows, cols, dst, ld_dst, scale);
    }
  }
  transpose_scalar(src, ld_src, rows, cols, dst, ld_dst, scale);
}

// The first k columns of a slot's [rows, r_max] block as dst [k][rows] (acc_t).
template <typename scalar_t, typename acc_t>
inline void transpose_rank_columns(const scalar_t* src, int64_t rows, int64_t r_max, int64_t k, acc_t* dst) {
  transpose_scaled(src, r_max, rows, k, dst, rows, acc_t(1));
}

// One run of work items (each: up to kChunkTokens tokens of one slot, in adapter-sorted order).
// Per token: a shrink with k weight rows, then an expand with k transposed weight rows.
//   kShrink:    t = A x                      (stores t, no expand)
//   kExpand:    out += scale * B t_in        (no shrink)
//   kDelta:     out += scale * B (A x)
//   kBackwardX: u = B^T dy, dx += scale * A^T u (x = dy, out = dx; stores u when p.t is set,
//               skips the expand when p.out is null)
template <typename scalar_t, typename acc_t, Mode mode>
void run_items(const Problem<scalar_t, acc_t>& p, const WorkItem* items, int64_t num_items) {
  constexpr int TM = LF_TOKENS_PER_TILE;
  constexpr bool convert = !std::is_same<scalar_t, acc_t>::value;
  constexpr bool transposed = mode == Mode::kBackwardX;
  constexpr bool has_shrink = mode != Mode::kExpand;
  const bool has_expand = mode != Mode::kShrink && p.out != nullptr;
  const int64_t in_width = transposed ? p.d_out : p.d_in;
  const int64_t out_width = transposed ? p.d_in : p.d_out;
  // Weights the token loop reads, as [k][width] rows in acc_t: used in place when already so,
  // else prepared per slot into per-thread scratch.
  const bool a_in_place = !convert && !transposed;
  const bool bt_in_place = !convert && transposed;

  std::vector<acc_t> a_buf(has_shrink && !a_in_place ? p.r_max * in_width : 0);
  std::vector<acc_t> bt_buf(has_expand && !bt_in_place ? p.r_max * out_width : 0);
  std::vector<acc_t> x_buf(convert && has_shrink ? std::max(TM, LF_LANES_TM) * in_width : 0);
  std::vector<acc_t> y_buf(convert && has_expand ? TM * out_width : 0);
  acc_t t_buf[TM * kMaxTileRank];
  int64_t loaded_slot = -1;
  const acc_t* a = nullptr;
  const acc_t* bt = nullptr;
  // Slots with at least kLanesTokens tokens shrink through shrink_lanes: A transposed into
  // at_buf ([in_width][kp], once per slot), t of the item's tokens in t_item (all ranks; the
  // rows past the item take a last tile's padding tokens).
  constexpr int64_t W = Simd<acc_t>::lanes;
  const int64_t ldt_item = (p.r_max + W - 1) / W * W;
  std::vector<acc_t> at_buf;
  std::vector<acc_t> t_item;
  std::vector<acc_t> y_pad;
  int64_t packed_slot = -1;
  // x_rows[i] for m tokens: x's own rows, or (converting) x_buf's, filled when `fill` is set (a
  // later rank pass over the same tokens reuses them)
  auto gather_x = [&](const int64_t* tokens, int m, bool fill, const acc_t** x_rows) {
    for (int i = 0; i < m; ++i) {
      const scalar_t* row = p.x + tokens[i] * p.x_row_stride;
      if constexpr (convert) {
        if (fill)
          for (int64_t c = 0; c < in_width; ++c) x_buf[i * in_width + c] = static_cast<acc_t>(row[c]);
        x_rows[i] = x_buf.data() + i * in_width;
      } else {
        x_rows[i] = row;
      }
    }
  };

  for (int64_t it = 0; it < num_items; ++it) {
    const WorkItem& item = items[it];
    const int64_t slot = item.slot;
    const int64_t k = p.ranks[slot];
    const acc_t scale = p.scales ? p.scales[slot] : acc_t(1);
    if (slot != loaded_slot) {
      const scalar_t* a_slot = p.A ? p.A + slot * p.r_max * p.d_in : nullptr;
      const scalar_t* b_slot = p.B ? p.B + slot * p.d_out * p.r_max : nullptr;
      // B[slot]^T as [k][d_out] rows of acc_t: in place when B is rank-major and needs no
      // conversion, else converted or transposed into scratch.
      auto b_transposed = [&](std::vector<acc_t>& scratch) -> const acc_t* {
        if (p.b_rank_major) {
          if constexpr (!convert) {
            return b_slot;
          } else {
            for (int64_t q = 0; q < k * p.d_out; ++q) scratch[q] = static_cast<acc_t>(b_slot[q]);
            return scratch.data();
          }
        }
        transpose_rank_columns(b_slot, p.d_out, p.r_max, k, scratch.data());
        return scratch.data();
      };
      if (has_shrink) {
        if constexpr (transposed) {
          a = b_transposed(a_buf);
        } else if constexpr (convert) {
          for (int64_t q = 0; q < k * p.d_in; ++q) a_buf[q] = static_cast<acc_t>(a_slot[q]);
          a = a_buf.data();
        } else {
          a = a_slot;
        }
      }
      if (has_expand) {
        if constexpr (!transposed) {
          bt = b_transposed(bt_buf);
        } else if constexpr (convert) {
          for (int64_t q = 0; q < k * p.d_in; ++q) bt_buf[q] = static_cast<acc_t>(a_slot[q]);
          bt = bt_buf.data();
        } else {
          bt = a_slot;
        }
      }
      loaded_slot = slot;
    }

    const bool stream = item.slot_tokens <= kStreamTokens;
    // Decode: this slot's one token and those of the next items, one-token slots of the same
    // rank, through interleaved streams (up to kStreamSlots; weights read in place).
    if constexpr (mode == Mode::kDelta && !convert) {
      if (stream && item.count == 1 && p.b_rank_major && p.t == nullptr && k <= kMaxTileRank) {
        int group = 1;
        while (group < kStreamSlots && it + group < num_items) {
          const WorkItem& other = items[it + group];
          if (other.count != 1 || other.slot_tokens > kStreamTokens || p.ranks[other.slot] != k) break;
          ++group;
        }
        if (group > 1) {
          const acc_t* xs[kStreamSlots];
          const acc_t* as[kStreamSlots];
          const acc_t* bs[kStreamSlots];
          acc_t* ys[kStreamSlots];
          acc_t* ts[kStreamSlots];
          acc_t t_group[kStreamSlots][kMaxTileRank];
          for (int g = 0; g < group; ++g) {
            const int64_t s = items[it + g].slot, token = p.token_order[items[it + g].begin];
            xs[g] = p.x + token * p.x_row_stride;
            as[g] = p.A + s * p.r_max * p.d_in;
            bs[g] = p.B + s * p.d_out * p.r_max;
            ys[g] = p.out + token * p.out_row_stride;
            ts[g] = t_group[g];
          }
          auto run_group = [&](auto n) {
            constexpr int N = decltype(n)::value;
            shrink_rows_multi<acc_t, N>(xs, as, k, p.d_in, ts);
            for (int g = 0; g < N; ++g) {
              const acc_t scale_g = p.scales ? p.scales[items[it + g].slot] : acc_t(1);
              for (int64_t j = 0; j < k; ++j) t_group[g][j] *= scale_g;
            }
            expand_rows_multi<acc_t, N>(ts, bs, ys, k, p.d_out, p.overwrite);
          };
          static_assert(kStreamSlots == 4, "the group sizes below are 2 to 4");
          if (group == 4)
            run_group(std::integral_constant<int, 4>{});
          else if (group == 3)
            run_group(std::integral_constant<int, 3>{});
          else
            run_group(std::integral_constant<int, 2>{});
          // the group's other items are done; their slots' weights were read in place, so
          // loaded_slot (this slot) stays valid for what follows
          it += group - 1;
          continue;
        }
      }
    }
    // (padding a rank to whole vectors must not cost more than a quarter of the work)
    const int64_t kp = (k + W - 1) / W * W;
    const bool lanes = has_shrink && item.slot_tokens >= kLanesTokens && 4 * (kp - k) <= k;
    if (lanes) {
      if (slot != packed_slot) {
        at_buf.resize(in_width * ldt_item);
        // (lanes k..kp-1 keep what the buffer held: t's columns past k are never read)
        transpose_scaled(a, in_width, k, in_width, at_buf.data(), kp, acc_t(1));
        t_item.resize((kChunkTokens + LF_LANES_TM) * ldt_item);
        packed_slot = slot;
      }
      const int64_t* tokens = p.token_order + item.begin;
      // The last item of a slot prefetches the next slot's A during its shrink and its B during
      // its expand (weights read in place: fp32 / fp64 forward with B rank-major).
      Prefetcher a_next, b_next;
      if constexpr (mode == Mode::kDelta && !convert) {
        if (it + 1 < num_items && items[it + 1].slot != slot && p.b_rank_major) {
          const int64_t next = items[it + 1].slot, k_next = p.ranks[next];
          const int64_t tiles = (item.count + LF_LANES_TM - 1) / LF_LANES_TM;
          a_next.start(p.A + next * p.r_max * p.d_in, k_next * p.d_in * int64_t(sizeof(acc_t)), tiles);
          b_next.start(p.B + next * p.d_out * p.r_max, k_next * p.d_out * int64_t(sizeof(acc_t)),
                       tiles * (p.d_out / (LF_LANES_NV * W) + 1));
        }
      }
      for (int64_t first = 0; first < item.count; first += LF_LANES_TM) {
        a_next.step();
        const int m = static_cast<int>(std::min<int64_t>(LF_LANES_TM, item.count - first));
        const acc_t* x_rows[LF_LANES_TM];
        gather_x(tokens + first, m, true, x_rows);
        for (int i = m; i < LF_LANES_TM; ++i) x_rows[i] = x_rows[m - 1];  // padding: t rows past the item
        // The x rows of the next tile, this item's or the next item's first (read in place only),
        // prefetched during this one.
        const acc_t* next_rows[LF_LANES_TM];
        const acc_t* const* prefetch = nullptr;
        if constexpr (!convert) {
          const int64_t* next_tokens = nullptr;
          int64_t next_count = 0;
          if (first + LF_LANES_TM < item.count) {
            next_tokens = tokens + first + LF_LANES_TM;
            next_count = item.count - first - LF_LANES_TM;
          } else if (it + 1 < num_items) {
            next_tokens = p.token_order + items[it + 1].begin;
            next_count = items[it + 1].count;
          }
          if (next_count > 0) {
            const int n = static_cast<int>(std::min<int64_t>(LF_LANES_TM, next_count));
            for (int i = 0; i < LF_LANES_TM; ++i) next_rows[i] = p.x + next_tokens[std::min(i, n - 1)] * p.x_row_stride;
            prefetch = next_rows;
          }
        }
        acc_t* t_rows = t_item.data() + first * ldt_item;
        if (m > 4 || LF_LANES_TM == 4)
          shrink_lanes<acc_t, LF_LANES_TM>(x_rows, at_buf.data(), kp, in_width, t_rows, ldt_item, prefetch);
        else
          shrink_lanes<acc_t, 4>(x_rows, at_buf.data(), kp, in_width, t_rows, ldt_item, prefetch);
      }
      for (int64_t i = 0; i < item.count; ++i) {
        acc_t* t_row = t_item.data() + i * ldt_item;
        if (p.t != nullptr)
          for (int64_t j = 0; j < k; ++j) p.t[tokens[i] * p.t_row_stride + j] = t_row[j];
        if (has_expand)
          for (int64_t j = 0; j < k; ++j) t_row[j] *= scale;
      }
      if constexpr (!convert) {
        if (has_expand) {
          // y rows in place, every rank in one pass; the padding tokens write to y_pad
          acc_t* y_rows[kChunkTokens + LF_LANES_TM];
          for (int64_t i = 0; i < item.count; ++i) y_rows[i] = p.out + tokens[i] * p.out_row_stride;
          y_pad.resize(out_width);
          for (int64_t i = item.count; i < item.count + LF_LANES_TM; ++i) y_rows[i] = y_pad.data();
          expand_lanes(t_item.data(), ldt_item, bt, k, out_width, y_rows, item.count, p.overwrite, b_next);
        }
        continue;
      }
    }
    for (int64_t first = 0; first < item.count; first += TM) {
      const int m = static_cast<int>(std::min<int64_t>(TM, item.count - first));
      const int64_t* tokens = p.token_order + item.begin + first;
      // The rank dimension goes through t_buf in pieces of kMaxTileRank so any rank fits on the
      // stack; each piece is shrunk and immediately expanded.
      for (int64_t j0 = 0; j0 < k; j0 += kMaxTileRank) {
        const int64_t kj = std::min<int64_t>(kMaxTileRank, k - j0);
        // the scaled t of this piece: t_item's rows (lanes), else t_buf's
        const acc_t* tp = t_buf;
        int64_t ldt = kMaxTileRank;
        if (lanes) {
          tp = t_item.data() + first * ldt_item + j0;
          ldt = ldt_item;
        } else if constexpr (has_shrink) {
          const acc_t* x_rows[TM];
          gather_x(tokens, m, j0 == 0, x_rows);
          const acc_t* a_piece = a + j0 * in_width;
          shrink<acc_t>(stream, m, x_rows, a_piece, kj, in_width, t_buf, kMaxTileRank);
          if (p.t != nullptr)
            for (int i = 0; i < m; ++i)
              for (int64_t j = 0; j < kj; ++j) p.t[tokens[i] * p.t_row_stride + j0 + j] = t_buf[i * kMaxTileRank + j];
        } else {
          for (int i = 0; i < m; ++i)
            for (int64_t j = 0; j < kj; ++j)
              t_buf[i * kMaxTileRank + j] = static_cast<acc_t>(p.t_in[tokens[i] * p.t_row_stride + j0 + j]);
        }
        if (!has_expand) continue;
        if (!lanes)
          for (int i = 0; i < m; ++i)
            for (int64_t j = 0; j < kj; ++j) t_buf[i * kMaxTileRank + j] *= scale;
        acc_t* y_rows[TM];
        for (int i = 0; i < m; ++i) {
          if constexpr (convert) {
            y_rows[i] = y_buf.data() + i * out_width;
          } else {
            y_rows[i] = p.out + tokens[i] * p.out_row_stride;
          }
        }
        const acc_t* bt_piece = bt + j0 * out_width;
        // the first rank piece writes the rows (y_buf, or out itself when overwriting), later ones add
        expand<acc_t>(stream, m, tp, ldt, bt_piece, kj, out_width, y_rows, j0 == 0 && (convert || p.overwrite));
      }
      if constexpr (convert) {
        if (has_expand) {
          // Round once: out = scalar_t(out + delta), the delta kept in acc_t until here.
          for (int i = 0; i < m; ++i) {
            scalar_t* row = p.out + tokens[i] * p.out_row_stride;
            const acc_t* y = y_buf.data() + i * out_width;
            if (p.overwrite)
              for (int64_t n = 0; n < out_width; ++n) row[n] = static_cast<scalar_t>(y[n]);
            else
              for (int64_t n = 0; n < out_width; ++n) row[n] = static_cast<scalar_t>(static_cast<acc_t>(row[n]) + y[n]);
          }
        }
      }
    }
  }
}

// g[j][c] += sum_i coef_i[j] * row_i[c] for j < J (J rows of g, ld = ldg) and the columns from c on
// in blocks of NV vectors; returns the first column no block covered.
template <typename acc_t, int J, int NV>
inline int64_t outer_columns(const acc_t* const* coef, const acc_t* const* rows, int64_t count, int64_t width,
                             int64_t c, acc_t* g, int64_t ldg) {
  using S = Simd<acc_t>;
  using V = typename S::vec;
  constexpr int W = S::lanes;
  for (; c + NV * W <= width; c += NV * W) {
    V acc[J][NV];
    for (int j = 0; j < J; ++j)
      for (int v = 0; v < NV; ++v) acc[j][v] = S::load(g + j * ldg + c + v * W);
    for (int64_t i = 0; i < count; ++i) {
      V r[NV];
      for (int v = 0; v < NV; ++v) r[v] = S::load(rows[i] + c + v * W);
      for (int j = 0; j < J; ++j) {
        const acc_t cv = coef[i][j];
        for (int v = 0; v < NV; ++v) acc[j][v] += r[v] * cv;
      }
    }
    for (int j = 0; j < J; ++j)
      for (int v = 0; v < NV; ++v) S::store(g + j * ldg + c + v * W, acc[j][v]);
  }
  return c;
}

// g[j][c] += sum_i coef_i[j] * row_i[c] for j < J (J rows of g, ld = ldg), c < width: blocks of
// LF_EXPAND_NV vectors, then single vectors (a width that is no multiple of the block, e.g. 1040
// columns, ran 1.5x slower with only the scalar tail after the blocks), then scalars.
template <typename acc_t, int J>
inline void outer_accumulate(const acc_t* const* coef, const acc_t* const* rows, int64_t count, int64_t width,
                             acc_t* g, int64_t ldg) {
  int64_t c = outer_columns<acc_t, J, LF_EXPAND_NV>(coef, rows, count, width, 0, g, ldg);
  c = outer_columns<acc_t, J, 1>(coef, rows, count, width, c, g, ldg);
  for (; c < width; ++c)
    for (int j = 0; j < J; ++j) {
      acc_t s = g[j * ldg + c];
      for (int64_t i = 0; i < count; ++i) s += coef[i][j] * rows[i][c];
      g[j * ldg + c] = s;
    }
}

// Weight gradients, one item per (slot, block of columns): for the slot's tokens i,
//   g[j][c] = scale * sum_i coef[i][j] * rows[i][c]
// written to dA[slot][j][c] (coef = u, rows = x) or, transposed, to dB[slot][c][j]
// (coef = t, rows = dy). Each item owns its block of the output: no atomics, a fixed order.
template <typename scalar_t, typename acc_t>
void run_weight_grad_items(const WeightGradProblem<scalar_t, acc_t>& p, const WeightGradItem* items,
                           int64_t num_items) {
  constexpr bool convert = !std::is_same<scalar_t, acc_t>::value;
  constexpr int64_t kTokensPerPass = 64;
  constexpr int J = LF_TOKENS_PER_TILE;
  std::vector<acc_t> g(p.r_max * kWeightGradColumns);
  std::vector<acc_t> row_buf(convert ? kTokensPerPass * kWeightGradColumns : 0);
  const acc_t* coef[kTokensPerPass];
  const acc_t* rows[kTokensPerPass];

  for (int64_t it = 0; it < num_items; ++it) {
    const WeightGradItem& item = items[it];
    const int64_t k = p.ranks[item.slot];
    const int64_t width = item.column_end - item.column_begin;
    std::fill(g.begin(), g.begin() + k * width, acc_t(0));
    for (int64_t first = 0; first < item.count; first += kTokensPerPass) {
      const int64_t count = std::min(kTokensPerPass, item.count - first);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t token = p.token_order[item.begin + first + i];
        coef[i] = p.coef + token * p.coef_row_stride;
        const scalar_t* row = p.rows + token * p.row_stride + item.column_begin;
        if constexpr (convert) {
          for (int64_t c = 0; c < width; ++c) row_buf[i * width + c] = static_cast<acc_t>(row[c]);
          rows[i] = row_buf.data() + i * width;
        } else {
          rows[i] = row;
        }
      }
      int64_t j = 0;
      const acc_t* shifted[kTokensPerPass];
      for (; j < k; j += J) {
        for (int64_t i = 0; i < count; ++i) shifted[i] = coef[i] + j;
        switch (std::min<int64_t>(J, k - j)) {
          case 4: outer_accumulate<acc_t, 4>(shifted, rows, count, width, g.data() + j * width, width); break;
          case 3: outer_accumulate<acc_t, 3>(shifted, rows, count, width, g.data() + j * width, width); break;
          case 2: outer_accumulate<acc_t, 2>(shifted, rows, count, width, g.data() + j * width, width); break;
          default: outer_accumulate<acc_t, 1>(shifted, rows, count, width, g.data() + j * width, width); break;
        }
      }
    }
    // Every entry of the item's columns is written, rank rows past k as zeros, so the
    // gradients need no zero fill beforehand.
    const acc_t scale = p.scales[item.slot];
    scalar_t* out = p.grad + item.slot * p.grad_slot_stride;
    if (p.transposed_out) {
      scalar_t* block = out + item.column_begin * p.r_max;
      transpose_scaled(g.data(), width, k, width, block, p.r_max, scale);
      if (k < p.r_max)
        for (int64_t c = 0; c < width; ++c) std::fill(block + c * p.r_max + k, block + (c + 1) * p.r_max, scalar_t(0));
    } else {
      for (int64_t jj = 0; jj < p.r_max; ++jj) {
        scalar_t* row = out + jj * p.grad_row_stride + item.column_begin;
        if (jj >= k) {
          std::fill(row, row + width, scalar_t(0));
          continue;
        }
        const acc_t* src = g.data() + jj * width;
        int64_t c = 0;
        if constexpr (!convert) {
          using S = Simd<acc_t>;
          for (; c + S::lanes <= width; c += S::lanes) S::store(row + c, S::load(src + c) * scale);
        }
        for (; c < width; ++c) row[c] = static_cast<scalar_t>(scale * src[c]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// fused_lora_linear for few tokens: y = x W^T + bias, then the LoRA delta (run_items) added into
// the y rows while they are still in cache, in one call. At decode sizes a GEMM library spends
// much of its time on packing and edge handling; these register tiles read W in place, two
// tokens at a time. W comes from memory once per call (a decode step's weights are far larger
// than the caches), so the kernel is bound by how much of that read overlaps the arithmetic: each
// pass of TM tokens over a block of TN weight rows prefetches its share of the next block's rows
// (spread over every pass, not issued at once: a burst of prefetches fills the core's miss
// buffers and stalls the tile that issued them), and a long row is cut into column chunks so
// that a block's rows and the tokens' x stay in L1 across the passes.

// y_rows[i][j] = bias[j] + dot(x_rows[i], w[j * K : (j + 1) * K]) for i < M tokens, j < TN weight
// rows (bias may be null), over columns [c0, c1) of this call: the first chunk starts the sums,
// the others continue those kept in `carry` (M * TN vectors of acc_t); the last one (c1 == K) adds the
// columns past the last whole vector and writes y. Prefetches the same columns of the pf_count
// rows at pf_rows (K apart) meanwhile.
template <typename acc_t, int M, int TN>
inline void linear_tile(const acc_t* const* x_rows, const acc_t* w, int64_t K, int64_t c0, int64_t c1,
                        acc_t* carry, const acc_t* bias, acc_t* const* y_rows,
                        const acc_t* pf_rows, int pf_count) {
  using S = Simd<acc_t>;
  using V = typename S::vec;
  V acc[M][TN];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < TN; ++j) acc[i][j] = c0 == 0 ? V{} : S::load(carry + (i * TN + j) * S::lanes);
  int64_t c = c0;
  for (; c + S::lanes <= c1; c += S::lanes) {
    V wv[TN];
    for (int j = 0; j < TN; ++j) wv[j] = S::load(w + j * K + c);
    for (int j = 0; j < pf_count; ++j) __builtin_prefetch(pf_rows + j * K + c, 0, 2);
    for (int i = 0; i < M; ++i) {
      const V xv = S::load(x_rows[i] + c);
      for (int j = 0; j < TN; ++j) acc[i][j] += xv * wv[j];
    }
  }
  if (c1 < K) {
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < TN; ++j) S::store(carry + (i * TN + j) * S::lanes, acc[i][j]);
    return;
  }
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < TN; ++j) {
      acc_t s = S::sum(acc[i][j]);
      for (int64_t cc = c; cc < K; ++cc) s += x_rows[i][cc] * w[j * K + cc];
      y_rows[i][j] = bias != nullptr ? bias[j] + s : s;
    }
}

// y[:, n_begin:n_end] = x W[n_begin:n_end]^T + bias for the T tokens of p.x into p.out (rows
// p.out_row_stride apart). W is [d_out, d_in] contiguous, bias [d_out] or null; acc_t inputs.
template <typename acc_t>
void run_linear_rows(const Problem<acc_t, acc_t>& p, int64_t num_tokens, const acc_t* W, const acc_t* bias,
                     int64_t n_begin, int64_t n_end) {
  constexpr int TM = LF_LINEAR_TM;
  constexpr int TN = LF_LINEAR_TN;
  constexpr int64_t lanes = Simd<acc_t>::lanes;
  static_assert(TM == 2, "the token tail below is a single token");
  const int64_t K = p.d_in;
  const int64_t passes = (num_tokens + TM - 1) / TM;
  // whole rows up to kLinearChunkMaxBytes, else chunks of kLinearChunkBytes (whole vectors)
  const int64_t chunk = K * int64_t(sizeof(acc_t)) <= kLinearChunkMaxBytes
                            ? K
                            : kLinearChunkBytes / int64_t(sizeof(acc_t)) / lanes * lanes;
  std::vector<acc_t> carry(chunk < K ? passes * TM * TN * lanes : 0);
  // the next block's TN rows, rows_per_pass of them prefetched by each pass of TM tokens
  const int rows_per_pass = static_cast<int>((TN + passes - 1) / passes);
  // Blocks of TN weight rows (the tail rows one by one), then column chunks, then tokens TM at a
  // time, so a block's rows stay in L1 for every token.
  for (int64_t n = n_begin; n < n_end;) {
    const int tn = n + TN <= n_end ? TN : 1;
    const acc_t* w = W + n * K;
    const acc_t* b = bias != nullptr ? bias + n : nullptr;
    const acc_t* next_w = tn == TN && n + 2 * TN <= n_end ? w + TN * K : nullptr;
    for (int64_t c0 = 0; c0 < K; c0 += chunk) {
      const int64_t c1 = std::min(K, c0 + chunk);
      for (int64_t i0 = 0; i0 < num_tokens; i0 += TM) {
        const int m = static_cast<int>(std::min<int64_t>(TM, num_tokens - i0));
        const acc_t* x_rows[TM] = {};
        acc_t* y_rows[TM] = {};
        for (int i = 0; i < m; ++i) {
          x_rows[i] = p.x + (i0 + i) * p.x_row_stride;
          y_rows[i] = p.out + (i0 + i) * p.out_row_stride + n;
        }
        const int64_t pass = i0 / TM;
        acc_t* pass_carry = carry.empty() ? nullptr : carry.data() + pass * TM * TN * lanes;
        const int first_row = static_cast<int>(std::min<int64_t>(TN, pass * rows_per_pass));
        const int pf_count = next_w != nullptr ? std::min(rows_per_pass, TN - first_row) : 0;
        const acc_t* pf = next_w != nullptr ? next_w + first_row * K : nullptr;
        if (tn == TN) {
          if (m == TM)
            linear_tile<acc_t, TM, TN>(x_rows, w, K, c0, c1, pass_carry, b, y_rows, pf, pf_count);
          else
            linear_tile<acc_t, 1, TN>(x_rows, w, K, c0, c1, pass_carry, b, y_rows, pf, pf_count);
        } else if (m == TM) {
          linear_tile<acc_t, TM, 1>(x_rows, w, K, c0, c1, pass_carry, b, y_rows, nullptr, 0);
        } else {
          linear_tile<acc_t, 1, 1>(x_rows, w, K, c0, c1, pass_carry, b, y_rows, nullptr, 0);
        }
      }
    }
    n += tn;
  }
}
