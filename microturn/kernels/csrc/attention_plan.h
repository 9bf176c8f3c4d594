// Planning an attention call: row groups, split partials, passes, and their fold.
#pragma once
#include "attention_kernels.h"

namespace {

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
    // outside a team each pool thread keeps its own across calls: a prefill pass calls this
    // once a layer, and fresh buffers cost an allocation and their zeroing every time
    thread_local AttentionWorkspace own;
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
