// The dMel frame embedding as one torch call: each frame's 80 chosen table rows summed in
// fp32 by DMelEmbedding's fixed pairwise tree, a column block at a time in registers (the
// torch ops materialise [frames, 80, width] in fp32 first: ~1.5 ms a tick per 5 sessions).
#include "simd.h"

namespace {

constexpr int64_t MAX_CHANNELS = 128;

// out[0, 8) = the tree's sum of rows[c][0, 8) over c < n: while more than one is left,
// row i += row i + half (i < half), an odd last row moving up to i = half; the same fp32 adds
// in the same order as the torch module, so the same bits
inline __m256 tree_sum(__m256* rows, int64_t n) {
  while (n > 1) {
    const int64_t half = n / 2;
    for (int64_t i = 0; i < half; ++i) rows[i] = _mm256_add_ps(rows[i], rows[i + half]);
    if (n % 2) rows[half] = rows[2 * half];
    n = half + n % 2;
  }
  return rows[0];
}

template <typename T>
void dmel_rows(const T* table, const uint8_t* codes, float* out, int64_t frames,
               int64_t channels, int64_t bins, int64_t width) {
  at::parallel_for(0, frames, 8, [&](int64_t begin, int64_t end) {
    __m256 rows[MAX_CHANNELS];
    for (int64_t f = begin; f < end; ++f) {
      const uint8_t* code = codes + f * channels;
      for (int64_t j = 0; j < width; j += 8) {
        for (int64_t c = 0; c < channels; ++c)
          rows[c] = load8(table + (c * bins + code[c]) * width + j);
        _mm256_storeu_ps(out + f * width + j, tree_sum(rows, channels));
      }
    }
  });
}

}  // namespace

torch::Tensor dmel_embedding(torch::Tensor table, torch::Tensor codes, int64_t bins) {
  TORCH_CHECK(table.dim() == 2 && table.is_contiguous(), "dmel_embedding: table [channels * bins, width]");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kUInt8,
              "dmel_embedding: codes uint8 [frames, channels]");
  const int64_t frames = codes.size(0), channels = codes.size(1), width = table.size(1);
  TORCH_CHECK(channels >= 1 && channels <= MAX_CHANNELS && bins >= 1 &&
              table.size(0) == channels * bins && width % 8 == 0,
              "dmel_embedding: a table of ", channels, " x ", bins, " rows of a multiple of 8 "
              "columns (at most ", MAX_CHANNELS, " channels) expected, got [", table.size(0),
              ", ", width, "]");
  auto c = codes.contiguous();
  TORCH_CHECK(frames == 0 || c.max().item<int64_t>() < bins, "dmel_embedding: a code is not below ",
              bins, " bins");
  auto out = torch::empty({frames, width}, table.options().dtype(torch::kFloat32));
  if (table.scalar_type() == torch::kBFloat16) {
    dmel_rows(table.data_ptr<at::BFloat16>(), c.data_ptr<uint8_t>(), out.data_ptr<float>(), frames,
              channels, bins, width);
  } else {
    TORCH_CHECK(table.scalar_type() == torch::kFloat32, "dmel_embedding: fp32 or bf16 only");
    dmel_rows(table.data_ptr<float>(), c.data_ptr<uint8_t>(), out.data_ptr<float>(), frames,
              channels, bins, width);
  }
  return out;
}
