// Ragged attention through block tables, and writing new K/V rows into the pool.
#pragma once
#include "attention_plan.h"

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
