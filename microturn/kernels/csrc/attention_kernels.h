// Attention arithmetic: every query's scores, softmax and values in a fixed order, in 8 or 16
// lanes and with bf16 dot products where the CPU has them.
#pragma once
#include "linear.h"

namespace {

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
constexpr int64_t CHUNK = 256;     // slots per online-softmax step (fewer steps than 128: 2-7 % faster prefill)
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

}  // namespace
namespace microturn {
inline std::atomic<bool> g_wide_attention{true};  // tests switch it off to compare the two
}  // namespace microturn
namespace {

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
template <int MR, int C, bool Stream, bool Fresh = false>
MICROTURN_DOT_TARGET inline void value_block_dot(const uint32_t* p, int64_t ldp,
                                                 const uint16_t* const* rows, int64_t j0,
                                                 float* acc, int64_t d, int64_t from, int64_t to,
                                                 StreamAhead* stream) {
  __m512 a[MR][C];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < C; ++c)
      a[m][c] = Fresh ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + m * d + j0 + 16 * c);
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

// (Fresh: acc's rows start from zero, not from what they hold: a split's first chunk, whose
// accumulators then need no zeroing first: the same sums, as 0 + x is x)
template <int MR, bool Fresh = false>
MICROTURN_DOT_TARGET inline void value_rows_dot(const uint32_t* p, int64_t ldp,
                                                const uint16_t* const* rows, float* acc,
                                                int64_t d, int64_t from, int64_t to,
                                                StreamAhead* stream) {
  auto blocks = [&](auto streamed) {
    constexpr bool S = decltype(streamed)::value;
    int64_t j = 0;  // d is a multiple of 16
    for (; j + 64 <= d; j += 64)
      value_block_dot<MR, 4, S, Fresh>(p, ldp, rows, j, acc, d, from, to, stream);
    for (; j < d; j += 16) value_block_dot<MR, 1, S, Fresh>(p, ldp, rows, j, acc, d, from, to, stream);
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
  int64_t j = 0;
  // 32 at a time: one conversion of two vectors to bf16 where two took one each (they were the
  // loop's bottleneck), the sum still added vector by vector in order
  for (; j + 32 <= valid; j += 32) {
    const __m512 e0 = exp2_dot(_mm512_fmadd_ps(_mm512_loadu_ps(s + j), log2e, shift));
    const __m512 e1 = exp2_dot(_mm512_fmadd_ps(_mm512_loadu_ps(s + j + 16), log2e, shift));
    sum = _mm512_add_ps(_mm512_add_ps(sum, e0), e1);
    _mm512_storeu_si512(p + j, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
  }
  for (; j < valid; j += 16) {
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
  // more rows run a chunk a row tile at a time (row_tiles_through)
  bool through_row_tiles() const { return !keys_first(); }

  MICROTURN_DOT_TARGET void start(const float* q) {
    const int64_t d = h.d;
    ld = keys_first() ? (s_end - s_begin + CHUNK - 1) / CHUNK * CHUNK : CHUNK;
    w.scores.resize(rows * ld);
    w.probs.resize(rows * ld);
    w.rescale.resize(rows * (ld / CHUNK));
    w.query_pairs.resize(rows * d);
    if (!h.panel_keys) w.key_panels.resize(CHUNK * d);
    if (!through_row_tiles()) std::fill(acc, acc + rows * d, 0.0f);
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

  // The key panels of the chunk at c0 (n slots): each panel's address once a chunk (a pool
  // panel's takes four integer divisions), not once for every row tile that reads it; a pool
  // of key rows has them copied into panels of channel pairs first. Returns the pair stride.
  MICROTURN_DOT_TARGET int64_t key_panels_of(int64_t c0, int64_t n, const uint16_t** panel_ptr) {
    const int64_t d = h.d, pairs = d / 2, panels = (n + PANEL - 1) / PANEL;
    const auto* k_pool = reinterpret_cast<const uint16_t*>(h.k);
    if (h.panel_keys) {
      for (int64_t p = 0; p < panels; ++p) panel_ptr[p] = k_pool + h.key_panel(c0 + p * PANEL);
      return 2 * h.key_width;
    }
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
    for (int64_t p = 0; p < panels; ++p) panel_ptr[p] = w.key_panels.data() + p * d * PANEL;
    return 2 * PANEL;
  }

  // the scores of the chunk at c0, into scores + (c0 - s_begin) % ld
  MICROTURN_DOT_TARGET void scores(int64_t c0) {
    const int64_t pairs = h.d / 2;
    const int64_t n = std::min(CHUNK, s_end - c0), panels = (n + PANEL - 1) / PANEL;
    const int64_t first = first_row(c0);
    const uint16_t* panel_ptr[CHUNK / PANEL];
    const int64_t pair_stride = key_panels_of(c0, n, panel_ptr);
    auto panel_at = [&](int64_t p) { return panel_ptr[p]; };
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

  // Chunk by chunk: the chunk at c0 a row tile at a time, its scores, softmax and values while
  // they are in L1 (all rows' scores first made the softmax read them back from L2). Each row's
  // operations and their order are those of scores(), softmax() and values(), so its bits.
  MICROTURN_DOT_TARGET void row_tiles_through(int64_t c0) {
    const int64_t d = h.d, pairs = d / 2;
    const int64_t n = std::min(CHUNK, s_end - c0), panels = (n + PANEL - 1) / PANEL;
    const int64_t first = first_row(c0);
    const uint16_t* value_row[CHUNK];
    find_value_rows(c0, n, value_row);
    const uint16_t* panel_ptr[CHUNK / PANEL];
    const int64_t pair_stride = key_panels_of(c0, n, panel_ptr);
    auto panel_at = [&](int64_t p) { return panel_ptr[p]; };
    const auto* qp = reinterpret_cast<const uint32_t*>(w.query_pairs.data());
    float* sc = w.scores.data();  // one tile's rows, reused by every tile
    uint16_t* probs = w.probs.data();
    const auto* pp = reinterpret_cast<const uint32_t*>(probs);
    const int64_t ldp = CHUNK / 2;
    row_tiles(first, rows, [&](auto mr, int64_t r) {
      constexpr int MR = decltype(mr)::value;
      StreamAhead* lead = r == first ? stream : nullptr;
      key_rows_dot<MR>(qp + r * pairs, pairs, pairs, panel_at, pair_stride, panels, sc, CHUNK,
                       lead);
      for (int64_t i = 0; i < MR; ++i) {
        const int64_t valid = std::min(n_keys[r + i] - c0, n);
        const float* row = sc + i * CHUNK;
        rescale(raise_row_max(max_of(row, valid), row_max[r + i], row_sum[r + i]),
                acc + (r + i) * d, d);
        row_sum[r + i] += softmax_chunk_dot(row, valid, row_max[r + i], probs + i * CHUNK);
      }
      // the tile's rows over the slot pairs they all see, then each row's own remainder
      const int64_t common = std::min(n_keys[r] - c0, n) / 2 * 2;
      if (c0 == s_begin) {  // every row sees the split's first slot: all start here
        value_rows_dot<MR, true>(pp, ldp, value_row, acc + r * d, d, 0, common, lead);
      } else {
        value_rows_dot<MR>(pp, ldp, value_row, acc + r * d, d, 0, common, lead);
      }
      for (int64_t i = 0; i < MR; ++i) {
        const int64_t valid = std::min(n_keys[r + i] - c0, n);
        if (valid > common)
          value_rows_dot<1>(pp + i * ldp, ldp, value_row, acc + (r + i) * d, d, common, valid,
                            nullptr);
      }
    });
  }
};

// attend_split (below) with bf16 dot products: the same online softmax over the same chunks
MICROTURN_DOT_TARGET void attend_split_dot(const KvHead<at::BFloat16>& h, const float* q,
                                           const int64_t* n_keys, int64_t rows, int64_t s_begin,
                                           int64_t s_end, float* acc, float* row_max,
                                           float* row_sum, AttentionScratch& w) {
  DotSplit split{h, n_keys, rows, s_begin, s_end, acc, row_max, row_sum, w};
  split.start(q);
  if (split.through_row_tiles()) {
    for (int64_t c0 = s_begin; c0 < s_end; c0 += CHUNK) split.row_tiles_through(c0);
    return;
  }
  for (int64_t c0 = s_begin; c0 < s_end; c0 += CHUNK) {
    split.scores(c0);
    split.softmax(c0);
  }
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
      w.keys.resize(CHUNK * d);  // only a widening pass needs them: 128 KiB a thread, which a
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

}  // namespace
