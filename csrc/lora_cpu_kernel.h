// Multi-adapter LoRA CPU kernel body. lora_cpu.cpp includes this file once per instruction set,
// each time inside its own namespace and `#pragma GCC target` region, after defining:
//   LF_VEC_BYTES  bytes of one SIMD register (64 AVX-512, 32 AVX2, 16 SSE2 / NEON)
//   LF_SHRINK_TN  rank rows per shrink register tile (tile = LF_TOKENS_PER_TILE x LF_SHRINK_TN)
//   LF_EXPAND_NV  output vectors per expand register tile (tile = LF_TOKENS_PER_TILE x LF_EXPAND_NV)
// The code uses GCC/Clang vector extensions so that one source compiles to each register width.
// It includes nothing: lora_cpu.cpp includes the standard headers and lora_cpu_work.h (WorkItem,
// Problem, Mode) first.

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
  static inline acc_t sum(vec v) {
    acc_t s = 0;
    for (int l = 0; l < lanes; ++l) s += v[l];
    return s;
  }
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

// y_rows[i][n] += sum_j t[i * ldt + j] * bt[j * d_out + n] for i < M, n < d_out.
template <typename acc_t, int M>
inline void expand_tokens(const acc_t* t, int64_t ldt, const acc_t* bt, int64_t k, int64_t d_out,
                          acc_t* const* y_rows) {
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
        const V tv = V{} + t[i * ldt + j];
        for (int v = 0; v < NV; ++v) acc[i][v] += tv * b[v];
      }
    }
    for (int i = 0; i < M; ++i)
      for (int v = 0; v < NV; ++v) {
        acc_t* y = y_rows[i] + n + v * W;
        S::store(y, S::load(y) + acc[i][v]);
      }
  }
  for (; n + W <= d_out; n += W) {
    V acc[M];
    for (int i = 0; i < M; ++i) acc[i] = V{};
    for (int64_t j = 0; j < k; ++j) {
      const V b = S::load(bt + j * d_out + n);
      for (int i = 0; i < M; ++i) acc[i] += (V{} + t[i * ldt + j]) * b;
    }
    for (int i = 0; i < M; ++i) S::store(y_rows[i] + n, S::load(y_rows[i] + n) + acc[i]);
  }
  for (; n < d_out; ++n) {
    for (int i = 0; i < M; ++i) {
      acc_t s = 0;
      for (int64_t j = 0; j < k; ++j) s += t[i * ldt + j] * bt[j * d_out + n];
      y_rows[i][n] += s;
    }
  }
}

// One run of work items (each: up to kChunkTokens tokens of one slot, in adapter-sorted order).
// Mode picks the op: shrink writes t, expand reads t, delta does both and never stores t.
template <typename scalar_t, typename acc_t, Mode mode>
void run_items(const Problem<scalar_t, acc_t>& p, const WorkItem* items, int64_t num_items) {
  constexpr int TM = LF_TOKENS_PER_TILE;
  constexpr bool convert = !std::is_same<scalar_t, acc_t>::value;
  const bool need_a = mode != Mode::kExpand;
  const bool need_b = mode != Mode::kShrink;

  // Per-thread scratch, reused across items: slot weights in acc_t (B transposed to [k, d_out] so
  // the expand reads contiguous output rows), converted token rows, and the rank-k intermediate.
  std::vector<acc_t> a_buf(convert && need_a ? p.r_max * p.d_in : 0);
  std::vector<acc_t> bt_buf(need_b ? p.r_max * p.d_out : 0);
  std::vector<acc_t> x_buf(convert && need_a ? TM * p.d_in : 0);
  std::vector<acc_t> y_buf(convert && need_b ? TM * p.d_out : 0);
  acc_t t_buf[TM * kMaxTileRank];
  int64_t loaded_slot = -1;

  for (int64_t it = 0; it < num_items; ++it) {
    const WorkItem& item = items[it];
    const int64_t slot = item.slot;
    const int64_t k = p.ranks[slot];
    const acc_t scale = static_cast<acc_t>(p.scales ? p.scales[slot] : 1.0f);
    const scalar_t* a_slot = p.A ? p.A + slot * p.r_max * p.d_in : nullptr;
    const acc_t* a = nullptr;
    if (need_a) {
      if constexpr (convert) {
        a = a_buf.data();
      } else {
        a = a_slot;
      }
    }
    if (slot != loaded_slot) {
      if constexpr (convert) {
        if (need_a)
          for (int64_t q = 0; q < k * p.d_in; ++q) a_buf[q] = static_cast<acc_t>(a_slot[q]);
      }
      if (need_b) {
        // Transpose in blocks of output rows: the block's rows of B stay in L1 while each of the
        // k rows of bt is written contiguously.
        constexpr int64_t kBlock = 64;
        const scalar_t* b_slot = p.B + slot * p.d_out * p.r_max;
        for (int64_t n0 = 0; n0 < p.d_out; n0 += kBlock) {
          const int64_t n1 = std::min(p.d_out, n0 + kBlock);
          for (int64_t j = 0; j < k; ++j) {
            acc_t* dst = bt_buf.data() + j * p.d_out;
            for (int64_t n = n0; n < n1; ++n) dst[n] = static_cast<acc_t>(b_slot[n * p.r_max + j]);
          }
        }
      }
      loaded_slot = slot;
    }

    for (int64_t first = 0; first < item.count; first += TM) {
      const int m = static_cast<int>(std::min<int64_t>(TM, item.count - first));
      const int64_t* tokens = p.token_order + item.begin + first;
      // The rank dimension goes through t_buf in pieces of kMaxTileRank so any rank fits on the
      // stack; each piece is shrunk and immediately expanded.
      for (int64_t j0 = 0; j0 < k; j0 += kMaxTileRank) {
        const int64_t kj = std::min<int64_t>(kMaxTileRank, k - j0);
        if constexpr (mode != Mode::kExpand) {
          const acc_t* x_rows[TM];
          for (int i = 0; i < m; ++i) {
            const scalar_t* row = p.x + tokens[i] * p.x_row_stride;
            if constexpr (convert) {
              if (j0 == 0)
                for (int64_t c = 0; c < p.d_in; ++c) x_buf[i * p.d_in + c] = static_cast<acc_t>(row[c]);
              x_rows[i] = x_buf.data() + i * p.d_in;
            } else {
              x_rows[i] = row;
            }
          }
          const acc_t* a_piece = a + j0 * p.d_in;
          switch (m) {
            case 4: shrink_tokens<acc_t, 4>(x_rows, a_piece, kj, p.d_in, t_buf, kMaxTileRank); break;
            case 3: shrink_tokens<acc_t, 3>(x_rows, a_piece, kj, p.d_in, t_buf, kMaxTileRank); break;
            case 2: shrink_tokens<acc_t, 2>(x_rows, a_piece, kj, p.d_in, t_buf, kMaxTileRank); break;
            default: shrink_tokens<acc_t, 1>(x_rows, a_piece, kj, p.d_in, t_buf, kMaxTileRank); break;
          }
          if constexpr (mode == Mode::kShrink) {
            for (int i = 0; i < m; ++i)
              for (int64_t j = 0; j < kj; ++j) p.t[tokens[i] * p.t_row_stride + j0 + j] = t_buf[i * kMaxTileRank + j];
            continue;
          }
        } else {
          for (int i = 0; i < m; ++i)
            for (int64_t j = 0; j < kj; ++j)
              t_buf[i * kMaxTileRank + j] = static_cast<acc_t>(p.t_in[tokens[i] * p.t_row_stride + j0 + j]);
        }
        if constexpr (mode != Mode::kShrink) {
          for (int i = 0; i < m; ++i)
            for (int64_t j = 0; j < kj; ++j) t_buf[i * kMaxTileRank + j] *= scale;
          acc_t* y_rows[TM];
          for (int i = 0; i < m; ++i) {
            if constexpr (convert) {
              y_rows[i] = y_buf.data() + i * p.d_out;
              if (j0 == 0) std::fill(y_rows[i], y_rows[i] + p.d_out, acc_t(0));
            } else {
              y_rows[i] = p.out + tokens[i] * p.out_row_stride;
            }
          }
          const acc_t* bt = bt_buf.data() + j0 * p.d_out;
          switch (m) {
            case 4: expand_tokens<acc_t, 4>(t_buf, kMaxTileRank, bt, kj, p.d_out, y_rows); break;
            case 3: expand_tokens<acc_t, 3>(t_buf, kMaxTileRank, bt, kj, p.d_out, y_rows); break;
            case 2: expand_tokens<acc_t, 2>(t_buf, kMaxTileRank, bt, kj, p.d_out, y_rows); break;
            default: expand_tokens<acc_t, 1>(t_buf, kMaxTileRank, bt, kj, p.d_out, y_rows); break;
          }
        }
      }
      if constexpr (convert && mode != Mode::kShrink) {
        // Round once: out = scalar_t(out + delta), the delta kept in acc_t until here.
        for (int i = 0; i < m; ++i) {
          scalar_t* row = p.out + tokens[i] * p.out_row_stride;
          const acc_t* y = y_buf.data() + i * p.d_out;
          for (int64_t n = 0; n < p.d_out; ++n)
            row[n] = static_cast<scalar_t>(static_cast<acc_t>(row[n]) + y[n]);
        }
      }
    }
  }
}
