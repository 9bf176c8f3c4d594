// How far apart the pool's first two threads sit: a cache line handed back and forth between
// them. On a VM the two vCPUs may share a last-level cache one minute and sit on different
// chiplets the next; every op that hands rows from one thread to the other pays for it, so the
// engine bench reports it beside the bandwidth and matmul peak.
#include <chrono>

#include "api.h"

namespace {

struct alignas(64) Baton {
  std::atomic<int64_t> turn{0};
};

}  // namespace

double thread_round_trip_ns(int64_t rounds, int64_t samples) {
  TORCH_CHECK(rounds >= 1 && samples >= 1, "thread_round_trip_ns: rounds and samples >= 1");
  if (omp_get_max_threads() < 2) return 0.0;
  std::vector<double> round_trips;
  for (int64_t sample = 0; sample < samples; ++sample) {
    Baton baton;
    double ns = 0.0;
#pragma omp parallel num_threads(2)
    if (omp_get_num_threads() == 2) {  // (a nested region may get one: no partner to wait for)
      const int64_t me = omp_get_thread_num();
      const auto started = std::chrono::steady_clock::now();
      // thread 0 writes odd turns, thread 1 even ones: each waits for the other's write
      for (int64_t i = 0; i < rounds; ++i) {
        const int64_t mine = 2 * i + 1 + me;
        while (baton.turn.load(std::memory_order_acquire) != mine - 1) _mm_pause();
        baton.turn.store(mine, std::memory_order_release);
      }
      if (me == 0)
        ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - started)
                 .count() / static_cast<double>(rounds);
    }
    round_trips.push_back(ns);
  }
  std::sort(round_trips.begin(), round_trips.end());
  return round_trips[round_trips.size() / 2];  // the median sample (0: no second thread)
}
