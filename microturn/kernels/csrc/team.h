// The thread team of a decode-sized pass and the work-sharing helpers every op uses.
#pragma once
#include "simd.h"

namespace microturn {

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
inline thread_local TeamSeat seat;

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
// units 0, 1, 2, ... (n and past it: done) to whichever thread asks next (two threads outside a
// team: from the two ends). On a shared machine one core often runs slower than the other for
// a while (static halves left it 15-30 % behind in attention); this way it simply takes fewer
// units. What a unit computes never depends on the thread that runs it, so neither do the
// results.
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
  std::atomic<int64_t> taken{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t worker, int64_t) {
    if (workers != 2) {
      body([&taken] { return taken.fetch_add(1, std::memory_order_relaxed); });
      return;
    }
    // Two threads take from the two ends (units are listed row by row): each mostly works on
    // its own rows, which the next op, split in row halves, then finds in its own cache (on a
    // VM whose two vCPUs sit on different chiplets a line from the other costs ~350 ns). The
    // shared count keeps the takes disjoint: a + b <= n.
    int64_t own = 0;
    body([&] {
      if (taken.fetch_add(1, std::memory_order_relaxed) >= n) return n;
      const int64_t k = own++;
      return worker == 0 ? k : n - 1 - k;
    });
  });
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

}  // namespace microturn
using namespace microturn;
