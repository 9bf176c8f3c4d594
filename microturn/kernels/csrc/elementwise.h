// Element-wise steps of a layer (RMSNorm, rotary, SiLU-mul), rotary angles and token
// log-probabilities: the per-row templates the ops and the decoder pass share.
#pragma once
#include "attention_kernels.h"

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

// silu(gate) * up straight from a fused gate/up projection's tiles (bf16, dot-product
// packing, f a multiple of 64): a unit takes gate group g and up group g + f / 64 of one row
// block, rounds both to bf16 as the projection's store would, and runs silu_mul_wide on them:
// the bits of the projection followed by silu_mul_rows, without the [rows, 2f] buffer, its
// second pass and that pass's parallel region.
inline bool fused_silu_applies(const torch::Tensor& panels, int64_t f) {
  return dot_packed(panels) && f % DOT_COLS == 0 && cpu_has_avx512();
}

template <int MR>
MICROTURN_DOT_TARGET void dot_block_silu(const uint16_t* x, int64_t k, const uint16_t* packed,
                                         int64_t g, int64_t half_groups, at::BFloat16* act,
                                         int64_t f) {
  alignas(64) float gate[MR * DOT_COLS], up[MR * DOT_COLS];
  alignas(64) at::BFloat16 gate16[DOT_COLS], up16[DOT_COLS];
  const int64_t group_elems = (k + 1) / 2 * 2 * DOT_COLS;
  dot_tile<MR>(x, k, k, packed + g * group_elems, gate);
  dot_tile<MR>(x, k, k, packed + (g + half_groups) * group_elems, up);
  for (int m = 0; m < MR; ++m) {
    for (int64_t j = 0; j < DOT_COLS; j += 8) {
      store8(gate16 + j, _mm256_loadu_ps(gate + m * DOT_COLS + j));
      store8(up16 + j, _mm256_loadu_ps(up + m * DOT_COLS + j));
    }
    silu_mul_wide(gate16, up16, act + m * f + g * DOT_COLS, DOT_COLS);
  }
}

// act [m, f] = silu(gate) * up of x [m, k] times the packed gate/up weight [2f, k] (see
// fused_silu_applies); units as dot_rows walks them, over the gate groups
inline void dot_rows_silu(const uint16_t* x, const uint16_t* packed, at::BFloat16* act,
                          int64_t m, int64_t f, int64_t k) {
  const int64_t half = f / DOT_COLS, blocks = (m + DOT_ROWS - 1) / DOT_ROWS;
  for_units(half * blocks, blocks == 1, [&](int64_t u) {
    const int64_t g = u % half, r0 = (u / half) * DOT_ROWS, r1 = std::min(m, r0 + DOT_ROWS);
    row_tiles(r0, r1, [&](auto mr, int64_t r) {
      dot_block_silu<decltype(mr)::value>(x + r * k, k, packed, g, half, act + r * f, f);
    });
  });
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
