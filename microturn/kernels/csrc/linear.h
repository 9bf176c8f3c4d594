// The batch-invariant linear over packed weight panels (fp32 FMA, and bf16 dot products
// where the CPU has them).
#pragma once
#include "team.h"

namespace {

// ---- linear: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) over packed weight panels ----
//
// The weight is packed once into panels of 16 output columns, four panels to a group, laid out
// [groups][K][4 x 16]: a group row is the 64 weights that multiply x[m, k]. Every output is ONE
// fp32 accumulator updated by a fused multiply-add for k = 0, 1, ..., K-1 in order, then the
// bias is added and the result rounded once. That arithmetic is the same for every tile shape
// below, so a row's result never depends on how many rows share the call or where it sits
// (batch invariance), at every M.
// Decode (M = 1) streams one group at a time: eight independent accumulator chains keep the FMA
// units busy, and the group is one sequential run of memory, which the hardware prefetcher
// follows at full speed (four separate panel streams read ~15 % slower). Larger M uses 6 x 16
// tiles that reuse each loaded weight vector six times, blocked so the activation rows stay in
// L2; a group's other panels are then in cache already.
// bf16 panels store columns j and 8 + j in one 32-bit word: one load and two bit operations
// give both fp32 vectors.
constexpr int64_t PANEL = 16;
constexpr int64_t GROUP = 4;                 // panels per packed group
constexpr int64_t GROUP_COLS = GROUP * PANEL;  // a group row: 64 weights
constexpr int64_t ROW_CHUNK = 96;  // activation rows per pass over the weights (L2-sized)

inline void load_panel_row(const float* p, __m256& lo, __m256& hi) {
  lo = _mm256_loadu_ps(p);
  hi = _mm256_loadu_ps(p + 8);
}

inline void load_panel_row(const at::BFloat16* p, __m256& lo, __m256& hi) {
  const __m256i pair = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo = _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16));
  hi = _mm256_castsi256_ps(_mm256_and_si256(pair, _mm256_set1_epi32(-65536)));
}

// panel p's row i is at panel + p * panel_stride + i * row_stride
template <int MR, int P, typename W>
inline void panel_tile(const float* x, int64_t ldx, const W* panel, int64_t panel_stride,
                       int64_t row_stride, int64_t k, float* tile, bool carry = false) {
  constexpr int ACC = MR * P * 2;
  __m256 acc[ACC];
#pragma GCC unroll 24
  for (int a = 0; a < ACC; ++a) acc[a] = carry ? _mm256_loadu_ps(tile + 8 * a) : _mm256_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    __m256 w[2 * P];
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) load_panel_row(panel + p * panel_stride + i * row_stride, w[2 * p], w[2 * p + 1]);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_broadcast_ss(x + m * ldx + i);
#pragma GCC unroll 8
      for (int j = 0; j < 2 * P; ++j) acc[m * 2 * P + j] = _mm256_fmadd_ps(xv, w[j], acc[m * 2 * P + j]);
    }
  }
#pragma GCC unroll 24
  for (int a = 0; a < ACC; ++a) _mm256_storeu_ps(tile + 8 * a, acc[a]);
}

// A linear's output element: y = round(v), or with `residual` y = round(y + round(v)), the
// residual add done where its column is computed: the output rounded, then the sum rounded,
// as the modules' `x + proj` rounds it (same bits)
template <typename Out>
inline void store_output(Out& y, float v, bool residual) {
  y = residual ? static_cast<Out>(static_cast<float>(y) + static_cast<float>(static_cast<Out>(v)))
               : static_cast<Out>(v);
}

template <int MR, int P, typename W, typename Out>
inline void panel_block(const float* x, int64_t k, const W* panels, int64_t first_panel,
                        const float* bias, Out* y, int64_t n, bool residual) {
  float tile[MR * P * PANEL];
  const W* first = panels + (first_panel / GROUP) * k * GROUP_COLS + (first_panel % GROUP) * PANEL;
  panel_tile<MR, P>(x, k, first, PANEL, GROUP_COLS, k, tile);
  for (int m = 0; m < MR; ++m)
    for (int64_t j = 0; j < P * PANEL; ++j) {
      const int64_t col = first_panel * PANEL + j;
      if (col < n) store_output(y[m * n + col], tile[m * P * PANEL + j] + (bias ? bias[col] : 0.0f), residual);
    }
}

template <typename W, typename Out>
void packed_rows(const float* x, const W* panels, const float* bias, Out* y, int64_t m,
                 int64_t n, int64_t k, bool residual = false) {
  const int64_t num_panels = (n + PANEL - 1) / PANEL;
  if (m == 1) {  // groups are zero-padded to 4 panels: a padded column is computed, not stored
    const int64_t groups = (num_panels + GROUP - 1) / GROUP;
    for_units(groups, true, [&](int64_t g) { panel_block<1, GROUP>(x, k, panels, GROUP * g, bias, y, n, residual); });
    return;
  }
  for (int64_t m0 = 0; m0 < m; m0 += ROW_CHUNK) {
    const int64_t rows = std::min(ROW_CHUNK, m - m0);
    for_units(num_panels, false, [&](int64_t p) {
        int64_t r = 0;
        for (; r + 6 <= rows; r += 6)
          panel_block<6, 1>(x + (m0 + r) * k, k, panels, p, bias, y + (m0 + r) * n, n, residual);
        const float* xr = x + (m0 + r) * k;
        Out* yr = y + (m0 + r) * n;
        switch (rows - r) {
          case 5: panel_block<5, 1>(xr, k, panels, p, bias, yr, n, residual); break;
          case 4: panel_block<4, 1>(xr, k, panels, p, bias, yr, n, residual); break;
          case 3: panel_block<3, 1>(xr, k, panels, p, bias, yr, n, residual); break;
          case 2: panel_block<2, 1>(xr, k, panels, p, bias, yr, n, residual); break;
          case 1: panel_block<1, 1>(xr, k, panels, p, bias, yr, n, residual); break;
          default: break;
        }
    });
  }
}

// ---- the same linear with bf16 arithmetic (CPUs with AVX512-BF16) ----
//
// Where the CPU multiplies bf16 directly (vdpbf16ps: each fp32 lane adds two exact bf16
// products), a bf16 linear skips the widening and does twice the multiply-adds per instruction.
// Weights are packed [groups][ceil(K / 2)][64 columns][2]: word (p, c) holds w[c][2p] and
// w[c][2p + 1] (zero past K). Every output is ONE fp32 accumulator updated by one vdpbf16ps per
// k pair, pairs in order, then the bias is added and the result rounded once: the same for
// every tile shape, so this kernel is batch invariant as the fp32-FMA one is. Its bits differ
// from that kernel's (the pair is added in one instruction; denormals flush to zero), so a
// machine uses one or the other for everything: MICROTURN_BF16_DOT=0 picks the widening kernel.
constexpr int64_t DOT_COLS = 64;   // columns per packed group: four 16-lane vectors
constexpr int64_t DOT_ROWS = 24;   // activation rows per work unit (four 6-row tiles)

bool cpu_has_bf16_dot() {
  static const bool yes = [] {
    const char* env = std::getenv("MICROTURN_BF16_DOT");
    if (env && std::string(env) == "0") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16");
  }();
  return yes;
}

// Weights packed for this kernel (pack_linear_weight's choice): the last dim holds 64 pairs.
inline bool dot_packed(const torch::Tensor& panels) { return panels.size(-1) == 2 * DOT_COLS; }

#define MICROTURN_DOT_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// tile [MR][64] = x rows [MR][k] (bf16, row stride ldx) times one packed group
// (pairs [p0, p1) only, pair p0's row at `group`, the accumulators starting from `tile` where
// `carry`: a group's K can be cut in two, each output still one FMA chain over k in order)
template <int MR>
MICROTURN_DOT_TARGET inline void dot_tile(const uint16_t* x, int64_t ldx, int64_t k,
                                          const uint16_t* group, float* tile, int64_t p0 = 0,
                                          int64_t p1 = -1, bool carry = false) {
  __m512 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < 4; ++c)
      acc[m][c] = carry ? _mm512_loadu_ps(tile + m * DOT_COLS + 16 * c) : _mm512_setzero_ps();
  const int64_t pairs = p1 < 0 ? (k + 1) / 2 : p1;
  for (int64_t p = p0; p < pairs; ++p) {
    const uint16_t* row = group + (p - p0) * 2 * DOT_COLS;
    __m512i w[4];
    for (int c = 0; c < 4; ++c) w[c] = _mm512_loadu_si512(row + 32 * c);
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      if (2 * p + 1 < k) {
        std::memcpy(&pair, x + m * ldx + 2 * p, sizeof(pair));
      } else {  // odd K: the last pair's second value is zero (so is its weight)
        pair = x[m * ldx + 2 * p];
      }
      const __m512i xv = _mm512_set1_epi32(pair);
      for (int c = 0; c < 4; ++c)
        acc[m][c] = _mm512_dpbf16_ps(acc[m][c], (__m512bh)xv, (__m512bh)w[c]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(tile + m * DOT_COLS + 16 * c, acc[m][c]);
}

// group g's outputs from its fp32 tile (bias added, rounded; see store_output)
template <int MR, typename Out>
inline void store_group(const float* tile, int64_t g, const float* bias, Out* y, int64_t n,
                        bool residual) {
  for (int m = 0; m < MR; ++m)
    for (int64_t j = 0; j < DOT_COLS; ++j) {
      const int64_t col = g * DOT_COLS + j;
      if (col < n) store_output(y[m * n + col], tile[m * DOT_COLS + j] + (bias ? bias[col] : 0.0f), residual);
    }
}

// The middle group of an odd group count is stored with the second half of its pairs first
// (rows [0, pairs - cut) hold pairs [cut, pairs)): see dot_rows_handed
inline bool halves_swapped(int64_t g, int64_t groups, int64_t pairs) {
  return groups % 2 == 1 && g == groups / 2 && pairs >= 2;
}

template <int MR, typename Out>
MICROTURN_DOT_TARGET void dot_block(const uint16_t* x, int64_t k, const uint16_t* packed,
                                    int64_t g, int64_t groups, const float* bias, Out* y,
                                    int64_t n, bool residual) {
  float tile[MR * DOT_COLS];
  const int64_t pairs = (k + 1) / 2, cut = pairs / 2, row = 2 * DOT_COLS;
  const uint16_t* group = packed + g * pairs * row;
  if (halves_swapped(g, groups, pairs)) {
    dot_tile<MR>(x, k, k, group + (pairs - cut) * row, tile, 0, cut);
    dot_tile<MR>(x, k, k, group, tile, cut, pairs, true);
  } else {
    dot_tile<MR>(x, k, k, group, tile);
  }
  store_group<MR>(tile, g, bias, y, n, residual);
}

// A decode matvec with an odd number of groups on a team of two: each thread streams half the
// bytes as one contiguous run (a whole extra group on one thread cost ~4 % of a decode step).
// The middle group's K is cut in half, its second half stored first (halves_swapped): the
// thread with the second share starts with the first half, right before its own groups, and
// hands the fp32 accumulators to the other, which finishes them right after its own groups.
// Every output is still one FMA chain over k in order: the same bits.
template <int MR, typename Out>
MICROTURN_DOT_TARGET void dot_rows_handed(const uint16_t* x, const uint16_t* packed,
                                          const float* bias, Out* y, int64_t n, int64_t k,
                                          int64_t groups, bool residual) {
  Team& team = *seat.team;
  const int64_t mid = groups / 2, pairs = (k + 1) / 2, cut = pairs / 2, row = 2 * DOT_COLS;
  const uint16_t* middle = packed + mid * pairs * row;
  const int64_t ticket = ++seat.handoffs;
  if (seat.share() == 1) {
    dot_tile<MR>(x, k, k, middle + (pairs - cut) * row, team.carried, 0, cut);
    team.handed.store(ticket, std::memory_order_release);
    for (int64_t g = mid + 1; g < groups; ++g)
      dot_block<MR>(x, k, packed, g, groups, bias, y, n, residual);
  } else {
    for (int64_t g = 0; g < mid; ++g) dot_block<MR>(x, k, packed, g, groups, bias, y, n, residual);
    while (team.handed.load(std::memory_order_acquire) < ticket) _mm_pause();
    dot_tile<MR>(x, k, k, middle, team.carried, cut, pairs, true);
    store_group<MR>(team.carried, mid, bias, y, n, residual);
  }
  team_barrier();
}

template <typename Out>
MICROTURN_DOT_TARGET void dot_rows(const uint16_t* x, const uint16_t* packed, const float* bias,
                                   Out* y, int64_t m, int64_t n, int64_t k,
                                   bool residual = false) {
  const int64_t groups = (n + DOT_COLS - 1) / DOT_COLS;
  const int64_t blocks = (m + DOT_ROWS - 1) / DOT_ROWS;
  if (seat.team && seat.size == 2 && m <= TEAM_ROWS && halves_swapped(groups / 2, groups, (k + 1) / 2)) {
    switch (m) {
      case 1: return dot_rows_handed<1>(x, packed, bias, y, n, k, groups, residual);
      case 2: return dot_rows_handed<2>(x, packed, bias, y, n, k, groups, residual);
      case 3: return dot_rows_handed<3>(x, packed, bias, y, n, k, groups, residual);
      case 4: return dot_rows_handed<4>(x, packed, bias, y, n, k, groups, residual);
      default: break;
    }
  }
  // units walk the groups of one row block, then the next: a thread's rows stay in cache
  for_units(groups * blocks, blocks == 1, [&](int64_t u) {
      const int64_t g = u % groups, r0 = (u / groups) * DOT_ROWS, r1 = std::min(m, r0 + DOT_ROWS);
      int64_t r = r0;
      for (; r + 6 <= r1; r += 6) dot_block<6>(x + r * k, k, packed, g, groups, bias, y + r * n, n, residual);
      const uint16_t* xr = x + r * k;
      Out* yr = y + r * n;
      switch (r1 - r) {
        case 5: dot_block<5>(xr, k, packed, g, groups, bias, yr, n, residual); break;
        case 4: dot_block<4>(xr, k, packed, g, groups, bias, yr, n, residual); break;
        case 3: dot_block<3>(xr, k, packed, g, groups, bias, yr, n, residual); break;
        case 2: dot_block<2>(xr, k, packed, g, groups, bias, yr, n, residual); break;
        case 1: dot_block<1>(xr, k, packed, g, groups, bias, yr, n, residual); break;
        default: break;
      }
  });
}

// ---- a K-slice of a linear, continuing each output's chain (tensor parallelism) ----
//
// acc[m, n] (fp32) enters as the chain so far and leaves with this slice's k added in order,
// neither bias nor rounding: ranks holding consecutive K-slices, each continuing the
// accumulators of the rank before, compute exactly the one-device chain (see parallel/).

template <int MR, typename W>
inline void chain_panel(const float* x, int64_t k, const W* panels, int64_t p, float* acc,
                        int64_t n) {
  float tile[MR * PANEL];
  for (int m = 0; m < MR; ++m)
    for (int64_t j = 0; j < PANEL; ++j) {
      const int64_t col = p * PANEL + j;
      tile[m * PANEL + j] = col < n ? acc[m * n + col] : 0.0f;
    }
  const W* first = panels + (p / GROUP) * k * GROUP_COLS + (p % GROUP) * PANEL;
  panel_tile<MR, 1>(x, k, first, PANEL, GROUP_COLS, k, tile, true);
  for (int m = 0; m < MR; ++m)
    for (int64_t j = 0; j < PANEL; ++j)
      if (p * PANEL + j < n) acc[m * n + p * PANEL + j] = tile[m * PANEL + j];
}

template <typename W>
void chain_rows(const float* x, const W* panels, float* acc, int64_t m, int64_t n, int64_t k) {
  const int64_t num_panels = (n + PANEL - 1) / PANEL;
  for_units(num_panels, m == 1, [&](int64_t p) {
      int64_t r = 0;
      for (; r + 6 <= m; r += 6) chain_panel<6>(x + r * k, k, panels, p, acc + r * n, n);
      switch (m - r) {
        case 5: chain_panel<5>(x + r * k, k, panels, p, acc + r * n, n); break;
        case 4: chain_panel<4>(x + r * k, k, panels, p, acc + r * n, n); break;
        case 3: chain_panel<3>(x + r * k, k, panels, p, acc + r * n, n); break;
        case 2: chain_panel<2>(x + r * k, k, panels, p, acc + r * n, n); break;
        case 1: chain_panel<1>(x + r * k, k, panels, p, acc + r * n, n); break;
        default: break;
      }
  });
}

template <int MR>
MICROTURN_DOT_TARGET void dot_chain_group(const uint16_t* x, int64_t k, const uint16_t* packed,
                                          int64_t g, int64_t groups, float* acc, int64_t n) {
  float tile[MR * DOT_COLS];
  for (int m = 0; m < MR; ++m)
    for (int64_t j = 0; j < DOT_COLS; ++j) {
      const int64_t col = g * DOT_COLS + j;
      tile[m * DOT_COLS + j] = col < n ? acc[m * n + col] : 0.0f;
    }
  const int64_t pairs = (k + 1) / 2, cut = pairs / 2, row = 2 * DOT_COLS;
  const uint16_t* group = packed + g * pairs * row;
  if (halves_swapped(g, groups, pairs)) {
    dot_tile<MR>(x, k, k, group + (pairs - cut) * row, tile, 0, cut, true);
    dot_tile<MR>(x, k, k, group, tile, cut, pairs, true);
  } else {
    dot_tile<MR>(x, k, k, group, tile, 0, -1, true);
  }
  for (int m = 0; m < MR; ++m)
    for (int64_t j = 0; j < DOT_COLS; ++j)
      if (g * DOT_COLS + j < n) acc[m * n + g * DOT_COLS + j] = tile[m * DOT_COLS + j];
}

MICROTURN_DOT_TARGET inline void dot_chain_rows(const uint16_t* x, const uint16_t* packed,
                                                float* acc, int64_t m, int64_t n, int64_t k) {
  const int64_t groups = (n + DOT_COLS - 1) / DOT_COLS;
  for_units(groups, m == 1, [&](int64_t g) {
      int64_t r = 0;
      for (; r + 6 <= m; r += 6) dot_chain_group<6>(x + r * k, k, packed, g, groups, acc + r * n, n);
      const uint16_t* xr = x + r * k;
      float* ar = acc + r * n;
      switch (m - r) {
        case 5: dot_chain_group<5>(xr, k, packed, g, groups, ar, n); break;
        case 4: dot_chain_group<4>(xr, k, packed, g, groups, ar, n); break;
        case 3: dot_chain_group<3>(xr, k, packed, g, groups, ar, n); break;
        case 2: dot_chain_group<2>(xr, k, packed, g, groups, ar, n); break;
        case 1: dot_chain_group<1>(xr, k, packed, g, groups, ar, n); break;
        default: break;
      }
  });
}

// exp(x) = 2^n p(r) with Cephes' single-precision constants (~1 ulp): softmax spends most of its
// time in exp, and the scalar libm call costs more than the dot products around it. The 8- and
// 16-lane versions take these constants and the same operations per lane: the same bits.
struct ExpConstants {
  static constexpr float lo = -87.0f, hi = 88.0f, log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  static constexpr float poly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                    4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
};

inline __m256 exp8(__m256 x) {
  using C = ExpConstants;
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(C::lo)), _mm256_set1_ps(C::hi));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(C::log2e), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(C::ln2_hi), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(C::ln2_lo), x);
  __m256 y = _mm256_set1_ps(C::poly[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(C::poly[i]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i pow2 = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
}

// The maximum of x[0:n] (exact whatever the order, so 8 lanes at a time).
// (four running maxima: one chain of dependent vmaxps was most of a softmax chunk's time)
inline float max_of(const float* x, int64_t n) {
  __m256 lanes = _mm256_set1_ps(-INFINITY), b = lanes, c = lanes, d = lanes;
  int64_t s = 0;
  for (; s + 32 <= n; s += 32) {
    lanes = _mm256_max_ps(lanes, _mm256_loadu_ps(x + s));
    b = _mm256_max_ps(b, _mm256_loadu_ps(x + s + 8));
    c = _mm256_max_ps(c, _mm256_loadu_ps(x + s + 16));
    d = _mm256_max_ps(d, _mm256_loadu_ps(x + s + 24));
  }
  for (; s + 8 <= n; s += 8) lanes = _mm256_max_ps(lanes, _mm256_loadu_ps(x + s));
  lanes = _mm256_max_ps(_mm256_max_ps(lanes, b), _mm256_max_ps(c, d));
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, lanes);
  float top = -INFINITY;
  for (float v : tmp) top = std::max(top, v);
  for (; s < n; ++s) top = std::max(top, x[s]);
  return top;
}

}  // namespace
