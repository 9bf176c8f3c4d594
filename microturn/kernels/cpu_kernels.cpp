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

#include <algorithm>
#include <array>
#include <cmath>
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
inline void store8(at::BFloat16* p, __m256 v) {
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, v);
  for (int j = 0; j < 8; ++j) p[j] = static_cast<at::BFloat16>(tmp[j]);
}

// ---- linear: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) over packed weight panels ----
//
// The weight is packed once into panels of 16 output columns, [panels][K][16]: a panel row
// is the 16 weights that multiply x[m, k]. Every output is ONE fp32 accumulator updated by a
// fused multiply-add for k = 0, 1, ..., K-1 in order, then the bias is added and the result
// rounded once. That arithmetic is the same for every tile shape below, so a row's result never
// depends on how many rows share the call or where it sits (batch invariance), at every M.
// Decode (M = 1) streams four panels at once (eight independent accumulator chains keep the
// FMA units and the memory system busy); larger M uses 6 x 16 tiles that reuse each loaded
// weight vector six times, blocked so the activation rows stay in L2.
// bf16 panels store columns j and 8 + j in one 32-bit word: one load and two bit operations
// give both fp32 vectors.
constexpr int64_t PANEL = 16;
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

template <int MR, int P, typename W>
inline void panel_tile(const float* x, int64_t ldx, const W* panel, int64_t panel_stride,
                       int64_t k, float* tile) {
  constexpr int ACC = MR * P * 2;
  __m256 acc[ACC];
#pragma GCC unroll 24
  for (int a = 0; a < ACC; ++a) acc[a] = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    __m256 w[2 * P];
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) load_panel_row(panel + p * panel_stride + i * PANEL, w[2 * p], w[2 * p + 1]);
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

template <int MR, int P, typename W, typename Out>
inline void panel_block(const float* x, int64_t k, const W* panels, int64_t first_panel,
                        const float* bias, Out* y, int64_t n) {
  float tile[MR * P * PANEL];
  panel_tile<MR, P>(x, k, panels + first_panel * k * PANEL, k * PANEL, k, tile);
  for (int m = 0; m < MR; ++m)
    for (int64_t j = 0; j < P * PANEL; ++j) {
      const int64_t col = first_panel * PANEL + j;
      if (col < n) y[m * n + col] = static_cast<Out>(tile[m * P * PANEL + j] + (bias ? bias[col] : 0.0f));
    }
}

template <typename W, typename Out>
void packed_rows(const float* x, const W* panels, const float* bias, Out* y, int64_t m,
                 int64_t n, int64_t k) {
  const int64_t num_panels = (n + PANEL - 1) / PANEL;
  if (m == 1) {
    const int64_t groups = (num_panels + 3) / 4;
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        if (4 * g + 4 <= num_panels) {
          panel_block<1, 4>(x, k, panels, 4 * g, bias, y, n);
        } else {
          for (int64_t p = 4 * g; p < num_panels; ++p) panel_block<1, 1>(x, k, panels, p, bias, y, n);
        }
      }
    });
    return;
  }
  for (int64_t m0 = 0; m0 < m; m0 += ROW_CHUNK) {
    const int64_t rows = std::min(ROW_CHUNK, m - m0);
    at::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        int64_t r = 0;
        for (; r + 6 <= rows; r += 6)
          panel_block<6, 1>(x + (m0 + r) * k, k, panels, p, bias, y + (m0 + r) * n, n);
        const float* xr = x + (m0 + r) * k;
        Out* yr = y + (m0 + r) * n;
        switch (rows - r) {
          case 5: panel_block<5, 1>(xr, k, panels, p, bias, yr, n); break;
          case 4: panel_block<4, 1>(xr, k, panels, p, bias, yr, n); break;
          case 3: panel_block<3, 1>(xr, k, panels, p, bias, yr, n); break;
          case 2: panel_block<2, 1>(xr, k, panels, p, bias, yr, n); break;
          case 1: panel_block<1, 1>(xr, k, panels, p, bias, yr, n); break;
          default: break;
        }
      }
    });
  }
}

// exp(x) for 8 lanes (Cephes' single-precision polynomial, ~1 ulp): softmax spends most of its
// time in exp, and the scalar libm call costs more than the dot products around it.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f),
                                              _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i pow2 = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
}

// In place: x[s] = exp(x[s] - top) / sum, in slot order (the sum is sequential over 8-lane
// partial sums, a fixed order that depends only on n).
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

inline void softmax_inplace(float* x, int64_t n) {
  const float top = max_of(x, n);
  const __m256 shift = _mm256_set1_ps(top);
  __m256 lanes = _mm256_setzero_ps();
  int64_t s = 0;
  for (; s + 8 <= n; s += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + s), shift));
    _mm256_storeu_ps(x + s, e);
    lanes = _mm256_add_ps(lanes, e);
  }
  float total = horizontal_sum(lanes);
  for (; s < n; ++s) total += (x[s] = std::exp(x[s] - top));
  const __m256 inv = _mm256_set1_ps(1.0f / total);
  for (s = 0; s + 8 <= n; s += 8) _mm256_storeu_ps(x + s, _mm256_mul_ps(_mm256_loadu_ps(x + s), inv));
  for (; s < n; ++s) x[s] *= 1.0f / total;
}

// ---- attention: every query's arithmetic is fixed, whatever shares its pass ----
//
// A work item is one kv head of one sequence and some of the query rows that read it (its
// query heads times the new tokens). Keys are read as 16-slot panels (the linear kernel's
// layout, so a score is its tile: one FMA chain over the head dimension): straight from a
// block pool that stores them so, else gathered and transposed once per item. Values are
// read as rows, in place, widened in registers.
// Then per query row r, seeing its first n_r slots:
//   scores[r, s] = q_r . k_s                          (FMA chain over d, for every s)
//   p[r, 0:n_r] = softmax(scores[r, 0:n_r])           (max; exp-sum in an order fixed by n_r)
//   out[r] = sum_{s < n_r} p[r, s] v_s                (FMA chain over s, per channel)
// Tiles only decide which products share registers, never an output's order of operations, so
// a token's result is the same bits in a 200-token prefill, in a decode step, alone or in a
// batch of sessions. Slots a row does not see get p = 0, and fma(0, v, acc) == acc exactly.
struct AttentionScratch {
  std::vector<float> k_panels, scores, queries;
  std::vector<const void*> panels, runs;  // per 16-slot panel / per run of value rows
  std::vector<int64_t> run_lengths;
};

// Gathered keys (row-major [span][d], fp32) -> fp32 panels in w.k_panels, listed in w.panels.
inline void pack_key_panels(const float* keys, int64_t span, int64_t d, AttentionScratch& w) {
  const int64_t panels = (span + PANEL - 1) / PANEL;
  w.k_panels.assign(panels * d * PANEL, 0.0f);
  for (int64_t s = 0; s < span; ++s) {
    float* panel = w.k_panels.data() + (s / PANEL) * d * PANEL + s % PANEL;
    for (int64_t j = 0; j < d; ++j) panel[j * PANEL] = keys[s * d + j];
  }
  w.panels.resize(panels);
  for (int64_t p = 0; p < panels; ++p) w.panels[p] = w.k_panels.data() + p * d * PANEL;
}

template <int MR, typename PT>
inline void score_block(const AttentionScratch& w, const float* q, int64_t d, float* scores,
                        int64_t lds) {
  float tile[MR * PANEL];
  for (size_t p = 0; p < w.panels.size(); ++p) {
    panel_tile<MR, 1>(q, d, static_cast<const PT*>(w.panels[p]), 0, d, tile);
    for (int m = 0; m < MR; ++m)
      std::copy(tile + m * PANEL, tile + (m + 1) * PANEL, scores + m * lds + p * PANEL);
  }
}

// out[m][j0 : j0 + 8 * C] += sum_s p[m][s] v[s][j0 : ...] for MR rows over the value runs
// [run_begin, run_end) (first slot s0), in slot order. The caller walks the history in chunks
// that fit in L1 and keeps the partial sums in `out` between chunks: storing and reloading an
// fp32 accumulator is exact, so the chain per output is the same as in one pass.
template <int MR, int C, typename T>
inline void weighted_block(const AttentionScratch& w, const float* p, int64_t ldp, int64_t d,
                           int64_t j0, float* const* out, size_t run_begin, size_t run_end,
                           int64_t s0) {
  __m256 acc[MR * C];
#pragma GCC unroll 16
  for (int a = 0; a < MR * C; ++a) acc[a] = _mm256_loadu_ps(out[a / C] + j0 + 8 * (a % C));
  int64_t s = s0;
  for (size_t run = run_begin; run < run_end; ++run) {
    const T* v = static_cast<const T*>(w.runs[run]);
    for (int64_t i = 0; i < w.run_lengths[run]; ++i, ++s) {
      __m256 vv[C];
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) vv[c] = load8(v + i * d + j0 + 8 * c);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m256 ps = _mm256_broadcast_ss(p + m * ldp + s);
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) acc[m * C + c] = _mm256_fmadd_ps(ps, vv[c], acc[m * C + c]);
      }
    }
  }
#pragma GCC unroll 16
  for (int a = 0; a < MR * C; ++a) _mm256_storeu_ps(out[a / C] + j0 + 8 * (a % C), acc[a]);
}

template <int MR, typename T>
inline void weighted_rows(const AttentionScratch& w, const float* p, int64_t ldp, int64_t d,
                          float* const* out, size_t run_begin, size_t run_end, int64_t s0) {
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) weighted_block<MR, 2, T>(w, p, ldp, d, j, out, run_begin, run_end, s0);
  for (; j + 8 <= d; j += 8) weighted_block<MR, 1, T>(w, p, ldp, d, j, out, run_begin, run_end, s0);
  for (; j < d; ++j)
    for (int m = 0; m < MR; ++m) {
      float acc = out[m][j];
      int64_t s = s0;
      for (size_t run = run_begin; run < run_end; ++run) {
        const T* v = static_cast<const T*>(w.runs[run]);
        for (int64_t i = 0; i < w.run_lengths[run]; ++i, ++s)
          acc = std::fma(p[m * ldp + s], static_cast<float>(v[i * d + j]), acc);
      }
      out[m][j] = acc;
    }
}

constexpr int64_t VALUE_CHUNK = 128;  // slots of values per pass (32 KiB of fp32 at d = 64)

// Contiguous value rows [span][d] as runs of VALUE_CHUNK slots.
template <typename T>
inline void split_runs(AttentionScratch& w, const T* values, int64_t span, int64_t d) {
  w.runs.clear();
  w.run_lengths.clear();
  for (int64_t s0 = 0; s0 < span; s0 += VALUE_CHUNK) {
    w.runs.push_back(values + s0 * d);
    w.run_lengths.push_back(std::min(VALUE_CHUNK, span - s0));
  }
}

// Query rows w.queries[r] (pre-scaled, fp32), each seeing its first n_keys[r] of the `span`
// history slots: keys in w.panels (of type PT), values in w.runs (of type T). Writes out[r].
template <typename PT, typename T>
void attend_item(AttentionScratch& w, int64_t rows, const int64_t* n_keys, float* const* out,
                 int64_t span, int64_t d) {
  const int64_t lds = static_cast<int64_t>(w.panels.size()) * PANEL;
  w.scores.resize(rows * lds);
  const float* q = w.queries.data();
  float* sc = w.scores.data();
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) score_block<6, PT>(w, q + r * d, d, sc + r * lds, lds);
  switch (rows - r) {
    case 5: score_block<5, PT>(w, q + r * d, d, sc + r * lds, lds); break;
    case 4: score_block<4, PT>(w, q + r * d, d, sc + r * lds, lds); break;
    case 3: score_block<3, PT>(w, q + r * d, d, sc + r * lds, lds); break;
    case 2: score_block<2, PT>(w, q + r * d, d, sc + r * lds, lds); break;
    case 1: score_block<1, PT>(w, q + r * d, d, sc + r * lds, lds); break;
    default: break;
  }
  for (r = 0; r < rows; ++r) {
    softmax_inplace(sc + r * lds, n_keys[r]);
    std::fill(sc + r * lds + n_keys[r], sc + r * lds + span, 0.0f);
  }
  for (r = 0; r < rows; ++r) std::fill(out[r], out[r] + d, 0.0f);
  size_t run = 0;
  for (int64_t s0 = 0; run < w.runs.size();) {  // value chunks of about VALUE_CHUNK slots
    size_t run_end = run;
    int64_t s1 = s0;
    while (run_end < w.runs.size() && (run_end == run || s1 - s0 + w.run_lengths[run_end] <= VALUE_CHUNK))
      s1 += w.run_lengths[run_end++];
    // 6 rows x 16 channels per register tile: each value vector loaded serves six rows
    for (r = 0; r + 6 <= rows; r += 6) weighted_rows<6, T>(w, sc + r * lds, lds, d, out + r, run, run_end, s0);
    switch (rows - r) {
      case 5: weighted_rows<5, T>(w, sc + r * lds, lds, d, out + r, run, run_end, s0); break;
      case 4: weighted_rows<4, T>(w, sc + r * lds, lds, d, out + r, run, run_end, s0); break;
      case 3: weighted_rows<3, T>(w, sc + r * lds, lds, d, out + r, run, run_end, s0); break;
      case 2: weighted_rows<2, T>(w, sc + r * lds, lds, d, out + r, run, run_end, s0); break;
      case 1: weighted_rows<1, T>(w, sc + r * lds, lds, d, out + r, run, run_end, s0); break;
      default: break;
    }
    run = run_end;
    s0 = s1;
  }
}

inline void widen(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }

inline void widen(const at::BFloat16* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(dst + j, load8(src + j));
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

}  // namespace

// Attention of q [B, Hq, T, D] over a KV buffer [B, Hkv, capacity, D] whose first
// `start + T` slots are filled; query t sits at slot start + t and sees slots [0, start + t].
// Item = (batch row, kv head), the same steps as the paged kernel.
torch::Tensor cached_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               int64_t start) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4, "cached_attention: 4-D tensors expected");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3) &&
              v_cache.strides() == k_cache.strides(), "cached_attention: rows must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "cached_attention: dtype mismatch");
  const int64_t b = q.size(0), hq = q.size(1), t = q.size(2), d = q.size(3);
  const int64_t hkv = k_cache.size(1), group = hq / hkv, span = start + t;
  TORCH_CHECK(span <= k_cache.size(2), "cached_attention: slots past the buffer");
  auto q32 = (q.to(torch::kFloat32) * (1.0 / std::sqrt(static_cast<double>(d)))).contiguous();
  auto out = torch::empty({b, hq, t, d}, torch::kFloat32);
  const float* qp = q32.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t sb = k_cache.stride(0), sh = k_cache.stride(1);
  auto body = [&](auto* kp, auto* vp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(kp)>>;
    at::parallel_for(0, b * hkv, 1, [&](int64_t begin, int64_t end) {
      AttentionScratch w;
      std::vector<float> keys;
      std::vector<int64_t> n_keys(group * t);
      std::vector<float*> outs(group * t);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bi = item / hkv, kv = item % hkv, offset = bi * sb + kv * sh;
        keys.resize(span * d);
        widen(kp + offset, keys.data(), span * d);
        pack_key_panels(keys.data(), span, d, w);
        w.queries.resize(group * t * d);
        for (int64_t r = 0; r < group * t; ++r) {  // row r = (token r / group, head r % group)
          const int64_t ti = r / group, h = kv * group + r % group;
          const float* src = qp + ((bi * hq + h) * t + ti) * d;
          std::copy(src, src + d, w.queries.data() + r * d);
          n_keys[r] = start + ti + 1;
          outs[r] = op + ((bi * hq + h) * t + ti) * d;
        }
        split_runs(w, vp + offset, span, d);  // values read in place
        attend_item<float, T>(w, group * t, n_keys.data(), outs.data(), span, d);
      }
    });
  };
  if (q.scalar_type() == torch::kBFloat16) {
    body(k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>());
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kFloat32, "cached_attention: fp32 or bf16 only");
    body(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  }
  return out.to(q.scalar_type());
}

namespace {

// Ragged attention through block tables. The batch holds segments: segment g is tokens
// [starts[g], starts[g+1]) of one session, at consecutive slots; token i sees that session's
// first keys[i] slots (slot s lives in block table[row][s / bs] at offset s % bs).
// Item = (segment, kv head): the history is gathered and widened once for every query that
// reads it (the kv head's query heads times the segment's tokens).
template <typename T>
void paged_segments(const float* q, const T* k_pool, bool panel_keys, const T* v_pool,
                    const int32_t* table, int64_t table_width, const int32_t* rows,
                    const int32_t* keys, const int32_t* starts, int64_t segments, float* out,
                    int64_t hq, int64_t hkv, int64_t bs, int64_t d) {
  const int64_t group = hq / hkv;
  // work unit = (segment, kv head, up to UNIT_ROWS of its query rows): a 20-token input slice
  // splits into several units so both cores stay busy even with a single session (12 rows
  // measured 10-15 % faster than 24 at 8k slots: better balance, scores stay in L2)
  constexpr int64_t UNIT_ROWS = 12;
  std::vector<std::array<int64_t, 4>> units;  // segment, kv head, first row, end row
  for (int64_t g = 0; g < segments; ++g)
    for (int64_t kv = 0; kv < hkv; ++kv)
      for (int64_t r0 = 0; r0 < (starts[g + 1] - starts[g]) * group; r0 += UNIT_ROWS)
        units.push_back({g, kv, r0, std::min(r0 + UNIT_ROWS, (starts[g + 1] - starts[g]) * group)});
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t begin, int64_t end) {
    AttentionScratch w;
    std::vector<float> k_rows;
    std::vector<int64_t> n_keys;
    std::vector<float*> outs;
    for (int64_t u = begin; u < end; ++u) {
      const int64_t g = units[u][0], kv = units[u][1], r_first = units[u][2], r_end = units[u][3];
      const int64_t first = starts[g];
      const int32_t* blocks = table + rows[first] * table_width;
      // keys seen by the unit's last row (rows are token-major: later rows see more)
      const int64_t span = keys[first + (r_end - 1) / group];
      auto block_base = [&](int64_t s0) {
        return (static_cast<int64_t>(blocks[s0 / bs]) * hkv + kv) * bs * d;
      };
      if (panel_keys) {  // the pool already holds 16-slot key panels: read them in place
        w.panels.resize((span + PANEL - 1) / PANEL);
        for (int64_t p = 0; p < static_cast<int64_t>(w.panels.size()); ++p)
          w.panels[p] = k_pool + block_base(p * PANEL) + (p * PANEL % bs) * d;
      } else {
        k_rows.resize(span * d);
        for (int64_t s0 = 0; s0 < span; s0 += bs)
          widen(k_pool + block_base(s0), k_rows.data() + s0 * d, std::min(bs, span - s0) * d);
        pack_key_panels(k_rows.data(), span, d, w);
      }
      const int64_t n = r_end - r_first;
      w.queries.resize(n * d);
      n_keys.resize(n);
      outs.resize(n);
      for (int64_t r = 0; r < n; ++r) {  // query (t, hh) is row t * group + hh
        const int64_t token = first + (r_first + r) / group;
        const int64_t head = kv * group + (r_first + r) % group;
        const float* src = q + (token * hq + head) * d;
        std::copy(src, src + d, w.queries.data() + r * d);
        n_keys[r] = keys[token];
        outs[r] = out + (token * hq + head) * d;
      }
      // values are read in place, block by block (widened in registers)
      w.runs.clear();
      w.run_lengths.clear();
      for (int64_t s0 = 0; s0 < span; s0 += bs) {
        w.runs.push_back(v_pool + block_base(s0));
        w.run_lengths.push_back(std::min(bs, span - s0));
      }
      if (panel_keys) {
        attend_item<T, T>(w, n, n_keys.data(), outs.data(), span, d);
      } else {
        attend_item<float, T>(w, n, n_keys.data(), outs.data(), span, d);
      }
    }
  });
}

}  // namespace

// [N, K] weight -> [ceil(N / 16), K, 16] panels (zero-padded columns), same dtype.
torch::Tensor pack_linear_weight(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2, "pack_linear_weight: weight must be 2-D");
  const int64_t n = w.size(0), k = w.size(1), num_panels = (n + PANEL - 1) / PANEL;
  auto padded = torch::zeros({num_panels * PANEL, k}, w.options());
  padded.narrow(0, 0, n).copy_(w);
  // [panels, 16, K] -> [panels, K, 16]
  auto panels = padded.view({num_panels, PANEL, k}).transpose(1, 2);
  if (w.scalar_type() == torch::kBFloat16)  // word j holds columns j (low half) and 8 + j
    panels = panels.view({num_panels, k, 2, 8}).transpose(2, 3);
  return panels.contiguous().view({num_panels, k, PANEL});
}

torch::Tensor packed_linear(torch::Tensor x, torch::Tensor panels, int64_t n,
                            c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.device().is_cpu() && panels.device().is_cpu(), "packed_linear: CPU tensors only");
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == PANEL && panels.is_contiguous() &&
              panels.size(0) == (n + PANEL - 1) / PANEL, "packed_linear: panels from pack_linear_weight expected");
  const int64_t k = panels.size(1);
  TORCH_CHECK(x.size(-1) == k, "packed_linear: x has ", x.size(-1), " features, weight ", k);
  auto out_shape = x.sizes().vec();
  out_shape.back() = n;
  auto x32 = x.reshape({-1, k}).to(torch::kFloat32).contiguous();
  const int64_t m = x32.size(0);
  auto y = torch::empty({m, n}, x.options());
  torch::Tensor b32;
  if (bias.has_value()) b32 = bias->to(torch::kFloat32).contiguous();
  const float* bp = bias.has_value() ? b32.data_ptr<float>() : nullptr;
  const float* xp = x32.data_ptr<float>();
  if (panels.scalar_type() == torch::kBFloat16 && x.scalar_type() == torch::kBFloat16) {
    packed_rows(xp, panels.data_ptr<at::BFloat16>(), bp, y.data_ptr<at::BFloat16>(), m, n, k);
  } else if (panels.scalar_type() == torch::kFloat32 && x.scalar_type() == torch::kFloat32) {
    packed_rows(xp, panels.data_ptr<float>(), bp, y.data_ptr<float>(), m, n, k);
  } else {
    TORCH_CHECK(false, "packed_linear: x and weight must both be fp32 or both bf16");
  }
  return y.view(out_shape);
}

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                              torch::Tensor table, torch::Tensor rows, torch::Tensor keys,
                              torch::Tensor starts) {
  TORCH_CHECK(q.dim() == 3 && (k_pool.dim() == 4 || k_pool.dim() == 5) && v_pool.dim() == 4,
              "paged_attention: q [N, Hq, D]; values [NB, Hkv, BS, D]; keys the same or in "
              "16-slot panels [NB, Hkv, BS / 16, D, 16]");
  const bool panel_keys = k_pool.dim() == 5;
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && table.is_contiguous(),
              "paged_attention: pool and table must be contiguous");
  for (const auto& t : {table, rows, keys, starts})
    TORCH_CHECK(t.scalar_type() == torch::kInt32 && t.is_contiguous(),
                "paged_attention: contiguous int32 metadata expected");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type(), "paged_attention: dtype mismatch");
  const int64_t n = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t hkv = v_pool.size(1), bs = v_pool.size(2), segments = starts.numel() - 1;
  TORCH_CHECK(!panel_keys || (k_pool.size(2) * PANEL == bs && k_pool.size(4) == PANEL),
              "paged_attention: key panels do not match the value blocks");
  TORCH_CHECK(segments >= 0 && (segments == 0 || starts.data_ptr<int32_t>()[segments] == n),
              "paged_attention: segment starts must end at the token count");
  auto q32 = (q.to(torch::kFloat32) * (1.0 / std::sqrt(static_cast<double>(d)))).contiguous();
  auto out = torch::empty({n, hq, d}, torch::kFloat32);
  if (q.scalar_type() == torch::kBFloat16) {
    paged_segments(q32.data_ptr<float>(), k_pool.data_ptr<at::BFloat16>(), panel_keys,
                   v_pool.data_ptr<at::BFloat16>(), table.data_ptr<int32_t>(), table.size(1),
                   rows.data_ptr<int32_t>(), keys.data_ptr<int32_t>(), starts.data_ptr<int32_t>(),
                   segments, out.data_ptr<float>(), hq, hkv, bs, d);
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kFloat32, "paged_attention: fp32 or bf16 only");
    paged_segments(q32.data_ptr<float>(), k_pool.data_ptr<float>(), panel_keys,
                   v_pool.data_ptr<float>(),
                   table.data_ptr<int32_t>(), table.size(1), rows.data_ptr<int32_t>(),
                   keys.data_ptr<int32_t>(), starts.data_ptr<int32_t>(), segments,
                   out.data_ptr<float>(), hq, hkv, bs, d);
  }
  return out.to(q.scalar_type());
}

// Store the K/V rows [N, Hkv, D] of N new tokens at (block, offset) of the pool, in place:
// values as rows, keys as rows or (5-D pool) into their 16-slot panel column.
template <typename T>
void write_rows(T* k_pool, T* v_pool, bool panel_keys, const T* k, const T* v,
                const int64_t* blocks, const int64_t* offsets, int64_t n, int64_t hkv, int64_t bs,
                int64_t d) {
  const bool paired = std::is_same_v<T, at::BFloat16>;  // bf16 panels pair slots j and 8 + j
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < hkv; ++h) {
      const int64_t base = (blocks[i] * hkv + h) * bs * d, off = offsets[i];
      const T* k_row = k + (i * hkv + h) * d;
      const T* v_row = v + (i * hkv + h) * d;
      std::copy(v_row, v_row + d, v_pool + base + off * d);
      if (panel_keys) {
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
  if (k.scalar_type() == torch::kBFloat16) {
    write_rows(k_pool.data_ptr<at::BFloat16>(), v_pool.data_ptr<at::BFloat16>(), panel_keys,
               kc.data_ptr<at::BFloat16>(), vc.data_ptr<at::BFloat16>(), b.data_ptr<int64_t>(),
               o.data_ptr<int64_t>(), n, hkv, bs, d);
  } else {
    TORCH_CHECK(k.scalar_type() == torch::kFloat32, "paged_write_: fp32 or bf16 only");
    write_rows(k_pool.data_ptr<float>(), v_pool.data_ptr<float>(), panel_keys,
               kc.data_ptr<float>(), vc.data_ptr<float>(), b.data_ptr<int64_t>(),
               o.data_ptr<int64_t>(), n, hkv, bs, d);
  }
}

// The small element-wise steps of a layer, one call each instead of 3-10 torch ops (at decode
// sizes each torch op costs more in dispatch than in arithmetic). All arithmetic in fp32.

template <typename T>
void rms_norm_rows(const T* x, const T* w, T* out, int64_t rows, int64_t d, float eps) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * d;
      float sq = 0.0f;
      for (int64_t j = 0; j < d; ++j) sq += static_cast<float>(row[j]) * static_cast<float>(row[j]);
      const float scale = 1.0f / std::sqrt(sq / static_cast<float>(d) + eps);
      for (int64_t j = 0; j < d; ++j)
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

// Rotate, in place, the q and k heads inside a fused qkv projection [tokens, (hq + 2 hkv) * d]
// by the angles cos/sin [tokens, d / 2] (fp32). interleaved pairs (2i, 2i+1); else (i, i + d/2).
template <typename T>
void rotary_rows(T* qkv, const float* cos, const float* sin, int64_t tokens, int64_t heads,
                 int64_t width, int64_t d, bool interleaved) {
  const int64_t half = d / 2;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos + t * half;
      const float* s = sin + t * half;
      for (int64_t h = 0; h < heads; ++h) {
        T* x = qkv + t * width + h * d;
        for (int64_t i = 0; i < half; ++i) {
          const int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
          const float x1 = static_cast<float>(x[a]), x2 = static_cast<float>(x[b]);
          x[a] = static_cast<T>(x1 * c[i] - x2 * s[i]);
          x[b] = static_cast<T>(x2 * c[i] + x1 * s[i]);
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

// silu(gate) * up for a fused [.., 2 * f] gate/up projection -> [.., f]. 8 lanes at a time
// with exp8; a column's arithmetic is the same in every row (so it is batch invariant).
template <typename T>
void silu_mul_rows(const T* x, T* out, int64_t rows, int64_t f) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = x + r * 2 * f;
      const T* up = gate + f;
      int64_t j = 0;
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
  const float* fp = f.data_ptr<float>();
  float* cp = cos.data_ptr<float>();
  float* sp = sin.data_ptr<float>();
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(pp[t] * fp[i]);
      cp[t * half + i] = static_cast<float>(std::cos(angle));
      sp[t * half + i] = static_cast<float>(std::sin(angle));
    }
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

// All decoder layers of one pass through the paged KV pool, in one call: the same kernels in
// the same order as the Python layer loop (so the same bits), without ~15 Python-dispatched
// calls per layer. weights: per layer [input norm, qkv panels, qkv bias or empty, o panels,
// post-attention norm, gate/up panels, down panels]; x [N, hidden].
torch::Tensor paged_decoder_layers(torch::Tensor x, std::vector<torch::Tensor> weights,
                                   double eps, torch::Tensor cos, torch::Tensor sin,
                                   int64_t hq, int64_t hkv, int64_t d, int64_t intermediate,
                                   bool interleaved, torch::Tensor k_pools, torch::Tensor v_pools,
                                   torch::Tensor table, torch::Tensor rows, torch::Tensor keys,
                                   torch::Tensor starts, torch::Tensor write_blocks,
                                   torch::Tensor write_offsets) {
  TORCH_CHECK(weights.size() % 7 == 0 && x.dim() == 2, "paged_decoder_layers: bad arguments");
  const int64_t layers = static_cast<int64_t>(weights.size()) / 7, n = x.size(0);
  const int64_t hidden = x.size(1), q_size = hq * d, kv_size = hkv * d;
  for (int64_t l = 0; l < layers; ++l) {
    const torch::Tensor* w = weights.data() + 7 * l;
    c10::optional<torch::Tensor> bias;
    if (w[2].numel()) bias = w[2];
    auto qkv = packed_linear(rms_norm(x, w[0], eps), w[1], q_size + 2 * kv_size, bias);
    rotary_qkv_(qkv, cos, sin, hq, hkv, d, interleaved);
    auto k_pool = k_pools[l], v_pool = v_pools[l];
    paged_write_(k_pool, v_pool, qkv.narrow(1, q_size, kv_size).reshape({n, hkv, d}),
                 qkv.narrow(1, q_size + kv_size, kv_size).reshape({n, hkv, d}), write_blocks,
                 write_offsets);
    auto attended = paged_attention(qkv.narrow(1, 0, q_size).reshape({n, hq, d}), k_pool,
                                    v_pool, table, rows, keys, starts);
    x = x + packed_linear(attended.view({n, q_size}), w[3], hidden, c10::nullopt);
    auto gate_up = packed_linear(rms_norm(x, w[4], eps), w[5], 2 * intermediate, c10::nullopt);
    x = x + packed_linear(silu_mul(gate_up), w[6], hidden, c10::nullopt);
  }
  return x;
}

// The long calls release the GIL, so a server's event loop keeps running during a tick.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("pack_linear_weight", &pack_linear_weight, "pack a linear weight into 16-column panels");
  m.def("packed_linear", &packed_linear, nogil, "batch-invariant linear over packed panels (AVX2/FMA)");
  m.def("cached_attention", &cached_attention, nogil, "attention over an in-place KV buffer");
  m.def("paged_decoder_layers", &paged_decoder_layers, nogil, "all layers of a paged pass, one call");
  m.def("paged_write_", &paged_write_, "store new K/V rows into the block pool, in place");
  m.def("paged_attention", &paged_attention, nogil, "ragged attention through block tables");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension, fp32 arithmetic");
  m.def("rotary_qkv_", &rotary_qkv_, "in-place rotary on the q and k heads of a fused qkv");
  m.def("rotary_angles", &rotary_angles, "cos/sin of rotary angles, per element in double");
  m.def("token_logprobs", &token_logprobs, "log-probability of one target per row of logits");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate/up projection");
}
