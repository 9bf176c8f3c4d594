// Latency-shaped CPU kernels: decode-shaped linear and attention over an in-place KV buffer.
//
// Every kernel here computes each output row with arithmetic that depends only on that row's
// own inputs (and, for attention, its position and the keys before it): never on how many rows
// share the call. That is what makes the sampler's numbers equal the trainer's, bit for bit.
// bf16 values are widened to fp32 in registers (a 16-bit shift), so bf16 runs at memory speed
// on CPUs without bf16 arithmetic.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const at::BFloat16* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline float horizontal_sum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
// fp32 -> bf16 for 8 lanes with c10's rounding (to nearest even; any NaN becomes 0x7FC0), so
// a vector store gives the bits of static_cast<at::BFloat16> element by element
inline void store8(at::BFloat16* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i bits = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  bits = _mm256_blendv_epi8(bits, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

// dst[i] = T(float(a[i]) * scale) or T(float(a[i]) + float(b[i])): each element rounded once,
// as the scalar expressions do, 8 at a time
template <typename T, typename U>
inline void scale_rows(const T* a, float scale, U* dst, int64_t n) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(dst + i, _mm256_mul_ps(load8(a + i), s));
  for (; i < n; ++i) dst[i] = static_cast<U>(static_cast<float>(a[i]) * scale);
}

// The threads of one decode-sized pass, kept in one parallel region for all its layers: a
// region per op (~150 in a decode step) costs ~1-2 µs to open and join, a spinning barrier
// ~0.1 µs. Inside a team the op helpers below split their units over the team and end with a
// barrier; the small element-wise steps run on every thread. Each unit computes what it
// computes without a team, so the bits are the same.
constexpr int64_t TEAM_ROWS = 4;     // passes of at most this many tokens run as one team

// A team thread's count of barriers passed, on a cache line of its own
struct alignas(64) BarrierCount {
  std::atomic<int64_t> passed{0};
};

struct Team {
  explicit Team(int threads) : counts(threads) {}
  std::vector<BarrierCount> counts;                   // one per thread
  alignas(64) std::atomic<int64_t> next[2] = {0, 0};  // share_units' counters, used in turn
  alignas(64) std::atomic<int64_t> handed{0};         // dot_rows' hand-offs so far
  alignas(64) float carried[TEAM_ROWS * 64];          // the accumulators handed over
};

struct TeamSeat {
  Team* team = nullptr;
  int rank = 0, size = 1;
  int64_t shares = 0;    // share_units calls so far: picks the counter
  int64_t handoffs = 0;  // dot_rows hand-offs so far
  int64_t barriers = 0;  // team barriers passed so far
  bool reversed = false; // the next decode matvec's halves go to the threads in reverse order

  // which contiguous share of a decode matvec's weights this thread streams: 0 the first
  int share() const { return reversed ? size - 1 - rank : rank; }
};
thread_local TeamSeat seat;

// Each thread publishes its own count with a plain release store and waits until every other
// count has caught up: the last thread to arrive goes on without a locked instruction (which
// drains its store buffer and first takes the shared counter's line from the other core).
// Decode steps 0.6-0.8 % faster than with one shared counter (then six barriers a layer).
inline void team_barrier() {
  Team& t = *seat.team;
  const int64_t passed = ++seat.barriers;
  t.counts[seat.rank].passed.store(passed, std::memory_order_release);
  for (int other = 0; other < seat.size; ++other)
    while (t.counts[other].passed.load(std::memory_order_acquire) < passed) _mm_pause();
}

// body() on every thread of a team of `threads` (one region for the whole body), or here alone
template <typename Body>
void as_team(int threads, Body&& body) {
  if (threads < 2 || seat.team) return body();
  Team team(threads);
#pragma omp parallel num_threads(threads)
  {
    seat = {&team, omp_get_thread_num(), omp_get_num_threads()};
    body();
    seat = {};
  }
}

constexpr int64_t FOLD_GRAIN = 16;   // attention row groups folded per thread

// Runs body(take) once on each intra-op thread (at most n of them), where take() hands out the
// units 0, 1, 2, ... (n and past it: done) to whichever thread asks next. On a shared machine
// one core often runs slower than the other for a while (static halves left it 15-30 % behind
// in attention); this way it simply takes fewer units. What a unit computes never depends on
// the thread that runs it, so neither do the results.
template <typename Body>
void share_units(int64_t n, Body&& body) {
  if (seat.team) {
    const int64_t turn = seat.shares++ & 1;
    std::atomic<int64_t>& next = seat.team->next[turn];
    if (seat.rank == 0) seat.team->next[turn ^ 1].store(0, std::memory_order_relaxed);  // the next call's
    body([&next] { return next.fetch_add(1, std::memory_order_relaxed); });
    team_barrier();
    return;
  }
  std::atomic<int64_t> next{0};
  auto take = [&next] { return next.fetch_add(1, std::memory_order_relaxed); };
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1,
                   [&](int64_t, int64_t) { body(take); });
}

// f(u) for every unit u in [0, n). A decode step's units (one row's matvec over weight groups)
// go in contiguous runs, one per thread: a thread's groups are then one sequential stream,
// which the hardware prefetcher follows across group boundaries (handing groups out one by one
// cost ~2 % of a decode step); larger steps are compute-bound and share units as they go.
template <typename F>
void for_units(int64_t n, bool stream, F&& f) {
  if (stream && seat.team) {  // at::parallel_for's split: contiguous runs of ceil(n / size)
    const int64_t run = (n + seat.size - 1) / seat.size;
    const int64_t share = seat.share();
    for (int64_t u = share * run; u < std::min(n, (share + 1) * run); ++u) f(u);
    team_barrier();
    return;
  }
  if (stream) {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) f(u);
    });
    return;
  }
  share_units(n, [&](auto take) {
    for (int64_t u; (u = take()) < n;) f(u);
  });
}

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
                       int64_t row_stride, int64_t k, float* tile) {
  constexpr int ACC = MR * P * 2;
  __m256 acc[ACC];
#pragma GCC unroll 24
  for (int a = 0; a < ACC; ++a) acc[a] = _mm256_setzero_ps();
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
inline float max_of(const float* x, int64_t n) {
  __m256 lanes = _mm256_set1_ps(-INFINITY);
  int64_t s = 0;
  for (; s + 8 <= n; s += 8) lanes = _mm256_max_ps(lanes, _mm256_loadu_ps(x + s));
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, lanes);
  float top = -INFINITY;
  for (float v : tmp) top = std::max(top, v);
  for (; s < n; ++s) top = std::max(top, x[s]);
  return top;
}

// ---- attention: every query's arithmetic is fixed, whatever shares its pass ----
//
// Flash-style, on a fixed grid of slots. A query row r that sees the first n_r slots of its
// kv head's history computes, for each SPLIT-slot split of [0, n_r) (split k covers slots
// [k SPLIT, (k + 1) SPLIT)), a partial (max m_k, sum l_k, acc_k[d]) by online softmax over
// CHUNK-slot chunks of the split:
//   s = q_r . k_s for the chunk's slots (one FMA chain over d per slot)
//   M = max(M, max s); if M grew: acc *= exp(M_old - M), l *= exp(M_old - M)
//   p_s = exp(s - M); l += sum p_s (8-lane partial sums, then across lanes)
//   acc += p_s v_s, one FMA chain per channel over the row's own slots in order
// and then folds the partials k = 0, 1, ... left to right: out = acc / l. Every step depends on
// the row's q, its n_r and the grid only, so a token gets the same bits in a 2,000-token
// prefill, in a decode step, alone or beside other sessions; how rows and splits are spread
// over threads changes nothing. Keys are widened per chunk into fp32 16-slot panels (the
// linear kernel's tile reads them), values into fp32 rows.
constexpr int64_t SPLIT = 512;     // slots per partial: the unit of work spread over threads
constexpr int64_t CHUNK = 128;     // slots per online-softmax step
constexpr int64_t ROW_GROUP = 60;  // query rows of one kv head that share the widened K/V
constexpr int64_t WIDEN_ROWS = 12; // fewer active rows read the pool in place
constexpr int64_t KEYS_FIRST_ROWS = 6;  // up to this many rows read a split's keys, then its values

// Where one kv head of one sequence keeps its history: slot s lives in block blocks[s / bs]
// (or the single block 0 when blocks is null) at row s % bs; k and v point at this head's
// part of block 0, block_elems apart. With panel_keys the keys are stored as 16-slot panels.
template <typename T>
struct KvHead {
  const T* k;
  const T* v;
  const int32_t* blocks;
  int64_t block_elems, bs, d;
  bool panel_keys;
  int64_t key_width = PANEL;  // slots per key panel in the pool (key_panel_slots)

  int64_t offset(int64_t s) const {
    return (blocks ? static_cast<int64_t>(blocks[s / bs]) * block_elems : 0) + (s % bs) * d;
  }
  // the 16-slot key panel that starts at slot s (a multiple of 16): the channel-pair layout
  // keeps up to four of them side by side in each pair row of a wider panel
  int64_t key_panel(int64_t s) const {
    const int64_t row = s % bs;
    return (blocks ? static_cast<int64_t>(blocks[s / bs]) * block_elems : 0) +
           (row / key_width) * key_width * d + (row % key_width) * 2;
  }
};

inline void widen(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }

inline void widen(const at::BFloat16* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(dst + j, load8(src + j));
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

inline void unpack_panel(const float* src, float* dst, int64_t d) {
  std::copy(src, src + d * PANEL, dst);
}

inline void unpack_panel(const at::BFloat16* src, float* dst, int64_t d) {
  for (int64_t j = 0; j < d; ++j) {  // slots j and 8 + j share a word (see write_rows)
    __m256 lo, hi;
    load_panel_row(src + j * PANEL, lo, hi);
    _mm256_storeu_ps(dst + j * PANEL, lo);
    _mm256_storeu_ps(dst + j * PANEL + 8, hi);
  }
}

// Keys of slots [c0, c0 + n) (c0 a multiple of 16) as fp32 panels [ceil(n / 16)][d][16].
template <typename T>
void widen_keys(const KvHead<T>& h, int64_t c0, int64_t n, float* dst) {
  const int64_t d = h.d;
  if (h.panel_keys) {  // a panel never straddles blocks (bs is a multiple of 16)
    for (int64_t s = c0; s < c0 + n; s += PANEL) unpack_panel(h.k + h.offset(s), dst + (s - c0) * d, d);
    return;
  }
  std::fill(dst + (n / PANEL) * d * PANEL, dst + (n + PANEL - 1) / PANEL * d * PANEL, 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    const T* row = h.k + h.offset(c0 + i);
    float* col = dst + (i / PANEL) * d * PANEL + i % PANEL;
    for (int64_t j = 0; j < d; ++j) col[j * PANEL] = static_cast<float>(row[j]);
  }
}

// Asks the cache for slots [c0, c0 + n)'s keys and values (the next chunk's, while this one
// computes: a chunk's K/V are a few separate 2 KiB block rows the prefetcher would not guess).
template <typename T>
void prefetch_slots(const KvHead<T>& h, int64_t c0, int64_t n) {
  for (int64_t s = c0; s < c0 + n;) {
    const int64_t run = std::min(h.bs - s % h.bs, c0 + n - s);
    const char* k = reinterpret_cast<const char*>(h.k + h.offset(s));
    const char* v = reinterpret_cast<const char*>(h.v + h.offset(s));
    for (int64_t b = 0; b < run * h.d * static_cast<int64_t>(sizeof(T)); b += 64) {
      _mm_prefetch(k + b, _MM_HINT_T1);
      _mm_prefetch(v + b, _MM_HINT_T1);
    }
    s += run;
  }
}

// Asks the cache for a split's keys and values in the order the in-place kernels read them
// (each chunk's key panels, then its value rows) and at the rate they read them: every kernel
// step calls ahead() with the bytes it consumes, so the requests stay LEAD bytes in front of
// the reads. A whole split asked for at once (128 KiB, prefetch_slots) stalls the core on its
// few miss buffers before any arithmetic starts; asked for as the work goes, the loads overlap
// the arithmetic (decode attention reads the KV at the core's streaming rate, not at ~1/3).
struct StreamAhead {
  static constexpr int64_t LEAD = 16384;
  std::vector<std::pair<const char*, const char*>> runs;  // byte ranges, in reading order
  size_t next = 0;
  const char* at = nullptr;
  const char* end = nullptr;
  int64_t budget = 0;

  template <typename T>
  void start(const KvHead<T>& h, int64_t s_begin, int64_t s_end, int64_t chunk) {
    runs.clear();
    next = 0;
    at = end = nullptr;
    budget = 0;
    const int64_t row = h.d * static_cast<int64_t>(sizeof(T));
    for (int64_t c0 = s_begin; c0 < s_end; c0 += chunk) {
      const int64_t c1 = std::min(c0 + chunk, s_end);
      for (const T* base : {h.k, h.v})
        for (int64_t s = c0; s < c1;) {
          const int64_t run = std::min(h.bs - s % h.bs, c1 - s);
          // a key panel is read whole, also when the history ends inside it
          const int64_t width = base == h.k ? h.key_width : 1;
          const int64_t slots = (run + width - 1) / width * width;
          const char* p = reinterpret_cast<const char*>(base + h.offset(s));
          runs.emplace_back(p, p + slots * row);
          s += run;
        }
    }
    ahead(LEAD);
  }

  inline void ahead(int64_t bytes) {
    for (budget += bytes; budget >= 64; budget -= 64) {
      if (at >= end) {
        if (next == runs.size()) {
          budget = 0;
          return;
        }
        std::tie(at, end) = runs[next++];
      }
      _mm_prefetch(at, _MM_HINT_T0);
      at += 64;
    }
  }
};

// Values of slots [c0, c0 + n) as fp32 rows [n][d].
template <typename T>
void widen_values(const KvHead<T>& h, int64_t c0, int64_t n, float* dst) {
  for (int64_t s = c0; s < c0 + n;) {
    const int64_t run = std::min(h.bs - s % h.bs, c0 + n - s);
    widen(h.v + h.offset(s), dst + (s - c0) * h.d, run * h.d);
    s += run;
  }
}

// Calls f(std::integral_constant<int, MR>, first_row) over rows [begin, end) in tiles of <= 6.
template <typename F>
inline void row_tiles(int64_t begin, int64_t end, F&& f) {
  int64_t r = begin;
  for (; r + 6 <= end; r += 6) f(std::integral_constant<int, 6>{}, r);
  switch (end - r) {
    case 5: f(std::integral_constant<int, 5>{}, r); break;
    case 4: f(std::integral_constant<int, 4>{}, r); break;
    case 3: f(std::integral_constant<int, 3>{}, r); break;
    case 2: f(std::integral_constant<int, 2>{}, r); break;
    case 1: f(std::integral_constant<int, 1>{}, r); break;
    default: break;
  }
}

// acc[m][j0 : j0 + 8C] += sum_{s in [s0, s1)} p[m][s] v[s][j0 : ...] for MR rows, slot order
// (v: value rows, fp32 or bf16 widened in registers).
template <int MR, int C, typename V>
inline void pv_block(const float* p, int64_t ldp, const V* v, int64_t d, int64_t j0,
                     float* acc, int64_t s0, int64_t s1) {
  __m256 a[MR * C];
#pragma GCC unroll 16
  for (int i = 0; i < MR * C; ++i) a[i] = _mm256_loadu_ps(acc + (i / C) * d + j0 + 8 * (i % C));
  for (int64_t s = s0; s < s1; ++s) {
    __m256 vv[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) vv[c] = load8(v + s * d + j0 + 8 * c);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 ps = _mm256_broadcast_ss(p + m * ldp + s);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) a[m * C + c] = _mm256_fmadd_ps(ps, vv[c], a[m * C + c]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR * C; ++i) _mm256_storeu_ps(acc + (i / C) * d + j0 + 8 * (i % C), a[i]);
}

template <int MR, typename V>
inline void pv_rows(const float* p, int64_t ldp, const V* v, int64_t d, float* acc,
                    int64_t s0, int64_t s1) {
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) pv_block<MR, 2>(p, ldp, v, d, j, acc, s0, s1);
  for (; j + 8 <= d; j += 8) pv_block<MR, 1>(p, ldp, v, d, j, acc, s0, s1);
  for (; j < d; ++j)
    for (int m = 0; m < MR; ++m)
      for (int64_t s = s0; s < s1; ++s)
        acc[m * d + j] = std::fma(p[m * ldp + s], static_cast<float>(v[s * d + j]), acc[m * d + j]);
}

// ---- the same attention arithmetic in 16-lane vectors (CPUs with AVX-512) ----
//
// With AVX-512 one key panel row (16 slots) is one vector, and a value row of 64 channels four:
// half the instructions of the 8-lane code, and enough accumulators (up to 4 panels or 64
// channels at a time) to keep both FMA units busy where the 8-lane code waits on its FMA chains.
// Each score and each output channel is still ONE fp32 accumulator updated by FMA in the same
// order (channels 0..d-1 for a score, slots in order for an output), so the bits are those of
// the 8-lane code: which one a CPU runs never shows in the results. It serves both the in-place
// reads of a decode step and the widened copies of a prefill.
#define MICROTURN_WIDE_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

std::atomic<bool> g_wide_attention{true};  // tests switch it off to compare the two

bool cpu_has_avx512() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq");
  }();
  return yes;
}

// 16 keys of one panel row as fp32: fp32 panels (and widened copies) hold slots in order; bf16
// panels pair slots j and 8 + j in word j, so the widened row holds slots 0, 8, 1, 9, ...
MICROTURN_WIDE_TARGET inline __m512 load_keys16(const float* p) { return _mm512_loadu_ps(p); }
MICROTURN_WIDE_TARGET inline __m512 load_keys16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
// 16 consecutive values as fp32 (value rows are never paired)
MICROTURN_WIDE_TARGET inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
MICROTURN_WIDE_TARGET inline __m512 load16(const at::BFloat16* p) { return load_keys16(p); }
// 16 values stored, bf16 rounded as store8 rounds (the bits of static_cast, element by element)
template <typename T>
MICROTURN_WIDE_TARGET inline void store16(T* p, __m512 v) {
  store8(p, _mm512_castps512_ps256(v));
  store8(p + 8, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

// out [MR][P x 16] (row stride ldo) = q rows [MR][d] (fp32, row stride ldq) . P key panels
// [d][16], in slot order
template <int MR, int P, typename W>
MICROTURN_WIDE_TARGET inline void key_tile_wide(const float* q, int64_t ldq, const W* const* panels,
                                                int64_t d, float* out, int64_t ldo,
                                                StreamAhead* stream) {
  __m512 acc[MR][P];
  for (int m = 0; m < MR; ++m)
    for (int p = 0; p < P; ++p) acc[m][p] = _mm512_setzero_ps();
  for (int64_t j = 0; j < d; ++j) {
    if (stream) stream->ahead(P * PANEL * sizeof(W));
    __m512 k[P];
    for (int p = 0; p < P; ++p) k[p] = load_keys16(panels[p] + j * PANEL);
    for (int m = 0; m < MR; ++m) {
      const __m512 qv = _mm512_set1_ps(q[m * ldq + j]);
      for (int p = 0; p < P; ++p) acc[m][p] = _mm512_fmadd_ps(qv, k[p], acc[m][p]);
    }
  }
  const __m512i order = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int m = 0; m < MR; ++m)
    for (int p = 0; p < P; ++p)
      _mm512_storeu_ps(out + m * ldo + p * PANEL, std::is_same_v<W, float>
                           ? acc[m][p] : _mm512_permutexvar_ps(order, acc[m][p]));
}

// Calls tile(std::integral_constant<int, P>, at, p) over key panels [0, panels) in tiles of
// up to four, at[i] = panel_at(p + i): the score kernels' walk over a chunk's panels.
template <typename PanelAt, typename Tile>
inline void panel_tiles(int64_t panels, PanelAt panel_at, Tile&& tile) {
  using W = std::remove_pointer_t<decltype(panel_at(0))>;  // const element type
  for (int64_t p = 0; p < panels;) {
    W* at[4];
    const int64_t take = std::min<int64_t>(4, panels - p);
    for (int64_t i = 0; i < take; ++i) at[i] = panel_at(p + i);
    switch (take) {
      case 4: tile(std::integral_constant<int, 4>{}, at, p); break;
      case 3: tile(std::integral_constant<int, 3>{}, at, p); break;
      case 2: tile(std::integral_constant<int, 2>{}, at, p); break;
      default: tile(std::integral_constant<int, 1>{}, at, p); break;
    }
    p += take;
  }
}

// scores out [MR][ldo] of MR rows against `panels` key panels, panel p at panel_at(p); a
// stream, where given, is told of every byte read
template <int MR, typename PanelAt>
MICROTURN_WIDE_TARGET void key_rows_wide(const float* q, int64_t d, PanelAt panel_at,
                                         int64_t panels, float* out, int64_t ldo,
                                         StreamAhead* stream = nullptr) {
  panel_tiles(panels, panel_at, [&](auto take, const auto* const* at, int64_t p) {
    key_tile_wide<MR, decltype(take)::value>(q, d, at, d, out + p * PANEL, ldo, stream);
  });
}

// acc[m][j0 : j0 + 16C] += sum_{s < n} p[m][s] v[s][j0 : ...] for MR rows, slots in order
template <int MR, int C, typename V>
MICROTURN_WIDE_TARGET inline void value_block_wide(const float* p, int64_t ldp, const V* v,
                                                   int64_t d, int64_t j0, float* acc, int64_t n,
                                                   StreamAhead* stream) {
  __m512 a[MR][C];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < C; ++c) a[m][c] = _mm512_loadu_ps(acc + m * d + j0 + 16 * c);
  for (int64_t s = 0; s < n; ++s) {
    if (stream) stream->ahead(C * 16 * sizeof(V));
    __m512 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = load16(v + s * d + j0 + 16 * c);
    for (int m = 0; m < MR; ++m) {
      const __m512 ps = _mm512_set1_ps(p[m * ldp + s]);
      for (int c = 0; c < C; ++c) a[m][c] = _mm512_fmadd_ps(ps, vv[c], a[m][c]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + m * d + j0 + 16 * c, a[m][c]);
}

template <int MR, typename V>
MICROTURN_WIDE_TARGET inline void value_rows_wide(const float* p, int64_t ldp, const V* v,
                                                  int64_t d, float* acc, int64_t n,
                                                  StreamAhead* stream = nullptr) {
  int64_t j = 0;  // d is a multiple of 16
  for (; j + 64 <= d; j += 64) value_block_wide<MR, 4>(p, ldp, v, d, j, acc, n, stream);
  for (; j < d; j += 16) value_block_wide<MR, 1>(p, ldp, v, d, j, acc, n, stream);
}

// exp8 in 16 lanes (see ExpConstants): the same operations per lane, so the same bits
MICROTURN_WIDE_TARGET inline __m512 exp16(__m512 x) {
  using C = ExpConstants;
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(C::lo)), _mm512_set1_ps(C::hi));
  __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(C::log2e), _mm512_set1_ps(0.5f)),
                                   _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(C::ln2_hi), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(C::ln2_lo), x);
  __m512 y = _mm512_set1_ps(C::poly[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(C::poly[i]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  const __m512i pow2 = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(pow2));
}

// s[j] = exp(s[j] - shift) for j < valid (0 past it, up to the next multiple of 16); returns the
// 8-lane partial sums in the 8-lane loop's order (low half, then high half, of each 16)
MICROTURN_WIDE_TARGET inline __m256 exp_sum_wide(float* s, int64_t valid, float shift) {
  const __m512 by = _mm512_set1_ps(shift);
  __m256 lanes = _mm256_setzero_ps();
  for (int64_t j = 0; j < valid; j += 16) {
    __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), by));
    if (valid - j < 16) e = _mm512_maskz_mov_ps(static_cast<__mmask16>((1u << (valid - j)) - 1), e);
    _mm512_storeu_ps(s + j, e);
    lanes = _mm256_add_ps(lanes, _mm512_castps512_ps256(e));
    lanes = _mm256_add_ps(lanes, _mm512_extractf32x8_ps(e, 1));
  }
  return lanes;
}

// The online softmax's running maximum: when a chunk raises it, the row's sum so far is scaled
// by exp(old - new) and that factor returned, for the accumulators (rescale) before the chunk's
// values are added; NO_RESCALE where nothing is scaled.
constexpr float NO_RESCALE = -1.0f;  // a factor is exp(..) >= 0
inline float raise_row_max(float top, float& row_max, float& row_sum) {
  if (!(top > row_max)) return NO_RESCALE;  // (a NaN maximum changes nothing, as before)
  float alpha = NO_RESCALE;
  if (row_max != -INFINITY) {
    alpha = std::exp(row_max - top);
    row_sum *= alpha;
  }
  row_max = top;
  return alpha;
}

// acc[0, d) *= factor (raise_row_max's), unless NO_RESCALE
inline void rescale(float factor, float* acc, int64_t d) {
  if (factor == NO_RESCALE) return;
  for (int64_t j = 0; j < d; ++j) acc[j] *= factor;
}

// ---- attention with bf16 arithmetic (CPUs with AVX512-BF16) ----
//
// Where the CPU multiplies bf16 directly, a bf16 model's attention takes both products with
// vdpbf16ps, as flash attention does on GPUs: twice the multiply-adds per instruction, and no
// widening of K/V, so every row count reads the pool in place. A score adds two channels'
// products per instruction: keys are stored as 16-slot panels of channel pairs, [d/2][16][2],
// and the query is rounded to bf16 (exact for d = 64, whose 1/8 scale is a power of two). An
// output channel adds two slots' p * v per instruction: the probabilities are rounded to bf16
// (the row's sum keeps them in fp32) and value rows (v[s], v[s+1]) are paired in registers.
// Each score is ONE fp32 accumulator over channel pairs in order, each output channel ONE
// accumulator over the slot pairs (2i, 2i+1) of the fixed slot grid in order, whatever rows
// share the tile: batch invariant like the kernels above, with bits of its own, so a machine
// uses it for every bf16 attention (MICROTURN_BF16_DOT=0 picks the fp32 kernels).

inline bool dot_attention(int64_t d) { return cpu_has_bf16_dot() && d % PANEL == 0; }

// Slots per key panel in a pool with blocks of bs slots (a multiple of 16). Channel-pair panels
// span up to 64 slots, so a score tile's four 16-slot panels are one contiguous 256-byte row
// per channel pair (a decode step's attention then streams its keys ~7 % faster than from four
// 2 KiB panels side by side); the other layouts keep 16.
inline int64_t key_panel_slots(int64_t bs, bool channel_pairs) {
  return channel_pairs ? std::gcd(bs, int64_t{4 * PANEL}) : PANEL;
}

// A panel key pool [..., bs / width, d, width] must have the width this CPU's kernel reads
inline void check_key_panels(const torch::Tensor& k_pool, int64_t bs, bool bf16, int64_t d,
                             const char* who) {
  const int64_t width = key_panel_slots(bs, bf16 && dot_attention(d));
  TORCH_CHECK(k_pool.size(-3) * width == bs && k_pool.size(-1) == width, who, ": key panels of ",
              width, " slots expected (KVPool's layout) for blocks of ", bs);
}

// scores out [MR][P x 16] (row stride ldo) = q rows [MR][d/2] (bf16 pairs, row stride ldq
// words) . P key panels of 16 slots [d/2][16][2], in slot order; a panel's pair rows lie
// pair_stride elements apart (32, or more where several panels share each row). Stream is a
// template argument: a call in the loop would spill the accumulators (decode reads unstreamed).
template <int MR, int P, bool Stream>
MICROTURN_DOT_TARGET inline void key_tile_dot(const uint32_t* q, int64_t ldq,
                                              const uint16_t* const* panels, int64_t pairs,
                                              int64_t pair_stride, float* out, int64_t ldo,
                                              StreamAhead* stream) {
  __m512 acc[MR][P];
  for (int m = 0; m < MR; ++m)
    for (int p = 0; p < P; ++p) acc[m][p] = _mm512_setzero_ps();
  for (int64_t c = 0; c < pairs; ++c) {
    if constexpr (Stream) stream->ahead(P * PANEL * 4);
    __m512i k[P];
    for (int p = 0; p < P; ++p) {
      k[p] = _mm512_loadu_si512(panels[p] + c * pair_stride);
      asm("" : "+v"(k[p]));  // held in a register: GCC would load it again for every row
    }
    for (int m = 0; m < MR; ++m) {
      const __m512i qv = _mm512_set1_epi32(static_cast<int32_t>(q[m * ldq + c]));
      for (int p = 0; p < P; ++p) acc[m][p] = _mm512_dpbf16_ps(acc[m][p], (__m512bh)qv, (__m512bh)k[p]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int p = 0; p < P; ++p) _mm512_storeu_ps(out + m * ldo + p * PANEL, acc[m][p]);
}

template <int MR, typename PanelAt>
MICROTURN_DOT_TARGET void key_rows_dot(const uint32_t* q, int64_t ldq, int64_t pairs,
                                       PanelAt panel_at, int64_t pair_stride, int64_t panels,
                                       float* out, int64_t ldo, StreamAhead* stream) {
  panel_tiles(panels, panel_at, [&](auto take, const uint16_t* const* at, int64_t p) {
    constexpr int P = decltype(take)::value;
    if (stream) {
      key_tile_dot<MR, P, true>(q, ldq, at, pairs, pair_stride, out + p * PANEL, ldo, stream);
    } else {
      key_tile_dot<MR, P, false>(q, ldq, at, pairs, pair_stride, out + p * PANEL, ldo, nullptr);
    }
  });
}

// word i of the result = (x[c0 + i], y[c0 + i]) for 16-bit lanes: two value rows paired
alignas(64) constexpr uint16_t PAIR_LOW[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38,
                                               7, 39, 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13,
                                               45, 14, 46, 15, 47};
alignas(64) constexpr uint16_t PAIR_HIGH[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53,
                                                22, 54, 23, 55, 24, 56, 25, 57, 26, 58, 27, 59,
                                                28, 60, 29, 61, 30, 62, 31, 63};

// a[m][..] += p[m][word] . (x, y) for channels j0 .. j0 + 16C of two value rows (y null:
// zeros); low / high are PAIR_LOW / PAIR_HIGH
template <int MR, int C>
MICROTURN_DOT_TARGET inline void value_pair_dot(__m512 (&a)[MR][C], const uint16_t* x,
                                                const uint16_t* y, const uint32_t* p,
                                                int64_t ldp, int64_t word, int64_t j0,
                                                __m512i low, __m512i high) {
  __m512i vv[C];
  if constexpr (C == 4) {
    for (int h = 0; h < 2; ++h) {
      const __m512i xs = _mm512_loadu_si512(x + j0 + 32 * h);
      const __m512i ys = y ? _mm512_loadu_si512(y + j0 + 32 * h) : _mm512_setzero_si512();
      vv[2 * h] = _mm512_permutex2var_epi16(xs, low, ys);
      vv[2 * h + 1] = _mm512_permutex2var_epi16(xs, high, ys);
    }
  } else {
    static_assert(C == 1, "64 or 16 channels at a time");
    const __m512i xs = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j0)));
    const __m512i ys = y ? _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(y + j0)))
                         : _mm512_setzero_si512();
    vv[0] = _mm512_permutex2var_epi16(xs, low, ys);
  }
  for (int m = 0; m < MR; ++m) {
    const __m512i pv = _mm512_set1_epi32(static_cast<int32_t>(p[m * ldp + word]));
    for (int c = 0; c < C; ++c) a[m][c] = _mm512_dpbf16_ps(a[m][c], (__m512bh)pv, (__m512bh)vv[c]);
  }
}

// acc[m][j0 : j0 + 16C] += p[m][s] v[s][..] + p[m][s+1] v[s+1][..] over the slot pairs from
// `from` (even) to `to` (an odd `to` pairs its last slot with zero); rows[s] is slot s's value
// row, p holds bf16 probabilities (row stride ldp words, word i = slots 2i, 2i + 1)
template <int MR, int C, bool Stream>
MICROTURN_DOT_TARGET inline void value_block_dot(const uint32_t* p, int64_t ldp,
                                                 const uint16_t* const* rows, int64_t j0,
                                                 float* acc, int64_t d, int64_t from, int64_t to,
                                                 StreamAhead* stream) {
  __m512 a[MR][C];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < C; ++c) a[m][c] = _mm512_loadu_ps(acc + m * d + j0 + 16 * c);
  const __m512i low = _mm512_load_si512(PAIR_LOW), high = _mm512_load_si512(PAIR_HIGH);
  int64_t s = from;
  for (; s + 1 < to; s += 2) {
    if constexpr (Stream) stream->ahead(2 * C * 16 * 2);
    value_pair_dot<MR, C>(a, rows[s], rows[s + 1], p, ldp, s / 2, j0, low, high);
  }
  if (s < to) value_pair_dot<MR, C>(a, rows[s], nullptr, p, ldp, s / 2, j0, low, high);
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + m * d + j0 + 16 * c, a[m][c]);
}

template <int MR>
MICROTURN_DOT_TARGET inline void value_rows_dot(const uint32_t* p, int64_t ldp,
                                                const uint16_t* const* rows, float* acc,
                                                int64_t d, int64_t from, int64_t to,
                                                StreamAhead* stream) {
  auto blocks = [&](auto streamed) {
    constexpr bool S = decltype(streamed)::value;
    int64_t j = 0;  // d is a multiple of 16
    for (; j + 64 <= d; j += 64) value_block_dot<MR, 4, S>(p, ldp, rows, j, acc, d, from, to, stream);
    for (; j < d; j += 16) value_block_dot<MR, 1, S>(p, ldp, rows, j, acc, d, from, to, stream);
  };
  if (stream) {
    blocks(std::true_type{});
  } else {
    blocks(std::false_type{});
  }
}

// fp32 -> bf16, nearest even (what static_cast<at::BFloat16> gives for finite values)
MICROTURN_DOT_TARGET inline void round_to_bf16(const float* x, uint16_t* out, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + j)));
  for (; j < n; ++j) {
    const at::BFloat16 b = static_cast<at::BFloat16>(x[j]);
    std::memcpy(out + j, &b, sizeof(b));
  }
}

// 2^t in 16 lanes, t <= 0: 2^round(t) applied exactly (vscalefps) to 2^f, |f| <= 1/2, by its
// degree-5 Taylor polynomial (relative error < 3e-6, far below the bf16 rounding the
// probabilities then get). Nine instructions where exp16 takes eighteen: the softmax was a
// quarter of prefill-shaped attention once the products ran on vdpbf16ps.
MICROTURN_DOT_TARGET inline __m512 exp2_dot(__m512 t) {
  constexpr float c[6] = {1.0f, 0.693147181f, 0.240226507f, 0.0555041087f, 0.00961812911f,
                          0.00133335581f};  // ln(2)^k / k!
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(c[5]);
  for (int k = 4; k >= 0; --k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[k]));
  return _mm512_scalef_ps(p, n);
}

// p[j] = exp(s[j] - top) as bf16 for j < valid (0 past it, to the next multiple of 16);
// returns their fp32 sum (the row's normaliser keeps them unrounded)
MICROTURN_DOT_TARGET inline float softmax_chunk_dot(const float* s, int64_t valid, float top,
                                                    uint16_t* p) {
  const __m512 log2e = _mm512_set1_ps(ExpConstants::log2e);
  const __m512 shift = _mm512_set1_ps(-top * ExpConstants::log2e);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < valid; j += 16) {
    __m512 e = exp2_dot(_mm512_fmadd_ps(_mm512_loadu_ps(s + j), log2e, shift));
    if (valid - j < 16) e = _mm512_maskz_mov_ps(static_cast<__mmask16>((1u << (valid - j)) - 1), e);
    sum = _mm512_add_ps(sum, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), (__m256i)_mm512_cvtneps_pbh(e));
  }
  return _mm512_reduce_add_ps(sum);
}

struct AttentionScratch {
  std::vector<float> keys, values, scores;
  std::vector<uint16_t> query_pairs, probs, key_panels;  // the bf16 dot-product kernel's
  std::vector<float> rescale;  // per row and chunk: the accumulators' factor (keys first)
  StreamAhead stream;
};

// One split's partial (attend_split, below) with bf16 dot products, in steps: a chunk's scores,
// then its softmax and values; each chunk's steps in chunk order, whatever runs in between.
struct DotSplit {
  KvHead<at::BFloat16> h;
  const int64_t* n_keys;
  int64_t rows, s_begin, s_end;
  float *acc, *row_max, *row_sum;
  AttentionScratch& w;
  int64_t ld = 0;                  // scores row stride: the split (keys first) or one chunk
  StreamAhead* stream = nullptr;

  // A few rows (decode) take every chunk's scores first, then the softmax and values chunk by
  // chunk: the same arithmetic in the same order, but the split's keys and then its values are
  // each one stream the hardware prefetcher follows (cold decode attention -7 %, and no
  // prefetch instructions: -20 % hot). More rows reuse each chunk's K/V for many products and
  // keep the chunk-by-chunk order, with the K/V requested ahead of the reads.
  bool keys_first() const { return rows <= KEYS_FIRST_ROWS; }

  MICROTURN_DOT_TARGET void start(const float* q) {
    const int64_t d = h.d;
    ld = keys_first() ? (s_end - s_begin + CHUNK - 1) / CHUNK * CHUNK : CHUNK;
    w.scores.resize(rows * ld);
    w.probs.resize(rows * ld);
    w.rescale.resize(rows * (ld / CHUNK));
    w.query_pairs.resize(rows * d);
    if (!h.panel_keys) w.key_panels.resize(CHUNK * d);
    std::fill(acc, acc + rows * d, 0.0f);
    std::fill(row_max, row_max + rows, -INFINITY);
    std::fill(row_sum, row_sum + rows, 0.0f);
    round_to_bf16(q, w.query_pairs.data(), rows * d);
    // chunk by chunk, panel keys are read in place and streamed (the first tile drives it)
    stream = h.panel_keys && !keys_first() ? &w.stream : nullptr;
    if (stream) {
      stream->start(h, s_begin, s_end, CHUNK);
    } else if (!h.panel_keys) {
      prefetch_slots(h, s_begin, s_end - s_begin);
    }
  }

  int64_t first_row(int64_t c0) const {  // rows before it see none of the chunk at c0
    int64_t first = 0;
    while (n_keys[first] <= c0) ++first;
    return first;
  }

  // the value rows of slots [c0, c0 + n), a block's run at a time
  void find_value_rows(int64_t c0, int64_t n, const uint16_t** value_row) const {
    const auto* v_pool = reinterpret_cast<const uint16_t*>(h.v);
    for (int64_t s = c0; s < c0 + n;) {
      const int64_t run = std::min(h.bs - s % h.bs, c0 + n - s);
      const uint16_t* first_row = v_pool + h.offset(s);
      for (int64_t j = 0; j < run; ++j) value_row[s - c0 + j] = first_row + j * h.d;
      s += run;
    }
  }

  // the scores of the chunk at c0, into scores + (c0 - s_begin) % ld
  MICROTURN_DOT_TARGET void scores(int64_t c0) {
    const int64_t d = h.d, pairs = d / 2;
    const int64_t n = std::min(CHUNK, s_end - c0), panels = (n + PANEL - 1) / PANEL;
    const int64_t first = first_row(c0);
    const auto* k_pool = reinterpret_cast<const uint16_t*>(h.k);
    if (!h.panel_keys) {  // key rows -> panels of channel pairs
      const uint16_t* value_row[CHUNK];
      find_value_rows(c0, n, value_row);
      const auto* v_pool = reinterpret_cast<const uint16_t*>(h.v);
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t* key = k_pool + (value_row[i] - v_pool);  // keys sit where values do
        uint16_t* panel = w.key_panels.data() + (i / PANEL) * d * PANEL + (i % PANEL) * 2;
        for (int64_t c = 0; c < pairs; ++c) std::memcpy(panel + c * 2 * PANEL, key + 2 * c, 4);
      }
      for (int64_t i = n; i < panels * PANEL; ++i)  // the last panel's unused slots: zeros
        for (int64_t c = 0; c < pairs; ++c)
          std::memset(w.key_panels.data() + (i / PANEL) * d * PANEL + c * 2 * PANEL + (i % PANEL) * 2, 0, 4);
    }
    auto panel_at = [&](int64_t p) -> const uint16_t* {
      if (h.panel_keys) return k_pool + h.key_panel(c0 + p * PANEL);
      return w.key_panels.data() + p * d * PANEL;
    };
    const int64_t pair_stride = 2 * (h.panel_keys ? h.key_width : PANEL);
    const auto* qp = reinterpret_cast<const uint32_t*>(w.query_pairs.data());
    float* sc = w.scores.data() + (c0 - s_begin) % ld;
    StreamAhead* lead = stream;
    row_tiles(first, rows, [&](auto mr, int64_t r) {
      constexpr int MR = decltype(mr)::value;
      key_rows_dot<MR>(qp + r * pairs, pairs, pairs, panel_at, pair_stride, panels, sc + r * ld,
                       ld, r == first ? lead : nullptr);
    });
  }

  // Keys first, a chunk's probabilities and rescale factors get their own columns and wait
  // there for the values pass; chunk by chunk, one chunk's columns are reused
  int64_t probs_column(int64_t c0) const { return keys_first() ? c0 - s_begin : 0; }
  int64_t rescale_column(int64_t c0) const { return probs_column(c0) / CHUNK; }

  // the online softmax of the chunk at c0 (its scores taken): row maxima and sums, and the
  // chunk's bf16 probabilities, and the factor the accumulators take before the chunk's
  // values (values() applies it: the same operations on them in the same order, so the same
  // bits). Keys first this runs in the keys pass, right after the chunk's scores, so the
  // values pass is one stream of products (decode step 0.994-0.996 at ~35 GB/s, 1.000 at ~65).
  MICROTURN_DOT_TARGET void softmax(int64_t c0) {
    const int64_t n = std::min(CHUNK, s_end - c0);
    const float* sc = w.scores.data() + (c0 - s_begin) % ld;
    uint16_t* probs = w.probs.data() + probs_column(c0);
    float* factor = w.rescale.data() + rescale_column(c0);
    const int64_t chunks = ld / CHUNK;
    for (int64_t r = first_row(c0); r < rows; ++r) {
      const int64_t valid = std::min(n_keys[r] - c0, n);
      factor[r * chunks] = raise_row_max(max_of(sc + r * ld, valid), row_max[r], row_sum[r]);
      row_sum[r] += softmax_chunk_dot(sc + r * ld, valid, row_max[r], probs + r * ld);
    }
  }

  // the values of the chunk at c0 (its softmax taken)
  MICROTURN_DOT_TARGET void values(int64_t c0) {
    const int64_t d = h.d;
    const int64_t n = std::min(CHUNK, s_end - c0);
    const int64_t first = first_row(c0);
    const float* factor = w.rescale.data() + rescale_column(c0);
    for (int64_t r = first; r < rows; ++r) rescale(factor[r * (ld / CHUNK)], acc + r * d, d);
    const uint16_t* value_row[CHUNK];
    find_value_rows(c0, n, value_row);
    // all active rows over the slot pairs they all see, then each row's own remainder: pairs
    // stay on the fixed grid, so no row's sums depend on the rows beside it
    const auto* pp = reinterpret_cast<const uint32_t*>(w.probs.data() + probs_column(c0));
    const int64_t ldp = ld / 2;
    const int64_t common = std::min(n_keys[first] - c0, n) / 2 * 2;
    StreamAhead* lead = stream;
    row_tiles(first, rows, [&](auto mr, int64_t r) {
      constexpr int MR = decltype(mr)::value;
      value_rows_dot<MR>(pp + r * ldp, ldp, value_row, acc + r * d, d, 0, common,
                         r == first ? lead : nullptr);
    });
    for (int64_t r = first; r < rows; ++r) {
      const int64_t valid = std::min(n_keys[r] - c0, n);
      if (valid > common)
        value_rows_dot<1>(pp + r * ldp, ldp, value_row, acc + r * d, d, common, valid, nullptr);
    }
  }
};

// attend_split (below) with bf16 dot products: the same online softmax over the same chunks
MICROTURN_DOT_TARGET void attend_split_dot(const KvHead<at::BFloat16>& h, const float* q,
                                           const int64_t* n_keys, int64_t rows, int64_t s_begin,
                                           int64_t s_end, float* acc, float* row_max,
                                           float* row_sum, AttentionScratch& w) {
  DotSplit split{h, n_keys, rows, s_begin, s_end, acc, row_max, row_sum, w};
  split.start(q);
  for (int64_t c0 = s_begin; c0 < s_end; c0 += CHUNK) {
    split.scores(c0);
    split.softmax(c0);
    if (!split.keys_first()) split.values(c0);
  }
  if (split.keys_first())
    for (int64_t c0 = s_begin; c0 < s_end; c0 += CHUNK) split.values(c0);
}

// The same split of several kv heads of one sequence whose blocks hold them side by side, keys
// first (a decode; the splits started): each block's keys of all heads, then each block's
// values of all heads, so a thread reads a block's K (and then its V) as one run instead of a
// short run per head; each head's chunks still go in order, so its bits are attend_split_dot's.
MICROTURN_DOT_TARGET void attend_heads_dot(DotSplit* splits, int64_t heads) {
  const DotSplit& lead = splits[0];
  for (int pass = 0; pass < 2; ++pass)
    for (int64_t c0 = lead.s_begin; c0 < lead.s_end;) {
      // the chunks that start in c0's block
      const int64_t block_end = std::min(lead.s_end, (c0 / lead.h.bs + 1) * lead.h.bs);
      const int64_t c1 = std::min(lead.s_end, c0 + (block_end - c0 + CHUNK - 1) / CHUNK * CHUNK);
      for (int64_t i = 0; i < heads; ++i)
        for (int64_t c = c0; c < c1; c += CHUNK) {
          if (pass) {
            splits[i].values(c);
          } else {
            splits[i].scores(c);
            splits[i].softmax(c);
          }
        }
      c0 = c1;
    }
}

// One split of one row group: rows [0, rows) (queries q [rows][d], pre-scaled, fp32; n_keys
// non-decreasing, each > s_begin) over slots [s_begin, s_end). Writes each row's partial:
// acc [rows][d], row_max, row_sum.
template <typename T>
void attend_split(const KvHead<T>& h, const float* q, const int64_t* n_keys, int64_t rows,
                  int64_t s_begin, int64_t s_end, float* acc, float* row_max, float* row_sum,
                  AttentionScratch& w) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (dot_attention(h.d)) {
      return attend_split_dot(h, q, n_keys, rows, s_begin, s_end, acc, row_max, row_sum, w);
    }
  }
  const int64_t d = h.d;
  w.scores.resize(rows * CHUNK);
  std::fill(acc, acc + rows * d, 0.0f);
  std::fill(row_max, row_max + rows, -INFINITY);
  std::fill(row_sum, row_sum + rows, 0.0f);
  float* sc = w.scores.data();
  int64_t first = 0;  // rows before `first` see none of the current chunk
  const bool wide = d % PANEL == 0 && cpu_has_avx512() &&
                    g_wide_attention.load(std::memory_order_relaxed);  // the same bits
  // a few rows read the pool in place throughout (`first` only grows): stream it to them
  StreamAhead* stream = wide && h.panel_keys && rows < WIDEN_ROWS ? &w.stream : nullptr;
  if (stream) {
    stream->start(h, s_begin, s_end, CHUNK);
  } else {
    prefetch_slots(h, s_begin, s_end - s_begin);  // the split's K/V (<= 128 KiB) into L2
  }
  for (int64_t c0 = s_begin; c0 < s_end; c0 += CHUNK) {
    const int64_t n = std::min(CHUNK, s_end - c0);
    while (n_keys[first] <= c0) ++first;
    // Few rows (a decode step) read the pool in place, bf16 widened in registers; more rows
    // share one widened copy. Widening is exact, so both give the same bits.
    const bool in_place = h.panel_keys && rows - first < WIDEN_ROWS;
    if (!in_place) {
      w.keys.resize(CHUNK * d);  // only a widening pass needs them: 64 KiB a thread, which a
      w.values.resize(CHUNK * d);  // decode step would otherwise zero (from DRAM) every layer
      widen_keys(h, c0, n, w.keys.data());
      widen_values(h, c0, n, w.values.data());
    }
    const int64_t panels = (n + PANEL - 1) / PANEL;
    row_tiles(first, rows, [&](auto mr, int64_t r) {
      constexpr int MR = decltype(mr)::value;
      if (wide && in_place) {  // the first tile reads from memory: it drives the stream
        return key_rows_wide<MR>(q + r * d, d, [&](int64_t p) { return h.k + h.offset(c0 + p * PANEL); },
                                 panels, sc + r * CHUNK, CHUNK, r == first ? stream : nullptr);
      }
      if (wide) {
        const float* keys = w.keys.data();
        return key_rows_wide<MR>(q + r * d, d, [&](int64_t p) { return keys + p * d * PANEL; },
                                 panels, sc + r * CHUNK, CHUNK);
      }
      float tile[MR * PANEL];
      for (int64_t p = 0; p < panels; ++p) {
        if (in_place) {
          panel_tile<MR, 1>(q + r * d, d, h.k + h.offset(c0 + p * PANEL), 0, PANEL, d, tile);
        } else {
          panel_tile<MR, 1>(q + r * d, d, w.keys.data() + p * d * PANEL, 0, PANEL, d, tile);
        }
        for (int m = 0; m < MR; ++m)
          std::copy(tile + m * PANEL, tile + (m + 1) * PANEL, sc + (r + m) * CHUNK + p * PANEL);
      }
    });
    for (int64_t r = first; r < rows; ++r) {  // online softmax over the row's valid slots
      float* s = sc + r * CHUNK;
      const int64_t valid = std::min(n_keys[r] - c0, n);
      rescale(raise_row_max(max_of(s, valid), row_max[r], row_sum[r]), acc + r * d, d);
      if (wide) {  // the same bits, 16 exponentials at a time
        row_sum[r] += horizontal_sum(exp_sum_wide(s, valid, row_max[r]));
        continue;
      }
      const __m256 shift = _mm256_set1_ps(row_max[r]);
      __m256 lanes = _mm256_setzero_ps();
      for (int64_t j = 0; j < valid; j += 8) {  // lanes past `valid` add +0 (p >= 0)
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), shift));
        if (valid - j < 8) {
          const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
          const __m256 keep = _mm256_castsi256_ps(
              _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid - j)), lane));
          e = _mm256_and_ps(e, keep);
        }
        _mm256_storeu_ps(s + j, e);
        lanes = _mm256_add_ps(lanes, e);
      }
      row_sum[r] += horizontal_sum(lanes);
    }
    // acc += p . v over slots [a, b) of the chunk for MR rows from r (per block in place)
    auto pv = [&](auto mr, int64_t r, int64_t a, int64_t b) {
      constexpr int MR = decltype(mr)::value;
      if (!in_place) {
        if (wide) {
          value_rows_wide<MR>(sc + r * CHUNK + a, CHUNK, w.values.data() + a * d, d, acc + r * d, b - a);
        } else {
          pv_rows<MR>(sc + r * CHUNK, CHUNK, w.values.data(), d, acc + r * d, a, b);
        }
        return;
      }
      for (int64_t s0 = a; s0 < b;) {
        const int64_t s1 = std::min(b, s0 + h.bs - (c0 + s0) % h.bs);  // to the block's end
        if (wide) {
          value_rows_wide<MR>(sc + r * CHUNK + s0, CHUNK, h.v + h.offset(c0 + s0), d, acc + r * d,
                              s1 - s0, r == first ? stream : nullptr);
        } else {
          pv_rows<MR>(sc + r * CHUNK + s0, CHUNK, h.v + h.offset(c0 + s0), d, acc + r * d, 0, s1 - s0);
        }
        s0 = s1;
      }
    };
    // all active rows over the slots they all see, then each row's own remainder, so no row
    // ever takes a product with a slot it does not see
    const int64_t common = std::min(n_keys[first] - c0, n);
    row_tiles(first, rows, [&](auto mr, int64_t r) { pv(mr, r, 0, common); });
    for (int64_t r = first; r < rows; ++r) {
      const int64_t valid = std::min(n_keys[r] - c0, n);
      if (valid > common) pv(std::integral_constant<int, 1>{}, r, common, valid);
    }
  }
}

// The work of one attention call: groups of up to ROW_GROUP query rows that read one kv head,
// each split into SPLIT-slot partials computed in parallel, then folded per row in split order.
// Partials of a very long call (a trainer's whole sequence) are bounded by running the groups
// in passes.
struct RowGroup {
  int64_t head, first_row, rows, splits, partial_base;  // head: (sequence, kv head) id
};

constexpr int64_t PARTIAL_FLOATS = int64_t{1} << 22;  // per pass (16 MiB)

struct AttentionUnit {
  int64_t group, heads, split;  // groups [group, group + heads), one split of each
};

// The units of groups [g0, g1): a split of one group each, or, for decode-sized groups of one
// sequence's kv heads that sit side by side in its blocks (bf16 dot products), a split of all
// of them at once (attend_heads_dot): a thread then reads each block's keys, and then its
// values, as one run (the per-head runs are 32 KiB; cold decode attention read at ~half the
// machine's rate). Per-group units where the lockstep ones would leave a thread idle.
template <typename T, typename HeadOf>
std::vector<AttentionUnit> attention_units(const std::vector<RowGroup>& groups, size_t g0,
                                           size_t g1, int64_t d, HeadOf head) {
  std::vector<AttentionUnit> units;
  auto one_by_one = [&] {
    units.clear();
    for (size_t g = g0; g < g1; ++g)
      for (int64_t k = 0; k < groups[g].splits; ++k) units.push_back({static_cast<int64_t>(g), 1, k});
    return units;
  };
  if constexpr (!std::is_same_v<T, at::BFloat16>) {
    return one_by_one();
  } else {
    if (!dot_attention(d)) return one_by_one();
    for (size_t g = g0; g < g1;) {
      const RowGroup& grp = groups[g];
      const KvHead<T> first = head(grp.head);
      int64_t heads = 1;
      if (grp.rows <= KEYS_FIRST_ROWS && first.panel_keys)
        while (g + heads < g1) {
          const RowGroup& next = groups[g + heads];
          const KvHead<T> h = head(next.head);
          const int64_t step = heads * first.bs * d;  // the next head's part of a block
          if (next.rows != grp.rows || next.first_row != grp.first_row ||
              next.splits != grp.splits || h.blocks != first.blocks || h.bs != first.bs ||
              h.k != first.k + step || h.v != first.v + step || !h.panel_keys)
            break;
          ++heads;
        }
      for (int64_t k = 0; k < grp.splits; ++k) units.push_back({static_cast<int64_t>(g), heads, k});
      g += heads;
    }
    const int64_t threads = seat.team ? seat.size : at::get_num_threads();
    if (static_cast<int64_t>(units.size()) < threads) return one_by_one();
    return units;
  }
}

// An attention call's work: its row groups, run in passes whose partials fit PARTIAL_FLOATS,
// and each pass's units. It depends on the rows' key counts and on where the kv heads sit
// relative to each other in their pool, which every layer of a forward pass shares: a pass
// over all layers plans once (planning per layer, with its allocations and a barrier to size
// the partials, made a decode step 1.6 % slower at ~55 GB/s).
struct AttentionPlan {
  struct Pass {
    size_t g0, g1;  // groups [g0, g1)
    int64_t slots;  // partial slots (rows x splits) of these groups
    std::vector<AttentionUnit> units;
  };
  std::vector<RowGroup> groups;
  std::vector<Pass> passes;
  int64_t partial_floats = 0;  // the largest pass's partials: acc [slots][d], max, sum
};

template <typename T, typename HeadOf>
AttentionPlan plan_attention(std::vector<RowGroup> groups, int64_t d, HeadOf head) {
  AttentionPlan plan{std::move(groups), {}, 0};
  std::vector<RowGroup>& gs = plan.groups;
  for (size_t g0 = 0; g0 < gs.size();) {
    size_t g1 = g0;
    int64_t partials = 0;
    while (g1 < gs.size() && (g1 == g0 || partials + gs[g1].rows * gs[g1].splits * (d + 2) <= PARTIAL_FLOATS)) {
      gs[g1].partial_base = partials / (d + 2);
      partials += gs[g1].rows * gs[g1].splits * (d + 2);
      ++g1;
    }
    plan.passes.push_back({g0, g1, partials / (d + 2), attention_units<T>(gs, g0, g1, d, head)});
    plan.partial_floats = std::max(plan.partial_floats, partials);
    g0 = g1;
  }
  return plan;
}

// One thread's working memory for attention units; a team thread keeps its own across layers
struct AttentionWorkspace {
  std::vector<float> q, total;
  std::vector<int64_t> keys;
  std::vector<AttentionScratch> scratch;  // one per kv head of a unit
  std::vector<DotSplit> splits;
};

// For a head id h (one kv head of one sequence) and its query row r: head(h) -> KvHead<T>,
// query(h, r) / output(h, r) -> the row's fp32 query / output, n_keys(h, r) -> slots it sees.
// The units of one pass, spread over the threads (each thread's partials at `partials`, laid
// out as the plan says); a thread works in `kept` where given, else in memory of its own.
template <typename T, typename HeadOf, typename QueryOf, typename KeysOf>
void attend_units(const AttentionPlan& plan, const AttentionPlan::Pass& pass, int64_t d,
                  HeadOf head, QueryOf query, KeysOf n_keys, float* partials,
                  AttentionWorkspace* kept) {
  const std::vector<RowGroup>& groups = plan.groups;
  float* acc = partials;
  float* row_max = acc + pass.slots * d;
  float* row_sum = row_max + pass.slots;
  const int64_t n_units = static_cast<int64_t>(pass.units.size());
  share_units(n_units, [&](auto take) {
    AttentionWorkspace own;
    AttentionWorkspace& w = kept ? *kept : own;
    for (int64_t u; (u = take()) < n_units;) {
      const AttentionUnit& unit = pass.units[u];
      const RowGroup& grp = groups[unit.group];  // its heads' groups share the rows' positions
      const int64_t k = unit.split, s_begin = k * SPLIT;
      w.keys.resize(grp.rows);
      int64_t first = 0;
      for (int64_t r = 0; r < grp.rows; ++r) w.keys[r] = n_keys(grp.head, grp.first_row + r);
      while (w.keys[first] <= s_begin) ++first;  // the last row sees the most: some row is active
      const int64_t rows = grp.rows - first, s_end = std::min(s_begin + SPLIT, w.keys[grp.rows - 1]);
      if (static_cast<int64_t>(w.scratch.size()) < unit.heads) w.scratch.resize(unit.heads);
      w.q.resize(unit.heads * rows * d);
      for (int64_t i = 0; i < unit.heads; ++i)
        for (int64_t r = 0; r < rows; ++r) {
          const RowGroup& gi = groups[unit.group + i];
          const float* src = query(gi.head, gi.first_row + first + r);
          std::copy(src, src + d, w.q.data() + (i * rows + r) * d);
        }
      auto base = [&](int64_t i) {  // the first active row's partial slot
        const RowGroup& gi = groups[unit.group + i];
        return gi.partial_base + k * gi.rows + first;
      };
      if (unit.heads == 1) {
        attend_split(head(grp.head), w.q.data(), w.keys.data() + first, rows, s_begin, s_end,
                     acc + base(0) * d, row_max + base(0), row_sum + base(0), w.scratch[0]);
        continue;
      }
      if constexpr (std::is_same_v<T, at::BFloat16>) {  // attention_units' lockstep units
        w.splits.clear();
        w.splits.reserve(unit.heads);
        for (int64_t i = 0; i < unit.heads; ++i) {
          w.splits.push_back({head(groups[unit.group + i].head), w.keys.data() + first, rows,
                              s_begin, s_end, acc + base(i) * d, row_max + base(i),
                              row_sum + base(i), w.scratch[i]});
          w.splits.back().start(w.q.data() + i * rows * d);
        }
        attend_heads_dot(w.splits.data(), unit.heads);
      }
    }
  });
}

// Folds the partials of groups [g_begin, g_end) of a pass into each row's output, in split
// order (a few multiply-adds per partial); total holds d floats
template <typename OutputOf, typename KeysOf>
void fold_partials(const AttentionPlan& plan, const AttentionPlan::Pass& pass, int64_t d,
                   OutputOf output, KeysOf n_keys, const float* partials, int64_t g_begin,
                   int64_t g_end, std::vector<float>& total) {
  total.resize(d);
  const float* acc = partials;
  const float* row_max = acc + pass.slots * d;
  const float* row_sum = row_max + pass.slots;
  for (int64_t gi = g_begin; gi < g_end; ++gi) {
    const RowGroup& grp = plan.groups[gi];
    for (int64_t r = 0; r < grp.rows; ++r) {
      const int64_t splits = (n_keys(grp.head, grp.first_row + r) + SPLIT - 1) / SPLIT;
      int64_t at = grp.partial_base + r;
      float top = row_max[at], sum = row_sum[at];
      std::copy(acc + at * d, acc + (at + 1) * d, total.data());
      for (int64_t k = 1; k < splits; ++k) {
        at += grp.rows;
        const float next = std::max(top, row_max[at]);
        const float a = std::exp(top - next), b = std::exp(row_max[at] - next);
        sum = sum * a + row_sum[at] * b;
        for (int64_t j = 0; j < d; ++j) total[j] = std::fma(acc[at * d + j], b, total[j] * a);
        top = next;
      }
      float* out = output(grp.head, grp.first_row + r);
      const float inv = 1.0f / sum;
      for (int64_t j = 0; j < d; ++j) out[j] = total[j] * inv;
    }
  }
}

// All of a pass's folds: in a team, every thread folds every group into its own output (with
// `team_total`; no barrier after); outside one, the groups are spread over the threads
template <typename OutputOf, typename KeysOf>
void fold_pass(const AttentionPlan& plan, const AttentionPlan::Pass& pass, int64_t d,
               OutputOf output, KeysOf n_keys, const float* partials,
               std::vector<float>* team_total) {
  if (team_total) {
    fold_partials(plan, pass, d, output, n_keys, partials, pass.g0, pass.g1, *team_total);
    return;
  }
  at::parallel_for(static_cast<int64_t>(pass.g0), static_cast<int64_t>(pass.g1), FOLD_GRAIN,
                   [&](int64_t begin, int64_t end) {
    std::vector<float> total;
    fold_partials(plan, pass, d, output, n_keys, partials, begin, end, total);
  });
}

// A planned call outside a team: each pass's units in parallel, then its folds in parallel
template <typename T, typename HeadOf, typename QueryOf, typename OutputOf, typename KeysOf>
void attend_planned(const AttentionPlan& plan, int64_t d, HeadOf head, QueryOf query,
                    OutputOf output, KeysOf n_keys) {
  std::vector<float> partials(plan.partial_floats);
  for (const AttentionPlan::Pass& pass : plan.passes) {
    attend_units<T>(plan, pass, d, head, query, n_keys, partials.data(), nullptr);
    fold_pass(plan, pass, d, output, n_keys, partials.data(), nullptr);
  }
}

// Row groups of `group` query heads x tokens(h) tokens per head id h (rows token-major), the
// last row of each seeing last_keys(h, row) slots.
template <typename TokensOf, typename KeysOf>
std::vector<RowGroup> row_groups(int64_t heads, int64_t group, TokensOf tokens, KeysOf n_keys) {
  std::vector<RowGroup> groups;
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t r0 = 0; r0 < tokens(h) * group; r0 += ROW_GROUP) {
      const int64_t rows = std::min(ROW_GROUP, tokens(h) * group - r0);
      groups.push_back({h, r0, rows, (n_keys(h, r0 + rows - 1) + SPLIT - 1) / SPLIT, 0});
    }
  return groups;
}

}  // namespace

namespace {

// Ragged attention through block tables. The batch holds segments: segment g is tokens
// [starts[g], starts[g+1]) of one session, at consecutive slots; token i sees that session's
// first keys[i] slots (slot s lives in block table[row][s / bs] at offset s % bs). Head id
// h = segment * hkv + kv head; its row r is (token starts[g] + r / group, query head r % group).
struct PagedRows {
  const int32_t *table, *rows, *keys, *starts;
  int64_t table_width, segments, hq, hkv, bs, d;
  bool panel_keys;
  int64_t key_width;  // slots per key panel (see with_key_width)

  // these rows with the key panel width a pool of this dtype has (key_panel_slots)
  PagedRows with_key_width(bool bf16) const {
    PagedRows r = *this;
    r.key_width = key_panel_slots(bs, panel_keys && bf16 && dot_attention(d));
    return r;
  }

  int64_t group() const { return hq / hkv; }
  int64_t row_offset(int64_t h, int64_t r) const {  // of its query / output row [N, hq, d]
    return ((starts[h / hkv] + r / group()) * hq + (h % hkv) * group() + r % group()) * d;
  }
  int64_t n_keys(int64_t h, int64_t r) const { return keys[starts[h / hkv] + r / group()]; }
  int64_t tokens(int64_t h) const { return starts[h / hkv + 1] - starts[h / hkv]; }

  template <typename T>
  KvHead<T> head(int64_t h, const T* k_pool, const T* v_pool) const {
    return KvHead<T>{k_pool + (h % hkv) * bs * d, v_pool + (h % hkv) * bs * d,
                     table + rows[starts[h / hkv]] * table_width, hkv * bs * d, bs, d, panel_keys,
                     key_width};
  }

  // the plan of every call over these rows (any layer's pool: they share one layout)
  template <typename T>
  AttentionPlan plan(const T* k_pool, const T* v_pool) const {
    auto groups = row_groups(segments * hkv, group(), [&](int64_t h) { return tokens(h); },
                             [&](int64_t h, int64_t r) { return n_keys(h, r); });
    return plan_attention<T>(std::move(groups), d,
                             [&](int64_t h) { return head(h, k_pool, v_pool); });
  }
};

// One pass's units over a layer's pool, q [N, hq, d] fp32 (pre-scaled) (see attend_units)
template <typename T>
void paged_units(const PagedRows& paged, const AttentionPlan& plan,
                 const AttentionPlan::Pass& pass, const float* q, const T* k_pool,
                 const T* v_pool, float* partials, AttentionWorkspace* kept) {
  attend_units<T>(plan, pass, paged.d, [&](int64_t h) { return paged.head(h, k_pool, v_pool); },
                  [&](int64_t h, int64_t r) { return q + paged.row_offset(h, r); },
                  [&](int64_t h, int64_t r) { return paged.n_keys(h, r); }, partials, kept);
}

// A pass's folds into out [N, hq, d] fp32 (see fold_pass)
inline void paged_fold(const PagedRows& paged, const AttentionPlan& plan,
                       const AttentionPlan::Pass& pass, const float* partials, float* out,
                       std::vector<float>* team_total) {
  fold_pass(plan, pass, paged.d, [&](int64_t h, int64_t r) { return out + paged.row_offset(h, r); },
            [&](int64_t h, int64_t r) { return paged.n_keys(h, r); }, partials, team_total);
}

template <typename T>
void paged_segments(const PagedRows& paged, const float* q, const T* k_pool, const T* v_pool,
                    float* out) {
  attend_planned<T>(paged.plan(k_pool, v_pool), paged.d,
                    [&](int64_t h) { return paged.head(h, k_pool, v_pool); },
                    [&](int64_t h, int64_t r) { return q + paged.row_offset(h, r); },
                    [&](int64_t h, int64_t r) { return out + paged.row_offset(h, r); },
                    [&](int64_t h, int64_t r) { return paged.n_keys(h, r); });
}
}  // namespace

// [N, K] weight -> [ceil(N / 64), K, 64] groups of four 16-column panels (zero-padded columns),
// same dtype.
torch::Tensor pack_linear_weight(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2, "pack_linear_weight: weight must be 2-D");
  if (w.scalar_type() == torch::kBFloat16 && cpu_has_bf16_dot()) {
    // [groups][ceil(K / 2)][64][2]: the bf16 dot-product kernel's layout (last dim 128)
    const int64_t n = w.size(0), k = w.size(1), groups = (n + DOT_COLS - 1) / DOT_COLS;
    const int64_t pairs = (k + 1) / 2;
    auto padded = torch::zeros({groups * DOT_COLS, 2 * pairs}, w.options());
    padded.narrow(0, 0, n).narrow(1, 0, k).copy_(w);
    auto packed = padded.view({groups, DOT_COLS, pairs, 2}).permute({0, 2, 1, 3}).contiguous()
        .view({groups, pairs, 2 * DOT_COLS});
    if (halves_swapped(groups / 2, groups, pairs)) {
      auto middle = packed[groups / 2];
      middle.copy_(torch::cat({middle.narrow(0, pairs / 2, pairs - pairs / 2),
                               middle.narrow(0, 0, pairs / 2)}));
    }
    return packed;
  }
  const int64_t n = w.size(0), k = w.size(1), groups = (n + GROUP_COLS - 1) / GROUP_COLS;
  auto padded = torch::zeros({groups * GROUP_COLS, k}, w.options());
  padded.narrow(0, 0, n).copy_(w);
  // [groups, 4, 16, K] -> [groups, K, 4, 16]
  auto packed = padded.view({groups, GROUP, PANEL, k}).permute({0, 3, 1, 2});
  if (w.scalar_type() == torch::kBFloat16)  // word j of a panel row: columns j (low half), 8 + j
    packed = packed.reshape({groups, k, GROUP, 2, 8}).transpose(3, 4);
  return packed.contiguous().view({groups, k, GROUP_COLS});
}

torch::Tensor packed_linear(torch::Tensor x, torch::Tensor panels, int64_t n,
                            c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.device().is_cpu() && panels.device().is_cpu(), "packed_linear: CPU tensors only");
  const bool dot = panels.dim() == 3 && dot_packed(panels);
  const int64_t cols = dot ? DOT_COLS : GROUP_COLS;
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == (dot ? 2 * DOT_COLS : GROUP_COLS) &&
              panels.is_contiguous() && panels.size(0) == (n + cols - 1) / cols,
              "packed_linear: panels from pack_linear_weight expected");
  const int64_t k = x.size(-1);
  TORCH_CHECK((dot ? (k + 1) / 2 : k) == panels.size(1), "packed_linear: x has ", k,
              " features, the packed weight another count");
  TORCH_CHECK(x.scalar_type() == panels.scalar_type() &&
              (x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat32),
              "packed_linear: x and weight must both be fp32 or both bf16");
  auto out_shape = x.sizes().vec();
  out_shape.back() = n;
  auto rows = x.reshape({-1, k});
  const int64_t m = rows.size(0);
  auto y = torch::empty({m, n}, x.options());
  torch::Tensor b32;
  if (bias.has_value()) b32 = bias->to(torch::kFloat32).contiguous();
  const float* bp = bias.has_value() ? b32.data_ptr<float>() : nullptr;
  if (dot) {  // bf16 x as it is
    auto xc = rows.contiguous();
    dot_rows(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()),
             reinterpret_cast<const uint16_t*>(panels.data_ptr<at::BFloat16>()), bp,
             y.data_ptr<at::BFloat16>(), m, n, k);
    return y.view(out_shape);
  }
  auto x32 = rows.to(torch::kFloat32).contiguous();
  if (x.scalar_type() == torch::kBFloat16) {
    packed_rows(x32.data_ptr<float>(), panels.data_ptr<at::BFloat16>(), bp,
                y.data_ptr<at::BFloat16>(), m, n, k);
  } else {
    packed_rows(x32.data_ptr<float>(), panels.data_ptr<float>(), bp, y.data_ptr<float>(), m, n, k);
  }
  return y.view(out_shape);
}

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                              torch::Tensor table, torch::Tensor rows, torch::Tensor keys,
                              torch::Tensor starts) {
  TORCH_CHECK(q.dim() == 3 && (k_pool.dim() == 4 || k_pool.dim() == 5) && v_pool.dim() == 4,
              "paged_attention: q [N, Hq, D]; values [NB, Hkv, BS, D]; keys the same or in "
              "W-slot panels [NB, Hkv, BS / W, D, W]");
  const bool panel_keys = k_pool.dim() == 5;
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && table.is_contiguous(),
              "paged_attention: pool and table must be contiguous");
  for (const auto& t : {table, rows, keys, starts})
    TORCH_CHECK(t.scalar_type() == torch::kInt32 && t.is_contiguous(),
                "paged_attention: contiguous int32 metadata expected");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type(), "paged_attention: dtype mismatch");
  const int64_t n = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t hkv = v_pool.size(1), bs = v_pool.size(2), segments = starts.numel() - 1;
  if (panel_keys)
    check_key_panels(k_pool, bs, q.scalar_type() == torch::kBFloat16, d, "paged_attention");
  TORCH_CHECK(segments >= 0 && (segments == 0 || starts.data_ptr<int32_t>()[segments] == n),
              "paged_attention: segment starts must end at the token count");
  auto q32 = (q.to(torch::kFloat32) * (1.0 / std::sqrt(static_cast<double>(d)))).contiguous();
  auto out = torch::empty({n, hq, d}, torch::kFloat32);
  const PagedRows paged = PagedRows{table.data_ptr<int32_t>(), rows.data_ptr<int32_t>(),
                                    keys.data_ptr<int32_t>(), starts.data_ptr<int32_t>(),
                                    table.size(1), segments, hq, hkv, bs, d, panel_keys, PANEL}
                               .with_key_width(q.scalar_type() == torch::kBFloat16);
  if (q.scalar_type() == torch::kBFloat16) {
    paged_segments(paged, q32.data_ptr<float>(), k_pool.data_ptr<at::BFloat16>(),
                   v_pool.data_ptr<at::BFloat16>(), out.data_ptr<float>());
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kFloat32, "paged_attention: fp32 or bf16 only");
    paged_segments(paged, q32.data_ptr<float>(), k_pool.data_ptr<float>(),
                   v_pool.data_ptr<float>(), out.data_ptr<float>());
  }
  return out.to(q.scalar_type());
}

// Store the K/V rows [N, Hkv, D] of N new tokens at (block, offset) of the pool, in place:
// values as rows, keys as rows or (5-D pool) into their 16-slot panel column.
template <typename T>
void write_rows(T* k_pool, T* v_pool, bool panel_keys, const T* k, const T* v,
                const int64_t* blocks, const int64_t* offsets, int64_t n, int64_t hkv, int64_t bs,
                int64_t d, int64_t row_stride) {
  const bool paired = std::is_same_v<T, at::BFloat16>;  // bf16 panels pair slots j and 8 + j
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < hkv; ++h) {
      const int64_t base = (blocks[i] * hkv + h) * bs * d, off = offsets[i];
      const T* k_row = k + i * row_stride + h * d;
      const T* v_row = v + i * row_stride + h * d;
      std::copy(v_row, v_row + d, v_pool + base + off * d);
      if (panel_keys && paired && dot_attention(d)) {  // [d/2][width][2]: channel pairs
        const int64_t width = key_panel_slots(bs, true);
        T* panel = k_pool + base + (off / width) * d * width + (off % width) * 2;
        for (int64_t c = 0; c < d / 2; ++c) {
          panel[c * 2 * width] = k_row[2 * c];
          panel[c * 2 * width + 1] = k_row[2 * c + 1];
        }
      } else if (panel_keys) {
        const int64_t c = off % PANEL, column = paired ? 2 * (c % 8) + c / 8 : c;
        T* panel = k_pool + base + (off / PANEL) * d * PANEL + column;
        for (int64_t j = 0; j < d; ++j) panel[j * PANEL] = k_row[j];
      } else {
        std::copy(k_row, k_row + d, k_pool + base + off * d);
      }
    }
}

void paged_write_(torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor k, torch::Tensor v,
                  torch::Tensor blocks, torch::Tensor offsets) {
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && v_pool.dim() == 4,
              "paged_write_: contiguous pools expected");
  TORCH_CHECK(k.scalar_type() == k_pool.scalar_type() && v.scalar_type() == v_pool.scalar_type(),
              "paged_write_: dtype mismatch");
  auto kc = k.contiguous(), vc = v.contiguous();
  auto b = blocks.to(torch::kInt64).contiguous(), o = offsets.to(torch::kInt64).contiguous();
  const int64_t n = kc.size(0), hkv = v_pool.size(1), bs = v_pool.size(2), d = v_pool.size(3);
  TORCH_CHECK(kc.numel() == n * hkv * d && vc.numel() == n * hkv * d && b.numel() == n &&
              o.numel() == n, "paged_write_: k/v [N, Hkv, D] and N slots expected");
  const bool panel_keys = k_pool.dim() == 5;
  if (panel_keys) check_key_panels(k_pool, bs, k.scalar_type() == torch::kBFloat16, d, "paged_write_");
  if (k.scalar_type() == torch::kBFloat16) {
    write_rows(k_pool.data_ptr<at::BFloat16>(), v_pool.data_ptr<at::BFloat16>(), panel_keys,
               kc.data_ptr<at::BFloat16>(), vc.data_ptr<at::BFloat16>(), b.data_ptr<int64_t>(),
               o.data_ptr<int64_t>(), n, hkv, bs, d, hkv * d);
  } else {
    TORCH_CHECK(k.scalar_type() == torch::kFloat32, "paged_write_: fp32 or bf16 only");
    write_rows(k_pool.data_ptr<float>(), v_pool.data_ptr<float>(), panel_keys,
               kc.data_ptr<float>(), vc.data_ptr<float>(), b.data_ptr<int64_t>(),
               o.data_ptr<int64_t>(), n, hkv, bs, d, hkv * d);
  }
}

// The small element-wise steps of a layer, one call each instead of 3-10 torch ops (at decode
// sizes each torch op costs more in dispatch than in arithmetic). All arithmetic in fp32.

template <typename T>
void rms_norm_rows(const T* x, const T* w, T* out, int64_t rows, int64_t d, float eps) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * d;
      __m256 lanes = _mm256_setzero_ps();  // the sum of squares: 8 lanes, then across, then the tail
      int64_t j = 0;
      for (; j + 8 <= d; j += 8) {
        const __m256 v = load8(row + j);
        lanes = _mm256_fmadd_ps(v, v, lanes);
      }
      float sq = horizontal_sum(lanes);
      for (; j < d; ++j) sq += static_cast<float>(row[j]) * static_cast<float>(row[j]);
      const float scale = 1.0f / std::sqrt(sq / static_cast<float>(d) + eps);
      const __m256 s = _mm256_set1_ps(scale);
      for (j = 0; j + 8 <= d; j += 8)
        store8(out + r * d + j, _mm256_mul_ps(load8(w + j), _mm256_mul_ps(load8(row + j), s)));
      for (; j < d; ++j)
        out[r * d + j] = static_cast<T>(static_cast<float>(w[j]) * (static_cast<float>(row[j]) * scale));
    }
  });
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: dtype mismatch");
  auto xc = x.contiguous();
  auto out = torch::empty_like(xc);
  const int64_t d = x.size(-1), rows = d ? xc.numel() / d : 0;
  if (x.scalar_type() == torch::kBFloat16) {
    rms_norm_rows(xc.data_ptr<at::BFloat16>(), weight.data_ptr<at::BFloat16>(),
                  out.data_ptr<at::BFloat16>(), rows, d, static_cast<float>(eps));
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32, "rms_norm: fp32 or bf16 only");
    rms_norm_rows(xc.data_ptr<float>(), weight.data_ptr<float>(), out.data_ptr<float>(), rows, d,
                  static_cast<float>(eps));
  }
  return out;
}

// A pair (x1, x2) rotated by (c, s): (x1 c - x2 s, x2 c + x1 s), each with one fused
// multiply-add written out, so the vector loops below give these bits lane by lane.
inline float rotated_first(float x1, float x2, float c, float s) {
  return std::fma(x1, c, -(x2 * s));
}
inline float rotated_second(float x1, float x2, float c, float s) {
  return std::fma(x2, c, x1 * s);
}

// One head's interleaved pairs (2i, 2i + 1), eight at a time (16 lanes): a lane's partner comes
// from swapping neighbours, and -s on the even lanes makes both formulas one fused multiply-add.
// Returns how many pairs it did.
template <typename T>
MICROTURN_WIDE_TARGET int64_t rotate_interleaved_wide(T* x, const float* c, const float* s,
                                                      int64_t half) {
  const __m512i twice = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512 even_sign = _mm512_castsi512_ps(_mm512_set4_epi32(0, INT32_MIN, 0, INT32_MIN));
  int64_t i = 0;
  for (; i + 8 <= half; i += 8) {
    const __m512 v = load16(x + 2 * i);
    const __m512 partner = _mm512_permute_ps(v, 0xB1);
    const __m512 cc = _mm512_permutexvar_ps(twice, _mm512_castps256_ps512(_mm256_loadu_ps(c + i)));
    const __m512 ss = _mm512_xor_ps(
        _mm512_permutexvar_ps(twice, _mm512_castps256_ps512(_mm256_loadu_ps(s + i))), even_sign);
    store16(x + 2 * i, _mm512_fmadd_ps(v, cc, _mm512_mul_ps(partner, ss)));
  }
  return i;
}

// One head's pairs (i, i + half), 16 at a time. Returns how many pairs it did.
template <typename T>
MICROTURN_WIDE_TARGET int64_t rotate_halves_wide(T* x, const float* c, const float* s,
                                                 int64_t half) {
  int64_t i = 0;
  for (; i + 16 <= half; i += 16) {
    const __m512 x1 = load16(x + i), x2 = load16(x + half + i);
    const __m512 cv = _mm512_loadu_ps(c + i), sv = _mm512_loadu_ps(s + i);
    const __m512 minus_x2s = _mm512_xor_ps(_mm512_mul_ps(x2, sv), _mm512_set1_ps(-0.0f));
    store16(x + i, _mm512_fmadd_ps(x1, cv, minus_x2s));
    store16(x + half + i, _mm512_fmadd_ps(x2, cv, _mm512_mul_ps(x1, sv)));
  }
  return i;
}

// Rotate, in place, the q and k heads inside a fused qkv projection [tokens, (hq + 2 hkv) * d]
// by the angles cos/sin [tokens, d / 2] (fp32). interleaved pairs (2i, 2i+1); else (i, i + d/2).
template <typename T>
void rotary_rows(T* qkv, const float* cos, const float* sin, int64_t tokens, int64_t heads,
                 int64_t width, int64_t d, bool interleaved) {
  const int64_t half = d / 2;
  const bool wide = cpu_has_avx512();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos + t * half;
      const float* s = sin + t * half;
      for (int64_t h = 0; h < heads; ++h) {
        T* x = qkv + t * width + h * d;
        int64_t i = !wide ? 0
                    : interleaved ? rotate_interleaved_wide(x, c, s, half)
                                  : rotate_halves_wide(x, c, s, half);
        for (; i < half; ++i) {
          const int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
          const float x1 = static_cast<float>(x[a]), x2 = static_cast<float>(x[b]);
          x[a] = static_cast<T>(rotated_first(x1, x2, c[i], s[i]));
          x[b] = static_cast<T>(rotated_second(x1, x2, c[i], s[i]));
        }
      }
    }
  });
}

void rotary_qkv_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t q_heads,
                 int64_t kv_heads, int64_t head_dim, bool interleaved) {
  TORCH_CHECK(qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(),
              "rotary_qkv_: contiguous tensors expected");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32, "rotary_qkv_: cos/sin must be fp32");
  const int64_t width = qkv.size(-1), tokens = width ? qkv.numel() / width : 0;
  TORCH_CHECK(cos.numel() == tokens * head_dim / 2, "rotary_qkv_: one angle row per token");
  const int64_t heads = q_heads + kv_heads;  // q heads then k heads are contiguous
  if (qkv.scalar_type() == torch::kBFloat16) {
    rotary_rows(qkv.data_ptr<at::BFloat16>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                tokens, heads, width, head_dim, interleaved);
  } else {
    TORCH_CHECK(qkv.scalar_type() == torch::kFloat32, "rotary_qkv_: fp32 or bf16 only");
    rotary_rows(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), tokens,
                heads, width, head_dim, interleaved);
  }
}

// out[j] = silu(gate[j]) * up[j] for the first multiple of 16 of f, 16 lanes at a time with
// exp16: the same operations per lane as the 8-lane loop below, so the same bits; returns
// how many it did
template <typename T>
MICROTURN_WIDE_TARGET int64_t silu_mul_wide(const T* gate, const T* up, T* out, int64_t f) {
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= f; j += 16) {
    const __m512 g = load16(gate + j);
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(zero, g))));
    store16(out + j, _mm512_mul_ps(silu, load16(up + j)));
  }
  return j;
}

// silu(gate) * up for a fused [.., 2 * f] gate/up projection -> [.., f]. 16 or 8 lanes at a
// time; a column's arithmetic is the same in every row (so it is batch invariant).
template <typename T>
void silu_mul_rows(const T* x, T* out, int64_t rows, int64_t f) {
  const bool wide = cpu_has_avx512();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = x + r * 2 * f;
      const T* up = gate + f;
      int64_t j = wide ? silu_mul_wide(gate, up, out + r * f, f) : 0;
      for (; j + 8 <= f; j += 8) {
        const __m256 g = load8(gate + j);
        const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, g))));
        store8(out + r * f + j, _mm256_mul_ps(silu, load8(up + j)));
      }
      for (; j < f; ++j) {
        const float g = static_cast<float>(gate[j]);
        out[r * f + j] = static_cast<T>(g / (1.0f + std::exp(-g)) * static_cast<float>(up[j]));
      }
    }
  });
}

torch::Tensor silu_mul(torch::Tensor gate_up) {
  auto x = gate_up.contiguous();
  auto shape = x.sizes().vec();
  const int64_t f = shape.back() / 2, rows = f ? x.numel() / (2 * f) : 0;
  shape.back() = f;
  auto out = torch::empty(shape, x.options());
  if (x.scalar_type() == torch::kBFloat16) {
    silu_mul_rows(x.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), rows, f);
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32, "silu_mul: fp32 or bf16 only");
    silu_mul_rows(x.data_ptr<float>(), out.data_ptr<float>(), rows, f);
  }
  return out;
}

// cos and sin [n][half] of position(t) * inv_freq[i], the product rounded to fp32 first
template <typename PositionOf>
void angles_into(int64_t n, PositionOf position, const float* inv_freq, int64_t half, float* cos,
                 float* sin) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(position(t) * inv_freq[i]);
      cos[t * half + i] = static_cast<float>(std::cos(angle));
      sin[t * half + i] = static_cast<float>(std::sin(angle));
    }
}

// cos/sin of the rotary angles, [*positions, D/2] fp32: the angle is rounded to fp32 as the
// reference computes it, then cos/sin are evaluated in double and rounded once. torch's own
// vectorised cos takes a scalar path for a tensor's tail elements, so its result for a
// position could depend on how many positions share the call; this one cannot.
std::vector<torch::Tensor> rotary_angles(torch::Tensor positions, torch::Tensor inv_freq) {
  TORCH_CHECK(inv_freq.scalar_type() == torch::kFloat32 && inv_freq.dim() == 1,
              "rotary_angles: inv_freq must be 1-D fp32");
  auto pos = positions.to(torch::kFloat32).contiguous();
  auto f = inv_freq.contiguous();
  const int64_t n = pos.numel(), half = f.numel();
  auto shape = positions.sizes().vec();
  shape.push_back(half);
  auto cos = torch::empty(shape, torch::kFloat32), sin = torch::empty(shape, torch::kFloat32);
  const float* pp = pos.data_ptr<float>();
  angles_into(n, [&](int64_t t) { return pp[t]; }, f.data_ptr<float>(), half,
              cos.data_ptr<float>(), sin.data_ptr<float>());
  return {cos, sin};
}

// log p(target) per row of logits [M, V] (fp32 or bf16): max, then the exp-sum in a fixed
// order that depends only on V, then logit[target] - max - log(sum). The sampler and the
// trainer both call it, so their log-probabilities agree bit for bit.
template <typename T>
void logprob_rows(const T* logits, const int64_t* targets, float* out, int64_t m, int64_t v) {
  at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(v);
    for (int64_t r = begin; r < end; ++r) {
      const T* x = logits + r * v;
      for (int64_t j = 0; j < v; ++j) row[j] = static_cast<float>(x[j]);
      const float top = max_of(row.data(), v);
      const __m256 shift = _mm256_set1_ps(top);
      __m256 lanes = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + 8 <= v; j += 8) lanes = _mm256_add_ps(lanes, exp8(_mm256_sub_ps(_mm256_loadu_ps(row.data() + j), shift)));
      float total = horizontal_sum(lanes);
      for (; j < v; ++j) total += std::exp(row[j] - top);
      out[r] = row[targets[r]] - top - std::log(total);
    }
  });
}

torch::Tensor token_logprobs(torch::Tensor logits, torch::Tensor targets) {
  TORCH_CHECK(logits.dim() == 2 && targets.dim() == 1 && targets.size(0) == logits.size(0),
              "token_logprobs: logits [M, V] and targets [M] expected");
  auto x = logits.contiguous();
  auto t = targets.to(torch::kInt64).contiguous();
  const int64_t m = x.size(0), v = x.size(1);
  const int64_t* tp = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i)
    TORCH_CHECK(tp[i] >= 0 && tp[i] < v, "token_logprobs: targets must be in [0, ", v, ")");
  auto out = torch::empty({m}, torch::kFloat32);
  if (x.scalar_type() == torch::kBFloat16) {
    logprob_rows(x.data_ptr<at::BFloat16>(), t.data_ptr<int64_t>(), out.data_ptr<float>(), m, v);
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32, "token_logprobs: fp32 or bf16 only");
    logprob_rows(x.data_ptr<float>(), t.data_ptr<int64_t>(), out.data_ptr<float>(), m, v);
  }
  return out;
}

// y [m, n] = x [m, k] times a packed weight, as packed_linear computes it: bf16 pairs straight
// into the dot-product kernel, anything else widened into `wide` first (grown only then). With
// `residual` the result is added into y (see store_output).
template <typename T>
void linear_rows(const T* x, int64_t m, int64_t k, const torch::Tensor& panels, const float* bias,
                 T* y, int64_t n, std::vector<float>& wide, bool residual = false) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (dot_packed(panels)) {
      dot_rows(reinterpret_cast<const uint16_t*>(x),
               reinterpret_cast<const uint16_t*>(panels.data_ptr<T>()), bias, y, m, n, k, residual);
      return;
    }
  }
  if (static_cast<int64_t>(wide.size()) < m * k) wide.resize(m * k);
  widen(x, wide.data(), m * k);
  packed_rows(wide.data(), panels.data_ptr<T>(), bias, y, m, n, k, residual);
}

// All decoder layers of one pass through the paged KV pool, in one call: the same kernels in
// the same order as the Python layer loop, rounding to the model's dtype at the same points
// (so the same bits), on buffers allocated once per pass. No torch op runs inside the loop:
// at decode sizes their dispatch, views and copies cost more than the arithmetic (~1,500 per
// step, ~2 ms). weights: per layer [input norm, qkv panels, qkv bias or empty, o panels,
// post-attention norm, gate/up panels, down panels] (first 7 x layers entries); x [N, hidden].
template <typename T>
void decoder_layers(T* x, const std::vector<torch::Tensor>& weights, int64_t layers, float eps,
                    const float* cos, const float* sin, int64_t n, int64_t hidden, int64_t hq, int64_t hkv,
                    int64_t d, int64_t intermediate, bool interleaved, T* k_pools, T* v_pools,
                    int64_t pool_layer_elems, bool panel_keys, int64_t bs, const int32_t* table,
                    int64_t table_width, const int32_t* rows, const int32_t* keys,
                    const int32_t* starts, int64_t segments, const int64_t* write_blocks,
                    const int64_t* write_offsets) {
  const int64_t q_size = hq * d, kv_size = hkv * d, width = q_size + 2 * kv_size;
  std::vector<T> qkv(n * width), gate_up(n * 2 * intermediate);
  const float q_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  const PagedRows paged = PagedRows{table, rows, keys, starts, table_width, segments, hq, hkv,
                                    bs, d, panel_keys, PANEL}
                               .with_key_width(std::is_same_v<T, at::BFloat16>);
  const AttentionPlan plan = paged.plan(k_pools, v_pools);  // every layer's
  std::vector<float> partials(plan.partial_floats);
  auto all_layers = [&] {
    std::vector<float> wide;  // each thread's: sized by the widening linears
    AttentionWorkspace attention;  // each team thread's, kept across the layers
    // The element-wise steps between two linears (norm, rotary, attention's fold, silu) run on
    // every team thread, each into its own copy: the same bits on each, and no thread waits for
    // another's (a decode step's are a few hundred values; a rank-0 step cost a barrier each)
    std::vector<T> normed(n * hidden), att(n * q_size), act(n * intermediate);
    std::vector<float> q32(n * q_size), att32(n * q_size);
    std::vector<T> own_qkv(seat.team ? n * width : 0);
    // The packed weights lie side by side in the order they are read (qkv, o, gate/up, down,
    // the next layer's qkv, ..., the head; native_layers.py), so whoever streams a matrix's
    // second half ends where the next matrix starts. The halves alternate between the threads
    // (o and down reversed): that thread takes the next first half and its prefetched stream
    // runs on instead of starting cold (decode step 0.987 at ~65 GB/s, in-process A/B).
    constexpr bool REVERSED = true, IN_ORDER = false, RESIDUAL = true, PLAIN = false;
    auto linear = [&](const T* in, int64_t k, const torch::Tensor& panels, const float* bias,
                      T* out, int64_t cols, bool residual, bool reversed) {
      seat.reversed = reversed;
      linear_rows(in, n, k, panels, bias, out, cols, wide, residual);
      seat.reversed = false;
    };
    for (int64_t l = 0; l < layers; ++l) {
      const torch::Tensor* w = weights.data() + 7 * l;
      const float* bias = w[2].numel() ? w[2].data_ptr<float>() : nullptr;
      T* k_pool = k_pools + l * pool_layer_elems;
      T* v_pool = v_pools + l * pool_layer_elems;
      rms_norm_rows(x, w[0].data_ptr<T>(), normed.data(), n, hidden, eps);
      linear(normed.data(), hidden, w[1], bias, qkv.data(), width, PLAIN, IN_ORDER);
      // in a team every thread rotates its own copy and writes the new keys and values itself,
      // so attention starts without a barrier: the threads store identical bytes into the same
      // slots (a race only in name: whichever store lands, every later read sees those bytes)
      T* rotated = seat.team ? own_qkv.data() : qkv.data();
      if (seat.team) std::copy(qkv.data(), qkv.data() + n * width, rotated);
      rotary_rows(rotated, cos, sin, n, hq + hkv, width, d, interleaved);
      write_rows(k_pool, v_pool, panel_keys, rotated + q_size, rotated + q_size + kv_size,
                 write_blocks, write_offsets, n, hkv, bs, d, width);
      for (int64_t t = 0; t < n; ++t) scale_rows(rotated + t * width, q_scale, q32.data() + t * q_size, q_size);
      for (const AttentionPlan::Pass& pass : plan.passes) {
        paged_units(paged, plan, pass, q32.data(), k_pool, v_pool, partials.data(),
                    seat.team ? &attention : nullptr);
        // a few multiply-adds per partial: in a team every thread folds them all
        paged_fold(paged, plan, pass, partials.data(), att32.data(),
                   seat.team ? &attention.total : nullptr);
        if (seat.team && plan.passes.size() > 1) team_barrier();  // the next pass reuses them
      }
      scale_rows(att32.data(), 1.0f, att.data(), n * q_size);
      linear(att.data(), q_size, w[3], nullptr, x, hidden, RESIDUAL, REVERSED);
      rms_norm_rows(x, w[4].data_ptr<T>(), normed.data(), n, hidden, eps);
      linear(normed.data(), hidden, w[5], nullptr, gate_up.data(), 2 * intermediate, PLAIN,
             IN_ORDER);
      silu_mul_rows(gate_up.data(), act.data(), n, intermediate);
      linear(act.data(), intermediate, w[6], nullptr, x, hidden, RESIDUAL, REVERSED);
    }
  };
  // Decode-sized passes run as one team: their element-wise steps are a few hundred values
  // (every thread computes them) and their parallel ops then cost a barrier each
  // instead of opening and joining a region. Larger passes keep a region per op.
  const bool team = n <= TEAM_ROWS && segments * hkv <= FOLD_GRAIN;  // folds on every thread
  as_team(team ? at::get_num_threads() : 1, all_layers);
}

// What a source weight was when its stack was built, with everything fresh() compares kept
// here: its impl, storage, version counter are each one load away, where reading the tensor's
// storage and then its data pointer and version chained two (57 -> 41 us on cold caches).
struct SourceState {
  torch::Tensor source;            // keeps the parameter alive
  const c10::TensorImpl* impl;
  c10::Storage storage;            // its storage then (held: its address cannot be reused)
  const void* data;                // the storage's data then (an in-place resize moves it)
  int64_t offset;
  c10::VariableVersion version;    // shares the source's counter (inference tensors: none)
  uint32_t seen_version;

  explicit SourceState(const torch::Tensor& t)
      : source(t), impl(t.unsafeGetTensorImpl()), storage(t.storage()), data(storage.data()),
        offset(t.storage_offset()), version(impl->version_counter()),
        seen_version(version.enabled() ? version.current_version() : 0) {}

  bool unchanged() const {
    return impl->storage().unsafeGetStorageImpl() == storage.unsafeGetStorageImpl() &&
           impl->storage_offset() == offset && storage.data() == data &&
           (!version.enabled() || version.current_version() == seen_version);
  }
};

// The weights of a decoder, checked and arranged once (biases widened to fp32, as packed_linear
// takes them) and kept by Python between passes: a decode step then passes one object instead
// of converting ~200 tensors. weights: per layer [input norm, qkv panels, qkv bias or empty, o
// panels, post-attention norm, gate/up panels, down panels]; then the token embedding [vocab,
// hidden], the final norm and the output head's panels. `sources` are the parameters these were
// made from: fresh() says whether each still has the storage and version it had (an optimizer
// step or a `.data` swap changes one), in C++ because a decode step asks every time and ~200
// Python attribute reads on objects the weight stream has evicted from cache cost ~0.2 ms.
struct LayerStack {
  std::vector<torch::Tensor> weights;
  std::vector<SourceState> sources;
  torch::ScalarType dtype;
  int64_t layers, vocab;

  bool fresh() const {
    for (const SourceState& s : sources)
      if (!s.unchanged()) return false;
    return true;
  }
  const torch::Tensor& embedding() const { return weights[7 * layers]; }
  const torch::Tensor& final_norm() const { return weights[7 * layers + 1]; }
  const torch::Tensor& head() const { return weights[7 * layers + 2]; }
};

LayerStack layer_stack(std::vector<torch::Tensor> weights, std::vector<torch::Tensor> sources,
                       int64_t vocab) {
  TORCH_CHECK(weights.size() >= 10 && (weights.size() - 3) % 7 == 0,
              "layer_stack: 7 tensors per layer, then embedding, final norm and head panels");
  const int64_t layers = static_cast<int64_t>(weights.size() - 3) / 7;
  const auto dtype = weights[0].scalar_type();
  TORCH_CHECK(dtype == torch::kBFloat16 || dtype == torch::kFloat32, "layer_stack: fp32 or bf16 only");
  for (int64_t i = 0; i < static_cast<int64_t>(weights.size()); ++i) {
    if (i < 7 * layers && i % 7 == 2) {  // qkv bias
      if (weights[i].numel()) weights[i] = weights[i].to(torch::kFloat32).contiguous();
      continue;
    }
    TORCH_CHECK(weights[i].scalar_type() == dtype && weights[i].is_contiguous(),
                "layer_stack: weights must be contiguous and of one dtype");
  }
  TORCH_CHECK(weights[7 * layers].dim() == 2 && weights[7 * layers].size(0) == vocab,
              "layer_stack: embedding [vocab, hidden] expected");
  return {std::move(weights), std::vector<SourceState>(sources.begin(), sources.end()), dtype,
          layers, vocab};
}

// A contiguous int64 view of t: t itself when it is one already (no op dispatched)
torch::Tensor as_int64(const torch::Tensor& t) {
  if (t.scalar_type() == torch::kInt64 && t.is_contiguous()) return t;
  return t.to(torch::kInt64).contiguous();
}

// Every layer over x [N, hidden] (contiguous, the weights' dtype), in place.
void paged_decoder_layers_(torch::Tensor& x, const LayerStack& stack, double eps,
                           const float* cos, const float* sin,
                           int64_t hq, int64_t hkv, int64_t d, int64_t intermediate,
                           bool interleaved, const torch::Tensor& k_pools,
                           const torch::Tensor& v_pools, const torch::Tensor& table,
                           const torch::Tensor& rows, const torch::Tensor& keys,
                           const torch::Tensor& starts, const torch::Tensor& write_blocks,
                           const torch::Tensor& write_offsets) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == stack.dtype && x.is_contiguous(),
              "paged_decoder_layers: x [N, hidden] of the weights' dtype");
  const int64_t layers = stack.layers, n = x.size(0);
  const bool panel_keys = k_pools.dim() == 6;
  TORCH_CHECK(k_pools.is_contiguous() && v_pools.is_contiguous() && v_pools.dim() == 5 &&
              k_pools.size(0) == layers && k_pools.numel() == v_pools.numel(),
              "paged_decoder_layers: pools [layers, blocks, kv heads, ...] expected");
  for (const auto& t : {table, rows, keys, starts})
    TORCH_CHECK(t.scalar_type() == torch::kInt32 && t.is_contiguous(),
                "paged_decoder_layers: contiguous int32 metadata expected");
  TORCH_CHECK(write_blocks.numel() == n && write_offsets.numel() == n,
              "paged_decoder_layers: one write slot per token");
  if (panel_keys)
    check_key_panels(k_pools, v_pools.size(3), x.scalar_type() == torch::kBFloat16, d,
                     "paged_decoder_layers");
  auto blocks = as_int64(write_blocks);
  auto offsets = as_int64(write_offsets);
  const int64_t pool_layer_elems = v_pools.numel() / layers;
  auto run = [&](auto* xp, auto* kp, auto* vp) {
    decoder_layers(xp, stack.weights, layers, static_cast<float>(eps), cos, sin, n, x.size(1), hq,
                   hkv, d, intermediate, interleaved, kp, vp, pool_layer_elems, panel_keys,
                   v_pools.size(3), table.data_ptr<int32_t>(), table.size(1),
                   rows.data_ptr<int32_t>(), keys.data_ptr<int32_t>(), starts.data_ptr<int32_t>(),
                   starts.numel() - 1, blocks.data_ptr<int64_t>(), offsets.data_ptr<int64_t>());
  };
  TORCH_CHECK(k_pools.scalar_type() == x.scalar_type(), "paged_decoder_layers: pool dtype mismatch");
  if (x.scalar_type() == torch::kBFloat16) {
    run(x.data_ptr<at::BFloat16>(), k_pools.data_ptr<at::BFloat16>(), v_pools.data_ptr<at::BFloat16>());
  } else {
    run(x.data_ptr<float>(), k_pools.data_ptr<float>(), v_pools.data_ptr<float>());
  }
}

// A whole forward pass through the paged pool in one call: token embedding (or the given
// embeddings), rotary angles, every layer, the final norm and the output head for the rows in
// logits_at only: logits [1, M, vocab]. The same kernels the Python modules call, in the same
// order: the same bits. What it removes is ~10 Python-dispatched ops around the layers, which
// after a pass over 270 MB of weights run with cold caches (~0.3 ms a decode step).
torch::Tensor paged_decoder_forward(const LayerStack& stack, torch::Tensor token_ids,
                                    c10::optional<torch::Tensor> embeds, torch::Tensor positions,
                                    torch::Tensor inv_freq, c10::optional<torch::Tensor> logits_at,
                                    double eps, int64_t hq, int64_t hkv, int64_t d,
                                    int64_t intermediate, bool interleaved,
                                    torch::Tensor k_pools, torch::Tensor v_pools,
                                    torch::Tensor table, torch::Tensor rows, torch::Tensor keys,
                                    torch::Tensor starts, torch::Tensor write_blocks,
                                    torch::Tensor write_offsets) {
  // After a pass over the weights every ATen op meets cold caches (~10 µs each): the pass reads
  // its small inputs through pointers and allocates only its hidden rows and its logits.
  const auto& embedding = stack.embedding();
  const int64_t hidden = embedding.size(1);
  const auto ids = as_int64(token_ids);
  const int64_t n = ids.numel();
  TORCH_CHECK(positions.numel() == n, "paged_decoder_forward: one position per token");
  torch::Tensor x;
  if (embeds.has_value()) {
    TORCH_CHECK(embeds->numel() == n * hidden && embeds->scalar_type() == stack.dtype,
                "paged_decoder_forward: embeds [N, hidden] of the weights' dtype expected");
    x = embeds->reshape({n, hidden}).clone(at::MemoryFormat::Contiguous);
  } else {
    const int64_t* ip = ids.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK(ip[i] >= 0 && ip[i] < stack.vocab, "paged_decoder_forward: token id ", ip[i],
                  " outside [0, ", stack.vocab, ")");
    x = torch::empty({n, hidden}, embedding.options());
    const int64_t row_bytes = hidden * static_cast<int64_t>(embedding.element_size());
    const char* table = static_cast<const char*>(embedding.data_ptr());
    char* xp = static_cast<char*>(x.data_ptr());
    for (int64_t i = 0; i < n; ++i) std::memcpy(xp + i * row_bytes, table + ip[i] * row_bytes, row_bytes);
  }
  TORCH_CHECK(inv_freq.scalar_type() == torch::kFloat32 && inv_freq.dim() == 1 && inv_freq.is_contiguous() &&
              inv_freq.numel() == d / 2, "paged_decoder_forward: inv_freq [head_dim / 2] fp32 expected");
  const int64_t half = d / 2;
  std::vector<float> cos(n * half), sin(n * half);
  if (positions.scalar_type() == torch::kInt64 && positions.is_contiguous()) {  // as .to(fp32)
    const int64_t* pp = positions.data_ptr<int64_t>();
    angles_into(n, [&](int64_t t) { return static_cast<float>(pp[t]); }, inv_freq.data_ptr<float>(),
                half, cos.data(), sin.data());
  } else {
    const auto pos = positions.to(torch::kFloat32).contiguous();
    const float* pp = pos.data_ptr<float>();
    angles_into(n, [&](int64_t t) { return pp[t]; }, inv_freq.data_ptr<float>(), half, cos.data(),
                sin.data());
  }
  paged_decoder_layers_(x, stack, eps, cos.data(), sin.data(), hq, hkv, d, intermediate,
                        interleaved, k_pools, v_pools, table, rows, keys, starts, write_blocks,
                        write_offsets);
  std::vector<int64_t> picked;  // the rows whose logits are asked for, Python's negative indices too
  if (logits_at.has_value()) {
    const auto at = as_int64(*logits_at);
    const int64_t* ap = at.data_ptr<int64_t>();
    for (int64_t i = 0; i < at.numel(); ++i) {
      const int64_t r = ap[i] < 0 ? ap[i] + n : ap[i];
      TORCH_CHECK(r >= 0 && r < n, "paged_decoder_forward: logits_at outside the pass's ", n,
                  " tokens");
      picked.push_back(r);
    }
  } else {
    for (int64_t r = 0; r < n; ++r) picked.push_back(r);
  }
  const int64_t m = static_cast<int64_t>(picked.size());
  auto logits = torch::empty({1, m, stack.vocab}, x.options());  // the batch dim of [1, M, vocab]
  auto head = [&](auto* xp) {
    using T = std::remove_pointer_t<decltype(xp)>;
    std::vector<T> normed(m * hidden);
    std::vector<float> wide;
    const T* w = stack.final_norm().data_ptr<T>();
    for (int64_t i = 0; i < m; ++i)
      rms_norm_rows(xp + picked[i] * hidden, w, normed.data() + i * hidden, 1, hidden,
                    static_cast<float>(eps));
    linear_rows(normed.data(), m, hidden, stack.head(), nullptr, logits.data_ptr<T>(), stack.vocab,
                wide);
  };
  if (x.scalar_type() == torch::kBFloat16) {
    head(x.data_ptr<at::BFloat16>());
  } else {
    head(x.data_ptr<float>());
  }
  return logits;
}

// The long calls release the GIL, so a server's event loop keeps running during a tick.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("pack_linear_weight", &pack_linear_weight, "pack a linear weight for packed_linear");
  m.def("cpu_has_bf16_dot", &cpu_has_bf16_dot, "bf16 linears use the CPU's bf16 dot product");
  m.def("key_panel_slots", &key_panel_slots,
        "slots per key panel of a pool with blocks of the given size (KVPool's key layout)");
  m.def("dot_attention", &dot_attention,
        "bf16 attention of this head size takes the bf16 dot-product kernel (its key layout)");
  m.def("wide_attention", [](bool on) { return g_wide_attention.exchange(on) && cpu_has_avx512(); },
        "decode attention in 16-lane vectors where the CPU has them (same bits); returns the old");
  m.def("packed_linear", &packed_linear, nogil, "batch-invariant linear over packed panels (AVX2/FMA)");
  py::class_<LayerStack>(m, "LayerStack", py::module_local())  // builds may coexist (A/B runs)
      .def("fresh", &LayerStack::fresh, "every source weight still has its storage and version");
  m.def("layer_stack", &layer_stack, "a decoder's weights, checked and arranged once");
  m.def("paged_decoder_forward", &paged_decoder_forward, nogil, "a whole paged forward pass, one call");
  m.def("paged_write_", &paged_write_, "store new K/V rows into the block pool, in place");
  m.def("paged_attention", &paged_attention, nogil, "ragged attention through block tables");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension, fp32 arithmetic");
  m.def("rotary_qkv_", &rotary_qkv_, "in-place rotary on the q and k heads of a fused qkv");
  m.def("rotary_angles", &rotary_angles, "cos/sin of rotary angles, per element in double");
  m.def("token_logprobs", &token_logprobs, "log-probability of one target per row of logits");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate/up projection");
}
