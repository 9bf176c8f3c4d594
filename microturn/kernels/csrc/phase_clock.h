// Where a paged pass spends its wall time, phase by phase, for `bench engine --profile`. Off
// unless asked for (one relaxed load a pass). Only the calling thread (rank 0 of a team) keeps
// time: a phase's lap ends after its closing barrier, so it is the phase's wall time.
#pragma once
#include <chrono>

#include "team.h"

namespace microturn {

enum Phase : int {
  PHASE_EMBED, PHASE_NORM, PHASE_QKV, PHASE_ROTARY, PHASE_ATTENTION, PHASE_O, PHASE_GATE_UP,
  PHASE_SILU, PHASE_DOWN, PHASE_HEAD, PHASE_COUNT
};
inline constexpr const char* PHASE_NAMES[PHASE_COUNT] = {
    "embed", "norm", "qkv", "rotary+write", "attention", "o", "gate/up", "silu", "down", "head"};

inline std::atomic<bool> g_phase_profile{false};
inline std::array<std::atomic<int64_t>, PHASE_COUNT> g_phase_ns{};

struct PhaseClock {
  bool on = g_phase_profile.load(std::memory_order_relaxed) && seat.rank == 0;
  std::chrono::steady_clock::time_point last = on ? std::chrono::steady_clock::now()
                                                  : std::chrono::steady_clock::time_point{};
  void lap(Phase phase) {
    if (!on) return;
    const auto now = std::chrono::steady_clock::now();
    g_phase_ns[phase].fetch_add(
        std::chrono::duration_cast<std::chrono::nanoseconds>(now - last).count(),
        std::memory_order_relaxed);
    last = now;
  }
};

}  // namespace microturn
